"""Which maps make the best final classifier (common/evaluation/map_comparison.py, common/stages/single_split.py's
train_cam_method_mlps): the comparison's numbers are the bootstrap's on the probabilities it is given, an undefined
metric stays JSON-safe, and each map type's MLP reads that map type and nothing else."""

import json

import numpy as np
import pytest
import torch

import cancer_class_further
from cancer_class_further import final_stage_options
from common.cams.heatmap_file import CAM_ARRAY_KEYS
from common.cams.methods import CAM_METHODS
from common.evaluation.map_comparison import compare_cam_methods, comparison_markdown
from common.evaluation.metrics import roc_auc
from common.evaluation.stats import PatientBootstrap
from common.models.registry import MODEL_ORDER
from common.stages.single_split import train_cam_method_mlps


def patients_and_labels(n_patients: int = 12, images: int = 5):
    patients = np.repeat([f"p{index:02d}" for index in range(n_patients)], images)
    labels = np.repeat(np.arange(n_patients) % 2, images).astype(np.int64)
    return patients, labels


def test_each_row_is_the_bootstrap_of_its_probabilities_and_differences_are_paired():
    patients, labels = patients_and_labels()
    rng = np.random.default_rng(0)
    probabilities = {"gradcam": rng.uniform(size=len(labels)),  # chance
                     "gradcam++": np.where(labels == 1, 0.9, 0.1) + rng.normal(0, 0.01, len(labels)),  # perfect
                     "layercam": rng.uniform(size=len(labels))}
    bootstrap = PatientBootstrap.draw(labels=labels, patients=patients, resamples=500, seed=3)
    comparison = compare_cam_methods(probabilities, labels=labels, patients=patients, protocol="test protocol.",
                                     final_method="gradcam", bootstrap=bootstrap)
    assert comparison["methods"] == list(CAM_METHODS) and comparison["missing"] == []
    assert comparison["images"] == len(labels) and comparison["patients"] == 12
    for method, values in probabilities.items():
        intervals = bootstrap.intervals(values)
        for level in ("image", "patient"):
            for metric in ("roc_auc", "balanced_accuracy"):
                entry = comparison["rows"][method][level][metric]
                assert entry["estimate"] == pytest.approx(intervals[level][metric].estimate)
                assert entry["ci95"] == pytest.approx([intervals[level][metric].low, intervals[level][metric].high])
    assert comparison["rows"]["gradcam++"]["image"]["roc_auc"]["estimate"] == 1.0
    assert comparison["rows"]["gradcam"]["image"]["roc_auc"]["estimate"] == pytest.approx(
        roc_auc(labels, probabilities["gradcam"]))
    # Every other map type minus Grad-CAM, on the same resampled patients.
    assert {(d["a"], d["b"], d["level"], d["metric"]) for d in comparison["differences"]} == {
        (method, "gradcam", level, metric) for method in ("gradcam++", "layercam") for level in ("image", "patient")
        for metric in ("roc_auc", "balanced_accuracy")}
    difference = next(d for d in comparison["differences"]
                      if d["a"] == "gradcam++" and d["level"] == "image" and d["metric"] == "roc_auc")
    expected = bootstrap.difference(probabilities["gradcam++"], probabilities["gradcam"])["image"]["roc_auc"]
    assert difference["estimate"] == pytest.approx(expected.estimate)
    assert difference["ci95"] == pytest.approx([expected.low, expected.high]) and difference["ci95"][0] > 0
    assert "interval excludes zero" in difference["sentence"] and "Grad-CAM++ MLP" in difference["sentence"]
    assert "no correction for the 8 made here" in comparison_markdown(comparison)


def test_identical_probabilities_differ_by_exactly_zero():
    patients, labels = patients_and_labels()
    same = np.random.default_rng(1).uniform(size=len(labels))
    comparison = compare_cam_methods({"gradcam": same, "layercam": same.copy()}, labels=labels, patients=patients,
                                     protocol="p.", final_method="gradcam", resamples=200)
    for difference in comparison["differences"]:
        assert difference["estimate"] == 0 and difference["ci95"] == [0, 0]
        assert "no difference is shown" in difference["sentence"]


