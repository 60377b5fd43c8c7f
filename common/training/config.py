"""The model scripts' options: one parser built once (each script passes only its own defaults) and the typed
config it yields, which the training code takes instead of an argparse Namespace and every checkpoint records."""

import argparse
import dataclasses
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from common.cams.methods import CAM_METHODS, TARGET_RULES, parse_cam_methods
from common.core.console import CommandParser
from common.core.errors import PipelineError
from common.core.runfiles import fold_dir


@dataclass(frozen=True)
class TrainConfig:
    """Everything a model script was asked to do; `asdict` of it is the checkpoint's `config`."""

    arch: str
    data_dir: str  # absolute
    output_dir: str = "runs/breakhis"  # this run's folder: a single split's, or fold k's fold_<k>/ in a K-fold run
    weights: str = "imagenet"
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    image_size: int = 224
    magnification: str = "all"
    split: str = "patient"
    patient_id: str = "folder"
    fold_file: str | None = None  # one official fold file: the single split's test side (absolute)
    fold_files: tuple[str, ...] | None = None  # several: their test sides are the K folds (absolute)
    folds: int | None = None  # K of a K-fold run
    fold: int | None = None  # the fold this config runs (1..K); None: every fold in turn
    run_dir: str | None = None  # a fold's config: the K-fold run's folder (folds.json, the shared cache)
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    max_images: int | None = None
    cache: str = "disk"
    workers: int = min(8, os.cpu_count() or 1)
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    class_weights: str = "balanced"
    resume: bool = False
    keep_training_state: bool = False
    heatmaps_only: bool = False
    cam_target: str = "predicted"
    cam_methods: str = ",".join(CAM_METHODS)  # as given (repeated by heatmaps_only_command)
    overlays: int = 8

    @property
    def n_folds(self) -> int | None:
        """K of a K-fold run (--folds K, or the number of --fold-file files given), None for a single split."""
        if self.fold_files:
            return len(self.fold_files)
        return self.folds if self.folds and self.folds > 1 else None

    def fold_configs(self) -> list["TrainConfig"]:
        """One config per run: [self] for a single split; per fold asked for, one whose output_dir is fold_<k>/."""
        if self.n_folds is None:
            return [self]
        folds = [self.fold] if self.fold is not None else range(1, self.n_folds + 1)
        return [dataclasses.replace(self, run_dir=self.output_dir, fold=fold, folds=self.n_folds,
                                    output_dir=str(fold_dir(self.output_dir, fold))) for fold in folds]


DEFAULTS = {field.name: field.default for field in dataclasses.fields(TrainConfig)
            if field.default is not dataclasses.MISSING}
# The options that decide which rows a heatmap file holds and how its maps are made: a command that regenerates
# the file must repeat them (the split file refuses other split options). The image size comes from the checkpoint.
HEATMAP_DEFINING_OPTIONS = ("magnification", "split", "patient_id", "fold_file", "val_fraction", "test_fraction",
                            "seed", "max_images", "cam_target", "cam_methods")
# Options that say where and how a model script runs, not what it trains: a finished model stays current when only
# these differ (whether the data is the same is checked against folds.json / split.json, not by its path).
EXECUTION_OPTIONS = ("data_dir", "output_dir", "run_dir", "fold", "cache", "workers", "device", "resume",
                     "keep_training_state", "heatmaps_only", "overlays")
# Options of the parser that are not fields of the config (they are turned into fields).
_PARSER_ONLY = ("fold_file",)


def build_parser(*, arch: str, description: str, prog: str | None = None,
                 **script_defaults) -> argparse.ArgumentParser:
    parser = CommandParser(prog=prog, description=description)
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
                                                "fold k runs in --output-dir/fold_<k>/ (see --fold) (default: none "
                                                "or 1: one train/val/test split)")
    data.add_argument("--fold", type=int, help="with --folds K: run fold k only (1..K), e.g. one fold per machine; "
                                               "(default: every fold, in turn)")
    data.add_argument("--val-fraction", type=float, help="fraction of patients (per class) for validation")
    data.add_argument("--test-fraction", type=float, help="fraction of patients (per class) for the test")
    data.add_argument("--max-images", type=int,
                      help="quick trial: keep at most this many images, split kept (default: all)")
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
                          help="train and validate in float32 on CUDA; without this flag CUDA uses mixed precision "
                               "(bf16 where supported, else fp16); other devices always use float32")
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

    parser.set_defaults(**{**DEFAULTS, **script_defaults, "fold_file": None})
    return parser


