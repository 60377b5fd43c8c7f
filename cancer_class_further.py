"""The final stage: an MLP on the three CNNs' combined Grad-CAM heatmaps, compared on the same test patients
with each CNN alone and with their soft vote.

    python cancer_class_further.py --output-dir runs/breakhis

Reads from --output-dir: split.json and heatmaps_{densenet121,resnet50,vgg16}.npz (written by the three
cancer_class_*.py scripts), and checks that each fine_tuned_<arch>.pth loads and is the checkpoint that made its
heatmap file. Writes (all or nothing; results.json last, with the SHA-256 of the others):
    final_classifier.pth                     the MLP on --features (default: the heatmaps, as the design asks)
    final_classifier_<other features>.pth    the other feature set's MLP, for the comparison
    results.json, results.md                 one table: each CNN, soft vote, both MLPs, on the test split; then
                                             the heatmap MLP on each stored map type (Grad-CAM, Grad-CAM++,
                                             LayerCAM), same rows and settings, with patient-bootstrap intervals
                                             and paired differences against Grad-CAM (common/evaluation/map_comparison.py)
    test_predictions.npz                     per test image: label, patient and every model's P(malignant)

The MLP learns from the rows of --fit-split and picks its best epoch on held-out rows; the test split is
used once, for the table. See the README for why the default fit split is what it is.
"""

import argparse
from pathlib import Path

import numpy as np
import torch

from common.cams.heatmap_file import stored_cam_methods, stored_cams
from common.cams.methods import CAM_DISPLAY_NAMES, CAM_METHODS
from common.core.console import HelpFormatter
from common.core.errors import PipelineError, run_main
from common.core.fileio import (
    remove_stale_temporaries,
    save_npz,
    save_torch,
    sha256_of_file,
    write_json,
    write_text,
    written_together,
)
from common.core.runfiles import (
    RESULTS_JSON,
    RESULTS_MD,
    TEST_PREDICTIONS,
    checkpoint_path,
    classifier_name,
    heatmap_path,
    probability_key,
)
from common.data.partition import assign_groups, describe_protocol
from common.data.records import CLASS_NAMES, majority_labels
from common.evaluation.map_comparison import cam_probability_key, compare_cam_methods, comparison_markdown
from common.evaluation.metrics import DECISION_THRESHOLD, binary_metrics, metrics_table, per_patient_rates, softmax
from common.fusion.features import FEATURE_SETS, ROW_NAMES, build_features, malignant_probabilities, stack_maps
from common.fusion.mlp import CLASSIFIER_FORMAT_VERSION, MlpSettings, fit_mlp, mlp_logits
from common.models.registry import MODEL_ORDER
from common.run import check_checkpoints, load_run_heatmaps
from common.training.runtime import pick_device


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--output-dir", default="runs/breakhis", help="the model scripts' output dir")
    parser.add_argument("--heatmaps", nargs=len(MODEL_ORDER), metavar=tuple(arch.upper() for arch in MODEL_ORDER),
                        help="heatmap files to use instead of the output dir's (default: its heatmaps_<arch>.npz)")
    parser.add_argument("--grid-size", type=int, default=14, help="maps are resized to S x S (VGG-16 gives 14x14 "
                                                                  "at 224 px, the other two 7x7)")
    parser.add_argument("--cam-method", choices=CAM_METHODS, default="gradcam",
                        help="which stored maps the MLP reads (the model scripts' --cam-methods must have made them)")
    parser.add_argument("--features", choices=FEATURE_SETS, default="heatmaps",
                        help="input of final_classifier.pth; the other set is trained too, for the table")
    parser.add_argument("--fit-split", choices=["train", "val"], default="train",
                        help="rows the MLP learns from; train: best epoch on val; val: best epoch on a "
                             "patient-level quarter of val held out from fitting (see the README)")
    parser.add_argument("--hidden-sizes", default="256,64", help="comma-separated dense layer widths")
    parser.add_argument("--dropout", type=float, default=0.3, help="dropout after each dense layer")
    parser.add_argument("--epochs", type=int, default=30, help="MLP training epochs")
    parser.add_argument("--batch-size", type=int, default=64, help="MLP batch size")
    parser.add_argument("--lr", type=float, default=1e-3, help="MLP learning rate")
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="decoupled weight decay (AdamW) or L2 (Adam)")
    parser.add_argument("--optimizer", choices=["adam", "adamw"], default="adamw", help="MLP optimizer")
    parser.add_argument("--seed", type=int, default=0, help="seeds the MLP's init and batch order, and "
                                                            "which val patients --fit-split val fits on")
    parser.add_argument("--resamples", type=int, default=2000,
                        help="patient-bootstrap resamples for the intervals of the map-type comparison")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                        help="auto: CUDA if present, else MPS, else the CPU")
    args = parser.parse_args(argv)
    try:
        args.hidden_sizes = [int(size) for size in args.hidden_sizes.split(",") if size.strip()]
    except ValueError:
        parser.error(f"--hidden-sizes {args.hidden_sizes!r}: expected comma-separated integers, e.g. 256,64")
    if min(args.grid_size, args.epochs, args.batch_size, args.resamples, *args.hidden_sizes) < 1 or args.lr <= 0 \
            or args.weight_decay < 0 or not 0 <= args.dropout < 1:
        parser.error("--grid-size, --epochs, --batch-size, --resamples, --hidden-sizes and --lr must be positive, "
                     "--weight-decay not negative, --dropout in [0, 1)")
    return args


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


