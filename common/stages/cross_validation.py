"""The aggregation of a K-fold run: the out-of-fold set, the cross-fitted stackers, and the statistics.

    python -m common.stages.cross_validation --output-dir runs/demo_cv          # after every fold_<k>/ holds its three heatmap files

Out-of-fold set: for each fold k, the rows of fold_<k>/heatmaps_<arch>.npz whose split is 'test' (fold k's
patients), made by fold k's models, which never saw those patients; together every image of folds.json exactly once,
each row with its fold and the SHA-256 of the checkpoint that made it.

Rows of the table, all on the same images: each CNN; the soft vote (no fitting); logistic regression on the three
CNNs' logits; the MLP on the heatmaps (the design's final classifier); the MLP on heatmaps + logits. Every fitted
row is cross-fitted (common.data.partition.cross_fit): for outer fold k it is fitted on the out-of-fold rows of the other
folds' patients only (standardiser on its fit rows, epoch or C picked on a patient subset of them) and predicts
fold k.

Statistics (common.evaluation.stats): per row, per-fold metrics (mean ± sd), pooled out-of-fold metrics with a patient-bootstrap
95 % interval, image and patient level (patient diagnosis: mean P(malignant) over its images); paired differences
of the heatmap MLP with the soft vote and with the best single CNN.

Which maps make the best final classifier (common.evaluation.map_comparison): the heatmap MLP cross-fitted the same way on
each map type the folds' heatmap files hold (Grad-CAM, Grad-CAM++, LayerCAM), with intervals and paired
differences against Grad-CAM on the same resampled patients.

Writes into --output-dir (all or nothing; cv_results.json last, with the SHA-256 of the others):
    cv_results.json, cv_results.md, oof_predictions.csv,
    final_classifier.pth   the heatmap MLP fitted on ALL out-of-fold rows (for predict.py on this run)
"""

import argparse
import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.cams.heatmap_file import CAM_ARRAY_KEYS, load_heatmaps, stored_cam_methods
from common.cams.methods import CAM_DISPLAY_NAMES, CAM_METHODS
from common.core.console import HelpFormatter
from common.core.errors import PipelineError, run_main
from common.core.fileio import (
    remove_stale_temporaries,
    save_torch,
    sha256_of_file,
    write_json,
    write_text,
    written_together,
)
from common.core.runfiles import (
    CV_RESULTS_JSON,
    CV_RESULTS_MD,
    FINAL_CLASSIFIER,
    OOF_PREDICTIONS,
    checkpoint_path,
    fold_dir,
    heatmap_path,
    probability_key,
)
from common.data.partition import FOLDS_FILE_NAME, SPLIT_FILE_NAME, assign_groups, load_folds, load_split
from common.data.records import CLASS_NAMES, majority_labels
from common.evaluation.map_comparison import cam_probability_key, compare_cam_methods, comparison_markdown
from common.evaluation.metrics import softmax
from common.evaluation.stats import LEVELS, PatientBootstrap, describe_difference, evaluate_row, mean_and_sd_over_folds
from common.fusion.features import ROW_NAMES, build_features, stack_maps
from common.fusion.mlp import CLASSIFIER_FORMAT_VERSION, MlpSettings, fit_mlp
from common.fusion.stacking import OutOfFold, cross_fit, logistic_regression_stacker, mlp_stacker, soft_vote
from common.models.checkpoints import load_checkpoint
from common.models.registry import MODEL_ORDER
from common.run import check_against_split, check_checkpoints, check_made_by_checkpoint, load_aligned_heatmaps
from common.training.runtime import pick_device

CV_ROW_NAMES = {**{key: ROW_NAMES[key] for key in (*MODEL_ORDER, "soft_vote")},
                "logistic_regression": "Logistic regression on logits",
                "mlp_heatmaps": ROW_NAMES["mlp_heatmaps"], "mlp_heatmaps+logits": ROW_NAMES["mlp_heatmaps+logits"]}
FINAL_ROW = "mlp_heatmaps"  # the design's final classifier, compared with the soft vote and the best CNN
IMAGE_METRICS = ("roc_auc", "balanced_accuracy", "accuracy", "sensitivity", "specificity", "f1",
                 "patient_recognition_rate")