def test_undefined_metrics_are_null_so_the_json_stays_standard():
    """A test split of one class: AUC and balanced accuracy are undefined; NaN is not JSON, null is."""
    patients = np.repeat(["a", "b", "c"], 4)
    labels = np.ones(12, dtype=np.int64)
    comparison = compare_cam_methods({"gradcam": np.linspace(0, 1, 12), "gradcam++": np.linspace(1, 0, 12)},
                                     labels=labels, patients=patients, protocol="p.", final_method="gradcam",
                                     resamples=50)
    json.dumps(comparison, allow_nan=False)
    assert comparison["rows"]["gradcam"]["image"]["roc_auc"] == {
        "estimate": None, "ci95": [None, None],
        "ci95_note": "too few patients for an interval (0 benign, 3 malignant patients; an interval needs at least 5 "
                     "of each)"}
    assert "| Grad-CAM (final_classifier.pth) | n/a |" in comparison_markdown(comparison)


def test_markdown_names_every_map_type_the_final_one_and_what_is_missing():
    patients, labels = patients_and_labels()
    probabilities = {"gradcam": np.linspace(0, 1, len(labels)), "gradcam++": np.linspace(0, 1, len(labels))[::-1]}
    comparison = compare_cam_methods(probabilities, labels=labels, patients=patients, protocol="The protocol.",
                                     final_method="gradcam++", resamples=100, missing=("layercam",))
    markdown = comparison_markdown(comparison)
    assert "The protocol." in markdown and "60 images of 12 patients" in markdown
    assert "| Grad-CAM |" in markdown and "| Grad-CAM++ (final_classifier.pth) |" in markdown
    assert "Not compared: LayerCAM" in markdown
    assert "--heatmaps-only --cam-methods gradcam,gradcam++,layercam" in markdown


# ----------------------------------------------------------------------------- each MLP reads its own map type


