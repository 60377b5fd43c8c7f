"""Grad-CAM, Grad-CAM++ and LayerCAM from one forward pass: all three need only the target activation A and
its gradient dy_c/dA, which the one-pass Grad-CAM of common/cam.py already computes.

With A of shape (B, C, h, w), g = dy_c/dA and sums over the spatial positions ij:

    gradcam     alpha_k = mean_ij g_k                                   map = ReLU(sum_k alpha_k A_k)
    gradcam++   a_kij = g^2 / (2 g^2 + sum_ij(A_k) g^3 + eps), 0 where g == 0
                alpha_k = sum_ij ReLU(g_kij) a_kij                      map = ReLU(sum_k alpha_k A_k)
    layercam    map = ReLU(sum_k ReLU(g_k) * A_k)                       (a weight per position, not per channel)

Grad-CAM++ is Chattopadhay et al. 2018, eq. 19: its closed form comes from taking the score as exp(y_c), which
turns the second and third derivatives into powers of the first; like pytorch-grad-cam (`GradCAMPlusPlus`) we
put the raw score's gradient in it, with eps = 1e-6. LayerCAM is Jiang et al. 2021. The maps equal
pytorch-grad-cam's `GradCAMPlusPlus` and `LayerCAM` before its min-max scaling (tests/test_cam_methods.py checks
this at the same layers).

Every map is raw: after the ReLU, before any min-max scaling (common.cam.scale_for_display is for display only).

In heatmaps_<arch>.npz each method has its own array (`CAM_ARRAY_KEYS`: names safe in a zip member): `cams` is
Grad-CAM (the file's original contract, always present), `cams_gradcampp` and `cams_layercam` the others, and
`cam_methods` lists what the file holds. A file written before the variants holds Grad-CAM only.
"""

import numpy as np
import torch
from torch import nn

from common.errors import PipelineError
from common.models import body, head

CAM_METHODS = ("gradcam", "gradcam++", "layercam")
CAM_ARRAY_KEYS = {"gradcam": "cams", "gradcam++": "cams_gradcampp", "layercam": "cams_layercam"}
CAM_DISPLAY_NAMES = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "layercam": "LayerCAM"}
GRADCAM_PLUSPLUS_EPS = 1e-6  # pytorch-grad-cam's; it dominates 2 g^2 when the gradients are small


def parse_cam_methods(text: str) -> tuple[str, ...]:
    """'gradcam,layercam' -> ('gradcam', 'layercam'); Grad-CAM is always included (the heatmap file's `cams`)."""
    named = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in named if name not in CAM_METHODS]
    if unknown:
        raise PipelineError(f"--cam-methods {text!r}: unknown method(s) {', '.join(unknown)}; "
                            f"choose from {','.join(CAM_METHODS)}")
    return tuple(name for name in CAM_METHODS if name == "gradcam" or name in named)


def stored_cam_methods(heatmaps: dict) -> tuple[str, ...]:
    """The CAM methods a loaded heatmap file holds (a file from before the variants: Grad-CAM only)."""
    if "cam_methods" not in heatmaps:
        return ("gradcam",)
    return tuple(str(name) for name in np.atleast_1d(heatmaps["cam_methods"]))


def stored_cams(heatmaps: dict, method: str, path) -> np.ndarray:
    """(N, h, w) raw maps of `method` from a loaded heatmap file, or an error saying how to make them."""
    if method not in stored_cam_methods(heatmaps) or CAM_ARRAY_KEYS[method] not in heatmaps:
        raise PipelineError(f"heatmap file {path} holds no {method} maps (it has {', '.join(stored_cam_methods(heatmaps))}); "
                            f"regenerate it with --heatmaps-only --cam-methods {','.join(CAM_METHODS)}")
    return heatmaps[CAM_ARRAY_KEYS[method]]


def _check_methods(methods) -> tuple[str, ...]:
    methods = tuple(methods)
    unknown = [name for name in methods if name not in CAM_METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown CAM method(s) {unknown or 'none given'}; choose from {CAM_METHODS}")
    return methods


def _grad_cam_plus_plus_weights(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """alpha_k (B, C, 1, 1) of Grad-CAM++ (eq. 19 of Chattopadhay et al. 2018, pytorch-grad-cam's form)."""
    squared = gradient.pow(2)
    activation_sums = activation.sum(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
    alpha = squared / (2 * squared + activation_sums * squared * gradient + GRADCAM_PLUSPLUS_EPS)
    alpha = torch.where(gradient != 0, alpha, torch.zeros_like(alpha))
    return (torch.relu(gradient) * alpha).sum(dim=(2, 3), keepdim=True)


def cam_maps(activation: torch.Tensor, gradient: torch.Tensor,
             methods=CAM_METHODS) -> dict[str, torch.Tensor]:
    """{method: raw map (B, h, w) float32 >= 0} from the target activation A and dy_c/dA, both (B, C, h, w)."""
    methods = _check_methods(methods)
    activation, gradient = activation.detach().float(), gradient.detach().float()
    maps = {}
    for method in methods:
        if method == "gradcam":
            weights = gradient.mean(dim=(2, 3), keepdim=True)  # as common.cam.grad_cam computes it
            maps[method] = torch.relu((weights * activation).sum(dim=1))
        elif method == "gradcam++":
            maps[method] = torch.relu((_grad_cam_plus_plus_weights(activation, gradient) * activation).sum(dim=1))
        else:  # layercam
            maps[method] = torch.relu((torch.relu(gradient) * activation).sum(dim=1))
    return maps


def cams_and_logits(model: nn.Module, arch: str, images: torch.Tensor, *, target: str | torch.Tensor = "predicted",
                    methods=CAM_METHODS, autocast_dtype: torch.dtype | None = None
                    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """All requested raw maps {method: (B, h, w) float32 >= 0} and the logits (B, 2) float32, from ONE body
    pass (no autograd) and ONE `autograd.grad` through the head, as common.cam.grad_cam does.

    `target` is a rule of common.cam.TARGET_RULES, or a (B,) tensor of class indices (e.g. a soft vote's class,
    so that several models explain the same class). The model is put in eval mode for the call and its mode
    restored afterwards.
    """
    from common.cam import target_classes  # here, not at the top: common.cam.grad_cam calls this function

    methods = _check_methods(methods)
    was_training = model.training
    model.eval()
    try:
        with torch.autocast(images.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            with torch.no_grad():
                activation = body(model, arch, images)  # (B, C, h, w)
            activation = activation.detach().float().requires_grad_(True)
            with torch.enable_grad():
                logits = head(model, arch, activation).float()  # (B, 2)
                if isinstance(target, torch.Tensor):
                    classes = target.to(device=logits.device, dtype=torch.long)
                else:
                    classes = target_classes(logits.detach(), target)
                # Summing over the batch is exact: image b's score depends on image b's activation only.
                score = logits.gather(1, classes[:, None]).sum()
                (gradient,) = torch.autograd.grad(score, activation, only_inputs=True)
        return cam_maps(activation, gradient, methods), logits.detach()
    finally:
        model.train(was_training)
