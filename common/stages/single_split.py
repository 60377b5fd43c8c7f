"""The final stage of a single-split run (cancer_class_further.py --output-dir RUN, and inside each fold_<k>/ of a
K-fold run): an MLP on the three CNNs' combined heatmaps, compared on the same test patients with each CNN alone
and with their soft vote.

Reads from the run folder: split.json and heatmaps_{densenet121,resnet50,vgg16}.npz (written by the three
cancer_class_*.py scripts), and checks that each fine_tuned_<arch>.pth loads and is the checkpoint that made its
heatmap file. Writes (all or nothing; results.json last, with the SHA-256 of the others):
    final_classifier.pth                     the MLP on --features (default: the heatmaps, as the design asks)
    final_classifier_<other features>.pth    the other feature set's MLP, for the comparison
    results.json, results.md                 one table: each CNN, soft vote, both MLPs, on the test split; then
                                             the heatmap MLP on each stored map type (Grad-CAM, Grad-CAM++,
                                             LayerCAM), same rows and settings, with patient-bootstrap intervals
                                             and paired differences against Grad-CAM (common.evaluation.map_comparison)
                                             calibration (Brier, log loss, ECE) before and after temperature
                                             scaling, and the conformal sets (common.evaluation.uncertainty)
    test_predictions.npz                     per test image: label, patient and every model's P(malignant), also
                                             temperature-scaled (prob_<row>_scaled), all float64

The MLP learns from the rows of --fit-split and picks its best epoch on held-out rows; the test split is used
once, for the table.
"""

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from common.cams.heatmap_file import stored_cam_methods, stored_cams
from common.cams.methods import CAM_DISPLAY_NAMES, CAM_METHODS
from common.core.errors import PipelineError
from common.core.fileio import save_npz, save_torch, sha256_of_file, write_json, write_text, written_together
from common.core.runfiles import (
    FINAL_CLASSIFIER,
    RESULTS_JSON,
    RESULTS_MD,
    TEST_PREDICTIONS,
    checkpoint_path,
    classifier_name,
    heatmap_path,
    probability_key,
    scaled_probability_key,
)
from common.data.partition import assign_groups, describe_protocol
from common.data.records import majority_labels
from common.evaluation.conformal import DEFAULT_ALPHA
from common.evaluation.map_comparison import cam_probability_key, compare_cam_methods, comparison_markdown
from common.evaluation.metrics import DECISION_THRESHOLD, binary_metrics, metrics_table, per_patient_rates, softmax
from common.evaluation.stats import PatientBootstrap
from common.evaluation.uncertainty import Calibrated, HeldOutPlan, evaluate_uncertainty, uncertainty_markdown
from common.fusion.features import FEATURE_SETS, ROW_NAMES, build_features, malignant_probabilities, stack_maps
from common.fusion.mlp import (
    CLASSIFIER_FORMAT_VERSION,
    MlpSettings,
    classifier_file,
    fit_mlp,
    mlp_logits,
    uncertainty_fields,
)
from common.models.registry import MODEL_ORDER
from common.run import Run


@dataclass(frozen=True)
class FinalStageOptions:
    """cancer_class_further.py's options: the MLP's settings and what the stage fits and reports."""

    settings: MlpSettings
    cam_method: str = "gradcam"  # the stored maps the MLP reads
    features: str = FEATURE_SETS[0]  # the input of final_classifier.pth
    fit_split: str = "train"  # single split: the rows the MLP learns from
    resamples: int = 2000  # patient-bootstrap resamples of the intervals
    heatmap_files: dict[str, Path] | None = None  # single split: heatmap files to use instead of the run's
    alpha: float = DEFAULT_ALPHA  # the conformal sets' error rate


