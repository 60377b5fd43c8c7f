"""The shared fine-tuning loop: one process or many (torchrun), one stage per function.

    run_model_script  config -> split -> data -> model -> fit (train_one_epoch / evaluate) -> heatmap export

Distributed training is detected from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK): each process
trains on its shard with DistributedDataParallel; only rank 0 logs and saves, metrics are summed across
ranks, and the saved state_dict is the unwrapped model's.
"""

import argparse
import json
import math
import os
import random
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from common.cli import parse_args, split_protocol
from common.data import (CLASS_NAMES, SPLIT_FILE_NAME, Split, describe_protocol, prepare_split, subsample_split,
                         summarize_split)
from common.dataset import build_cache, make_batches
from common.demo import is_synthetic_dataset
from common.errors import PipelineError
from common.fileio import BackgroundWriter, write_json
from common.heatmaps import export_heatmaps, heatmap_path
from common.metrics import binary_metrics, metrics_table, selection_score, softmax
from common.models import ARCHS, build_model
from common.transforms import IMAGENET_MEAN, IMAGENET_STD

CHECKPOINT_FORMAT_VERSION = 1
SELECTION_METRIC = "val balanced accuracy (ties: lower val loss)"
DISTRIBUTED_TIMEOUT = timedelta(hours=1)


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def pick_device(option: str, local_rank: int = 0) -> torch.device:
    if option == "auto":
        option = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if option == "cuda":
        if not torch.cuda.is_available():
            raise PipelineError("--device cuda: no CUDA device is visible")
        return torch.device("cuda", local_rank)
    if option == "mps" and not torch.backends.mps.is_available():
        raise PipelineError("--device mps: MPS is not available")
    return torch.device(option)


def setup_runtime(device_option: str) -> Runtime:
    """Single process, or one process per GPU under torchrun (nccl on CUDA, gloo on CPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Runtime(pick_device(device_option))
    local_rank = int(os.environ["LOCAL_RANK"])
    device = pick_device(device_option, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # The other ranks wait at a barrier while rank 0 alone builds the image cache or exports the heatmaps, which
    # on a large dataset can outlast the default timeout (10 minutes for nccl).
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=DISTRIBUTED_TIMEOUT)
    return Runtime(device, dist.get_rank(), dist.get_world_size())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def reduce_sum(values: list[float], runtime: Runtime) -> list[float]:
    if not runtime.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=runtime.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def autocast_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """bf16 on GPUs that have it (no loss scaling needed), else fp16 with a GradScaler; none off CUDA."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def class_weights(split: Split, mode: str, device: torch.device) -> torch.Tensor | None:
    if mode == "none":
        return None
    counts = np.bincount([record.label for record in split.subset("train")], minlength=len(CLASS_NAMES))
    if counts.min() == 0:
        raise PipelineError("the train split lacks a class; --class-weights balanced cannot be computed")
    return torch.tensor(counts.sum() / (len(counts) * counts), dtype=torch.float32, device=device)


# ------------------------------------------------------------------------------------------------ stages


def train_one_epoch(model, batches, optimizer, loss_fn, *, epoch: int, runtime: Runtime, amp_dtype, scaler,
                    channels_last: bool) -> dict:
    model.train()
    loss_sum, correct, seen = 0.0, 0, 0
    progress = tqdm(batches.batches(epoch), total=len(batches), desc=f"epoch {epoch + 1} train",
                    disable=not runtime.is_main, leave=False)
    for step, (images, labels, _indices) in enumerate(progress):
        if len(labels) == 1 and 0 < step == len(batches) - 1:
            # A last batch of one image: batch norm cannot normalise it where the maps are 1x1 (small --image-size),
            # and one image is a noisy step anyway. Skipped on every rank alike (their shards are equal), and a
            # different image each epoch, as the order is reshuffled.
            continue
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(runtime.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images)
            loss = loss_fn(logits.float(), labels)
        if not torch.isfinite(loss):
            raise PipelineError(f"the training loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; "
                                "the last good checkpoint is kept. Lower --lr or check the data")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        loss_sum += loss.item() * len(labels)
        correct += int((logits.argmax(1) == labels).sum())
        seen += len(labels)
        progress.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}")
    loss_sum, correct, seen = reduce_sum([loss_sum, correct, seen], runtime)
    return {"loss": loss_sum / seen, "accuracy": correct / seen}


