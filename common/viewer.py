"""What the interactive viewer (app.py) shows, without any web framework: a finished run loaded once, new images
through the three CNNs and the final MLP, stored test images from the run's files, overlays, filters.

    load_viewer_run   the run's checkpoints (once), results, test predictions, heatmap files, split rows
    predict_views     new images -> ImageView (each CNN's P(malignant), soft vote, final MLP, raw maps)
    stored_view       a stored image -> ImageView from test_predictions.npz and the heatmap files (nothing recomputed)
    render_panels     ImageView -> image | each CNN's map over it | the combined map, for a method and an opacity
    browse_rows, filter_rows   the Browse tab's table

Everything is read from the run's files; nothing is written anywhere.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from common.cams.display import OVERLAY_ALPHA, blend, colorize, combined_map, jet
from common.cams.heatmap_file import CAM_ARRAY_KEYS
from common.cams.methods import CAM_DISPLAY_NAMES
from common.core.errors import PipelineError
from common.core.runfiles import probability_key
from common.data.images import load_rgb
from common.data.partition import SPLIT_FILE_NAME, Split, load_split
from common.data.records import CLASS_NAMES
from common.evaluation.metrics import DECISION_THRESHOLD
from common.inference import BATCH_SIZE, classify_images, load_classifier, load_cnns
from common.models.registry import MODEL_ORDER
from common.report.single import Run, load_run

# Longer side of the pictures the viewer shows, pixels (aspect ratio kept): about their width in the page (five
# in a row). Each is sent as a PNG (lossless: no compression artefacts on tissue), whose encoding takes most of a
# stored image's answer time: ~20 ms per 384x252 BreaKHis overlay, ~35 ms at 448 px.
DISPLAY_SIZE = 384
DEFAULT_OPACITY = OVERLAY_ALPHA
# Map methods are named by their key in the heatmap files: `cams` is Grad-CAM; a later method stored as
# `cams_<name>` (e.g. `cams_gradcam++`) appears under <name> with no change here.
# New images get every CAM method's map from the same pass as their logits: heatmap-file key -> method.
LIVE_METHODS = {key: method for method, key in CAM_ARRAY_KEYS.items()}
METHOD_NAMES = {key: CAM_DISPLAY_NAMES[method] for key, method in LIVE_METHODS.items()}


@dataclass(frozen=True)
class ImageView:
    """One image as the viewer shows it, whether predicted now or read from the run's files."""

    title: str
    image: Image.Image  # the picture, DISPLAY_SIZE on its longer side
    probabilities: dict[str, float]  # P(malignant) per results.json row key: each arch, soft_vote, the final MLP
    maps: dict[str, dict[str, np.ndarray]]  # method key -> arch -> (h, w) raw map
    truth: int | None = None  # the label of a stored image
    details: str = ""  # patient, magnification, subtype of a stored image


@dataclass(frozen=True)
class BrowseRow:
    """One stored image in the Browse tab's table."""

    index: int  # row in its predictions file
    path: str  # relative to the split's data root
    patient: str
    magnification: str
    subtype: str
    truth: int
    p_malignant: float  # the final MLP's

    @property
    def predicted(self) -> int:
        return int(self.p_malignant >= DECISION_THRESHOLD)

    @property
    def confidence(self) -> float:
        """The final MLP's probability of the class it predicts."""
        return max(self.p_malignant, 1.0 - self.p_malignant)


@dataclass(frozen=True, repr=False)
class ViewerRun:
    """A finished run, loaded once: the models for new images and the stored files for browsing."""

    output_dir: Path
    device: torch.device
    report: Run  # results.json, test_predictions.npz, heatmap files, data root (checked by common.report.single)
    split: Split
    mlp: nn.Module
    classifier: dict
    cnns: dict[str, tuple[nn.Module, int]]  # arch -> (model, input size)
    warnings: tuple[str, ...]
    heatmap_row: dict[str, dict[str, int]]  # arch -> image path -> row of its heatmap file

    def __repr__(self) -> str:  # the models and arrays would fill a screen (Gradio prints its handlers' arguments)
        return f"ViewerRun({str(self.output_dir)!r})"

    @property
    def final_key(self) -> str:
        return self.report.final_key

    def name(self, key: str) -> str:
        return self.report.name(key)

    @property
    def probability_keys(self) -> list[str]:
        return list(MODEL_ORDER) + ["soft_vote", self.final_key]


# ------------------------------------------------------------------------------------------------ loading


