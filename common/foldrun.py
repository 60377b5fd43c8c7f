"""A model script's run of one fold of a patient-level K-fold evaluation (--folds K --fold k).

    python cancer_class_resnet_50.py --data-dir D --output-dir OUT --folds 5 --fold 2    # one fold (one machine)
    python cancer_class_resnet_50.py --data-dir D --output-dir OUT --folds 5             # every fold in turn

The folds are made once, into OUT/folds.json (common.crossval.prepare_folds: later runs must pass the same options
and data). Fold k's run lives in OUT/fold_<k>/ with the single-split file names: a split.json derived from the
folds (fold k's patients test, val carved from the other folds' patients) is written there, so training, the
export, cancer_class_further.py, the report and predict.py work inside fold_<k>/ unchanged. The decoded-image
cache is OUT/cache/, shared by every fold and model: each fold's split.json lists the same records in the same
order (only the split names differ), so the cache key is the same.
"""

import argparse
import copy
from pathlib import Path

from common.crossval import FOLDS_FILE_NAME, Folds, fold_splits, prepare_folds
from common.data import (SPLIT_FILE_NAME, Split, filter_magnification, group_patients, index_dataset, load_split,
                         save_split, split_digest)
from common.errors import PipelineError
from common.runfiles import CACHE_DIR, fold_dir


def n_folds_of(args: argparse.Namespace) -> int | None:
    """K of a K-fold run (--folds K, or the number of --fold-file files given), None for a single split."""
    if args.fold_files:
        return len(args.fold_files)
    return args.folds


def check_fold_options(args: argparse.Namespace) -> str | None:
    """What is wrong with the K-fold options, as a message for parser.error, or None."""
    n_folds = n_folds_of(args)
    if args.folds is not None and args.folds < 2:
        return "--folds must be at least 2"
    if args.fold_files and args.folds is not None and args.folds != len(args.fold_files):
        return (f"--folds {args.folds} but {len(args.fold_files)} --fold-file files were given: give one fold file "
                "per fold")
    if args.fold_file and args.folds is not None:
        return "--folds with a single --fold-file: give one --fold-file per fold, or --folds alone"
    if args.fold is not None and n_folds is None:
        return "--fold k needs --folds K (or several --fold-file files)"
    if args.fold is not None and not 1 <= args.fold <= n_folds:
        return f"--fold {args.fold}: folds are numbered 1 to {n_folds}"
    if n_folds is not None and args.split == "image":
        return "--folds makes folds of patients; it cannot be combined with --split image"
    if n_folds is not None and args.max_images:
        return "--max-images cannot be combined with --folds: every fold must see the same images"
    return None


def fold_protocol(args: argparse.Namespace) -> dict:
    """The options that define the folds: stored in folds.json and checked by every later fold run."""
    common = {"seed": args.seed, "val_fraction": args.val_fraction, "magnification": args.magnification,
              "patient_id": args.patient_id}
    if args.fold_files:
        return {"method": "fold_files", "fold_files": list(args.fold_files), **common}
    return {"method": "kfold", "n_folds": args.folds, **common}


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


def fold_split(folds: Folds, fold: int, root: Path, base_protocol: dict) -> Split:
    """Fold `fold` (1-based) of `folds` as a Split: its patients test, val from the other folds' patients."""
    splits = fold_splits(folds, fold - 1)
    protocol = {**base_protocol, "method": "kfold", "fold_method": folds.protocol["method"], "fold": fold,
                "n_folds": folds.n_folds, "folds_digest": folds.digest, "test_fraction": None,
                "stratified_by": folds.protocol.get("stratified_by"), "groups": "patient"}
    return Split(root, folds.records, splits, protocol, split_digest(folds.records, splits))


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
