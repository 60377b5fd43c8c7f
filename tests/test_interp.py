"""Interpretability in the pipeline (issue #14): the export stores Grad-CAM, Grad-CAM++ and LayerCAM of one pass;
heatmap files written before the variants still load; the faithfulness command on a finished run; the final MLP
on another stored map type; predict.py --explain.

Run-level tests use the session fixture `pipeline_run` (tests/conftest.py: the pipeline on the demo tree, 32 px).
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.cams.display import combined_map
from common.cams.ensemble import CnnEnsemble
from common.cams.heatmap_file import CAM_ARRAY_KEYS, load_heatmaps, stored_cam_methods, stored_cams
from common.cams.methods import CAM_METHODS, cams_and_logits, parse_cam_methods
from common.core.errors import PipelineError
from common.core.fileio import save_npz
from common.core.runfiles import checkpoint_path, heatmap_path
from common.data.images import load_rgb
from common.data.partition import load_split
from common.data.transforms import build_transforms
from common.evaluation.metrics import softmax
from common.fusion.features import Standardizer, build_features, stack_maps
from common.fusion.mlp import build_mlp, mlp_logits
from common.models.checkpoints import load_checkpoint, model_from_checkpoint
from common.models.registry import MODEL_ORDER
from common.report.build import build_report
from common.run import check_aligned
from common.training.config import heatmaps_only_command

ROOT = Path(__file__).resolve().parents[1]


def load_aligned_heatmaps(folder: Path) -> dict[str, dict]:
    """The folder's three heatmap files, each read and then checked together (common.run.check_aligned)."""
    files = {arch: heatmap_path(folder, arch) for arch in MODEL_ORDER}
    heatmaps = {arch: load_heatmaps(path) for arch, path in files.items()}
    check_aligned(heatmaps, files)
    return heatmaps


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


# ------------------------------------------------------------------------------------------ the export


@pytest.mark.parametrize("arch", MODEL_ORDER)
def test_export_stores_every_cam_method_equal_to_a_recomputed_pass(pipeline_run, arch):
    heatmaps = load_heatmaps(heatmap_path(pipeline_run, arch))
    assert stored_cam_methods(heatmaps) == CAM_METHODS
    split = load_split(pipeline_run / "split.json")
    checkpoint = load_checkpoint(checkpoint_path(pipeline_run, arch), arch)
    model = model_from_checkpoint(checkpoint)
    rows = [int(np.flatnonzero(heatmaps["splits"] == "test")[0]), int(np.flatnonzero(heatmaps["splits"] == "train")[0])]
    transform = build_transforms(train=False, image_size=checkpoint["image_size"])
    images = torch.stack([transform(load_rgb(split.root / str(heatmaps["paths"][row]))) for row in rows])
    maps, logits = cams_and_logits(model, arch, images, target=str(heatmaps["target_class_rule"]))
    np.testing.assert_allclose(logits.numpy(), heatmaps["logits"][rows], atol=1e-4)
    for method in CAM_METHODS:
        stored = heatmaps[CAM_ARRAY_KEYS[method]][rows]
        assert stored.dtype == np.float32 and (stored >= 0).all()
        np.testing.assert_allclose(maps[method].numpy(), stored, rtol=1e-3, atol=1e-5, err_msg=method)
    assert not np.allclose(heatmaps["cams"], heatmaps["cams_layercam"])  # three maps, not one copied


def _without_variants(path: Path, target: Path) -> None:
    """A copy of a heatmap file as written before the variants: Grad-CAM's `cams` only, no `cam_methods`."""
    arrays = load_heatmaps(path)
    save_npz(target, **{key: value for key, value in arrays.items()
                        if key not in ("cam_methods", "cams_gradcampp", "cams_layercam")})


