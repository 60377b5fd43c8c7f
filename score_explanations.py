"""How faithful are a finished run's explanations? Deletion and insertion AUC of every explanation method of every
CNN (Grad-CAM, Grad-CAM++, LayerCAM; LIME, Kernel SHAP and occlusion on the first few images) on a fixed sample of
held-out images, against a random and a centred-Gaussian map; the combined map against the soft vote; and the
share of the final MLP's decision carried by each CNN's map. Both kinds of run: a K-fold run's images are its
out-of-fold images, each scored with its own fold's models (common/stages/explanation_scores.py).

    python score_explanations.py --output-dir runs/breakhis
    python score_explanations.py --output-dir runs/breakhis --images 20 --perturbation-images 2 --device cuda

Writes faithfulness.md, faithfulness.json and faithfulness/<n>_<image>.png (every method of every CNN side by side)
into the run folder; make_report.py shows them.
"""

import argparse

from common.core.console import CommandParser
from common.core.errors import run_main
from common.core.fileio import check_writable_folder
from common.core.runfiles import FAITHFULNESS_DIR, FAITHFULNESS_JSON, FAITHFULNESS_MD
from common.run import open_run
from common.stages.explanation_scores import ScoringOptions, score_explanations
from common.training.runtime import pick_device

DEFAULTS = ScoringOptions()


def parse_args(argv=None) -> argparse.Namespace:
    parser = CommandParser(description=__doc__)
    parser.add_argument("--output-dir", default="runs/breakhis", help="a finished run, either kind")
    parser.add_argument("--images", type=int, default=DEFAULTS.images,
                        help="held-out images scored (a seeded sample; all if fewer)")
    parser.add_argument("--perturbation-images", type=int, default=DEFAULTS.perturbation_images,
                        help="of those, the first N also explained by LIME, Kernel SHAP and occlusion (0: none)")
    parser.add_argument("--samples", type=int, default=DEFAULTS.samples,
                        help="perturbed images drawn by LIME and Kernel SHAP per explanation")
    parser.add_argument("--steps", type=int, default=DEFAULTS.steps, help="deletion/insertion steps per curve")
    parser.add_argument("--figures", type=int, default=DEFAULTS.figures,
                        help="images drawn with every method side by side (of the perturbation images)")
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed,
                        help="seeds the sample, the random baseline and LIME/SHAP")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                        help="auto: CUDA if present, else MPS, else the CPU")
    args = parser.parse_args(argv)
    if min(args.images, args.steps, args.samples) < 1 or min(args.perturbation_images, args.figures) < 0:
        parser.error("--images, --steps and --samples must be at least 1, --perturbation-images and --figures "
                     "not negative")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    run = open_run(args.output_dir)
    check_writable_folder(run.output_dir, option="--output-dir")  # before the scoring, not after it
    options = ScoringOptions(images=args.images, perturbation_images=args.perturbation_images, samples=args.samples,
                             steps=args.steps, figures=args.figures, seed=args.seed)
    result = score_explanations(run, options, pick_device(args.device))
    print(f"wrote {run.output_dir / FAITHFULNESS_MD}, {FAITHFULNESS_JSON} and {len(result['figures'])} figure(s) in "
          f"{run.output_dir / FAITHFULNESS_DIR}")


if __name__ == "__main__":
    run_main(main)
