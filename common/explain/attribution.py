"""Model-agnostic attributions through captum: LIME, Kernel SHAP and occlusion maps of one image, and the share
of the final heatmap MLP's decision carried by each CNN's map (Integrated Gradients). Nothing captum does is
written here by hand; this module only chooses the features, the baselines and the seeds, and shapes the results.

Image methods take `forward`: images (B, 3, H, W) -> class scores (B, K) (a model's logits, or probabilities,
e.g. common.explain.faithfulness.soft_vote_probabilities), and explain class `target` of one normalised image (3, H, W).
* LIME and Kernel SHAP perturb a fixed grid of patches (8 x 8 = 64 features by default, no superpixel
  dependency): a feature is "off" when its patch is replaced by `baseline` (default 0: the ImageNet mean colour
  in normalised input; pass a blurred copy to match common.explain.faithfulness's substrate).
* Occlusion slides a window (default one patch, stride half a patch) and records the score's drop.
Each returns an (H, W) map, each pixel carrying its patch's attribution, or with pooled=True the (grid, grid)
map of patch means. Signed: positive = supports the class.
"""

from collections.abc import Callable
from contextlib import contextmanager

import numpy as np
import torch
from captum._utils.models.linear_model import SkLearnRidge
from captum.attr import IntegratedGradients, KernelShap, Lime, Occlusion
from torch import nn

from common.cams.methods import target_classes
from common.models.registry import MODEL_ORDER, evaluating

DEFAULT_GRID = 8  # patches per side: 64 features for LIME and Kernel SHAP
DEFAULT_SAMPLES = 200  # perturbed images drawn by LIME and Kernel SHAP
DEFAULT_IG_STEPS = 50
LIME_RIDGE_ALPHA = 1.0  # the surrogate's L2 penalty, on 0/1 patch features and DEFAULT_SAMPLES weighted samples
LOGIT_FEATURES = 2 * len(MODEL_ORDER)  # the 'heatmaps+logits' feature set appends each CNN's two logits

Forward = Callable[[torch.Tensor], torch.Tensor]


@contextmanager
def _seeded(seed: int):
    """captum draws its samples from torch's global generator: seed it for the block, leaving the caller's as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def grid_feature_mask(height: int, width: int, *, grid: int = DEFAULT_GRID) -> torch.Tensor:
    """(1, 1, H, W) long: the index (row-major, 0 .. grid^2 - 1) of the grid patch each pixel belongs to."""
    if not 1 <= grid <= min(height, width):
        raise ValueError(f"grid {grid} must be between 1 and the image side ({min(height, width)})")
    rows = torch.arange(height) * grid // height
    columns = torch.arange(width) * grid // width
    return (rows[:, None] * grid + columns[None, :])[None, None]


def pool_to_grid(pixel_map: torch.Tensor, *, grid: int = DEFAULT_GRID) -> torch.Tensor:
    """(H, W) -> (grid, grid): the mean of each patch of `grid_feature_mask`."""
    mask = grid_feature_mask(*pixel_map.shape, grid=grid).flatten()
    values = pixel_map.detach().flatten().double()
    sums = torch.zeros(grid * grid, dtype=torch.float64).index_add_(0, mask, values)
    counts = torch.zeros(grid * grid, dtype=torch.float64).index_add_(0, mask, torch.ones_like(values))
    return (sums / counts).float().view(grid, grid)


def _shaped(attribution: torch.Tensor, *, grid: int, pooled: bool) -> torch.Tensor:
    """captum's (1, 3, H, W) attribution -> (H, W) (mean over channels) or (grid, grid)."""
    pixel_map = attribution.detach()[0].float().mean(dim=0).cpu()
    return pool_to_grid(pixel_map, grid=grid) if pooled else pixel_map


def _patch_attribution(explainer, forward: Forward, image: torch.Tensor, target: int, *, grid: int, samples: int,
                       baseline, seed: int, batch_size: int, pooled: bool) -> torch.Tensor:
    mask = grid_feature_mask(*image.shape[1:], grid=grid).to(image.device)
    baselines = baseline[None] if isinstance(baseline, torch.Tensor) else baseline
    with evaluating(forward), _seeded(seed):
        attribution = explainer.attribute(image[None], baselines=baselines, target=target, feature_mask=mask,
                                          n_samples=samples, perturbations_per_eval=batch_size)
    return _shaped(attribution, grid=grid, pooled=pooled)


