"""The final stage: an MLP on the three CNNs' combined Grad-CAM heatmaps, compared on the same patients with each
CNN alone and with their soft vote. Works on both kinds of run.

    python cancer_class_further.py --output-dir runs/breakhis            # a K-fold run (run_pipeline.py's default)
    python cancer_class_further.py --output-dir runs/breakhis_single_split   # a single-split run

K-fold run (folds.json): first each fold's own single-split stage, in fold_<k>/ (where missing or stale: a model
retrained since); then the out-of-fold set, every fitted row cross-fitted on the other folds' patients, pooled
metrics with patient-bootstrap 95 % intervals and paired differences (common/stages/cross_validation.py). Writes
cv_results.json, cv_results.md, oof_predictions.csv and final_classifier.pth (the MLP fitted on every out-of-fold
row, for new images).

Single-split run (split.json): the MLP learns from the rows of --fit-split, picks its best epoch on held-out rows,
and the test split is used once, for the table (common/stages/single_split.py). Writes results.json, results.md,
test_predictions.npz, final_classifier.pth and final_classifier_<other features>.pth.

Both: the heatmap MLP also on every other map type the heatmap files hold (Grad-CAM++, LayerCAM), same rows and
settings, with intervals and paired differences against Grad-CAM. Files are written all or nothing, the results
file last with the SHA-256 of the others.
"""

import argparse
from pathlib import Path

import torch

from common.cams.methods import CAM_METHODS
from common.core.console import CommandParser
from common.core.errors import PipelineError, run_main
from common.core.fileio import check_writable_folder, remove_stale_temporaries
from common.evaluation.conformal import DEFAULT_ALPHA
from common.fusion.features import FEATURE_SETS
from common.fusion.mlp import MlpSettings
from common.models.registry import MODEL_ORDER
from common.run import open_run
from common.stages.cross_validation import results_markdown, run_cross_validation
from common.stages.single_split import FinalStageOptions, results_current, run_single_split
from common.training.runtime import pick_device

MLP = MlpSettings()  # the defaults, stated once there


def parse_args(argv=None) -> argparse.Namespace:
    parser = CommandParser(description=__doc__)
    parser.add_argument("--output-dir", default="runs/breakhis", help="the run: the model scripts' output dir")
    parser.add_argument("--heatmaps", nargs=len(MODEL_ORDER), metavar=tuple(arch.upper() for arch in MODEL_ORDER),
                        help="single split: heatmap files to use instead of the run's (default: its "
                             "heatmaps_<arch>.npz)")
    parser.add_argument("--grid-size", type=int, default=MLP.grid_size,
                        help="maps are resized to S x S (VGG-16 gives 14x14 at 224 px, the other two 7x7)")
    parser.add_argument("--cam-method", choices=CAM_METHODS, default="gradcam",
                        help="which stored maps the MLP reads (the model scripts' --cam-methods must have made them)")
    parser.add_argument("--features", choices=FEATURE_SETS, default=FEATURE_SETS[0],
                        help="input of final_classifier.pth; the other set is trained too, for the table")
    parser.add_argument("--fit-split", choices=["train", "val"], default="train",
                        help="single split (and each fold's own table): rows the MLP learns from; train: best epoch "
                             "on val; val: best epoch on a patient-level quarter of val held out from fitting "
                             "(docs/cross_validation.md)")
    parser.add_argument("--hidden-sizes", default=",".join(map(str, MLP.hidden_sizes)),
                        help="comma-separated dense layer widths")
    parser.add_argument("--dropout", type=float, default=MLP.dropout, help="dropout after each dense layer")
    parser.add_argument("--epochs", type=int, default=MLP.epochs, help="MLP training epochs")
    parser.add_argument("--batch-size", type=int, default=MLP.batch_size, help="MLP batch size")
    parser.add_argument("--lr", type=float, default=MLP.lr, help="MLP learning rate")
    parser.add_argument("--weight-decay", type=float, default=MLP.weight_decay,
                        help="decoupled weight decay (AdamW) or L2 (Adam)")
    parser.add_argument("--optimizer", choices=["adam", "adamw"], default=MLP.optimizer, help="MLP optimizer")
    parser.add_argument("--seed", type=int, default=MLP.seed,
                        help="seeds the MLPs' init and batch order, the select patients and the bootstrap")
    parser.add_argument("--resamples", type=int, default=2000, help="patient-bootstrap resamples of the intervals")
    parser.add_argument("--alpha", type=float, default=DEFAULT_ALPHA,
                        help="error rate of the conformal sets: a held-out case's set misses its true label for at "
                             "most this share of cases (docs/calibration.md)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                        help="auto: CUDA if present, else MPS, else the CPU")
    args = parser.parse_args(argv)
    try:
        args.hidden_sizes = tuple(int(size) for size in args.hidden_sizes.split(",") if size.strip())
    except ValueError:
        parser.error(f"--hidden-sizes {args.hidden_sizes!r}: expected comma-separated integers, e.g. 256,64")
    if min(args.grid_size, args.epochs, args.batch_size, args.resamples, *args.hidden_sizes) < 1 or args.lr <= 0 \
            or args.weight_decay < 0 or not 0 <= args.dropout < 1 or not 0 < args.alpha < 1:
        parser.error("--grid-size, --epochs, --batch-size, --resamples, --hidden-sizes and --lr must be positive, "
                     "--weight-decay not negative, --dropout in [0, 1), --alpha in (0, 1)")
    return args


def final_stage_options(args: argparse.Namespace) -> FinalStageOptions:
    return FinalStageOptions(settings=MlpSettings.from_args(args), cam_method=args.cam_method,
                             features=args.features, fit_split=args.fit_split, resamples=args.resamples,
                             alpha=args.alpha,
                             heatmap_files=dict(zip(MODEL_ORDER, args.heatmaps)) if args.heatmaps else None)


def main(argv=None) -> None:
    args = parse_args(argv)
    if Path(args.output_dir).is_dir():
        remove_stale_temporaries(args.output_dir)  # never another live run's (see the function)
    run = open_run(args.output_dir)
    check_writable_folder(run.output_dir, option="--output-dir")  # before the training, not after it
    options = final_stage_options(args)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    if run.kind == "single":
        print(f"\n{run_single_split(run, options, device)}")
        return
    if options.heatmap_files:
        raise PipelineError("--heatmaps names one split's files; a K-fold run reads each fold's own")
    for fold in run.folds:
        fold_run = open_run(run.model_dir(fold))
        if results_current(fold_run):
            print(f"fold {fold}: {fold_run.results_file} is current, kept")
            continue
        print(f"\nfold {fold}: the final stage in {fold_run.output_dir}")
        remove_stale_temporaries(fold_run.output_dir)
        run_single_split(fold_run, options, device)
    results = run_cross_validation(run, options=options, device=device)
    print(results_markdown(results))
    print(f"wrote {run.results_file}, its tables and {run.output_dir / 'final_classifier.pth'} (the heatmap MLP "
          "fitted on every out-of-fold row, for new images)")


if __name__ == "__main__":
    run_main(main)
