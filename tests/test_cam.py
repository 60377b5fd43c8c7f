"""Grad-CAM (common.cams.methods) against a plain full-autograd reference, and the CAM identity for GAP + linear heads.

The reference is the way common libraries compute Grad-CAM: a forward hook on the target module keeps the
activation, the whole model runs forward with autograd, `loss.backward()` over everything, and the retained
activation gradient gives alpha_k = mean_ij dy_c/dA_k[i, j]; map = ReLU(sum_k alpha_k A_k).
Random-init models, random inputs, CPU only, no downloads (tests/conftest.py: cam_models, cam_images).
"""

import numpy as np
from PIL import Image
import pytest
import torch

from common.cams.display import blend, colorize, is_flat, map_grid_note, map_overlay, scale_for_display
from common.cams.methods import grad_cam
from common.cams.reference import full_backward_grad_cam
from common.data.records import CLASS_NAMES
from common.models.registry import body, cam_shape

ARCH_NAMES = ("resnet50", "densenet121", "vgg16")
MALIGNANT = CLASS_NAMES.index("malignant")
SIDE_AT_64 = {"resnet50": 2, "densenet121": 2, "vgg16": 4}  # input / 32 (VGG-16: / 16)


# One intra-op thread (tests/conftest.py): oversubscribed threads slow a small shared CPU several times.
pytestmark = pytest.mark.usefixtures("one_thread")


def close(ours, reference, rtol=1e-4):
    """Equal within `rtol` relative to the map's scale (elementwise relative error is meaningless near 0)."""
    scale = reference.abs().max().item()
    torch.testing.assert_close(ours, reference, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("target", ["predicted", "malignant"])
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_grad_cam_equals_full_autograd_reference(cam_models, cam_images, arch, target):
    model = cam_models[arch]
    reference_maps, reference_logits, _ = full_backward_grad_cam(model, arch, cam_images, target)
    maps, logits = grad_cam(model, arch, cam_images, target=target)
    assert maps.dtype == torch.float32 and maps.shape == reference_maps.shape
    assert maps.shape == (2, SIDE_AT_64[arch], SIDE_AT_64[arch])
    assert reference_maps.max() > 0, "a trivial all-zero map would prove nothing"
    assert (maps >= 0).all()
    close(maps, reference_maps)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(cam_images), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, reference_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target", ["predicted", "malignant"])
@pytest.mark.parametrize("arch", ["resnet50", "densenet121"])
def test_grad_cam_equals_cam_from_head_weights(cam_models, cam_images, arch, target):
    """GAP + linear head: dy_c/dA_k[i, j] = w_ck / (h*w), so Grad-CAM = ReLU(sum_k w_ck A_k) / (h*w)."""
    model = cam_models[arch]
    maps, logits = grad_cam(model, arch, cam_images, target=target)
    with torch.no_grad():
        activation = body(model, arch, cam_images)  # (B, C, h, w)
    classes = logits.argmax(1) if target == "predicted" else torch.full((len(cam_images),), MALIGNANT)
    head_weight = (model.fc if arch == "resnet50" else model.classifier).weight.detach()  # (2, C)
    height, width = activation.shape[2:]
    cam = torch.relu(torch.einsum("bc,bchw->bhw", head_weight[classes], activation)) / (height * width)
    assert cam.max() > 0
    close(maps, cam)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_body_is_the_hooked_activation(cam_models, cam_images, arch):
    """common.models.registry.body computes exactly the activation the network's own forward passes on."""
    model = cam_models[arch]
    _, _, hooked = full_backward_grad_cam(model, arch, cam_images, "predicted")
    with torch.no_grad():
        torch.testing.assert_close(body(model, arch, cam_images), hooked, rtol=1e-5, atol=1e-6)
    assert (hooked >= 0).all()  # after the ReLU


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_grad_cam_leaves_the_model_as_it_found_it(cam_models, cam_images, arch):
    model = cam_models[arch]
    requires_grad = [parameter.requires_grad for parameter in model.parameters()]
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    model.zero_grad(set_to_none=True)
    model.train()
    try:
        maps_from_train_mode, _ = grad_cam(model, arch, cam_images, target="predicted")
        assert model.training and all(module.training for module in model.modules()), "train mode not restored"
    finally:
        model.eval()
    maps_from_eval_mode, _ = grad_cam(model, arch, cam_images, target="predicted")
    assert not model.training and not any(module.training for module in model.modules())
    # The call itself ran in eval mode (dropout off, BatchNorm running stats used and left untouched).
    torch.testing.assert_close(maps_from_train_mode, maps_from_eval_mode)
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, buffers[name]), f"buffer {name} changed"
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, "forward hook left behind"
        assert not module._backward_hooks and not getattr(module, "_backward_pre_hooks", {}), "backward hook left"
    assert all(parameter.grad is None for parameter in model.parameters()), "a parameter got a .grad"
    assert [parameter.requires_grad for parameter in model.parameters()] == requires_grad
    assert torch.is_grad_enabled()


