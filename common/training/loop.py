"""The shared fine-tuning loop, one stage per function: one process or many (torchrun).

    fit: per epoch train_one_epoch -> evaluate (val) -> keep the best epoch (fine_tuned_<arch>.pth) and the
         --resume state (training_state_<arch>.pth), written on a background thread while the next epoch trains

Where it runs (device, ranks, mixed precision, memory format) is the Runtime's business (common/training/runtime.py);
what a checkpoint holds is common/models/checkpoints.py's; the model script around the loop is
common/training/model_script.py.
"""

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from common.core.console import progress
from common.core.errors import PipelineError
from common.core.fileio import BackgroundWriter, disk_full_as_pipeline_error
from common.core.runfiles import checkpoint_path, state_path, train_log_path
from common.data.images import make_batches
from common.data.partition import Split
from common.data.records import CLASS_NAMES
from common.evaluation.metrics import binary_metrics, selection_score, softmax
from common.models.checkpoints import best_checkpoint, load_checkpoint
from common.training.config import TrainConfig
from common.training.runtime import Runtime, make_optimizer


def class_weights(split: Split, mode: str, device: torch.device) -> torch.Tensor | None:
    if mode == "none":
        return None
    counts = np.bincount([record.label for record in split.subset("train")], minlength=len(CLASS_NAMES))
    if counts.min() == 0:
        raise PipelineError("the train split lacks a class; --class-weights balanced cannot be computed")
    return torch.tensor(counts.sum() / (len(counts) * counts), dtype=torch.float32, device=device)


# ------------------------------------------------------------------------------------------------ stages


def train_one_epoch(model, batches, optimizer, loss_fn, *, epoch: int, runtime: Runtime, scaler) -> dict:
    model.train()
    loss_sum, correct, seen = 0.0, 0, 0
    shown = progress(batches.batches(epoch), total=len(batches), desc=f"epoch {epoch + 1} train",
                     disable=not runtime.is_main)
    for step, (images, labels, _indices) in enumerate(shown):
        if len(labels) == 1 and 0 < step == len(batches) - 1:
            # A last batch of one image: batch norm cannot normalise it where the maps are 1x1 (small --image-size),
            # and one image is a noisy step anyway. Skipped on every rank alike (their shards are equal), and a
            # different image each epoch, as the order is reshuffled.
            continue
        with runtime.autocast():
            logits = model(runtime.layout(images))
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
        shown.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}")
    loss_sum, correct, seen = runtime.reduce_sum([loss_sum, correct, seen])
    return {"loss": loss_sum / seen, "accuracy": correct / seen}


@torch.no_grad()
def predict_logits(model, batches, *, runtime: Runtime, desc: str):
    """(indices, logits) of every image the batch source covers, gathered from all ranks."""
    model.eval()
    all_indices, all_logits = [], []
    for images, _labels, indices in progress(batches.batches(), total=len(batches), desc=desc,
                                             disable=not runtime.is_main):
        with runtime.autocast():
            all_logits.append(model(runtime.layout(images)).float().cpu())
        all_indices.append(indices.cpu())
    indices = torch.cat(all_indices).numpy() if all_indices else np.zeros(0, np.int64)
    logits = torch.cat(all_logits).numpy() if all_logits else np.zeros((0, 2), np.float32)
    if runtime.distributed:
        gathered = [None] * runtime.world_size
        dist.all_gather_object(gathered, (indices, logits))
        indices = np.concatenate([part[0] for part in gathered])
        logits = np.concatenate([part[1] for part in gathered])
    return indices, logits


def evaluate(model, batches, split: Split, *, runtime: Runtime) -> dict:
    """Loss and every metric of `binary_metrics` over the images of `batches`."""
    indices, logits = predict_logits(model, batches, runtime=runtime, desc="validate")
    records = [split.records[i] for i in indices]
    labels = np.array([record.label for record in records])
    loss = float(nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)))
    metrics = binary_metrics(labels, softmax(logits)[:, 1], [r.patient for r in records],
                             [r.magnification for r in records])
    return {"loss": loss, **metrics}


# ------------------------------------------------------------------------------------------------- fit


def resume_training(path: Path, model, optimizer, scheduler, scaler, *, config: TrainConfig,
                    split: Split) -> tuple[int, tuple | None]:
    """Restore the last completed epoch; returns (epochs done, best selection score so far)."""
    if not path.is_file():
        raise PipelineError(f"--resume: no training state {path} to resume from (start without --resume)")
    state = load_checkpoint(path)
    # A state trained on another split may have learned from this split's test patients.
    # max_images is in the protocol only when --max-images really subsampled (it keeps the full split's digest).
    if (state.get("split_digest"), state.get("image_size"), state.get("max_images")) != \
            (split.digest, config.image_size, split.protocol.get("max_images")):
        raise PipelineError(f"--resume: {path} was trained on another split or image size than this run's "
                            "(split.json, --image-size, --max-images); start without --resume")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if state["scaler"]:  # empty when the run that saved it did not use fp16 loss scaling
        scaler.load_state_dict(state["scaler"])
    start_epoch = state["epoch"]
    if scheduler.T_max != config.epochs:  # --epochs changed: go on along the new cosine (the old one ends at lr 0)
        scheduler.T_max = config.epochs
        for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = scheduler.eta_min + (base_lr - scheduler.eta_min) * (
                1 + math.cos(math.pi * start_epoch / config.epochs)) / 2
    return start_epoch, tuple(state["best_score"]) if state["best_score"] else None