def signal_in_one_map_type(signal_method: str, n: int = 240, side: int = 8) -> tuple[dict, np.ndarray]:
    """Loaded-heatmap-file dicts of the three models: `signal_method`'s maps are hot in the centre for malignant
    images and in a corner for benign ones; every other map type is noise. Splits 60/20/20 %, 2 images per patient."""
    rng = np.random.default_rng(7)
    labels = np.repeat(rng.integers(0, 2, n // 2), 2).astype(np.int64)
    splits = np.array(["train"] * int(n * 0.6) + ["val"] * int(n * 0.2) + ["test"] * (n - int(n * 0.8)))
    heatmaps = {}
    for arch in MODEL_ORDER:
        arrays = {CAM_ARRAY_KEYS[method]: rng.uniform(0, 1, (n, side, side)).astype(np.float32)
                  for method in CAM_METHODS}
        hot = arrays[CAM_ARRAY_KEYS[signal_method]]
        hot[labels == 1, 3:5, 3:5] += 1.0
        hot[labels == 0, :2, :2] += 1.0
        heatmaps[arch] = {**arrays, "cam_methods": np.array(CAM_METHODS), "labels": labels, "splits": splits,
                          "patients": np.array([f"p{row // 2}" for row in range(n)])}
    return heatmaps, splits


@pytest.mark.parametrize("signal_method", ["gradcam++", "layercam"])
def test_each_map_types_mlp_learns_from_that_map_type_only(signal_method, one_thread):
    heatmaps, splits = signal_in_one_map_type(signal_method)
    args = cancer_class_further.parse_args(["--grid-size", "8", "--epochs", "15", "--hidden-sizes", "32",
                                            "--device", "cpu"])
    rows = {"fit": np.flatnonzero(splits == "train"), "select": np.flatnonzero(splits == "val")}
    inputs = {arch: {"heatmaps": f"heatmaps_{arch}.npz"} for arch in MODEL_ORDER}
    given = np.full(len(splits), 0.5)  # --cam-method's own MLP is trained by train_mlps; it is reused as given
    probabilities, missing = train_cam_method_mlps(final_stage_options(args), heatmaps, inputs, rows,
                                                   torch.device("cpu"), given)
    assert missing == () and list(probabilities) == ["gradcam", *(m for m in CAM_METHODS if m != "gradcam")]
    assert probabilities["gradcam"] is given
    test = splits == "test"
    labels = heatmaps[MODEL_ORDER[0]]["labels"]
    for method in ("gradcam++", "layercam"):
        auc = roc_auc(labels[test], probabilities[method][test])
        assert auc >= 0.95 if method == signal_method else auc <= 0.8, (method, auc)


def test_a_map_type_missing_from_one_file_is_named_not_compared(one_thread):
    heatmaps, splits = signal_in_one_map_type("gradcam++", n=40)
    heatmaps["resnet50"]["cam_methods"] = np.array(["gradcam", "gradcam++"])  # an export without LayerCAM
    del heatmaps["resnet50"]["cams_layercam"]
    args = cancer_class_further.parse_args(["--grid-size", "4", "--epochs", "1", "--device", "cpu"])
    rows = {"fit": np.flatnonzero(splits == "train"), "select": np.flatnonzero(splits == "val")}
    inputs = {arch: {"heatmaps": f"heatmaps_{arch}.npz"} for arch in MODEL_ORDER}
    probabilities, missing = train_cam_method_mlps(final_stage_options(args), heatmaps, inputs, rows,
                                                   torch.device("cpu"), np.zeros(40))
    assert missing == ("layercam",) and list(probabilities) == ["gradcam", "gradcam++"]


def test_a_set_of_too_few_patients_gets_no_interval_and_no_claim():
    """One patient per class (and four): the patient bootstrap can only redraw those patients, so its interval
    would be zero-wide. No interval, the note instead, in the JSON, the table and the sentence, which claims
    nothing, however large the difference. From 5 patients per class on, intervals and claims are back."""
    for per_class in (1, 4):
        patients = np.repeat([f"p{index}" for index in range(2 * per_class)], 6)
        labels = np.repeat([0] * per_class + [1] * per_class, 6)
        good = labels * 0.8 + 0.1  # perfect ranking
        poor = np.linspace(0, 1, len(labels))
        comparison = compare_cam_methods({"gradcam": poor, "gradcam++": good}, labels=labels, patients=patients,
                                         protocol="p.", final_method="gradcam", resamples=200)
        json.dumps(comparison, allow_nan=False)
        note = (f"too few patients for an interval ({per_class} benign, {per_class} malignant patients; an "
                "interval needs at least 5 of each)")
        entry = comparison["rows"]["gradcam++"]["image"]["roc_auc"]
        assert entry == {"estimate": 1.0, "ci95": [None, None], "ci95_note": note}
        difference = next(d for d in comparison["differences"] if d["level"] == "image" and d["metric"] == "roc_auc")
        assert difference["ci95"] == [None, None] and difference["ci95_note"] == note
        assert difference["sentence"].endswith(f"but with {note}, no difference is claimed.")
        assert "interval excludes zero" not in difference["sentence"] and "CI" not in difference["sentence"]
        assert "| Grad-CAM++ | 1.000 (too few patients for an interval) |" in comparison_markdown(comparison)
    patients = np.repeat([f"p{index}" for index in range(10)], 6)
    labels = np.repeat([0] * 5 + [1] * 5, 6)
    comparison = compare_cam_methods({"gradcam": np.linspace(0, 1, 60), "gradcam++": labels * 0.8 + 0.1},
                                     labels=labels, patients=patients, protocol="p.", final_method="gradcam",
                                     resamples=200)
    entry = comparison["rows"]["gradcam++"]["image"]["roc_auc"]
    assert "ci95_note" not in entry and entry["ci95"] == [1.0, 1.0]
