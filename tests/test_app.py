"""The viewer's functions (the ones app.py's page calls), on a finished demo run: new images get predict.py's
probabilities and maps, stored images the heatmap files' maps and test_predictions.npz's probabilities; the
overlays, filters and warnings; a run whose files do not match is refused with predict.py's one-line errors.
The page itself, in a real browser: tests/test_app_browser.py.
"""

import dataclasses
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import app
import common.inference
import predict
from common.cams.display import blend, colorize, combined_map, jet
from common.cams.heatmap_file import load_heatmaps
from common.core.errors import PipelineError
from common.core.runfiles import checkpoint_path, heatmap_path
from common.data.records import CLASS_NAMES
from common.evaluation.metrics import softmax
from common.models.registry import MODEL_ORDER
from common.viewer import (
    DISPLAY_SIZE,
    browse_rows,
    filter_rows,
    load_viewer_run,
    map_methods,
    method_name,
    open_uploads,
    predict_views,
    render_panels,
    stored_view,
)

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def run(pipeline_run):
    return load_viewer_run(pipeline_run, device=CPU)


@pytest.fixture(scope="module")
def uploads(tmp_path_factory, run) -> list[Path]:
    """Two of the run's test images and two new images of other sizes and formats (JPEG, TIFF)."""
    folder = tmp_path_factory.mktemp("uploads")
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (77, 123, 3), dtype=np.uint8)).save(folder / "odd_size.jpg")
    Image.fromarray(rng.integers(0, 256, (460, 700, 3), dtype=np.uint8)).save(folder / "breakhis_size.tif")
    test_paths = run.report.predictions["paths"]
    return [run.report.data_root / test_paths[0], run.report.data_root / test_paths[-1],
            folder / "odd_size.jpg", folder / "breakhis_size.tif"]


def predicted_by_predict_py(uploads: list[Path], output_dir: Path) -> dict:
    """predict.predict_batches (predict.py's own path, models loaded anew) over `uploads`, as whole arrays."""
    parts = list(predict.predict_batches(uploads, output_dir, CPU))
    return {key: {name: np.concatenate([part[key][name] for part in parts]) for name in parts[0][key]}
            for key in ("cams", "probabilities")}


@pytest.fixture(scope="module")
def views(run, uploads):
    return predict_views(run, open_uploads([str(path) for path in uploads]))


def test_new_images_get_predict_pys_probabilities_and_maps(run, views, uploads):
    expected = predicted_by_predict_py(uploads, run.output_dir)
    assert [view.title for view in views] == [path.name for path in uploads]
    for key in run.probability_keys:
        reference = expected["probabilities"]["final_mlp" if key == run.final_key else key]
        np.testing.assert_allclose([view.probabilities[key] for view in views], reference, rtol=0, atol=1e-6,
                                   err_msg=key)
    for arch in MODEL_ORDER:
        np.testing.assert_allclose(np.stack([view.maps["cams"][arch] for view in views]), expected["cams"][arch],
                                   rtol=0, atol=1e-6, err_msg=arch)


def test_pictures_keep_the_aspect_ratio_at_display_size(views):
    sizes = {view.title: view.image.size for view in views}
    assert sizes["odd_size.jpg"] == (DISPLAY_SIZE, round(77 * DISPLAY_SIZE / 123))
    assert sizes["breakhis_size.tif"] == (DISPLAY_SIZE, round(460 * DISPLAY_SIZE / 700))


def test_predict_handler_fills_the_table_and_the_view(run, uploads):
    """app.predict_uploads, as the page calls it on an upload: one table row per image, the first one shown."""
    outputs = app.predict_uploads(run, [str(path) for path in uploads], "cams", 0.3)
    all_views, current, _chooser, table, markdown, _method, *pictures = outputs
    assert current is all_views[0] and len(all_views) == len(uploads)
    expected = predicted_by_predict_py(uploads, run.output_dir)["probabilities"]
    for row, line in enumerate(table):
        assert line[0] == uploads[row].name
        assert line[1:-1] == [round(float(expected[key][row]), 3)
                              for key in list(MODEL_ORDER) + ["soft_vote", "final_mlp"]]
        assert line[-1] == CLASS_NAMES[int(expected["final_mlp"][row] >= 0.5)]
    assert f"P(malignant) {expected['final_mlp'][0]:.3f}" in markdown
    assert len(pictures) == len(app.PANEL_NAMES)
    panels = render_panels(run, all_views[0], method="cams", opacity=0.3)
    for picture, (panel, caption) in zip(pictures, panels):
        assert picture["label"] == caption
        assert np.array_equal(np.asarray(picture["value"]), np.asarray(panel))


