"""What each model script does, in order: config -> split -> cache -> fine-tune (common/training/loop.py) -> one
evaluation pass over every image that yields the heatmaps and the test metrics.

    run_model_script(arch=..., description=__doc__, **script_defaults)   # the whole of cancer_class_<arch>.py
"""

import argparse
import copy
from pathlib import Path

from common.cams.heatmap_file import export_heatmaps
from common.cams.methods import parse_cam_methods
from common.core.errors import Interrupted, PipelineError
from common.core.fileio import remove_stale_temporaries, sha256_of_file, write_json
from common.core.runfiles import (
    CACHE_DIR,
    checkpoint_path,
    fold_dir,
    heatmap_path,
    metrics_path,
    overlay_dir,
    state_path,
)
from common.data.images import build_cache
from common.data.partition import (
    FOLDS_FILE_NAME,
    SPLIT_FILE_NAME,
    Split,
    describe_protocol,
    fold_split,
    load_split,
    prepare_folds,
    prepare_split,
    save_split,
    subsample_split,
    summarize_split,
)
from common.data.records import filter_magnification, group_patients, index_dataset
from common.evaluation.metrics import binary_metrics, metrics_table, softmax
from common.models.checkpoints import SELECTION_METRIC, load_checkpoint, model_from_checkpoint
from common.models.registry import build_model
from common.training.config import fold_protocol, n_folds_of, parse_args, split_protocol
from common.training.loop import fit
from common.training.runtime import Runtime, seed_everything, setup_runtime


def export_and_report(args: argparse.Namespace, split: Split, runtime: Runtime, cache) -> dict:
    """Reload the best checkpoint; one pass over every split yields the heatmaps and the test metrics."""
    output_dir = Path(args.output_dir)
    checkpoint_file = checkpoint_path(output_dir, args.arch)
    checkpoint = load_checkpoint(checkpoint_file, args.arch)
    if checkpoint["split_digest"] != split.digest:
        raise PipelineError(f"{checkpoint_file} was trained on another split than "
                            f"{output_dir / SPLIT_FILE_NAME}; retrain it in this output dir")
    model = model_from_checkpoint(checkpoint)
    # The background writer has finished (fit waits for it), so this is the file the model was just loaded from.
    arrays = export_heatmaps(model, args.arch, split, heatmap_path(output_dir, args.arch),
                             image_size=checkpoint["image_size"], batch_size=args.batch_size, workers=args.workers,
                             device=runtime.device, cache=cache, target_rule=args.cam_target,
                             checkpoint_sha256=sha256_of_file(checkpoint_file),
                             overlay_dir=overlay_dir(output_dir, args.arch), overlay_count=args.overlays,
                             cam_methods=parse_cam_methods(args.cam_methods))
    probabilities = softmax(arrays["logits"])[:, 1]
    results = {"arch": args.arch, "split_protocol": describe_protocol(split.protocol),
               "checkpoint_epoch": checkpoint["epoch"], "selection_metric": SELECTION_METRIC}
    for split_name in ("val", "test"):
        rows = arrays["splits"] == split_name
        results[split_name] = binary_metrics(arrays["labels"][rows], probabilities[rows], arrays["patients"][rows],
                                             arrays["magnifications"][rows])
    write_json(metrics_path(output_dir, args.arch), results)
    return results


def print_results(results: dict) -> None:
    print(f"\n{results['arch']}: best epoch {results['checkpoint_epoch']} by {results['selection_metric']}")
    print(f"split protocol: {results['split_protocol']}")
    print(metrics_table({f"{results['arch']} {name}": results[name] for name in ("val", "test")}, title="split"))
    test = results["test"]
    tn, fp = test["confusion_matrix"][0]
    fn, tp = test["confusion_matrix"][1]
    print(f"test confusion matrix (rows true, columns predicted): benign [{tn} {fp}]  malignant [{fn} {tp}]")
    for magnification, accuracy in test.get("accuracy_by_magnification", {}).items():
        print(f"test accuracy at {magnification}X: {accuracy:.3f}")


def run_model_script(*, arch: str, description: str, argv: list[str] | None = None, **defaults) -> None:
    """Everything a model script does: split, fine-tune, export heatmaps, report the test split once; in a K-fold
    run (--folds K), that for each fold asked for, in its own fold_<k>/ folder (common/training/model_script.py)."""
    args = parse_args(arch=arch, description=description, argv=argv, **defaults)
    runtime = setup_runtime(args.device, amp=args.amp)
    try:
        for run_args in fold_runs(args):
            args = run_args  # the Ctrl-C message below names the fold that was running
            run_one_split(args, runtime)
    except KeyboardInterrupt:
        raise Interrupted(interrupted_message(args)) from None
    finally:
        runtime.close()


