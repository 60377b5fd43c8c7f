"""The whole pipeline in one command: three CNNs, the heatmap MLP, the faithfulness of the explanations, the report.

    python run_pipeline.py --demo                                            # synthetic data, CPU, minutes
    python run_pipeline.py --data-dir /data/BreaKHis_v1 --output-dir runs/breakhis   # real defaults (GPU)
    python run_pipeline.py --data-dir /data/BreaKHis_v1 --magnification 400 --epochs 20   # extra options go to
                                                                                         # the model scripts
    python run_pipeline.py --demo --folds 3                      # patient-level 3-fold cross-validation (resumable)

A single-split run then scores its explanations (`python score_explanations.py`: deletion/insertion AUC of every
CAM method of every CNN on --faithfulness-images test images, LIME, Kernel SHAP and occlusion on the first
--faithfulness-perturbation-images of them, side-by-side figures), so its report has the Faithfulness section.

With --folds K (or several --fold-file), every fold runs in <output-dir>/fold_<k>/ (the three model scripts and
cancer_class_further.py, a fold's model skipped when its checkpoint and heatmaps are complete), then
`python -m common.stages.cross_validation` aggregates the out-of-fold predictions (cv_results.*) and the report gets its
cross-validation page.

Each stage is the same script a user runs by hand, started as a subprocess in order, in the caller's working
folder (relative paths mean what they mean to the caller); the run stops at the first stage that fails, with that
stage's exit status.
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from common.core.console import HelpFormatter
from common.core.runfiles import FURTHER_SCRIPT, REPORT_DIR, RESULTS_JSON, fold_dir
from common.data.demo import make_demo_dataset, mark_as_synthetic
from common.models.registry import ARCHS

HERE = Path(__file__).resolve().parent
# Small enough for 2 CPU cores in a few minutes, yet enough for randomly initialised CNNs to learn the synthetic
# signal (128 px source images keep the per-image nucleus counts from being mere noise; several epochs give
# batch norm enough steps). 8 patients per class so that val holds 2 per class (--fit-split val).
DEMO_DATA = dict(patients_per_class=8, images_per_patient=4, magnifications=("100", "400"), width=128, height=128)
DEMO_MODEL_ARGS = ["--weights", "none", "--image-size", "64", "--batch-size", "8", "--val-fraction", "0.25",
                   "--test-fraction", "0.25", "--workers", "0", "--overlays", "4"]
# Each model's own demo lr and epochs. DenseNet-121 and ResNet-50 (batch norm) learn at lr 1e-3 in 5 epochs.
# VGG-16 (no batch norm) diverges at 1e-3 (first-epoch train loss 21.5 to 56, at chance after) and dies at 3e-4
# and 2e-4; at 1e-4 its ranking improves within 3 epochs (val AUC 0.96) but it predicts one class until epoch 9,
# so it gets 15 epochs (measured on the demo data: val accuracy 0.875 from epoch 14; ~6 s per epoch on 2 cores).
DEMO_ARCH_ARGS = {"densenet121": ["--lr", "1e-3", "--epochs", "5"],
                  "resnet50": ["--lr", "1e-3", "--epochs", "5"],
                  "vgg16": ["--lr", "1e-4", "--epochs", "15"]}
# The demo's faithfulness stage: CAMs on 8 test images (34 forward passes per image and map, about a minute for every
# map of the three CNNs on 2 cores), the perturbation methods (hundreds of forward passes each) on one; the command's
# defaults (100 and 5) are for real runs.
DEMO_FAITHFULNESS = {"images": 8, "perturbation_images": 1}
# --demo --folds K trains every model K times: 48 px and fewer epochs keep it to minutes on 2 cores (placed after
# the demo's own settings, so they win; the caller's options still come last). VGG-16 may stay near chance.
DEMO_FOLD_ARCH_ARGS = {"densenet121": ["--image-size", "48", "--epochs", "2"],
                       "resnet50": ["--image-size", "48", "--epochs", "2"],
                       "vgg16": ["--image-size", "48", "--epochs", "6"]}


def run_stage(command: list[str], env: dict | None = None) -> None:
    print(f"\n$ {' '.join(command)}", flush=True)
    started = time.perf_counter()
    status = subprocess.call(command, env=env)
    if status != 0:
        print(f"stage failed with exit status {status}: {' '.join(command)}", file=sys.stderr)
        sys.exit(status)
    print(f"({time.perf_counter() - started:.0f} s)", flush=True)


def module_environment() -> dict:
    """The environment for `python -m common.<module>` started from the caller's folder: the repository goes on
    the module path."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}