def load_viewer_run(output_dir: Path, *, device: torch.device) -> ViewerRun:
    """Every file the viewer reads, checked as predict.py and make_report.py check them (one-line errors)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise PipelineError(f"--output-dir {output_dir} does not exist; run run_pipeline.py (or make demo) first")
    report = load_run(output_dir)
    mlp, classifier = load_classifier(output_dir)
    if classifier["features"] != report.results.get("final_features", "heatmaps"):
        raise PipelineError(f"final_classifier.pth and results.json in {output_dir} come from different runs of "
                            f"cancer_class_further.py; rerun cancer_class_further.py --output-dir {output_dir}")
    cnns = load_cnns(output_dir, classifier, device)
    split = load_split(output_dir / SPLIT_FILE_NAME)
    heatmap_row = {arch: {path: row for row, path in enumerate(report.heatmaps[arch]["paths"])}
                   for arch in MODEL_ORDER}
    return ViewerRun(output_dir, device, report, split, mlp.to(device), classifier, cnns,
                     tuple(report.caveats), heatmap_row)  # the report's caveats: random init, demo data


# ------------------------------------------------------------------------------------------------ images


def display_copy(image: Image.Image) -> Image.Image:
    """The image with DISPLAY_SIZE pixels on its longer side, aspect ratio kept (maps stretch to it as they
    stretched to the square the model saw)."""
    scale = DISPLAY_SIZE / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR)


def predict_views(run: ViewerRun, named_images: list[tuple[str, Image.Image]]) -> list[ImageView]:
    """New RGB images through each CNN (logits and Grad-CAM in one pass) and the final MLP, by predict.py's own
    function, with the models already loaded; a batch of BATCH_SIZE at a time."""
    views = []
    for start in range(0, len(named_images), BATCH_SIZE):
        chunk = named_images[start:start + BATCH_SIZE]
        result = classify_images([image for _, image in chunk], mlp=run.mlp, classifier=run.classifier,
                                         models=run.cnns, device=run.device, methods=tuple(LIVE_METHODS.values()))
        maps = {key: result["maps"][method] for key, method in LIVE_METHODS.items()}
        probabilities = dict(result["probabilities"])
        probabilities[run.final_key] = probabilities.pop("final_mlp")
        for offset, (name, image) in enumerate(chunk):
            views.append(ImageView(
                title=name, image=display_copy(image),
                probabilities={key: float(probabilities[key][offset]) for key in run.probability_keys},
                maps={key: {arch: by_arch[arch][offset] for arch in MODEL_ORDER} for key, by_arch in maps.items()}))
    return views


def open_uploads(paths: list[str]) -> list[tuple[str, Image.Image]]:
    """(file name, RGB image) per uploaded file; a file that is not an image stops with an error naming it."""
    if not paths:
        raise PipelineError("no image given: drop one or more PNG, JPEG or TIFF files")
    return [(Path(path).name, load_rgb(Path(path))) for path in paths]


# ------------------------------------------------------------------------------------------------ stored


def map_methods(run: ViewerRun) -> list[str]:
    """Map keys every heatmap file of the run holds: `cams` (Grad-CAM), and any later `cams_<method>`."""
    keys = [set(key for key, value in run.report.heatmaps[arch].items()
                if (key == "cams" or key.startswith("cams_")) and np.ndim(value) == 3) for arch in MODEL_ORDER]
    return sorted(set.intersection(*keys), key=lambda key: (key != "cams", key))


def method_name(key: str) -> str:
    return METHOD_NAMES.get(key, key.removeprefix("cams_"))


def browse_sets(run: ViewerRun) -> dict[str, dict[str, np.ndarray]]:
    """The stored predictions the Browse tab lists, by name. Today: the test split (test_predictions.npz).
    Hook for the K-fold mode (not built yet): its out-of-fold predictions, a file with the same columns (paths,
    labels, patients, magnifications, prob_<row key>), become a second entry, "out-of-fold"; their maps then
    come from each fold's heatmap files instead of run.report.heatmaps."""
    return {"test": run.report.predictions}


def browse_rows(run: ViewerRun, set_name: str = "test") -> list[BrowseRow]:
    predictions = browse_sets(run)[set_name]
    subtype_of = {record.path: record.subtype for record in run.split.records}
    final = predictions[probability_key(run.final_key)]
    return [BrowseRow(index, str(path), str(predictions["patients"][index]),
                      str(predictions["magnifications"][index]), subtype_of.get(str(path), ""),
                      int(predictions["labels"][index]), float(final[index]))
            for index, path in enumerate(predictions["paths"])]