def log_epoch(log_path: Path, row: dict) -> None:
    with disk_full_as_pipeline_error(log_path), open(log_path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")


def fit(model: nn.Module, config: TrainConfig, split: Split, runtime: Runtime, cache) -> None:
    """Fine-tune every layer; keep the best epoch by val balanced accuracy in fine_tuned_<arch>.pth."""
    device, output_dir = runtime.device, Path(config.output_dir)
    model.to(device, memory_format=torch.channels_last if runtime.channels_last else torch.contiguous_format)
    optimizer = make_optimizer(model, name=config.optimizer, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    scaler = torch.amp.GradScaler(device.type, enabled=runtime.amp_dtype == torch.float16)
    start_epoch, best_score = 0, None
    if config.resume:
        start_epoch, best_score = resume_training(state_path(output_dir, config.arch), model, optimizer, scheduler,
                                                  scaler, config=config, split=split)
        if runtime.is_main:
            print(f"resuming {config.arch} after epoch {start_epoch} of {config.epochs}")
    trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if runtime.distributed else model
    loss_fn = nn.CrossEntropyLoss(weight=class_weights(split, config.class_weights, device))
    batch_options = dict(image_size=config.image_size, batch_size=config.batch_size, workers=config.workers,
                         device=device, seed=config.seed, cache=cache, rank=runtime.rank, world_size=runtime.world_size)
    train_batches = make_batches(split.root, split.records, split.indices("train"), train=True, **batch_options)
    val_batches = make_batches(split.root, split.records, split.indices("val"), train=False, **batch_options)
    # Leaving the block waits for the last files: the heatmap export reads the best checkpoint back.
    with BackgroundWriter() as writer:
        for epoch in range(start_epoch, config.epochs):
            started = time.perf_counter()
            train_metrics = train_one_epoch(trained, train_batches, optimizer, loss_fn, epoch=epoch, runtime=runtime,
                                            scaler=scaler)
            train_seconds = time.perf_counter() - started
            writer.check()  # a failed write of the last epoch's files stops the run now, not an epoch later
            runtime.sync_buffers(model)
            val_metrics = evaluate(model, val_batches, split, runtime=runtime)
            scheduler.step()
            score = selection_score(val_metrics)
            improved = best_score is None or score > best_score
            if improved:
                best_score = score
            if runtime.is_main:
                report_epoch(config, epoch, train_metrics, val_metrics, train_seconds, len(split.indices("train")),
                             improved)
                weights = model.state_dict()  # one dict in both files: the writer's snapshot copies it once
                best = [(best_checkpoint(weights, arch=config.arch, image_size=config.image_size,
                                         config=dataclasses.asdict(config), split=split, epoch=epoch + 1,
                                         val_metrics=val_metrics),
                         checkpoint_path(output_dir, config.arch))] if improved else []
                state = {"model": weights, "arch": config.arch, "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch + 1,
                         "best_score": list(best_score), "split_digest": split.digest,
                         "image_size": config.image_size, "max_images": split.protocol.get("max_images")}
                # Written while the next epoch trains.
                writer.save(best + [(state, state_path(output_dir, config.arch))])
            runtime.barrier()
    if runtime.is_main and not config.keep_training_state:
        # Every epoch ran: the state exists for --resume of an unfinished run, and is the largest file of a run
        # (model + optimizer moments: 1.6 GB for VGG-16). Keep it only when asked, to extend the run later.
        state_path(output_dir, config.arch).unlink(missing_ok=True)


def report_epoch(config: TrainConfig, epoch: int, train_metrics: dict, val_metrics: dict, seconds: float,
                 train_images: int, improved: bool) -> None:
    row = {"epoch": epoch + 1, "train_loss": train_metrics["loss"], "train_accuracy": train_metrics["accuracy"],
           "val_loss": val_metrics["loss"], "val_accuracy": val_metrics["accuracy"],
           "val_balanced_accuracy": val_metrics["balanced_accuracy"], "val_roc_auc": val_metrics["roc_auc"],
           "train_seconds": round(seconds, 2), "train_images_per_second": round(train_images / seconds, 1),
           "best_so_far": improved}
    log_epoch(train_log_path(config.output_dir, config.arch), row)
    balanced = val_metrics["balanced_accuracy"]
    print(f"{config.arch} epoch {epoch + 1}/{config.epochs}: train loss {train_metrics['loss']:.4f} "
          f"acc {train_metrics['accuracy']:.3f} | val loss {val_metrics['loss']:.4f} acc {val_metrics['accuracy']:.3f} "
          f"bal-acc {'n/a' if balanced is None else f'{balanced:.3f}'} | {seconds:.1f}s"
          f"{' | saved best' if improved else ''}", flush=True)