PATIENT_METRICS = ("roc_auc", "balanced_accuracy", "accuracy", "sensitivity", "specificity")
SELECT_FRACTION = 0.2  # of the other folds' patients (per class), held out to pick a stacker's epoch or C


@dataclass(frozen=True)
class OutOfFoldSet:
    """Every image of folds.json once, in its order, with what its fold's models made of it."""

    paths: np.ndarray  # (N,) str
    labels: np.ndarray  # (N,) int64
    patients: np.ndarray  # (N,) str
    magnifications: np.ndarray  # (N,) str
    folds: np.ndarray  # (N,) int64, 0-based outer fold (fold_<k>/ holds fold k-1)
    logits: dict[str, np.ndarray]  # arch -> (N, 2)
    cams_by_method: dict[str, dict[str, np.ndarray]]  # CAM method -> arch -> (N, h, w) raw maps; only the methods
    # every fold's every heatmap file holds (Grad-CAM always)
    checkpoint_sha256: dict[str, np.ndarray]  # arch -> (N,) digest of the checkpoint that made each row
    protocol: dict  # folds.json's
    digest: str  # folds.json's
    target_class_rule: str  # the rule every fold's maps were made with


def _fold_test_rows(output_dir: Path, fold: int, folds_digest: str) -> tuple[dict, dict[str, str]]:
    """Fold `fold` (1-based): its three aligned heatmap files, checked against its checkpoints and split.json,
    and the checkpoints' digests."""
    folder = fold_dir(output_dir, fold)
    split_file = folder / SPLIT_FILE_NAME
    if not split_file.is_file():
        raise PipelineError(f"{split_file} is missing: fold {fold} has not run; run the model scripts with "
                            f"--output-dir {output_dir} --fold {fold} (or run_pipeline.py --folds K)")
    split = load_split(split_file)
    if split.protocol.get("folds_digest") != folds_digest:
        raise PipelineError(f"{split_file} was made from other folds than {output_dir / FOLDS_FILE_NAME}; "
                            f"delete {folder} and rerun fold {fold}")
    heatmap_files = {arch: heatmap_path(folder, arch) for arch in MODEL_ORDER}
    heatmaps = load_aligned_heatmaps(folder, heatmap_files)
    check_against_split(heatmaps[MODEL_ORDER[0]], split)
    return heatmaps, check_checkpoints(folder, heatmap_files, heatmaps)


def load_out_of_fold(output_dir: Path) -> OutOfFoldSet:
    """The out-of-fold set of the K-fold run in output_dir; every image exactly once (checked)."""
    folds = load_folds(output_dir / FOLDS_FILE_NAME)
    row_of = {record.path: index for index, record in enumerate(folds.records)}
    count = len(folds.records)
    logits = {arch: np.zeros((count, 2), np.float32) for arch in MODEL_ORDER}
    digests = {arch: np.empty(count, dtype=object) for arch in MODEL_ORDER}
    cams_by_method: dict[str, dict[str, np.ndarray]] = {method: {} for method in CAM_METHODS}
    times_seen = np.zeros(count, dtype=np.int64)
    target_rules = set()
    for fold in range(1, folds.n_folds + 1):
        heatmaps, checkpoint_digests = _fold_test_rows(output_dir, fold, folds.digest)
        test = heatmaps[MODEL_ORDER[0]]["splits"] == "test"
        rows = np.array([row_of[path] for path in heatmaps[MODEL_ORDER[0]]["paths"][test]], dtype=np.int64)
        if np.any(folds.folds[rows] != fold - 1):
            raise PipelineError(f"{fold_dir(output_dir, fold)}: its test images are not fold {fold}'s patients")
        times_seen[rows] += 1
        target_rules.add(str(heatmaps[MODEL_ORDER[0]]["target_class_rule"]))
        for arch in MODEL_ORDER:
            logits[arch][rows] = heatmaps[arch]["logits"][test]
            digests[arch][rows] = checkpoint_digests[arch]
            stored = stored_cam_methods(heatmaps[arch])
            for method in list(cams_by_method):
                if method not in stored:  # a map type is compared only where every fold's every model has it
                    del cams_by_method[method]
                    continue
                fold_cams = heatmaps[arch][CAM_ARRAY_KEYS[method]][test]
                cams = cams_by_method[method].setdefault(arch, np.zeros((count, *fold_cams.shape[1:]), np.float32))
                if cams.shape[1:] != fold_cams.shape[1:]:
                    raise PipelineError(f"{heatmap_path(fold_dir(output_dir, fold), arch)} holds {fold_cams.shape[1:]} "
                                        f"maps, other folds {cams.shape[1:]}: run every fold at one --image-size")
                cams[rows] = fold_cams
    if not np.all(times_seen == 1):
        raise PipelineError(f"the folds' test sets do not cover {output_dir / FOLDS_FILE_NAME} once each "
                            f"({int(np.sum(times_seen == 0))} image(s) missing, {int(np.sum(times_seen > 1))} "
                            "repeated); rerun the folds")
    if len(target_rules) > 1:
        raise PipelineError(f"the folds' maps were made with different --cam-target rules ({sorted(target_rules)}); "
                            "rerun the folds with one rule")
    records = folds.records
    return OutOfFoldSet(np.array([r.path for r in records]), np.array([r.label for r in records], dtype=np.int64),
                        np.array([r.patient for r in records]), np.array([r.magnification for r in records]),
                        folds.folds, logits, cams_by_method,
                        {arch: value.astype(str) for arch, value in digests.items()},
                        folds.protocol, folds.digest, target_rules.pop())


