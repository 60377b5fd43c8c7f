"""Maps as pictures: min-max scaling for display, the jet colour map, overlays and the combined map."""

import numpy as np
from matplotlib import colormaps
from PIL import Image


def scale_for_display(cams: np.ndarray) -> np.ndarray:
    """Min-max scale each map to [0, 1] for display only; a constant map becomes all zeros."""
    cams = np.asarray(cams, dtype=np.float32)
    low = cams.min(axis=(-2, -1), keepdims=True)
    span = cams.max(axis=(-2, -1), keepdims=True) - low
    return np.where(span > 0, (cams - low) / np.where(span > 0, span, 1), 0.0).astype(np.float32)


OVERLAY_ALPHA = 0.45  # weight of the colour map in an overlay


def display_map(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) in [0, 1]: the map min-max scaled (display only) and upsampled bilinearly to size (width, height)."""
    scaled = Image.fromarray(scale_for_display(cam)).resize(size, Image.Resampling.BILINEAR)
    return np.asarray(scaled).clip(0, 1)


def combined_map(cams: list[np.ndarray], size: tuple[int, int]) -> np.ndarray:
    """(H, W) in [0, 1]: the mean of the models' display maps, each scaled on its own (raw magnitudes differ)."""
    return np.mean([display_map(cam, size) for cam in cams], axis=0)


def jet(unit_map: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) uint8 in the jet colour map (red = high)."""
    return (colormaps["jet"](unit_map)[..., :3] * 255).astype(np.uint8)


def colorize(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """One raw map as a (H, W, 3) uint8 jet image of `size` (width, height)."""
    return jet(display_map(cam, size))


def blend(image: Image.Image, heat: np.ndarray, alpha: float = OVERLAY_ALPHA) -> Image.Image:
    """The coloured map laid over the image with weight `alpha`."""
    pixels = np.asarray(image, dtype=np.float32)
    return Image.fromarray(((1 - alpha) * pixels + alpha * heat).astype(np.uint8))


def overlay_panel(image: Image.Image, cam: np.ndarray) -> Image.Image:
    """Image | heatmap | blend, side by side."""
    heat = colorize(cam, image.size)
    panels = [np.asarray(image), heat, np.asarray(blend(image, heat))]
    return Image.fromarray(np.concatenate(panels, axis=1))
