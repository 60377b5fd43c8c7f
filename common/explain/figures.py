"""Every explanation method of one image side by side: the CAMs of the one-pass export (common.cams.methods) and the
perturbation methods of captum (common.explain.attribution: LIME, Kernel SHAP, occlusion), for the faithfulness command
and predict.py --explain.

The perturbation methods switch a grid patch "off" by putting in the same blurred copy of the image that the
deletion/insertion metric uses as its substrate (common.explain.faithfulness.blur_for), so a map is scored against the
perturbation it was made with. They cost `samples` forward passes (occlusion: one per window position) per image,
so they run on request, for chosen images only.
"""

from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image
from torch import nn

from common.cams.display import aspect_kept, combined_map, evidence_colour_bar, map_overlay, unit_map_overlay
from common.cams.ensemble import CnnEnsemble
from common.cams.methods import CAM_DISPLAY_NAMES, CAM_METHODS, target_classes
from common.core.fileio import atomic_path
from common.data.images import load_rgb
from common.data.records import CLASS_NAMES
from common.data.transforms import build_transforms
from common.explain.attribution import DEFAULT_SAMPLES, kernel_shap_map, lime_map, occlusion_map
from common.explain.faithfulness import SaliencyMethod, blur_for
from common.models.registry import ARCHS

PERTURBATION_METHODS = ("lime", "kernel_shap", "occlusion")
METHOD_DISPLAY_NAMES = {**CAM_DISPLAY_NAMES, "lime": "LIME", "kernel_shap": "Kernel SHAP", "occlusion": "Occlusion"}
EXPLANATION_METHODS = CAM_METHODS + PERTURBATION_METHODS
COMBINED_ROW_LABEL = "Combined\n(mean of the\nCNNs' maps)"


def perturbation_map(model: nn.Module, method: str, image: torch.Tensor, target: int, *,
                     samples: int = DEFAULT_SAMPLES, seed: int = 0) -> torch.Tensor:
    """(H, W) signed map of one normalised image (3, H, W) for class `target`, by captum through
    common.explain.attribution; the "off" value of a patch is the image's blurred copy."""
    baseline = blur_for(max(image.shape[-2:]))(image)
    if method == "lime":
        return lime_map(model, image, target, samples=samples, baseline=baseline, seed=seed)
    if method == "kernel_shap":
        return kernel_shap_map(model, image, target, samples=samples, baseline=baseline, seed=seed)
    if method == "occlusion":
        return occlusion_map(model, image, target, baseline=baseline)
    raise ValueError(f"unknown perturbation method {method!r}; choose from {PERTURBATION_METHODS}")