def fold_model_complete(folder: Path, arch: str) -> bool:
    """Whether a fold's model has finished: its checkpoint loads, and its heatmap file was made by that checkpoint
    on the fold's split.json (common.fusion's check). A run stopped midway leaves this False, so it is redone."""
    checkpoint_file, heatmap_file = checkpoint_path(folder, arch), heatmap_path(folder, arch)
    if not (checkpoint_file.is_file() and heatmap_file.is_file() and (folder / SPLIT_FILE_NAME).is_file()):
        return False
    try:
        heatmaps = load_heatmaps(heatmap_file)
        load_checkpoint(checkpoint_file, arch)
        check_made_by_checkpoint(arch, heatmap_file, heatmaps, checkpoint_file, sha256_of_file(checkpoint_file))
        return str(heatmaps["split_digest"]) == load_split(folder / SPLIT_FILE_NAME).digest
    except PipelineError:
        return False


# ------------------------------------------------------------------------------------------ the stackers


def feature_sets(oof: OutOfFoldSet, grid_size: int, cam_method: str = "gradcam") -> dict[str, np.ndarray]:
    maps = stack_maps(oof.cams_by_method[cam_method], grid_size)  # (N, 3, S, S)
    return {"heatmaps": build_features(maps, None), "heatmaps+logits": build_features(maps, oof.logits)}


def cross_fitted_probabilities(oof: OutOfFoldSet, features: dict[str, np.ndarray], settings: MlpSettings,
                               device: torch.device) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """P(malignant) of every row of the table, and each stacker's fit and select rows per outer fold."""
    probabilities = {arch: softmax(oof.logits[arch].astype(np.float64))[:, 1] for arch in MODEL_ORDER}
    probabilities["soft_vote"] = soft_vote(oof.logits)
    stackers = {"logistic_regression": (None, logistic_regression_stacker())}
    for feature_set, values in features.items():
        stackers[f"mlp_{feature_set}"] = (values, mlp_stacker(settings, device, f"cross-fitted MLP on {feature_set}"))
    rows_used = {}
    for key, (values, stacker) in stackers.items():
        rows = OutOfFold(oof.folds, oof.labels, oof.patients, oof.logits, values)
        fitted = cross_fit(rows, stacker, select_fraction=SELECT_FRACTION, seed=settings.seed)
        probabilities[key], rows_used[key] = fitted.prob_malignant, {"fit": fitted.fit_rows,
                                                                     "select": fitted.select_rows}
    return probabilities, rows_used


