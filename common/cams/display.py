"""Maps as pictures: min-max scaling for display, the jet colour map, overlays and the combined map."""

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from PIL import Image, ImageDraw, ImageFont


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


# Written on every overlay of a map without contrast, so that an empty panel is never read as a finding.
FLAT_MAP_NOTE = "flat map: no evidence at this resolution"


def is_flat(cam: np.ndarray) -> bool:
    """True for a map with nothing to show: constant (all zero where the ReLU cut everything, or a 1x1 grid at a
    small input size), up to float rounding."""
    cam = np.asarray(cam, dtype=np.float64)
    high, low = float(cam.max()), float(cam.min())
    return cam.size <= 1 or high - low <= 1e-6 * max(abs(high), abs(low))


def label_flat(panel: Image.Image) -> Image.Image:
    """The panel with FLAT_MAP_NOTE written across its middle, black on a white box, sized to the panel."""
    panel = panel.copy()
    draw = ImageDraw.Draw(panel)
    font = ImageFont.load_default(size=max(8, panel.width // 16))
    text = FLAT_MAP_NOTE.replace(": ", ":\n", 1).replace(" at ", "\nat ", 1)
    box = draw.multiline_textbbox((0, 0), text, font=font, align="center")
    left = (panel.width - (box[2] - box[0])) / 2
    top = (panel.height - (box[3] - box[1])) / 2
    pad = max(2, panel.width // 60)
    draw.rectangle((left - pad, top - pad, left + box[2] - box[0] + pad, top + box[3] - box[1] + pad),
                   fill=(255, 255, 255))
    draw.multiline_text((left - box[0], top - box[1]), text, fill=(0, 0, 0), font=font, align="center")
    return panel


def map_overlay(image: Image.Image, cam: np.ndarray, alpha: float = OVERLAY_ALPHA) -> Image.Image:
    """One raw map over the image (min-max scaled, jet), labelled when it is flat (and shown: alpha > 0)."""
    panel = blend(image, colorize(cam, image.size), alpha)
    return label_flat(panel) if alpha > 0 and is_flat(cam) else panel


def unit_map_overlay(image: Image.Image, unit_map: np.ndarray, alpha: float = OVERLAY_ALPHA) -> Image.Image:
    """A map already in [0, 1] at the image's size (the combined map) over the image, labelled as map_overlay."""
    panel = blend(image, jet(unit_map), alpha)
    return label_flat(panel) if alpha > 0 and is_flat(unit_map) else panel


def map_grid_note(grids: dict[str, tuple[int, int]], image_sizes: dict[str, int], names: dict[str, str]) -> str:
    """One sentence: each model's map grid at its input size, and from which input size its maps have at least
    2x2 cells (a 1x1 map has no contrast to show)."""
    parts = []
    for arch, (height, width) in grids.items():
        size, cells = image_sizes[arch], max(1, min(height, width))
        # The networks downsample by a power of two (DenseNet-121, ResNet-50: 32; VGG-16's target layer: 16).
        stride = next((2 ** k for k in range(12) if size // 2 ** k == cells), size // cells)
        parts.append(f"{names[arch]} {height}x{width} at {size} px (2x2 from {2 * stride} px)")
    return "Map grid per model: " + "; ".join(parts) + ". A flat map is labelled as such, not drawn as evidence."


def overlay_panel(image: Image.Image, cam: np.ndarray) -> Image.Image:
    """Image | heatmap | blend, side by side."""
    heat = colorize(cam, image.size)
    panels = [np.asarray(image), heat, np.asarray(blend(image, heat))]
    return Image.fromarray(np.concatenate(panels, axis=1))


# What the colours of every overlay mean, said once: under the colour bar of each figure, and on the report page.
COLOUR_SCALE_MEANING = "evidence for the explained class (each map scaled to its own range)"


def evidence_colour_bar(figure, axes) -> None:
    """The jet colour bar beside `axes` of a matplotlib figure, from 'least' to 'most' (COLOUR_SCALE_MEANING)."""
    bar = figure.colorbar(ScalarMappable(cmap="jet"), ax=list(np.ravel(axes)), shrink=0.85, pad=0.01)
    bar.set_ticks([0, 1], labels=["least", "most"])
    bar.set_label(COLOUR_SCALE_MEANING.replace(" (", "\n("), fontsize=7)


def aspect_kept(image: Image.Image, longer_side: int) -> Image.Image:
    """The image resized so that its longer side is `longer_side`, its aspect ratio kept (figures show the tissue
    as it is; the maps are stretched to it)."""
    scale = longer_side / max(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                        Image.Resampling.BILINEAR)


def colour_scale_html() -> str:
    """The colour bar of every overlay as an HTML strip (for the report and the viewer): jet from 'least' to
    'most', with COLOUR_SCALE_MEANING."""
    stops = ", ".join("#{:02x}{:02x}{:02x}".format(*jet(np.array([[value]]))[0, 0]) for value in np.linspace(0, 1, 9))
    return ('<div class="colour-scale" style="display:flex;align-items:center;gap:6px;font-size:0.85em">'
            '<span>least</span><span style="display:inline-block;width:160px;height:10px;'
            f'background:linear-gradient(to right, {stops})"></span><span>most</span>'
            f"<span>{COLOUR_SCALE_MEANING}; red = most</span></div>")
