"""Classify new microscopy images with a finished run: each CNN, their soft vote and the final heatmap MLP.

    python predict.py --output-dir runs/breakhis path/to/image.png path/to/folder ...

For each image (any RGB size; it is resized like the training images) prints P(malignant) of DenseNet-121,
ResNet-50, VGG-16, their mean (soft vote) and the final MLP, and writes to --out (default
<output-dir>/predictions/): predictions.csv and one overlay PNG per image (image, each model's Grad-CAM, the
combined map); with --explain, also <image>_explain.png: Grad-CAM, Grad-CAM++ and LayerCAM of each CNN beside
LIME, Kernel SHAP and occlusion (captum). The maps explain the class chosen by the rule the MLP was trained with. On
a K-fold run (run_pipeline.py --folds K) each CNN is the bagged ensemble of its K fold models and the final MLP the
one fitted on every out-of-fold row (common/inference.py; printed when it runs). A run whose checkpoints
were trained from random initialisation or on the synthetic demo data gets a warning on stderr first.
"""

import argparse
import csv
import io
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common.cams.display import blend, colorize, combined_map, jet
from common.core.console import HelpFormatter
from common.core.errors import PipelineError, run_main
from common.core.fileio import disk_full_as_pipeline_error, write_text
from common.core.runfiles import PREDICTIONS_DIR, checkpoint_path, fold_dir
from common.data.records import IMAGE_EXTENSIONS
from common.evaluation.metrics import DECISION_THRESHOLD, format_probability
from common.inference import (
    BATCH_SIZE,
    OVERLAY_SIZE,
    bagged_predict_batches,
    is_k_fold_run,
    load_classifier,
    load_cnns,
    predict_batches,
)
from common.models.checkpoints import load_checkpoint, training_caveats
from common.models.registry import MODEL_ORDER
from common.training.runtime import pick_device


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


def warn_about_training(output_dir: Path) -> None:
    """A prominent warning above the table when the run's checkpoints say its models cannot speak about real
    tissue (random initialisation, synthetic demo data): their confident-looking probabilities mean nothing.
    On stdout, with the numbers it qualifies; stderr keeps to the one-line errors."""
    paths = {arch: checkpoint_path(output_dir, arch) for arch in MODEL_ORDER}
    # A missing checkpoint is reported where the models are loaded, after the final classifier's.
    checkpoints = {arch: load_checkpoint(path, arch) for arch, path in paths.items() if path.is_file()}
    caveats = training_caveats(checkpoints)
    if caveats:
        banner = "!" * 100
        lines = [banner, f"WARNING: the models of {output_dir} say nothing about real tissue; these probabilities "
                         "only test the pipeline:", *(f"WARNING:   {line}" for line in caveats), banner]
        print("\n".join(lines), flush=True)


def overlay_strip(image: Image.Image, cams: dict[str, np.ndarray]) -> Image.Image:
    """Image | each model's Grad-CAM blended over it | the combined map (mean of the display-scaled maps)."""
    size = image.size
    panels = [image] + [blend(image, colorize(cams[arch], size)) for arch in MODEL_ORDER]
    panels.append(blend(image, jet(combined_map([cams[arch] for arch in MODEL_ORDER], size))))
    return Image.fromarray(np.concatenate([np.asarray(panel) for panel in panels], axis=1))


def overlay_names(image_paths: list[Path]) -> list[str]:
    """<stem>_gradcam.png per image; images sharing a name (e.g. in two subfolders) get <stem>_2_gradcam.png, ..."""
    names, taken = [], set()
    for path in image_paths:
        name, copy = f"{path.stem}_gradcam.png", 1
        while name in taken:
            copy += 1
            name = f"{path.stem}_{copy}_gradcam.png"
        taken.add(name)
        names.append(name)
    return names