def cross_fitted_cam_method_probabilities(oof: OutOfFoldSet, gradcam_probabilities: np.ndarray,
                                          settings: MlpSettings, device: torch.device) -> dict[str, np.ndarray]:
    """The heatmap MLP cross-fitted on each map type the run holds, exactly as the table's Grad-CAM row (whose
    probabilities are reused): same outer folds, select patients, seed and settings, so only the maps differ."""
    probabilities = {"gradcam": gradcam_probabilities}
    for method in oof.cams_by_method:
        if method == "gradcam":
            continue
        features = feature_sets(oof, settings.grid_size, method)["heatmaps"]
        rows = OutOfFold(oof.folds, oof.labels, oof.patients, oof.logits, features)
        stacker = mlp_stacker(settings, device, f"cross-fitted MLP on {CAM_DISPLAY_NAMES[method]} maps")
        probabilities[method] = cross_fit(rows, stacker, select_fraction=SELECT_FRACTION,
                                          seed=settings.seed).prob_malignant
    return probabilities


def final_classifier(oof: OutOfFoldSet, features: np.ndarray, settings: MlpSettings, device: torch.device) -> dict:
    """The heatmap MLP fitted on every out-of-fold row (epoch picked on SELECT_FRACTION of the patients): what
    predict.py applies to the fold models' bagged maps of a new image. Same format as cancer_class_further.py's."""
    side_of = assign_groups(majority_labels(oof.patients, oof.labels),
                            {"fit": 1 - SELECT_FRACTION, "select": SELECT_FRACTION}, settings.seed)
    sides = np.array([side_of[patient] for patient in oof.patients])
    fit_rows, select_rows = np.flatnonzero(sides == "fit"), np.flatnonzero(sides == "select")
    mlp, standardizer, history = fit_mlp(features, oof.labels, oof.patients, fit_rows, select_rows, settings,
                                         device, "final MLP on all out-of-fold heatmaps")
    return {"format_version": CLASSIFIER_FORMAT_VERSION, "kind": "heatmap_mlp", "features": "heatmaps",
            "model": {key: value.detach().cpu() for key, value in mlp.state_dict().items()},
            "input_shape": [len(MODEL_ORDER), settings.grid_size, settings.grid_size],
            "in_features": features.shape[1], "model_order": list(MODEL_ORDER), "grid_size": settings.grid_size,
            "hidden_sizes": list(settings.hidden_sizes), "dropout": settings.dropout,
            "feature_mean": torch.from_numpy(standardizer.mean), "feature_std": torch.from_numpy(standardizer.std),
            "fit_split": "out-of-fold rows of every fold", "n_folds": int(oof.protocol["n_folds"]),
            "best_epoch": max(row["epoch"] for row in history if row.get("best_so_far")),
            "class_names": list(CLASS_NAMES), "folds_digest": oof.digest, "target_class_rule": oof.target_class_rule,
            # Plain str: a numpy str_ in the file would make torch.load(weights_only=True) refuse it.
            "checkpoint_sha256": {arch: sorted(map(str, set(oof.checkpoint_sha256[arch]))) for arch in MODEL_ORDER},
            "config": {"grid_size": settings.grid_size, "seed": settings.seed, "epochs": settings.epochs}}


# ------------------------------------------------------------------------------------------ statistics


def row_entries(evaluated: dict) -> dict:
    """evaluate_row's dict as the table's: level -> metric -> {folds, mean, sd, pooled, ci95}."""
    entries = {}
    for level, metrics in (("image", IMAGE_METRICS), ("patient", PATIENT_METRICS)):
        pooled = evaluated["pooled"][level] if level == "image" else evaluated["pooled"][level]["all"]
        per_fold = [fold[level] for fold in evaluated["per_fold"]]
        mean, sd = mean_and_sd_over_folds(per_fold, metrics)
        entries[level] = {}
        for metric in metrics:
            interval = evaluated["interval"][level].get(metric)
            entries[level][metric] = {"folds": [fold.get(metric) for fold in per_fold], "mean": mean[metric],
                                      "sd": sd[metric], "pooled": pooled.get(metric),
                                      "ci95": None if interval is None else [interval["low"], interval["high"]]}
    entries["patient_by_magnification"] = evaluated["pooled"]["patient"].get("by_magnification", {})
    return entries


