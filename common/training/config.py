"""The one command-line parser of the three model scripts; each script passes only its own defaults."""

import argparse
import os
import shlex
from pathlib import Path

from common.cams.methods import CAM_METHODS, TARGET_RULES, parse_cam_methods
from common.core.console import HelpFormatter
from common.core.errors import PipelineError

DEFAULTS = dict(
    output_dir="runs/breakhis", weights="imagenet", epochs=10, batch_size=32, lr=1e-4, weight_decay=1e-4,
    optimizer="adamw", image_size=224, magnification="all", split="patient", fold_file=None, val_fraction=0.1,
    test_fraction=0.2, seed=0, device="auto", workers=min(8, os.cpu_count() or 1), class_weights="balanced",
    cache="disk", max_images=None, cam_target="predicted", overlays=8, amp=True, patient_id="folder",
    keep_training_state=False, cam_methods=",".join(CAM_METHODS), folds=None, fold=None, fold_files=None,
)
# The options that decide which rows a heatmap file holds and how its maps are made: a command that regenerates
# the file must repeat them (the split file refuses other split options). The image size comes from the checkpoint.
HEATMAP_DEFINING_OPTIONS = ("magnification", "split", "patient_id", "fold_file", "val_fraction", "test_fraction",
                            "seed", "max_images", "cam_target", "cam_methods")


def build_parser(*, arch: str, description: str, **script_defaults) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    data = parser.add_argument_group("data and split")
    data.add_argument("--data-dir", required=True,
                      help="BreaKHis folder (any folder at or above histology_slides), a folder with benign/ and "
                           "malignant/, or a CSV manifest with columns path,label[,patient,magnification,subtype]")
    data.add_argument("--output-dir", help="where the split file, checkpoints, heatmaps and metrics go; "
                                           "give the four scripts the same one")
    data.add_argument("--magnification", choices=["40", "100", "200", "400", "all"],
                      help="keep only images at this magnification (before splitting)")
    data.add_argument("--split", choices=["patient", "image"],
                      help="patient: no patient on two sides (honest); image: random images, leaks patients")
    data.add_argument("--patient-id", choices=["folder", "accession"],
                      help="folder: BreaKHis's patient folder IDs (14-22549AB; its 82 patients); accession: the "
                           "biopsy number only (14-22549), so folders sharing it (AB, CD, G) stay on one side")
    data.add_argument("--fold-file", action="append",
                      help="official BreaKHis dsfoldN.txt: its test side is the test split; val patients are carved "
                           "from its train side (default: a split by --split with the fractions below). Given K "
                           "times (dsfold1..5.txt): their test sides are the K folds of a K-fold run")
    data.add_argument("--folds", type=int, help="patient-level K-fold cross-validation: K folds of patients "
                                                "(stratified by class and subtype) in --output-dir/folds.json; "
                                                "fold k runs in --output-dir/fold_<k>/ (see --fold) (default: none, "
                                                "one train/val/test split)")
    data.add_argument("--fold", type=int, help="with --folds K: run fold k only (1..K), e.g. one fold per machine; "
                                               "(default: every fold, in turn)")
    data.add_argument("--val-fraction", type=float, help="fraction of patients (per class) for validation")
    data.add_argument("--test-fraction", type=float, help="fraction of patients (per class) for the test")
    data.add_argument("--max-images", type=int, help="quick trial: keep at most this many images, split kept (default: all)")
    data.add_argument("--cache", choices=["none", "memory", "disk"],
                      help="decode each image once (RAM, or a file in the output dir shared by the three "
                           "scripts) and augment whole batches on the device; none = per-image PIL workers")
    data.add_argument("--workers", type=int, help="DataLoader worker processes (default: the CPU cores, at most "
                                                 "8; here %(default)s)")

    training = parser.add_argument_group("model and training")
    training.add_argument("--weights", help="imagenet (torchvision download), none (random init), or PATH to a "
                                            "local state_dict (offline clusters)")
    training.add_argument("--epochs", type=int, help="training epochs")
    training.add_argument("--batch-size", type=int, help="per process (per GPU under torchrun)")
    training.add_argument("--lr", type=float, help="peak learning rate (cosine schedule)")
    training.add_argument("--weight-decay", type=float, help="decoupled weight decay (AdamW) or L2 (Adam)")
    training.add_argument("--optimizer", choices=["adam", "adamw"], help="optimizer of every layer")
    training.add_argument("--image-size", type=int, help="images are resized to a square of this many pixels")
    training.add_argument("--class-weights", choices=["none", "balanced"],
                          help="balanced: loss weights inverse to the train split's class frequencies")
    training.add_argument("--seed", type=int, help="seeds the split, the subsample, the init and the batch order")
    training.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"],
                          help="auto: CUDA if present, else MPS, else the CPU")
    training.add_argument("--no-amp", dest="amp", action="store_false",
                          help="train and validate in float32 on CUDA; without this flag CUDA uses mixed precision (bf16 "
                               "where supported, else fp16); other devices always use float32")
    training.add_argument("--resume", action="store_true",
                          help="continue the interrupted run in --output-dir from its last completed epoch")
    training.add_argument("--keep-training-state", action="store_true",
                          help="keep training_state_<arch>.pth after the last epoch (for extending the run with "
                               "--resume --epochs N); by default a finished run removes it")

    heatmaps = parser.add_argument_group("Grad-CAM heatmaps")
    heatmaps.add_argument("--heatmaps-only", action="store_true",
                          help="skip training: recompute heatmaps and test metrics from the saved checkpoint")
    heatmaps.add_argument("--cam-target", choices=TARGET_RULES,
                          help="class whose score Grad-CAM explains (never the true label)")
    heatmaps.add_argument("--cam-methods", help="comma-separated CAM methods computed in the same pass, each stored "
                                                "in the heatmap file (Grad-CAM always: the file's cams)")
    heatmaps.add_argument("--overlays", type=int, help="test images saved as heatmap overlay PNGs")

    parser.set_defaults(**{**DEFAULTS, **script_defaults})
    parser.set_defaults(arch=arch)
    return parser


