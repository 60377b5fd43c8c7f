"""New images through a finished run's models: the one path shared by predict.py and the viewer (app.py).

    mlp, classifier = load_classifier(output_dir)                # final_classifier.pth, checked against results.json
    models = load_cnns(output_dir, classifier, device)           # each CNN, checked to be the one the MLP learnt from
    classify_images(images, mlp=mlp, classifier=classifier, models=models, device=device)
    predict_batches(paths, output_dir, device)                   # the same, a batch of files at a time

Imports no training module (predict.py must start fast and stay small; tests/test_structure.py checks it).
"""

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common.cams.heatmap_file import load_heatmaps
from common.cams.methods import cams_and_logits, grad_cam
from common.core.errors import PipelineError
from common.core.fileio import sha256_of_file
from common.core.runfiles import (
    CV_RESULTS_JSON,
    FINAL_CLASSIFIER,
    FURTHER_SCRIPT,
    checkpoint_path,
    fold_dir,
    heatmap_path,
)
from common.data.images import load_rgb
from common.data.partition import FOLDS_FILE_NAME, load_folds
from common.data.transforms import build_transforms, resize_image
from common.evaluation.metrics import softmax
from common.fusion.features import malignant_probabilities
from common.fusion.mlp import classifier_features, mlp_from_classifier, mlp_logits
from common.models.checkpoints import load_checkpoint, model_from_checkpoint
from common.models.registry import MODEL_ORDER
from common.run import check_listed_in_results, check_made_by_checkpoint, read_results

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


BAGGING_NOTE = ("K-fold run: each CNN's probability and Grad-CAM map are the mean over its {k} fold models (a bagged "
                "ensemble); the final MLP is the one fitted on every out-of-fold row (final_classifier.pth)")


def is_k_fold_run(output_dir: Path) -> bool:
    return (Path(output_dir) / FOLDS_FILE_NAME).is_file() and (Path(output_dir) / CV_RESULTS_JSON).is_file()


def load_final_classifier(output_dir: Path) -> tuple[torch.nn.Module, dict]:
    """The MLP of common/stages/cross_validation.py, checked to be the one cv_results.json lists."""
    import json
    path = Path(output_dir) / FINAL_CLASSIFIER
    classifier = load_checkpoint(path, made_by="python -m common.stages.cross_validation")
    listed = json.loads((Path(output_dir) / CV_RESULTS_JSON).read_text(encoding="utf-8")).get("outputs", {})
    if listed.get(FINAL_CLASSIFIER) != sha256_of_file(path):
        raise PipelineError(f"{path} is not the file {CV_RESULTS_JSON} lists; rerun python -m common.stages.cross_validation "
                            f"--output-dir {output_dir}")
    return mlp_from_classifier(classifier), classifier


def load_fold_models(output_dir: Path, classifier: dict, device: torch.device) -> dict[str, list]:
    """arch -> [(model, image size)] of every fold, each checked to be a checkpoint the MLP's rows came from."""
    n_folds = load_folds(Path(output_dir) / FOLDS_FILE_NAME).n_folds
    models = {arch: [] for arch in MODEL_ORDER}
    for arch in MODEL_ORDER:
        for fold in range(1, n_folds + 1):
            path = checkpoint_path(fold_dir(output_dir, fold), arch)
            checkpoint = load_checkpoint(path, arch)
            if sha256_of_file(path) not in classifier["checkpoint_sha256"][arch]:
                raise PipelineError(f"{path} changed after {FINAL_CLASSIFIER} was fitted; rerun python -m common.stages.cross_validation "
                                    f"--output-dir {output_dir}")
            models[arch].append((model_from_checkpoint(checkpoint).to(device), checkpoint["image_size"]))
    return models


def bagged_predict_batches(image_paths: list[Path], output_dir: Path, device: torch.device, *, batch_size: int,
                           overlay_size: int) -> Iterator[dict]:
    """predict.predict_batches' dicts for a K-fold run: P(malignant) and maps of each CNN bagged over its folds."""
    mlp, classifier = load_final_classifier(output_dir)
    mlp = mlp.to(device)
    models = load_fold_models(output_dir, classifier, device)
    print(BAGGING_NOTE.format(k=len(models[MODEL_ORDER[0]])))
    for start in range(0, len(image_paths), batch_size):
        paths = image_paths[start:start + batch_size]
        images = [load_rgb(path) for path in paths]
        cams, probabilities = {}, {}
        for arch, fold_models in models.items():
            fold_cams, fold_probabilities = [], []
            for model, image_size in fold_models:
                transform = build_transforms(train=False, image_size=image_size)
                batch = torch.stack([transform(image) for image in images]).to(device)
                batch_cams, batch_logits = grad_cam(model, arch, batch, target=classifier["target_class_rule"])
                fold_cams.append(batch_cams.cpu().numpy())
                fold_probabilities.append(softmax(batch_logits.cpu().numpy())[:, 1])
            cams[arch] = np.mean(fold_cams, axis=0)  # (B, h, w) raw maps, bagged
            probabilities[arch] = np.mean(fold_probabilities, axis=0)
        probabilities["soft_vote"] = np.mean([probabilities[arch] for arch in MODEL_ORDER], axis=0)
        features = classifier_features(classifier, cams, None)  # common/stages/cross_validation.py's MLP reads the maps alone
        probabilities["final_mlp"] = softmax(mlp_logits(mlp, features, device))[:, 1]
        yield {"paths": paths, "cams": cams, "probabilities": probabilities,
               "images": [resize_image(image, overlay_size) for image in images]}
