"""The reference Grad-CAM that tests and benchmarks compare common.cams.methods against; the pipeline never uses it.

It is the recipe common libraries use (pytorch-grad-cam, torch-cam): a forward hook on the target module keeps
the activation A and retains its gradient, the whole model runs forward with autograd, and `score.backward()`
runs through every layer (every parameter gets a .grad). alpha_k = mean_ij dy_c/dA_k[i, j];
map = ReLU(sum_k alpha_k A_k). The target module is resolved once from the models table's `target_layer`
(`relu(features.norm5)`: the output of `features.norm5`, with the ReLU the network's forward applies after it).
"""

import re

import torch
import torch.nn.functional as F
from torch import nn

from common.cams.methods import target_classes
from common.models.registry import ARCHS

_RELU_OF = re.compile(r"^relu\((?P<module>[\w.]+)\)$")


def target_module(model: nn.Module, arch: str) -> tuple[nn.Module, bool]:
    """(the module whose output is A, or whose output's ReLU is A; whether that ReLU must be applied)."""
    layer = ARCHS[arch].target_layer
    match = _RELU_OF.match(layer)
    return model.get_submodule(match["module"] if match else layer), match is not None


def full_backward_grad_cam(model: nn.Module, arch: str, images: torch.Tensor, target: str = "predicted"
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Maps (B, h, w) >= 0, logits (B, 2) and the activation A (B, C, h, w), all detached."""
    kept = {}
    module, apply_relu = target_module(model, arch)

    def keep_activation(_module, _inputs, output):
        if apply_relu:
            # The activation the network pools. Its forward then applies F.relu(inplace=True) again (a no-op on
            # values >= 0); the clone keeps that in-place op away from the tensor our ReLU saved for backward.
            output = F.relu(output).clone()
        output.retain_grad()
        kept["activation"] = output
        return output

    handle = module.register_forward_hook(keep_activation)
    try:
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            logits = model(images)  # (B, 2), graph through every layer
            classes = target_classes(logits.detach(), target)
            logits.gather(1, classes[:, None]).sum().backward()  # every parameter's .grad is computed too
        activation = kept["activation"]
        weights = activation.grad.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
        cams = torch.relu((weights * activation.detach()).sum(dim=1))  # (B, h, w)
        return cams, logits.detach(), activation.detach()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
