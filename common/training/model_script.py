"""What each model script does, in order: config -> split (or fold k's split) -> cache -> fine-tune
(common/training/loop.py) -> one evaluation pass over every image that yields the heatmaps and the test metrics.

    run_model_script(arch=..., description=__doc__, **script_defaults)   # the whole of cancer_class_<arch>.py

A K-fold run (--folds K, or K --fold-file files) makes its folds once, into OUT/folds.json, and runs fold k in
OUT/fold_<k>/ with the single-split file names: fold k's split.json (its patients test, val carved from the other
folds' patients) is written there, so the final stage, the report and predict.py read a fold like a single split.
The decoded-image cache is OUT/cache/, shared by every fold and model (each fold lists the same records in the same
order, so the cache key is the same). --fold k runs one fold: one job per fold on a cluster.
"""

import dataclasses
from pathlib import Path

from common.cams.heatmap_file import export_heatmaps
from common.cams.methods import parse_cam_methods
from common.core.errors import Interrupted, PipelineError
from common.core.fileio import check_writable_folder, remove_stale_temporaries, sha256_of_file, write_json
from common.core.runfiles import (
    CACHE_DIR,
    FOLDS_FILE,
    SPLIT_FILE,
    check_run_kind,
    checkpoint_path,
    heatmap_path,
    metrics_path,
    overlay_dir,
    state_path,
)
from common.data.images import build_cache
from common.data.partition import (
    Split,
    describe_protocol,
    prepare_fold_split,
    prepare_folds,
    prepare_split,
    subsample_split,
    summarize_split,
)
from common.evaluation.metrics import binary_metrics, metrics_table, softmax
from common.models.checkpoints import SELECTION_METRIC, load_checkpoint, model_from_checkpoint
from common.models.registry import build_model
from common.training.config import TrainConfig, fold_protocol, parse_config, split_protocol
from common.training.loop import fit
from common.training.runtime import Runtime, seed_everything, setup_runtime


def export_and_report(config: TrainConfig, split: Split, runtime: Runtime, cache) -> dict:
    """Reload the best checkpoint; one pass over every split yields the heatmaps and the test metrics."""
    output_dir = Path(config.output_dir)
    checkpoint_file = checkpoint_path(output_dir, config.arch)
    checkpoint = load_checkpoint(checkpoint_file, config.arch)
    if checkpoint["split_digest"] != split.digest:
        raise PipelineError(f"{checkpoint_file} was trained on another split than "
                            f"{output_dir / SPLIT_FILE}; retrain it in this output dir")
    model = model_from_checkpoint(checkpoint)
    # The background writer has finished (fit waits for it), so this is the file the model was just loaded from.
    arrays = export_heatmaps(model, config.arch, split, heatmap_path(output_dir, config.arch),
                             image_size=checkpoint["image_size"], batch_size=config.batch_size, workers=config.workers,
                             device=runtime.device, cache=cache, target_rule=config.cam_target,
                             checkpoint_sha256=sha256_of_file(checkpoint_file),
                             overlay_dir=overlay_dir(output_dir, config.arch), overlay_count=config.overlays,
                             cam_methods=parse_cam_methods(config.cam_methods))
    probabilities = softmax(arrays["logits"])[:, 1]
    results = {"arch": config.arch, "split_protocol": describe_protocol(split.protocol),
               "checkpoint_epoch": checkpoint["epoch"], "selection_metric": SELECTION_METRIC}
    for split_name in ("val", "test"):
        rows = arrays["splits"] == split_name
        results[split_name] = binary_metrics(arrays["labels"][rows], probabilities[rows], arrays["patients"][rows],
                                             arrays["magnifications"][rows])
    write_json(metrics_path(output_dir, config.arch), results)
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
    run, that for each fold asked for, in its own fold_<k>/ folder."""
    config = parse_config(arch=arch, description=description, argv=argv, **defaults)
    check_writable_folder(config.output_dir, option="--output-dir")
    check_run_kind(config.output_dir, "kfold" if config.n_folds else "single")
    runtime = setup_runtime(config.device, amp=config.amp)
    try:
        for fold_config in config.fold_configs():
            config = fold_config  # the Ctrl-C message below names the fold that was running
            run_one_split(config, runtime)
    except KeyboardInterrupt:
        raise Interrupted(interrupted_message(config)) from None
    finally:
        runtime.close()


def prepare_run_split(config: TrainConfig) -> Split:
    """The split this config trains on: the single split (split.json made or checked), or fold k's (folds.json
    made or checked in the K-fold run's folder, then fold_<k>/split.json)."""
    if config.run_dir is None:
        return prepare_split(config.data_dir, Path(config.output_dir) / SPLIT_FILE, split_protocol(config))
    folds = prepare_folds(config.data_dir, Path(config.run_dir) / FOLDS_FILE, fold_protocol(config))
    split = prepare_fold_split(folds, config.fold, Path(config.output_dir) / SPLIT_FILE)
    return Split(folds.root, split.records, split.splits, split.protocol, split.digest)