def test_predicted_and_fixed_target_rules(cam_models, cam_images):
    """'predicted' explains the argmax class, 'malignant'/'benign' a fixed one; never the true label."""
    model = cam_models["resnet50"]
    predicted, logits = grad_cam(model, "resnet50", cam_images, target="predicted")
    per_class = {name: grad_cam(model, "resnet50", cam_images, target=name)[0] for name in CLASS_NAMES}
    for row, winner in enumerate(logits.argmax(1).tolist()):
        torch.testing.assert_close(predicted[row], per_class[CLASS_NAMES[winner]][row])
    assert not torch.allclose(per_class["benign"], per_class["malignant"])
    with pytest.raises(ValueError, match="target-class rule"):
        grad_cam(model, "resnet50", cam_images, target="label")


@pytest.mark.parametrize("arch, side", [("resnet50", 7), ("densenet121", 7), ("vgg16", 14)])
def test_body_shapes_at_224(cam_models, arch, side):
    with torch.no_grad():
        activation = body(cam_models[arch], arch, torch.randn(1, 3, 224, 224))
    channels = {"resnet50": 2048, "densenet121": 1024, "vgg16": 512}[arch]
    assert activation.shape == (1, channels, side, side)
    assert cam_shape(cam_models[arch], arch, 224) == (side, side)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_grad_cam_shapes_at_64(cam_models, cam_images, arch):
    side = SIDE_AT_64[arch]
    maps, logits = grad_cam(cam_models[arch], arch, cam_images)
    assert cam_shape(cam_models[arch], arch, 64) == (side, side)
    assert maps.shape == (2, side, side) and logits.shape == (2, 2)
    assert maps.dtype == torch.float32 and logits.dtype == torch.float32


def test_scale_for_display():
    rng = np.random.default_rng(0)
    cams = rng.random((3, 4, 5)).astype(np.float32) * np.array([1.0, 50.0, 1e-3], np.float32)[:, None, None]
    cams[2] = 0.25  # a constant map
    scaled = scale_for_display(cams)
    assert scaled.dtype == np.float32 and scaled.shape == cams.shape
    for row in (0, 1):
        assert scaled[row].min() == pytest.approx(0.0) and scaled[row].max() == pytest.approx(1.0)
        expected = (cams[row] - cams[row].min()) / (cams[row].max() - cams[row].min())
        np.testing.assert_allclose(scaled[row], expected, rtol=1e-6, atol=1e-6)
    assert np.array_equal(scaled[2], np.zeros((4, 5), np.float32))
    single = scale_for_display(np.array([[0.0, 2.0], [1.0, 4.0]]))  # one (h, w) map works too
    np.testing.assert_allclose(single, [[0.0, 0.5], [0.25, 1.0]])
    assert np.array_equal(scale_for_display(np.zeros((1, 2, 2))), np.zeros((1, 2, 2), np.float32))


def test_a_flat_map_is_labelled_on_its_overlay_and_a_map_with_contrast_is_not():
    """Zero everywhere (the ReLU cut all), constant, or one cell (a 1x1 grid at a small input size): the overlay
    carries the 'flat map' note in its middle (dark text on a white box), its border stays the plain blend."""
    image = Image.new("RGB", (160, 100), (200, 120, 160))
    for flat in (np.zeros((7, 7)), np.full((3, 3), 0.25), np.array([[3.0]])):
        assert is_flat(flat)
        plain = np.asarray(blend(image, colorize(flat, image.size)), dtype=np.int16)
        labelled = np.asarray(map_overlay(image, flat), dtype=np.int16)
        changed = np.any(labelled != plain, axis=2)
        assert changed[40:60, 40:120].mean() > 0.5  # the box and its text in the middle
        assert not changed[:10].any() and not changed[-10:].any()  # the rest is the overlay as it was
        assert (labelled[changed] < 60).all(axis=1).any()  # dark text on the box
    with_contrast = np.eye(7)
    assert not is_flat(with_contrast)
    np.testing.assert_array_equal(np.asarray(map_overlay(image, with_contrast)),
                                  np.asarray(blend(image, colorize(with_contrast, image.size))))
    assert not is_flat(np.array([[1.0, 1.0 + 1e-3]])) and is_flat(np.array([[1.0, 1.0 + 1e-9]]))


def test_map_grid_note_names_each_grid_and_the_size_where_it_reaches_2x2():
    note = map_grid_note({"densenet121": (1, 1), "vgg16": (3, 3)}, {"densenet121": 48, "vgg16": 48},
                         {"densenet121": "DenseNet-121", "vgg16": "VGG-16"})
    assert map_grid_note({"resnet50": (7, 7)}, {"resnet50": 224}, {"resnet50": "ResNet-50"}).startswith(
        "Map grid per model: ResNet-50 7x7 at 224 px (2x2 from 64 px).")
    assert note.startswith("Map grid per model: DenseNet-121 1x1 at 48 px (2x2 from 64 px); VGG-16 3x3 at 48 px "
                           "(2x2 from 32 px).")
