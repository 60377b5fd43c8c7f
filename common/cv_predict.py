"""predict.py on a K-fold run: a bagged ensemble of the fold models, then the MLP fitted on all out-of-fold rows.

For each new image, each CNN's P(malignant) is the mean over its K fold models' probabilities, and its Grad-CAM
map the mean of their raw maps (each fold model's map explains the class chosen by the rule the maps were made
with); the soft vote is the mean of the three bagged probabilities; the final MLP (common/cv.py's
final_classifier.pth, fitted on every out-of-fold row) reads the three bagged maps.
"""

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from common.cam import grad_cam
from common.checkpoints import load_checkpoint, model_from_checkpoint
from common.crossval import FOLDS_FILE_NAME, load_folds
from common.dataset import load_rgb
from common.errors import PipelineError
from common.fileio import sha256_of_file
from common.fusion import classifier_features, mlp_from_classifier, mlp_logits
from common.metrics import softmax
from common.models import MODEL_ORDER
from common.runfiles import CV_RESULTS_JSON, FINAL_CLASSIFIER, checkpoint_path, fold_dir
from common.transforms import build_transforms, resize_image

BAGGING_NOTE = ("K-fold run: each CNN's probability and Grad-CAM map are the mean over its {k} fold models (a bagged "
                "ensemble); the final MLP is the one fitted on every out-of-fold row (final_classifier.pth)")


def is_k_fold_run(output_dir: Path) -> bool:
    return (Path(output_dir) / FOLDS_FILE_NAME).is_file() and (Path(output_dir) / CV_RESULTS_JSON).is_file()


def load_final_classifier(output_dir: Path) -> tuple[torch.nn.Module, dict]:
    """The MLP of common/cv.py, checked to be the one cv_results.json lists."""
    import json
    path = Path(output_dir) / FINAL_CLASSIFIER
    classifier = load_checkpoint(path, made_by="python -m common.cv")
    listed = json.loads((Path(output_dir) / CV_RESULTS_JSON).read_text(encoding="utf-8")).get("outputs", {})
    if listed.get(FINAL_CLASSIFIER) != sha256_of_file(path):
        raise PipelineError(f"{path} is not the file {CV_RESULTS_JSON} lists; rerun python -m common.cv "
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
                raise PipelineError(f"{path} changed after {FINAL_CLASSIFIER} was fitted; rerun python -m common.cv "
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
        features = classifier_features(classifier, cams, None)  # common/cv.py's MLP reads the maps alone
        probabilities["final_mlp"] = softmax(mlp_logits(mlp, features, device))[:, 1]
        yield {"paths": paths, "cams": cams, "probabilities": probabilities,
               "images": [resize_image(image, overlay_size) for image in images]}
