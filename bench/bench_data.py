"""Data side: pipeline throughput on real PNGs, train-step overhead, and heatmap-export memory.

    python bench/bench_data.py                      # ~1,000 images, 224 px
    python bench/bench_data.py --quick              # fewer images and steps

1. Throughput, one CPU core (torch.set_num_threads(1), workers=0), on ../shared/breakhis_sample (60 real
   700x460 PNGs) repeated to --images records, batch 32, train-time augmentation:
     plain   make_batches(cache=None): per image PNG decode + PIL resize/flips/rotation + ToTensor/Normalize;
     cached  make_batches(cache=...): gather uint8 rows from the decoded cache + augment_batch on the device,
             here the CPU itself (flips + bilinear rotation by grid_sample, a few images per call on a CPU);
     cached, gather only: the same loop with the augmentation call replaced by the identity. It measures
             only the CPU's share of the work (gather + tensor) that remains when a GPU does the augmentation;
             no GPU work is measured here, so it is a bound on the host side, not a GPU figure
             (bench/gpu_check.py measures the GPU path on a GPU);
   plus the one-time cost of building the cache (build_cache(mode='memory'), one core).
2. Train-step overhead, with this CPU as the training device: one epoch of ResNet-50 at 64 px (batch 32,
   AdamW, common.training.loop.train_one_epoch) fed by the cached pipeline vs the same steps over the same batches
   already in memory. A CPU step of ~1 s hides almost any data cost, so this says little about a GPU, where
   steps take milliseconds (bench/gpu_check.py measures the share of GPU step time spent waiting for data).
   ResNet-50 is one of the pipeline's own models; 64 px keeps a CPU epoch short, and the data and the model
   costs both scale with the pixel count, so their ratio is about the one at 224 px on the same device. A tiny
   3-layer CNN is shown too, as a stress case where the model is nearly free and any data cost shows.
3. Memory: peak RSS (ru_maxrss) of common.cams.heatmap_file.export_heatmaps over N and 4N images (ResNet-50, 32 px,
   plain path), each in a fresh subprocess. Flat means the export does not hold every batch.
"""

import argparse
import contextlib
import io
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _timing  # noqa: F401  (puts the repository root on sys.path)
import torch
from _timing import ROOT, interleaved_medians, table
from torch import nn

import common.data.images as dataset_module
from common.cams.heatmap_file import export_heatmaps
from common.data.demo import make_demo_dataset
from common.data.images import build_cache, make_batches
from common.data.partition import Split, partition_digest
from common.data.records import Record, index_dataset
from common.models.registry import build_model
from common.training.loop import train_one_epoch
from common.training.runtime import Runtime

SAMPLE = ROOT.parent / "shared" / "breakhis_sample"
CPU = torch.device("cpu")


def repeated_records(data_dir: Path, count: int) -> tuple[Path, list[Record]]:
    indexed = index_dataset(data_dir)
    copies = math.ceil(count / len(indexed.records))
    return indexed.root, (indexed.records * copies)[:count]


def run_epoch(batches, epoch: int = 0, limit: int | None = None) -> int:
    """Draw batches (at most `limit`); return the number of images."""
    images_seen = 0
    for step, (images, _labels, _indices) in enumerate(batches.batches(epoch)):
        images_seen += len(images)
        if limit is not None and step + 1 >= limit:
            break
    return images_seen


@contextlib.contextmanager
def augmentation_replaced_by_identity():
    """CachedBatches with its augmentation call replaced by the identity: the CPU share left when a GPU augments
    (the GPU's own work is not measured)."""
    original = dataset_module.augment_batch
    dataset_module.augment_batch = lambda pixels, generator=None: pixels
    try:
        yield
    finally:
        dataset_module.augment_batch = original


# ---------------------------------------------------------------------------------------------- throughput