def parse_args(*, arch: str, description: str, argv: list[str] | None = None, **script_defaults) -> argparse.Namespace:
    parser = build_parser(arch=arch, description=description, **script_defaults)
    args = parser.parse_args(argv)
    if not 0 < args.val_fraction < 1 or not 0 < args.test_fraction < 1 or args.val_fraction + args.test_fraction >= 1:
        parser.error("--val-fraction and --test-fraction must be in (0, 1) and sum to less than 1")
    for option in ("epochs", "batch_size", "image_size", "max_images"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1")
    for option in ("workers", "overlays", "weight_decay"):
        if getattr(args, option) < 0:
            parser.error(f"--{option.replace('_', '-')} must not be negative")
    if args.lr <= 0:
        parser.error("--lr must be positive")
    try:  # kept as the text given (it is saved in the checkpoint's config and repeated by heatmaps_only_command)
        parse_cam_methods(args.cam_methods)
    except PipelineError as error:
        parser.error(str(error))
    if args.image_size < 32:
        parser.error("--image-size must be at least 32 (the networks downsample by 32)")
    if args.fold_file and len(args.fold_file) > 1:  # several files: the K folds of a K-fold run
        args.fold_files, args.fold_file = [os.path.abspath(os.path.expanduser(path)) for path in args.fold_file], None
    elif args.fold_file:
        args.fold_file = args.fold_file[0]
    fold_problem = check_fold_options(args)
    if fold_problem:
        parser.error(fold_problem)
    if args.fold_file and args.split == "image":
        parser.error("--fold-file defines a patient-level split; it cannot be combined with --split image")
    # Absolute, so the config saved in the checkpoint names these files wherever a later command is started.
    for option in ("data_dir", "fold_file"):
        if getattr(args, option):
            setattr(args, option, os.path.abspath(os.path.expanduser(getattr(args, option))))
    return args


def heatmaps_only_command(script: str, config: dict, output_dir: str | os.PathLike) -> str:
    """The command that remakes a heatmap file from the checkpoint whose saved `config` is given."""
    # A checkpoint whose config lacks the data dir (not made by run_model_script) gets a placeholder to fill in.
    words = ["python", script, "--data-dir", config.get("data_dir", "DATA_DIR"), "--output-dir", str(output_dir)]
    if config.get("fold"):  # a fold's folder: the command names the K-fold run's folder and the fold
        words[-1] = str(Path(output_dir).parent)
        words += [arg for path in config["fold_files"] for arg in ("--fold-file", path)] if config.get("fold_files") \
            else ["--folds", str(config["folds"])]
        words += ["--fold", str(config["fold"])]
    for option in HEATMAP_DEFINING_OPTIONS:
        if config.get(option, DEFAULTS[option]) != DEFAULTS[option]:
            words += [f"--{option.replace('_', '-')}", str(config[option])]
    return shlex.join(words + ["--heatmaps-only"])


def split_protocol(args: argparse.Namespace) -> dict:
    """The options that define the split; stored in the split file and checked by every later script."""
    return {
        "method": "fold" if args.fold_file else args.split,
        "fold_file": os.path.abspath(args.fold_file) if args.fold_file else None,
        "val_fraction": args.val_fraction,
        "test_fraction": None if args.fold_file else args.test_fraction,
        "seed": args.seed,
        "magnification": args.magnification,
        "patient_id": args.patient_id,
    }


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
