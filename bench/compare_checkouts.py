"""Each user-facing stage timed in two checkouts of this project on the same synthetic data, alternately.

    python bench/compare_checkouts.py --before /path/to/older/checkout            # 3 repeats
    python bench/compare_checkouts.py --before OLD --after NEW --repeats 5

For a change that should not cost speed (a reorganisation): did any stage get slower? Both checkouts run the same
single-split pipeline, each stage a command in its own process started from the checkout's folder, on one
synthetic BreaKHis tree (made once, by the newer checkout):

    the three model scripts   --weights none --image-size 64 --epochs 1 --batch-size 8 --workers 0
    cancer_class_further.py   the final MLP stage (defaults)
    explanation scores        score_explanations.py, or `python -m common.faithfulness` in checkouts older than it
                              (--images 8 --perturbation-images 1)
    make_report.py            the report
    predict.py                one image
    viewer start-up           app.py's load_viewer_run + build_app (what `python app.py` does before listening)

Every repeat runs the whole pipeline once per checkout into a fresh output folder, the checkouts' order rotated
from one repeat to the next, so a busy spell slows both alike. Each stage is summarised by its median wall time
and the median CPU time of its process; the ratio after/before of the medians is printed per stage.
"""

import argparse
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _timing  # noqa: F401  (puts the repository root on sys.path)
from _timing import ROOT, table

from common.core.runfiles import FURTHER_SCRIPT
from common.models.registry import ARCHS

VIEWER_STARTUP = ("import sys; from pathlib import Path; import torch; sys.path.insert(0, '.'); import app; "
                  "app.build_app(app.load_viewer_run(Path(sys.argv[1]), device=torch.device('cpu')))")


def stage_commands(checkout: Path, data_dir: Path, run_dir: Path) -> list[tuple[str, list[str]]]:
    """(stage name, argv) in pipeline order, in the form this checkout understands."""
    model_options = ["--data-dir", str(data_dir), "--output-dir", str(run_dir), "--weights", "none",
                     "--image-size", "64", "--epochs", "1", "--batch-size", "8", "--workers", "0"]
    faithfulness = ["score_explanations.py"] if (checkout / "score_explanations.py").exists() \
        else ["-m", "common.faithfulness"]
    image = next(path for path in sorted(data_dir.rglob("*.png")))
    return [*((spec.script, [spec.script, *model_options]) for spec in ARCHS.values()),
            (FURTHER_SCRIPT, [FURTHER_SCRIPT, "--output-dir", str(run_dir)]),
            ("explanation scores", [*faithfulness, "--output-dir", str(run_dir), "--images", "8",
                                    "--perturbation-images", "1"]),
            ("make_report.py", ["make_report.py", "--output-dir", str(run_dir)]),
            ("predict.py (1 image)", ["predict.py", str(image), "--output-dir", str(run_dir), "--device", "cpu"]),
            ("viewer start-up", ["-c", VIEWER_STARTUP, str(run_dir)])]


def run_stage(checkout: Path, argv: list[str]) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system, all threads) of one command run from `checkout`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    completed = subprocess.run([sys.executable, *argv], cwd=checkout, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if completed.returncode != 0:
        sys.exit(f"{checkout}: {' '.join(argv[:2])} failed (exit {completed.returncode}):\n{completed.stderr[-3000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True, help="the older checkout (a folder)")
    parser.add_argument("--after", type=Path, default=ROOT, help="the newer checkout (default: this one)")
    parser.add_argument("--repeats", type=int, default=3, help="whole pipelines per checkout")
    args = parser.parse_args()
    checkouts = {"before": args.before.resolve(), "after": args.after.resolve()}
    with tempfile.TemporaryDirectory(prefix="compare_checkouts_") as work:
        work = Path(work)
        data_dir = work / "data"
        subprocess.run([sys.executable, "make_demo_data.py", str(data_dir), "--patients-per-class", "4",
                        "--images-per-patient", "4", "--magnifications", "100,400", "--width", "128",
                        "--height", "128"], cwd=checkouts["after"], check=True, capture_output=True)
        wall: dict[tuple[str, str], list[float]] = {}
        cpu: dict[tuple[str, str], list[float]] = {}
        names = list(checkouts)
        for repeat in range(args.repeats):
            order = names[repeat % 2:] + names[:repeat % 2]
            for name in order:
                run_dir = work / f"run_{name}"
                shutil.rmtree(run_dir, ignore_errors=True)
                for stage, argv in stage_commands(checkouts[name], data_dir, run_dir):
                    seconds, cpu_seconds = run_stage(checkouts[name], argv)
                    wall.setdefault((stage, name), []).append(seconds)
                    cpu.setdefault((stage, name), []).append(cpu_seconds)
                print(f"repeat {repeat + 1}/{args.repeats}: {name} done", flush=True)
    stages = list(dict.fromkeys(stage for stage, _ in wall))

    def spread(values: list[float]) -> str:  # the median and, in brackets, the range of the repeats
        return f"{statistics.median(values):.1f} [{min(values):.1f}-{max(values):.1f}]"

    rows = []
    for stage in stages:
        w = {name: statistics.median(wall[stage, name]) for name in names}
        c = {name: statistics.median(cpu[stage, name]) for name in names}
        rows.append([stage, spread(wall[stage, "before"]), spread(wall[stage, "after"]),
                     f"{w['after'] / w['before']:.2f}x", spread(cpu[stage, "before"]), spread(cpu[stage, "after"]),
                     f"{c['after'] / c['before']:.2f}x"])
    total = {name: sum(statistics.median(wall[stage, name]) for stage in stages) for name in names}
    rows.append(["all stages", f"{total['before']:.1f}", f"{total['after']:.1f}",
                 f"{total['after'] / total['before']:.2f}x", "", "", ""])
    print(f"\nbefore: {checkouts['before']}\nafter:  {checkouts['after']}\n"
          f"seconds per stage (each its own process): median of {args.repeats} repeats [their range]; "
          "CPU = user + system")
    print(table(["stage", "wall before", "wall after", "after/before", "CPU before", "CPU after", "after/before"],
                rows))


if __name__ == "__main__":
    main()
