"""New images through a finished run's models: the one path shared by predict.py and the viewer (app.py).

    mlp, classifier = load_classifier(output_dir)                # final_classifier.pth, checked against results.json
    models = load_cnns(output_dir, classifier, device)           # each CNN, checked to be the one the MLP learnt from
    classify_images(images, mlp=mlp, classifier=classifier, models=models, device=device)
    predict_batches(paths, output_dir, device)                   # the same, a batch of files at a time

Imports no training module (predict.py must start fast and stay small; tests/test_structure.py checks it).
"""

from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image

from common.cam_methods import cams_and_logits
from common.checkpoints import load_checkpoint, model_from_checkpoint
from common.dataset import load_rgb
from common.errors import PipelineError
from common.fileio import sha256_of_file
from common.fusion import (check_listed_in_results, check_made_by_checkpoint, classifier_features,
                           malignant_probabilities, mlp_from_classifier, mlp_logits, read_results)
from common.heatmaps import load_heatmaps
from common.metrics import softmax
from common.models import MODEL_ORDER
from common.runfiles import FINAL_CLASSIFIER, FURTHER_SCRIPT, checkpoint_path, heatmap_path
from common.transforms import build_transforms, resize_image

BATCH_SIZE = 16
OVERLAY_SIZE = 224  # pixels per panel of the overlay strip


def load_classifier(output_dir: Path) -> tuple[torch.nn.Module, dict]:
    """The final MLP, checked to be the one whose results.json lies beside it."""
    path = output_dir / FINAL_CLASSIFIER
    classifier = load_checkpoint(path, made_by=FURTHER_SCRIPT)
    check_listed_in_results(read_results(output_dir), path)
    return mlp_from_classifier(classifier), classifier


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
    features = classifier_features(classifier, mlp_cams, logits)
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
