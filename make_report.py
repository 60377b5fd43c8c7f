"""Build the static HTML report of a finished run, either kind: the comparison table (a K-fold run's with patient-
bootstrap intervals), ROC curves, the Grad-CAM gallery of held-out images, the faithfulness of the explanations
(once score_explanations.py has run) and, for a K-fold run, each fold's own page.

    python make_report.py --output-dir runs/breakhis

Writes <output-dir>/report/index.html and its files (a self-contained folder: open index.html in any browser).
"""

from pathlib import Path

from common.core.console import CommandParser
from common.core.errors import run_main
from common.report.build import GALLERY_SIZE, build_report


def main(argv=None) -> None:
    parser = CommandParser(description=__doc__)
    parser.add_argument("--output-dir", default="runs/breakhis", help="the finished run")
    parser.add_argument("--gallery-size", type=int, default=GALLERY_SIZE,
                        help="held-out images shown in the Grad-CAM gallery")
    args = parser.parse_args(argv)
    if args.gallery_size < 0:
        parser.error("--gallery-size must be at least 0")
    index = build_report(Path(args.output_dir), gallery_size=args.gallery_size)
    print(index)


if __name__ == "__main__":
    run_main(main)
