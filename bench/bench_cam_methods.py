"""Cost of exporting Grad-CAM, Grad-CAM++ and LayerCAM together vs plain inference, per architecture.

    python bench/bench_cam_methods.py                       # 224 px, batch 16, 3 repeats, 1 thread (issue #14)
    python bench/bench_cam_methods.py --quick               # batch 4, 160 px

Random-init models (`build_model(arch, 'none')`) on the CPU. The contenders are timed in turn (rotating
order), each summarised by its median over the repeats:

* plain:    `model(x)` under no_grad (what inference costs anyway);
* gradcam:  `common.cams.methods.grad_cam` (the export's one-pass Grad-CAM);
* all three: `common.cams.methods.cams_and_logits` with every method, from the same single pass.

Target: all three <= 1.15x plain for each architecture.
"""

import argparse

import _timing  # noqa: F401  (puts the repository root on sys.path)
import torch
from _timing import interleaved_medians, table

from common.cams.methods import CAM_METHODS, cams_and_logits, grad_cam
from common.models.registry import ARCHS, build_model

TARGET_RATIO = 1.15


def plain_inference(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(images)


def bench_arch(arch: str, *, batch_size: int, image_size: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = build_model(arch, "none").eval()
    images = torch.randn(batch_size, 3, image_size, image_size)
    return interleaved_medians({
        "plain": lambda: plain_inference(model, images),
        "gradcam": lambda: grad_cam(model, arch, images),
        "all three": lambda: cams_and_logits(model, arch, images, methods=CAM_METHODS),
    }, repeats=repeats)


def result_rows(results: dict[str, dict], clock: str) -> list[list[str]]:
    rows = []
    for arch, timings in results.items():
        ms = {name: 1000 * getattr(timing, clock) for name, timing in timings.items()}
        rows.append([arch, f"{ms['plain']:.0f}", f"{ms['gradcam']:.0f}", f"{ms['all three']:.0f}",
                     f"{ms['gradcam'] / ms['plain']:.3f}x", f"{ms['all three'] / ms['plain']:.3f}x",
                     f"{ms['all three'] / ms['gradcam']:.3f}x"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the CPU-time column is then steady on a shared machine)")
    parser.add_argument("--quick", action="store_true", help="batch 4, 160 px")
    args = parser.parse_args()
    if args.quick:
        args.batch_size, args.image_size = 4, 160
    torch.set_num_threads(args.threads)
    print(f"CAM methods' export cost on CPU ({torch.get_num_threads()} thread(s)): batch {args.batch_size}, "
          f"{args.image_size} px, random init, eval mode, median of {args.repeats} interleaved repeats")
    results = {}
    for arch in args.archs:
        results[arch] = bench_arch(arch, batch_size=args.batch_size, image_size=args.image_size, repeats=args.repeats)
        print(f"  {arch} done", flush=True)
    header = ["arch", "plain ms", "gradcam ms", "all three ms", "gradcam/plain", "all/plain", "all/gradcam"]
    for clock, title in (("wall", "wall clock"), ("cpu", "CPU time of this process")):
        print(f"\n{title}, ms per batch:")
        print(table(header, result_rows(results, clock)))
    print(f"all = Grad-CAM, Grad-CAM++ and LayerCAM from one pass. Target: all/plain <= {TARGET_RATIO:.2f}.")


if __name__ == "__main__":
    main()