def write_explanations(image_paths: list[Path], overlay_names_: list[str], output_dir: Path, folder: Path,
                       explain: str, device: torch.device) -> list[str]:
    """<stem>_explain.png beside each overlay (common.explain.figures.explain_image); returns their names."""
    from common.explain.figures import explain_image  # here: captum is imported only when explanations are asked for

    _, classifier = load_classifier(output_dir)
    models = load_cnns(output_dir, classifier, device)
    names = []
    for path, overlay_name in zip(image_paths, overlay_names_):
        name = overlay_name.removesuffix("_gradcam.png") + "_explain.png"
        with disk_full_as_pipeline_error(folder / name):
            explain_image(path, models, folder / name, target_rule=classifier["target_class_rule"],
                          perturbation_archs=MODEL_ORDER if explain == "all" else (explain,))
        names.append(name)
    return names


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("inputs", nargs="+", help="image files or folders")
    parser.add_argument("--output-dir", default="runs/breakhis", help="the run whose checkpoints to use")
    parser.add_argument("--out", help="where to write predictions.csv and overlays (default: <output-dir>/predictions)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                        help="auto: CUDA if present, else MPS, else the CPU")
    parser.add_argument("--explain", choices=["all", *MODEL_ORDER],
                        help="also write <image>_explain.png: every CAM of each CNN side by side with LIME, Kernel "
                             "SHAP and occlusion (captum; hundreds of forward passes per image) of this CNN or all "
                             "(default: no explanation figures)")
    args = parser.parse_args(argv)
    output_dir = Path(args.output_dir)
    out_dir = Path(args.out) if args.out else output_dir / PREDICTIONS_DIR

    image_paths = collect_images(args.inputs)
    k_fold = is_k_fold_run(output_dir)  # bagged fold models and the out-of-fold MLP (common/inference.py)
    columns = list(MODEL_ORDER) + ["soft_vote", "final_mlp"]
    rows = [["image"] + [f"p_malignant_{name}" for name in columns] + ["prediction", "overlay"]]
    names = overlay_names(image_paths)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Overlays are written batch by batch (flat memory) into a staging folder that is moved into --out only when
    # every image has been read: a bad image stops the run with --out as it was.
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.") as staging:
        overlay_names_in_order = iter(names)
        device = pick_device(args.device)
        batches = bagged_predict_batches(image_paths, output_dir, device, batch_size=BATCH_SIZE,
                                         overlay_size=OVERLAY_SIZE) if k_fold else \
            predict_batches(image_paths, output_dir, device)
        for index, batch in enumerate(batches):
            if index == 0:  # the run's files passed their checks and the models loaded: now the caveats, the table
                warn_about_training(fold_dir(output_dir, 1) if k_fold else output_dir)
                print(f"{'image':<40} " + " ".join(f"{name:>12}" for name in columns) + "  prediction (final MLP)")
            probabilities = batch["probabilities"]
            for row, path in enumerate(batch["paths"]):
                overlay_name = next(overlay_names_in_order)
                with disk_full_as_pipeline_error(out_dir / overlay_name):
                    overlay_strip(batch["images"][row], {arch: batch["cams"][arch][row] for arch in MODEL_ORDER}
                                  ).save(Path(staging) / overlay_name, format="PNG")
                verdict = "malignant" if probabilities["final_mlp"][row] >= DECISION_THRESHOLD else "benign"
                values = [probabilities[name][row] for name in columns]
                # format_probability: never 0.500 beside "benign" (more digits where rounding would say so)
                print(f"{path.name[-40:]:<40} " + " ".join(f"{format_probability(value):>12}" for value in values)
                      + f"  {verdict}")
                rows.append([str(path)] + [format_probability(value, digits=6) for value in values]
                            + [verdict, str(out_dir / overlay_name)])
        if args.explain:
            names += write_explanations(image_paths, names, output_dir, Path(staging), args.explain,
                                        pick_device(args.device))
        out_dir.mkdir(exist_ok=True)
        for name in names:
            os.replace(Path(staging) / name, out_dir / name)
    table = io.StringIO()
    csv.writer(table).writerows(rows)
    write_text(out_dir / "predictions.csv", table.getvalue())
    print(f"wrote {out_dir / 'predictions.csv'} and {len(image_paths)} overlay(s): image | "
          f"{' | '.join(MODEL_ORDER)} | combined")


if __name__ == "__main__":
    run_main(main)
