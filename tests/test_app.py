"""The viewer's functions (the ones app.py's page calls) on both kinds of finished demo run: a single split
(conftest.py's pipeline_run) and a 2-fold run (cv_run).

New images get each CNN's probability and maps from the run's models: on a K-fold run the bagged ensemble of the
fold models, checked against a plain recomputation (every fold's checkpoint loaded anew, its probabilities and
maps averaged), and against predict.py's own path. Stored images get their maps from the heatmap file of the fold
that scored them and their probabilities from the run's predictions file (test_predictions.npz or
oof_predictions.csv); the Browse tab lists every held-out image (K-fold: every image, with its fold); the Results
tab shows results.md or cv_results.md. Also the overlays, the filters, the warnings, and a run whose files do not
match is refused with predict.py's one-line errors. The page itself, in a real browser: tests/test_app_browser.py.
"""

import csv
import dataclasses
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import app
from common.cams.display import blend, colorize, combined_map, is_flat, jet, label_flat
from common.cams.heatmap_file import CAM_ARRAY_KEYS, load_heatmaps
from common.cams.methods import CAM_DISPLAY_NAMES, CAM_METHODS, cams_and_logits
from common.core.errors import PipelineError
from common.core.runfiles import checkpoint_path, fold_dir, heatmap_path, probability_key
from common.data.images import load_rgb
from common.data.records import CLASS_NAMES
from common.data.transforms import build_transforms
from common.evaluation.calibration import apply_temperature
from common.evaluation.conformal import prediction_sets, set_names, threshold_from_scores
from common.evaluation.metrics import softmax
from common.fusion.mlp import classifier_features, mlp_from_classifier
from common.inference import BATCH_SIZE as VIEWER_BATCH_SIZE, load_run_models, predict_batches
from common.models.checkpoints import load_checkpoint, model_from_checkpoint
from common.models.registry import MODEL_ORDER
from common.run import open_run
import common.viewer as viewer_module
from common.viewer import (
    DISPLAY_SIZE,
    browse_rows,
    filter_rows,
    load_viewer_run,
    mark_own_images,
    method_name,
    open_uploads,
    predict_views,
    probability_markdown,
    report_plots,
    render_panels,
    results_markdown,
    stored_view,
    with_patient_set,
)

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
KINDS = ("single", "kfold")
RESULTS_MARKDOWN = {"single": "results.md", "kfold": "cv_results.md"}
CAUTIONS = ("DenseNet-121, ResNet-50, VGG-16: trained from random initialisation",
            "DenseNet-121, ResNet-50, VGG-16: trained on synthetic demo data")

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py: BLAS threads oversubscribe the small CPU


@pytest.fixture(scope="module")
def run(pipeline_run):
    """The single-split run, loaded as app.py loads it."""
    return load_viewer_run(pipeline_run, device=CPU)


@pytest.fixture(scope="module")
def cv(cv_run):
    """The 2-fold run, loaded as app.py loads it: each CNN the ensemble of its two fold models."""
    return load_viewer_run(cv_run, device=CPU)


@pytest.fixture(scope="module")
def new_images(tmp_path_factory) -> list[Path]:
    """Two images no run has seen, of other sizes and formats (JPEG, TIFF)."""
    folder = tmp_path_factory.mktemp("uploads")
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (77, 123, 3), dtype=np.uint8)).save(folder / "odd_size.jpg")
    Image.fromarray(rng.integers(0, 256, (460, 700, 3), dtype=np.uint8)).save(folder / "breakhis_size.tif")
    return [folder / "odd_size.jpg", folder / "breakhis_size.tif"]


# ------------------------------------------------------------------------------------------------ the reference