@torch.no_grad()
def predict_logits(model, batches, *, runtime: Runtime, amp_dtype, channels_last: bool, desc: str):
    """(indices, logits) of every image the batch source covers, gathered from all ranks."""
    model.eval()
    all_indices, all_logits = [], []
    for images, _labels, indices in tqdm(batches.batches(), total=len(batches), desc=desc,
                                         disable=not runtime.is_main, leave=False):
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(runtime.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            all_logits.append(model(images).float().cpu())
        all_indices.append(indices.cpu())
    indices = torch.cat(all_indices).numpy() if all_indices else np.zeros(0, np.int64)
    logits = torch.cat(all_logits).numpy() if all_logits else np.zeros((0, 2), np.float32)
    if runtime.distributed:
        gathered = [None] * runtime.world_size
        dist.all_gather_object(gathered, (indices, logits))
        indices = np.concatenate([part[0] for part in gathered])
        logits = np.concatenate([part[1] for part in gathered])
    return indices, logits


def evaluate(model, batches, split: Split, *, runtime: Runtime, amp_dtype, channels_last: bool) -> dict:
    """Loss and every metric of `binary_metrics` over the images of `batches`."""
    indices, logits = predict_logits(model, batches, runtime=runtime, amp_dtype=amp_dtype,
                                     channels_last=channels_last, desc="validate")
    records = [split.records[i] for i in indices]
    labels = np.array([record.label for record in records])
    loss = float(nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)))
    metrics = binary_metrics(labels, softmax(logits)[:, 1], [r.patient for r in records],
                             [r.magnification for r in records])
    return {"loss": loss, **metrics}


# ------------------------------------------------------------------------------------------- checkpoints


def checkpoint_path(output_dir: Path, arch: str) -> Path:
    return Path(output_dir) / f"fine_tuned_{arch}.pth"


def state_path(output_dir: Path, arch: str) -> Path:
    return Path(output_dir) / f"training_state_{arch}.pth"


def best_checkpoint(weights: dict[str, torch.Tensor], args: argparse.Namespace, split: Split, *, epoch: int,
                    val_metrics: dict) -> dict:
    """The contents of fine_tuned_<arch>.pth: tensors and primitives only, so torch.load(weights_only=True)
    reads it."""
    spec = ARCHS[args.arch]
    return {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "model": weights,
        "arch": args.arch,
        "class_names": list(CLASS_NAMES),
        "image_size": args.image_size,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "target_layer": spec.target_layer,
        "epoch": epoch,
        "selection_metric": SELECTION_METRIC,
        "val_metrics": val_metrics,
        "config": vars(args).copy(),
        "split_digest": split.digest,
        "split_protocol": split.protocol,
        # Recorded now, while the images are at hand: predict.py and the report warn about such a model.
        "synthetic_data": is_synthetic_dataset(split.root, [record.path for record in split.records]),
    }


def load_checkpoint(path: Path, arch: str | None = None, *, made_by: str = "its model script") -> dict:
    """Read one of our checkpoints safely (weights_only) or stop with an error naming the file."""
    if not Path(path).is_file():
        raise PipelineError(f"checkpoint {path} does not exist; run {made_by} first")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: read lazily
    except Exception as error:  # a truncated or foreign file raises one of many types
        # torch's messages can span lines (and suggest weights_only=False): keep the first sentence, one line.
        reason = (str(error).strip().splitlines() or [""])[0].split(". ")[0]
        raise PipelineError(f"checkpoint {path} is unreadable ({type(error).__name__}: {reason}); "
                            "it is truncated, corrupt or not a PyTorch file") from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise PipelineError(f"checkpoint {path} is not a checkpoint of this pipeline")
    if arch is not None and checkpoint.get("arch") != arch:
        raise PipelineError(f"checkpoint {path} holds {checkpoint.get('arch')}, not {arch}")
    return checkpoint