def load_inputs(args: argparse.Namespace, output_dir: Path) -> tuple[dict, dict[str, Path], str]:
    """The three aligned heatmap files (checked against split.json), their paths, and the protocol line."""
    heatmap_files = dict(zip(MODEL_ORDER, map(Path, args.heatmaps))) if args.heatmaps else \
        {arch: heatmap_path(output_dir, arch) for arch in MODEL_ORDER}
    heatmaps, split = load_run_heatmaps(output_dir, heatmap_files)
    rows = len(heatmaps[MODEL_ORDER[0]]["paths"])
    subsampled = {"max_images": rows} if rows < len(split.records) else {}  # the model scripts ran --max-images
    return heatmaps, heatmap_files, describe_protocol({**split.protocol, **subsampled})


def stacked_maps(heatmaps: dict, method: str, inputs: dict, grid_size: int) -> np.ndarray:
    """(N, 3, S, S): the three models' stored maps of one CAM method on the MLP's grid."""
    return stack_maps({arch: stored_cams(heatmaps[arch], method, inputs[arch]["heatmaps"]) for arch in MODEL_ORDER},
                      grid_size)


def train_mlps(args, heatmaps: dict, inputs: dict, rows: dict,
               device: torch.device) -> tuple[dict[str, np.ndarray], dict, dict[str, dict]]:
    """One MLP per feature set; P(malignant) of every row, histories, and each classifier file's contents by file
    name (the chosen feature set's is final_classifier.pth)."""
    reference = heatmaps[MODEL_ORDER[0]]
    labels, patients = reference["labels"], reference["patients"]
    logits = {arch: heatmaps[arch]["logits"] for arch in MODEL_ORDER}
    maps = stacked_maps(heatmaps, args.cam_method, inputs, args.grid_size)
    settings = MlpSettings.from_args(args)
    probabilities, histories, classifiers = {}, {}, {}
    for feature_set in FEATURE_SETS:
        features = build_features(maps, logits if feature_set == "heatmaps+logits" else None)
        mlp, standardizer, histories[feature_set] = fit_mlp(features, labels, patients, rows["fit"], rows["select"],
                                                            settings, device, f"MLP on {feature_set}")
        probabilities[f"mlp_{feature_set}"] = softmax(mlp_logits(mlp, standardizer(features), device))[:, 1]
        classifiers[classifier_name(feature_set, args.features)] = {
            "format_version": CLASSIFIER_FORMAT_VERSION, "kind": "heatmap_mlp", "features": feature_set,
            "model": {key: value.detach().cpu() for key, value in mlp.state_dict().items()},
            "input_shape": [len(MODEL_ORDER), args.grid_size, args.grid_size], "in_features": features.shape[1],
            "model_order": list(MODEL_ORDER), "grid_size": args.grid_size, "hidden_sizes": args.hidden_sizes,
            "dropout": args.dropout, "feature_mean": torch.from_numpy(standardizer.mean),
            "feature_std": torch.from_numpy(standardizer.std), "fit_split": args.fit_split,
            "best_epoch": max(row["epoch"] for row in histories[feature_set] if row.get("best_so_far")),
            "target_class_rule": str(reference["target_class_rule"]), "cam_method": args.cam_method,
            "class_names": list(CLASS_NAMES),
            "split_digest": str(reference["split_digest"]), "sources": inputs,
            "config": dict(vars(args)),
        }
    return probabilities, histories, classifiers


