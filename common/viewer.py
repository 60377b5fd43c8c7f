"""What the interactive viewer (app.py) shows, without any web framework, for both kinds of run: a finished run
loaded once, new images through the run's models, the run's held-out images from its files, overlays, filters.

    load_viewer_run   the run (common.run), its models, results, stored predictions and held-out maps
    predict_views     new images -> ImageView (each CNN's P(malignant), soft vote, final MLP, raw maps); on a K-fold
                      run through the bagged ensemble of the fold models
    stored_view       a held-out image -> ImageView from the stored predictions and maps (nothing recomputed): a
                      single split's test image, or any image of a K-fold run, each explained by the fold model that
                      never saw its patient
    render_panels     ImageView -> image | each CNN's map over it | the combined map, for a method and an opacity
    browse_rows, filter_rows   the Browse tab's table

Everything is read from the run's files; nothing is written anywhere.
"""

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common.cams.display import OVERLAY_ALPHA, combined_map, map_overlay, unit_map_overlay
from common.cams.methods import CAM_DISPLAY_NAMES
from common.core.errors import PipelineError
from common.core.runfiles import CV_RESULTS_MD, REPORT_DIR, RESULTS_MD, probability_key, scaled_probability_key
from common.data.images import load_rgb
from common.data.records import CLASS_NAMES
from common.evaluation.calibration import apply_temperature
from common.evaluation.conformal import prediction_sets, set_names, threshold_from_scores
from common.evaluation.metrics import DECISION_THRESHOLD
from common.inference import BATCH_SIZE, RunModels, classify_images, display_copy, load_run_models
from common.models.registry import MODEL_ORDER
from common.run import HeldOut, open_run

# Longer side of the pictures the viewer shows, pixels (aspect ratio kept): about their width in the page (five
# in a row). Each is sent as a PNG (lossless: no compression artefacts on tissue), whose encoding takes most of a
# stored image's answer time: ~20 ms per 384x252 BreaKHis overlay, ~35 ms at 448 px.
DISPLAY_SIZE = 384
DEFAULT_OPACITY = OVERLAY_ALPHA


@dataclass(frozen=True)
class ImageView:
    """One image as the viewer shows it, whether predicted now or read from the run's files."""

    title: str
    image: Image.Image  # the picture, DISPLAY_SIZE on its longer side
    probabilities: dict[str, float]  # P(malignant) per table row key: each arch, soft_vote, the final MLP
    maps: dict[str, dict[str, np.ndarray]]  # CAM method -> arch -> (h, w) raw map
    truth: int | None = None  # the label of a stored image
    details: str = ""  # patient, magnification, subtype (and fold) of a stored image
    calibrated: dict[str, float] = dataclasses.field(default_factory=dict)  # temperature-scaled P per row key
    conformal_set: str = ""  # a new image's image-level set ('' for a stored image)
    patient_line: str = ""  # with several uploads: their patient-level set, if they are one patient's images


@dataclass(frozen=True)
class BrowseRow:
    """One held-out image in the Browse tab's table."""

    index: int  # row in the run's predictions (and held-out maps)
    path: str  # relative to the run's data root
    patient: str
    magnification: str
    subtype: str
    fold: int  # the fold whose models scored it (a single split: 1)
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

    models: RunModels
    results: dict  # results.json or cv_results.json
    predictions: dict[str, np.ndarray]  # every held-out image's stored P(malignant) per row (run.predictions())
    held: HeldOut  # the same images' maps, each from the model that never saw its patient
    warnings: tuple[str, ...]  # the caveats: random init, demo data

    def __repr__(self) -> str:  # the models and arrays would fill a screen (Gradio prints its handlers' arguments)
        return f"ViewerRun({str(self.output_dir)!r})"

    @property
    def run(self):
        return self.models.run

    @property
    def output_dir(self) -> Path:
        return self.run.output_dir

    @property
    def final_key(self) -> str:
        return self.results["final_row"]

    def name(self, key: str) -> str:
        return self.results["display_names"][key]

    @property
    def probability_keys(self) -> list[str]:
        return list(MODEL_ORDER) + ["soft_vote", self.final_key]

    @property
    def held_out_name(self) -> str:
        """What the Browse tab lists, in words."""
        return ("every image, out of fold (each scored by the fold models that never saw its patient)"
                if self.run.kind == "kfold" else "the test split")

    def temperature(self, key: str) -> float:
        """The temperature the run fitted for a row (final_classifier.pth's; 'final_mlp' there is the final row)."""
        return self.models.classifier["temperatures"]["final_mlp" if key == self.final_key else key]

    def image_set(self, calibrated_final: float) -> str:
        """A new image's image-level conformal set at the run's alpha."""
        conformal = self.models.classifier["conformal"]
        threshold = threshold_from_scores(conformal["image_scores"].numpy(), conformal["alpha"])
        return set_names(prediction_sets(np.array([calibrated_final]), threshold))[0]

    def describe(self) -> str:
        """The page's first lines: the run's protocol and its final classifier."""
        if self.run.kind == "kfold":
            return (f"K-fold run, {len(self.run.folds)} folds: {self.results['protocol']} Final classifier: "
                    f"{self.name(self.final_key)}; new images go through the bagged ensemble of the fold models.")
        return (f"Single-split run. Split: {self.results['split_protocol']}. Final classifier: "
                f"{self.name(self.final_key)}, fit on the {self.results['fit_split']} split.")