def test_heatmap_files_without_the_variants_still_load(pipeline_run, tmp_path):
    for arch in MODEL_ORDER:
        _without_variants(heatmap_path(pipeline_run, arch), heatmap_path(tmp_path, arch))
    loaded = load_aligned_heatmaps(tmp_path)
    for arch in MODEL_ORDER:
        assert stored_cam_methods(loaded[arch]) == ("gradcam",)
        np.testing.assert_array_equal(stored_cams(loaded[arch], "gradcam", "x"), loaded[arch]["cams"])
        with pytest.raises(PipelineError, match=r"holds no layercam maps .* --heatmaps-only --cam-methods"):
            stored_cams(loaded[arch], "layercam", heatmap_path(tmp_path, arch))


def test_cam_methods_option():
    assert parse_cam_methods("layercam") == ("gradcam", "layercam")  # Grad-CAM is the file's `cams`: always there
    assert parse_cam_methods("layercam,gradcam++,gradcam") == CAM_METHODS  # the table's order
    with pytest.raises(PipelineError, match="--cam-methods 'gradcam,scorecam': unknown CAM method"):
        parse_cam_methods("gradcam,scorecam")
    config = {"data_dir": "/data", "cam_methods": "gradcam"}
    assert "--cam-methods gradcam --heatmaps-only" in heatmaps_only_command("cancer_class_vgg_16.py", config, "run")
    default = {"data_dir": "/data", "cam_methods": ",".join(CAM_METHODS)}
    assert "--cam-methods" not in heatmaps_only_command("cancer_class_vgg_16.py", default, "run")


def test_model_script_refuses_an_unknown_cam_method(tmp_path):
    finished = run_script("cancer_class_resnet_50.py", "--data-dir", str(tmp_path), "--cam-methods", "scorecam")
    assert finished.returncode == 2 and "--cam-methods 'scorecam': unknown CAM method(s) scorecam" in finished.stderr


# ------------------------------------------------------------------------------- the MLP on another map type


def _mlp_test_probabilities(run: Path, classifier: dict, method: str) -> np.ndarray:
    """The saved MLP applied to the run's `method` maps of the test rows (the features it should have been fit on)."""
    heatmaps = load_aligned_heatmaps(run)
    maps = stack_maps({arch: stored_cams(heatmaps[arch], method, "x") for arch in MODEL_ORDER}, classifier["grid_size"])
    raw = build_features(maps, None)
    fit_rows = np.flatnonzero(heatmaps[MODEL_ORDER[0]]["splits"] == "train")
    np.testing.assert_allclose(classifier["feature_mean"].numpy(), Standardizer.fit(raw, fit_rows).mean,
                               rtol=1e-5, atol=1e-7)  # standardised on this method's maps
    mlp = build_mlp(classifier["in_features"], classifier["hidden_sizes"], classifier["dropout"])
    mlp.load_state_dict(classifier["model"])
    standardized = Standardizer(classifier["feature_mean"].numpy(), classifier["feature_std"].numpy())(raw)
    test_rows = np.flatnonzero(heatmaps[MODEL_ORDER[0]]["splits"] == "test")
    return softmax(mlp_logits(mlp, standardized, torch.device("cpu")))[:, 1][test_rows]


def test_further_trains_on_the_chosen_cam_method(run_copy):
    finished = run_script("cancer_class_further.py", "--output-dir", str(run_copy), "--cam-method", "layercam",
                          "--epochs", "2", "--device", "cpu")
    assert finished.returncode == 0, finished.stderr
    classifier = torch.load(run_copy / "final_classifier.pth", map_location="cpu", weights_only=True)
    assert classifier["cam_method"] == "layercam"
    assert json.loads((run_copy / "results.json").read_text())["cam_method"] == "layercam"
    saved = np.load(run_copy / "test_predictions.npz", allow_pickle=False)
    np.testing.assert_allclose(_mlp_test_probabilities(run_copy, classifier, "layercam"), saved["prob_mlp_heatmaps"],
                               rtol=0, atol=1e-5)


