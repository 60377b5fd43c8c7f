"""K-fold runs end to end (common/training/model_script.py, common/run.py, common/stages/cross_validation.py,
run_pipeline.py's default): the fold splits the model scripts write, the out-of-fold set, cross-fitting on it, the
files, resuming an interrupted run, and every reader on a K-fold run: predict.py (bagged, --explain, the run's own
images scored by their own fold), score_explanations.py, the checks of the one classifier schema.

One K-fold pipeline run (K=2, 32 px, one epoch, random init) is made once per session by conftest's `cv_run`.
"""

import csv
import json
import re
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from conftest import FOLDS, PIPELINE_ARGS, ROOT, run_pipeline

from common.cams.methods import CAM_METHODS, grad_cam
from common.core.errors import PipelineError
from common.core.fileio import save_torch, sha256_of_file
from common.core.runfiles import (CV_RESULTS_JSON, CV_RESULTS_MD, FAITHFULNESS_JSON, FINAL_CLASSIFIER, FOLDS_FILE,
                                  OOF_PREDICTIONS, REPORT_DIR, checkpoint_path, fold_dir, probability_key,
                                  scaled_probability_key)
from common.data.images import build_cache, cache_key, load_rgb, make_batches
from common.data.partition import describe_protocol, load_folds
from common.data.records import index_dataset
from common.data.transforms import build_transforms
from common.evaluation.calibration import apply_temperature, calibration_metrics, fit_temperature
from common.evaluation.map_comparison import cam_probability_key, compare_cam_methods
from common.fusion.mlp import MlpSettings
from common.fusion.stacking import OutOfFold, cross_fit, mlp_stacker
from common.models.checkpoints import load_checkpoint, model_from_checkpoint
from common.models.registry import MODEL_ORDER
from common.run import open_run
from common.evaluation.stats import (MIN_PATIENTS_PER_CLASS, TOO_FEW_PATIENTS, PatientBootstrap, diagnose_patients,
                                    evaluate_row)
from common.stages.cross_validation import (
    CV_ROW_NAMES,
    cross_fitted_probabilities,
    feature_sets,
    format_cell,
    row_entries,
)
from common.stages.single_split import results_current
from common.training.config import TrainConfig, heatmaps_only_command, parse_config
from common.training.model_script import prepare_run_split


def fold_configs(demo_dir: Path, output_dir: Path, *extra: str) -> list[TrainConfig]:
    config = parse_config(arch="resnet50", description="", argv=["--data-dir", str(demo_dir), "--output-dir",
                                                                 str(output_dir), *PIPELINE_ARGS, *extra])
    return config.fold_configs()


# ------------------------------------------------------------------------------------------ the folds' splits


def test_fold_splits_cover_every_image_once_share_one_cache_and_say_what_they_are(demo_dir, tmp_path):
    configs = fold_configs(demo_dir, tmp_path, "--folds", "2")
    assert [config.output_dir for config in configs] == [str(fold_dir(tmp_path, 1)), str(fold_dir(tmp_path, 2))]
    splits = [prepare_run_split(config) for config in configs]
    assert (tmp_path / FOLDS_FILE).is_file() and (fold_dir(tmp_path, 1) / "split.json").is_file()
    times_tested, folds_of_patient = defaultdict(int), defaultdict(set)
    for fold, split in enumerate(splits, start=1):
        for record, name in zip(split.records, split.splits):
            times_tested[record.path] += name == "test"
            if name == "test":
                folds_of_patient[record.patient].add(fold)
    assert sorted(times_tested) == sorted(record.path for record in index_dataset(demo_dir).records)
    assert set(times_tested.values()) == {1}  # every image in exactly one fold's test set
    assert all(len(folds) == 1 for folds in folds_of_patient.values())  # no patient in two folds
    # Same records in the same order: one decoded-image cache file serves every fold.
    assert cache_key(splits[0].root, splits[0].records, 32) == cache_key(splits[1].root, splits[1].records, 32)
    assert describe_protocol(splits[1].protocol).startswith(
        "patient-level 2-fold cross-validation, fold 2 of 2 (test = fold 2's patients; val carved from the other "
        "folds' patients), seed 0")
    # A second call reads and checks what the first wrote; folds.json numbers the folds 1..K.
    assert prepare_run_split(configs[0]).digest == splits[0].digest
    assert sorted(set(load_folds(tmp_path / FOLDS_FILE).folds.tolist())) == [1, 2]


