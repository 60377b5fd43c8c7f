"""The final stage of a K-fold run (cancer_class_further.py --output-dir RUN): the out-of-fold set, the
cross-fitted stackers, the statistics, and the final classifier for new images.

Out-of-fold set (common.run.Run.held_out): for each fold k, the rows of fold_<k>/heatmaps_<arch>.npz whose split is
'test' (fold k's patients), made by fold k's models, which never saw those patients; together every image of
folds.json exactly once, each row with its fold and the checkpoint that made it.

Rows of the table, all on the same images: each CNN; the soft vote (no fitting); logistic regression on the three
CNNs' logits; the MLP on the heatmaps (the design's final classifier); the MLP on heatmaps + logits. Every fitted
row is cross-fitted (common.fusion.stacking.cross_fit): for outer fold k it is fitted on the out-of-fold rows of the
other folds' patients only (standardiser on its fit rows, epoch or C picked on a patient subset of them) and
predicts fold k.

Statistics (common.evaluation.stats): per row, per-fold metrics (mean ± sd), pooled out-of-fold metrics with a
patient-bootstrap 95 % interval, image and patient level (patient diagnosis: mean P(malignant) over its images);
paired differences of the heatmap MLP with the soft vote and with the best single CNN.

Which maps make the best final classifier (common.evaluation.map_comparison): the heatmap MLP cross-fitted the same
way on each map type the folds' heatmap files hold (Grad-CAM, Grad-CAM++, LayerCAM), with intervals and paired
differences against Grad-CAM on the same resampled patients.

Writes into the run folder (all or nothing; cv_results.json last, with the SHA-256 of the others):
    cv_results.json, cv_results.md, oof_predictions.csv,
    final_classifier.pth   the heatmap MLP fitted on ALL out-of-fold rows (what new images go through)
"""

import csv
import io
from pathlib import Path

import numpy as np
import torch

from common.cams.methods import CAM_DISPLAY_NAMES, CAM_METHODS
from common.core.errors import PipelineError
from common.core.fileio import save_torch, sha256_of_file, write_json, write_text, written_together
from common.core.runfiles import (
    CV_RESULTS_JSON,
    CV_RESULTS_MD,
    FINAL_CLASSIFIER,
    OOF_PREDICTIONS,
    probability_key,
    scaled_probability_key,
)
from common.data.partition import assign_groups
from common.data.records import CLASS_NAMES, majority_labels
from common.evaluation.map_comparison import (
    cam_probability_key,
    compare_cam_methods,
    comparison_markdown,
    interval_entry,
)
from common.evaluation.metrics import softmax
from common.evaluation.stats import (
    LEVELS,
    TOO_FEW_PATIENTS,
    PatientBootstrap,
    describe_difference,
    evaluate_row,
    mean_and_sd_over_folds,
)
from common.evaluation.uncertainty import HeldOutPlan, evaluate_uncertainty, uncertainty_markdown
from common.fusion.features import ROW_NAMES, build_features, stack_maps
from common.fusion.mlp import MlpSettings, classifier_file, fit_mlp, uncertainty_fields
from common.fusion.stacking import OutOfFold, cross_fit, logistic_regression_stacker, mlp_stacker, soft_vote
from common.models.registry import MODEL_ORDER
from common.run import HeldOut, Run
from common.stages.single_split import FinalStageOptions

CV_ROW_NAMES = {**{key: ROW_NAMES[key] for key in (*MODEL_ORDER, "soft_vote")},
                "logistic_regression": "Logistic regression on logits",
                "mlp_heatmaps": ROW_NAMES["mlp_heatmaps"], "mlp_heatmaps+logits": ROW_NAMES["mlp_heatmaps+logits"]}
IMAGE_METRICS = ("roc_auc", "balanced_accuracy", "accuracy", "sensitivity", "specificity", "f1",
                 "patient_recognition_rate")
PATIENT_METRICS = ("roc_auc", "balanced_accuracy", "accuracy", "sensitivity", "specificity")
SELECT_FRACTION = 0.2  # of the other folds' patients (per class), held out to pick a stacker's epoch or C


# ------------------------------------------------------------------------------------------ the stackers