def recompute(run_dir: Path, paths: list[Path]) -> dict:
    """The images through the run's checkpoints, each loaded anew and run plainly, one fold model at a time:
    'folds': per fold, each CNN's P(malignant); 'probabilities': each CNN's mean over its fold models (the bagged
    ensemble; a single split: its one model), their soft vote and the final MLP ('final') on the bagged maps of
    the method it reads (and the bagged logits, when its feature set has them); 'maps': method -> arch -> the
    fold models' mean raw maps."""
    classifier = torch.load(run_dir / "final_classifier.pth", map_location="cpu", weights_only=True)
    folders = ([fold_dir(run_dir, fold) for fold in range(1, open_run(run_dir).partition.n_folds + 1)]
               if (run_dir / "folds.json").is_file() else [run_dir])
    images = [load_rgb(path) for path in paths]
    per_fold = [{} for _ in folders]
    probabilities, logits, maps = {}, {}, {method: {} for method in CAM_METHODS}
    for arch in MODEL_ORDER:
        fold_logits, fold_maps = [], {method: [] for method in CAM_METHODS}
        for fold, folder in enumerate(folders):
            checkpoint = load_checkpoint(checkpoint_path(folder, arch), arch)
            model = model_from_checkpoint(checkpoint).eval()
            transform = build_transforms(train=False, image_size=int(checkpoint["image_size"]))
            batch = torch.stack([transform(image) for image in images])
            member_maps, member_logits = cams_and_logits(model, arch, batch, target=classifier["target_class_rule"],
                                                         methods=CAM_METHODS)
            fold_logits.append(member_logits.numpy())
            per_fold[fold][arch] = softmax(member_logits.numpy())[:, 1]
            for method in CAM_METHODS:
                fold_maps[method].append(member_maps[method].numpy())
        probabilities[arch] = np.mean([fold[arch] for fold in per_fold], axis=0)
        logits[arch] = np.mean(fold_logits, axis=0)
        for method in CAM_METHODS:
            maps[method][arch] = np.mean(fold_maps[method], axis=0)
    probabilities["soft_vote"] = np.mean([probabilities[arch] for arch in MODEL_ORDER], axis=0)
    features = classifier_features(classifier, maps[classifier["cam_method"]], logits)
    with torch.no_grad():
        final_logits = mlp_from_classifier(classifier)(torch.from_numpy(features)).numpy()
    probabilities["final"] = softmax(final_logits)[:, 1]
    return {"folds": per_fold, "probabilities": probabilities, "maps": maps}


@dataclass(frozen=True)
class Uploads:
    """One run kind's viewer, the images dropped on its Predict tab (two of its held-out images, two new ones),
    the views it made of them, and the plain recomputation of what they should show."""

    kind: str
    viewer: object
    paths: list[Path]
    views: list
    expected: dict

    def reference(self, key: str) -> np.ndarray:
        return self.expected["probabilities"]["final" if key == self.viewer.final_key else key]


@pytest.fixture(scope="module", params=KINDS)
def uploads(request, new_images) -> Uploads:
    viewer = request.getfixturevalue("run" if request.param == "single" else "cv")
    held = viewer.held
    # a held-out image of the first and of the last fold (a single split: the first and last test image)
    first, last = int(np.flatnonzero(held.folds == 1)[0]), int(np.flatnonzero(held.folds == held.folds.max())[-1])
    paths = [viewer.run.data_root / held.paths[first], viewer.run.data_root / held.paths[last], *new_images]
    views = predict_views(viewer, open_uploads([str(path) for path in paths]))
    return Uploads(request.param, viewer, paths, views, recompute(viewer.output_dir, paths))


# ------------------------------------------------------------------------------------------------ Predict


def test_uploads_get_the_bagged_mean_of_the_fold_models(uploads):
    """Each CNN's P(malignant) and maps of an upload are the mean over its fold models (a single split: its one
    model), the soft vote their mean, the final MLP's P the classifier file's MLP on those maps."""
    assert [view.title for view in uploads.views] == [path.name for path in uploads.paths]
    for key in uploads.viewer.probability_keys:
        np.testing.assert_allclose([view.probabilities[key] for view in uploads.views], uploads.reference(key),
                                   rtol=0, atol=1e-5, err_msg=key)
    for method in CAM_METHODS:
        for arch in MODEL_ORDER:
            np.testing.assert_allclose(np.stack([view.maps[method][arch] for view in uploads.views]),
                                       uploads.expected["maps"][method][arch], rtol=0, atol=1e-5,
                                       err_msg=f"{method} {arch}")
    if uploads.kind == "kfold":  # the folds' models disagree, so the mean is not any one fold's answer
        assert len(uploads.expected["folds"]) == 2
        for fold in uploads.expected["folds"]:
            assert any(not np.allclose([view.probabilities[arch] for view in uploads.views], fold[arch], atol=1e-4)
                       for arch in MODEL_ORDER)