def run_one_split(config: TrainConfig, runtime: Runtime) -> None:
    """Split, fine-tune, export and report in config.output_dir (a single split, or one fold's folder)."""
    seed_everything(config.seed)
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if runtime.is_main:
        remove_stale_temporaries(output_dir)  # never another live run's (see the function)
    # The first script to run writes the split; the others (and the other ranks) read it.
    split = runtime.main_rank_first(lambda: prepare_run_split(config))
    if config.max_images:
        if config.max_images >= len(split.records) and runtime.is_main:
            print(f"note: --max-images {config.max_images} is not below the dataset's {len(split.records)} "
                  "images: all of them are used")
        split = subsample_split(split, config.max_images, config.seed)
    if runtime.is_main:
        print(f"split protocol: {describe_protocol(split.protocol)}\n{summarize_split(split)}")
    if config.heatmaps_only:  # the maps must be made at the size the checkpoint was trained at
        trained_at = load_checkpoint(checkpoint_path(output_dir, config.arch), config.arch)["image_size"]
        config = dataclasses.replace(config, image_size=trained_at)
    if not config.heatmaps_only:
        # Before the image cache is built, so that missing ImageNet weights stop the run in seconds, not minutes.
        # Rank 0 first: an ImageNet download happens once, the other ranks read torchvision's cached file.
        model = runtime.main_rank_first(lambda: build_model(config.arch, config.weights, split_digest=split.digest))
    cache = prepare_cache(config, split, runtime)
    if not config.heatmaps_only:
        seed_everything(config.seed)  # training's draws depend on --seed alone, not on what building the cache drew
        fit(model, config, split, runtime, cache)
    if runtime.is_main:
        print_results(export_and_report(config, split, runtime, cache))
    runtime.barrier()


def interrupted_message(config: TrainConfig) -> str:
    """After a Ctrl-C: what the run leaves behind and how to go on."""
    output_dir = Path(config.output_dir)
    if config.heatmaps_only:
        return f"{checkpoint_path(output_dir, config.arch)} is unchanged; rerun the same command to export the heatmaps"
    state = state_path(output_dir, config.arch)
    if state.is_file():  # written after every completed epoch (on Ctrl-C the write in flight finishes first)
        return f"{state} holds the last completed epoch; rerun with --resume to continue from it"
    return f"no {config.arch} epoch was completed, so there is nothing to resume; rerun the same command"


def prepare_cache(config: TrainConfig, split: Split, runtime: Runtime):
    """The decoded-image cache (in the K-fold run's folder, shared by all folds), or None for the plain path."""
    if config.cache == "none":
        return None
    return runtime.main_rank_first(lambda: build_cache(
        split.root, split.records, image_size=config.image_size, mode=config.cache,
        cache_dir=Path(config.run_dir or config.output_dir) / CACHE_DIR, workers=config.workers))