def perturbation_saliency(model: nn.Module, method: str, *, samples: int = DEFAULT_SAMPLES,
                          seed: int = 0) -> SaliencyMethod:
    """perturbation_map as a common.explain.faithfulness saliency method (one image at a time)."""
    def saliency(images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        return torch.stack([perturbation_map(model, method, image, int(target), samples=samples, seed=seed)
                            for image, target in zip(images, classes)])
    return saliency


def explanation_maps(ensemble: CnnEnsemble, image: torch.Tensor, target: int, *, methods=EXPLANATION_METHODS,
                     samples: int = DEFAULT_SAMPLES, seed: int = 0, say=None) -> dict[str, np.ndarray]:
    """{method: map (h, w)} of one normalised image (3, H, W) for class `target`, in `methods`' order: the CAMs
    raw from one pass per member (their own grid; a bagged CNN's: the members' mean), the perturbation methods at
    the input size (of the ensemble's mean probability). say: called with a line before each perturbation method
    (hundreds of forward passes each), e.g. print to stderr."""
    cam_methods = tuple(method for method in methods if method in CAM_METHODS)
    maps = {}
    if cam_methods:
        cams, _, _ = ensemble.maps_and_probabilities(image[None], target=torch.tensor([target]), methods=cam_methods)
        maps.update({method: cams[method][0] for method in cam_methods})
    for method in methods:
        if method not in CAM_METHODS:
            if say:
                say(f"{METHOD_DISPLAY_NAMES.get(method, method)} of {ARCHS[ensemble.arch].display_name}")
            maps[method] = perturbation_map(ensemble.as_module(), method, image, target, samples=samples,
                                            seed=seed).numpy()
    return {method: maps[method] for method in methods}


def explanation_figure(picture: Image.Image, maps: dict[str, dict[str, np.ndarray]], target: Path, *,
                       title: str, unit_maps: dict[str, dict[str, np.ndarray]] | None = None) -> Path:
    """A PNG grid: one row per model (`maps`: row label -> {method: raw map}), the picture then each method's map
    blended over it (min-max scaled for display, jet: red = high); then the rows of `unit_maps` (row label ->
    {method: map already in [0, 1] at the picture's size}, e.g. the combined map), drawn without rescaling.
    Written atomically."""
    unit_maps = unit_maps or {}
    rows = {**{label: (row_maps, False) for label, row_maps in maps.items()},
            **{label: (row_maps, True) for label, row_maps in unit_maps.items()}}
    methods = list(dict.fromkeys(method for row_maps, _ in rows.values() for method in row_maps))
    aspect = picture.height / picture.width
    figure = Figure(figsize=(1.9 * (len(methods) + 1) + 0.9, 1.9 * aspect * len(rows) + 0.6), layout="constrained")
    grid = figure.subplots(len(rows), len(methods) + 1, squeeze=False)
    for row, (label, (row_maps, in_unit_range)) in enumerate(rows.items()):
        grid[row, 0].imshow(picture)
        grid[row, 0].set_ylabel(label, fontsize=9)
        for column, method in enumerate(methods, start=1):
            if method in row_maps:
                overlay = unit_map_overlay if in_unit_range else map_overlay
                grid[row, column].imshow(overlay(picture, row_maps[method]))
            else:  # a method run for another model only (e.g. LIME of one chosen CNN), or a CAM-only row
                grid[row, column].axis("off")
            if row == 0:
                grid[row, column].set_title(METHOD_DISPLAY_NAMES.get(method, method), fontsize=9)
        for axes in grid[row]:
            axes.set_xticks([])
            axes.set_yticks([])
    grid[0, 0].set_title("image", fontsize=9)
    evidence_colour_bar(figure, grid)
    figure.suptitle(title, fontsize=9)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target, suffix=".png") as temp_path:
        figure.savefig(temp_path, format="png", dpi=80)
    return target


def explain_image(path: Path, models: dict[str, CnnEnsemble], target: Path, *, target_rule: str,
                  perturbation_archs=tuple(ARCHS), samples: int = DEFAULT_SAMPLES, seed: int = 0,
                  title: str | None = None, say=None) -> Path:
    """One image file explained by every CAM of every CNN (`models`: arch -> its ensemble: one model, or a K-fold
    run's fold models, bagged) and by the perturbation methods of the CNNs in `perturbation_archs`; each CNN
    explains the class its probability gives by `target_rule` (common.cams.methods.TARGET_RULES). With more than
    one CNN, a last row shows each CAM method's combined map (the mean of the CNNs' display-scaled maps, as the
    report shows it). Writes the figure to `target` (PNG, atomically). say: as explanation_maps'."""
    image = load_rgb(path)
    maps = {}
    for arch, ensemble in models.items():
        tensor = build_transforms(train=False, image_size=ensemble.image_size)(image).to(ensemble.device)
        target_class = int(target_classes(ensemble.probabilities(tensor[None]), target_rule)[0])
        methods = EXPLANATION_METHODS if arch in perturbation_archs else CAM_METHODS
        members = f", {len(ensemble.members)} folds" if len(ensemble.members) > 1 else ""
        label = f"{ARCHS[arch].display_name}\n({CLASS_NAMES[target_class]}{members})"
        maps[label] = explanation_maps(ensemble, tensor, target_class, methods=methods, samples=samples, seed=seed,
                                       say=say)
    picture = aspect_kept(image, max(ensemble.image_size for ensemble in models.values()))
    # The combined map as the report's gallery draws it (common.cams.heatmap_file.combined_map), one per CAM method.
    unit_maps = {COMBINED_ROW_LABEL: {method: combined_map([row[method] for row in maps.values()], picture.size)
                                      for method in CAM_METHODS}} if len(models) > 1 else None
    return explanation_figure(picture, maps, target, title=title or Path(path).name, unit_maps=unit_maps)