def test_new_images_get_predict_pys_probabilities_and_maps(uploads):
    """predict.py scores an image the run has never seen with common.inference.predict_batches (models loaded
    anew): the viewer shows the very same numbers and maps. Scored in the viewer's batches: a convolution's float32
    result depends on the batch size by ~1e-5, more than this test's tolerance."""
    new = [index for index, path in enumerate(uploads.paths) if path.suffix in (".jpg", ".tif")]
    models = load_run_models(open_run(uploads.viewer.output_dir), CPU)
    parts = list(predict_batches(uploads.paths, models, batch_size=VIEWER_BATCH_SIZE))  # as predict_views
    for key in uploads.viewer.probability_keys:
        expected = np.concatenate([part["probabilities"]["final_mlp" if key == uploads.viewer.final_key else key]
                                   for part in parts])[new]
        np.testing.assert_allclose([uploads.views[index].probabilities[key] for index in new], expected, rtol=0,
                                   atol=1e-6, err_msg=key)
    for arch in MODEL_ORDER:
        expected = np.concatenate([part["cams"][arch] for part in parts])[new]
        np.testing.assert_allclose(np.stack([uploads.views[index].maps["gradcam"][arch] for index in new]), expected,
                                   rtol=0, atol=1e-6, err_msg=arch)


def test_new_images_get_the_runs_calibrated_probabilities_and_an_image_level_set(uploads):
    """Each upload's calibrated P is its P scaled by the temperature in final_classifier.pth, the final MLP's set
    comes from the held-out images' scores there, and the page says both."""
    viewer = uploads.viewer
    classifier = viewer.models.classifier
    threshold = threshold_from_scores(classifier["conformal"]["image_scores"].numpy(), classifier["conformal"]["alpha"])
    for view in uploads.views:
        for key in viewer.probability_keys:
            temperature = classifier["temperatures"]["final_mlp" if key == viewer.final_key else key]
            assert view.calibrated[key] == pytest.approx(apply_temperature(view.probabilities[key], temperature))
        expected = set_names(prediction_sets(np.array([view.calibrated[viewer.final_key]]), threshold))[0]
        assert view.conformal_set == expected
        markdown = probability_markdown(viewer, view)
        assert f"image level: calibrated on held-out images, not patients): **{expected}**" in markdown
        assert f"| {view.calibrated[viewer.final_key]:.3f} |" in markdown
    # Several uploads: what they are as one patient's images, from the held-out patients' scores.
    mean = np.mean([view.calibrated[viewer.final_key] for view in uploads.views])
    patient_threshold = threshold_from_scores(classifier["conformal"]["patient_scores"].numpy(),
                                              classifier["conformal"]["alpha"])
    expected = set_names(prediction_sets(np.array([mean]), patient_threshold))[0]
    for view in with_patient_set(viewer, uploads.views):
        assert (f"If these {len(uploads.views)} uploads are one patient's images: mean calibrated P(malignant) "
                f"{mean:.3f}, conformal set (alpha {classifier['conformal']['alpha']:g}, patient level): "
                f"**{expected}**") in probability_markdown(viewer, view)
    assert with_patient_set(viewer, uploads.views[:1])[0] is uploads.views[0]  # one image: no patient-level line


def test_pictures_keep_the_aspect_ratio_at_display_size(uploads):
    sizes = {view.title: view.image.size for view in uploads.views}
    assert sizes["odd_size.jpg"] == (DISPLAY_SIZE, round(77 * DISPLAY_SIZE / 123))
    assert sizes["breakhis_size.tif"] == (DISPLAY_SIZE, round(460 * DISPLAY_SIZE / 700))


