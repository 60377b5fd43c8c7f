"""The whole demo pipeline's wall time, and a profile of where one model script's time goes.

    python bench/bench_pipeline.py              # demo data: 4 patients per class, 6 images each, 4 magnifications
    python bench/bench_pipeline.py --quick      # 2 patients per class, 3 images each

1. Synthetic BreaKHis tree (common.data.demo.make_demo_dataset) in a temporary folder; then each script as the
   user runs it, in its own process, all writing to one output dir:
       cancer_class_{resnet_50,densenet_121,vgg_16}.py --weights none --image-size 64 --epochs 1 --workers 0
       cancer_class_further.py (if the file exists)
2. cProfile of one model script (ResNet-50, same options, fresh output dir) run in-process through
   common.training.model_script.run_model_script: the top functions by cumulative and by own (total) time.
"""

import argparse
import cProfile
import io
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _timing  # noqa: F401  (puts the repository root on sys.path)
from _timing import ROOT, table

from common.core.runfiles import FURTHER_SCRIPT
from common.data.demo import make_demo_dataset
from common.models.registry import ARCHS

MODEL_SCRIPTS = tuple(spec.script for spec in ARCHS.values())


def model_options(data_dir: Path, output_dir: Path) -> list[str]:
    return ["--data-dir", str(data_dir), "--output-dir", str(output_dir), "--weights", "none", "--image-size", "64",
            "--epochs", "1", "--workers", "0"]


def run_script(script: str, options: list[str]) -> tuple[float, int, str]:
    started = time.perf_counter()
    completed = subprocess.run([sys.executable, str(ROOT / script), *options], cwd=ROOT, capture_output=True,
                               text=True, check=False)
    return time.perf_counter() - started, completed.returncode, completed.stderr


def bench_wall_time(data_dir: Path, output_dir: Path, generate_seconds: float) -> None:
    rows, total = [["generate demo data", f"{generate_seconds:.1f}", "0"]], generate_seconds
    scripts = [(script, model_options(data_dir, output_dir)) for script in MODEL_SCRIPTS]
    if (ROOT / FURTHER_SCRIPT).exists():
        scripts.append((FURTHER_SCRIPT, ["--output-dir", str(output_dir)]))
    else:
        print(f"({FURTHER_SCRIPT} does not exist yet: skipped)")
    for script, options in scripts:
        seconds, returncode, stderr = run_script(script, options)
        total += seconds
        rows.append([script, f"{seconds:.1f}", str(returncode)])
        if returncode != 0:
            print(f"{script} failed (exit {returncode}):\n{stderr[-2000:]}")
    rows.append(["whole pipeline", f"{total:.1f}", ""])
    print("\n1. demo pipeline wall time (each script in its own process, 64 px, 1 epoch, random init, CPU)")
    print(table(["step", "seconds", "exit"], rows))


def bench_profile(data_dir: Path, output_dir: Path, top: int) -> None:
    from common.training.model_script import run_model_script  # imported here so the import is not profiled

    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.runcall(run_model_script, arch="resnet50", description="profiled run",
                     argv=model_options(data_dir, output_dir))
    seconds = time.perf_counter() - started
    print(f"\n2. cProfile of cancer_class_resnet_50.py's run_model_script ({seconds:.1f} s with profiling)")
    for order in ("cumulative", "tottime"):
        stream = io.StringIO()
        pstats.Stats(profiler, stream=stream).strip_dirs().sort_stats(order).print_stats(top)
        listing = stream.getvalue()
        print(f"\ntop {top} by {order} time:\n" + listing[listing.index("   ncalls"):].rstrip())
    print_stages(pstats.Stats(profiler), seconds)


# Where the pipeline's own stages land in the profile (cumulative seconds; generators count their own frames).
STAGES = {
    ("train.py", "train_one_epoch"): "training epochs (model forward + backward + optimizer)",
    ("~", "<built-in method torch._fused_adamw_>"): "  of which the AdamW step (fused kernel)",
    ("train.py", "evaluate"): "validation passes",
    ("heatmaps.py", "export_heatmaps"): "heatmap export (Grad-CAM over every image)",
    ("models.py", "body"): "  of which the no-grad body forward",
    ("heatmaps.py", "save_overlays"): "overlay PNGs",
    ("dataset.py", "build_cache"): "decoded-image cache build (decode + resize, once)",
    ("transforms.py", "augment_batch"): "batch augmentation (flips + rotation)",
    ("transforms.py", "normalize_batch"): "eval normalisation",
    ("fileio.py", "cpu_snapshot"): "checkpoint snapshots (what the loop waits for)",
    ("fileio.py", "wait"): "waits for the checkpoint writer thread",
    ("fileio.py", "save_torch"): "checkpoint writes on this thread (the writer's is not profiled)",
    ("data.py", "prepare_split"): "indexing + split file",
}


def print_stages(stats: pstats.Stats, seconds: float) -> None:
    totals = dict.fromkeys(STAGES, 0.0)
    for (path, _line, function), (_calls, _primitive, _own, cumulative, _callers) in stats.stats.items():
        key = (Path(path).name, function)
        if key in totals:
            totals[key] += cumulative
    print(f"\nthe pipeline's stages (cumulative s of {seconds:.1f} s):")
    print(table(["stage", "function", "seconds", "share"],
                [[label, f"{file}:{name}", f"{totals[file, name]:.2f}", f"{100 * totals[file, name] / seconds:.1f}%"]
                 for (file, name), label in STAGES.items()]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smaller demo dataset")
    parser.add_argument("--top", type=int, default=15, help="functions listed per profile order")
    parser.add_argument("--skip-profile", action="store_true")
    parser.add_argument("--profile-only", action="store_true", help="skip the wall-time runs")
    args = parser.parse_args()
    patients, images = (3, 3) if args.quick else (4, 6)  # 3 patients per class: one for each split
    with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as scratch:
        started = time.perf_counter()
        data_dir = make_demo_dataset(Path(scratch) / "demo_data", patients_per_class=patients,
                                     images_per_patient=images)
        generate_seconds = time.perf_counter() - started
        count = sum(1 for _ in data_dir.rglob("*.png"))
        print(f"demo data: {count} images (96x64 px), {2 * patients} patients, 4 magnifications")
        if not args.profile_only:
            bench_wall_time(data_dir, Path(scratch) / "run", generate_seconds)
        if not args.skip_profile:
            bench_profile(data_dir, Path(scratch) / "profiled_run", args.top)


if __name__ == "__main__":
    main()