def train_cam_method_mlps(args, heatmaps: dict, inputs: dict, rows: dict, device: torch.device,
                          final_probabilities: np.ndarray) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
    """P(malignant) of the heatmap MLP on each map type that all three heatmap files hold, every row: same fit and
    select rows, seed and settings as the MLP just trained on --cam-method's maps (whose probabilities are reused),
    so only the maps differ. Also returns the map types some file lacks."""
    available = [method for method in CAM_METHODS
                 if all(method in stored_cam_methods(heatmaps[arch]) for arch in MODEL_ORDER)]
    reference = heatmaps[MODEL_ORDER[0]]
    settings = MlpSettings.from_args(args)
    probabilities = {args.cam_method: final_probabilities}
    for method in available:
        if method == args.cam_method:
            continue
        features = build_features(stacked_maps(heatmaps, method, inputs, args.grid_size), None)
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


def write_comparison(args, output_dir: Path, reference: dict, probabilities: dict, histories: dict,
                     protocol: str, inputs: dict, classifiers: dict[str, dict], cam_probabilities: dict[str, np.ndarray],
                     missing_methods: tuple[str, ...]) -> str:
    """The one use of the test split: every model on the same test images, then the heatmap MLP on each map type;
    written with the classifiers. Returns the Markdown tables."""
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
        patients=patients[test_rows], final_method=args.cam_method, resamples=args.resamples, seed=args.seed,
        missing=missing_methods,
        protocol=f"Test split ({protocol}); each MLP fit on the {args.fit_split} split with the same rows, seed and "
                 f"settings; the map type of final_classifier.pth (--cam-method {args.cam_method}) was fixed before "
                 "the test split was scored.")
    results = {
        "split_protocol": protocol, "fit_split": args.fit_split, "final_features": args.features,
        "cam_method": args.cam_method,
        "test_images": len(test_rows), "test_patients": test_patients, "display_names": ROW_NAMES,
        "rows": rows, "per_patient": per_patient, "mlp_training": histories, "cam_method_comparison": cam_comparison,
        "sources": inputs}  # the report checks that the heatmap files it shows are still these
    markdown = (f"Test split, {len(test_rows)} images of {len(test_patients)} patients. "
                f"Split: {protocol}. MLP fit on: {args.fit_split}, {args.cam_method} maps.\n\n{table}\n\n"
                f"{comparison_markdown(cam_comparison)}")
    predictions = {"paths": reference["paths"][test_rows], "labels": labels[test_rows],
                   "patients": patients[test_rows], "magnifications": reference["magnifications"][test_rows],
                   **{probability_key(key): probabilities[key][test_rows].astype(np.float32) for key in ROW_NAMES},
                   **{cam_probability_key(method): values[test_rows].astype(np.float32)
                      for method, values in cam_probabilities.items()}}
    write_run_files(output_dir, classifiers, results, markdown, predictions)
    return (f"test split ({len(test_rows)} images, {len(test_patients)} patients; {protocol}):\n{table}\n\n"
            f"{comparison_markdown(cam_comparison)}")


def main(argv=None) -> None:
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    remove_stale_temporaries(output_dir)  # never another live run's (see the function)

    heatmaps, heatmap_files, protocol = load_inputs(args, output_dir)
    checkpoint_digests = check_checkpoints(output_dir, heatmap_files, heatmaps)  # each loads and made its maps
    reference = heatmaps[MODEL_ORDER[0]]
    fit_rows, select_rows = fit_and_selection_rows(reference["splits"], reference["labels"], reference["patients"],
                                                   args.fit_split, args.seed)
    print(f"split protocol: {protocol}")
    print(f"MLP fits on {len(fit_rows)} {args.fit_split} images, selects its epoch on {len(select_rows)}, "
          f"is tested on {int((reference['splits'] == 'test').sum())} test images")

    # Hashed once, before training: what the results are made from.
    inputs = sources(output_dir, heatmap_files, checkpoint_digests)
    probabilities = malignant_probabilities({arch: heatmaps[arch]["logits"] for arch in MODEL_ORDER})
    rows = {"fit": fit_rows, "select": select_rows}
    mlp_probabilities, histories, classifiers = train_mlps(args, heatmaps, inputs, rows, device)
    cam_probabilities, missing_methods = train_cam_method_mlps(args, heatmaps, inputs, rows, device,
                                                               mlp_probabilities["mlp_heatmaps"])
    table = write_comparison(args, output_dir, reference, {**probabilities, **mlp_probabilities}, histories, protocol,
                             inputs, classifiers, cam_probabilities, missing_methods)
    print(f"\n{table}")


if __name__ == "__main__":
    run_main(main)