def test_fold_options_are_checked(demo_dir, tmp_path, capsys):
    for extra, message in ((["--fold", "1"], "--fold k needs --folds K"),
                           (["--folds", "2", "--fold", "3"], "folds are numbered 1 to 2"),
                           (["--folds", "0"], "--folds must be at least 1"),
                           (["--folds", "2", "--max-images", "10"], "--max-images cannot be combined with --folds"),
                           (["--folds", "2", "--fold-file", str(tmp_path / "dsfold1.txt")],
                            "give one --fold-file per fold")):
        with pytest.raises(PipelineError, match=re.escape(message)):
            fold_configs(demo_dir, tmp_path, *extra)
    assert fold_configs(demo_dir, tmp_path, "--folds", "1")[0].n_folds is None  # --folds 1: one split
    configs = fold_configs(demo_dir, tmp_path, "--folds", "2")
    prepare_run_split(configs[0])
    other = fold_configs(demo_dir, tmp_path, "--folds", "2", "--seed", "1")
    with pytest.raises(PipelineError, match=r"folds.json was made with other options \(seed 0 there, 1 now\)"):
        prepare_run_split(other[0])


def write_fold_files(folder: Path, demo_dir: Path, test_groups: list[set[str]]) -> list[Path]:
    """One dsfoldN.txt per group of patients: those patients' images test, the others train."""
    records = index_dataset(demo_dir).records
    paths = []
    for number, test_patients in enumerate(test_groups, start=1):
        lines = [f"{Path(r.path).name}|{r.magnification}|{number}|{'test' if r.patient in test_patients else 'train'}"
                 for r in records]
        paths.append(folder / f"dsfold{number}.txt")
        paths[-1].write_text("\n".join(lines) + "\n")
    return paths


def test_official_fold_files_are_the_folds_of_a_k_fold_run(demo_dir, tmp_path):
    patients = sorted({record.patient for record in index_dataset(demo_dir).records})
    benign = [patient for patient in patients if patient in {r.patient for r in index_dataset(demo_dir).records
                                                             if r.label == 0}]
    malignant = [patient for patient in patients if patient not in benign]
    halves = [set(benign[:2] + malignant[:2]), set(benign[2:] + malignant[2:])]
    files = write_fold_files(tmp_path, demo_dir, halves)
    configs = fold_configs(demo_dir, tmp_path / "run", *(arg for path in files for arg in ("--fold-file", str(path))))
    assert len(configs) == 2 and configs[1].fold_files == tuple(str(path) for path in files)
    split = prepare_run_split(configs[1])
    assert {r.patient for r, name in zip(split.records, split.splits) if name == "test"} == halves[1]
    assert describe_protocol(split.protocol).startswith("the test sides of 2 fold files, fold 2 of 2")
    # Overlapping test sides (the official dsfold files are independent splits, not a partition): refused.
    overlapping = write_fold_files(tmp_path, demo_dir, [halves[0], halves[0] | {benign[2]}])
    configs = fold_configs(demo_dir, tmp_path / "other",
                           *(arg for path in overlapping for arg in ("--fold-file", str(path))))
    with pytest.raises(PipelineError, match="both put .* on their test side"):
        prepare_run_split(configs[0])


def test_heatmaps_only_command_of_a_fold_names_the_k_fold_folder_and_the_fold(tmp_path):
    config = {"data_dir": "/data", "folds": 5, "fold": 2, "fold_files": None}
    command = heatmaps_only_command("cancer_class_vgg_16.py", config, tmp_path / "fold_2")
    assert command.endswith(f"--output-dir {tmp_path} --folds 5 --fold 2 --heatmaps-only")


# ------------------------------------------------------------------------------------------ a K-fold run


