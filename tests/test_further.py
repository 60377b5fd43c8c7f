"""cancer_class_further.py on a single-split run, common/fusion and the run model's checks (common/run.py):
alignment of the three heatmap files and its errors, the MLP
(learns a separable heatmap pattern, not shuffled labels, never sees test labels), feature statistics fitted on
the fit rows only, fit/selection rows, map stacking; end to end on a real run of the four scripts on the demo
tree: the saved classifier reproduces its test predictions and the table's numbers are the saved logits'.

The run dir (run_pipeline.py: three model scripts, further and the report; --weights none, 32 px, 1 epoch) is
the session fixture `pipeline_run` of conftest.py, shared with tests/test_predict.py; on 2 CPU cores it takes
about two minutes, mostly VGG-16.
"""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import cancer_class_further
from common.cams.heatmap_file import HEATMAP_FORMAT_VERSION, HEATMAP_KEYS, load_heatmaps
from common.cams.methods import CAM_METHODS
from common.core.errors import PipelineError
from common.core.fileio import save_npz, sha256_of_file
from common.core.runfiles import checkpoint_path, heatmap_path, probability_key, scaled_probability_key
from common.data.partition import load_split
from common.evaluation.calibration import apply_temperature, calibration_metrics, fit_temperature
from common.evaluation.map_comparison import cam_probability_key, compare_cam_methods, comparison_markdown
from common.evaluation.metrics import binary_metrics, metrics_table, softmax
from common.evaluation.stats import diagnose_patients
from common.fusion.features import Standardizer, build_features, stack_maps
from common.fusion.mlp import build_mlp, mlp_logits, train_mlp
from common.models.registry import ARCHS, MODEL_ORDER
from common.run import check_aligned, open_run
from common.stages import single_split
from common.training.config import parse_config, split_protocol

ROOT = Path(__file__).resolve().parents[1]
MODEL_SCRIPTS = {"densenet121": "cancer_class_densenet_121.py", "resnet50": "cancer_class_resnet_50.py",
                 "vgg16": "cancer_class_vgg_16.py"}
CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------------- the run dir


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def run_dir(pipeline_run) -> Path:
    return pipeline_run


def load_aligned_heatmaps(folder: Path) -> dict[str, dict]:
    """The folder's three heatmap files, each read and then checked together (common.run.check_aligned)."""
    files = {arch: heatmap_path(folder, arch) for arch in MODEL_ORDER}
    heatmaps = {arch: load_heatmaps(path) for arch, path in files.items()}
    check_aligned(heatmaps, files)
    return heatmaps


# --------------------------------------------------------------------------------- synthetic heatmap files