def test_predict_handler_fills_the_table_and_the_view(uploads):
    """app.predict_uploads, as the page calls it on an upload: one table row per image, the first one shown."""
    viewer = uploads.viewer
    outputs = app.predict_uploads(viewer, [str(path) for path in uploads.paths], "gradcam", 0.3)
    all_views, current, _chooser, table, markdown, _method, *pictures = outputs
    assert current is all_views[0] and len(all_views) == len(uploads.paths)
    final = uploads.reference(viewer.final_key)
    for row, line in enumerate(table):
        assert line[0] == uploads.paths[row].name
        assert line[1:-1] == pytest.approx([round(float(uploads.reference(key)[row]), 3)
                                            for key in viewer.probability_keys], abs=1e-3 + 1e-9)
        assert line[-1] == CLASS_NAMES[int(final[row] >= 0.5)]
    assert f"P(malignant) {final[0]:.3f}" in markdown
    assert len(pictures) == len(app.PANEL_NAMES)
    panels = render_panels(viewer, all_views[0], method="gradcam", opacity=0.3)
    for picture, (panel, caption) in zip(pictures, panels):
        assert picture["label"] == caption
        assert np.array_equal(np.asarray(picture["value"]), np.asarray(panel))


def test_uploads_report_their_progress_batch_by_batch(uploads, monkeypatch):
    """The page's progress bar: after each batch, (images scored, all images)."""
    monkeypatch.setattr(viewer_module, "BATCH_SIZE", 2)
    reports = []
    named = open_uploads([str(path) for path in uploads.paths])
    predict_views(uploads.viewer, named, done=lambda scored, total: reports.append((scored, total)))
    total = len(named)
    assert reports == [(min(end, total), total) for end in range(2, total + 2, 2)] and total > 2


@pytest.mark.parametrize("kind", KINDS)
def test_an_upload_that_is_one_of_the_runs_own_images_is_flagged(kind, request, new_images, tmp_path):
    """A byte-identical copy of a dataset image (renamed, as an upload is) carries a note with its split, so
    nobody takes it for a new case; a new image carries none."""
    viewer = request.getfixturevalue("run" if kind == "single" else "cv")
    row = 0
    record = viewer.run.partition.records[row]
    copy = tmp_path / "upload.png"
    shutil.copyfile(viewer.run.data_root / record.path, copy)
    paths = [str(copy), str(new_images[0])]
    views = mark_own_images(viewer, predict_views(viewer, open_uploads(paths)), paths)
    assert views[0].details.startswith("one of this run's own") and f"patient {record.patient}" in views[0].details
    if kind == "kfold":
        assert f"fold {int(viewer.run.partition.folds[row])}" in views[0].details
    else:
        assert viewer.run.partition.splits[row] in views[0].details
    assert f"**Note: {views[0].details}.**" in probability_markdown(viewer, views[0])
    assert views[1].details == "" and "Note:" not in probability_markdown(viewer, views[1])


