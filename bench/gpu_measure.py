"""The in-process measurements of bench/gpu_check.py, one child process each (a CUDA fault ends only that child).

    python bench/gpu_measure.py environment OUT.json [--device cuda]
    python bench/gpu_measure.py measure OUT.json --arch resnet50 --run-dir RUN --device cuda [--workers 8] ...

`environment`: torch, CUDA, cuDNN and NCCL versions, the GPU's name and memory, the autocast dtype the model
scripts pick. `measure`, for one architecture, on the data and checkpoint of a finished model-script run:

* plain_loop: a minimal torchvision training loop (ImageFolder + DataLoader workers + the same model, AMP,
  channels_last, batch size) on the run's train split: images/s of the last epoch, and the share of that epoch
  spent waiting for the next batch (the loop reads the loss every step, as the model scripts do, so a wait
  for data is not hidden behind queued GPU work);
* data_only: the project's two batch sources alone (no model), train split, one epoch: images/s;
* gradcam: plain inference vs our Grad-CAM vs the full-backward recipe (bench/bench_gradcam.py's functions)
  and pytorch-grad-cam where it is importable; float32 (as the export runs), median of interleaved repeats,
  each call followed by a device synchronize.

Each part that fails is recorded as `{"error": ...}` and the others still run; the exit status is 1 if any part
failed (after the result file is written).
"""

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import _timing  # noqa: F401  (puts the repository root on sys.path)
import torch
from _timing import interleaved_medians
from bench_gradcam import plain_inference
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, models
from torchvision import transforms as T

from common.cams.methods import grad_cam
from common.cams.reference import full_backward_grad_cam, target_module
from common.core.fileio import write_json
from common.core.runfiles import checkpoint_path
from common.data.images import build_cache, make_batches
from common.data.partition import load_split
from common.data.transforms import IMAGENET_MEAN, IMAGENET_STD, ROTATION_DEGREES
from common.models.checkpoints import load_checkpoint, model_from_checkpoint
from common.training.runtime import autocast_dtype


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:300]}"


def recorded(part):
    """Run one measurement; its failure becomes {"error": ...} so the other parts still run."""
    try:
        return part()
    except Exception as error:  # anything a GPU, a driver or a library can raise
        return {"error": error_text(error)}


# ------------------------------------------------------------------------------------------- environment


def nvidia_smi_line() -> str | None:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError) as error:
        return f"unavailable ({error_text(error)})"


def environment(device_option: str) -> dict:
    import torchvision

    info = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "cuda_build": torch.version.cuda, "cpu_count": os.cpu_count(), "cuda_available": torch.cuda.is_available(),
            "nvidia_smi": nvidia_smi_line()}
    if device_option == "cuda":
        info["cuda"] = recorded(cuda_details)
    try:
        import pytorch_grad_cam  # noqa: F401
        info["pytorch_grad_cam"] = "importable"
    except Exception as error:  # absent, or present without its own dependencies (opencv)
        info["pytorch_grad_cam"] = f"not importable ({error_text(error)})"
    return info


def nccl_version() -> str:
    version = torch.cuda.nccl.version()  # a tuple in recent torch, an int such as 21803 in older ones
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def cuda_details() -> dict:
    device = torch.device("cuda", 0)
    properties = torch.cuda.get_device_properties(device)
    return {"gpu": properties.name, "gpu_memory_gib": round(properties.total_memory / 2**30, 1),
            "compute_capability": f"{properties.major}.{properties.minor}", "cudnn": torch.backends.cudnn.version(),
            "bf16_supported": torch.cuda.is_bf16_supported(), "autocast_dtype": str(autocast_dtype(device, True)),
            "nccl": nccl_version(),
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32}


# ------------------------------------------------------------------------------------------- plain loop