def test_k_fold_run_writes_the_out_of_fold_files(cv_run):
    folds = load_folds(cv_run / FOLDS_FILE)
    results = json.loads((cv_run / CV_RESULTS_JSON).read_text())
    with open(cv_run / OOF_PREDICTIONS, newline="") as handle:
        rows = list(csv.DictReader(handle))
    # Every image exactly once, with the fold whose test set holds it.
    assert [row["path"] for row in rows] == [record.path for record in folds.records]
    assert [int(row["fold"]) for row in rows] == folds.folds.tolist()  # 1..K, as in folds.json
    for arch in MODEL_ORDER:  # each row names the checkpoint of its own fold
        for fold in (1, 2):
            digests = {row[f"checkpoint_sha256_{arch}"] for row in rows if row["fold"] == str(fold)}
            assert digests == {json.loads((fold_dir(cv_run, fold) / "results.json").read_text())
                               ["sources"][arch]["checkpoint_sha256"]}
    assert list(results["rows"]) == list(CV_ROW_NAMES)
    auc = results["rows"]["mlp_heatmaps"]["image"]["roc_auc"]
    # 4 patients per class in the tests' data: below MIN_PATIENTS_PER_CLASS, no interval, the note instead.
    assert set(auc) == {"folds", "mean", "sd", "pooled", "ci95", "ci95_note"} and len(auc["folds"]) == FOLDS
    assert auc["ci95"] is None and auc["ci95_note"].startswith("too few patients for an interval (4 benign, 4 ")
    assert results["bootstrap"] == {"resamples": 2000, "seed": 0, "unit": "patient", "stratified": True}
    assert {(d["b"], d["level"], d["metric"]) for d in results["differences"]} == {
        (other, level, metric) for other in ("soft_vote", results["best_cnn"]) for level in ("image", "patient")
        for metric in ("roc_auc", "balanced_accuracy")}
    markdown = (cv_run / CV_RESULTS_MD).read_text()
    assert markdown.splitlines()[2].startswith("- MLP on heatmaps's AUC")
    assert "patient-level 2-fold cross-validation" in results["protocol"]
    page = (cv_run / REPORT_DIR / "index.html").read_text()
    assert "Cross-validation report (2 folds)" in page and 'id="cv-patient"' in page and 'id="map-types"' in page
    assert all((cv_run / REPORT_DIR / f"fold_{fold}" / "index.html").is_file() for fold in (1, 2))
    assert (cv_run / REPORT_DIR / "cv_roc.png").is_file()


def test_k_fold_map_type_comparison_is_cross_fitted_on_the_out_of_fold_rows(cv_run):
    """cv_results.json's Grad-CAM vs Grad-CAM++ vs LayerCAM section: one cross-fitted MLP per map type, its
    out-of-fold predictions in oof_predictions.csv (Grad-CAM's is the table's MLP on heatmaps), every number the
    patient bootstrap of those predictions with the table's resamples and seed."""
    results = json.loads((cv_run / CV_RESULTS_JSON).read_text())
    comparison = results["cam_method_comparison"]
    assert comparison["methods"] == list(CAM_METHODS) and comparison["final_method"] == "gradcam"
    with open(cv_run / OOF_PREDICTIONS, newline="") as handle:
        rows = list(csv.DictReader(handle))
    column = {method: np.array([float(row[cam_probability_key(method)]) for row in rows]) for method in CAM_METHODS}
    np.testing.assert_array_equal(column["gradcam"], [float(row["prob_mlp_heatmaps"]) for row in rows])
    labels = np.array([row["label"] == "malignant" for row in rows], dtype=np.int64)
    recomputed = compare_cam_methods(column, labels=labels, patients=np.array([row["patient"] for row in rows]),
                                     protocol=comparison["protocol"], final_method="gradcam",
                                     resamples=results["bootstrap"]["resamples"], seed=results["bootstrap"]["seed"])
    for method in CAM_METHODS:  # the CSV keeps every digit
        for level in ("image", "patient"):
            for metric in ("roc_auc", "balanced_accuracy"):
                ours, theirs = comparison["rows"][method][level][metric], recomputed["rows"][method][level][metric]
                assert ours["estimate"] == pytest.approx(theirs["estimate"], abs=1e-12), (method, level, metric)
    assert comparison["images"] == results["images"] and comparison["patients"] == results["patients"]
    assert "## Which maps make the best final classifier" in (cv_run / CV_RESULTS_MD).read_text()