def test_further_refuses_a_cam_method_its_heatmap_files_lack(run_copy):
    path = heatmap_path(run_copy, "vgg16")
    target = path.with_name("old.npz")
    _without_variants(path, target)
    target.replace(path)  # renamed over the link: the session's run stays as it was
    finished = run_script("cancer_class_further.py", "--output-dir", str(run_copy), "--cam-method", "gradcam++",
                          "--device", "cpu")
    lines = finished.stderr.strip().splitlines()
    assert finished.returncode == 2 and len(lines) == 1, finished.stderr
    assert "heatmaps_vgg16.npz holds no gradcam++ maps" in lines[0] and "--cam-methods" in lines[0]


# ---------------------------------------------------------------------------------- the faithfulness command

TINY_FAITHFULNESS = ["--images", "2", "--perturbation-images", "1", "--samples", "8", "--steps", "4",
                     "--figures", "1", "--device", "cpu"]
CAM_ROWS = {"Grad-CAM", "Grad-CAM++", "LayerCAM"}
BASELINE_ROWS = {"random (baseline)", "centred Gaussian (baseline)"}


def test_faithfulness_command_scores_every_method_with_the_baselines(run_copy):
    finished = run_script("score_explanations.py", "--output-dir", str(run_copy), *TINY_FAITHFULNESS)
    assert finished.returncode == 0, finished.stderr
    for line in ("DenseNet-121 Grad-CAM: 2/2 (100 %)", "VGG-16 Kernel SHAP: 1/1 (100 %)",  # progress, per method
                 "three CNNs combined layercam: 2/2 (100 %)"):
        assert line in finished.stderr
    result = json.loads((run_copy / "faithfulness.json").read_text())
    assert len(result["images"]) == 2 and result["steps"] == 4
    split = load_split(run_copy / "split.json")
    test_paths = {record.path for record, name in zip(split.records, split.splits) if name == "test"}
    assert set(result["images"]) <= test_paths
    for arch in MODEL_ORDER:
        cams, perturbation = result["cnns"][arch]["cams"], result["cnns"][arch]["perturbation"]
        assert set(cams["methods"]) == CAM_ROWS | BASELINE_ROWS and cams["images"] == 2
        assert set(perturbation["methods"]) == {"LIME", "Kernel SHAP", "Occlusion"} | BASELINE_ROWS
        assert perturbation["images"] == 1
        for row in [*cams["methods"].values(), *perturbation["methods"].values()]:
            assert 0 <= row["deletion_auc"] <= 1 and 0 <= row["insertion_auc"] <= 1 and row["map_seconds_per_image"] > 0
    assert set(result["combined"]["methods"]) == {f"combined {method}" for method in CAM_METHODS} | BASELINE_ROWS
    shares = result["mlp_shares"]
    assert set(shares["average"]) == set(MODEL_ORDER) and sum(shares["average"].values()) == pytest.approx(1, abs=1e-6)
    assert len(shares["per_image"]["paths"]) == len(test_paths)
    assert result["figures"] and all((run_copy / name).stat().st_size > 0 for name in result["figures"])
    markdown = (run_copy / "faithfulness.md").read_text()
    assert "4 equal steps (5 points)" in markdown and "Gaussian blur" in markdown and "LayerCAM" in markdown

    index = build_report(run_copy)  # the report shows it: the tables, the figures, the MLP's shares
    page = index.read_text()
    assert '<section id="faithfulness">' in page and "What the final MLP looks at" in page and "Kernel SHAP" in page
    for name in result["figures"]:
        assert (index.parent / name).is_file() and f'src="{name}"' in page


def test_faithfulness_command_refuses_stale_heatmaps(run_copy, retrain):
    earlier = {name: (run_copy / name).read_bytes() for name in ("faithfulness.json", "faithfulness.md")}
    retrain(run_copy / "fine_tuned_resnet50.pth")
    finished = run_script("score_explanations.py", "--output-dir", str(run_copy), *TINY_FAITHFULNESS)
    lines = finished.stderr.strip().splitlines()
    assert finished.returncode == 2 and len(lines) == 1 and "heatmaps_resnet50.npz is stale" in lines[0]
    assert all((run_copy / name).read_bytes() == content for name, content in earlier.items())  # the run's, intact