def test_not_an_image_is_an_error_in_the_page(run, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image\n")
    with pytest.raises(app.gr.Error, match="cannot read image .*notes.png"):
        app.predict_uploads(run, [str(bad)], "gradcam", 0.45)


def test_overlays_blend_the_image_and_each_map_by_the_opacity(uploads):
    viewer, view = uploads.viewer, uploads.views[-1]
    size = view.image.size
    for method in CAM_METHODS:
        maps = view.maps[method]
        transparent = render_panels(viewer, view, method=method, opacity=0.0)
        assert all(np.array_equal(np.asarray(picture), np.asarray(view.image)) for picture, _ in transparent)
        half = render_panels(viewer, view, method=method, opacity=0.5)
        for (picture, caption), arch in zip(half[1:4], MODEL_ORDER):
            plain = np.asarray(blend(view.image, colorize(maps[arch], size), 0.5))
            if is_flat(maps[arch]):  # (1x1 maps at the tests' 32 px) the note, and nothing else, added
                assert np.array_equal(np.asarray(picture), np.asarray(label_flat(Image.fromarray(plain))))
            else:
                assert np.array_equal(np.asarray(picture), plain)
            assert caption == f"{viewer.name(arch)}: P {view.probabilities[arch]:.3f}"
        combined = combined_map([maps[arch] for arch in MODEL_ORDER], size)
        plain = blend(view.image, jet(combined), 0.5)
        assert np.array_equal(np.asarray(half[4][0]),
                              np.asarray(label_flat(plain) if is_flat(combined) else plain)), method
        assert half[4][1] == f"combined {CAM_DISPLAY_NAMES[method]}"
    assert any(is_flat(view.maps["gradcam"][arch]) for arch in MODEL_ORDER)  # the labelled case was seen


# ------------------------------------------------------------------------------------------------ Browse


def test_stored_image_shows_the_heatmap_files_maps_and_the_runs_probabilities(run):
    """Single split: the Browse tab lists the test split; a row's view has every map type of the heatmap files'
    row and the probabilities of test_predictions.npz."""
    rows = browse_rows(run)
    assert len(rows) == run.results["test_images"]
    with np.load(run.output_dir / "test_predictions.npz") as content:
        saved = {key: content[key] for key in content.files}
    assert [row.path for row in rows] == list(saved["paths"]) and {row.fold for row in rows} == {1}
    for row in (rows[0], rows[-1]):
        view = stored_view(run, row)
        for arch in MODEL_ORDER:
            arrays = load_heatmaps(heatmap_path(run.output_dir, arch))
            file_row = list(arrays["paths"]).index(row.path)
            for method in CAM_METHODS:
                assert np.array_equal(view.maps[method][arch], arrays[CAM_ARRAY_KEYS[method]][file_row])
            assert view.probabilities[arch] == pytest.approx(float(softmax(arrays["logits"][[file_row]])[0, 1]),
                                                             abs=1e-6)
        for key in run.probability_keys:
            assert view.probabilities[key] == pytest.approx(float(saved[probability_key(key)][row.index]), abs=1e-7)
        assert view.truth == int(saved["labels"][row.index]) and view.title == Path(row.path).name
        assert "fold" not in view.details  # one split: no fold to name


def read_oof_predictions(run_dir: Path) -> list[dict[str, str]]:
    """oof_predictions.csv's rows, read with the csv module alone."""
    with open(run_dir / "oof_predictions.csv", encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def test_kfold_browse_lists_every_image_out_of_fold(cv):
    """K-fold: Browse lists every image of folds.json once, in oof_predictions.csv's order, with the fold that
    scored it and the final classifier's out-of-fold probability."""
    oof = read_oof_predictions(cv.output_dir)
    rows = browse_rows(cv)
    assert len(rows) == len(oof) == len(cv.run.partition.records)
    assert [row.path for row in rows] == [line["path"] for line in oof]
    assert [row.fold for row in rows] == [int(line["fold"]) for line in oof]
    assert {row.fold for row in rows} == {1, 2}
    assert [row.p_malignant for row in rows] == [float(line[probability_key(cv.final_key)]) for line in oof]
    assert [CLASS_NAMES[row.truth] for row in rows] == [line["label"] for line in oof]
    assert [(row.patient, row.magnification) for row in rows] == [(line["patient"], line["magnification"])
                                                                  for line in oof]
    # each fold's rows are that fold's test split: its models never saw these patients
    for fold in (1, 2):
        with np.load(fold_dir(cv.output_dir, fold) / "test_predictions.npz") as content:
            assert {row.path for row in rows if row.fold == fold} == {str(path) for path in content["paths"]}


def test_kfold_stored_view_shows_its_folds_maps_and_names_the_fold(cv):
    """A K-fold row's view: every map type from the heatmap files of the fold that scored it (not the other
    fold's maps of the same image), every probability from oof_predictions.csv, and the fold in its details."""
    oof = read_oof_predictions(cv.output_dir)
    rows = browse_rows(cv)
    other_fold_differs = 0
    for fold in (1, 2):
        row = next(row for row in rows if row.fold == fold)
        view = stored_view(cv, row)
        for arch in MODEL_ORDER:
            arrays = load_heatmaps(heatmap_path(fold_dir(cv.output_dir, fold), arch))
            other = load_heatmaps(heatmap_path(fold_dir(cv.output_dir, 3 - fold), arch))
            file_row = list(arrays["paths"]).index(row.path)
            for method in CAM_METHODS:
                assert np.array_equal(view.maps[method][arch], arrays[CAM_ARRAY_KEYS[method]][file_row])
                other_row = list(other["paths"]).index(row.path)
                other_fold_differs += not np.array_equal(view.maps[method][arch],
                                                         other[CAM_ARRAY_KEYS[method]][other_row])
            assert view.probabilities[arch] == pytest.approx(float(softmax(arrays["logits"][[file_row]])[0, 1]),
                                                             abs=1e-6)  # the csv keeps 6 decimals
        for key in cv.probability_keys:
            assert view.probabilities[key] == float(oof[row.index][probability_key(key)]), key
        assert view.truth == row.truth and view.title == Path(row.path).name
        assert f"fold {fold}: scored and explained by fold {fold}'s models" in view.details
        assert f"fold {fold}" in probability_markdown(cv, view)
    assert other_fold_differs > 0  # the two folds' maps of an image differ, so the check tells them apart


@pytest.mark.parametrize("kind", KINDS)
def test_browse_select_shows_the_clicked_row(request, kind):
    viewer = request.getfixturevalue("run" if kind == "single" else "cv")
    rows = filter_rows(browse_rows(viewer), order="least confident first")
    event = app.gr.SelectData(None, {"index": [1, 0], "value": "", "selected": True})
    view, markdown, method, *pictures = app.browse_select(viewer, rows, "gradcam", 0.45, event)
    assert view.title == Path(rows[1].path).name
    assert f"True class: **{CLASS_NAMES[rows[1].truth]}**" in markdown
    assert method["value"] == "gradcam"
    assert np.array_equal(np.asarray(pictures[0]["value"]), np.asarray(view.image))
    assert (f"fold {rows[1].fold}:" in markdown) == (kind == "kfold")


@pytest.mark.parametrize("kind", KINDS)
def test_filters_keep_only_matching_rows_sorted_by_confidence(request, kind):
    viewer = request.getfixturevalue("run" if kind == "single" else "cv")
    rows = browse_rows(viewer)
    subtype_of = {record.path: record.subtype for record in viewer.run.partition.records}
    assert all(row.subtype == subtype_of[row.path] and row.subtype for row in rows)
    patient, magnification, subtype = rows[0].patient, rows[0].magnification, rows[0].subtype
    checks = {"truth": ("malignant", lambda row: row.truth == 1),
              "predicted": ("benign", lambda row: row.predicted == 0),
              "outcome": ("wrong", lambda row: row.truth != row.predicted),
              "patient": (patient, lambda row: row.patient == patient),
              "magnification": (magnification, lambda row: row.magnification == magnification),
              "subtype": (subtype, lambda row: row.subtype == subtype),
              "fold": ("2", lambda row: row.fold == 2)}
    for name, (value, keep) in checks.items():
        kept = filter_rows(rows, **{name: value})
        assert {row.path for row in kept} == {row.path for row in rows if keep(row)}, name
    most_first = [row.confidence for row in filter_rows(rows)]
    assert most_first == sorted(most_first, reverse=True) and len(most_first) == len(rows)
    assert [row.confidence for row in filter_rows(rows, order="least confident first")] == sorted(most_first)
    assert filter_rows(rows, patient=patient, truth=CLASS_NAMES[1 - rows[0].truth]) == []
    assert (filter_rows(rows, fold="2") == []) == (kind == "single")  # a single split has fold 1 only


def test_browse_tab_has_a_fold_filter_and_column_on_kfold_runs_only(run, cv):
    """The page's filters and table columns: the fold on a K-fold run, not on a single split (always 1 there);
    the fold filter's table shows that fold's rows, each with its fold in the fold column."""
    assert "fold" not in dict(app.browse_filters(run)) and "fold" not in app.browse_columns(run)
    assert dict(app.browse_filters(cv))["fold"] == "fold" and "fold" in app.browse_columns(cv)
    _rows, table = app.browse_filter(run, *(["all"] * len(app.browse_filters(run)) + [app.ORDERS[0]]))
    assert len(table) == len(browse_rows(run)) and all(len(line) == len(app.browse_columns(run)) for line in table)
    names = [name for name, _ in app.browse_filters(cv)]
    chosen = ["2" if name == "fold" else "all" for name in names] + [app.ORDERS[0]]
    rows, table = app.browse_filter(cv, *chosen)
    fold_column = app.browse_columns(cv).index("fold")
    assert rows == filter_rows(browse_rows(cv), fold="2") and len(rows) > 0
    assert [line[fold_column] for line in table] == [2] * len(rows)
    assert [line[0] for line in table] == [Path(row.path).name for row in rows]
    assert app.filter_choices(cv)["fold"] == ["1", "2"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_stored_cam_method_is_offered_for_stored_and_new_images(request, kind):
    """The exports store Grad-CAM, Grad-CAM++ and LayerCAM: Browse reads each map type, uploads get each from the
    same pass as their logits, and the page offers them by name."""
    viewer = request.getfixturevalue("run" if kind == "single" else "cv")
    stored = stored_view(viewer, browse_rows(viewer)[0])
    (uploaded,) = predict_views(viewer, [("upload.png", Image.new("RGB", (40, 30), (180, 90, 140)))])
    for view in (stored, uploaded):
        assert list(view.maps) == list(CAM_METHODS)
        assert all(set(view.maps[method]) == set(MODEL_ORDER) for method in CAM_METHODS)
        _markdown, method, *_pictures = app.show_view(viewer, view, "layercam", 0.45)
        assert method["value"] == "layercam"
        assert method["choices"] == [(CAM_DISPLAY_NAMES[name], name) for name in CAM_METHODS]
    assert [method_name(name) for name in CAM_METHODS] == ["Grad-CAM", "Grad-CAM++", "LayerCAM"]


def test_a_run_whose_files_hold_grad_cam_only_offers_it_alone(run):
    """Heatmap files exported before the variants hold Grad-CAM only: Browse and uploads show that one map type,
    and a page still set to another method falls back to it."""
    older = dataclasses.replace(run, held=dataclasses.replace(run.held, maps={"gradcam": run.held.maps["gradcam"]}))
    stored = stored_view(older, browse_rows(older)[0])
    (uploaded,) = predict_views(older, [("upload.png", Image.new("RGB", (40, 30), (180, 90, 140)))])
    for view in (stored, uploaded):
        assert list(view.maps) == ["gradcam"]
        _markdown, method, *pictures = app.show_view(older, view, "layercam", 0.45)
        assert method["value"] == "gradcam" and method["choices"] == [("Grad-CAM", "gradcam")]
        assert pictures[-1]["label"] == "combined Grad-CAM"


# ------------------------------------------------------------------------------------------------ the run


@pytest.mark.parametrize("kind", KINDS)
def test_results_tab_shows_the_runs_table(request, kind):
    viewer = request.getfixturevalue("run" if kind == "single" else "cv")
    assert results_markdown(viewer) == (viewer.output_dir / RESULTS_MARKDOWN[kind]).read_text(encoding="utf-8")


def test_header_describes_each_kind_of_run(run, cv):
    assert run.describe().startswith(f"Single-split run. Split: {run.results['split_protocol']}.")
    assert cv.describe().startswith(f"K-fold run, 2 folds: {cv.results['protocol']}")
    for viewer in (run, cv):
        assert f"Final classifier: {viewer.name(viewer.final_key)}" in viewer.describe()
    assert "bagged ensemble of the fold models" in cv.describe()
    assert run.held_out_name == "the test split" and cv.held_out_name.startswith("every image, out of fold")


@pytest.mark.parametrize("kind", KINDS)
def test_random_init_and_demo_data_are_flagged(request, kind):
    viewer = request.getfixturevalue("run" if kind == "single" else "cv")
    assert len(viewer.warnings) == len(CAUTIONS)
    for warning, caution in zip(viewer.warnings, CAUTIONS):
        assert warning.startswith(caution)


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_retrained_after_the_mlp_was_fitted_is_refused(request, retrain, kind):
    """A model script rerun that wrote its new checkpoint and stopped before its heatmap export: the viewer
    refuses the run as predict.py does, naming the stale maps and the command that remakes them (on a K-fold run
    the fold's own, with its --folds and --fold), then the final stage."""
    copy = request.getfixturevalue("run_copy" if kind == "single" else "cv_copy")
    folder = copy if kind == "single" else fold_dir(copy, 2)
    arch = MODEL_ORDER[0]
    retrain(checkpoint_path(folder, arch))
    expected = (f"{heatmap_path(folder, arch)} is stale: it was made by another checkpoint than "
                f"{checkpoint_path(folder, arch)}")
    with pytest.raises(PipelineError, match=re.escape(expected)) as error:
        load_viewer_run(copy, device=CPU)
    message = str(error.value)
    assert "\n" not in message and message.endswith(f", then python cancer_class_further.py --output-dir {copy}")
    assert f"--output-dir {copy} " in message  # the run's folder, where the model script writes fold_2/
    if kind == "kfold":
        assert "--folds 2 --fold 2" in message


def test_a_report_plot_that_does_not_decode_or_is_a_link_is_skipped_with_a_warning(run_copy, capsys):
    """report/ holding a broken PNG or a link to a file outside the run: the viewer starts without them."""
    report = run_copy / "report"
    shutil.rmtree(report)  # the copy's files are links to the original run's; these are made anew
    report.mkdir()
    Image.new("RGB", (40, 30), (10, 200, 30)).save(report / "a_good.png")
    (report / "b_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (report / "c_link.png").symlink_to("/etc/hostname")
    viewer = load_viewer_run(run_copy, device=CPU)
    plots = report_plots(viewer)
    assert [path.name for path, _ in plots] == ["a_good.png"]
    assert plots[0][1].getpixel((0, 0)) == (10, 200, 30)
    out = capsys.readouterr().out
    assert f"WARNING: skipped {report / 'b_broken.png'}: cannot read it as an image" in out
    assert f"WARNING: skipped {report / 'c_link.png'}: not a plain file" in out
    app.build_app(viewer).close()  # the page builds with the one good plot


def test_gradio_temp_dir_inside_the_run_is_refused(pipeline_run, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(pipeline_run / "uploads"))
    with pytest.raises(PipelineError, match="GRADIO_TEMP_DIR=.* is inside the run folder"):
        app.check_temp_dir(pipeline_run)


def free_port() -> int:
    with socket.socket() as probe:  # a port free now
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("kind", KINDS)
def test_command_line_refuses_an_unfinished_run_before_serving(request, tmp_path, kind):
    """A run folder whose models were never trained (only its split.json or folds.json): `error: ...` on one line
    naming the first missing checkpoint and its model script, exit 2, and the server never starts (the process
    ends by itself); nothing is written."""
    source = request.getfixturevalue("pipeline_run" if kind == "single" else "cv_run")
    partition_file = "split.json" if kind == "single" else "folds.json"
    (tmp_path / partition_file).write_bytes((source / partition_file).read_bytes())
    finished = subprocess.run([sys.executable, "app.py", "--output-dir", str(tmp_path), "--port", str(free_port())],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 2, finished.stderr
    lines = finished.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), finished.stderr
    first_missing = checkpoint_path(tmp_path if kind == "single" else fold_dir(tmp_path, 1), MODEL_ORDER[0])
    assert f"{first_missing} is missing: run python cancer_class_densenet_121.py " in lines[0]
    assert ("--folds 2 --fold 1" in lines[0]) == (kind == "kfold"), lines[0]
    assert sorted(path.name for path in tmp_path.iterdir()) == [partition_file]  # nothing written


@pytest.mark.parametrize("kind", KINDS)
def test_unfinished_runs_command_repeats_the_partitions_options(request, tmp_path, kind):
    """The command an unfinished run's error names must work as given: the conftest runs used --val-fraction 0.25
    (and --test-fraction 0.25 for the split), not the model scripts' defaults, which the partition file refuses."""
    source = request.getfixturevalue("pipeline_run" if kind == "single" else "cv_run")
    partition_file = "split.json" if kind == "single" else "folds.json"
    (tmp_path / partition_file).write_bytes((source / partition_file).read_bytes())
    with pytest.raises(PipelineError) as error:
        load_viewer_run(tmp_path, device=CPU)
    assert "--val-fraction 0.25" in str(error.value)
    assert ("--test-fraction 0.25" in str(error.value)) == (kind == "single")


def test_command_line_refuses_a_port_in_use_before_loading(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        finished = subprocess.run([sys.executable, "app.py", "--output-dir", str(tmp_path), "--port", str(port)],
                                  cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 2, finished.stderr
    assert finished.stderr.strip() == (f"error: cannot listen on 127.0.0.1:{port} (Address already in use); pass "
                                       "another --port or --host")
