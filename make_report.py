"""Build the static HTML report of a finished run: comparison table, ROC curves, confusion matrices, training
curves, a Grad-CAM gallery of test images and per-patient recognition rates.

    python make_report.py --output-dir runs/demo

Reads the files the three model scripts and cancer_class_further.py wrote in --output-dir; writes
<output-dir>/report/index.html and its PNGs (a self-contained folder: open index.html in any browser).
"""

import argparse
from pathlib import Path

from common.core.console import HelpFormatter
from common.core.errors import run_main
from common.report.single import build_report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--output-dir", default="runs/breakhis", help="the run's output dir")
    parser.add_argument("--gallery-size", type=int, default=24, help="test images shown in the Grad-CAM gallery")
    args = parser.parse_args(argv)
    if args.gallery_size < 0:
        parser.error("--gallery-size must be at least 0")
    index = build_report(Path(args.output_dir), gallery_size=args.gallery_size)
    print(index)


if __name__ == "__main__":
    run_main(main)
