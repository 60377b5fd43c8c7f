"""Checkpoint writes at the end of each epoch: in line (the straightforward way) vs on a background thread
(common.core.fileio.BackgroundWriter, which the model scripts use: the training loop waits only for a CPU snapshot).

    python bench/bench_checkpoint.py            # ResNet-50 and VGG-16, 3 epochs of 3 steps each
    python bench/bench_checkpoint.py --quick    # ResNet-50 only, 2 epochs of 2 steps

Each epoch: real training steps (random init, 64 px, batch 16, AdamW, one thread), then the files a model
script writes when val improved: fine_tuned_<arch>.pth (the weights) and training_state_<arch>.pth (weights,
AdamW moments, schedule) for --resume, each atomically, into a temporary folder.

1. Blocked seconds per epoch end: how long the training loop waits (in line: both torch.save calls; background:
   the snapshot, plus any wait for the previous epoch's write).
2. Wall seconds for the whole run (training + writes), median of interleaved repeats, and the ratio.
On a CPU-only machine the writer thread shares the cores and the memory bus with the training steps. On a GPU
machine the CPU is mostly idle while the GPU trains, but the snapshot is then a device-to-host copy: measure it
there rather than assume the gain.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import _timing  # noqa: F401  (puts the repository root on sys.path)
import torch
from _timing import interleaved_medians, table

from common.core.fileio import BackgroundWriter, save_torch
from common.models.registry import build_model


class InLineWriter:
    """The straightforward way: torch.save each file (atomically) before training goes on."""

    def save(self, files) -> None:
        for obj, target in files:
            save_torch(obj, target)

    def wait(self) -> None:
        pass


def run(arch: str, writer, epochs: int, steps: int, folder: Path, blocked: dict[str, list[float]]) -> None:
    torch.manual_seed(0)
    model = build_model(arch, "none")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    images, labels = torch.randn(16, 3, 64, 64), torch.randint(0, 2, (16,))
    for epoch in range(epochs):
        model.train()
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
        started = time.perf_counter()
        weights = model.state_dict()  # as common.training.loop.fit does: one weights dict in both files
        writer.save([({"model": weights, "epoch": epoch + 1}, folder / f"fine_tuned_{arch}.pth"),
                     ({"model": weights, "optimizer": optimizer.state_dict(), "epoch": epoch + 1},
                      folder / f"training_state_{arch}.pth")])
        blocked["epoch ends"].append(time.perf_counter() - started)
    started = time.perf_counter()
    writer.wait()  # the run is not over before its last files are on disk
    blocked["final wait"].append(time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["resnet50", "vgg16"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="training steps per epoch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="resnet50 only, 2 epochs of 2 steps, 2 repeats")
    args = parser.parse_args()
    if args.quick:
        args.archs, args.epochs, args.steps, args.repeats = ["resnet50"], 2, 2, 2
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_checkpoint_") as scratch:
        for arch in args.archs:
            names = ("in line", "background")
            blocked = {name: {"epoch ends": [], "final wait": []} for name in names}
            folders = {name: Path(scratch) / arch / name.replace(" ", "_") for name in names}
            for folder in folders.values():
                folder.mkdir(parents=True)
            writers = {"in line": InLineWriter(), "background": BackgroundWriter()}
            medians = interleaved_medians({
                name: (lambda name=name: run(arch, writers[name], args.epochs, args.steps, folders[name],
                                             blocked[name]))
                for name in names}, repeats=args.repeats)
            megabytes = sum(path.stat().st_size for path in folders["in line"].iterdir()) / 2**20
            epoch_end = {name: statistics.median(blocked[name]["epoch ends"]) for name in names}
            final_wait = statistics.median(blocked["background"]["final wait"])
            rows.append([arch, f"{megabytes:,.0f}", f"{epoch_end['in line']:.2f}", f"{epoch_end['background']:.2f}",
                         f"{final_wait:.2f}", f"{medians['in line'].wall:.1f}", f"{medians['background'].wall:.1f}",
                         f"{medians['in line'].wall / medians['background'].wall:.2f}x"])
    print(f"\ncheckpoint writes: {args.epochs} epochs of {args.steps} training steps (64 px, batch 16, 1 thread), "
          f"best checkpoint + training state written every epoch; median of {args.repeats} interleaved repeats")
    print(table(["arch", "MiB per epoch", "epoch end s, in line", "epoch end s, background",
                 "final wait s, background", "run s, in line", "run s, background", "in line / background"], rows))
    print("epoch end = what the training loop waits for (median over epoch ends; background: the snapshot plus "
          "any wait for the previous epoch's write); final wait = the last files still being written when "
          "training ends (in line: 0).")


if __name__ == "__main__":
    main()
