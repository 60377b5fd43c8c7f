"""The report's Grad-CAM gallery, for both kinds of run: held-out images (a single split's test images, a K-fold
run's out-of-fold images) misclassified by the final classifier first, each with its original, each CNN's
Grad-CAM overlay from the model that never saw its patient, the combined map, and every table row's P(malignant)."""

import html
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import numpy as np
from PIL import Image

from common.cams.display import (
    aspect_kept,
    colour_scale_html,
    combined_map,
    map_grid_note,
    map_overlay,
    unit_map_overlay,
)
from common.core.console import progress
from common.core.fileio import atomic_path
from common.core.runfiles import probability_key
from common.data.images import load_rgb
from common.data.records import CLASS_NAMES
from common.evaluation.metrics import DECISION_THRESHOLD, format_probability
from common.models.registry import ARCHS, MODEL_ORDER
from common.run import HeldOut

ARCH_NAMES = {arch: spec.display_name for arch, spec in ARCHS.items()}
THUMBNAIL = 128  # gallery image's longer side, pixels (aspect ratio kept)


@dataclass(frozen=True)
class GallerySource:
    """What a gallery reads: the held-out images with their maps, their stored predictions (same order), the
    table's rows."""

    held: HeldOut
    predictions: dict[str, np.ndarray]  # prob_<row key> per held-out image
    names: dict[str, str]  # row key -> display name, in table order
    final_key: str
    data_root: Path
    kfold: bool

    def probabilities(self, key: str) -> np.ndarray:
        return self.predictions[probability_key(key)]


def wrong_predictions(source: GallerySource) -> dict[str, np.ndarray]:
    """Per row key, (N,) bool: the held-out images that row misclassifies (binary_metrics' threshold)."""
    return {key: (source.probabilities(key) >= DECISION_THRESHOLD).astype(int) != source.held.labels
            for key in source.names}


def gallery_order(source: GallerySource) -> list[int]:
    """Held-out rows, misclassified by the final classifier first, then by how many rows of the table got them
    wrong."""
    wrong = wrong_predictions(source)
    wrong_count = np.sum(list(wrong.values()), axis=0)
    final_wrong = wrong.get(source.final_key, np.zeros(len(wrong_count), bool))
    return sorted(range(len(wrong_count)), key=lambda row: (not final_wrong[row], -wrong_count[row], row))


def thumbnail(image: Image.Image) -> Image.Image:
    return aspect_kept(image, THUMBNAIL)


def gallery_panels(source: GallerySource, row: int, folder: Path, rank: int) -> dict:
    """Write one image's PNGs (original, one overlay per CNN, combined); return what its card shows."""
    relative_path = str(source.held.paths[row])
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", Path(relative_path).stem)  # safe in a file name and a URL
    path = source.data_root / relative_path
    found = path.is_file()
    image = thumbnail(load_rgb(path)) if found else Image.new("RGB", (THUMBNAIL, THUMBNAIL), (200, 200, 200))
    maps = {arch: source.held.maps["gradcam"][arch][row] for arch in MODEL_ORDER}  # (h, w) raw Grad-CAM
    panels = {"original": image}
    panels.update({arch: map_overlay(image, cam) for arch, cam in maps.items()})
    panels["combined"] = unit_map_overlay(image, combined_map(list(maps.values()), image.size))
    files = {}
    for name, panel in panels.items():
        target = folder / f"{rank:03d}_{stem}_{name}.png"
        with atomic_path(target, suffix=".png") as temp_path:
            panel.save(temp_path, format="PNG")
        files[name] = f"{folder.name}/{target.name}"
    return {"path": relative_path, "found": found, "files": files, "row": row, "size": image.size}


def build_gallery(source: GallerySource, report_dir: Path, gallery_size: int) -> list[dict]:
    folder = report_dir / "gallery"
    folder.mkdir(parents=True)  # in a fresh staging folder: no earlier build's images
    chosen = gallery_order(source)[:gallery_size]
    return [gallery_panels(source, row, folder, rank)
            for rank, row in progress(enumerate(chosen, start=1), total=len(chosen), desc="report gallery")]


def _prediction_rows(source: GallerySource, row: int) -> str:
    label = int(source.held.labels[row])
    lines = []
    for key, name in source.names.items():
        probability = float(source.probabilities(key)[row])
        predicted = int(probability >= DECISION_THRESHOLD)
        verdict = "right" if predicted == label else "wrong"
        final = " final" if key == source.final_key else ""
        # format_probability: the digits shown never contradict the decision (0.4996, not 0.500, beside benign)
        lines.append(f'<tr class="{verdict}{final}"><td>{html.escape(name)}</td>'
                     f"<td>{format_probability(probability)}</td><td>{CLASS_NAMES[predicted]}</td>"
                     f"<td>{'&#10003;' if verdict == 'right' else '&#10007;'}</td></tr>")
    return ("<table class=\"predictions\"><thead><tr><th>Model</th><th>P(malignant)</th><th>Predicted</th><th></th>"
            f"</tr></thead><tbody>{''.join(lines)}</tbody></table>")


def gallery_card(source: GallerySource, item: dict) -> str:
    row, held = item["row"], source.held
    label = CLASS_NAMES[int(held.labels[row])]
    captions = {"original": "original", "combined": "combined (mean)"}
    width, height = item["size"]
    figures = "".join(
        f'<figure><img src="{quote(path)}" width="{width}" height="{height}" alt="{html.escape(name)}">'
        f"<figcaption>{html.escape(captions.get(name) or source.names.get(name, name))}"
        "</figcaption></figure>" for name, path in item["files"].items())
    missing = "" if item["found"] else " <em>(image no longer under the run's data root: grey placeholder)</em>"
    magnification = str(held.magnifications[row])
    fold = f" &middot; fold {int(held.folds[row])}" if source.kfold else ""
    title = (f"<h3>True: <span class=\"{label}\">{label}</span> &middot; patient "
             f"{html.escape(str(held.patients[row]))}"
             f"{f' &middot; {html.escape(magnification)}X' if magnification else ''}{fold}</h3>"
             f"<p class=\"path\">{html.escape(item['path'])}{missing}</p>")
    return (f'<div class="card" data-path="{html.escape(item["path"])}">{title}<div class="card-body">'
            f'<div class="strip">{figures}</div>{_prediction_rows(source, row)}</div></div>')


def gallery_html(source: GallerySource, items: list[dict]) -> str:
    final_wrong = wrong_predictions(source).get(source.final_key)
    final_wrong = 0 if final_wrong is None else int(sum(final_wrong[item["row"]] for item in items))
    images = "out-of-fold images" if source.kfold else "test images"
    grids = {arch: source.held.maps["gradcam"][arch].shape[1:] for arch in MODEL_ORDER}
    maps = ("each map made by the fold model that never saw the image's patient; " if source.kfold else "")
    note = (f"<p>{len(items)} of {len(source.held.labels)} {images}; those the final classifier misclassified "
            f"first ({final_wrong} shown), then by the number of models that got them wrong. Overlays: {maps}each "
            "CNN's raw Grad-CAM min-max scaled for display (jet, red = high); combined: the mean of the three scaled "
            f"maps. {html.escape(map_grid_note(grids, source.held.image_sizes, ARCH_NAMES))}</p>")
    return note + colour_scale_html() + "".join(gallery_card(source, item) for item in items)
