"""Classify new microscopy images with a finished run: each CNN, their soft vote and the final heatmap MLP.

    python predict.py --output-dir runs/breakhis path/to/image.png path/to/folder ...

For each image (any RGB size; it is resized like the training images) prints P(malignant) of DenseNet-121,
ResNet-50, VGG-16, their mean (soft vote) and the final MLP, and writes to --out (default
<output-dir>/predictions/): predictions.csv and one overlay PNG per image (image, each model's Grad-CAM, the
combined map). Grad-CAM explains the class chosen by the rule the MLP was trained with.
"""

import argparse
import csv
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common.cam import grad_cam, scale_for_display
from common.data import IMAGE_EXTENSIONS
from common.dataset import load_rgb
from common.errors import PipelineError, run_main
from common.fileio import write_text
from common.fusion import MODEL_ORDER, build_features, build_mlp, stack_maps
from common.heatmaps import colorize
from common.metrics import softmax
from common.train import checkpoint_path, load_checkpoint, model_from_checkpoint, pick_device
from common.transforms import build_transforms, resize_image

BATCH_SIZE = 16


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
    classifier = load_checkpoint(output_dir / "final_classifier.pth", made_by="cancer_class_further.py")
    mlp = build_mlp(classifier["in_features"], classifier["hidden_sizes"], classifier["dropout"])
    mlp.load_state_dict(classifier["model"])
    return mlp.eval(), classifier


def predict_images(image_paths: list[Path], output_dir: Path, device: torch.device) -> dict[str, np.ndarray]:
    """Per image: each CNN's logits and raw maps, and P(malignant) of each CNN, the soft vote and the MLP."""
    mlp, classifier = load_classifier(output_dir)
    rule = classifier["target_class_rule"]
    images = [load_rgb(path) for path in image_paths]  # every file is checked before any model runs
    results = {"logits": {}, "cams": {}}
    for arch in MODEL_ORDER:
        checkpoint = load_checkpoint(checkpoint_path(output_dir, arch), arch)
        model = model_from_checkpoint(checkpoint).to(device)
        transform = build_transforms(train=False, image_size=checkpoint["image_size"])
        logits, cams = [], []
        for start in range(0, len(images), BATCH_SIZE):
            batch = torch.stack([transform(image) for image in images[start:start + BATCH_SIZE]]).to(device)
            batch_cams, batch_logits = grad_cam(model, arch, batch, target=rule)
            cams.append(batch_cams.cpu().numpy())
            logits.append(batch_logits.cpu().numpy())
        results["logits"][arch], results["cams"][arch] = np.concatenate(logits), np.concatenate(cams)
    probabilities = {arch: softmax(results["logits"][arch])[:, 1] for arch in MODEL_ORDER}
    probabilities["soft_vote"] = np.mean([probabilities[arch] for arch in MODEL_ORDER], axis=0)
    maps = stack_maps(results["cams"], classifier["grid_size"])
    features = build_features(maps, results["logits"] if classifier["features"] == "heatmaps+logits" else None)
    features = (features - classifier["feature_mean"].numpy()) / classifier["feature_std"].numpy()
    with torch.no_grad():
        mlp_logits = mlp.to(device)(torch.from_numpy(features.astype(np.float32)).to(device)).cpu().numpy()
    probabilities["final_mlp"] = softmax(mlp_logits)[:, 1]
    results["probabilities"] = probabilities
    results["images"], results["grid_size"] = images, classifier["grid_size"]
    return results


def overlay_strip(image: Image.Image, cams: dict[str, np.ndarray], *, grid_size: int, size: int = 224) -> Image.Image:
    """Image | each model's Grad-CAM blended over it | the combined (mean display-scaled) map."""
    base = np.asarray(resize_image(image, size), dtype=np.float32)
    panels = [base]
    for arch in MODEL_ORDER:
        panels.append(0.55 * base + 0.45 * colorize(cams[arch], (size, size)))
    maps = stack_maps({arch: cams[arch][None] for arch in MODEL_ORDER}, grid_size)[0]  # (3, S, S)
    combined = scale_for_display(maps).mean(axis=0)
    panels.append(0.55 * base + 0.45 * colorize(combined, (size, size)))
    return Image.fromarray(np.concatenate(panels, axis=1).astype(np.uint8))


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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="image files or folders")
    parser.add_argument("--output-dir", default="runs/breakhis", help="the run whose checkpoints to use")
    parser.add_argument("--out", help="where to write predictions.csv and overlays (default <output-dir>/predictions)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto")
    args = parser.parse_args(argv)
    output_dir = Path(args.output_dir)
    out_dir = Path(args.out) if args.out else output_dir / "predictions"

    image_paths = collect_images(args.inputs)
    results = predict_images(image_paths, output_dir, pick_device(args.device))
    probabilities = results["probabilities"]
    columns = list(MODEL_ORDER) + ["soft_vote", "final_mlp"]

    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [["image"] + [f"p_malignant_{name}" for name in columns] + ["prediction", "overlay"]]
    print(f"{'image':<40} " + " ".join(f"{name:>12}" for name in columns) + "  prediction (final MLP)")
    for row, (path, overlay_name) in enumerate(zip(image_paths, overlay_names(image_paths))):
        overlay = out_dir / overlay_name
        row_cams = {arch: results["cams"][arch][row] for arch in MODEL_ORDER}
        overlay_strip(results["images"][row], row_cams, grid_size=results["grid_size"]).save(overlay)
        verdict = "malignant" if probabilities["final_mlp"][row] >= 0.5 else "benign"
        values = [probabilities[name][row] for name in columns]
        print(f"{path.name[-40:]:<40} " + " ".join(f"{value:>12.3f}" for value in values) + f"  {verdict}")
        rows.append([str(path)] + [f"{value:.6f}" for value in values] + [verdict, str(overlay)])
    table = io.StringIO()
    csv.writer(table).writerows(rows)
    write_text(out_dir / "predictions.csv", table.getvalue())
    print(f"wrote {out_dir / 'predictions.csv'} and {len(image_paths)} overlay(s): image | "
          f"{' | '.join(MODEL_ORDER)} | combined")


if __name__ == "__main__":
    run_main(main)