def bench_throughput(args) -> None:
    torch.set_num_threads(1)  # per core
    root, records = repeated_records(args.data_dir, args.images)
    common = dict(train=True, image_size=args.image_size, batch_size=32, workers=0, device=CPU, seed=0)
    indices = list(range(len(records)))
    plain = make_batches(root, records, indices, cache=None, **common)
    plain_batches = max(1, args.plain_images // 32)

    wall_start, cpu_start = time.perf_counter(), time.process_time()
    cache = build_cache(root, records, image_size=args.image_size, mode="memory", cache_dir=None, workers=0)
    build_wall, build_cpu = time.perf_counter() - wall_start, time.process_time() - cpu_start
    cached = make_batches(root, records, indices, cache=cache, **common)

    def gather_only():
        with augmentation_replaced_by_identity():
            return run_epoch(cached)

    medians = interleaved_medians({
        "plain": lambda: run_epoch(plain, limit=plain_batches),
        "cached": lambda: run_epoch(cached),
        "host": gather_only,
    }, repeats=args.repeats)
    counts = {"plain": min(plain_batches * 32, len(records)), "cached": len(records), "host": len(records)}
    labels = {"plain": "plain (decode + PIL per image)", "cached": "cached, augmentation on this CPU",
              "host": "cached, gather only: no augmentation (not a GPU figure)"}
    rows = []
    for name, label in labels.items():
        cpu_rate = counts[name] / medians[name].cpu
        wall_rate = counts[name] / medians[name].wall
        rows.append([label, f"{cpu_rate:.0f}", f"{cpu_rate * medians['plain'].cpu / counts['plain']:.1f}x",
                     f"{wall_rate:.0f}", f"{wall_rate * medians['plain'].wall / counts['plain']:.1f}x"])
    rows.append(["one-time cache build (decode + resize)", f"{len(records) / build_cpu:.0f}", "",
                 f"{len(records) / build_wall:.0f}", f"{build_wall:.1f} s once, {cache.nbytes / 2**20:.0f} MiB"])
    print(f"\n1. data pipeline, one core: {len(records)} records ({len(set(r.path for r in records))} real "
          f"700x460 PNGs repeated; plain path timed on {counts['plain']}), {args.image_size} px, batch 32, "
          f"train augmentation, median of {args.repeats} interleaved repeats")
    print(table(["path", "images/CPU-s", "vs plain", "images/wall-s", "vs plain"], rows))
    plain_epoch = len(records) * medians["plain"].cpu / counts["plain"]
    print(f"images/CPU-s: per core of CPU time actually used (steady on a shared machine); images/wall-s: "
          f"what this run got.\nThe cache build pays for itself after "
          f"{build_cpu / (plain_epoch - medians['cached'].cpu):.2f} epoch(s). Target: cached >= 10x plain per core.")


# ----------------------------------------------------------------------------------------- train overhead


class ReadyBatches:
    """The same batches, already augmented and in memory: the data cost taken out."""

    def __init__(self, batches: list):
        self.items = batches

    def __len__(self) -> int:
        return len(self.items)

    def batches(self, epoch: int = 0):
        yield from self.items


def tiny_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(64, 2))


def bench_train_overhead(args) -> None:
    torch.set_num_threads(args.train_threads)
    image_size, batch_size = 64, 32
    root, records = repeated_records(args.data_dir, 60)
    cache = build_cache(root, records, image_size=image_size, mode="memory", cache_dir=None, workers=0)
    indices = [i % len(records) for i in range(args.train_steps * batch_size)]  # rows may repeat
    pipeline = make_batches(root, records, indices, train=True, image_size=image_size, batch_size=batch_size,
                            workers=0, device=CPU, seed=0, cache=cache)
    ready = ReadyBatches(list(pipeline.batches(0)))
    runtime, scaler = Runtime(CPU), torch.amp.GradScaler("cpu", enabled=False)
    rows = []
    for name, model in (("resnet50 @ 64 px", build_model("resnet50", "none")), ("tiny CNN @ 64 px", tiny_cnn())):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        loss_fn = nn.CrossEntropyLoss()

        def epoch(batches, model=model, optimizer=optimizer, loss_fn=loss_fn):
            with contextlib.redirect_stderr(io.StringIO()):  # the loop's progress bar
                train_one_epoch(model, batches, optimizer, loss_fn, epoch=0, runtime=runtime, scaler=scaler)

        epoch(ready)  # warm-up: first-call allocations, optimizer state
        run_epoch(pipeline)
        repeats = args.repeats if name.startswith("resnet") else max(args.repeats, 5)
        medians = interleaved_medians({"pipeline": lambda: epoch(pipeline), "ready": lambda: epoch(ready),
                                       "data": lambda: run_epoch(pipeline)}, repeats=repeats, warmup=False)
        for clock in ("cpu", "wall"):
            seconds = {key: getattr(timing, clock) for key, timing in medians.items()}
            rows.append([name, clock, f"{seconds['pipeline']:.2f}", f"{seconds['ready']:.2f}",
                         f"{seconds['pipeline'] / seconds['ready']:.3f}x", f"{1000 * seconds['data'] / len(ready):.1f}",
                         f"{1000 * seconds['ready'] / len(ready):.0f}",
                         f"{(seconds['ready'] + seconds['data']) / seconds['ready']:.3f}x"])
    print(f"\n2. train-step overhead, the CPU as training device: {args.train_steps} steps of batch {batch_size}, "
          f"{torch.get_num_threads()} thread(s), cached pipeline (augmentation on the CPU) vs ready tensors, median "
          "of interleaved repeats (a CPU step hides most data cost: not a GPU figure)")
    print(table(["model", "clock", "pipeline s", "ready s", "ratio", "data ms/step", "step ms",
                 "(step+data)/step"], rows))
    print("ratio = measured epochs; (step+data)/step = the same from the parts (data-only epochs timed alone), "
          "steadier. Target: <= 1.05x for the pipeline's own model.")