def test_the_pipeline_scores_its_explanations_and_the_report_shows_them(pipeline_run):
    """run_pipeline.py's faithfulness stage (conftest.py: 2 images, no perturbation methods): the table of every CAM
    method of every CNN and of the combined map, shown in the run's report."""
    result = json.loads((pipeline_run / "faithfulness.json").read_text())
    assert len(result["images"]) == 2 and result["perturbation_images"] == 0 and result["figures"] == []
    for arch in MODEL_ORDER:
        assert set(result["cnns"][arch]["cams"]["methods"]) == CAM_ROWS | BASELINE_ROWS
    assert result["combined"] is not None
    page = (pipeline_run / "report" / "index.html").read_text()
    assert '<section id="faithfulness">' in page and "What the final MLP looks at" in page


# --------------------------------------------------------------------------------------- predict.py --explain


def test_predict_explain_writes_a_figure_of_every_method(pipeline_run, tmp_path):
    import predict

    split = load_split(pipeline_run / "split.json")
    image = split.root / split.records[split.indices("test")[0]].path
    predict.main([str(image), "--output-dir", str(pipeline_run), "--out", str(tmp_path / "out"), "--device", "cpu",
                  "--explain", "resnet50"])
    figure = tmp_path / "out" / f"{image.stem}_explain.png"
    with Image.open(figure) as picture:
        width, height = picture.size
    assert width > height > 0  # seven columns (image, three CAMs, LIME, SHAP, occlusion), four rows (+ combined)
    assert (tmp_path / "out" / f"{image.stem}_gradcam.png").is_file()


def test_explanation_figure_ends_with_each_cam_methods_combined_map(pipeline_run, tmp_path, monkeypatch):
    """The side-by-side figure's last row is the combined map of each CAM method, as the report's gallery draws it:
    the mean of the CNNs' display-scaled maps of that method (common.cams.display.combined_map)."""
    import common.explain.figures as explain

    captured = {}
    draw = explain.explanation_figure

    def capture(picture, maps, target, *, title, unit_maps=None):
        captured.update(picture=picture, maps=maps, unit_maps=unit_maps)
        return draw(picture, maps, target, title=title, unit_maps=unit_maps)

    monkeypatch.setattr(explain, "explanation_figure", capture)
    add_bar = explain.evidence_colour_bar
    captured["colour_bars"] = []
    monkeypatch.setattr(explain, "evidence_colour_bar",
                        lambda figure, axes: captured["colour_bars"].append(add_bar(figure, axes)))
    split = load_split(pipeline_run / "split.json")
    image = split.root / split.records[split.indices("test")[0]].path
    checkpoints = {arch: load_checkpoint(checkpoint_path(pipeline_run, arch), arch) for arch in MODEL_ORDER}
    models = {arch: CnnEnsemble(arch, (model_from_checkpoint(checkpoint).eval(),), checkpoint["image_size"],
                                torch.device("cpu"))
              for arch, checkpoint in checkpoints.items()}
    target = explain.explain_image(image, models, tmp_path / "figure.png", target_rule="predicted",
                                   perturbation_archs=())
    assert target.stat().st_size > 0
    combined = captured["unit_maps"][explain.COMBINED_ROW_LABEL]
    assert list(combined) == list(CAM_METHODS) and len(captured["maps"]) == len(MODEL_ORDER)
    for method in CAM_METHODS:
        expected = combined_map([row[method] for row in captured["maps"].values()], captured["picture"].size)
        np.testing.assert_array_equal(combined[method], expected)
        assert combined[method].shape == captured["picture"].size[::-1]
        assert 0 <= combined[method].min() and combined[method].max() <= 1
    # The picture keeps the image's aspect ratio (its longer side the largest input size), the figure has the
    # colour bar that says what the colours mean.
    source = Image.open(image)
    picture = captured["picture"]
    assert max(picture.size) == max(checkpoint["image_size"] for checkpoint in checkpoints.values())
    assert abs(picture.width / picture.height - source.width / source.height) < 0.05
    assert len(captured["colour_bars"]) == 1  # one bar for the whole figure