def feature_sets(held: HeldOut, grid_size: int, cam_method: str = "gradcam") -> dict[str, np.ndarray]:
    maps = stack_maps(held.maps[cam_method], grid_size)  # (N, 3, S, S)
    return {"heatmaps": build_features(maps, None), "heatmaps+logits": build_features(maps, held.logits)}


def cross_fitted_probabilities(held: HeldOut, features: dict[str, np.ndarray], settings: MlpSettings,
                               device: torch.device) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """P(malignant) of every row of the table, and each stacker's fit and select rows per outer fold."""
    probabilities = {arch: softmax(held.logits[arch].astype(np.float64))[:, 1] for arch in MODEL_ORDER}
    probabilities["soft_vote"] = soft_vote(held.logits)
    stackers = {"logistic_regression": (None, logistic_regression_stacker())}
    for feature_set, values in features.items():
        stackers[f"mlp_{feature_set}"] = (values, mlp_stacker(settings, device, f"cross-fitted MLP on {feature_set}"))
    rows_used = {}
    for key, (values, stacker) in stackers.items():
        rows = OutOfFold(held.folds, held.labels, held.patients, held.logits, values)
        fitted = cross_fit(rows, stacker, select_fraction=SELECT_FRACTION, seed=settings.seed)
        probabilities[key], rows_used[key] = fitted.prob_malignant, {"fit": fitted.fit_rows,
                                                                     "select": fitted.select_rows}
    return probabilities, rows_used


def cross_fitted_cam_method_probabilities(held: HeldOut, options: FinalStageOptions, table_probabilities: np.ndarray,
                                          device: torch.device) -> dict[str, np.ndarray]:
    """The heatmap MLP cross-fitted on each map type the run holds, exactly as the table's row on --cam-method's
    maps (whose probabilities are reused): same outer folds, select patients, seed and settings, so only the maps
    differ."""
    settings = options.settings
    probabilities = {options.cam_method: table_probabilities}
    for method in held.maps:
        if method == options.cam_method:
            continue
        features = feature_sets(held, settings.grid_size, method)["heatmaps"]
        rows = OutOfFold(held.folds, held.labels, held.patients, held.logits, features)
        stacker = mlp_stacker(settings, device, f"cross-fitted MLP on {CAM_DISPLAY_NAMES[method]} maps")
        probabilities[method] = cross_fit(rows, stacker, select_fraction=SELECT_FRACTION,
                                          seed=settings.seed).prob_malignant
    return probabilities


def final_classifier(run: Run, held: HeldOut, features: np.ndarray, options: FinalStageOptions,
                     device: torch.device, uncertainty: dict) -> dict:
    """The heatmap MLP fitted on every out-of-fold row (epoch picked on SELECT_FRACTION of the patients): what
    predict.py and the viewer apply to the fold models' bagged maps of a new image. Its temperature and conformal
    scores (uncertainty) are those fitted on the cross-fitted MLP's out-of-fold rows: the refitted MLP is taken to
    score like the cross-fitted ones, the assumption behind reporting cross-validated figures for it."""
    side_of = assign_groups(majority_labels(held.patients, held.labels),
                            {"fit": 1 - SELECT_FRACTION, "select": SELECT_FRACTION}, options.settings.seed)
    sides = np.array([side_of[patient] for patient in held.patients])
    fit_rows, select_rows = np.flatnonzero(sides == "fit"), np.flatnonzero(sides == "select")
    mlp, standardizer, history = fit_mlp(features, held.labels, held.patients, fit_rows, select_rows,
                                         options.settings, device, f"final MLP on all out-of-fold {options.features}")
    return classifier_file(mlp, standardizer, run_kind="kfold", features=options.features,
                           cam_method=options.cam_method, settings=options.settings,
                           fit_rows="out-of-fold rows of every fold", history=history,
                           target_class_rule=held.target_class_rule, partition_digest=run.partition.digest,
                           checkpoint_sha256=held.checkpoint_sha256, heatmaps_sha256=held.heatmaps_sha256,
                           uncertainty=uncertainty)


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
                                      "ci95": None if interval is None or interval["note"]
                                      else [interval["low"], interval["high"]]}
            if interval is not None and interval["note"]:
                entries[level][metric]["ci95_note"] = interval["note"]
    entries["patient_by_magnification"] = evaluated["pooled"]["patient"].get("by_magnification", {})
    return entries