def paired_differences(bootstrap: PatientBootstrap, probabilities: dict[str, np.ndarray], best_cnn: str) -> list:
    """The heatmap MLP minus the soft vote and minus the best single CNN, AUC and balanced accuracy, paired."""
    differences = []
    for other in ("soft_vote", best_cnn):
        by_level = bootstrap.difference(probabilities[FINAL_ROW], probabilities[other])
        for level in LEVELS:
            for metric, interval in by_level[level].items():
                differences.append({
                    "a": FINAL_ROW, "b": other, "level": level, "metric": metric, "estimate": interval.estimate,
                    "ci95": [interval.low, interval.high], "resamples": interval.resamples,
                    "sentence": describe_difference(CV_ROW_NAMES[FINAL_ROW], CV_ROW_NAMES[other], metric, interval,
                                                    level=level)})
    return differences


def describe_cv_protocol(oof: OutOfFoldSet, resamples: int, seed: int) -> str:
    """The exact protocol, written into every table."""
    protocol = oof.protocol
    folds = (f"the test sides of {protocol['n_folds']} fold files as the folds"
             if protocol["method"] == "fold_files" else
             f"patient-level {protocol['n_folds']}-fold cross-validation (stratified by {protocol['stratified_by']})")
    where = "all magnifications" if protocol.get("magnification", "all") == "all" else f"{protocol['magnification']}X"
    return (f"{folds}, seed {protocol['seed']}, {len(oof.paths)} images of {len(set(oof.patients))} patients, "
            f"{where}. Each CNN row: out-of-fold predictions (every image scored once, by the fold model that never "
            f"saw its patient; val patients carved from the other folds). Soft vote: their mean. Stackers "
            f"(logistic regression, MLPs): cross-fitted: for outer fold k, fitted on the out-of-fold rows of the "
            f"other folds' patients only ({round(SELECT_FRACTION * 100)} % of those patients held out to pick the "
            f"epoch or C), then predict fold k. 95 % CI: patient bootstrap (stratified by class), {resamples:,} "
            f"resamples, seed {seed}. Patient level: one diagnosis per patient, the mean P(malignant) of its images.")


def format_cell(entry: dict, *, interval: bool, plus_minus: str = "±") -> str:
    """'0.912 [0.85, 0.96]' (pooled with its CI) or '0.90 ± 0.04' (mean ± sd over folds); n/a when undefined.
    plus_minus: the sign as the target writes it (the report's HTML: '&plusmn;')."""
    if interval:
        if entry["pooled"] is None:
            return "n/a"
        ci = entry["ci95"]
        shown = "" if ci is None or ci[0] is None or np.isnan(ci[0]) else f" [{ci[0]:.2f}, {ci[1]:.2f}]"
        return f"{entry['pooled']:.3f}{shown}"
    if entry["mean"] is None:
        return "n/a"
    return f"{entry['mean']:.3f}" + ("" if entry["sd"] is None else f" {plus_minus} {entry['sd']:.3f}")


# The Markdown tables' columns per level: (header, metric, pooled with its CI (True) or mean ± sd over folds).
MARKDOWN_COLUMNS = {
    "image": (("AUC pooled", "roc_auc", True), ("AUC folds", "roc_auc", False),
              ("BalAcc pooled", "balanced_accuracy", True), ("BalAcc folds", "balanced_accuracy", False),
              ("Sens pooled", "sensitivity", True), ("Spec pooled", "specificity", True), ("F1 pooled", "f1", True),
              ("PatRR pooled", "patient_recognition_rate", True)),
    "patient": (("AUC pooled", "roc_auc", True), ("AUC folds", "roc_auc", False),
                ("BalAcc pooled", "balanced_accuracy", True), ("Acc pooled", "accuracy", True),
                ("Sens pooled", "sensitivity", True), ("Spec pooled", "specificity", True)),
}


