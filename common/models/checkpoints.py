"""Checkpoints of the fine-tuned CNNs: what fine_tuned_<arch>.pth holds, and reading one back safely.

Everything in a checkpoint is a tensor or a primitive, so torch.load(path, weights_only=True) reads it; `model`
is a state_dict that loads into the stock torchvision model with a 2-class head.
"""

from pathlib import Path

import torch
from torch import nn

from common.core.errors import PipelineError
from common.data.demo import is_synthetic_dataset
from common.data.partition import Split
from common.data.records import CLASS_NAMES
from common.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from common.models.registry import ARCHS, build_model

CHECKPOINT_FORMAT_VERSION = 2  # 2: `config` is the TrainConfig (common.training.config) as a dict
SELECTION_METRIC = "val balanced accuracy (ties: lower val loss)"


def best_checkpoint(weights: dict[str, torch.Tensor], *, arch: str, image_size: int, config: dict, split: Split,
                    epoch: int, val_metrics: dict) -> dict:
    """The contents of fine_tuned_<arch>.pth."""
    spec = ARCHS[arch]
    return {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "model": weights,
        "arch": arch,
        "class_names": list(CLASS_NAMES),
        "image_size": image_size,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "target_layer": spec.target_layer,
        "epoch": epoch,
        "selection_metric": SELECTION_METRIC,
        "val_metrics": val_metrics,
        "config": config,  # the model script's TrainConfig as a plain dict
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


def model_from_checkpoint(checkpoint: dict) -> nn.Module:
    """The checkpoint's model, built without initialising its weights: the layers are made on the meta device
    and the checkpoint's tensors (memory-mapped by load_checkpoint) become its parameters. Random initialisation,
    immediately overwritten, took 0.9 s for VGG-16 on a CPU; a K-fold run's viewer loads 15 models."""
    with torch.device("meta"):
        model = build_model(checkpoint["arch"], "none")
    try:
        model.load_state_dict(checkpoint["model"], assign=True)
    except RuntimeError as error:
        raise PipelineError(f"the {checkpoint['arch']} checkpoint's weights do not fit the model "
                            f"({str(error).splitlines()[0]})") from None
    return model


def training_caveats(checkpoints: dict[str, list[dict]]) -> list[str]:
    """Why the models' probabilities say nothing about real tissue: one line per reason, naming the models it
    applies to ([] when nothing is known against them). `checkpoints`: model name -> its checkpoint dicts (one per
    fold of a K-fold run); a reason applies to a model when it applies to any of them."""
    reasons = {
        "trained from random initialisation (--weights none)":
            lambda checkpoint: checkpoint.get("config", {}).get("weights") == "none",
        "trained on synthetic demo data (common/data/demo.py), not on BreaKHis":
            lambda checkpoint: bool(checkpoint.get("synthetic_data")),
    }
    lines = []
    for reason, applies in reasons.items():
        names = [name for name, found in checkpoints.items() if any(map(applies, found))]
        if names:
            lines.append(f"{', '.join(names)}: {reason}")
    return lines
