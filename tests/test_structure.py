"""The structure's promises: predict.py does not load the training loop, and a model is one table entry.

A fourth, tiny architecture is registered in common.models.registry.ARCHS for one test: the shared model-script driver
trains it, exports its heatmaps at the layer the table names, and the reference Grad-CAM (resolved from the same
table) agrees with the exported maps. Nothing else is edited to add it.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from common.cams.heatmap_file import load_heatmaps
from common.cams.methods import grad_cam
from common.cams.reference import full_backward_grad_cam
from common.core.runfiles import checkpoint_path, heatmap_path
from common.models import registry as models
from common.models.checkpoints import load_checkpoint, model_from_checkpoint
from common.training.model_script import run_model_script

TRAINING_MODULES = ("common.training.loop", "common.training.model_script")  # the loop, and the driver that imports it


def test_importing_predict_loads_no_training_module(repo_root):
    code = ("import sys, predict; print(__import__('json').dumps(sorted(m for m in sys.modules "
            "if m.startswith('common.'))))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True,
                                       check=True).stdout)
    assert "common.models.checkpoints" in loaded and "common.training.runtime" in loaded  # what predict.py does need
    assert not set(TRAINING_MODULES) & set(loaded), loaded


class TinyNet(nn.Module):
    """Two convolutions and a linear head: the smallest network with a Grad-CAM layer worth the name."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, images):
        return self.fc(torch.flatten(self.pool(self.features(images)), 1))


TINY = models.ArchSpec(
    name="tinynet", display_name="TinyNet", script="cancer_class_tinynet.py",
    build=lambda weights=None: TinyNet(), imagenet_weights=None, head_attr="fc", target_layer="features",
    body=lambda model, images: model.features(images),
    head=lambda model, activation: model.fc(torch.flatten(model.pool(activation), 1)))


def test_a_fourth_architecture_is_one_table_entry(monkeypatch, demo_dir, tmp_path):
    monkeypatch.setitem(models.ARCHS, "tinynet", TINY)
    run_model_script(arch="tinynet", description="", argv=[
        "--data-dir", str(demo_dir), "--output-dir", str(tmp_path), "--weights", "none", "--image-size", "32",
        "--epochs", "1", "--batch-size", "8", "--workers", "0", "--cache", "none", "--overlays", "1",
        "--val-fraction", "0.25", "--test-fraction", "0.25"])
    checkpoint = load_checkpoint(checkpoint_path(tmp_path, "tinynet"), "tinynet")
    assert checkpoint["target_layer"] == "features" and checkpoint["model"]["fc.weight"].shape == (2, 16)
    heatmaps = load_heatmaps(heatmap_path(tmp_path, "tinynet"))
    assert str(heatmaps["target_layer"]) == "features" and heatmaps["cams"].shape[1:] == (8, 8)  # 32 px / 4
    # The exported maps are the reference Grad-CAM's, whose hook layer came from the same table entry.
    model = model_from_checkpoint(checkpoint).eval()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        activation_of_ours = models.ARCHS["tinynet"].body(model, images)
        logits = model(images)
    reference, reference_logits, activation = full_backward_grad_cam(model, "tinynet", images)
    torch.testing.assert_close(activation, activation_of_ours)
    torch.testing.assert_close(reference_logits, logits)
    cams, _ = grad_cam(model, "tinynet", images)
    np.testing.assert_allclose(cams.numpy(), reference.numpy(), rtol=1e-4,
                               atol=1e-5 * max(float(reference.max()), 1e-12))


def test_imagenet_weights_of_an_entry_without_them_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(models.ARCHS, "tinynet", TINY)
    with pytest.raises(models.PipelineError, match="tinynet has no ImageNet weights"):
        models.build_model("tinynet", "imagenet")