def lime_map(forward: Forward, image: torch.Tensor, target: int, *, grid: int = DEFAULT_GRID,
             samples: int = DEFAULT_SAMPLES, baseline: float | torch.Tensor = 0.0, seed: int = 0,
             batch_size: int = 16, pooled: bool = False) -> torch.Tensor:
    """LIME (captum.attr.Lime, exponential cosine kernel) over grid patches, its surrogate a ridge regression.

    Not captum's default surrogate, Lasso with alpha 0.01: where switching patches off moves the score by less
    than about alpha (a probability that changes by a few hundredths, common for a confident CNN), the Lasso
    sets every coefficient to zero and the map is blank. Ridge shrinks without zeroing."""
    lime = Lime(forward, interpretable_model=SkLearnRidge(alpha=LIME_RIDGE_ALPHA))
    return _patch_attribution(lime, forward, image, target, grid=grid, samples=samples, baseline=baseline,
                              seed=seed, batch_size=batch_size, pooled=pooled)


def kernel_shap_map(forward: Forward, image: torch.Tensor, target: int, *, grid: int = DEFAULT_GRID,
                    samples: int = DEFAULT_SAMPLES, baseline: float | torch.Tensor = 0.0, seed: int = 0,
                    batch_size: int = 16, pooled: bool = False) -> torch.Tensor:
    """Kernel SHAP (captum.attr.KernelShap) over grid patches."""
    return _patch_attribution(KernelShap(forward), forward, image, target, grid=grid, samples=samples,
                              baseline=baseline, seed=seed, batch_size=batch_size, pooled=pooled)


def occlusion_map(forward: Forward, image: torch.Tensor, target: int, *, grid: int = DEFAULT_GRID,
                  window: int | None = None, stride: int | None = None, baseline: float | torch.Tensor = 0.0,
                  batch_size: int = 16, pooled: bool = False) -> torch.Tensor:
    """Occlusion (captum.attr.Occlusion): a window x window square (default one grid patch) over all channels,
    slid by `stride` (default half the window); each pixel gets the mean score drop of the windows covering it."""
    window = window or max(1, min(image.shape[1:]) // grid)
    stride = stride or max(1, window // 2)
    baselines = baseline[None] if isinstance(baseline, torch.Tensor) else baseline
    with evaluating(forward):
        attribution = Occlusion(forward).attribute(image[None], sliding_window_shapes=(image.shape[0], window, window),
                                                   strides=(image.shape[0], stride, stride), baselines=baselines,
                                                   target=target, perturbations_per_eval=batch_size)
    return _shaped(attribution, grid=grid, pooled=pooled)


def heatmap_shares(mlp: nn.Module, features, *, grid_size: int, target: str | torch.Tensor = "predicted",
                   baseline: torch.Tensor | None = None, steps: int = DEFAULT_IG_STEPS,
                   batch_size: int = 4096) -> dict[str, np.ndarray]:
    """Share of the final MLP's decision carried by each CNN's map, per image, by Integrated Gradients
    (captum.attr.IntegratedGradients) of the target class's logit with respect to the MLP's input.

    features: (N, 3*S*S) or (N, 3*S*S + 6) as the MLP sees them (common.fusion: standardised, maps in MODEL_ORDER,
    then the logits); baseline: (F,) or (N, F), default zeros, i.e. the mean feature of the MLP's fit rows.
    target: a rule of common.cams.methods.TARGET_RULES applied to the MLP's logits, or (N,) class indices.
    Returns {arch: (N,)} in MODEL_ORDER, plus "logits" for the heatmaps+logits feature set: sum |attribution|
    of each group over the total, so each row sums to 1 (NaN where every attribution is 0: input == baseline).
    """
    features = torch.as_tensor(np.asarray(features, dtype=np.float32))
    map_size = len(MODEL_ORDER) * grid_size * grid_size
    if features.dim() != 2 or features.shape[1] not in (map_size, map_size + LOGIT_FEATURES):
        raise ValueError(f"features of shape {tuple(features.shape)} do not fit {len(MODEL_ORDER)} maps of "
                         f"{grid_size}x{grid_size} (expected (N, {map_size}) or (N, {map_size + LOGIT_FEATURES}))")
    baselines = torch.zeros_like(features) if baseline is None else torch.as_tensor(baseline).expand_as(features)
    with evaluating(mlp):
        with torch.no_grad():
            logits = mlp(features)
        classes = target if isinstance(target, torch.Tensor) else target_classes(logits, target)
        attributions = IntegratedGradients(mlp).attribute(features, baselines=baselines, target=classes.long(),
                                                          n_steps=steps, internal_batch_size=batch_size)
    magnitude = attributions.detach().abs().double()
    channel_size = grid_size * grid_size
    groups = {arch: magnitude[:, index * channel_size:(index + 1) * channel_size].sum(dim=1)
              for index, arch in enumerate(MODEL_ORDER)}
    if features.shape[1] > map_size:
        groups["logits"] = magnitude[:, map_size:].sum(dim=1)
    total = sum(groups.values())
    return {name: torch.where(total > 0, value / total, torch.nan).numpy() for name, value in groups.items()}
