"""Classify new microscopy images with a finished run: each CNN, their soft vote and the final heatmap MLP.

    python predict.py --output-dir runs/breakhis path/to/image.png path/to/folder ...
    python predict.py --output-dir runs/breakhis --explain all path/to/image.png
    python predict.py --output-dir runs/breakhis --one-patient --alpha 0.1 path/to/one_patients_folder

For each image (any RGB size; it is resized like the training images) prints P(malignant) of DenseNet-121,
ResNet-50, VGG-16, their mean (soft vote) and the final MLP, and writes to --out (default
<output-dir>/predictions/): predictions.csv and one overlay PNG per image (the image, each model's Grad-CAM and the
combined map, each panel titled, the image's aspect ratio kept); with --explain, also <stem>_explain.png:
Grad-CAM, Grad-CAM++ and LayerCAM of each CNN beside LIME, Kernel SHAP and occlusion (captum). The maps explain the
class chosen by the rule the MLP was trained with.

Calibrated probabilities and "refer this case" (docs/calibration.md): every P also temperature-scaled with the
temperature the run fitted on held-out patients (columns p_malignant_<model>_calibrated), and each image's
conformal set at --alpha from the final MLP's calibrated P: "benign", "malignant" or "uncertain: refer" (an
image-level set: calibrated on held-out images, labelled as such). With --one-patient, all inputs are one patient's
images: the patient's mean calibrated P and its patient-level set (calibrated on held-out patients) are printed.

Both kinds of run: on a K-fold run (run_pipeline.py's default) each CNN of a new image is the bagged ensemble of
its K fold models and the final MLP the one fitted on every out-of-fold row (printed when it runs). An image of
the run's own dataset is scored honestly instead: on a K-fold run by the fold models that never saw its patient
(and the final MLP's cross-fitted out-of-fold probability, from oof_predictions.csv); on a single split as usual,
but with a note when it is a train or val image, which the models have seen. A run whose checkpoints were trained
from random initialisation or on the synthetic demo data gets a warning above the table.
"""

import csv
import dataclasses
import io
import os
import sys
import time
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from common.cams.display import combined_map, evidence_colour_bar, map_overlay, unit_map_overlay
from common.core.console import CommandParser
from common.core.errors import PipelineError, run_main
from common.core.fileio import (
    check_writable_folder,
    disk_full_as_pipeline_error,
    remove_stale_temporaries,
    scratch_folder,
    write_text,
)
from common.core.runfiles import (
    PREDICTIONS_CSV,
    PREDICTIONS_DIR,
    distinct_stems,
    probability_key,
    scaled_probability_key,
)
from common.data.records import IMAGE_EXTENSIONS
from common.evaluation.calibration import apply_temperature
from common.evaluation.conformal import prediction_sets, set_names, threshold_from_scores
from common.evaluation.metrics import DECISION_THRESHOLD, format_probability
from common.inference import BATCH_SIZE, RunModels, load_run_models, predict_batches
from common.models.registry import ARCHS, MODEL_ORDER
from common.run import Run, open_run
from common.training.runtime import pick_device

COLUMNS = list(MODEL_ORDER) + ["soft_vote", "final_mlp"]


def collect_images(inputs: list[str]) -> list[Path]:
    """Files as given, plus every image file inside given folders (sorted)."""
    images = []
    for item in map(Path, inputs):
        if item.is_dir():
            images += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        elif item.is_file():
            images.append(item)
        else:
            raise PipelineError(f"input {item} does not exist")
    if not images:
        raise PipelineError(f"no image files in {', '.join(inputs)}")
    return images


def warn_about_training(caveats: list[str], output_dir: Path) -> None:
    """A prominent warning above the table when the run's checkpoints say its models cannot speak about real
    tissue (random initialisation, synthetic demo data): their confident-looking probabilities mean nothing.
    On stdout, with the numbers it qualifies; stderr keeps to the one-line errors."""
    if caveats:
        banner = "!" * 100
        lines = [banner, f"WARNING: the models of {output_dir} say nothing about real tissue; these probabilities "
                         "only test the pipeline:", *(f"WARNING:   {line}" for line in caveats), banner]
        print("\n".join(lines), flush=True)


# ------------------------------------------------------------------------------------ the run's own images


def dataset_membership(run: Run, image_paths: list[Path]) -> dict[int, int]:
    """Input index -> row in the run's partition, for inputs that are images of the run's own dataset: the same
    file under its data root, or a copy of one (same bytes; Run.own_image_row)."""
    rows = {index: run.own_image_row(path) for index, path in enumerate(image_paths)}
    return {index: row for index, row in rows.items() if row is not None}