# -------------------------------------------------------------------------------------------------- memory


def rss_child(count: int, image_size: int, scratch: Path) -> None:
    """Runs in a fresh process: export heatmaps over `count` records, print peak RSS before and after, in KiB."""
    torch.set_num_threads(1)
    data_dir = scratch / "data"
    root, records = repeated_records(data_dir, count)
    splits = ["test"] * len(records)
    split = Split(root, records, splits, {}, partition_digest(records, splits, {}))
    model = build_model("resnet50", "none")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out_path = scratch / f"heatmaps_{count}.npz"
    export_heatmaps(model, "resnet50", split, out_path, image_size=image_size, batch_size=32, workers=0,
                    device=CPU, cache=None, target_rule="predicted")
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"images": count, "rss_before_kib": before, "rss_peak_kib": after,
                      "vm_hwm_kib": peak_rss_status_kib()}))


def run_fresh(command: list[str]) -> subprocess.CompletedProcess:
    """Run `command` as a grandchild of a lean Python launcher.

    Linux carries a process's peak RSS across fork + exec (ru_maxrss of a child starts at the RSS of the
    process it was forked from), so a child forked straight from this benchmark, which holds models and
    caches, would report this process's size. The launcher is small, so its children start small.
    """
    launcher = "import subprocess, sys; sys.exit(subprocess.run(sys.argv[1:]).returncode)"
    return subprocess.run([sys.executable, "-c", launcher, *command], capture_output=True, text=True, check=False)


def peak_rss_status_kib() -> int | None:
    """VmHWM from /proc/self/status (Linux): the peak RSS of this process image alone, as a cross-check."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return None


def bench_memory(args) -> None:
    with tempfile.TemporaryDirectory(prefix="bench_rss_") as scratch:
        make_demo_dataset(Path(scratch) / "data", patients_per_class=2, images_per_patient=4, magnifications=("100",),
                          width=96, height=64, seed=0)
        results = []
        for count in (args.rss_images, 4 * args.rss_images):
            completed = run_fresh([sys.executable, __file__, "--rss-child", str(count), "--rss-scratch", scratch])
            if completed.returncode != 0:
                raise SystemExit(f"RSS child failed:\n{completed.stderr[-3000:]}")
            results.append(json.loads(completed.stdout.strip().splitlines()[-1]))
    small, large = results
    growth = (large["rss_peak_kib"] - small["rss_peak_kib"]) / (large["images"] - small["images"])
    print("\n3. heatmap export memory: ResNet-50, 32 px, plain path, fresh process each, peak RSS (ru_maxrss)")
    print(table(["images", "ru_maxrss before export MiB", "ru_maxrss peak MiB", "VmHWM peak MiB"], [
        [str(r["images"]), f"{r['rss_before_kib'] / 1024:.1f}", f"{r['rss_peak_kib'] / 1024:.1f}",
         f"{r['vm_hwm_kib'] / 1024:.1f}" if r["vm_hwm_kib"] else "n/a"] for r in results]))
    print(f"peak ratio 4N/N = {large['rss_peak_kib'] / small['rss_peak_kib']:.3f} (flat = 1.0, proportional = 4.0); "
          f"growth {growth:.2f} KiB per extra image")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=SAMPLE, help="real BreaKHis PNGs (default: the shared sample)")
    parser.add_argument("--images", type=int, default=1000, help="records (the sample repeated)")
    parser.add_argument("--plain-images", type=int, default=1000, help="images timed on the slow plain path")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=6)
    parser.add_argument("--train-threads", type=int, default=1, help="1: CPU time is a steady measure")
    parser.add_argument("--rss-images", type=int, default=500, help="N (the export also runs over 4N)")
    parser.add_argument("--only", choices=["throughput", "train", "memory"], help="run one part")
    parser.add_argument("--quick", action="store_true", help="300 records, 128 timed on the plain path, "
                                                              "3 train steps, N = 128")
    parser.add_argument("--rss-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rss-scratch", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        return rss_child(args.rss_child, 32, args.rss_scratch)
    if args.quick:
        args.images, args.plain_images, args.train_steps, args.rss_images = 300, 128, 3, 128
    if not args.data_dir.exists():
        raise SystemExit(f"{args.data_dir} not found: pass --data-dir with real BreaKHis PNGs")
    parts = [args.only] if args.only else ["throughput", "train", "memory"]
    if "throughput" in parts:
        bench_throughput(args)
    if "train" in parts:
        bench_train_overhead(args)
    if "memory" in parts:
        bench_memory(args)


if __name__ == "__main__":
    main()
