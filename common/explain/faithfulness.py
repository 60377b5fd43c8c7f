"""Faithfulness of saliency maps: deletion and insertion AUC (Petsiuk et al. 2018, RISE), against baselines.

For one image and a map: the pixels are ranked by the map (upsampled bilinearly to the input size, most
salient first), then in `steps` equal steps (17 points for 16 steps, 0 % and 100 % included)
  deletion:  the top-ranked pixels are replaced by a blurred copy of the image;
  insertion: the top-ranked pixels of the image are put onto the blurred copy.
The curve is the target class's softmax probability at each step; its area is taken by the trapezoid rule over
the fraction of pixels in [0, 1]. A faithful map makes the probability fall fast (LOW deletion AUC) and rise
fast (HIGH insertion AUC).

The blur is a Gaussian blur of the normalised input tensor, kernel 11 px and sigma 5 px at 224 px (RISE's
substrate), both scaled with the image size (`blur_for`). All perturbed copies of one image go through the
model in one forward pass per curve (`batch_size` splits them further), never one forward per step.

Every method is compared with two baselines: a random map (seeded, on a coarse grid like a CAM's) and a
centred Gaussian map (a centre bias, no look at the image).

A saliency method here is a callable `(images (B, 3, H, W), classes (B,)) -> maps (B, h, w)`: it explains the
class that is scored. `class_probabilities` callables map images to softmax probabilities (B, K).
"""

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.functional import gaussian_blur

from common.cams.display import combined_map
from common.cams.methods import cams_and_logits, target_classes
from common.core.console import progress
from common.models.registry import evaluating

DEFAULT_STEPS = 16
BLUR_SIGMA_AT_224 = 5.0  # px; RISE's blurred substrate: an 11 px kernel, sigma 5, at 224 px
BASELINE_GRID = 7  # side of the random baseline map: a CAM's grid at 224 px (ResNet-50, DenseNet-121)
GAUSSIAN_SIGMA_FRACTION = 0.25  # sigma of the centred Gaussian baseline, as a fraction of the image side
RANDOM_BASELINE, GAUSSIAN_BASELINE = "random (baseline)", "centred Gaussian (baseline)"

SaliencyMethod = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ClassProbabilities = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Blur:
    kernel_size: int  # px, odd
    sigma: float  # px

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(..., 3, H, W) -> the same shape, blurred (reflect padding at the borders)."""
        return gaussian_blur(images, [self.kernel_size, self.kernel_size], [self.sigma, self.sigma])

    def describe(self) -> str:
        return f"Gaussian blur of the normalised input, kernel {self.kernel_size} px, sigma {self.sigma:.2f} px"


def blur_for(image_size: int) -> Blur:
    """RISE's substrate (kernel 11, sigma 5 at 224 px) scaled to `image_size`: kernel = 2 round(sigma) + 1."""
    sigma = BLUR_SIGMA_AT_224 * image_size / 224
    return Blur(kernel_size=2 * max(1, round(sigma)) + 1, sigma=sigma)


def soft_vote_probabilities(models: Sequence[nn.Module]) -> ClassProbabilities:
    """images -> (B, K): the mean of the models' softmax probabilities (one model: its own probabilities)."""
    def probabilities(images: torch.Tensor) -> torch.Tensor:
        with evaluating(*models), torch.no_grad():
            return torch.stack([torch.softmax(model(images).float(), dim=1) for model in models]).mean(dim=0)
    return probabilities