def run_single_split(run: Run, options: FinalStageOptions, device: torch.device) -> str:
    """The stage on a single-split run (or one fold's folder); returns the tables it printed and wrote."""
    heatmaps, checkpoint_digests = run.fold_heatmaps(1, options.heatmap_files)
    heatmap_files = options.heatmap_files or {arch: heatmap_path(run.output_dir, arch) for arch in MODEL_ORDER}
    reference = heatmaps[MODEL_ORDER[0]]
    rows_held = len(reference["paths"])
    subsampled = {"max_images": rows_held} if rows_held < len(run.partition.records) else {}  # --max-images runs
    protocol = describe_protocol({**run.partition.protocol, **subsampled})
    fit_rows, select_rows = fit_and_selection_rows(reference["splits"], reference["labels"], reference["patients"],
                                                   options.fit_split, options.settings.seed)
    print(f"split protocol: {protocol}")
    print(f"MLP fits on {len(fit_rows)} {options.fit_split} images, selects its epoch on {len(select_rows)}, "
          f"is tested on {int((reference['splits'] == 'test').sum())} test images")
    inputs = sources(run.output_dir, heatmap_files, checkpoint_digests)  # hashed once: what the results are made of
    probabilities = malignant_probabilities({arch: heatmaps[arch]["logits"] for arch in MODEL_ORDER})
    rows = {"fit": fit_rows, "select": select_rows}
    mlp_probabilities, histories, make_classifiers = train_mlps(options, heatmaps, inputs, rows, device)
    cam_probabilities, missing_methods = train_cam_method_mlps(options, heatmaps, inputs, rows, device,
                                                               mlp_probabilities["mlp_heatmaps"])
    probabilities = {**probabilities, **mlp_probabilities}
    calibrated = calibrate(options, reference, probabilities, select_rows)
    classifiers = {name: make(uncertainty=uncertainty_fields(calibrated.for_new_images, f"mlp_{feature_set}",
                                                             calibrated.section["protocol"]))
                   for name, (feature_set, make) in make_classifiers.items()}
    return write_comparison(options, run.output_dir, reference, probabilities, histories, protocol, inputs,
                            classifiers, cam_probabilities, missing_methods, calibrated)


def calibrate(options: FinalStageOptions, reference: dict, probabilities: dict[str, np.ndarray],
              select_rows: np.ndarray) -> Calibrated:
    """Temperatures and conformal sets of every row, fitted on held-out patients: the val split's for the CNNs and
    the soft vote, the MLPs' own select rows (val patients they did not fit on) for the MLPs; evaluated on test."""
    splits, labels, patients = reference["splits"], reference["labels"], reference["patients"]
    val_rows, test_rows = np.flatnonzero(splits == "val"), np.flatnonzero(splits == "test")
    description = ("fitted on held-out patients (the val split; for each MLP the val rows it did not fit on), applied "
                   "to the test split and to new images")
    plans = {key: HeldOutPlan.held_out(select_rows if key.startswith("mlp_") else val_rows, test_rows, description)
             for key in ROW_NAMES}
    bootstrap = PatientBootstrap.draw(labels=labels[test_rows], patients=patients[test_rows],
                                      resamples=options.resamples, seed=options.settings.seed)
    return evaluate_uncertainty({key: probabilities[key] for key in ROW_NAMES}, labels=labels, patients=patients,
                                magnifications=reference["magnifications"], plans=plans, bootstrap=bootstrap,
                                alpha=options.alpha)


def results_current(run: Run) -> bool:
    """Whether the run's results.json was made from the heatmap files and checkpoints now beside it, by this version's
    final stage (a model retrained since, or a classifier file of an earlier format, makes it stale;
    cancer_class_further.py on a K-fold run then redoes that fold's stage)."""
    try:
        sources = run.results().get("sources", {})
        classifier = torch.load(run.output_dir / FINAL_CLASSIFIER, map_location="cpu", weights_only=True)
        return classifier.get("format_version") == CLASSIFIER_FORMAT_VERSION and all(
            sources.get(arch, {}).get("heatmaps_sha256") == sha256_of_file(heatmap_path(run.output_dir, arch))
            and sources.get(arch, {}).get("checkpoint_sha256") == sha256_of_file(checkpoint_path(run.output_dir, arch))
            for arch in MODEL_ORDER)
    except Exception:  # no results yet, a file gone or unreadable: not current, the stage remakes it
        return False


