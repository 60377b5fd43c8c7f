"""Grad-CAM++ and LayerCAM (common.cams.methods) against pytorch-grad-cam's raw maps at the same layers, and the
one-pass contract: one body pass and one autograd.grad for all methods, Grad-CAM identical to common.cams.methods.

pytorch-grad-cam (PyPI 'grad-cam') hooks a module's output and backpropagates through the whole model; its raw
map is the one before its min-max scaling, obtained here by replacing its scale function with the identity.
Random-init models at 64 px on the CPU, no downloads (tests/conftest.py: cam_models, cam_images).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import common.cams.methods as cam_methods
from common.cams.methods import CAM_METHODS, cam_maps, cams_and_logits, grad_cam
from common.core.errors import PipelineError

pytorch_grad_cam = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, LayerCAM  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

REFERENCE_CLASSES = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "layercam": LayerCAM}
MALIGNANT = 1


# One intra-op thread (tests/conftest.py): oversubscribed threads slow a small shared CPU several times.
pytestmark = pytest.mark.usefixtures("one_thread")


class DenseNetWithTargetModule(nn.Module):
    """DenseNet-121's forward with its target activation relu(features.norm5) as a module's output, for hooks."""

    def __init__(self, densenet: nn.Module):
        super().__init__()
        self.features, self.target, self.classifier = densenet.features, nn.ReLU(), densenet.classifier

    def forward(self, images):
        activation = self.target(self.features(images))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(activation, (1, 1)), 1))


def hooked_model_and_layer(model, arch):
    if arch == "resnet50":
        return model, model.layer4
    if arch == "vgg16":
        return model, model.features[29]
    wrapper = DenseNetWithTargetModule(model).eval()
    return wrapper, wrapper.target


def reference_raw_maps(model, arch, images, method, target, monkeypatch):
    """pytorch-grad-cam's map after its ReLU and before its min-max scaling (scale function made the identity)."""
    monkeypatch.setattr(pytorch_grad_cam.base_cam, "scale_cam_image", lambda cam, target_size=None: cam)
    hooked, layer = hooked_model_and_layer(model, arch)
    targets = None if target == "predicted" else [ClassifierOutputTarget(MALIGNANT)] * len(images)
    with REFERENCE_CLASSES[method](model=hooked, target_layers=[layer]) as explainer:
        maps = explainer(input_tensor=images, targets=targets)
    model.zero_grad(set_to_none=True)
    return torch.from_numpy(maps)


def close(ours, reference, rtol=1e-4):
    """Equal within `rtol` relative to the map's scale (elementwise relative error is meaningless near 0)."""
    scale = reference.abs().max().item()
    torch.testing.assert_close(ours, reference, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("target", ["predicted", "malignant"])
@pytest.mark.parametrize("arch", ["resnet50", "densenet121", "vgg16"])
def test_maps_equal_pytorch_grad_cam_raw_maps(cam_models, cam_images, arch, target, monkeypatch):
    maps, _ = cams_and_logits(cam_models[arch], arch, cam_images, target=target)
    for method in CAM_METHODS:
        reference = reference_raw_maps(cam_models[arch], arch, cam_images, method, target, monkeypatch)
        assert reference.max() > 0, f"{method}: a trivial all-zero map would prove nothing"
        assert maps[method].dtype == torch.float32 and maps[method].shape == reference.shape
        assert (maps[method] >= 0).all()
        close(maps[method], reference)


@pytest.mark.parametrize("arch", ["resnet50", "vgg16"])
def test_gradcam_is_common_cam_grad_cam_and_logits_are_the_models(cam_models, cam_images, arch):
    maps, logits = cams_and_logits(cam_models[arch], arch, cam_images, target="malignant")
    expected_maps, expected_logits = grad_cam(cam_models[arch], arch, cam_images, target="malignant")
    torch.testing.assert_close(maps["gradcam"], expected_maps, rtol=0, atol=0)
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=0)


def test_all_methods_from_one_body_pass_and_one_gradient(cam_models, cam_images, monkeypatch):
    calls = {"body": 0, "grad": 0}
    real_body, real_grad = cam_methods.body, torch.autograd.grad

    def counting_body(*args, **kwargs):
        calls["body"] += 1
        return real_body(*args, **kwargs)

    def counting_grad(*args, **kwargs):
        calls["grad"] += 1
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(cam_methods, "body", counting_body)
    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    maps, _ = cams_and_logits(cam_models["resnet50"], "resnet50", cam_images)
    assert set(maps) == set(CAM_METHODS) and calls == {"body": 1, "grad": 1}


def test_target_tensor_explains_the_given_classes_and_mode_is_restored(cam_models, cam_images):
    model = cam_models["resnet50"].train()
    try:
        by_tensor, _ = cams_and_logits(model, "resnet50", cam_images, target=torch.tensor([MALIGNANT, MALIGNANT]))
        assert model.training
    finally:
        model.eval()
    by_rule, _ = cams_and_logits(model, "resnet50", cam_images, target="malignant")
    for method in CAM_METHODS:
        torch.testing.assert_close(by_tensor[method], by_rule[method], rtol=0, atol=0)


def test_closed_forms_on_a_tiny_activation():
    """One channel, two positions: A = (1, 3), g = (2, 0) -> known weights for each method."""
    activation = torch.tensor([1.0, 3.0]).view(1, 1, 1, 2)
    gradient = torch.tensor([2.0, 0.0]).view(1, 1, 1, 2)
    maps = cam_maps(activation, gradient)
    torch.testing.assert_close(maps["gradcam"], torch.tensor([[[1.0, 3.0]]]))  # alpha = mean g = 1
    alpha = 2.0 * (4.0 / (8.0 + 4.0 * 8.0 + 1e-6))  # ReLU(g) * g^2 / (2 g^2 + sum(A) g^3 + eps) at the first position
    torch.testing.assert_close(maps["gradcam++"], torch.tensor([[[alpha * 1.0, alpha * 3.0]]]))
    torch.testing.assert_close(maps["layercam"], torch.tensor([[[2.0, 0.0]]]))  # ReLU(g) * A, per position


def test_unknown_method_is_refused():
    with pytest.raises(PipelineError, match="unknown CAM method"):
        cam_maps(torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2), methods=("scorecam",))