def recompute_map(folder: Path, arch: str, demo_dir: Path, record_path: str) -> np.ndarray:
    """The Grad-CAM map of one image by the checkpoint in `folder`, computed anew (not read from a file)."""
    checkpoint = load_checkpoint(checkpoint_path(folder, arch), arch)
    model = model_from_checkpoint(checkpoint)
    record = next(r for r in index_dataset(demo_dir).records if r.path == record_path)
    cache = build_cache(demo_dir, [record], image_size=checkpoint["image_size"], mode="memory", cache_dir=None,
                        workers=0)
    batches = make_batches(demo_dir, [record], [0], train=False, image_size=checkpoint["image_size"], batch_size=1,
                           workers=0, device=torch.device("cpu"), seed=0, cache=cache)
    images, _labels, _indices = next(iter(batches.batches()))
    cams, _logits = grad_cam(model, arch, images, target="predicted")
    return cams[0].numpy()


def test_out_of_fold_map_is_the_map_of_the_fold_model_that_never_saw_the_patient(cv_run, demo_dir):
    held = open_run(cv_run).held_out()
    row = int(np.flatnonzero(held.folds == 2)[0])  # an image of fold 2: fold_2's models never trained on it
    arch = "resnet50"
    fold_two = recompute_map(fold_dir(cv_run, 2), arch, demo_dir, str(held.paths[row]))
    np.testing.assert_allclose(held.maps["gradcam"][arch][row], fold_two, rtol=1e-4, atol=1e-6)
    fold_one = recompute_map(fold_dir(cv_run, 1), arch, demo_dir, str(held.paths[row]))
    assert not np.allclose(held.maps["gradcam"][arch][row], fold_one)  # the model that trained on it made another


def test_stackers_fit_rows_never_hold_the_outer_folds_patients(cv_run):
    oof = open_run(cv_run).held_out()
    seen = []
    settings = MlpSettings(epochs=2)
    real_mlp = mlp_stacker(settings, torch.device("cpu"), "test")

    def spying_mlp(fit: OutOfFold, select: OutOfFold, predict: OutOfFold) -> np.ndarray:
        seen.append((set(fit.patients) | set(select.patients), set(predict.patients), set(predict.folds),
                     set(predict.labels)))
        return real_mlp(fit, select, predict)

    rows = OutOfFold(oof.folds, oof.labels, oof.patients, oof.logits, feature_sets(oof, 4)["heatmaps"])
    fitted = cross_fit(rows, spying_mlp, select_fraction=0.2, seed=0)
    assert len(seen) == FOLDS and not np.isnan(fitted.prob_malignant).any()
    for fitted_on, predicted, predicted_folds, hidden_labels in seen:
        assert len(predicted_folds) == 1 and hidden_labels == {-1}
        assert not fitted_on & predicted  # the stacker of fold k never saw fold k's patients
    # The same holds for every stacker of the aggregation, on the rows it reports.
    _probabilities, rows_used = cross_fitted_probabilities(oof, feature_sets(oof, 4), settings, torch.device("cpu"))
    for used in rows_used.values():
        for fold in range(1, FOLDS + 1):
            outer = set(oof.patients[oof.folds == fold])
            assert not outer & set(oof.patients[used["fit"][fold]])
            assert not outer & set(oof.patients[used["select"][fold]])