def fit_and_selection_rows(splits: np.ndarray, labels: np.ndarray, patients: np.ndarray, fit_split: str,
                           seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows the MLP fits on and rows that pick its epoch; never a test row."""
    if fit_split == "train":
        return np.flatnonzero(splits == "train"), np.flatnonzero(splits == "val")
    val_rows = np.flatnonzero(splits == "val")
    try:
        part_of = assign_groups(majority_labels(patients[val_rows], labels[val_rows]),
                                {"fit": 0.75, "select": 0.25}, seed)
    except PipelineError:
        raise PipelineError("--fit-split val needs at least 2 val patients per class (3 of 4 to fit on, 1 of 4 to "
                            "select the epoch); use --fit-split train or a larger --val-fraction") from None
    parts = np.array([part_of[patient] for patient in patients[val_rows]])
    return val_rows[parts == "fit"], val_rows[parts == "select"]


def sources(output_dir: Path, heatmap_files: dict[str, Path], checkpoint_digests: dict[str, str]) -> dict:
    """Which files the classifier was made from, with their hashes."""
    return {arch: {"heatmaps": str(heatmap_files[arch]), "heatmaps_sha256": sha256_of_file(heatmap_files[arch]),
                   "checkpoint": str(checkpoint_path(output_dir, arch)), "checkpoint_sha256": checkpoint_digests[arch]}
            for arch in MODEL_ORDER}


def stacked_maps(heatmaps: dict, method: str, inputs: dict, grid_size: int) -> np.ndarray:
    """(N, 3, S, S): the three models' stored maps of one CAM method on the MLP's grid."""
    return stack_maps({arch: stored_cams(heatmaps[arch], method, inputs[arch]["heatmaps"]) for arch in MODEL_ORDER},
                      grid_size)


def train_mlps(options: FinalStageOptions, heatmaps: dict, inputs: dict, rows: dict,
               device: torch.device) -> tuple[dict[str, np.ndarray], dict, dict[str, tuple]]:
    """One MLP per feature set; P(malignant) of every row, histories, and by file name (the chosen feature set's
    is final_classifier.pth) its feature set and a function of the uncertainty fields that makes its contents."""
    reference = heatmaps[MODEL_ORDER[0]]
    labels, patients = reference["labels"], reference["patients"]
    logits = {arch: heatmaps[arch]["logits"] for arch in MODEL_ORDER}
    maps = stacked_maps(heatmaps, options.cam_method, inputs, options.settings.grid_size)
    settings = options.settings
    probabilities, histories, classifiers = {}, {}, {}
    for feature_set in FEATURE_SETS:
        features = build_features(maps, logits if feature_set == "heatmaps+logits" else None)
        mlp, standardizer, histories[feature_set] = fit_mlp(features, labels, patients, rows["fit"], rows["select"],
                                                            settings, device, f"MLP on {feature_set}")
        probabilities[f"mlp_{feature_set}"] = softmax(mlp_logits(mlp, standardizer(features), device))[:, 1]
        classifiers[classifier_name(feature_set, options.features)] = feature_set, partial(
            classifier_file, mlp, standardizer, run_kind="single", features=feature_set, cam_method=options.cam_method,
            settings=settings, fit_rows=f"the {options.fit_split} split", history=histories[feature_set],
            target_class_rule=str(reference["target_class_rule"]), partition_digest=str(reference["split_digest"]),
            checkpoint_sha256={arch: [inputs[arch]["checkpoint_sha256"]] for arch in MODEL_ORDER},
            heatmaps_sha256={arch: [inputs[arch]["heatmaps_sha256"]] for arch in MODEL_ORDER})
    return probabilities, histories, classifiers


def train_cam_method_mlps(options: FinalStageOptions, heatmaps: dict, inputs: dict, rows: dict, device: torch.device,
                          final_probabilities: np.ndarray) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
    """P(malignant) of the heatmap MLP on each map type that all three heatmap files hold, every row: same fit and
    select rows, seed and settings as the MLP just trained on --cam-method's maps (whose probabilities are reused),
    so only the maps differ. Also returns the map types some file lacks."""
    available = [method for method in CAM_METHODS
                 if all(method in stored_cam_methods(heatmaps[arch]) for arch in MODEL_ORDER)]
    reference = heatmaps[MODEL_ORDER[0]]
    settings = options.settings
    probabilities = {options.cam_method: final_probabilities}
    for method in available:
        if method == options.cam_method:
            continue
        features = build_features(stacked_maps(heatmaps, method, inputs, settings.grid_size), None)
        mlp, standardizer, _ = fit_mlp(features, reference["labels"], reference["patients"], rows["fit"],
                                       rows["select"], settings, device, f"MLP on {CAM_DISPLAY_NAMES[method]} maps")
        probabilities[method] = softmax(mlp_logits(mlp, standardizer(features), device))[:, 1]
    return probabilities, tuple(method for method in CAM_METHODS if method not in available)


def write_run_files(output_dir: Path, classifiers: dict[str, dict], results: dict, markdown: str,
                    predictions: dict[str, np.ndarray]) -> None:
    """The classifiers, test predictions and tables of one run, written so that readers never pair a classifier
    with another run's results. All files are written to temporary names first, so a failure while writing (a full
    disk, an error, Ctrl-C) leaves the previous run's files untouched; then they are renamed, results.json last.
    A process killed between two renames leaves a mix, so results.json records the SHA-256 of each file written
    with it, and readers (predict.py, the report) refuse a file it does not list. Renaming all at once would need a
    swap of the whole folder, which would change the run's layout; a digest check costs milliseconds."""
    names = [*classifiers, TEST_PREDICTIONS, RESULTS_MD, RESULTS_JSON]
    with written_together([output_dir / name for name in names]) as temp_paths:
        temp_of = dict(zip(names, temp_paths))
        for name, classifier in classifiers.items():
            save_torch(classifier, temp_of[name])
        save_npz(temp_of[TEST_PREDICTIONS], **predictions)
        write_text(temp_of[RESULTS_MD], markdown)
        outputs = {name: sha256_of_file(temp_of[name]) for name in names if name != RESULTS_JSON}
        write_json(temp_of[RESULTS_JSON], {**results, "outputs": outputs})