def scoring_groups(run: Run, members: dict[int, int], count: int) -> list[tuple[int | None, list[int]]]:
    """(fold, input indices) of `count` inputs: on a K-fold run the run's own images (`members`: input index ->
    partition row) go to the fold that holds their patient (None: new images, the bagged ensemble); a single split
    scores every input with its one model set (fold None)."""
    by_fold: dict[int | None, list[int]] = {}
    for index in range(count):
        fold = int(run.partition.folds[members[index]]) if run.kind == "kfold" and index in members else None
        by_fold.setdefault(fold, []).append(index)
    return sorted(by_fold.items(), key=lambda item: (item[0] is not None, item[0] or 0))


def fold_models(models: RunModels, fold: int) -> RunModels:
    """The run's models with each CNN reduced to its fold-k model (the one that never saw fold k's patients)."""
    cnns = {arch: dataclasses.replace(ensemble, members=(ensemble.members[fold - 1],))
            for arch, ensemble in models.cnns.items()}
    return dataclasses.replace(models, cnns=cnns)


def scored_by(run: Run, fold: int | None, split_side: str | None) -> str:
    """The predictions.csv note on what scored an image."""
    if fold is not None:
        return (f"fold {fold}'s models (out of fold: they never saw this patient); final MLP: its cross-fitted "
                f"out-of-fold probability ({run.predictions_file.name})")
    if run.kind == "kfold":
        return f"the bagged ensemble of {len(run.folds)} fold models"
    if split_side in ("train", "val"):
        return f"the run's models; a {split_side} image of this run, which the models have seen (not an evaluation)"
    return "the run's models" + ("; a test image of this run" if split_side == "test" else "")


# ------------------------------------------------------------------------------------ pictures


def overlay_figure(image: Image.Image, cams: dict[str, np.ndarray], probabilities: dict[str, float],
                   title: str) -> Figure:
    """Image | each CNN's Grad-CAM over it (titled with its P(malignant)) | the combined map (the mean of the
    display-scaled maps), the image's aspect ratio kept, and a colour bar saying what the colours mean."""
    size = image.size
    panels = [(image, "image")]
    panels += [(map_overlay(image, cams[arch]), f"{ARCHS[arch].display_name}\n"
                f"P(malignant) {format_probability(probabilities[arch])}") for arch in MODEL_ORDER]
    panels.append((unit_map_overlay(image, combined_map([cams[arch] for arch in MODEL_ORDER], size)),
                   f"combined\nfinal MLP P {format_probability(probabilities['final_mlp'])}"))
    aspect = size[1] / size[0]
    figure = Figure(figsize=(2.3 * len(panels) + 0.9, 2.3 * aspect + 0.9), layout="constrained")
    axes = figure.subplots(1, len(panels))
    for axis, (picture, caption) in zip(axes, panels):
        axis.imshow(picture)
        axis.set_title(caption, fontsize=8)
        axis.set_xticks([])
        axis.set_yticks([])
    evidence_colour_bar(figure, axes)
    figure.suptitle(title, fontsize=8)
    return figure


def overlay_names(image_paths: list[Path]) -> list[str]:
    """<stem>_gradcam.png per image; images sharing a name (e.g. in two subfolders) get <stem>_2_gradcam.png, ..."""
    return [f"{stem}_gradcam.png" for stem in distinct_stems(image_paths)]