def test_not_an_image_is_an_error_in_the_page(run, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image\n")
    with pytest.raises(app.gr.Error, match="cannot read image .*notes.png"):
        app.predict_uploads(run, [str(bad)], "cams", 0.45)


def test_overlays_blend_the_image_and_each_map_by_the_opacity(run, views):
    view = views[-1]
    size = view.image.size
    maps = view.maps["cams"]
    transparent = render_panels(run, view, opacity=0.0)
    assert all(np.array_equal(np.asarray(picture), np.asarray(view.image)) for picture, _ in transparent)
    half = render_panels(run, view, opacity=0.5)
    for (picture, caption), arch in zip(half[1:4], MODEL_ORDER):
        assert np.array_equal(np.asarray(picture), np.asarray(blend(view.image, colorize(maps[arch], size), 0.5)))
        assert caption == f"{run.name(arch)}: P {view.probabilities[arch]:.3f}"
    combined = blend(view.image, jet(combined_map([maps[arch] for arch in MODEL_ORDER], size)), 0.5)
    assert np.array_equal(np.asarray(half[4][0]), np.asarray(combined))


def test_stored_image_shows_the_heatmap_files_maps_and_the_runs_probabilities(run):
    rows = browse_rows(run)
    assert len(rows) == run.report.results["test_images"]
    saved = run.report.predictions
    for row in (rows[0], rows[-1]):
        view = stored_view(run, row)
        for arch in MODEL_ORDER:
            arrays = load_heatmaps(heatmap_path(run.output_dir, arch))
            file_row = list(arrays["paths"]).index(row.path)
            assert np.array_equal(view.maps["cams"][arch], arrays["cams"][file_row])
            assert view.probabilities[arch] == pytest.approx(float(softmax(arrays["logits"][[file_row]])[0, 1]),
                                                             abs=1e-6)
        final_name = f"prob_{run.final_key.replace('+', '_')}"
        assert view.probabilities[run.final_key] == pytest.approx(float(saved[final_name][row.index]), abs=1e-7)
        assert view.truth == int(saved["labels"][row.index]) and view.title == Path(row.path).name


def test_browse_select_shows_the_clicked_row(run):
    rows = filter_rows(browse_rows(run), order="least confident first")
    event = app.gr.SelectData(None, {"index": [1, 0], "value": "", "selected": True})
    view, markdown, _method, *pictures = app.browse_select(run, "test", rows, "cams", 0.45, event)
    assert view.title == Path(rows[1].path).name
    assert f"True class: **{CLASS_NAMES[rows[1].truth]}**" in markdown
    assert np.array_equal(np.asarray(pictures[0]["value"]), np.asarray(view.image))


def test_filters_keep_only_matching_rows_sorted_by_confidence(run):
    rows = browse_rows(run)
    subtype_of = {record.path: record.subtype for record in run.split.records}
    assert all(row.subtype == subtype_of[row.path] and row.subtype for row in rows)
    patient, magnification, subtype = rows[0].patient, rows[0].magnification, rows[0].subtype
    checks = {"truth": ("malignant", lambda row: row.truth == 1),
              "predicted": ("benign", lambda row: row.predicted == 0),
              "outcome": ("wrong", lambda row: row.truth != row.predicted),
              "patient": (patient, lambda row: row.patient == patient),
              "magnification": (magnification, lambda row: row.magnification == magnification),
              "subtype": (subtype, lambda row: row.subtype == subtype)}
    for name, (value, keep) in checks.items():
        kept = filter_rows(rows, **{name: value})
        assert {row.path for row in kept} == {row.path for row in rows if keep(row)}, name
    most_first = [row.confidence for row in filter_rows(rows)]
    assert most_first == sorted(most_first, reverse=True) and len(most_first) == len(rows)
    assert [row.confidence for row in filter_rows(rows, order="least confident first")] == sorted(most_first)
    assert filter_rows(rows, patient=patient, truth=CLASS_NAMES[1 - rows[0].truth]) == []


def test_every_stored_cam_method_is_offered_for_stored_and_new_images(run, views):
    """The export stores Grad-CAM, Grad-CAM++ and LayerCAM: Browse reads each array, uploads get each from the
    same pass as their logits, and the page offers them by name."""
    assert map_methods(run) == ["cams", "cams_gradcampp", "cams_layercam"]
    assert [method_name(key) for key in map_methods(run)] == ["Grad-CAM", "Grad-CAM++", "LayerCAM"]
    row = browse_rows(run)[0]
    view = stored_view(run, row)
    file_row = run.heatmap_row["vgg16"][row.path]
    for key in map_methods(run):
        assert np.array_equal(view.maps[key]["vgg16"], run.report.heatmaps["vgg16"][key][file_row])
        assert set(views[0].maps[key]) == set(MODEL_ORDER)
    _markdown, method, *_pictures = app.show_view(run, views[0], "cams_layercam", 0.45)
    assert method["value"] == "cams_layercam" and ("LayerCAM", "cams_layercam") in method["choices"]


def test_a_later_map_type_appears_when_the_files_hold_it(run):
    """A later heatmap format with another `cams_<name>` array: offered under its name, read from its array."""
    heatmaps = {arch: {**arrays, "cams_scorecam": arrays["cams"] * 2 + 1} for arch, arrays in run.report.heatmaps.items()}
    extended = dataclasses.replace(run, report=dataclasses.replace(run.report, heatmaps=heatmaps))
    assert map_methods(extended) == ["cams", "cams_gradcampp", "cams_layercam", "cams_scorecam"]
    assert method_name("cams_scorecam") == "scorecam"
    row = browse_rows(extended)[0]
    view = stored_view(extended, row)
    file_row = extended.heatmap_row["vgg16"][row.path]
    assert np.array_equal(view.maps["cams_scorecam"]["vgg16"], heatmaps["vgg16"]["cams_scorecam"][file_row])


def test_random_init_and_demo_data_are_flagged(run):
    assert len(run.warnings) == 2
    assert run.warnings[0].startswith("DenseNet-121, ResNet-50, VGG-16: trained from random initialisation")
    assert run.warnings[1].startswith("DenseNet-121, ResNet-50, VGG-16: trained on synthetic demo data")


def test_checkpoint_changed_after_the_mlp_was_trained_is_refused(pipeline_run, monkeypatch):
    """A checkpoint that is not the one the MLP and the maps were made from: the viewer refuses the run as predict.py
    does (here the maps beside it are stale too, which the message says first, with the command that remakes them)."""
    monkeypatch.setattr(common.inference, "sha256_of_file", lambda path: "0" * 64)
    arch = MODEL_ORDER[0]
    expected = (f"{heatmap_path(pipeline_run, arch)} is stale: it was made by another checkpoint than "
                f"{checkpoint_path(pipeline_run, arch)}")
    with pytest.raises(PipelineError, match=re.escape(expected)):
        load_viewer_run(pipeline_run, device=CPU)


def test_gradio_temp_dir_inside_the_run_is_refused(pipeline_run, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(pipeline_run / "uploads"))
    with pytest.raises(PipelineError, match="GRADIO_TEMP_DIR=.* is inside the run folder"):
        app.check_temp_dir(pipeline_run)


def test_command_line_refuses_an_unfinished_run_before_serving(tmp_path):
    """`error: ...` on one line, exit 2, and the server never starts (the process ends by itself)."""
    (tmp_path / "split.json").write_text("{}")
    with socket.socket() as probe:  # a port free now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    finished = subprocess.run([sys.executable, "app.py", "--output-dir", str(tmp_path), "--port", str(port)],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 2, finished.stderr
    lines = finished.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), finished.stderr
    assert "results.json is missing: run cancer_class_further.py" in lines[0]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["split.json"]  # nothing written


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