def _markdown_table(results: dict, level: str) -> list[str]:
    columns = MARKDOWN_COLUMNS[level]
    lines = ["| model | " + " | ".join(header for header, _, _ in columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for key, row in results["rows"].items():
        cells = [format_cell(row[level][metric], interval=interval) for _, metric, interval in columns]
        lines.append(f"| {CV_ROW_NAMES[key]} | " + " | ".join(cells) + " |")
    return lines


def results_markdown(results: dict) -> str:
    """cv_results.md: the sentences on the differences first, then the image- and patient-level tables."""
    lines = [f"# Cross-validated comparison ({results['n_folds']} folds)", ""]
    lines += [f"- {difference['sentence']}" for difference in results["differences"] if difference["level"] == "image"]
    lines += ["", f"Best single CNN: {CV_ROW_NAMES[results['best_cnn']]}, chosen by pooled out-of-fold AUC on these "
              "same images (choosing the best on the data it is compared on favours it).", "",
              f"Protocol: {results['protocol']}", "",
              "Pooled: all out-of-fold predictions together, with the 95 % CI in brackets; folds: mean ± sd over the "
              "folds.", "", "## Image level", ""]
    lines += _markdown_table(results, "image")
    lines += ["", f"## Patient level ({results['patients']} patients, mean P(malignant) over each patient's images)",
              ""]
    lines += _markdown_table(results, "patient")
    lines += ["", "## Paired differences (heatmap MLP minus the other row; same resampled patients)", ""]
    lines += [f"- {difference['sentence']}" for difference in results["differences"]
              if difference["level"] == "patient"]
    if "cam_method_comparison" in results:  # absent in files of earlier versions
        lines += ["", comparison_markdown(results["cam_method_comparison"]).rstrip("\n")]
    return "\n".join(lines) + "\n"


def oof_csv(oof: OutOfFoldSet, probabilities: dict[str, np.ndarray], cam_probabilities: dict[str, np.ndarray]) -> str:
    """oof_predictions.csv: one row per image, its fold (1-based), the checkpoints that scored it, each row's P,
    then the heatmap MLP's P on each map type (prob_mlp_gradcam equals prob_mlp_heatmaps)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "patient", "label", "magnification", "fold",
                     *(f"checkpoint_sha256_{arch}" for arch in MODEL_ORDER),
                     *(probability_key(key) for key in CV_ROW_NAMES),
                     *(cam_probability_key(method) for method in cam_probabilities)])
    for index in range(len(oof.paths)):
        writer.writerow([oof.paths[index], oof.patients[index], CLASS_NAMES[oof.labels[index]],
                         oof.magnifications[index], int(oof.folds[index]) + 1,
                         *(oof.checkpoint_sha256[arch][index] for arch in MODEL_ORDER),
                         *(f"{probabilities[key][index]:.6f}" for key in CV_ROW_NAMES),
                         *(f"{values[index]:.6f}" for values in cam_probabilities.values())])
    return buffer.getvalue()


def write_cv_files(output_dir: Path, results: dict, oof: OutOfFoldSet, probabilities: dict,
                   cam_probabilities: dict, classifier: dict) -> None:
    """All or nothing (common.core.fileio.written_together); cv_results.json last, with the others' SHA-256."""
    names = [FINAL_CLASSIFIER, OOF_PREDICTIONS, CV_RESULTS_MD, CV_RESULTS_JSON]
    with written_together([output_dir / name for name in names]) as temp_paths:
        temp_of = dict(zip(names, temp_paths))
        save_torch(classifier, temp_of[FINAL_CLASSIFIER])
        write_text(temp_of[OOF_PREDICTIONS], oof_csv(oof, probabilities, cam_probabilities))
        write_text(temp_of[CV_RESULTS_MD], results_markdown(results))
        outputs = {name: sha256_of_file(temp_of[name]) for name in names if name != CV_RESULTS_JSON}
        write_json(temp_of[CV_RESULTS_JSON], {**results, "outputs": outputs})


def aggregate(output_dir: Path, *, settings: MlpSettings, resamples: int, device: torch.device) -> dict:
    """The out-of-fold set, every row of the table, the statistics and the files; returns cv_results.json's dict."""
    oof = load_out_of_fold(output_dir)
    features = feature_sets(oof, settings.grid_size)
    probabilities, rows_used = cross_fitted_probabilities(oof, features, settings, device)
    cam_probabilities = cross_fitted_cam_method_probabilities(oof, probabilities[FINAL_ROW], settings, device)
    bootstrap = PatientBootstrap.draw(labels=oof.labels, patients=oof.patients, resamples=resamples,
                                      seed=settings.seed)
    rows = {key: row_entries(evaluate_row(probabilities[key], labels=oof.labels, patients=oof.patients,
                                          folds=oof.folds, bootstrap=bootstrap, magnifications=oof.magnifications))
            for key in CV_ROW_NAMES}
    # Ties go to the earlier model in MODEL_ORDER; an undefined AUC never wins.
    best_cnn = max(MODEL_ORDER, key=lambda arch: (rows[arch]["image"]["roc_auc"]["pooled"] or -1.0,
                                                 -MODEL_ORDER.index(arch)))
    results = {
        "protocol": describe_cv_protocol(oof, resamples, settings.seed), "folds_protocol": oof.protocol,
        "folds_digest": oof.digest, "n_folds": int(oof.protocol["n_folds"]), "images": len(oof.paths),
        "patients": len(set(oof.patients)), "display_names": CV_ROW_NAMES, "final_row": FINAL_ROW,
        "best_cnn": best_cnn, "best_cnn_rule": "highest pooled out-of-fold image-level AUC (on the same images)",
        "rows": rows, "differences": paired_differences(bootstrap, probabilities, best_cnn),
        "bootstrap": {"resamples": resamples, "seed": settings.seed, "unit": "patient", "stratified": True},
        "stacker_rows": {key: {side: {str(fold + 1): len(found) for fold, found in by_fold.items()}
                               for side, by_fold in used.items()} for key, used in rows_used.items()},
        "mlp_settings": {**vars(settings), "hidden_sizes": list(settings.hidden_sizes)},
        "checkpoints": {arch: sorted(map(str, set(oof.checkpoint_sha256[arch]))) for arch in MODEL_ORDER},
        "cam_method_comparison": compare_cam_methods(
            cam_probabilities, labels=oof.labels, patients=oof.patients, bootstrap=bootstrap, final_method="gradcam",
            missing=tuple(method for method in CAM_METHODS if method not in cam_probabilities),
            protocol="Out-of-fold rows of the cross-validation above; each map type's MLP cross-fitted exactly as "
                     "the table's MLP on heatmaps (same folds, select patients, seed and settings); "
                     "final_classifier.pth reads Grad-CAM maps."),
    }
    classifier = final_classifier(oof, features["heatmaps"], settings, device)
    write_cv_files(output_dir, results, oof, probabilities, cam_probabilities, classifier)
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--output-dir", required=True, help="the K-fold run's folder (holding folds.json)")
    parser.add_argument("--resamples", type=int, default=2000, help="patient-bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0, help="seeds the stackers' select patients, the MLPs and "
                                                            "the bootstrap")
    parser.add_argument("--epochs", type=int, default=MlpSettings.epochs, help="MLP training epochs")
    parser.add_argument("--grid-size", type=int, default=MlpSettings.grid_size, help="maps resized to S x S")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto")
    args = parser.parse_args(argv)
    if min(args.resamples, args.epochs, args.grid_size) < 1:
        parser.error("--resamples, --epochs and --grid-size must be at least 1")
    output_dir = Path(args.output_dir)
    if not (output_dir / FOLDS_FILE_NAME).is_file():
        raise PipelineError(f"{output_dir / FOLDS_FILE_NAME} is missing: --output-dir must be a K-fold run's folder "
                            "(run the model scripts or run_pipeline.py with --folds K)")
    remove_stale_temporaries(output_dir)
    settings = MlpSettings(grid_size=args.grid_size, epochs=args.epochs, seed=args.seed)
    results = aggregate(output_dir, settings=settings, resamples=args.resamples, device=pick_device(args.device))
    print(results_markdown(results))
    print(f"wrote {', '.join(str(output_dir / name) for name in (CV_RESULTS_JSON, CV_RESULTS_MD, OOF_PREDICTIONS))} "
          f"and {output_dir / FINAL_CLASSIFIER} (the heatmap MLP fitted on every out-of-fold row, for predict.py)")


if __name__ == "__main__":
    run_main(main)
