"""The whole pipeline in one command: patient-level K-fold cross-validation of the three CNNs and the heatmap MLP,
the faithfulness of the explanations, the report.

    python run_pipeline.py --data-dir /data/BreaKHis_v1                       # 5-fold (the default), GPU: hours
    python run_pipeline.py --data-dir /data/BreaKHis_v1 --folds 1             # one train/val/test split: a fast check
    python run_pipeline.py --data-dir /data/BreaKHis_v1 --magnification 400 --epochs 20   # other options go to
                                                                                          # the model scripts
    python run_pipeline.py --demo                                             # synthetic data, 3 folds, CPU, minutes

K-fold (the default; --folds K, or K --fold-file files): folds of patients are made once into
<output-dir>/folds.json; for every fold the three model scripts train in <output-dir>/fold_<k>/ (a model already
complete there is skipped, so an interrupted run resumes where it stopped); then cancer_class_further.py gives each
fold its own table and the cross-validated one (out-of-fold predictions, cross-fitted stackers, patient-bootstrap
intervals) and the final classifier; score_explanations.py scores the explanations on out-of-fold images, each with
its own fold's models; make_report.py builds the report. --folds 1: the same stages on one split.

Each stage is the same script a user runs by hand, started as a subprocess in order, in the caller's working
folder (relative paths mean what they mean to the caller); the run stops at the first stage that fails, with that
stage's exit status. On a cluster, run the folds as separate jobs (the model scripts' --fold k; docs/scaling.md)
and this command (or cancer_class_further.py and what follows) once they are done.
"""

import argparse
import importlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from common.core.console import CommandParser, unknown_arguments_message
from common.core.errors import STAGE_OF_PIPELINE_ENV, Interrupted, PipelineError, run_main, typed_command
from common.core.fileio import check_writable_folder
from common.core.runfiles import FURTHER_SCRIPT, REPORT_DIR, REPORT_SCRIPT, SCORE_SCRIPT, check_run_kind
from common.data.demo import make_demo_dataset, mark_as_synthetic
from common.data.partition import DEFAULT_FOLDS
from common.models.registry import ARCHS, MODEL_ORDER
from common.run import finished_fold_models
from common.training.config import TrainConfig, build_parser, parse_config

HERE = Path(__file__).resolve().parent
# Small enough for 2 CPU cores in a few minutes, yet enough for randomly initialised CNNs to learn the synthetic
# signal (128 px source images keep the per-image nucleus counts from being mere noise). 8 patients per class, so
# that each of 3 folds tests 2-3 patients per class and its val side holds at least one per class.
DEMO_DATA = dict(patients_per_class=8, images_per_patient=4, magnifications=("100", "400"), width=128, height=128)
DEMO_FOLDS = 3
DEMO_MODEL_ARGS = ["--weights", "none", "--batch-size", "8", "--val-fraction", "0.25", "--test-fraction", "0.25",
                   "--workers", "0", "--overlays", "4"]
# Each model's own demo settings. K-fold trains every model K times, so 48 px and few epochs. DenseNet-121 and
# ResNet-50 (batch norm) learn at lr 1e-3; VGG-16 (no batch norm) diverges there (first-epoch train loss 21.5 to
# 56) and needs 1e-4. At 48 px it stays at chance on the demo data (val balanced accuracy 0.500 after 6 epochs in
# every fold), so it gets 3 epochs: its 6 took half of `make demo`'s 4.5 minutes. --folds 1 (one split) affords
# 64 px and more epochs (measured on the demo data: VGG-16 reaches val accuracy 0.875 from epoch 14 at 64 px).
DEMO_ARCH_ARGS = {"kfold": {"densenet121": ["--image-size", "48", "--lr", "1e-3", "--epochs", "2"],
                            "resnet50": ["--image-size", "48", "--lr", "1e-3", "--epochs", "2"],
                            "vgg16": ["--image-size", "48", "--lr", "1e-4", "--epochs", "3"]},
                  "single": {"densenet121": ["--image-size", "64", "--lr", "1e-3", "--epochs", "5"],
                             "resnet50": ["--image-size", "64", "--lr", "1e-3", "--epochs", "5"],
                             "vgg16": ["--image-size", "64", "--lr", "1e-4", "--epochs", "15"]}}
# The demo's faithfulness stage: CAMs on 8 held-out images (34 forward passes per image and map), the perturbation
# methods (hundreds of forward passes each) on one; the command's defaults (100 and 5) are for real runs.
DEMO_FAITHFULNESS = {"images": 8, "perturbation_images": 1}
DEFAULT_OUTPUT = {(True, "kfold"): "runs/demo", (True, "single"): "runs/demo_single_split",
                  (False, "kfold"): "runs/breakhis", (False, "single"): "runs/breakhis_single_split"}