def plain_train_loader(data_root: Path, train_paths: set[str], *, image_size: int, batch_size: int, workers: int,
                       device: torch.device) -> DataLoader:
    """ImageFolder over the BreaKHis tree (classes benign/malignant), restricted to the run's train images."""
    transform = T.Compose([T.Resize((image_size, image_size)), T.RandomHorizontalFlip(), T.RandomVerticalFlip(),
                           T.RandomRotation(ROTATION_DEGREES, T.InterpolationMode.BILINEAR), T.ToTensor(),
                           T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    breast = data_root / "BreaKHis_v1" / "histology_slides" / "breast"
    folder = datasets.ImageFolder(breast, transform)
    keep = [i for i, (path, _label) in enumerate(folder.samples) if os.path.relpath(path, data_root) in train_paths]
    return DataLoader(Subset(folder, keep), batch_size=batch_size, shuffle=True, drop_last=True,
                      num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0)


def plain_loop(arch: str, loader: DataLoader, *, device: torch.device, epochs: int) -> dict:
    model = getattr(models, arch)(num_classes=2)
    channels_last = device.type == "cuda"
    model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    amp_dtype = autocast_dtype(device, True)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    loss_fn = torch.nn.CrossEntropyLoss()
    for _epoch in range(epochs):  # the last epoch is the figure; the first warms up workers, cuDNN, allocator
        images_seen, waited, losses = 0, 0.0, []
        synchronize(device)
        started = asked = time.perf_counter()
        for images, labels in loader:
            waited += time.perf_counter() - asked
            images = images.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            labels = labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = loss_fn(model(images).float(), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(loss.item())  # one sync per step, as the model scripts' loop
            images_seen += len(labels)
            asked = time.perf_counter()
        synchronize(device)
        seconds = time.perf_counter() - started
    return {"images_per_second": round(images_seen / seconds, 1), "epochs": epochs, "images_per_epoch": images_seen,
            "data_wait_share": round(waited / seconds, 3), "amp_dtype": str(amp_dtype),
            "finite_losses": all(map(math.isfinite, losses))}


def data_only(split, cache, *, image_size: int, batch_size: int, workers: int, device: torch.device) -> dict:
    """One training epoch of each batch source with no model: what the data side can deliver."""
    result = {}
    for name, source_cache in (("cached", cache), ("plain", None)):
        batches = make_batches(split.root, split.records, split.indices("train"), train=True, image_size=image_size,
                               batch_size=batch_size, workers=workers, device=device, seed=0, cache=source_cache)
        for epoch in range(2):  # epoch 0 starts the workers
            synchronize(device)
            started, images_seen = time.perf_counter(), 0
            for images, _labels, _indices in batches.batches(epoch):
                images_seen += len(images)
            synchronize(device)
        result[f"{name}_images_per_second"] = round(images_seen / (time.perf_counter() - started), 1)
    return result


# --------------------------------------------------------------------------------------------- Grad-CAM


def pytorch_grad_cam_call(model, arch: str, images: torch.Tensor):
    """(pytorch-grad-cam's GradCAM on our target layer, "used"), or (None, why not). DenseNet's target module
    is features (norm5's output, before the ReLU the network applies): the same cost, slightly other maps."""
    try:
        from pytorch_grad_cam import GradCAM
    except Exception as error:  # absent, or present without its own dependencies (opencv)
        return None, f"not importable ({error_text(error)})"
    try:
        cam = GradCAM(model=model, target_layers=[target_module(model, arch)[0]])
        # targets=None: the predicted class. One call before the timing: a failure here spares the other contenders.
        cam(input_tensor=images, targets=None)
        return cam, "used"
    except Exception as error:
        return None, f"failed ({error_text(error)})"


def gradcam_timing(model, arch: str, *, image_size: int, batch_size: int, repeats: int,
                   device: torch.device) -> dict:
    model = model.to(device).eval()
    images = torch.randn(batch_size, 3, image_size, image_size, device=device)
    ours, _ = grad_cam(model, arch, images)
    full, _, _ = full_backward_grad_cam(model, arch, images)
    map_error = float((ours - full).abs().max() / full.abs().max().clamp_min(1e-12))

    def synced(call):
        return lambda: (call(), synchronize(device))

    contenders = {"plain": synced(lambda: plain_inference(model, images)),
                  "ours": synced(lambda: grad_cam(model, arch, images)),
                  "full": synced(lambda: full_backward_grad_cam(model, arch, images))}
    library, library_status = pytorch_grad_cam_call(model, arch, images)
    if library is not None:
        contenders["pytorch_grad_cam"] = synced(lambda: library(input_tensor=images, targets=None))
    medians = interleaved_medians(contenders, repeats=repeats)
    ms = {name: round(1000 * timing.wall, 2) for name, timing in medians.items()}
    result = {"batch_size": batch_size, "image_size": image_size, "repeats": repeats, "ms_per_batch": ms,
              "ours_over_plain": round(ms["ours"] / ms["plain"], 3),
              "full_over_ours": round(ms["full"] / ms["ours"], 2),
              "map_error_ours_vs_full": map_error, "pytorch_grad_cam": library_status}
    if library is not None:
        result["pytorch_grad_cam_over_ours"] = round(ms["pytorch_grad_cam"] / ms["ours"], 2)
    return result


# ------------------------------------------------------------------------------------------------- main


def measure(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    run_dir = Path(args.run_dir)
    split = load_split(run_dir / "split.json")
    checkpoint = load_checkpoint(checkpoint_path(run_dir, args.arch), args.arch)
    image_size = checkpoint["image_size"]
    train_paths = {split.records[i].path for i in split.indices("train")}
    options = dict(image_size=image_size, batch_size=args.batch_size, workers=args.workers, device=device)
    result = {"arch": args.arch, "device": str(device)}
    result["plain_loop"] = recorded(lambda: plain_loop(
        args.arch, plain_train_loader(split.root, train_paths, **options), device=device, epochs=args.epochs))
    result["data_only"] = recorded(lambda: data_only(split, build_cache(
        split.root, split.records, image_size=image_size, mode="disk", cache_dir=run_dir / "cache",
        workers=args.workers), **options))
    result["gradcam"] = recorded(lambda: gradcam_timing(
        model_from_checkpoint(checkpoint), args.arch, image_size=image_size, batch_size=args.batch_size,
        repeats=args.repeats, device=device))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["environment", "measure"])
    parser.add_argument("out", help="result JSON file")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--arch")
    parser.add_argument("--run-dir", help="output dir of a finished model-script run (split, checkpoint, cache)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=2, help="plain loop epochs; the last one is timed")
    parser.add_argument("--repeats", type=int, default=5, help="Grad-CAM timing repeats")
    args = parser.parse_args()
    result = environment(args.device) if args.what == "environment" else measure(args)
    write_json(args.out, result)
    print(json.dumps(result, indent=1))
    failed = [name for name, part in result.items() if isinstance(part, dict) and "error" in part]
    if failed or (args.what == "environment" and args.device == "cuda" and not result["cuda_available"]):
        sys.exit(f"failed: {', '.join(failed) or 'no CUDA device'}")


if __name__ == "__main__":
    main()