def write_comparison(options: FinalStageOptions, output_dir: Path, reference: dict, probabilities: dict,
                     histories: dict, protocol: str, inputs: dict, classifiers: dict[str, dict],
                     cam_probabilities: dict[str, np.ndarray], missing_methods: tuple[str, ...],
                     calibrated: Calibrated) -> str:
    """The one use of the test split: every model on the same test images, then the heatmap MLP on each map type,
    then calibration and conformal sets; written with the classifiers. Returns the Markdown tables."""
    labels, patients = reference["labels"], reference["patients"]
    test_rows = np.flatnonzero(reference["splits"] == "test")
    test_patients = sorted(set(patients[test_rows]))
    rows = {key: binary_metrics(labels[test_rows], probabilities[key][test_rows], patients[test_rows],
                                reference["magnifications"][test_rows]) for key in ROW_NAMES}
    per_patient = {key: per_patient_rates(labels[test_rows],
                                          (probabilities[key][test_rows] >= DECISION_THRESHOLD).astype(int),
                                          patients[test_rows]) for key in ROW_NAMES}
    table = metrics_table({ROW_NAMES[key]: metrics for key, metrics in rows.items()})
    cam_comparison = compare_cam_methods(
        {method: values[test_rows] for method, values in cam_probabilities.items()}, labels=labels[test_rows],
        patients=patients[test_rows], final_method=options.cam_method, resamples=options.resamples,
        seed=options.settings.seed,
        missing=missing_methods,
        protocol=f"Test split ({protocol}); each MLP fit on the {options.fit_split} split with the same rows, seed and "
                 f"settings; the map type of final_classifier.pth (--cam-method {options.cam_method}) was fixed before "
                 "the test split was scored.")
    results = {
        "split_protocol": protocol, "fit_split": options.fit_split, "final_features": options.features,
        "final_row": f"mlp_{options.features}",
        "cam_method": options.cam_method,
        "test_images": len(test_rows), "test_patients": test_patients, "display_names": ROW_NAMES,
        "rows": rows, "per_patient": per_patient, "mlp_training": histories, "cam_method_comparison": cam_comparison,
        "calibration": calibrated.section,
        "sources": inputs}  # the report checks that the heatmap files it shows are still these
    markdown = (f"Test split, {len(test_rows)} images of {len(test_patients)} patients. "
                f"Split: {protocol}. MLP fit on: {options.fit_split}, {options.cam_method} maps.\n\n{table}\n\n"
                f"{comparison_markdown(cam_comparison)}\n{uncertainty_markdown(calibrated.section, ROW_NAMES)}")
    predictions = {"paths": reference["paths"][test_rows], "labels": labels[test_rows],
                   "patients": patients[test_rows], "magnifications": reference["magnifications"][test_rows],
                   **{probability_key(key): probabilities[key][test_rows].astype(np.float64) for key in ROW_NAMES},
                   **{cam_probability_key(method): values[test_rows].astype(np.float64)
                      for method, values in cam_probabilities.items()},
                   **{scaled_probability_key(key): calibrated.scaled[key][test_rows] for key in ROW_NAMES}}
    write_run_files(output_dir, classifiers, results, markdown, predictions)
    return (f"test split ({len(test_rows)} images, {len(test_patients)} patients; {protocol}):\n{table}\n\n"
            f"{comparison_markdown(cam_comparison)}")