# ------------------------------------------------------------------------------------------------ loading


def load_viewer_run(output_dir: Path, *, device: torch.device) -> ViewerRun:
    """Every file the viewer reads, checked as predict.py and make_report.py check them (one-line errors)."""
    run = open_run(output_dir)
    results = run.results()
    models = load_run_models(run, device)
    predictions, held = run.predictions(), run.held_out()
    if not np.array_equal(predictions["paths"], held.paths):
        raise PipelineError(f"{run.predictions_file} and the heatmap files of {output_dir} describe different "
                            f"held-out images; rerun {run.further_command()}")
    return ViewerRun(models, results, predictions, held, tuple(run.caveats()))


# ------------------------------------------------------------------------------------------------ images


def predict_views(run: ViewerRun, named_images: list[tuple[str, Image.Image]], *,
                  done=None) -> list[ImageView]:
    """New RGB images through each CNN (logits and every CAM in one pass per model) and the final MLP, by
    predict.py's own function, with the models already loaded; a batch of BATCH_SIZE at a time. done: called
    with (images scored, all images) after each batch (the page's progress bar)."""
    views = []
    methods = tuple(run.held.maps)
    for start in range(0, len(named_images), BATCH_SIZE):
        chunk = named_images[start:start + BATCH_SIZE]
        result = classify_images([image for _, image in chunk], run.models, methods=methods)
        probabilities = dict(result["probabilities"])
        probabilities[run.final_key] = probabilities.pop("final_mlp")
        for offset, (name, image) in enumerate(chunk):
            raw = {key: float(probabilities[key][offset]) for key in run.probability_keys}
            calibrated = {key: float(apply_temperature(value, run.temperature(key))) for key, value in raw.items()}
            views.append(ImageView(
                title=name, image=display_copy(image, DISPLAY_SIZE), probabilities=raw,
                maps={method: {arch: by_arch[arch][offset] for arch in MODEL_ORDER}
                      for method, by_arch in result["maps"].items()},
                calibrated=calibrated, conformal_set=run.image_set(calibrated[run.final_key])))
        if done:
            done(len(views), len(named_images))
    return views


def mark_own_images(run: ViewerRun, views: list[ImageView], paths: list[str]) -> list[ImageView]:
    """Each upload that is one of the run's own images (the same bytes as an indexed image) carries a note saying
    so (Run.own_image_note), so that nobody takes its probabilities for those of a new case."""
    marked = []
    for view, path in zip(views, paths):
        row = run.run.own_image_row(Path(path))
        if row is not None:
            where = " (Browse shows it scored out of fold)" if run.run.kind == "kfold" else ""
            view = dataclasses.replace(view, details=f"{run.run.own_image_note(row)}{where}")
        marked.append(view)
    return marked


def with_patient_set(run: ViewerRun, views: list[ImageView]) -> list[ImageView]:
    """Several uploads: each view also says what they are as ONE patient's images (the mean calibrated P of the
    final MLP and the patient-level set at the run's alpha), worded as a condition: only the user knows."""
    if len(views) < 2:
        return views
    conformal = run.models.classifier["conformal"]
    mean = float(np.mean([view.calibrated[run.final_key] for view in views]))
    threshold = threshold_from_scores(conformal["patient_scores"].numpy(), conformal["alpha"])
    name = set_names(prediction_sets(np.array([mean]), threshold))[0]
    line = (f"If these {len(views)} uploads are one patient's images: mean calibrated P(malignant) {mean:.3f}, "
            f"conformal set (alpha {conformal['alpha']:g}, patient level): **{name}**")
    return [dataclasses.replace(view, patient_line=line) for view in views]


def open_uploads(paths: list[str]) -> list[tuple[str, Image.Image]]:
    """(file name, RGB image) per uploaded file; a file that is not an image stops with an error naming it."""
    if not paths:
        raise PipelineError("no image given: drop one or more PNG, JPEG or TIFF files")
    return [(Path(path).name, load_rgb(Path(path))) for path in paths]


# ------------------------------------------------------------------------------------------------ stored


def method_name(method: str) -> str:
    return CAM_DISPLAY_NAMES.get(method, method)


def browse_rows(run: ViewerRun) -> list[BrowseRow]:
    final = run.predictions[probability_key(run.final_key)]
    held = run.held
    return [BrowseRow(index, str(path), str(held.patients[index]), str(held.magnifications[index]),
                      str(held.subtypes[index]), int(held.folds[index]), int(held.labels[index]), float(final[index]))
            for index, path in enumerate(held.paths)]