def run_folds(args: argparse.Namespace, data_dir: Path, output_dir: Path, n_folds: int, extra_args: list[str]) -> None:
    """Every fold's three model scripts (a model already complete in its fold is skipped, so an interrupted run
    resumes where it stopped) and its single-split table, then the aggregation of the out-of-fold predictions."""
    from common.stages.cross_validation import fold_model_complete  # imports torch: only K-fold runs need it here
    python = sys.executable
    fold_options = ([] if args.fold_file and len(args.fold_file) > 1 else ["--folds", str(n_folds)])
    for fold in range(1, n_folds + 1):
        folder = fold_dir(output_dir, fold)
        ran = False
        for arch, spec in ARCHS.items():
            if fold_model_complete(folder, arch):
                print(f"fold {fold}/{n_folds} {arch}: complete in {folder}, skipped")
                continue
            demo_args = DEMO_MODEL_ARGS + DEMO_ARCH_ARGS.get(arch, []) + DEMO_FOLD_ARCH_ARGS.get(arch, []) \
                if args.demo else []
            run_stage([python, str(HERE / spec.script), "--data-dir", str(data_dir), "--output-dir", str(output_dir),
                       *fold_options, "--fold", str(fold), *demo_args, *extra_args])
            ran = True
        if ran or not (folder / RESULTS_JSON).is_file():
            run_stage([python, str(HERE / FURTHER_SCRIPT), "--output-dir", str(folder)])
    run_stage([python, "-m", "common.stages.cross_validation", "--output-dir", str(output_dir)], env=module_environment())
    print(f"\nfaithfulness: not run on a K-fold run; score a fold with python score_explanations.py --output-dir "
          f"{fold_dir(output_dir, 1)}")


def run_faithfulness(args: argparse.Namespace, output_dir: Path) -> None:
    """`python score_explanations.py` on the finished run (skipped with --faithfulness-images 0)."""
    demo = DEMO_FAITHFULNESS if args.demo else {}
    images = args.faithfulness_images if args.faithfulness_images is not None else demo.get("images", 100)
    perturbation_images = args.faithfulness_perturbation_images if args.faithfulness_perturbation_images is not None \
        else demo.get("perturbation_images", 5)
    if images == 0:
        print("\nfaithfulness: skipped (--faithfulness-images 0)")
        return
    run_stage([sys.executable, str(HERE / "score_explanations.py"), "--output-dir", str(output_dir), "--images",
               str(images), "--perturbation-images", str(perturbation_images)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter,
                                     epilog="Any other option is passed to the three model scripts (see their --help).")
    parser.add_argument("--demo", action="store_true", help="generate synthetic data and run small settings")
    parser.add_argument("--data-dir", help="the dataset (see the model scripts' --help); required unless --demo")
    parser.add_argument("--output-dir", help="where every stage reads and writes (default: runs/demo with --demo, else "
                                                 "runs/breakhis)")
    parser.add_argument("--folds", type=int, help="patient-level K-fold cross-validation: every fold, then the "
                                                  "aggregation (see above) (default: none, one split)")
    parser.add_argument("--fold-file", action="append", help="official dsfoldN.txt; given K times, its test sides "
                                                             "are the K folds (default: none)")
    parser.add_argument("--faithfulness-images", type=int, help="test images whose explanations are scored after a "
                        "single-split run; 0 skips the stage (default: 100; --demo: 8)")
    parser.add_argument("--faithfulness-perturbation-images", type=int, help="of those, the first N also explained by "
                        "LIME, Kernel SHAP and occlusion (default: 5; --demo: 1)")
    args, extra_args = parser.parse_known_args()
    if min(args.faithfulness_images or 0, args.faithfulness_perturbation_images or 0) < 0:
        parser.error("--faithfulness-images and --faithfulness-perturbation-images must not be negative")
    if args.demo == bool(args.data_dir):
        parser.error("give either --demo or --data-dir")
    output_dir = Path(args.output_dir or ("runs/demo" if args.demo else "runs/breakhis"))
    started = time.perf_counter()
    if args.demo:
        data_dir = HERE / "demo_data"
        if not (data_dir / "BreaKHis_v1").is_dir():
            make_demo_dataset(data_dir, **DEMO_DATA)
            print(f"demo data written to {data_dir}")
        mark_as_synthetic(data_dir)  # a tree made before the marker existed
    else:
        data_dir = Path(args.data_dir)
    python = sys.executable
    fold_files = args.fold_file or []
    n_folds = len(fold_files) if len(fold_files) > 1 else args.folds
    extra_args = [arg for path in fold_files for arg in ("--fold-file", path)] + extra_args
    if n_folds:
        run_folds(args, data_dir, output_dir, n_folds, extra_args)
    else:
        for arch, spec in ARCHS.items():
            # The caller's options come last: they override the demo's.
            model_args = (DEMO_MODEL_ARGS + DEMO_ARCH_ARGS.get(arch, []) if args.demo else []) + extra_args
            run_stage([python, str(HERE / spec.script), "--data-dir", str(data_dir), "--output-dir", str(output_dir),
                       *model_args])
        run_stage([python, str(HERE / FURTHER_SCRIPT), "--output-dir", str(output_dir)])
        run_faithfulness(args, output_dir)
    run_stage([python, str(HERE / "make_report.py"), "--output-dir", str(output_dir)])
    print(f"\npipeline finished in {time.perf_counter() - started:.0f} s; open {output_dir / REPORT_DIR / 'index.html'}")


if __name__ == "__main__":
    main()
