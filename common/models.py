"""The three architectures: one table maps each to its torchvision constructor, ImageNet weights, 2-class head
and Grad-CAM target layer, and each model's forward split at that layer (`body`, `head`).

Splitting the forward in two is what makes Grad-CAM cost one forward pass: the body runs without autograd,
only the small head is differentiated (see common/cam.py). No hooks are needed.
"""

import re
import urllib.error
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models

from common.errors import PipelineError

NUM_CLASSES = 2


@dataclass(frozen=True)
class ArchSpec:
    name: str
    build: Callable[..., nn.Module]
    imagenet_weights: models.WeightsEnum
    head_attr: str  # dotted path of the final Linear layer replaced by a 2-class one
    target_layer: str  # the activation Grad-CAM differentiates, as a reader finds it in the model


ARCHS = {
    "densenet121": ArchSpec("densenet121", models.densenet121, models.DenseNet121_Weights.IMAGENET1K_V1,
                            "classifier", "relu(features.norm5)"),
    "resnet50": ArchSpec("resnet50", models.resnet50, models.ResNet50_Weights.IMAGENET1K_V2, "fc", "layer4"),
    "vgg16": ArchSpec("vgg16", models.vgg16, models.VGG16_Weights.IMAGENET1K_V1, "classifier.6", "features.29"),
}


def body(model: nn.Module, arch: str, images: torch.Tensor) -> torch.Tensor:
    """Input -> target activation A, exactly as the network's own forward computes it. (B, C, h, w), >= 0."""
    if arch == "resnet50":
        x = model.maxpool(model.relu(model.bn1(model.conv1(images))))
        return model.layer4(model.layer3(model.layer2(model.layer1(x))))
    if arch == "densenet121":
        return F.relu(model.features(images))  # the relu that DenseNet.forward applies after norm5
    if arch == "vgg16":
        return model.features[:30](images)  # features[29] is the ReLU after the last conv; [30] is a max-pool
    raise ValueError(arch)


@torch.no_grad()
def cam_shape(model: nn.Module, arch: str, image_size: int) -> tuple[int, int]:
    """(h, w) of the target activation for square inputs: 7x7 (VGG-16: 14x14) at 224 px."""
    parameter = next(model.parameters())
    probe = torch.zeros(1, 3, image_size, image_size, device=parameter.device, dtype=parameter.dtype)
    was_training = model.training
    model.eval()  # batch norm in train mode would update its running statistics
    try:
        return tuple(body(model, arch, probe).shape[2:])
    finally:
        model.train(was_training)


def head(model: nn.Module, arch: str, activation: torch.Tensor) -> torch.Tensor:
    """Target activation -> logits (B, 2): the rest of the network's forward."""
    if arch == "resnet50":
        return model.fc(torch.flatten(model.avgpool(activation), 1))
    if arch == "densenet121":
        return model.classifier(torch.flatten(F.adaptive_avg_pool2d(activation, (1, 1)), 1))
    if arch == "vgg16":
        return model.classifier(torch.flatten(model.avgpool(model.features[30](activation)), 1))
    raise ValueError(arch)


def _replace_head(model: nn.Module, spec: ArchSpec) -> None:
    parent_path, _, leaf = spec.head_attr.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    old = getattr(parent, leaf) if not leaf.isdigit() else parent[int(leaf)]
    new = nn.Linear(old.in_features, NUM_CLASSES)
    if leaf.isdigit():
        parent[int(leaf)] = new
    else:
        setattr(parent, leaf, new)


# Old DenseNet checkpoints (torchvision's own download among them) name 'norm.1' what the model calls 'norm1'.
_DENSENET_OLD_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def _read_weights_file(path: Path, spec: ArchSpec, split_digest: str | None) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise PipelineError(f"--weights {path}: no such file (choose imagenet, none, or a local state_dict file)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a bad file; all mean the same to the user
        raise PipelineError(f"--weights {path}: not a readable PyTorch state_dict ({type(error).__name__})") from None
    if not isinstance(state, dict):
        raise PipelineError(f"--weights {path} holds a {type(state).__name__}, not a state_dict")
    if "model" in state and "arch" in state:  # one of our own checkpoints
        if state["arch"] != spec.name:
            raise PipelineError(f"--weights {path} is a {state['arch']} checkpoint, not {spec.name}")
        if split_digest is not None and state.get("split_digest") != split_digest:
            # Its training images may include this split's test patients.
            raise PipelineError(f"--weights {path} was fine-tuned on another split than this run's; its training "
                                "patients may be this split's test patients. Use ImageNet weights")
        state = state["model"]
    if spec.name == "densenet121":
        state = {_DENSENET_OLD_KEY.sub(r"\1\2", key): value for key, value in state.items()}
    return state


def _load_into(model: nn.Module, state: dict, path: Path, spec: ArchSpec) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError:
        expected, given = set(model.state_dict()), set(state)
        raise PipelineError(
            f"--weights {path} does not fit {spec.name}: {len(expected - given)} missing and "
            f"{len(given - expected)} unexpected key(s), e.g. {sorted(expected ^ given)[:2]} "
            "(is it the state_dict of another architecture?)") from None


def build_model(arch: str, weights: str, *, split_digest: str | None = None) -> nn.Module:
    """The stock torchvision model with a 2-class head; weights 'imagenet' (download), 'none' or a local file.

    A local file may hold an ImageNet state_dict (1000-class head: loaded before the head is replaced, e.g. the
    file torchvision downloads to ~/.cache/torch/hub/checkpoints) or one of our fine_tuned_<arch>.pth, which is
    accepted only when it was trained on the split with `split_digest` (else it may have seen test patients).
    """
    spec = ARCHS[arch]
    if weights == "none":
        model = spec.build(weights=None)
        _replace_head(model, spec)
        return model
    if weights == "imagenet":
        try:
            model = spec.build(weights=spec.imagenet_weights)
        except (urllib.error.URLError, OSError, RuntimeError) as error:
            raise PipelineError(
                f"could not download the ImageNet weights for {arch} from {spec.imagenet_weights.url} "
                f"({type(error).__name__}: {error}). Offline? Copy that file to $TORCH_HOME/hub/checkpoints "
                f"(default ~/.cache/torch), or pass --weights PATH to a local copy, or --weights none") from None
        _replace_head(model, spec)
        return model
    path = Path(weights).expanduser()
    state = _read_weights_file(path, spec, split_digest)
    model = spec.build(weights=None)
    head_weight = state.get(f"{spec.head_attr}.weight")
    if head_weight is not None and head_weight.shape[0] != NUM_CLASSES:  # an ImageNet file: load, then replace
        _load_into(model, state, path, spec)
        _replace_head(model, spec)
    else:
        _replace_head(model, spec)
        _load_into(model, state, path, spec)
    return model