def run_stage(command: list[str]) -> None:
    print(f"\n$ {' '.join(command)}", flush=True)
    started = time.perf_counter()
    stage = subprocess.Popen(command, env={**os.environ, STAGE_OF_PIPELINE_ENV: "1"})
    try:
        status = stage.wait()
    except KeyboardInterrupt:
        # A Ctrl-C in a terminal reaches the stage too: let it finish writing what it keeps and say so itself.
        stage.send_signal(signal.SIGINT)  # (the driver alone was interrupted: pass it on)
        try:
            stage.wait(timeout=60)
        except subprocess.TimeoutExpired:
            stage.kill()
            stage.wait()
        raise
    if status != 0:
        print(f"stage failed with exit status {status}: {' '.join(command)}", file=sys.stderr)
        sys.exit(status)
    print(f"({time.perf_counter() - started:.0f} s)", flush=True)


def model_commands(args: argparse.Namespace, kind: str, n_folds: int, data_dir: Path, output_dir: Path,
                   extra_args: list[str]) -> list[tuple[str, Path, list[str]]]:
    """(arch, the folder it trains into, its command) per model, in order: per fold on a K-fold run."""
    python = sys.executable
    fold_options = [arg for path in args.fold_file or [] for arg in ("--fold-file", path)]
    if kind == "kfold" and len(args.fold_file or []) < 2:
        fold_options += ["--folds", str(n_folds)]
    commands = []
    for fold in range(1, n_folds + 1) if kind == "kfold" else [None]:
        for arch, spec in ARCHS.items():
            # The caller's options come last: they override the demo's.
            demo_args = DEMO_MODEL_ARGS + DEMO_ARCH_ARGS[kind][arch] if args.demo else []
            folder = output_dir / f"fold_{fold}" if fold else output_dir
            commands.append((arch, folder, [python, str(HERE / spec.script), "--data-dir", str(data_dir),
                                            "--output-dir", str(output_dir), *fold_options,
                                            *(["--fold", str(fold)] if fold else []), *demo_args, *extra_args]))
    return commands


def check_passed_on_options(extra_args: list[str], own_options: list[str]) -> None:
    """The options run_pipeline.py does not know go to the model scripts: each must be one of theirs (exactly, or
    a prefix of exactly one, as argparse accepts), else a one-line error naming the closest valid option."""
    model_options = build_parser(arch=MODEL_ORDER[0], description="").option_names()
    unknown = [word for word in extra_args if word.startswith("--") and word.split("=", 1)[0] not in model_options
               and len([option for option in model_options if option.startswith(word.split("=", 1)[0])]) != 1]
    if unknown:  # (a value, or a stray word, is judged by the model scripts' own parser below)
        raise PipelineError(f"{unknown_arguments_message(unknown, own_options + model_options)} (see python "
                            f"run_pipeline.py --help and, for the options it passes on to the model scripts, python "
                            f"{ARCHS[MODEL_ORDER[0]].script} --help)")


def requested_config(arch: str, command: list[str]) -> TrainConfig:
    """What a model command asks for, parsed by its own script's parser (its defaults included); a bad value
    stops here with a one-line error naming the option. A fold's command gives the config of that fold's run."""
    script = importlib.import_module(Path(ARCHS[arch].script).stem)
    try:
        config = parse_config(arch=arch, description=script.__doc__, argv=command[2:], prog=ARCHS[arch].script,
                              **script.DEFAULTS)
    except PipelineError as error:  # a bad value: say it is one of the options passed on
        problem = str(error).removesuffix(f" (see python {ARCHS[arch].script} --help)")
        raise PipelineError(f"{problem} (an option run_pipeline.py passes on to the model scripts; see python "
                            f"{ARCHS[arch].script} --help)") from None
    return config.fold_configs()[0]


def faithfulness_command(args: argparse.Namespace, output_dir: Path) -> list[str] | None:
    """score_explanations.py on the finished run (None with --faithfulness-images 0)."""
    demo = DEMO_FAITHFULNESS if args.demo else {}
    images = args.faithfulness_images if args.faithfulness_images is not None else demo.get("images", 100)
    perturbation_images = args.faithfulness_perturbation_images if args.faithfulness_perturbation_images is not None \
        else demo.get("perturbation_images", 5)
    if images == 0:
        return None
    return [sys.executable, str(HERE / SCORE_SCRIPT), "--output-dir", str(output_dir), "--images", str(images),
            "--perturbation-images", str(perturbation_images)]