def probability_of(class_probabilities: ClassProbabilities,
                   target_class: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """images -> P(target_class) (B,): the `predict_proba` that `deletion_insertion` takes."""
    return lambda images: class_probabilities(images)[:, target_class]


def _pixel_masks(saliency: torch.Tensor, size: tuple[int, int], steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks (steps + 1, 1, H, W), True where a pixel is among the top-ranked at that step, and the fractions
    of pixels (steps + 1,) they cover. Ties keep the row-major order (a stable sort), so results are repeatable."""
    height, width = size
    upsampled = F.interpolate(saliency.detach().float().cpu()[None, None], size=size, mode="bilinear",
                              align_corners=False).flatten()
    order = torch.argsort(upsampled, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(order.numel())
    counts = torch.round(torch.linspace(0, height * width, steps + 1, dtype=torch.float64)).long()
    masks = ranks[None, :] < counts[:, None]  # (steps + 1, H*W)
    return masks.view(steps + 1, 1, height, width), counts.double() / (height * width)


def _probabilities_in_batches(predict_proba: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                              batch_size: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([predict_proba(images[start:start + batch_size]).detach().float().cpu().flatten()
                          for start in range(0, len(images), batch_size)])


def deletion_insertion(predict_proba: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor,
                       saliency: torch.Tensor, *, blurred: torch.Tensor, steps: int = DEFAULT_STEPS,
                       batch_size: int | None = None) -> dict:
    """Deletion and insertion curves and AUCs of one image (3, H, W) for one map (h, w).

    predict_proba: images (B, 3, H, W) -> P(target class) (B,). blurred: the substrate, (3, H, W).
    batch_size: perturbed images per forward pass (default: one pass per curve, steps + 1 images).
    Returns {"deletion_auc", "insertion_auc": float, "deletion_curve", "insertion_curve", "fractions": (steps+1,)}.
    """
    if image.dim() != 3 or blurred.shape != image.shape or saliency.dim() != 2 or steps < 1:
        raise ValueError(f"expected image (3, H, W), blurred of the same shape, saliency (h, w) and steps >= 1; "
                         f"got {tuple(image.shape)}, {tuple(blurred.shape)}, {tuple(saliency.shape)}, {steps}")
    masks, fractions = _pixel_masks(saliency, tuple(image.shape[1:]), steps)
    masks = masks.to(image.device)
    deleted = torch.where(masks, blurred[None], image[None])  # (steps + 1, 3, H, W)
    inserted = torch.where(masks, image[None], blurred[None])
    batch_size = batch_size or steps + 1
    curves = _probabilities_in_batches(predict_proba, torch.cat([deleted, inserted]), batch_size).double()
    deletion_curve, insertion_curve = curves[:steps + 1], curves[steps + 1:]
    return {"deletion_auc": float(torch.trapezoid(deletion_curve, fractions)),
            "insertion_auc": float(torch.trapezoid(insertion_curve, fractions)),
            "deletion_curve": deletion_curve.numpy(), "insertion_curve": insertion_curve.numpy(),
            "fractions": fractions.numpy()}


def random_saliency(*, seed: int = 0, grid_size: int = BASELINE_GRID) -> SaliencyMethod:
    """Baseline: a uniform random (grid_size x grid_size) map per image, from its own seeded generator."""
    generator = torch.Generator().manual_seed(seed)

    def saliency(images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        return torch.rand(len(images), grid_size, grid_size, generator=generator)
    return saliency


def centred_gaussian_saliency(*, sigma_fraction: float = GAUSSIAN_SIGMA_FRACTION) -> SaliencyMethod:
    """Baseline: a centred isotropic Gaussian (sigma = sigma_fraction x side) at the input size, the same for all."""
    def saliency(images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        ys = (torch.arange(height) + 0.5 - height / 2) / (sigma_fraction * height)
        xs = (torch.arange(width) + 0.5 - width / 2) / (sigma_fraction * width)
        gaussian = torch.exp(-0.5 * (ys[:, None] ** 2 + xs[None, :] ** 2))
        return gaussian.expand(len(images), height, width)
    return saliency


def cam_saliency(model: nn.Module, arch: str, *, method: str) -> SaliencyMethod:
    """One model's raw CAM map (common.cams.methods) for the given classes."""
    def saliency(images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        return cams_and_logits(model, arch, images, target=classes, methods=(method,))[0][method]
    return saliency


def combined_cam_saliency(models: Sequence[tuple[str, nn.Module]], *, method: str) -> SaliencyMethod:
    """The models' combined map, as the report shows it (common.cams.heatmap_file.combined_map: the mean of each model's
    display-scaled map at the input size), every model explaining the same classes (e.g. the soft vote's)."""
    def saliency(images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        maps = [cam_saliency(model, arch, method=method)(images, classes).cpu().numpy() for arch, model in models]
        size = (images.shape[-1], images.shape[-2])  # (width, height), PIL's order
        return torch.from_numpy(np.stack([combined_map([per_model[row] for per_model in maps], size)
                                          for row in range(len(images))]))
    return saliency


def _summary(deletion: list[float], insertion: list[float], map_seconds: list[float]) -> dict:
    return {"deletion_auc": float(np.mean(deletion)), "deletion_auc_std": float(np.std(deletion)),
            "insertion_auc": float(np.mean(insertion)), "insertion_auc_std": float(np.std(insertion)),
            "map_seconds_per_image": float(np.mean(map_seconds)),
            "per_image": {"deletion_auc": deletion, "insertion_auc": insertion, "map_seconds": map_seconds}}


def merge_tables(tables: list[dict]) -> dict:
    """Tables of score_methods on disjoint image sets (e.g. each fold's held-out images scored with that fold's
    model) as one table over all of them: per-image values concatenated in the given order, summaries recomputed."""
    first = tables[0]
    merged = {**first, "images": sum(table["images"] for table in tables), "methods": {}}
    for name in first["methods"]:
        per_image = {key: [value for table in tables for value in table["methods"][name]["per_image"][key]]
                     for key in ("deletion_auc", "insertion_auc", "map_seconds")}
        merged["methods"][name] = _summary(per_image["deletion_auc"], per_image["insertion_auc"],
                                           per_image["map_seconds"])
    return merged


def score_methods(class_probabilities: ClassProbabilities, images: torch.Tensor,
                  methods: dict[str, SaliencyMethod], *, target: str | torch.Tensor = "predicted",
                  steps: int = DEFAULT_STEPS, blur: Blur | None = None, batch_size: int | None = None,
                  baselines: bool = True, seed: int = 0, desc: str | None = None) -> dict:
    """Deletion and insertion AUC of every method (and the two baselines) over N images (N, 3, H, W).
    desc: show progress per method, labelled "<desc> <method>" (common.core.console.progress); None: silent.

    target: a rule of common.cams.methods.TARGET_RULES applied to `class_probabilities` of the unperturbed images, or a
    (N,) tensor of class indices. Each map is computed one image at a time, so that its time per image is honest.
    Returns a JSON-ready table: {"steps", "blur", "images", "target", "methods": {name: {"deletion_auc",
    "deletion_auc_std", "insertion_auc", "insertion_auc_std", "map_seconds_per_image", "per_image": {...}}}}.
    """
    blur = blur or blur_for(max(images.shape[-2:]))
    with torch.no_grad():
        classes = target if isinstance(target, torch.Tensor) else target_classes(class_probabilities(images), target)
    classes = classes.to(dtype=torch.long, device=images.device)
    if baselines:
        methods = {**methods, RANDOM_BASELINE: random_saliency(seed=seed),
                   GAUSSIAN_BASELINE: centred_gaussian_saliency()}
    blurred = blur(images)
    table = {"steps": steps, "blur": {"kernel_size": blur.kernel_size, "sigma": blur.sigma,
                                      "description": blur.describe()},
             "images": len(images), "target": target if isinstance(target, str) else "given classes", "methods": {}}
    for name, method in methods.items():
        deletion, insertion, map_seconds = [], [], []
        for row in progress(range(len(images)), total=len(images), desc=f"{desc} {name}", disable=desc is None):
            start = time.perf_counter()
            saliency = method(images[row:row + 1], classes[row:row + 1])[0]
            if saliency.is_cuda:
                torch.cuda.synchronize(saliency.device)  # kernels run asynchronously: time them to the end
            map_seconds.append(time.perf_counter() - start)
            scores = deletion_insertion(probability_of(class_probabilities, int(classes[row])), images[row],
                                        saliency, blurred=blurred[row], steps=steps, batch_size=batch_size)
            deletion.append(scores["deletion_auc"])
            insertion.append(scores["insertion_auc"])
        table["methods"][name] = _summary(deletion, insertion, map_seconds)
    return table


def faithfulness_markdown(table: dict) -> str:
    """The table of `score_methods` as Markdown, with the settings that make it reproducible."""
    lines = ["| method | deletion AUC (lower is better) | insertion AUC (higher is better) | map ms / image |",
             "| --- | ---: | ---: | ---: |"]
    for name, row in table["methods"].items():
        lines.append(f"| {name} | {row['deletion_auc']:.3f} ± {row['deletion_auc_std']:.3f} | "
                     f"{row['insertion_auc']:.3f} ± {row['insertion_auc_std']:.3f} | "
                     f"{1000 * row['map_seconds_per_image']:.1f} |")
    lines.append("")
    lines.append(f"Mean ± standard deviation over {table['images']} image(s); target class: {table['target']}; "
                 f"{table['steps']} equal steps ({table['steps'] + 1} points); pixels removed or added in the map's "
                 f"order (bilinear upsampling), the substrate a {table['blur']['description']}; random baseline on a "
                 f"{BASELINE_GRID}x{BASELINE_GRID} grid, Gaussian baseline sigma {GAUSSIAN_SIGMA_FRACTION} x side.")
    return "\n".join(lines)


def score_combined(models: Sequence[tuple[str, nn.Module]], images: torch.Tensor, *, methods=("gradcam",),
                   **options) -> dict:
    """Faithfulness of the combined map (mean of the models' display-scaled maps) against the soft vote's
    probability, every model's map explaining the soft vote's class; `options` go to `score_methods`."""
    return score_methods(soft_vote_probabilities([model for _, model in models]), images,
                         {f"combined {method}": combined_cam_saliency(models, method=method) for method in methods},
                         **options)