def test_an_interrupted_k_fold_run_resumes_with_the_folds_not_complete(cv_run, demo_dir, tmp_path):
    base = tmp_path
    copy = Path(shutil.copytree(cv_run, base / "resumed", copy_function=os.symlink, ignore=shutil.ignore_patterns(
        REPORT_DIR)))
    # As if stopped while fold 2's VGG-16 was exporting: its checkpoint is new, its heatmap file not yet written.
    (fold_dir(copy, 2) / "heatmaps_vgg16.npz").unlink()
    log = fold_dir(copy, 2) / "train_log_vgg16.jsonl"  # appended to by the rerun: a copy, not a link to the original
    original = log.resolve()
    log.unlink()
    shutil.copyfile(original, log)
    finished = run_pipeline(base, demo_dir, "resumed", "--folds", str(FOLDS))
    for arch in MODEL_ORDER:
        assert f"fold_1 {arch}: complete, skipped" in finished.stdout
    assert "fold_2 densenet121: complete, skipped" in finished.stdout
    assert "cancer_class_vgg_16.py" in finished.stdout and "--fold 2" in finished.stdout
    assert "cancer_class_resnet_50.py" not in finished.stdout
    assert (fold_dir(copy, 2) / "heatmaps_vgg16.npz").is_file()
    assert (copy / CV_RESULTS_JSON).is_file() and not (copy / CV_RESULTS_JSON).is_symlink()


def new_image_from(source: Path, target: Path) -> Path:
    """A new image (for the bagged ensemble): a dataset image with one pixel changed, so that its bytes are no
    dataset image's (a byte-identical copy is recognised as the run's own image)."""
    pixels = np.array(load_rgb(source))
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(target)
    return target


