"""The architectures: one table (`ARCHS`) holds every per-model fact: its torchvision constructor, ImageNet
weights, 2-class head, Grad-CAM target layer, script and display names, and its forward split at that layer
(`body`: input -> target activation, `head`: activation -> logits). Adding a model is one `ArchSpec` entry here
plus its thin cancer_class_<name>.py script; every other module reads the table.

Splitting the forward in two is what makes Grad-CAM cost one forward pass: the body runs without autograd,
only the small head is differentiated (see common/cams/methods.py). No hooks are needed.
"""

import re
import urllib.error
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models

from common.core.errors import PipelineError

NUM_CLASSES = 2


@dataclass(frozen=True)
class ArchSpec:
    name: str  # the key used in file names: fine_tuned_<name>.pth, heatmaps_<name>.npz
    display_name: str  # in tables and plots
    script: str  # the model script that trains it
    build: Callable[..., nn.Module]  # torchvision constructor, called with weights=
    imagenet_weights: models.WeightsEnum | None
    head_attr: str  # dotted path of the final Linear layer replaced by a 2-class one
    target_layer: str  # the activation Grad-CAM differentiates, as a reader finds it in the model
    body: Callable[[nn.Module, torch.Tensor], torch.Tensor]  # images -> target activation (B, C, h, w), >= 0
    head: Callable[[nn.Module, torch.Tensor], torch.Tensor]  # target activation -> logits (B, 2)


def _resnet_body(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    x = model.maxpool(model.relu(model.bn1(model.conv1(images))))
    return model.layer4(model.layer3(model.layer2(model.layer1(x))))


def _resnet_head(model: nn.Module, activation: torch.Tensor) -> torch.Tensor:
    return model.fc(torch.flatten(model.avgpool(activation), 1))


def _densenet_body(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return F.relu(model.features(images))  # the relu that DenseNet.forward applies after norm5


def _densenet_head(model: nn.Module, activation: torch.Tensor) -> torch.Tensor:
    return model.classifier(torch.flatten(F.adaptive_avg_pool2d(activation, (1, 1)), 1))


def _vgg_body(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return model.features[:30](images)  # features[29] is the ReLU after the last conv; [30] is a max-pool


def _vgg_head(model: nn.Module, activation: torch.Tensor) -> torch.Tensor:
    return model.classifier(torch.flatten(model.avgpool(model.features[30](activation)), 1))


# The order of this table is the channel order of the stacked maps the final MLP reads (common/fusion/features.py).
ARCHS = {
    "densenet121": ArchSpec("densenet121", "DenseNet-121", "cancer_class_densenet_121.py", models.densenet121,
                            models.DenseNet121_Weights.IMAGENET1K_V1, "classifier", "relu(features.norm5)",
                            _densenet_body, _densenet_head),
    "resnet50": ArchSpec("resnet50", "ResNet-50", "cancer_class_resnet_50.py", models.resnet50,
                         models.ResNet50_Weights.IMAGENET1K_V2, "fc", "layer4", _resnet_body, _resnet_head),
    "vgg16": ArchSpec("vgg16", "VGG-16", "cancer_class_vgg_16.py", models.vgg16,
                      models.VGG16_Weights.IMAGENET1K_V1, "classifier.6", "features.29", _vgg_body, _vgg_head),
}


# The channel order of the stacked maps, and the order of the models in every table and figure.
MODEL_ORDER = tuple(ARCHS)


def body(model: nn.Module, arch: str, images: torch.Tensor) -> torch.Tensor:
    """Input -> target activation A, exactly as the network's own forward computes it. (B, C, h, w), >= 0."""
    return ARCHS[arch].body(model, images)


def head(model: nn.Module, arch: str, activation: torch.Tensor) -> torch.Tensor:
    """Target activation -> logits (B, 2): the rest of the network's forward."""
    return ARCHS[arch].head(model, activation)


@contextmanager
def evaluating(*modules) -> Iterator[None]:
    """Eval mode (batch norm on running statistics, no dropout) for the block, each module's own mode restored
    after; anything that is not an nn.Module (e.g. a plain function) is left alone."""
    modules = [module for module in modules if isinstance(module, nn.Module)]
    modes = [module.training for module in modules]
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for module, mode in zip(modules, modes):
            module.train(mode)


@torch.no_grad()
def cam_shape(model: nn.Module, arch: str, image_size: int) -> tuple[int, int]:
    """(h, w) of the target activation for square inputs: 7x7 (VGG-16: 14x14) at 224 px."""
    parameter = next(model.parameters())
    probe = torch.zeros(1, 3, image_size, image_size, device=parameter.device, dtype=parameter.dtype)
    with evaluating(model):  # batch norm in train mode would update its running statistics
        return tuple(body(model, arch, probe).shape[2:])


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
_DENSENET_OLD_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
                               r"((?:[12])\.(?:weight|bias|running_mean|running_var))$")


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
        if spec.imagenet_weights is None:
            raise PipelineError(f"{arch} has no ImageNet weights in the models table; use --weights none or PATH")
        try:
            model = spec.build(weights=spec.imagenet_weights)
        except (urllib.error.URLError, OSError, RuntimeError) as error:
            raise PipelineError(
                f"could not download the ImageNet weights for {arch} from {spec.imagenet_weights.url} "
                f"({type(error).__name__}: {error}). Offline? Copy that file to $TORCH_HOME/hub/checkpoints "
                f"(default ~/.cache/torch/hub/checkpoints), or pass --weights PATH to a local copy, "
                f"or --weights none") from None
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
