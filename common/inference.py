"""New images through a finished run's models: the one path of predict.py and the viewer (app.py), for both kinds
of run.

    models = load_run_models(open_run(output_dir), device)   # the final MLP and each CNN, every file checked
    classify_images(images, models, methods=("gradcam",))    # each CNN's P(malignant) and raw maps, the soft vote,
                                                             # the final MLP
    predict_batches(paths, models)                           # the same, a batch of files at a time

On a K-fold run each CNN is the bagged ensemble of its K fold models (common.cams.ensemble: each image's
probabilities and raw maps averaged over the folds, one pass per fold model with every requested map), and the
final MLP is the one fitted on every out-of-fold row, reading the bagged maps. Imports no training module
(predict.py must start fast and stay small; tests/test_structure.py checks it).
"""

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from common.cams.ensemble import CnnEnsemble
from common.data.images import load_rgb
from common.data.transforms import build_transforms
from common.evaluation.metrics import softmax
from common.fusion.mlp import classifier_features, mlp_logits
from common.models.registry import MODEL_ORDER
from common.run import Run

BATCH_SIZE = 16
OVERLAY_SIZE = 224  # pixels per panel of predict.py's overlay strip (longer side)


@dataclass(frozen=True, repr=False)
class RunModels:
    """A finished run's models, loaded once: the final MLP and its classifier file, each CNN's ensemble."""

    run: Run
    mlp: nn.Module
    classifier: dict
    cnns: dict[str, CnnEnsemble]
    device: torch.device

    def __repr__(self) -> str:  # the models would fill a screen (Gradio prints its handlers' arguments)
        return f"RunModels({str(self.run.output_dir)!r})"

    def describe(self) -> str:
        """One line saying what answers for a new image."""
        if self.run.kind == "single":
            return "single-split run: each CNN is its fine-tuned model; the final MLP is final_classifier.pth"
        return (f"K-fold run: each CNN's probability and maps are the mean over its {len(self.run.folds)} fold models "
                "(a bagged ensemble); the final MLP is the one fitted on every out-of-fold row "
                "(final_classifier.pth). An image of the run's own dataset is scored instead by the models of its "
                "fold, which never saw its patient (column scored_by)")


def load_run_models(run: Run, device: torch.device, *, one_at_a_time: bool = False) -> RunModels:
    """The classifier and every CNN checkpoint of the run, checked (one-line errors naming the file), on `device`.
    one_at_a_time: each fold model is loaded only while it runs (bounded memory on a K-fold run; Run.load_cnns)."""
    mlp, classifier = run.load_classifier()
    return RunModels(run, mlp.to(device), classifier, run.load_cnns(device, classifier, one_at_a_time=one_at_a_time),
                     device)


def classify_images(images: list[Image.Image], models: RunModels, *, methods: tuple[str, ...] = ("gradcam",)) -> dict:
    """Decoded RGB images through the run's models: P(malignant) of each CNN, of the soft vote and of the final MLP
    ('final_mlp'), whose input are the maps of the CAM method it was trained on; 'maps': method -> arch -> raw
    maps (B, h, w) for each of `methods` (from the same passes); 'cams': the Grad-CAM maps."""
    classifier = models.classifier
    cam_method = classifier["cam_method"]
    wanted = tuple(dict.fromkeys(("gradcam", cam_method, *methods)))
    maps = {method: {} for method in wanted}
    probabilities, logits = {}, {}
    for arch, ensemble in models.cnns.items():
        transform = build_transforms(train=False, image_size=ensemble.image_size)
        batch = torch.stack([transform(image) for image in images]).to(models.device)
        arch_maps, probabilities[arch], logits[arch] = ensemble.maps_and_probabilities(
            batch, target=classifier["target_class_rule"], methods=wanted)
        for method in wanted:
            maps[method][arch] = arch_maps[method]
    probabilities["soft_vote"] = np.mean([probabilities[arch] for arch in MODEL_ORDER], axis=0)
    features = classifier_features(classifier, maps[cam_method], logits)
    # In eval mode batch norm uses its running statistics, so each image's P does not depend on its batch.
    probabilities["final_mlp"] = softmax(mlp_logits(models.mlp, features, models.device))[:, 1]
    return {"probabilities": probabilities, "cams": maps["gradcam"],
            "maps": {method: maps[method] for method in methods}}


def predict_batches(image_paths: list[Path], models: RunModels, *, batch_size: int = BATCH_SIZE,
                    methods: tuple[str, ...] = ("gradcam",)) -> Iterator[dict]:
    """For each batch of images: classify_images' answer, the paths, and a copy of each image OVERLAY_SIZE on its
    longer side (aspect ratio kept) for its overlay. Nothing is kept between batches (flat memory)."""
    for start in range(0, len(image_paths), batch_size):
        paths = image_paths[start:start + batch_size]
        images = [load_rgb(path) for path in paths]
        result = classify_images(images, models, methods=methods)
        yield {"paths": paths, **result, "images": [display_copy(image, OVERLAY_SIZE) for image in images]}


def display_copy(image: Image.Image, longer_side: int) -> Image.Image:
    """The image with `longer_side` pixels on its longer side, aspect ratio kept (maps are stretched to it as they
    were stretched to the square the model saw)."""
    scale = longer_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR)