def test_predict_on_a_k_fold_run_bags_the_fold_models_and_says_so(cv_run, demo_dir, tmp_path, capsys):
    import predict  # a script at the repository root (conftest puts the root on sys.path)
    image = new_image_from(demo_dir / index_dataset(demo_dir).records[0].path, tmp_path / "new.png")
    predict.main([str(image), "--output-dir", str(cv_run), "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert "the mean over its 2 fold models (a bagged ensemble)" in capsys.readouterr().out
    with open(tmp_path / "out" / "predictions.csv", newline="") as handle:
        row = next(csv.DictReader(handle))
    expected = []
    for fold in (1, 2):  # each fold model's P(malignant), computed here on its own
        checkpoint = load_checkpoint(checkpoint_path(fold_dir(cv_run, fold), "resnet50"), "resnet50")
        model = model_from_checkpoint(checkpoint).eval()
        with torch.no_grad():
            logits = model(build_transforms(train=False, image_size=checkpoint["image_size"])(load_rgb(image))[None])
        expected.append(torch.softmax(logits, dim=1)[0, 1].item())
    assert float(row["p_malignant_resnet50"]) == pytest.approx(np.mean(expected), abs=1e-5)


def test_predict_on_a_k_fold_run_holds_one_fold_model_at_a_time(cv_run, demo_dir, tmp_path, monkeypatch):
    """Memory for one fold model, not K (3 folds of VGG-16 alone are 1.5 GB): each fold model is loaded while it
    runs and gone before the next one loads; the probabilities are the bagged ones all the same."""
    import gc
    import weakref

    import predict
    from common import run as run_module

    alive, most_alive, loads = weakref.WeakSet(), [0], [0]
    load_model = run_module._load_model

    def counted(*args):
        gc.collect()  # what is only waiting for the collector is not held
        model = load_model(*args)
        alive.add(model)
        loads[0] += 1
        most_alive[0] = max(most_alive[0], len(alive))
        return model

    monkeypatch.setattr(run_module, "_load_model", counted)
    image = new_image_from(demo_dir / index_dataset(demo_dir).records[0].path, tmp_path / "new.png")
    predict.main([str(image), "--output-dir", str(cv_run), "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert loads[0] == FOLDS * len(MODEL_ORDER) and most_alive[0] == 1


def oof_rows(run_dir: Path) -> dict[str, dict]:
    with open(run_dir / OOF_PREDICTIONS, newline="") as handle:
        return {row["path"]: row for row in csv.DictReader(handle)}


def test_predict_scores_an_image_of_the_run_by_the_fold_that_never_saw_its_patient(cv_run, tmp_path, capsys):
    """The run's own image is not given to the bagged ensemble (half of whose models trained on it): its CNN
    probabilities are its fold's models' (= oof_predictions.csv) and its final MLP's the cross-fitted one."""
    import predict
    run = open_run(cv_run)
    record = run.partition.records[int(np.flatnonzero(run.partition.folds == 2)[0])]
    predict.main([str(run.data_root / record.path), "--output-dir", str(cv_run), "--out", str(tmp_path / "out"),
                  "--device", "cpu"])
    with open(tmp_path / "out" / "predictions.csv", newline="") as handle:
        row = next(csv.DictReader(handle))
    stored = oof_rows(cv_run)[record.path]
    for arch in MODEL_ORDER:
        assert float(row[f"p_malignant_{arch}"]) == pytest.approx(float(stored[f"prob_{arch}"]), abs=1e-5)
    assert float(row["p_malignant_final_mlp"]) == pytest.approx(float(stored["prob_mlp_heatmaps"]), abs=1e-5)
    assert row["scored_by"].startswith("fold 2's models (out of fold")
    # A byte-identical copy elsewhere (renamed, as a user might send it) is recognised the same way, and flagged.
    copy = tmp_path / "renamed.png"
    shutil.copyfile(run.data_root / record.path, copy)
    capsys.readouterr()
    predict.main([str(copy), "--output-dir", str(cv_run), "--out", str(tmp_path / "out2"), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert (f"  note: renamed.png: one of this run's own images (patient {record.patient}, fold 2): the models of the "
            "other folds were trained on it; only fold 2's models never saw its patient; scored here by fold 2's "
            "models") in printed
    with open(tmp_path / "out2" / "predictions.csv", newline="") as handle:
        assert next(csv.DictReader(handle))["scored_by"].startswith("fold 2's models (out of fold")


def test_predict_explain_on_a_k_fold_run_writes_every_figure(cv_run, demo_dir, tmp_path):
    image = new_image_from(demo_dir / index_dataset(demo_dir).records[0].path, tmp_path / "new.png")
    finished = run_script("predict.py", str(image), "--output-dir", str(cv_run), "--out", str(tmp_path / "out"),
                          "--device", "cpu", "--explain", "resnet50")
    assert finished.returncode == 0, finished.stderr
    assert "bagged ensemble" in finished.stdout
    assert {path.name for path in (tmp_path / "out").iterdir()} == {"new_gradcam.png", "new_explain.png",
                                                                     "predictions.csv"}
    # Progress per perturbation method (each hundreds of forward passes), then the image's total time.
    progress = [line for line in finished.stderr.splitlines() if line.startswith("explaining ")]
    assert progress[:3] == [f"explaining 1/1 new.png: {method} of ResNet-50 ..."
                            for method in ("LIME", "Kernel SHAP", "Occlusion")]
    assert len(progress) == 4 and progress[3].startswith("explaining 1/1 new.png: done in ")
    assert "1 explanation figure(s) <stem>_explain.png" in finished.stdout  # the last line names what it wrote


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_a_checkpoint_copied_from_another_fold_is_refused_naming_the_fold(cv_copy, tmp_path):
    import predict
    target = checkpoint_path(fold_dir(cv_copy, 1), "resnet50")
    target.unlink()
    shutil.copyfile(checkpoint_path(fold_dir(cv_copy, 2), "resnet50"), target)
    # Not an image of the run's dataset: the bagged ensemble, every fold's model.
    image = new_image_from(open_run(cv_copy).data_root / open_run(cv_copy).partition.records[0].path,
                           cv_copy / "image.png")
    with pytest.raises(PipelineError,
                       match="fold_1/fine_tuned_resnet50.pth was trained for fold 2, not fold 1 .copied"):
        predict.main([str(image), "--output-dir", str(cv_copy), "--out", str(tmp_path / "out"), "--device", "cpu"])


def test_a_classifier_of_the_older_schema_is_refused_with_the_command_that_rewrites_it(cv_copy):
    path = cv_copy / FINAL_CLASSIFIER
    classifier = torch.load(path, map_location="cpu", weights_only=True)
    path.unlink()
    save_torch({**classifier, "format_version": 1}, path)
    results = json.loads((cv_copy / CV_RESULTS_JSON).read_text())
    results["outputs"][FINAL_CLASSIFIER] = sha256_of_file(path)  # listed, so the format is what is refused
    (cv_copy / CV_RESULTS_JSON).unlink()
    (cv_copy / CV_RESULTS_JSON).write_text(json.dumps(results))
    with pytest.raises(PipelineError, match=r"written by an earlier version .* rewrite it with python "
                                            r"cancer_class_further.py --output-dir"):
        open_run(cv_copy).load_classifier()


def test_explanations_of_a_k_fold_run_are_scored_on_out_of_fold_images_by_their_own_fold(cv_run):
    """score_explanations.py (run by run_pipeline.py): every scored image is a run image, and its Grad-CAM deletion
    AUC is what its own fold's model gives (recomputed here), not the other fold's."""
    from common.explain.faithfulness import cam_saliency, score_methods, soft_vote_probabilities
    result = json.loads((cv_run / FAITHFULNESS_JSON).read_text())
    run = open_run(cv_run)
    assert result["run_kind"] == "kfold" and "out of fold" in result["held_out"]
    fold_of = {record.path: int(fold) for record, fold in zip(run.partition.records, run.partition.folds)}
    first = result["images"][0]
    checkpoint = load_checkpoint(checkpoint_path(fold_dir(cv_run, fold_of[first]), "resnet50"), "resnet50")
    model = model_from_checkpoint(checkpoint).eval()
    image = build_transforms(train=False, image_size=checkpoint["image_size"])(load_rgb(run.data_root / first))[None]
    table = score_methods(soft_vote_probabilities([model]), image, {"Grad-CAM": cam_saliency(model, "resnet50",
                                                                                             method="gradcam")},
                          target=result["target_class_rule"], steps=result["steps"], seed=result["seed"])
    stored = result["cnns"]["resnet50"]["cams"]["methods"]["Grad-CAM"]["per_image"]["deletion_auc"][0]
    assert stored == pytest.approx(table["methods"]["Grad-CAM"]["deletion_auc"], abs=1e-6)
    assert result["checkpoint_sha256"]["resnet50"] == [json.loads((fold_dir(cv_run, fold) / "results.json")
                                                                  .read_text())["sources"]["resnet50"]
                                                       ["checkpoint_sha256"] for fold in (1, 2)]


def test_a_run_of_the_other_kind_is_refused_without_touching_the_folder(cv_copy, demo_dir, tmp_path):
    before = sorted(path.name for path in cv_copy.iterdir())
    finished = run_script("run_pipeline.py", "--data-dir", str(demo_dir), "--output-dir", str(cv_copy),
                          "--folds", "1", *PIPELINE_ARGS)
    assert finished.returncode == 2
    assert f"error: --output-dir {cv_copy} holds a K-fold run (folds.json); a single-split run needs another " \
           "--output-dir" in finished.stderr
    assert sorted(path.name for path in cv_copy.iterdir()) == before


def test_every_pooled_metric_has_its_interval_from_five_patients_per_class_and_the_note_below():
    """F1 and the patient recognition rate too: with at least MIN_PATIENTS_PER_CLASS patients of each class every
    defined pooled figure has its patient-bootstrap interval, which holds it; with fewer, none has one and each
    says why (the table prints the note)."""
    rng = np.random.default_rng(0)
    for per_class in (MIN_PATIENTS_PER_CLASS, MIN_PATIENTS_PER_CLASS - 1):
        patients = np.repeat([f"p{index}" for index in range(2 * per_class)], 4)
        labels = np.repeat([0] * per_class + [1] * per_class, 4)
        folds = np.repeat(np.arange(2 * per_class) % 2 + 1, 4)
        probabilities = np.clip(labels * 0.3 + rng.random(len(labels)) * 0.7, 0, 1)
        bootstrap = PatientBootstrap.draw(labels=labels, patients=patients, resamples=200, seed=0)
        entries = row_entries(evaluate_row(probabilities, labels=labels, patients=patients, folds=folds,
                                           bootstrap=bootstrap))
        assert {"f1", "patient_recognition_rate"} <= set(entries["image"])
        checked = 0
        for level in ("image", "patient"):
            for metric, entry in entries[level].items():
                if entry["pooled"] is None:
                    continue
                if per_class >= MIN_PATIENTS_PER_CLASS:
                    low, high = entry["ci95"]
                    assert low - 1e-9 <= entry["pooled"] <= high + 1e-9, (level, metric)
                    assert "ci95_note" not in entry
                else:
                    assert entry["ci95"] is None and entry["ci95_note"].startswith(TOO_FEW_PATIENTS), (level, metric)
                    assert format_cell(entry, interval=True).endswith(f" ({TOO_FEW_PATIENTS})")
                checked += 1
        assert checked >= 10


def calibration_of_rows(labels, prob, patients) -> dict[str, dict]:
    """The calibration metrics recomputed from a predictions file, image and patient level."""
    diagnosis = diagnose_patients(prob, labels, patients)
    return {"image": calibration_metrics(labels, prob),
            "patient": calibration_metrics(diagnosis.labels, diagnosis.prob_malignant)}


def test_k_fold_calibration_equals_a_recomputation_from_the_out_of_fold_file(cv_run):
    """Brier, log loss and both ECEs of every row, before and after the cross-fitted temperature, image and patient
    level, equal those recomputed from oof_predictions.csv; each fold's temperature is fitted on the other folds'
    rows; the classifier file holds the temperatures and conformal scores predict.py uses."""
    results = json.loads((cv_run / CV_RESULTS_JSON).read_text())
    rows = list(oof_rows(cv_run).values())
    labels = np.array([int(row["label"] == "malignant") for row in rows])
    patients = np.array([row["patient"] for row in rows])
    folds = np.array([int(row["fold"]) for row in rows])
    section = results["calibration"]
    for key in CV_ROW_NAMES:
        prob = np.array([float(row[probability_key(key)]) for row in rows])
        scaled = np.array([float(row[scaled_probability_key(key)]) for row in rows])
        for values, part in ((prob, "before"), (scaled, "temperature_scaled")):
            for level, metrics in calibration_of_rows(labels, values, patients).items():
                for metric, value in metrics.items():
                    assert section[part][key][level][metric]["estimate"] == pytest.approx(value, abs=1e-6)
        for fold, temperature in zip((1, 2), section["temperatures"][key]["per_block"]):
            assert temperature == pytest.approx(fit_temperature(prob[folds != fold], labels[folds != fold]), rel=1e-6)
            assert np.allclose(scaled[folds == fold], apply_temperature(prob[folds == fold], temperature))
        conformal = section["conformal"]["rows"][key]
        assert conformal["patient"]["cases"] == len(set(patients)) and conformal["image"]["cases"] == len(rows)
    classifier = torch.load(cv_run / FINAL_CLASSIFIER, map_location="cpu", weights_only=True)
    assert set(classifier["temperatures"]) == {*MODEL_ORDER, "soft_vote", "final_mlp"}
    assert classifier["temperatures"]["final_mlp"] == pytest.approx(
        section["temperatures"][results["final_row"]]["for_new_images"])
    assert len(classifier["conformal"]["patient_scores"]) == len(set(patients))
    assert len(classifier["conformal"]["image_scores"]) == len(rows)
    markdown = (cv_run / CV_RESULTS_MD).read_text()
    assert "## Calibration" in markdown and "## Conformal sets" in markdown


def test_a_folds_classifier_of_an_earlier_format_makes_its_results_stale(cv_copy):
    """After an upgrade, cancer_class_further.py redoes a fold whose final_classifier.pth is of an earlier format
    (with no temperatures), instead of keeping it beside this version's aggregation."""
    fold_run = open_run(fold_dir(cv_copy, 1))
    assert results_current(fold_run)
    path = fold_dir(cv_copy, 1) / FINAL_CLASSIFIER
    older = torch.load(path, map_location="cpu", weights_only=True)
    save_torch({**older, "format_version": 2}, path)
    assert not results_current(fold_run)