def write_explanations(image_paths: list[Path], names: list[str], models: RunModels, members: dict[int, int],
                       folder: Path, explain: str) -> list[str]:
    """<stem>_explain.png beside each overlay (common.explain.figures.explain_image), each image explained by the
    models that scored it (scoring_groups); returns their names."""
    from common.explain.figures import explain_image  # here: captum is imported only when explanations are asked for

    written, done = [], 0
    for fold, indices in scoring_groups(models.run, members, len(image_paths)):
        cnns = fold_models(models, fold).cnns if fold is not None else models.cnns
        for index in indices:
            name = names[index].removesuffix("_gradcam.png") + "_explain.png"
            done += 1
            started = time.perf_counter()
            prefix = f"explaining {done}/{len(image_paths)} {image_paths[index].name}:"
            with disk_full_as_pipeline_error(folder / name):
                explain_image(image_paths[index], cnns, folder / name,
                              target_rule=models.classifier["target_class_rule"],
                              perturbation_archs=MODEL_ORDER if explain == "all" else (explain,),
                              say=lambda step: print(f"{prefix} {step} ...", file=sys.stderr, flush=True))
            print(f"{prefix} done in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
            written.append(name)
    return written


# ------------------------------------------------------------------------------------ main


def main(argv=None) -> None:
    parser = CommandParser(description=__doc__)
    parser.add_argument("inputs", nargs="+", help="image files or folders")
    parser.add_argument("--output-dir", default="runs/breakhis", help="the finished run whose models to use")
    parser.add_argument("--out", help="where to write predictions.csv and overlays (default: <output-dir>/predictions)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                        help="auto: CUDA if present, else MPS, else the CPU")
    parser.add_argument("--alpha", type=float,
                        help="error rate of the conformal sets (default: the run's, set by cancer_class_further.py "
                             "--alpha, 0.1 unless changed)")
    parser.add_argument("--one-patient", action="store_true",
                        help="the inputs are one patient's images: also print the patient's mean calibrated "
                             "P(malignant) and its patient-level conformal set")
    parser.add_argument("--explain", choices=["all", *MODEL_ORDER],
                        help="also write <stem>_explain.png: every CAM of each CNN side by side with LIME, Kernel "
                             "SHAP and occlusion (captum; hundreds of forward passes per image) of this CNN or all "
                             "(default: no explanation figures)")
    args = parser.parse_args(argv)
    if args.alpha is not None and not 0 < args.alpha < 1:
        parser.error(f"--alpha {args.alpha}: must be in (0, 1), e.g. 0.1")
    run = open_run(args.output_dir)
    out_dir = Path(args.out) if args.out else run.output_dir / PREDICTIONS_DIR
    check_writable_folder(out_dir, option="--out")  # before the models load, not after the work
    image_paths = collect_images(args.inputs)
    # A K-fold run's fold models are loaded one at a time, while they run: memory for one fold, not K.
    models = load_run_models(run, pick_device(args.device), one_at_a_time=run.kind == "kfold")
    print(models.describe())
    warn_about_training(run.caveats(), run.output_dir)
    names = overlay_names(image_paths)
    members = dataset_membership(run, image_paths)  # inputs that are the run's own images, flagged as such
    rows: dict[int, list[str]] = {}
    sets = ConformalSets(models.classifier, args.alpha)
    print(f"{sets.describe()}")
    print(f"{'image':<40} " + " ".join(f"{name:>12}" for name in COLUMNS)
          + f" {'calibrated':>10}  {'prediction (final MLP)':<22}  set (alpha {sets.alpha:g}, image level)")
    remove_stale_temporaries(out_dir.parent)  # a killed predict.py's staging folder (never a live one's)
    # Overlays are written batch by batch (flat memory) into a staging folder that is moved into --out only when
    # every image has been read: a bad image stops the run with --out as it was.
    with scratch_folder(out_dir.parent, out_dir.name) as staging:
        for fold, indices in scoring_groups(run, members, len(image_paths)):
            rows.update(score_group(run, models, fold, indices, image_paths, members, names, staging, out_dir, sets))
        if args.explain:
            names += write_explanations(image_paths, names, models, members, staging, args.explain)
        out_dir.mkdir(exist_ok=True)
        for name in names:
            os.replace(staging / name, out_dir / name)
    table = io.StringIO()
    csv.writer(table).writerows([["image"] + [f"p_malignant_{name}" for name in COLUMNS]
                                 + [f"p_malignant_{name}_calibrated" for name in COLUMNS]
                                 + ["prediction", f"conformal_set_image_level_alpha_{sets.alpha:g}", "overlay",
                                    "scored_by"]] + [rows[index] for index in sorted(rows)])
    write_text(out_dir / PREDICTIONS_CSV, table.getvalue())
    if args.one_patient:
        final_calibrated_column = 1 + len(COLUMNS) + COLUMNS.index("final_mlp")  # after the image and the raw Ps
        calibrated = [float(rows[index][final_calibrated_column]) for index in sorted(rows)]
        print(sets.patient_line(calibrated))
    explained = f" and {len(image_paths)} explanation figure(s) <stem>_explain.png" if args.explain else ""
    print(f"wrote {out_dir / PREDICTIONS_CSV}, {len(image_paths)} overlay(s) <stem>_gradcam.png (image | "
          f"{' | '.join(MODEL_ORDER)} | combined){explained}")


class ConformalSets:
    """The final MLP's conformal sets at an error rate, from the held-out scores in the classifier file."""

    def __init__(self, classifier: dict, alpha: float | None):
        self.temperatures = classifier["temperatures"]
        conformal = classifier["conformal"]
        self.alpha = conformal["alpha"] if alpha is None else alpha
        self.image_threshold = threshold_from_scores(conformal["image_scores"].numpy(), self.alpha)
        self.patient_threshold = threshold_from_scores(conformal["patient_scores"].numpy(), self.alpha)
        self.held_out = (len(conformal["image_scores"]), len(conformal["patient_scores"]))
        self.protocol = classifier["calibration_protocol"]

    def describe(self) -> str:
        temperatures = ", ".join(f"{key} T {value:.2f}" for key, value in self.temperatures.items())
        return (f"calibrated: P temperature-scaled ({temperatures}); sets at alpha {self.alpha:g} from "
                f"{self.held_out[0]} held-out images / {self.held_out[1]} held-out patients ({self.protocol})")

    def calibrated(self, probabilities: dict[str, float]) -> dict[str, float]:
        return {name: float(apply_temperature(probabilities[name], self.temperatures[name])) for name in COLUMNS}

    def image_set(self, calibrated_final: float) -> str:
        return set_names(prediction_sets(np.array([calibrated_final]), self.image_threshold))[0]

    def patient_line(self, calibrated_final: list[float]) -> str:
        mean = float(np.mean(calibrated_final))
        name = set_names(prediction_sets(np.array([mean]), self.patient_threshold))[0]
        return (f"one patient ({len(calibrated_final)} images): mean calibrated P(malignant) "
                f"{format_probability(mean)}; conformal set at alpha {self.alpha:g} (patient level): {name}")


def score_group(run: Run, models: RunModels, fold: int | None, indices: list[int], image_paths: list[Path],
                members: dict[int, int], names: list[str], staging: Path, out_dir: Path,
                sets: ConformalSets) -> dict[int, list[str]]:
    """Score the inputs `indices` with the run's models (fold None: all of them) or fold k's; write their overlays
    into `staging`, print their rows (and a note under each of the run's own images); returns their
    predictions.csv rows by input index."""
    group_models = fold_models(models, fold) if fold is not None else models
    stored = run.predictions() if fold is not None else None  # the cross-fitted MLP of the run's own images
    rows, position = {}, 0
    for batch in predict_batches([image_paths[index] for index in indices], group_models, batch_size=BATCH_SIZE):
        for row, path in enumerate(batch["paths"]):
            index, position = indices[position], position + 1
            probabilities = {name: float(batch["probabilities"][name][row]) for name in COLUMNS}
            own_row = members.get(index)
            relative = run.partition.records[own_row].path if own_row is not None else None
            calibrated = sets.calibrated(probabilities)
            if stored is not None:  # never fitted on this patient's rows, unlike final_classifier.pth
                stored_row = int(np.flatnonzero(stored["paths"] == relative)[0])
                final_row = f"mlp_{models.classifier['features']}"
                probabilities["final_mlp"] = float(stored[probability_key(final_row)][stored_row])
                calibrated["final_mlp"] = float(stored[scaled_probability_key(final_row)][stored_row])
            figure = overlay_figure(batch["images"][row], {arch: batch["cams"][arch][row] for arch in MODEL_ORDER},
                                    probabilities, path.name)
            with disk_full_as_pipeline_error(out_dir / names[index]):  # (staging: a whole file or none moves on)
                figure.savefig(staging / names[index], format="png", dpi=90)
            verdict = "malignant" if probabilities["final_mlp"] >= DECISION_THRESHOLD else "benign"
            image_set = sets.image_set(calibrated["final_mlp"])
            print(f"{path.name[-40:]:<40} " + " ".join(f"{format_probability(probabilities[name]):>12}"
                                                       for name in COLUMNS)
                  + f" {format_probability(calibrated['final_mlp']):>10}  {verdict:<22}  {image_set}")
            if own_row is not None:
                scored_here = f"; scored here by fold {fold}'s models" if fold is not None else ""
                print(f"  note: {path.name}: {run.own_image_note(own_row)}{scored_here}")
            side = run.partition.splits[own_row] if own_row is not None and run.kind == "single" else None
            rows[index] = ([str(path)] + [format_probability(probabilities[name], digits=6) for name in COLUMNS]
                           + [format_probability(calibrated[name], digits=6) for name in COLUMNS]
                           + [verdict, image_set, str(out_dir / names[index]), scored_by(run, fold, side)])
    return rows


if __name__ == "__main__":
    run_main(main)
