"""Grad-CAM (Selvaraju et al. 2017) at the cost of one forward pass.

    alpha_k = mean_ij d y_c / d A_k[i, j]          map = ReLU(sum_k alpha_k A_k)

A is the target activation (common/models.py: ResNet-50 `layer4`, DenseNet-121 `relu(features.norm5)`,
VGG-16 `features[29]`). The body up to A runs under no_grad; only the head (pooling + classifier) runs with
autograd, and `torch.autograd.grad` takes dy_c/dA alone: no full backward, no parameter gradients, no hooks.
The same pass yields the logits.

The target class c follows a stated rule, never the true label (that would leak the answer into test-time
features): 'predicted' (argmax of the logits), 'malignant' or 'benign'.
"""

import numpy as np
import torch
from torch import nn

from common.data import CLASS_NAMES

TARGET_RULES = ("predicted", "malignant", "benign")


def target_classes(logits: torch.Tensor, rule: str) -> torch.Tensor:
    if rule == "predicted":
        return logits.argmax(dim=1)
    if rule in CLASS_NAMES:
        return torch.full((logits.shape[0],), CLASS_NAMES.index(rule), dtype=torch.long, device=logits.device)
    raise ValueError(f"unknown target-class rule {rule!r}; choose one of {TARGET_RULES}")


def grad_cam(model: nn.Module, arch: str, images: torch.Tensor, *, target: str = "predicted",
             autocast_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw Grad-CAM maps (B, h, w) float32 >= 0 (no min-max scaling) and logits (B, 2) float32.

    The model is put in eval mode for the call and its mode restored afterwards.
    """
    from common.cam_methods import cams_and_logits  # here: common.cam_methods imports target_classes from this module

    # The one pass lives in common.cam_methods (Grad-CAM++ and LayerCAM share it); Grad-CAM is one of its maps.
    maps, logits = cams_and_logits(model, arch, images, target=target, methods=("gradcam",),
                                   autocast_dtype=autocast_dtype)
    return maps["gradcam"], logits


def scale_for_display(cams: np.ndarray) -> np.ndarray:
    """Min-max scale each map to [0, 1] for display only; a constant map becomes all zeros."""
    cams = np.asarray(cams, dtype=np.float32)
    low = cams.min(axis=(-2, -1), keepdims=True)
    span = cams.max(axis=(-2, -1), keepdims=True) - low
    return np.where(span > 0, (cams - low) / np.where(span > 0, span, 1), 0.0).astype(np.float32)