def parse_args() -> tuple[argparse.Namespace, list[str]]:
    parser = CommandParser(description=__doc__,
                           epilog="Any other option is passed to the three model scripts (see their --help).")
    parser.add_argument("--demo", action="store_true", help="generate synthetic data and run small settings")
    parser.add_argument("--data-dir", help="the dataset (see the model scripts' --help); required unless --demo")
    parser.add_argument("--output-dir", help="where every stage reads and writes (default: runs/breakhis, "
                                             "runs/breakhis_single_split with --folds 1, runs/demo with --demo, "
                                             "runs/demo_single_split with --demo --folds 1)")
    parser.add_argument("--folds", type=int, help=f"K of the patient-level K-fold cross-validation; 1: one "
                                                  f"train/val/test split (default: {DEFAULT_FOLDS}; --demo: "
                                                  f"{DEMO_FOLDS})")
    parser.add_argument("--fold-file", action="append", help="official dsfoldN.txt; given once, its test side is the "
                        "single split's test split; given K times, their test sides are the K folds (default: none)")
    parser.add_argument("--faithfulness-images", type=int, help="held-out images whose explanations are scored; 0 "
                        "skips the stage (default: 100; --demo: 8)")
    parser.add_argument("--faithfulness-perturbation-images", type=int, help="of those, the first N also explained by "
                        "LIME, Kernel SHAP and occlusion (default: 5; --demo: 1)")
    args, extra_args = parser.parse_known_args()
    check_passed_on_options(extra_args, parser.option_names())  # first: a typo explains the checks below failing
    if min(args.faithfulness_images or 0, args.faithfulness_perturbation_images or 0) < 0:
        parser.error("--faithfulness-images and --faithfulness-perturbation-images must not be negative")
    if args.folds is not None and args.folds < 1:
        parser.error("--folds must be at least 1 (1: one split)")
    if args.demo == bool(args.data_dir):
        parser.error("give either --demo or --data-dir")
    return args, extra_args


def interrupted_message(kind: str, output_dir: Path) -> str:
    """After a Ctrl-C: what is intact and the command that goes on (this one, as typed)."""
    command = typed_command()
    if kind == "kfold":
        return (f"the models and stages that finished are intact in {output_dir}; resume with {command} "
                "(finished models are skipped)")
    return (f"every result written before is intact in {output_dir}; rerun {command} (a single split retrains "
            "its three models; a model script's --resume continues one from its last epoch)")


def main() -> None:
    args, extra_args = parse_args()
    fold_files = args.fold_file or []
    n_folds = len(fold_files) if len(fold_files) > 1 else 1 if len(fold_files) == 1 else \
        args.folds or (DEMO_FOLDS if args.demo else DEFAULT_FOLDS)
    kind = "kfold" if n_folds > 1 else "single"
    output_dir = Path(args.output_dir or DEFAULT_OUTPUT[(args.demo, kind)])
    check_writable_folder(output_dir, option="--output-dir")
    check_run_kind(output_dir, kind)  # never a run of the other kind into this folder
    started = time.perf_counter()
    data_dir = HERE / "demo_data" if args.demo else Path(args.data_dir)
    commands = model_commands(args, kind, n_folds, data_dir, output_dir, extra_args)
    # Every model command parsed here first: a mistyped option stops the run before any work, and a resumed
    # K-fold run skips only the models trained on the same data and folds with the same options.
    requests = [requested_config(arch, command) for arch, _, command in commands]
    if args.demo:
        if not (data_dir / "BreaKHis_v1").is_dir():
            make_demo_dataset(data_dir, **DEMO_DATA)
            print(f"demo data written to {data_dir}")
        mark_as_synthetic(data_dir)  # a tree made before the marker existed
    print(f"{'patient-level ' + str(n_folds) + '-fold cross-validation' if kind == 'kfold' else 'one split'} "
          f"into {output_dir}", flush=True)
    finished = finished_fold_models(output_dir, requests) if kind == "kfold" else set()
    try:
        for config, (arch, folder, command) in zip(requests, commands):
            if (config.fold, arch) in finished:
                print(f"{folder.name} {arch}: complete, skipped")
                continue
            run_stage(command)
        run_stage([sys.executable, str(HERE / FURTHER_SCRIPT), "--output-dir", str(output_dir)])
        command = faithfulness_command(args, output_dir)
        if command:
            run_stage(command)
        else:
            print("\nfaithfulness: skipped (--faithfulness-images 0)")
        run_stage([sys.executable, str(HERE / REPORT_SCRIPT), "--output-dir", str(output_dir)])
    except KeyboardInterrupt:
        raise Interrupted(interrupted_message(kind, output_dir)) from None
    report = output_dir / REPORT_DIR / "index.html"
    print(f"\npipeline finished in {time.perf_counter() - started:.0f} s; open {report}")


if __name__ == "__main__":
    run_main(main)
