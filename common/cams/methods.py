"""Grad-CAM, Grad-CAM++ and LayerCAM at the cost of one forward pass, and the one vocabulary of their names.

All three need only the target activation A (common.models.registry: ResNet-50 `layer4`, DenseNet-121
`relu(features.norm5)`, VGG-16 `features[29]`) and its gradient g = dy_c/dA. The body up to A runs under no_grad;
only the head (pooling + classifier) runs with autograd, and `torch.autograd.grad` takes dy_c/dA alone: no full
backward, no parameter gradients, no hooks. The same pass yields the logits. With A of shape (B, C, h, w) and sums
over the spatial positions ij:

    gradcam     alpha_k = mean_ij g_k                                   map = ReLU(sum_k alpha_k A_k)
    gradcam++   a_kij = g^2 / (2 g^2 + sum_ij(A_k) g^3 + eps), 0 where g == 0
                alpha_k = sum_ij ReLU(g_kij) a_kij                      map = ReLU(sum_k alpha_k A_k)
    layercam    map = ReLU(sum_k ReLU(g_k) * A_k)                       (a weight per position, not per channel)

Grad-CAM is Selvaraju et al. 2017. Grad-CAM++ is Chattopadhay et al. 2018, eq. 19: its closed form comes from
taking the score as exp(y_c), which turns the second and third derivatives into powers of the first; like
pytorch-grad-cam (`GradCAMPlusPlus`) we put the raw score's gradient in it, with eps = 1e-6. LayerCAM is Jiang et
al. 2021. The maps equal pytorch-grad-cam's before its min-max scaling (tests/test_cam_methods.py checks this at
the same layers). Every map is raw: after the ReLU, before any scaling (common.cams.display scales for display).

The target class c follows a stated rule, never the true label (that would leak the answer into test-time
features): 'predicted' (argmax of the logits), 'malignant' or 'benign'.
"""

import torch
from torch import nn

from common.core.errors import PipelineError
from common.data.records import CLASS_NAMES
from common.models.registry import body, evaluating, head

# The one vocabulary of CAM methods: the name options and files use -> (display name, tag). The tag is the name
# where a '+' cannot go (array keys in a zip, file and column names): prob_mlp_<tag>, cams_<tag>.
CAM_METHOD_TABLE = {"gradcam": ("Grad-CAM", "gradcam"), "gradcam++": ("Grad-CAM++", "gradcampp"),
                    "layercam": ("LayerCAM", "layercam")}
CAM_METHODS = tuple(CAM_METHOD_TABLE)
CAM_DISPLAY_NAMES = {method: display for method, (display, _) in CAM_METHOD_TABLE.items()}
TARGET_RULES = ("predicted", "malignant", "benign")
GRADCAM_PLUSPLUS_EPS = 1e-6  # pytorch-grad-cam's; it dominates 2 g^2 when the gradients are small


def method_tag(method: str) -> str:
    """'gradcam++' -> 'gradcampp': the method's name where a '+' cannot go."""
    return CAM_METHOD_TABLE[method][1]


def check_cam_methods(names, *, option: str = "--cam-methods") -> tuple[str, ...]:
    """The one validator of CAM method names: 'gradcam,layercam' or a sequence -> ('gradcam', 'layercam') in
    CAM_METHODS order; an unknown or empty list is a one-line error naming `option`."""
    named = [name.strip() for name in (names.split(",") if isinstance(names, str) else names) if name.strip()]
    unknown = [name for name in named if name not in CAM_METHODS]
    if unknown or not named:
        problem = f"unknown CAM method(s) {', '.join(unknown)}" if unknown else "no CAM method given"
        raise PipelineError(f"{option} {','.join(named)!r}: {problem}; choose from {','.join(CAM_METHODS)}")
    return tuple(name for name in CAM_METHODS if name in named)


def parse_cam_methods(text: str) -> tuple[str, ...]:
    """The model scripts' --cam-methods: check_cam_methods, with Grad-CAM always included (the design's map)."""
    return check_cam_methods(("gradcam", *check_cam_methods(text)))


def target_classes(logits: torch.Tensor, rule: str) -> torch.Tensor:
    """(B,) the class each image's map explains, by `rule` (TARGET_RULES)."""
    if rule == "predicted":
        return logits.argmax(dim=1)
    if rule in CLASS_NAMES:
        return torch.full((logits.shape[0],), CLASS_NAMES.index(rule), dtype=torch.long, device=logits.device)
    raise ValueError(f"unknown target-class rule {rule!r}; choose one of {TARGET_RULES}")


def _grad_cam_plus_plus_weights(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """alpha_k (B, C, 1, 1) of Grad-CAM++ (eq. 19 of Chattopadhay et al. 2018, pytorch-grad-cam's form)."""
    squared = gradient.pow(2)
    activation_sums = activation.sum(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
    alpha = squared / (2 * squared + activation_sums * squared * gradient + GRADCAM_PLUSPLUS_EPS)
    alpha = torch.where(gradient != 0, alpha, torch.zeros_like(alpha))
    return (torch.relu(gradient) * alpha).sum(dim=(2, 3), keepdim=True)


def cam_maps(activation: torch.Tensor, gradient: torch.Tensor, methods=CAM_METHODS) -> dict[str, torch.Tensor]:
    """{method: raw map (B, h, w) float32 >= 0} from the target activation A and dy_c/dA, both (B, C, h, w)."""
    methods = check_cam_methods(methods, option="methods")
    activation, gradient = activation.detach().float(), gradient.detach().float()
    maps = {}
    for method in methods:
        if method == "gradcam":
            weights = gradient.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
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
    pass (no autograd) and ONE `autograd.grad` through the head.

    `target` is a rule of TARGET_RULES, or a (B,) tensor of class indices (e.g. a soft vote's class, so that
    several models explain the same class). The model is put in eval mode for the call and its mode restored
    afterwards.
    """
    methods = check_cam_methods(methods, option="methods")
    with evaluating(model):
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


def grad_cam(model: nn.Module, arch: str, images: torch.Tensor, *, target: str = "predicted",
             autocast_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw Grad-CAM maps (B, h, w) float32 >= 0 and logits (B, 2) float32: cams_and_logits for Grad-CAM alone."""
    maps, logits = cams_and_logits(model, arch, images, target=target, methods=("gradcam",),
                                   autocast_dtype=autocast_dtype)
    return maps["gradcam"], logits
