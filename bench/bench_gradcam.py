"""Grad-CAM cost: plain inference vs our one-pass Grad-CAM vs a full-backward Grad-CAM, per architecture.

    python bench/bench_gradcam.py                                  # 224 px, batch 16, 3 repeats (the issue's setting)
    python bench/bench_gradcam.py --batch-size 4 --repeats 5       # quicker on a small CPU

Random-init models (`build_model(arch, 'none')`) in eval mode on the CPU. The three contenders are timed in
turn (rotating order) and each is summarised by its median over the repeats:

* plain: `model(x)` under no_grad (what inference costs anyway);
* ours:  `common.cams.methods.grad_cam` (body without autograd, head differentiated to the target activation only);
* full:  the usual library recipe (pytorch-grad-cam style): a forward hook on the target layer that retains the
  activation's grad, autograd through the whole network, `score.backward()` (every parameter gets a .grad).

Before timing, the full recipe's maps are compared with ours, so the table compares two ways to the same maps.
Target: ours <= 1.10x plain for all three architectures.
"""

import argparse

import _timing  # noqa: F401  (puts the repository root on sys.path)
import torch
from _timing import interleaved_medians, table

from common.cams.methods import grad_cam
from common.cams.reference import full_backward_grad_cam
from common.models.registry import ARCHS, build_model


def plain_inference(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(images)


def check_same_maps(model, arch: str, images: torch.Tensor) -> float:
    """Largest |ours - full| relative to the largest map value; stops the benchmark if the maps differ."""
    ours, _ = grad_cam(model, arch, images)
    full, _, _ = full_backward_grad_cam(model, arch, images)
    if not full.max() > 0:
        raise SystemExit(f"{arch}: every map is zero; pick another seed for a meaningful comparison")
    error = float((ours - full).abs().max() / full.abs().max())
    if error > 1e-3:
        raise SystemExit(f"{arch}: our maps differ from the full-backward maps (relative error {error:.2e})")
    return error


def bench_arch(arch: str, *, batch_size: int, image_size: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = build_model(arch, "none").eval()
    images = torch.randn(batch_size, 3, image_size, image_size)
    error = check_same_maps(model, arch, images[:4])
    medians = interleaved_medians({
        "plain": lambda: plain_inference(model, images),
        "ours": lambda: grad_cam(model, arch, images),
        "full": lambda: full_backward_grad_cam(model, arch, images),
    }, repeats=repeats)
    return {"arch": arch, "map_error": error, "timings": medians}


def result_rows(results: list[dict], clock: str) -> list[list[str]]:
    rows = []
    for result in results:
        ms = {name: 1000 * getattr(timing, clock) for name, timing in result["timings"].items()}
        rows.append([result["arch"], f"{ms['plain']:.0f}", f"{ms['ours']:.0f}", f"{ms['full']:.0f}",
                     f"{ms['ours'] / ms['plain']:.3f}x", f"{ms['full'] / ms['plain']:.2f}x",
                     f"{ms['full'] / ms['ours']:.2f}x", f"{result['map_error']:.1e}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice); 1 makes the CPU "
                                                    "time column a steady measure on a shared machine")
    parser.add_argument("--quick", action="store_true", help="batch 4, 160 px, 3 repeats, 1 thread")
    args = parser.parse_args()
    if args.quick:
        args.batch_size, args.image_size, args.repeats, args.threads = 4, 160, 3, args.threads or 1
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"Grad-CAM cost on CPU ({torch.get_num_threads()} thread(s)): batch {args.batch_size}, "
          f"{args.image_size} px, random init, eval mode, median of {args.repeats} interleaved repeats")
    results = []
    for arch in args.archs:
        results.append(bench_arch(arch, batch_size=args.batch_size, image_size=args.image_size, repeats=args.repeats))
        print(f"  {arch} done", flush=True)
    header = ["arch", "plain ms", "ours ms", "full ms", "ours/plain", "full/plain", "full/ours", "map diff"]
    for clock, title in (("wall", "wall clock"), ("cpu", "CPU time of this process")):
        print(f"\n{title}, ms per batch:")
        print(table(header, result_rows(results, clock)))
    print("map diff = max |ours - full| / max map (the same maps, two ways). Target: ours/plain <= 1.10.")


if __name__ == "__main__":
    main()