def paired_differences(bootstrap: PatientBootstrap, probabilities: dict[str, np.ndarray], final_row: str,
                       best_cnn: str) -> list:
    """The final classifier's row minus the soft vote and minus the best single CNN, AUC and balanced accuracy,
    paired."""
    differences = []
    for other in ("soft_vote", best_cnn):
        by_level = bootstrap.difference(probabilities[final_row], probabilities[other])
        for level in LEVELS:
            for metric, interval in by_level[level].items():
                differences.append({
                    "a": final_row, "b": other, "level": level, "metric": metric, "estimate": interval.estimate,
                    **interval_entry(interval), "resamples": interval.resamples,
                    "sentence": describe_difference(CV_ROW_NAMES[final_row], CV_ROW_NAMES[other], metric, interval,
                                                    level=level)})
    return differences


def describe_cv_protocol(run: Run, held: HeldOut, resamples: int, seed: int) -> str:
    """The exact protocol, written into every table."""
    protocol = run.partition.protocol
    folds = (f"the test sides of {protocol['n_folds']} fold files as the folds"
             if protocol["method"] == "fold_files" else
             f"patient-level {protocol['n_folds']}-fold cross-validation (stratified by {protocol['stratified_by']})")
    where = "all magnifications" if protocol.get("magnification", "all") == "all" else f"{protocol['magnification']}X"
    return (f"{folds}, seed {protocol['seed']}, {len(held.paths)} images of {len(set(held.patients))} patients, "
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
        if entry.get("ci95_note"):
            shown = f" ({TOO_FEW_PATIENTS})"
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
    if "calibration" in results:  # absent in files of earlier versions
        lines += ["", uncertainty_markdown(results["calibration"], CV_ROW_NAMES).rstrip("\n")]
    return "\n".join(lines) + "\n"


def oof_csv(held: HeldOut, probabilities: dict[str, np.ndarray], cam_probabilities: dict[str, np.ndarray],
            scaled: dict[str, np.ndarray]) -> str:
    """oof_predictions.csv: one row per image, its fold (1..K), the checkpoints that scored it, each row's P,
    then the heatmap MLP's P on each map type (prob_mlp_gradcam equals prob_mlp_heatmaps), then each row's
    temperature-scaled P (cross-fitted: prob_<row>_scaled). Every P is written
    with all its digits (repr): a metric recomputed from the file equals the table's (6 decimals turned near-tied
    probabilities into ties and moved an AUC by 0.004)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "patient", "label", "magnification", "fold",
                     *(f"checkpoint_sha256_{arch}" for arch in MODEL_ORDER),
                     *(probability_key(key) for key in CV_ROW_NAMES),
                     *(cam_probability_key(method) for method in cam_probabilities),
                     *(scaled_probability_key(key) for key in CV_ROW_NAMES)])
    for index in range(len(held.paths)):
        fold = int(held.folds[index])
        writer.writerow([held.paths[index], held.patients[index], CLASS_NAMES[held.labels[index]],
                         held.magnifications[index], fold,
                         *(held.checkpoint_sha256[arch][fold - 1] for arch in MODEL_ORDER),
                         *(repr(float(probabilities[key][index])) for key in CV_ROW_NAMES),
                         *(repr(float(values[index])) for values in cam_probabilities.values()),
                         *(repr(float(scaled[key][index])) for key in CV_ROW_NAMES)])
    return buffer.getvalue()


def write_cv_files(output_dir: Path, results: dict, held: HeldOut, probabilities: dict,
                   cam_probabilities: dict, scaled: dict, classifier: dict) -> None:
    """All or nothing (common.core.fileio.written_together); cv_results.json last, with the others' SHA-256."""
    names = [FINAL_CLASSIFIER, OOF_PREDICTIONS, CV_RESULTS_MD, CV_RESULTS_JSON]
    with written_together([output_dir / name for name in names]) as temp_paths:
        temp_of = dict(zip(names, temp_paths))
        save_torch(classifier, temp_of[FINAL_CLASSIFIER])
        write_text(temp_of[OOF_PREDICTIONS], oof_csv(held, probabilities, cam_probabilities, scaled))
        write_text(temp_of[CV_RESULTS_MD], results_markdown(results))
        outputs = {name: sha256_of_file(temp_of[name]) for name in names if name != CV_RESULTS_JSON}
        write_json(temp_of[CV_RESULTS_JSON], {**results, "outputs": outputs})


def run_cross_validation(run: Run, *, options: FinalStageOptions, device: torch.device) -> dict:
    """The out-of-fold set, every row of the table, the statistics and the files; returns cv_results.json's dict."""
    settings, resamples = options.settings, options.resamples
    final_row = f"mlp_{options.features}"  # the final classifier's row, compared with the soft vote and the best CNN
    held = run.held_out()
    if options.cam_method not in held.maps:
        raise PipelineError(f"--cam-method {options.cam_method}: some fold's heatmap files hold no such maps; "
                            "regenerate them with the model scripts' --heatmaps-only --cam-methods "
                            f"{','.join(CAM_METHODS)}")
    features = feature_sets(held, settings.grid_size, options.cam_method)
    probabilities, rows_used = cross_fitted_probabilities(held, features, settings, device)
    cam_probabilities = cross_fitted_cam_method_probabilities(held, options, probabilities["mlp_heatmaps"], device)
    bootstrap = PatientBootstrap.draw(labels=held.labels, patients=held.patients, resamples=resamples,
                                      seed=settings.seed)
    rows = {key: row_entries(evaluate_row(probabilities[key], labels=held.labels, patients=held.patients,
                                          folds=held.folds, bootstrap=bootstrap, magnifications=held.magnifications))
            for key in CV_ROW_NAMES}
    # Ties go to the earlier model in MODEL_ORDER; an undefined AUC never wins.
    best_cnn = max(MODEL_ORDER, key=lambda arch: (rows[arch]["image"]["roc_auc"]["pooled"] or -1.0,
                                                 -MODEL_ORDER.index(arch)))
    results = {
        "protocol": describe_cv_protocol(run, held, resamples, settings.seed), "folds_protocol": run.partition.protocol,
        "folds_digest": run.partition.digest, "n_folds": run.partition.n_folds, "images": len(held.paths),
        "patients": len(set(held.patients)), "display_names": CV_ROW_NAMES, "final_row": final_row,
        "best_cnn": best_cnn, "best_cnn_rule": "highest pooled out-of-fold image-level AUC (on the same images)",
        "rows": rows, "differences": paired_differences(bootstrap, probabilities, final_row, best_cnn),
        "bootstrap": {"resamples": resamples, "seed": settings.seed, "unit": "patient", "stratified": True},
        "stacker_rows": {key: {side: {str(fold): len(found) for fold, found in by_fold.items()}
                               for side, by_fold in used.items()} for key, used in rows_used.items()},
        "mlp_settings": {**vars(settings), "hidden_sizes": list(settings.hidden_sizes)},
        "checkpoints": held.checkpoint_sha256,
        "cam_method_comparison": compare_cam_methods(
            cam_probabilities, labels=held.labels, patients=held.patients, bootstrap=bootstrap,
            final_method=options.cam_method,
            missing=tuple(method for method in CAM_METHODS if method not in cam_probabilities),
            protocol="Out-of-fold rows of the cross-validation above; each map type's MLP cross-fitted exactly as "
                     "the table's MLP on heatmaps (same folds, select patients, seed and settings); "
                     f"final_classifier.pth reads {CAM_DISPLAY_NAMES[options.cam_method]} maps (--cam-method)."),
        "cam_method": options.cam_method, "final_features": options.features,
    }
    plan = HeldOutPlan.cross_fitted(held.folds)
    calibrated = evaluate_uncertainty({key: probabilities[key] for key in CV_ROW_NAMES}, labels=held.labels,
                                      patients=held.patients, magnifications=held.magnifications,
                                      plans=dict.fromkeys(CV_ROW_NAMES, plan), bootstrap=bootstrap, alpha=options.alpha)
    results["calibration"] = calibrated.section
    classifier = final_classifier(run, held, features[options.features], options, device,
                                  uncertainty_fields(calibrated.for_new_images, final_row, plan.description))
    write_cv_files(run.output_dir, results, held, probabilities, cam_probabilities, calibrated.scaled, classifier)
    return results