def parse_config(*, arch: str, description: str, argv: list[str] | None = None, prog: str | None = None,
                 **script_defaults) -> TrainConfig:
    """The command line as a TrainConfig, every option checked (a bad one: a one-line PipelineError naming it and
    `python <prog> --help`, by default the running script's)."""
    parser = build_parser(arch=arch, description=description, prog=prog, **script_defaults)
    args = parser.parse_args(argv)
    if not 0 < args.val_fraction < 1 or not 0 < args.test_fraction < 1 or args.val_fraction + args.test_fraction >= 1:
        parser.error("--val-fraction and --test-fraction must be in (0, 1) and sum to less than 1")
    for option in ("epochs", "batch_size", "image_size", "max_images", "folds"):
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
    # Absolute, so the config saved in the checkpoint names these files wherever a later command is started.
    absolute = [os.path.abspath(os.path.expanduser(path)) for path in args.fold_file or []]
    fold_file, fold_files = (None, tuple(absolute)) if len(absolute) > 1 else (absolute[0] if absolute else None, None)
    fields = {name: value for name, value in vars(args).items() if name not in _PARSER_ONLY}
    config = TrainConfig(**{**fields, "arch": arch, "data_dir": os.path.abspath(os.path.expanduser(args.data_dir)),
                            "fold_file": fold_file, "fold_files": fold_files})
    problem = fold_options_problem(config)
    if problem:
        parser.error(problem)
    if config.fold_file and config.split == "image":
        parser.error("--fold-file defines a patient-level split; it cannot be combined with --split image")
    return config


def changed_training_options(saved: dict, requested: TrainConfig) -> list[str]:
    """The options that define a trained model and differ between a checkpoint's saved config and a request, each
    as "--lr 0.0001 there, 0.01 now" (empty: the checkpoint is what the request would train)."""
    def plain(value):  # the saved config went through torch.save: tuples may come back as lists
        return list(value) if isinstance(value, tuple) else value

    requested = dataclasses.asdict(requested)
    return [f"--{name.replace('_', '-')} {plain(saved[name])!r} there, {plain(value)!r} now"
            for name, value in requested.items()
            if name not in EXECUTION_OPTIONS and name in saved and plain(saved[name]) != plain(value)]


def fold_options_problem(config: TrainConfig) -> str | None:
    """What is wrong with the K-fold options, as a message for parser.error, or None."""
    n_folds = config.n_folds
    if config.fold_files and config.folds is not None and config.folds != len(config.fold_files):
        return (f"--folds {config.folds} but {len(config.fold_files)} --fold-file files were given: give one fold "
                "file per fold")
    if config.fold_file and config.folds is not None and config.folds > 1:
        return "--folds with a single --fold-file: give one --fold-file per fold, or --folds alone"
    if config.fold is not None and n_folds is None:
        return "--fold k needs --folds K (or several --fold-file files)"
    if config.fold is not None and not 1 <= config.fold <= n_folds:
        return f"--fold {config.fold}: folds are numbered 1 to {n_folds}"
    if n_folds is not None and config.split == "image":
        return "--folds makes folds of patients; it cannot be combined with --split image"
    if n_folds is not None and config.max_images:
        return "--max-images cannot be combined with --folds: every fold must see the same images"
    return None


def split_protocol(config: TrainConfig) -> dict:
    """The options that define a single split; stored in split.json and checked by every later script."""
    return {
        "method": "fold" if config.fold_file else config.split,
        "fold_file": config.fold_file,
        "val_fraction": config.val_fraction,
        "test_fraction": None if config.fold_file else config.test_fraction,
        "seed": config.seed,
        "magnification": config.magnification,
        "patient_id": config.patient_id,
    }


def fold_protocol(config: TrainConfig) -> dict:
    """The options that define the folds: stored in folds.json and checked by every later fold run."""
    common = {"seed": config.seed, "val_fraction": config.val_fraction, "magnification": config.magnification,
              "patient_id": config.patient_id}
    if config.fold_files:
        return {"method": "fold_files", "fold_files": list(config.fold_files), **common}
    return {"method": "kfold", "n_folds": config.n_folds, **common}


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