def run_one_split(args: argparse.Namespace, runtime: Runtime) -> None:
    """Split, fine-tune, export and report in args.output_dir (a single split, or one fold's folder)."""
    seed_everything(args.seed)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if runtime.is_main:
        remove_stale_temporaries(output_dir)  # never another live run's (see the function)
    # The first script to run writes the split; the others (and the other ranks) read it.
    split = runtime.main_rank_first(lambda: prepare_fold_split(args) if getattr(args, "cv_dir", None)
                                    else prepare_split(args.data_dir, output_dir, split_protocol(args)))
    if args.max_images:
        if args.max_images >= len(split.records) and runtime.is_main:
            print(f"note: --max-images {args.max_images} is not below the dataset's {len(split.records)} "
                  "images: all of them are used")
        split = subsample_split(split, args.max_images, args.seed)
    if runtime.is_main:
        print(f"split protocol: {describe_protocol(split.protocol)}\n{summarize_split(split)}")
    if args.heatmaps_only:  # the maps must be made at the size the checkpoint was trained at
        args.image_size = load_checkpoint(checkpoint_path(output_dir, args.arch), args.arch)["image_size"]
    cache = prepare_cache(args, split, runtime)
    if not args.heatmaps_only:
        # Rank 0 first: an ImageNet download happens once, the other ranks read torchvision's cached file.
        model = runtime.main_rank_first(lambda: build_model(args.arch, args.weights, split_digest=split.digest))
        fit(model, args, split, runtime, cache)
    if runtime.is_main:
        print_results(export_and_report(args, split, runtime, cache))
    runtime.barrier()


def interrupted_message(args: argparse.Namespace) -> str:
    """After a Ctrl-C: what the run leaves behind and how to go on."""
    output_dir = Path(args.output_dir)
    if args.heatmaps_only:
        return f"{checkpoint_path(output_dir, args.arch)} is unchanged; rerun the same command to export the heatmaps"
    state = state_path(output_dir, args.arch)
    if state.is_file():  # written after every completed epoch (on Ctrl-C the write in flight finishes first)
        return f"{state} holds the last completed epoch; rerun with --resume to continue from it"
    return f"no {args.arch} epoch was completed, so there is nothing to resume; rerun the same command"


def prepare_cache(args: argparse.Namespace, split: Split, runtime: Runtime):
    """The decoded-image cache, or None for the plain path."""
    if args.cache == "none":
        return None
    return runtime.main_rank_first(lambda: build_cache(
        split.root, split.records, image_size=args.image_size, mode=args.cache,
        cache_dir=cache_dir_of(args), workers=args.workers))


def fold_runs(args: argparse.Namespace) -> list[argparse.Namespace]:
    """One set of options per run: [args] for a single split; per fold, a copy whose output_dir is fold_<k>/
    (cv_dir: the K-fold run's folder, where folds.json and the shared cache live)."""
    n_folds = n_folds_of(args)
    if n_folds is None:
        return [args]
    runs = []
    for fold in [args.fold] if args.fold is not None else range(1, n_folds + 1):
        run = copy.copy(args)
        run.cv_dir, run.fold, run.folds = str(args.output_dir), fold, n_folds
        run.output_dir = str(fold_dir(args.output_dir, fold))
        runs.append(run)
    return runs


def prepare_fold_split(args: argparse.Namespace) -> Split:
    """Fold args.fold's split: folds.json made (first run) or checked, then fold_<k>/split.json written or checked."""
    dataset = index_dataset(args.data_dir)
    records = group_patients(filter_magnification(dataset.records, args.magnification), args.patient_id)
    protocol = fold_protocol(args)
    folds = prepare_folds(records, Path(args.cv_dir) / FOLDS_FILE_NAME, protocol)
    split = fold_split(folds, args.fold, dataset.root, protocol)
    split_path = Path(args.output_dir) / SPLIT_FILE_NAME
    if not split_path.exists():
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        save_split(split_path, split)
        return split
    if load_split(split_path).digest != split.digest:
        raise PipelineError(f"{split_path} does not match {Path(args.cv_dir) / FOLDS_FILE_NAME} (made by other "
                            f"folds); delete {args.output_dir} to rerun fold {args.fold}, or use another --output-dir")
    return split


def cache_dir_of(args: argparse.Namespace) -> Path:
    """Where the decoded-image cache lives: the K-fold run's folder (shared by all folds), else the output dir."""
    return Path(getattr(args, "cv_dir", None) or args.output_dir) / CACHE_DIR