def synthetic_rows(n: int = 12) -> dict[str, np.ndarray]:
    patients = np.array([f"14-{1000 + row // 2}" for row in range(n)])  # two images per patient
    return {"labels": (np.arange(n) // 2 % 2).astype(np.int64),
            "paths": np.array([f"img_{row:03d}.png" for row in range(n)]), "patients": patients,
            "magnifications": np.array(["100", "400"] * (n // 2)),
            "splits": np.array((["train"] * 2 + ["val"] * 2 + ["test"] * 2) * (n // 6))}


def write_heatmap_file(path: Path, arch: str, rows: dict[str, np.ndarray], *, drop: tuple[str, ...] = (),
                       **overrides) -> None:
    """A heatmap file with every key of HEATMAP_KEYS (minus `drop`), rows as given, values overridable."""
    side = 14 if arch == "vgg16" else 7
    rng = np.random.default_rng(len(arch))
    n = len(rows["paths"])
    arrays = {"cams": np.maximum(rng.normal(size=(n, side, side)), 0).astype(np.float32),
              "logits": rng.normal(size=(n, 2)).astype(np.float32), **rows,
              "arch": np.array(arch), "target_layer": np.array("layer"), "target_class_rule": np.array("predicted"),
              "split_digest": np.array("digest-of-the-split"), "image_size": np.array(224),
              "format_version": np.array(HEATMAP_FORMAT_VERSION), "checkpoint_sha256": np.array("0" * 64)}
    arrays.update(overrides)
    assert set(HEATMAP_KEYS) <= set(arrays)
    save_npz(path, **{key: value for key, value in arrays.items() if key not in drop})


@pytest.fixture
def heatmap_dir(tmp_path) -> Path:
    for arch in MODEL_ORDER:
        write_heatmap_file(heatmap_path(tmp_path, arch), arch, synthetic_rows())
    return tmp_path


def test_aligned_files_load(heatmap_dir):
    loaded = load_aligned_heatmaps(heatmap_dir)
    assert list(loaded) == list(MODEL_ORDER)
    assert loaded["vgg16"]["cams"].shape == (12, 14, 14) and loaded["resnet50"]["cams"].shape == (12, 7, 7)


def permuted(rows: dict, order: np.ndarray) -> dict:
    return {key: value[order] for key, value in rows.items()}


@pytest.mark.parametrize("arch", ["resnet50", "vgg16"])
@pytest.mark.parametrize("case, key", [("reordered", "paths"), ("relabelled", "labels"),
                                       ("other split", "splits"), ("other patient", "patients")])
def test_alignment_names_the_differing_key_and_file(heatmap_dir, arch, case, key):
    rows = synthetic_rows()
    if case == "reordered":  # whole rows swapped: every array stays consistent, only the order differs
        rows = permuted(rows, np.r_[1, 0, np.arange(2, 12)])
    elif case == "relabelled":
        rows["labels"][5] = 1 - rows["labels"][5]
    elif case == "other split":
        rows["splits"][0] = "val"
    else:
        rows["patients"][3] = "14-9999"
    write_heatmap_file(heatmap_path(heatmap_dir, arch), arch, rows)
    with pytest.raises(PipelineError) as error:
        load_aligned_heatmaps(heatmap_dir)
    message = str(error.value)
    assert f"'{key}'" in message and f"heatmaps_{arch}.npz" in message


def test_alignment_catches_a_different_split_digest(heatmap_dir):
    write_heatmap_file(heatmap_path(heatmap_dir, "vgg16"), "vgg16", synthetic_rows(),
                       split_digest=np.array("digest-of-another-split"))
    with pytest.raises(PipelineError, match=r"heatmaps_vgg16\.npz.*'split_digest'"):
        load_aligned_heatmaps(heatmap_dir)


def test_alignment_catches_maps_made_by_another_target_class_rule(heatmap_dir):
    write_heatmap_file(heatmap_path(heatmap_dir, "resnet50"), "resnet50", synthetic_rows(),
                       target_class_rule=np.array("malignant"))
    with pytest.raises(PipelineError, match=r"heatmaps_resnet50\.npz.*'target_class_rule'"):
        load_aligned_heatmaps(heatmap_dir)


def test_alignment_catches_a_missing_row(heatmap_dir):
    write_heatmap_file(heatmap_path(heatmap_dir, "resnet50"), "resnet50", permuted(synthetic_rows(), np.arange(11)))
    with pytest.raises(PipelineError, match=r"heatmaps_resnet50\.npz has 11 rows.*heatmaps_densenet121\.npz has 12"):
        load_aligned_heatmaps(heatmap_dir)


def test_alignment_catches_a_file_of_another_model(heatmap_dir):
    write_heatmap_file(heatmap_path(heatmap_dir, "resnet50"), "vgg16", synthetic_rows())
    with pytest.raises(PipelineError, match=r"heatmaps_resnet50\.npz holds heatmaps of vgg16"):
        load_aligned_heatmaps(heatmap_dir)


@pytest.mark.parametrize("arch", MODEL_ORDER)
def test_missing_heatmap_file_names_it_and_the_command_that_makes_it(run_copy, arch):
    heatmap_path(run_copy, arch).unlink()
    with pytest.raises(PipelineError) as error:
        open_run(run_copy).fold_heatmaps()
    split = load_split(run_copy / "split.json")
    prefix = f"{heatmap_path(run_copy, arch)} is missing: run "
    assert str(error.value).startswith(prefix)
    words = shlex.split(str(error.value)[len(prefix):])
    assert words[:6] == ["python", MODEL_SCRIPTS[arch], "--data-dir", str(split.root), "--output-dir", str(run_copy)]
    # The command repeats the options that define the split, so it runs on the very split of the run.
    config = parse_config(arch=arch, description="", argv=words[2:])
    # split.json adds what the partition found (how patients were grouped) to the requested options.
    assert split_protocol(config).items() <= split.protocol.items()
    assert ARCHS[arch].script == MODEL_SCRIPTS[arch]


@pytest.mark.parametrize("change", [{"drop": ("target_class_rule",)}, {"drop": ("format_version",)},
                                    {"format_version": np.array(0)}, {"drop": ("checkpoint_sha256",)}])
def test_heatmap_file_of_an_older_format_is_refused(heatmap_dir, change):
    write_heatmap_file(heatmap_path(heatmap_dir, "resnet50"), "resnet50", synthetic_rows(), **change)
    with pytest.raises(PipelineError, match=r"heatmaps_resnet50\.npz is from an older format"):
        load_aligned_heatmaps(heatmap_dir)
    with pytest.raises(PipelineError, match="older format"):
        load_heatmaps(heatmap_path(heatmap_dir, "resnet50"))


def test_unreadable_heatmap_file_is_named(heatmap_dir):
    heatmap_path(heatmap_dir, "vgg16").write_bytes(b"not a zip file")
    with pytest.raises(PipelineError, match=r"heatmaps_vgg16\.npz is unreadable"):
        load_aligned_heatmaps(heatmap_dir)


def test_output_dir_without_split_file(heatmap_dir):
    with pytest.raises(PipelineError, match=r"holds no run \(neither split\.json nor folds\.json\)"):
        cancer_class_further.main(["--output-dir", str(heatmap_dir), "--device", "cpu"])


def test_script_reports_a_missing_split_file_in_one_line(tmp_path):
    finished = run_script("cancer_class_further.py", "--output-dir", str(tmp_path), "--device", "cpu")
    assert finished.returncode == 2
    assert finished.stderr.strip().startswith("error:") and "split.json" in finished.stderr
    assert "python run_pipeline.py --data-dir DATA --output-dir" in finished.stderr
    assert "Traceback" not in finished.stderr and len(finished.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------- features and statistics


def test_stack_maps_resizes_to_one_grid():
    rng = np.random.default_rng(0)
    cams = {"densenet121": rng.uniform(size=(5, 7, 7)).astype(np.float32),
            "resnet50": np.full((5, 7, 7), 2.5, np.float32),  # a constant map stays constant
            "vgg16": rng.uniform(size=(5, 14, 14)).astype(np.float32)}
    for grid_size in (14, 10, 3):
        maps = stack_maps(cams, grid_size)
        assert maps.shape == (5, 3, grid_size, grid_size) and maps.dtype == np.float32
        np.testing.assert_allclose(maps[:, 1], 2.5, rtol=0, atol=1e-6)
    maps = stack_maps(cams, 14)
    np.testing.assert_allclose(maps[:, 2], cams["vgg16"], atol=1e-6)  # same size: unchanged
    np.testing.assert_allclose(stack_maps(cams, 7)[:, 0], cams["densenet121"], atol=1e-6)
    assert maps[:, 0].min() >= cams["densenet121"].min() - 1e-6  # bilinear: no overshoot
    assert maps[:, 0].max() <= cams["densenet121"].max() + 1e-6


def test_build_features_shapes():
    maps = np.zeros((4, 3, 5, 5), np.float32)
    logits = {arch: np.full((4, 2), index, np.float32) for index, arch in enumerate(MODEL_ORDER)}
    assert build_features(maps, None).shape == (4, 75)
    with_logits = build_features(maps, logits)
    assert with_logits.shape == (4, 81) and with_logits.dtype == np.float32
    np.testing.assert_array_equal(with_logits[0, 75:], [0, 0, 1, 1, 2, 2])


def test_standardizer_uses_the_fit_rows_only():
    rng = np.random.default_rng(1)
    features = rng.normal(3.0, 2.0, size=(50, 6)).astype(np.float32)
    features[:, 5] = 7.0  # constant column: scale 1, no division by zero
    fit_rows = np.arange(0, 30)
    standardizer = Standardizer.fit(features, fit_rows)
    np.testing.assert_allclose(standardizer.mean, features[fit_rows].mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(standardizer.std[:5], features[fit_rows, :5].std(axis=0), rtol=1e-6)
    assert standardizer.std[5] == 1 and np.isfinite(standardizer(features)).all()
    noisy = features.copy()
    noisy[:, 5] += 1e-5  # float32 noise of the size batch composition gives a heatmap cell
    assert np.abs(standardizer(noisy)[:, 5] - standardizer(features)[:, 5]).max() < 1e-4  # noise stays noise
    changed = features.copy()
    changed[30:] = rng.normal(100.0, 50.0, size=(20, 6))  # the held-out and test rows
    again = Standardizer.fit(changed, fit_rows)
    np.testing.assert_array_equal(again.mean, standardizer.mean)
    np.testing.assert_array_equal(again.std, standardizer.std)
    scaled = standardizer(features)[fit_rows]
    np.testing.assert_allclose(scaled[:, :5].mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(scaled[:, :5].std(axis=0), 1, atol=1e-4)


def patient_table(n_patients_per_split: dict[str, int], images: int = 3):
    """Rows of patients, each patient in one split and of one class, alternating classes."""
    splits, labels, patients = [], [], []
    for name, count in n_patients_per_split.items():
        for patient in range(count):
            splits += [name] * images
            labels += [patient % 2] * images
            patients += [f"{name}-{patient}"] * images
    return np.array(splits), np.array(labels), np.array(patients)


@pytest.mark.parametrize("fit_split", ["train", "val"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_and_selection_rows_never_touch_test(fit_split, seed):
    splits, labels, patients = patient_table({"train": 10, "val": 8, "test": 6})
    fit_rows, select_rows = single_split.fit_and_selection_rows(splits, labels, patients, fit_split, seed)
    assert len(fit_rows) and len(select_rows)
    assert not set(fit_rows) & set(select_rows)
    assert (splits[fit_rows] != "test").all() and (splits[select_rows] != "test").all()
    assert (splits[fit_rows] == fit_split).all()
    if fit_split == "train":
        assert set(select_rows) == set(np.flatnonzero(splits == "val"))
        assert set(fit_rows) == set(np.flatnonzero(splits == "train"))
    else:
        assert (splits[select_rows] == "val").all()
        assert set(fit_rows) | set(select_rows) == set(np.flatnonzero(splits == "val"))
        assert not set(patients[fit_rows]) & set(patients[select_rows])  # patient-disjoint
        assert set(labels[select_rows]) == {0, 1}  # both classes to pick the epoch on


def test_fit_split_val_needs_enough_val_patients():
    splits, labels, patients = patient_table({"train": 10, "val": 2, "test": 4})
    with pytest.raises(PipelineError, match="--fit-split val needs"):
        single_split.fit_and_selection_rows(splits, labels, patients, "val", 0)


# ------------------------------------------------------------------------------------------------ the MLP


def hot_spot_maps(labels: np.ndarray, rng: np.random.Generator, side: int = 8) -> np.ndarray:
    """(N, 3, side, side): malignant maps hot in the centre, benign in the top-left corner, plus noise."""
    maps = rng.uniform(0, 1.0, size=(len(labels), 3, side, side)).astype(np.float32)
    centre = slice(side // 2 - 1, side // 2 + 1)
    for row, label in enumerate(labels):
        if label:
            maps[row, :, centre, centre] += 1.0
        else:
            maps[row, :, :2, :2] += 1.0
    return maps


MLP_OPTIONS = dict(hidden_sizes=[64, 16], dropout=0.2, epochs=25, batch_size=32, lr=3e-3, weight_decay=1e-4,
                   optimizer="adamw", seed=0, device=CPU, desc="test MLP")


def heldout_accuracy(labels: np.ndarray, features: np.ndarray, fit_rows, select_rows, test_rows) -> float:
    patients = np.array([f"p{row // 4}" for row in range(len(labels))])
    features = Standardizer.fit(features, fit_rows)(features)
    model, history = train_mlp(features, labels, patients, fit_rows, select_rows, **MLP_OPTIONS)
    assert len(history) == MLP_OPTIONS["epochs"] and any(row.get("best_so_far") for row in history)
    predictions = mlp_logits(model, features[test_rows], CPU).argmax(axis=1)
    return float((predictions == labels[test_rows]).mean())


def test_mlp_learns_a_separable_heatmap_pattern(one_thread):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 240)
    features = build_features(hot_spot_maps(labels, rng), None)
    rows = np.arange(240)
    assert heldout_accuracy(labels, features, rows[:140], rows[140:180], rows[180:]) >= 0.9


def test_mlp_does_not_beat_chance_on_shuffled_labels(one_thread):
    """Labels independent of the maps: held-out accuracy stays in the chance band (no path to held-out labels)."""
    rng = np.random.default_rng(1)
    true_labels = rng.integers(0, 2, 600)
    features = build_features(hot_spot_maps(true_labels, rng), None)
    shuffled = rng.permutation(true_labels)
    rows = np.arange(600)
    accuracy = heldout_accuracy(shuffled, features, rows[:300], rows[300:400], rows[400:])
    assert 0.3 <= accuracy <= 0.62  # 200 test rows: chance is 0.5 +- 0.035


def test_mlp_training_never_reads_other_rows_labels(one_thread):
    """Flipping the labels of rows outside fit and selection rows leaves the trained weights bit-identical."""
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 90)
    raw = build_features(hot_spot_maps(labels, rng, side=4), None)
    features = Standardizer.fit(raw, np.arange(50))(raw)
    patients = np.array([f"p{row // 3}" for row in range(90)])
    options = {**MLP_OPTIONS, "epochs": 4}
    fit_rows, select_rows = np.arange(50), np.arange(50, 70)
    flipped = labels.copy()
    flipped[70:] = 1 - flipped[70:]
    first, _ = train_mlp(features, labels, patients, fit_rows, select_rows, **options)
    second, _ = train_mlp(features, flipped, patients, fit_rows, select_rows, **options)
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key


# ------------------------------------------------------------------------------------------ end to end


DOCUMENTED_FILES = ["split.json", "final_classifier.pth", "final_classifier_heatmaps_logits.pth", "results.json",
                    "results.md", "test_predictions.npz", "report/index.html"] + [
    name.format(arch) for arch in MODEL_ORDER for name in ("fine_tuned_{}.pth", "heatmaps_{}.npz",
                                                           "metrics_{}.json", "train_log_{}.jsonl")]


def test_every_documented_output_file_exists(run_dir):
    missing = [name for name in DOCUMENTED_FILES if not (run_dir / name).is_file()]
    assert not missing
    for arch in MODEL_ORDER:
        assert list((run_dir / "overlays" / arch).glob("*.png")), arch  # --overlays 1


@pytest.fixture(scope="module")
def aligned(run_dir) -> dict:
    heatmaps = load_aligned_heatmaps(run_dir)
    reference = heatmaps[MODEL_ORDER[0]]
    return {"heatmaps": heatmaps, "labels": reference["labels"], "patients": reference["patients"],
            "magnifications": reference["magnifications"], "splits": reference["splits"],
            "paths": reference["paths"], "test_rows": np.flatnonzero(reference["splits"] == "test")}


@pytest.mark.parametrize("name, features, prediction_key", [
    ("final_classifier.pth", "heatmaps", "prob_mlp_heatmaps"),
    ("final_classifier_heatmaps_logits.pth", "heatmaps+logits", "prob_mlp_heatmaps_logits")])
def test_final_classifier_reproduces_its_test_predictions(run_dir, aligned, name, features, prediction_key):
    classifier = torch.load(run_dir / name, map_location="cpu", weights_only=True)
    assert classifier["features"] == features and classifier["fit_rows"] == "the train split"
    assert classifier["format_version"] == 3 and classifier["run_kind"] == "single"
    assert classifier["partition_digest"] == load_split(run_dir / "split.json").digest
    grid_size = classifier["grid_size"]
    assert classifier["input_shape"] == [3, grid_size, grid_size] and classifier["model_order"] == list(MODEL_ORDER)
    for arch in MODEL_ORDER:  # it names the files it was made from, with their hashes (one fold: one each)
        assert classifier["heatmaps_sha256"][arch] == [sha256_of_file(heatmap_path(run_dir, arch))]
        assert classifier["checkpoint_sha256"][arch] == [sha256_of_file(checkpoint_path(run_dir, arch))]

    heatmaps = aligned["heatmaps"]
    maps = stack_maps({arch: heatmaps[arch]["cams"] for arch in MODEL_ORDER}, grid_size)
    logits = {arch: heatmaps[arch]["logits"] for arch in MODEL_ORDER} if features == "heatmaps+logits" else None
    raw = build_features(maps, logits)
    assert raw.shape[1] == classifier["in_features"]
    # Normalisation statistics are those of the fit split's rows alone.
    fit_rows = np.flatnonzero(aligned["splits"] == "train")
    expected = Standardizer.fit(raw, fit_rows)
    np.testing.assert_allclose(classifier["feature_mean"].numpy(), expected.mean, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(classifier["feature_std"].numpy(), expected.std, rtol=1e-5, atol=1e-7)

    mlp = build_mlp(classifier["in_features"], classifier["hidden_sizes"], classifier["dropout"])
    mlp.load_state_dict(classifier["model"])
    mlp.eval()
    standardized = (raw - classifier["feature_mean"].numpy()) / classifier["feature_std"].numpy()
    with torch.no_grad():
        probabilities = softmax(mlp(torch.from_numpy(standardized.astype(np.float32))).numpy())[:, 1]
    saved = np.load(run_dir / "test_predictions.npz", allow_pickle=False)
    test_rows = aligned["test_rows"]
    np.testing.assert_array_equal(saved["paths"], aligned["paths"][test_rows])
    np.testing.assert_array_equal(saved["labels"], aligned["labels"][test_rows])
    np.testing.assert_allclose(saved[prediction_key], probabilities[test_rows], rtol=0, atol=1e-5)


def assert_same_numbers(saved, expected, where: str = "") -> None:
    """JSON-read metrics vs freshly computed ones: same keys, numbers equal to float precision."""
    if isinstance(expected, dict):
        assert set(saved) == set(map(str, expected)), where
        for key, value in expected.items():
            assert_same_numbers(saved[str(key)], value, f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(saved) == len(expected), where
        for index, (ours, theirs) in enumerate(zip(saved, expected)):
            assert_same_numbers(ours, theirs, f"{where}[{index}]")
    elif expected is None or isinstance(expected, (str, bool)):
        assert saved == expected, where
    else:
        assert saved == pytest.approx(expected, rel=1e-9, abs=1e-12), where


def test_results_table_equals_metrics_of_the_saved_logits(run_dir, aligned):
    results = json.loads((run_dir / "results.json").read_text())
    test_rows = aligned["test_rows"]
    probabilities = {arch: softmax(aligned["heatmaps"][arch]["logits"][test_rows])[:, 1] for arch in MODEL_ORDER}
    probabilities["soft_vote"] = np.mean([probabilities[arch] for arch in MODEL_ORDER], axis=0)
    saved = np.load(run_dir / "test_predictions.npz", allow_pickle=False)
    probabilities["mlp_heatmaps"] = saved["prob_mlp_heatmaps"]  # reproduced from the classifier above
    probabilities["mlp_heatmaps+logits"] = saved["prob_mlp_heatmaps_logits"]
    for key in ("densenet121", "resnet50", "vgg16", "soft_vote"):  # the saved file agrees with the logits too
        np.testing.assert_allclose(saved[f"prob_{key}"], probabilities[key], atol=1e-6)
    assert set(results["rows"]) == set(probabilities)
    labels, patients = aligned["labels"][test_rows], aligned["patients"][test_rows]
    for key, probability in probabilities.items():
        expected = binary_metrics(labels, probability, patients, aligned["magnifications"][test_rows])
        assert_same_numbers(results["rows"][key], expected, key)
    assert results["test_images"] == len(test_rows)
    assert results["test_patients"] == sorted(set(patients))
    assert not set(patients) & set(aligned["patients"][aligned["splits"] != "test"])  # patient-level split

    table = metrics_table({results["display_names"][key]: row for key, row in results["rows"].items()})
    assert table in (run_dir / "results.md").read_text()
    for name in results["display_names"].values():
        assert f"| {name} |" in table


def test_model_scripts_metrics_match_their_heatmap_files(run_dir, aligned):
    for arch in MODEL_ORDER:
        metrics = json.loads((run_dir / f"metrics_{arch}.json").read_text())
        rows = aligned["test_rows"]
        expected = binary_metrics(aligned["labels"][rows], softmax(aligned["heatmaps"][arch]["logits"][rows])[:, 1],
                                  aligned["patients"][rows], aligned["magnifications"][rows])
        assert_same_numbers(metrics["test"], expected, arch)


def test_heatmap_files_follow_the_split_file(run_dir, aligned):
    split = load_split(run_dir / "split.json")
    assert list(aligned["paths"]) == [record.path for record in split.records]
    assert list(aligned["splits"]) == split.splits
    for arch in MODEL_ORDER:
        cams = aligned["heatmaps"][arch]["cams"]
        assert cams.dtype == np.float32 and cams.ndim == 3 and (cams >= 0).all()  # raw, after ReLU
        assert str(aligned["heatmaps"][arch]["split_digest"]) == split.digest


def test_results_and_classifier_name_the_files_they_were_made_from(run_dir):
    results = json.loads((run_dir / "results.json").read_text())
    classifier = torch.load(run_dir / "final_classifier.pth", map_location="cpu", weights_only=True)
    for arch in MODEL_ORDER:
        assert [results["sources"][arch]["checkpoint_sha256"]] == classifier["checkpoint_sha256"][arch]
        assert [results["sources"][arch]["heatmaps_sha256"]] == classifier["heatmaps_sha256"][arch]
        assert results["sources"][arch]["heatmaps_sha256"] == sha256_of_file(run_dir / f"heatmaps_{arch}.npz")
        assert results["sources"][arch]["checkpoint_sha256"] == sha256_of_file(run_dir / f"fine_tuned_{arch}.pth")


def test_map_type_comparison_is_made_from_the_saved_test_predictions(run_dir, aligned):
    """results.json's Grad-CAM vs Grad-CAM++ vs LayerCAM section: every map type the export made, the final MLP's
    row being that MLP's own predictions, every number the patient bootstrap of test_predictions.npz's arrays."""
    results = json.loads((run_dir / "results.json").read_text())
    comparison = results["cam_method_comparison"]
    assert comparison["methods"] == list(CAM_METHODS) and comparison["final_method"] == results["cam_method"]
    saved = np.load(run_dir / "test_predictions.npz", allow_pickle=False)
    np.testing.assert_array_equal(saved[cam_probability_key(results["cam_method"])], saved["prob_mlp_heatmaps"])
    test_rows = aligned["test_rows"]
    recomputed = compare_cam_methods({method: saved[cam_probability_key(method)] for method in CAM_METHODS},
                                     labels=aligned["labels"][test_rows], patients=aligned["patients"][test_rows],
                                     protocol=comparison["protocol"], final_method=comparison["final_method"],
                                     resamples=comparison["bootstrap"]["resamples"],
                                     seed=comparison["bootstrap"]["seed"])
    assert_same_numbers(comparison, recomputed)
    assert comparison_markdown(comparison) in (run_dir / "results.md").read_text()
    assert comparison["patients"] == len(results["test_patients"])  # scored on the test split's patients


def test_calibration_is_fitted_on_val_and_equals_a_recomputation_from_the_test_predictions(run_dir, aligned):
    """results.json's calibration section: every row's Brier, log loss and both ECEs, before and after temperature
    scaling, image and patient level, equal those recomputed from test_predictions.npz; the CNNs' temperatures are
    fitted on the val split's rows (never a test row); final_classifier.pth carries the final row's."""
    results = json.loads((run_dir / "results.json").read_text())
    section = results["calibration"]
    saved = np.load(run_dir / "test_predictions.npz", allow_pickle=False)
    labels, patients = saved["labels"], saved["patients"]
    for key in results["display_names"]:
        for column, part in ((probability_key(key), "before"), (scaled_probability_key(key), "temperature_scaled")):
            diagnosis = diagnose_patients(saved[column], labels, patients)
            for level, recomputed in (("image", calibration_metrics(labels, saved[column])),
                                      ("patient", calibration_metrics(diagnosis.labels, diagnosis.prob_malignant))):
                for metric, value in recomputed.items():
                    assert section[part][key][level][metric]["estimate"] == pytest.approx(value, abs=1e-6)
    val_rows = np.flatnonzero(aligned["splits"] == "val")
    for arch in MODEL_ORDER:
        logits = load_heatmaps(heatmap_path(run_dir, arch))["logits"]  # float32, as the stage reads them
        prob = softmax(logits)[:, 1]
        temperature = fit_temperature(prob[val_rows], aligned["labels"][val_rows])
        assert section["temperatures"][arch]["per_block"] == [pytest.approx(temperature, rel=1e-6)]
        np.testing.assert_allclose(saved[scaled_probability_key(arch)],
                                   apply_temperature(prob[aligned["test_rows"]], temperature), atol=1e-9)
    classifier = torch.load(run_dir / "final_classifier.pth", map_location="cpu", weights_only=True)
    assert classifier["temperatures"]["final_mlp"] == pytest.approx(
        section["temperatures"]["mlp_heatmaps"]["for_new_images"])
    assert "## Calibration" in (run_dir / "results.md").read_text()


# ------------------------------------------------------------------- stale inputs; the files of one run


def one_line_error(finished: subprocess.CompletedProcess) -> str:
    assert finished.returncode == 2, finished.stderr
    lines = finished.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in finished.stderr
    return lines[0]


def test_heatmaps_of_another_checkpoint_are_refused_with_the_command_that_regenerates_them(run_copy, retrain):
    """A model script rerun that wrote its new checkpoint and then stopped (a failed export, a full disk) leaves the
    old maps beside the new model. The error names the stale file and a command that, run as printed, fixes it."""
    retrain(checkpoint_path(run_copy, "densenet121"))
    further = ("cancer_class_further.py", "--output-dir", str(run_copy), "--device", "cpu")
    message = one_line_error(run_script(*further))
    assert f"{heatmap_path(run_copy, 'densenet121')} is stale" in message
    _python, *command = shlex.split(re.search(r"regenerate it with (python .* --heatmaps-only)", message).group(1))
    assert command[0] == MODEL_SCRIPTS["densenet121"] and f"--output-dir {run_copy}" in shlex.join(command)
    regenerated = run_script(*command)  # in the repository, with this interpreter
    assert regenerated.returncode == 0, regenerated.stderr
    finished = run_script(*further)
    assert finished.returncode == 0, finished.stderr


def test_a_truncated_checkpoint_is_refused(run_copy):
    checkpoint = checkpoint_path(run_copy, "densenet121")
    content = checkpoint.read_bytes()
    checkpoint.unlink()  # a link to the original run's file: replace it, never write through it
    checkpoint.write_bytes(content[:len(content) // 2])
    with pytest.raises(PipelineError) as error:
        cancer_class_further.main(["--output-dir", str(run_copy), "--device", "cpu"])
    assert f"checkpoint {checkpoint} is unreadable" in str(error.value) and "\n" not in str(error.value)
    assert (run_copy / "results.json").is_symlink()  # nothing was written


RUN_FILES = ("final_classifier.pth", "final_classifier_heatmaps_logits.pth", "test_predictions.npz", "results.md",
             "results.json")


def test_a_failure_while_writing_leaves_the_previous_results_intact(run_copy, monkeypatch):
    before = {name: sha256_of_file(run_copy / name) for name in RUN_FILES}

    def full_disk(target, text):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(single_split, "write_text", full_disk)  # results.md, written after the classifiers
    with pytest.raises(PipelineError, match=r"^the disk is full: cannot write final_classifier\.pth, .*results\.md, "
                                            r"results\.json in .* \(one of them\) \(No space left on device\); the "
                                            r"previous ones, if any, and all earlier results are intact"):
        cancer_class_further.main(["--output-dir", str(run_copy), "--device", "cpu", "--seed", "1"])
    assert {name: sha256_of_file(run_copy / name) for name in RUN_FILES} == before
    assert not [path.name for path in run_copy.iterdir() if path.name.startswith(".")]  # no temporary file left


class Killed(Exception):
    pass


def test_readers_refuse_a_classifier_without_its_results(run_copy, monkeypatch):
    """Killed after the new classifiers were renamed into place and before results.json was: predict.py and the
    report refuse to pair them (or the new test predictions) with the old results."""
    rename = os.replace

    def killed_before_results(source, target):
        if Path(target).name == "results.json":
            raise Killed
        rename(source, target)

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", killed_before_results)
        with pytest.raises(Killed):
            cancer_class_further.main(["--output-dir", str(run_copy), "--device", "cpu", "--seed", "1"])
    assert not (run_copy / "final_classifier.pth").is_symlink() and (run_copy / "results.json").is_symlink()
    run = open_run(run_copy)
    for read, name in ((run.load_classifier, "final_classifier.pth"), (run.predictions, "test_predictions.npz")):
        with pytest.raises(PipelineError) as error:
            read()
        message = str(error.value)
        assert f"{run_copy / name} does not belong to the results.json beside it" in message and "\n" not in message
        assert f"rerun python cancer_class_further.py --output-dir {run_copy}" in message
