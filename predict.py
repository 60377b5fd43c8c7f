"""Classify new microscopy images with a finished run: each CNN, their soft vote and the final heatmap MLP.

    python predict.py --output-dir runs/breakhis path/to/image.png path/to/folder ...

For each image (any RGB size; it is resized like the training images) prints P(malignant) of DenseNet-121,
ResNet-50, VGG-16, their mean (soft vote) and the final MLP, and writes to --out (default
<output-dir>/predictions/): predictions.csv and one overlay PNG per image (image, each model's Grad-CAM, the
combined map); with --explain, also <image>_explain.png: Grad-CAM, Grad-CAM++ and LayerCAM of each CNN beside
LIME, Kernel SHAP and occlusion (captum). The maps explain the class chosen by the rule the MLP was trained with. On
a K-fold run (run_pipeline.py --folds K) each CNN is the bagged ensemble of its K fold models and the final MLP the
one fitted on every out-of-fold row (common/cv_predict.py; printed when it runs). A run whose checkpoints
were trained from random initialisation or on the synthetic demo data gets a warning on stderr first.
"""

import argparse
import csv
import io
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common.cam_methods import cams_and_logits
from common.data import IMAGE_EXTENSIONS
from common.dataset import load_rgb
from common.console import HelpFormatter
from common.errors import PipelineError, run_main
from common.checkpoints import load_checkpoint, model_from_checkpoint, training_caveats
from common.fileio import disk_full_as_pipeline_error, sha256_of_file, write_text
from common.fusion import (Standardizer, build_features, build_mlp, check_listed_in_results,
                           check_made_by_checkpoint, malignant_probabilities, mlp_logits, read_results, stack_maps)
from common.heatmaps import blend, colorize, combined_map, jet, load_heatmaps
from common.metrics import DECISION_THRESHOLD, format_probability, softmax
from common.models import MODEL_ORDER
from common.cv_predict import bagged_predict_batches, is_k_fold_run
from common.runfiles import FINAL_CLASSIFIER, FURTHER_SCRIPT, PREDICTIONS_DIR, checkpoint_path, fold_dir, heatmap_path
from common.runtime import pick_device
from common.transforms import build_transforms, resize_image

BATCH_SIZE = 16
OVERLAY_SIZE = 224  # pixels per panel of the overlay strip


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


def load_classifier(output_dir: Path) -> tuple[torch.nn.Module, dict]:
    """The final MLP, checked to be the one whose results.json lies beside it."""
    path = output_dir / FINAL_CLASSIFIER
    classifier = load_checkpoint(path, made_by=FURTHER_SCRIPT)
    check_listed_in_results(read_results(output_dir), path)
    mlp = build_mlp(classifier["in_features"], classifier["hidden_sizes"], classifier["dropout"])
    mlp.load_state_dict(classifier["model"])
    return mlp.eval(), classifier


def load_cnns(output_dir: Path, classifier: dict, device: torch.device) -> dict[str, tuple[torch.nn.Module, int]]:
    """Each CNN (with its input size), checked to be the very checkpoint the final MLP was trained on."""
    models = {}
    for arch in MODEL_ORDER:
        path = checkpoint_path(output_dir, arch)
        checkpoint = load_checkpoint(path, arch)
        digest = sha256_of_file(path)
        if digest != classifier["sources"][arch]["checkpoint_sha256"]:
            heatmap_file = heatmap_path(output_dir, arch)
            if heatmap_file.is_file():  # a model script rerun that stopped before its export: regenerate the maps first
                check_made_by_checkpoint(arch, heatmap_file, load_heatmaps(heatmap_file), path, digest,
                                         rerun_further=True)
            raise PipelineError(f"{path} changed after final_classifier.pth was trained on its heatmaps; rerun "
                                f"{FURTHER_SCRIPT} --output-dir {output_dir}")
        models[arch] = (model_from_checkpoint(checkpoint).to(device), checkpoint["image_size"])
    return models


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


def classify_images(images: list[Image.Image], *, mlp: torch.nn.Module, classifier: dict,
                    models: dict[str, tuple[torch.nn.Module, int]], device: torch.device,
                    methods: tuple[str, ...] = ("gradcam",)) -> dict:
    """Decoded RGB images through the loaded models: each CNN's logits and raw Grad-CAM maps (one pass each),
    P(malignant) of each CNN, the soft vote and the final MLP ('final_mlp'), whose input are the maps of the CAM
    method it was trained on; 'maps': method -> arch -> raw maps, for each of `methods` (from the same pass).
    The one path for new images (predict.py, the viewer)."""
    cam_method = classifier.get("cam_method", "gradcam")  # the maps the MLP was trained on (older files: Grad-CAM)
    wanted = tuple(dict.fromkeys(("gradcam", cam_method, *methods)))
    logits, cams, mlp_cams, maps_by_method = {}, {}, {}, {method: {} for method in methods}
    for arch, (model, image_size) in models.items():
        transform = build_transforms(train=False, image_size=image_size)
        batch = torch.stack([transform(image) for image in images]).to(device)
        batch_maps, batch_logits = cams_and_logits(model, arch, batch, target=classifier["target_class_rule"],
                                                   methods=wanted)
        cams[arch], logits[arch] = batch_maps["gradcam"].cpu().numpy(), batch_logits.cpu().numpy()
        mlp_cams[arch] = batch_maps[cam_method].cpu().numpy()
        for method in methods:
            maps_by_method[method][arch] = batch_maps[method].cpu().numpy()
    standardize = Standardizer(classifier["feature_mean"].numpy(), classifier["feature_std"].numpy())
    maps = stack_maps(mlp_cams, classifier["grid_size"])
    features = standardize(build_features(maps, logits if classifier["features"] == "heatmaps+logits" else None))
    probabilities = malignant_probabilities(logits)
    # In eval mode batch norm uses its running statistics, so each image's P does not depend on its batch.
    probabilities["final_mlp"] = softmax(mlp_logits(mlp, features, device))[:, 1]
    return {"logits": logits, "cams": cams, "probabilities": probabilities, "maps": maps_by_method}


def predict_batches(image_paths: list[Path], output_dir: Path, device: torch.device,
                    batch_size: int = BATCH_SIZE) -> Iterator[dict]:
    """For each batch of images: each CNN's logits and raw maps, P(malignant) of each CNN, the soft vote and the
    final MLP, and a 224 px copy of each image for its overlay. Nothing is kept between batches (flat memory)."""
    mlp, classifier = load_classifier(output_dir)
    mlp = mlp.to(device)
    models = load_cnns(output_dir, classifier, device)
    for start in range(0, len(image_paths), batch_size):
        paths = image_paths[start:start + batch_size]
        images = [load_rgb(path) for path in paths]
        result = classify_images(images, mlp=mlp, classifier=classifier, models=models, device=device)
        yield {"paths": paths, **result, "images": [resize_image(image, OVERLAY_SIZE) for image in images]}


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
    """<stem>_explain.png beside each overlay (common.explain.explain_image); returns their names."""
    from common.explain import explain_image  # here: captum is imported only when explanations are asked for

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
    k_fold = is_k_fold_run(output_dir)  # bagged fold models and the out-of-fold MLP (common/cv_predict.py)
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
