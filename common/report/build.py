"""Build a run's report, whatever its kind (make_report.py): the single-split page (common/report/single.py) or the
K-fold page with its folds' pages (common/report/kfold.py).

The report folder is self-contained (index.html, PNG plots, gallery/ thumbnails; relative links, inline CSS, no
JavaScript): it opens from disk and can be zipped or copied as it is. It is built in a staging folder beside
report/ and swapped in only when complete, so a build that fails midway (a bad image, a full disk) leaves the
previous report as it was.
"""

from pathlib import Path

from common.core.fileio import check_writable_folder, remove_stale_temporaries, scratch_folder
from common.core.runfiles import REPORT_DIR
from common.report.html import swap_in
from common.report.kfold import write_kfold_report
from common.report.single import load_single_report, write_single_report
from common.run import open_run

GALLERY_SIZE = 24  # images in the run's gallery


def build_report(output_dir: Path, *, gallery_size: int = GALLERY_SIZE) -> Path:
    """Write <output_dir>/report/index.html and its files from the run's files; return the index.html path."""
    run = open_run(output_dir)
    report_dir = run.output_dir / REPORT_DIR
    check_writable_folder(run.output_dir, option="--output-dir")  # before the work, not after it
    remove_stale_temporaries(run.output_dir)  # a killed build's staging folder (never a live build's)
    # Built aside and swapped in when complete: a build that fails midway leaves the previous report as it was.
    with scratch_folder(run.output_dir, REPORT_DIR) as staging:
        if run.kind == "kfold":
            write_kfold_report(run, staging, gallery_size=gallery_size)
        else:
            write_single_report(load_single_report(run), staging, gallery_size=gallery_size)
        swap_in(staging, report_dir)
    return report_dir / "index.html"