def stored_view(run: ViewerRun, row: BrowseRow, set_name: str = "test") -> ImageView:
    """A stored image: its probabilities from the predictions file, its maps from the heatmap files."""
    predictions = browse_sets(run)[set_name]
    path = run.report.data_root / row.path
    if path.is_file():
        image = display_copy(load_rgb(path))
    else:  # the dataset moved since the run: the maps are still worth seeing
        image = Image.new("RGB", (DISPLAY_SIZE, DISPLAY_SIZE), (200, 200, 200))
    maps = {key: {arch: run.report.heatmaps[arch][key][run.heatmap_row[arch][row.path]] for arch in MODEL_ORDER}
            for key in map_methods(run)}
    probabilities = {key: float(predictions[probability_key(key)][row.index])
                     for key in run.probability_keys}
    details = f"patient {row.patient}, {row.magnification}X, {row.subtype or 'subtype unknown'}"
    if not path.is_file():
        details += f" (image not found at {path}: grey background)"
    return ImageView(Path(row.path).name, image, probabilities, maps, truth=row.truth, details=details)


# ------------------------------------------------------------------------------------------------ display


def render_panels(run: ViewerRun, view: ImageView, *, method: str = "cams",
                  opacity: float = DEFAULT_OPACITY) -> list[tuple[Image.Image, str]]:
    """(picture, caption) pairs: the image, each CNN's map over it (captioned with its P(malignant)), the combined
    map (mean of the display-scaled maps) over it; `opacity` is the colour map's weight."""
    maps = view.maps[method]
    size = view.image.size
    panels = [(view.image, view.title)]
    panels += [(blend(view.image, colorize(maps[arch], size), opacity),
                f"{run.name(arch)}: P {view.probabilities[arch]:.3f}") for arch in MODEL_ORDER]
    panels.append((blend(view.image, jet(combined_map([maps[arch] for arch in MODEL_ORDER], size)), opacity),
                   f"combined {method_name(method)}"))
    return panels


def verdict(p_malignant: float) -> str:
    return CLASS_NAMES[int(p_malignant >= DECISION_THRESHOLD)]


def probability_markdown(run: ViewerRun, view: ImageView) -> str:
    """The decision and every model's P(malignant), as a Markdown table."""
    final = view.probabilities[run.final_key]
    lines = [f"### {view.title}: **{verdict(final)}** (final MLP, P(malignant) {final:.3f})"]
    if view.truth is not None:
        outcome = "correct" if verdict(final) == CLASS_NAMES[view.truth] else "wrong"
        lines.append(f"True class: **{CLASS_NAMES[view.truth]}** ({outcome}); {view.details}")
    lines += ["", "| model | P(malignant) | call |", "|---|---:|---|"]
    lines += [f"| {run.name(key)} | {view.probabilities[key]:.3f} | {verdict(view.probabilities[key])} |"
              for key in run.probability_keys]
    lines += ["", f"Maps: red = strongest evidence for the class each model's maps explain (rule: "
                  f"{run.classifier['target_class_rule']}); each map min-max scaled for display."]
    return "\n".join(lines)


def filter_rows(rows: list[BrowseRow], *, truth: str = "all", predicted: str = "all", outcome: str = "all",
                patient: str = "all", magnification: str = "all", subtype: str = "all",
                order: str = "most confident first") -> list[BrowseRow]:
    """The rows that pass every filter ("all" passes everything), sorted by the final MLP's confidence."""
    kept = [row for row in rows
            if truth in ("all", CLASS_NAMES[row.truth]) and predicted in ("all", CLASS_NAMES[row.predicted])
            and outcome in ("all", "correct" if row.truth == row.predicted else "wrong")
            and patient in ("all", row.patient) and magnification in ("all", row.magnification)
            and subtype in ("all", row.subtype)]
    return sorted(kept, key=lambda row: (row.confidence, row.path), reverse=order == "most confident first")


def results_markdown(run: ViewerRun) -> str:
    """results.md as cancer_class_further.py wrote it (the comparison table)."""
    results_file = run.output_dir / "results.md"
    if not results_file.is_file():
        return f"{results_file} is missing: run cancer_class_further.py --output-dir {run.output_dir}"
    return results_file.read_text(encoding="utf-8")


def report_plots(run: ViewerRun) -> list[Path]:
    """The report's plots (report/*.png), when make_report.py has built it."""
    return sorted((run.output_dir / "report").glob("*.png"))