def training_caveats(checkpoints: dict[str, dict]) -> list[str]:
    """Why the models' probabilities say nothing about real tissue: one line per reason, naming the models it
    applies to ([] when nothing is known against them). `checkpoints`: model name -> checkpoint dict."""
    reasons = {
        "trained from random initialisation (--weights none)":
            lambda checkpoint: checkpoint.get("config", {}).get("weights") == "none",
        "trained on synthetic demo data (common/demo.py), not on BreaKHis":
            lambda checkpoint: bool(checkpoint.get("synthetic_data")),
    }
    lines = []
    for reason, applies in reasons.items():
        names = [name for name, checkpoint in checkpoints.items() if applies(checkpoint)]
        if names:
            lines.append(f"{', '.join(names)}: {reason}")
    return lines


def model_from_checkpoint(checkpoint: dict) -> nn.Module:
    model = build_model(checkpoint["arch"], "none")
    model.load_state_dict(checkpoint["model"])
    return model


# ------------------------------------------------------------------------------------------------- fit


def make_optimizer(model: nn.Module, *, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """Adam or AdamW over every parameter (the model must already be on its device)."""
    optimizer_class = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    # The fused kernel updates all parameters in one call: ~5x less optimizer time per step than the
    # per-tensor loop on a CPU (bench/README.md), and fewer kernel launches on a GPU.
    fused = next(model.parameters()).device.type in ("cuda", "cpu")
    return optimizer_class(model.parameters(), lr=lr, weight_decay=weight_decay, fused=fused or None)


def resume_training(path: Path, model, optimizer, scheduler, scaler, *, args: argparse.Namespace,
                    split: Split) -> tuple[int, tuple | None]:
    """Restore the last completed epoch; returns (epochs done, best selection score so far)."""
    if not path.is_file():
        raise PipelineError(f"--resume: no training state {path} to resume from (start without --resume)")
    state = load_checkpoint(path)
    # A state trained on another split may have learned from this split's test patients.
    # max_images is in the protocol only when --max-images really subsampled (it keeps the full split's digest).
    if (state.get("split_digest"), state.get("image_size"), state.get("max_images")) != \
            (split.digest, args.image_size, split.protocol.get("max_images")):
        raise PipelineError(f"--resume: {path} was trained on another split or image size than this run's "
                            "(split.json, --image-size, --max-images); start without --resume")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if state["scaler"]:  # empty when the run that saved it did not use fp16 loss scaling
        scaler.load_state_dict(state["scaler"])
    start_epoch = state["epoch"]
    if scheduler.T_max != args.epochs:  # --epochs changed: go on along the new cosine (the old one ends at lr 0)
        scheduler.T_max = args.epochs
        for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = scheduler.eta_min + (base_lr - scheduler.eta_min) * (
                1 + math.cos(math.pi * start_epoch / args.epochs)) / 2
    return start_epoch, tuple(state["best_score"]) if state["best_score"] else None


def sync_buffers(model: nn.Module, runtime: Runtime) -> None:
    """Give every rank rank 0's batch-norm statistics, so val metrics describe the model rank 0 saves."""
    if runtime.distributed:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def log_epoch(log_path: Path, row: dict) -> None:
    with open(log_path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")


def fit(model: nn.Module, args: argparse.Namespace, split: Split, runtime: Runtime, cache) -> None:
    """Fine-tune every layer; keep the best epoch by val balanced accuracy in fine_tuned_<arch>.pth."""
    device, output_dir = runtime.device, Path(args.output_dir)
    channels_last = device.type == "cuda"
    amp_dtype = autocast_dtype(device, args.amp)
    model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    optimizer = make_optimizer(model, name=args.optimizer, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    start_epoch, best_score = 0, None
    if args.resume:
        start_epoch, best_score = resume_training(state_path(output_dir, args.arch), model, optimizer, scheduler,
                                                  scaler, args=args, split=split)
        if runtime.is_main:
            print(f"resuming {args.arch} after epoch {start_epoch} of {args.epochs}")
    trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if runtime.distributed else model
    loss_fn = nn.CrossEntropyLoss(weight=class_weights(split, args.class_weights, device))
    batch_options = dict(image_size=args.image_size, batch_size=args.batch_size, workers=args.workers,
                         device=device, seed=args.seed, cache=cache, rank=runtime.rank, world_size=runtime.world_size)
    train_batches = make_batches(split.root, split.records, split.indices("train"), train=True, **batch_options)
    val_batches = make_batches(split.root, split.records, split.indices("val"), train=False, **batch_options)
    # Leaving the block waits for the last files: the heatmap export reads the best checkpoint back.
    with BackgroundWriter() as writer:
        for epoch in range(start_epoch, args.epochs):
            started = time.perf_counter()
            train_metrics = train_one_epoch(trained, train_batches, optimizer, loss_fn, epoch=epoch, runtime=runtime,
                                            amp_dtype=amp_dtype, scaler=scaler, channels_last=channels_last)
            train_seconds = time.perf_counter() - started
            writer.check()  # a failed write of the last epoch's files stops the run now, not an epoch later
            sync_buffers(model, runtime)
            val_metrics = evaluate(model, val_batches, split, runtime=runtime, amp_dtype=amp_dtype,
                                   channels_last=channels_last)
            scheduler.step()
            score = selection_score(val_metrics)
            improved = best_score is None or score > best_score
            if improved:
                best_score = score
            if runtime.is_main:
                report_epoch(args, epoch, train_metrics, val_metrics, train_seconds, len(split.indices("train")),
                             improved)
                weights = model.state_dict()  # one dict in both files: the writer's snapshot copies it once
                best = [(best_checkpoint(weights, args, split, epoch=epoch + 1, val_metrics=val_metrics),
                         checkpoint_path(output_dir, args.arch))] if improved else []
                state = {"model": weights, "arch": args.arch, "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch + 1,
                         "best_score": list(best_score), "split_digest": split.digest,
                         "image_size": args.image_size, "max_images": split.protocol.get("max_images")}
                # Written while the next epoch trains.
                writer.save(best + [(state, state_path(output_dir, args.arch))])
            runtime.barrier()


def report_epoch(args, epoch: int, train_metrics: dict, val_metrics: dict, seconds: float, train_images: int,
                 improved: bool) -> None:
    row = {"epoch": epoch + 1, "train_loss": train_metrics["loss"], "train_accuracy": train_metrics["accuracy"],
           "val_loss": val_metrics["loss"], "val_accuracy": val_metrics["accuracy"],
           "val_balanced_accuracy": val_metrics["balanced_accuracy"], "val_roc_auc": val_metrics["roc_auc"],
           "train_seconds": round(seconds, 2), "train_images_per_second": round(train_images / seconds, 1),
           "best_so_far": improved}
    log_epoch(Path(args.output_dir) / f"train_log_{args.arch}.jsonl", row)
    balanced = val_metrics["balanced_accuracy"]
    print(f"{args.arch} epoch {epoch + 1}/{args.epochs}: train loss {train_metrics['loss']:.4f} "
          f"acc {train_metrics['accuracy']:.3f} | val loss {val_metrics['loss']:.4f} acc {val_metrics['accuracy']:.3f} "
          f"bal-acc {'n/a' if balanced is None else f'{balanced:.3f}'} | {seconds:.1f}s"
          f"{' | saved best' if improved else ''}", flush=True)


# ------------------------------------------------------------------------------------------- the script


def export_and_report(args: argparse.Namespace, split: Split, runtime: Runtime, cache) -> dict:
    """Reload the best checkpoint; one pass over every split yields the heatmaps and the test metrics."""
    output_dir = Path(args.output_dir)
    checkpoint = load_checkpoint(checkpoint_path(output_dir, args.arch), args.arch)
    if checkpoint["split_digest"] != split.digest:
        raise PipelineError(f"{checkpoint_path(output_dir, args.arch)} was trained on another split than "
                            f"{output_dir / SPLIT_FILE_NAME}; retrain it in this output dir")
    model = model_from_checkpoint(checkpoint)
    arrays = export_heatmaps(model, args.arch, split, heatmap_path(output_dir, args.arch),
                             image_size=checkpoint["image_size"], batch_size=args.batch_size, workers=args.workers,
                             device=runtime.device, cache=cache, target_rule=args.cam_target,
                             overlay_dir=output_dir / "overlays" / args.arch, overlay_count=args.overlays)
    probabilities = softmax(arrays["logits"])[:, 1]
    results = {"arch": args.arch, "split_protocol": describe_protocol(split.protocol),
               "checkpoint_epoch": checkpoint["epoch"], "selection_metric": SELECTION_METRIC}
    for split_name in ("val", "test"):
        rows = arrays["splits"] == split_name
        results[split_name] = binary_metrics(arrays["labels"][rows], probabilities[rows], arrays["patients"][rows],
                                             arrays["magnifications"][rows])
    write_json(output_dir / f"metrics_{args.arch}.json", results)
    return results


def print_results(results: dict) -> None:
    print(f"\n{results['arch']}: best epoch {results['checkpoint_epoch']} by {results['selection_metric']}")
    print(f"split protocol: {results['split_protocol']}")
    print(metrics_table({f"{results['arch']} {name}": results[name] for name in ("val", "test")}, title="split"))
    test = results["test"]
    tn, fp = test["confusion_matrix"][0]
    fn, tp = test["confusion_matrix"][1]
    print(f"test confusion matrix (rows true, columns predicted): benign [{tn} {fp}]  malignant [{fn} {tp}]")
    for magnification, accuracy in test.get("accuracy_by_magnification", {}).items():
        print(f"test accuracy at {magnification}X: {accuracy:.3f}")


def run_model_script(*, arch: str, description: str, argv: list[str] | None = None, **defaults) -> None:
    """Everything a model script does: split, fine-tune, export heatmaps, report the test split once."""
    args = parse_args(arch=arch, description=description, argv=argv, **defaults)
    runtime = setup_runtime(args.device)
    try:
        seed_everything(args.seed)
        output_dir = Path(args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        # The first script to run writes the split; the others (and the other ranks) read it.
        split = main_rank_first(runtime, lambda: prepare_split(args.data_dir, output_dir, split_protocol(args)))
        if args.max_images:
            split = subsample_split(split, args.max_images, args.seed)
        if runtime.is_main:
            print(f"split protocol: {describe_protocol(split.protocol)}\n{summarize_split(split)}")
        if args.heatmaps_only:  # the maps must be made at the size the checkpoint was trained at
            args.image_size = load_checkpoint(checkpoint_path(output_dir, arch), arch)["image_size"]
        cache = prepare_cache(args, split, runtime)
        if not args.heatmaps_only:
            # Rank 0 first: an ImageNet download happens once, the other ranks read torchvision's cached file.
            model = main_rank_first(runtime, lambda: build_model(arch, args.weights, split_digest=split.digest))
            fit(model, args, split, runtime, cache)
        if runtime.is_main:
            print_results(export_and_report(args, split, runtime, cache))
        runtime.barrier()
    finally:
        if runtime.distributed:
            dist.destroy_process_group()


def main_rank_first(runtime: Runtime, make):
    """`make()` on rank 0, then on the other ranks: files rank 0 writes (split, cache, downloads) are reused."""
    if runtime.is_main:
        result = make()
    runtime.barrier()
    if not runtime.is_main:
        result = make()
    return result


def prepare_cache(args: argparse.Namespace, split: Split, runtime: Runtime):
    """The decoded-image cache, or None for the plain path."""
    if args.cache == "none":
        return None
    return main_rank_first(runtime, lambda: build_cache(
        split.root, split.records, image_size=args.image_size, mode=args.cache,
        cache_dir=Path(args.output_dir) / "cache", workers=args.workers))