def stored_view(run: ViewerRun, row: BrowseRow) -> ImageView:
    """A held-out image: its probabilities from the stored predictions, its maps from its fold's heatmap files."""
    path = run.run.data_root / row.path
    if path.is_file():
        image = display_copy(load_rgb(path), DISPLAY_SIZE)
    else:  # the dataset moved since the run: the maps are still worth seeing
        image = Image.new("RGB", (DISPLAY_SIZE, DISPLAY_SIZE), (200, 200, 200))
    maps = {method: {arch: by_arch[arch][row.index] for arch in MODEL_ORDER}
            for method, by_arch in run.held.maps.items()}
    probabilities = {key: float(run.predictions[probability_key(key)][row.index]) for key in run.probability_keys}
    calibrated = {key: float(run.predictions[scaled_probability_key(key)][row.index]) for key in run.probability_keys
                  if scaled_probability_key(key) in run.predictions}  # held out: scaled by a held-out temperature
    details = f"patient {row.patient}, {row.magnification}X, {row.subtype or 'subtype unknown'}"
    if run.run.kind == "kfold":
        details += f"; fold {row.fold}: scored and explained by fold {row.fold}'s models, which never saw this patient"
    if not path.is_file():
        details += f" (image not found at {path}: grey background)"
    return ImageView(Path(row.path).name, image, probabilities, maps, truth=row.truth, details=details,
                     calibrated=calibrated)


# ------------------------------------------------------------------------------------------------ display


def render_panels(run: ViewerRun, view: ImageView, *, method: str = "gradcam",
                  opacity: float = DEFAULT_OPACITY) -> list[tuple[Image.Image, str]]:
    """(picture, caption) pairs: the image, each CNN's map over it (captioned with its P(malignant)), the combined
    map (mean of the display-scaled maps) over it; `opacity` is the colour map's weight."""
    maps = view.maps[method]
    size = view.image.size
    panels = [(view.image, view.title)]
    panels += [(map_overlay(view.image, maps[arch], opacity),
                f"{run.name(arch)}: P {view.probabilities[arch]:.3f}") for arch in MODEL_ORDER]
    panels.append((unit_map_overlay(view.image, combined_map([maps[arch] for arch in MODEL_ORDER], size), opacity),
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
    elif view.details:  # an upload that is one of the run's own images
        lines.append(f"**Note: {view.details}.**")
    if view.conformal_set:
        alpha = run.models.classifier["conformal"]["alpha"]
        lines.append(f"Conformal set (alpha {alpha:g}, image level: calibrated on held-out images, not patients): "
                     f"**{view.conformal_set}**")
    if view.patient_line:
        lines.append(view.patient_line)
    lines += ["", "| model | P(malignant) | calibrated P | call |", "|---|---:|---:|---|"]
    lines += [f"| {run.name(key)} | {view.probabilities[key]:.3f} | "
              f"{view.calibrated[key]:.3f} | {verdict(view.probabilities[key])} |" if key in view.calibrated else
              f"| {run.name(key)} | {view.probabilities[key]:.3f} | n/a | {verdict(view.probabilities[key])} |"
              for key in run.probability_keys]
    lines += ["", f"Maps: red = strongest evidence for the class each model's maps explain (rule: "
                  f"{run.models.classifier['target_class_rule']}); each map min-max scaled for display."]
    return "\n".join(lines)


def filter_rows(rows: list[BrowseRow], *, truth: str = "all", predicted: str = "all", outcome: str = "all",
                patient: str = "all", magnification: str = "all", subtype: str = "all", fold: str = "all",
                order: str = "most confident first") -> list[BrowseRow]:
    """The rows that pass every filter ("all" passes everything), sorted by the final MLP's confidence."""
    kept = [row for row in rows
            if truth in ("all", CLASS_NAMES[row.truth]) and predicted in ("all", CLASS_NAMES[row.predicted])
            and outcome in ("all", "correct" if row.truth == row.predicted else "wrong")
            and patient in ("all", row.patient) and magnification in ("all", row.magnification)
            and subtype in ("all", row.subtype) and fold in ("all", str(row.fold))]
    return sorted(kept, key=lambda row: (row.confidence, row.path), reverse=order == "most confident first")


def results_markdown(run: ViewerRun) -> str:
    """The run's table as the final stage wrote it (results.md, or cv_results.md with its intervals)."""
    results_file = run.output_dir / (CV_RESULTS_MD if run.run.kind == "kfold" else RESULTS_MD)
    if not results_file.is_file():
        return f"{results_file} is missing: run {run.run.further_command()}"
    return results_file.read_text(encoding="utf-8")


def report_plots(run: ViewerRun) -> list[tuple[Path, Image.Image]]:
    """The report's plots (report/*.png, when the report has been built), each read into memory (Gradio then serves
    its own copy). A file there that is not a plain file (a link could lead out of the run) or does not decode is
    skipped with a warning: the viewer starts without it."""
    plots = []
    for path in sorted((run.output_dir / REPORT_DIR).glob("*.png")):
        if path.is_symlink() or not path.is_file():
            print(f"WARNING: skipped {path}: not a plain file")
            continue
        try:
            with Image.open(path) as picture:
                plots.append((path, picture.convert("RGB")))
        except (OSError, ValueError, Image.DecompressionBombError) as error:  # UnidentifiedImageError is an OSError
            print(f"WARNING: skipped {path}: cannot read it as an image ({error}); make_report.py rebuilds the report")
    return plots

