"""captum-based attributions (common.explain.attribution): LIME, Kernel SHAP and occlusion maps end to end, the patch a
one-patch model looks at found by each, and Integrated Gradients shares of the heatmap MLP's inputs."""

import numpy as np
import pytest
import torch
from torch import nn

from common.fusion.mlp import build_mlp
from common.models.registry import MODEL_ORDER

pytest.importorskip("captum")
from common.explain.attribution import (
    grid_feature_mask,
    heatmap_shares,
    kernel_shap_map,
    lime_map,
    occlusion_map,
    pool_to_grid,
)

SIDE, GRID = 32, 8
PATCH_ROW, PATCH_COLUMN = 2, 5  # the patch the one-patch model reads: rows 8..11, columns 20..23
PATCH = PATCH_ROW * GRID + PATCH_COLUMN


class OnePatchModel(nn.Module):
    """Class 1's score is the mean of one grid patch (all channels); class 0's is its negative."""

    def forward(self, images):
        patch = images[:, :, PATCH_ROW * 4:(PATCH_ROW + 1) * 4, PATCH_COLUMN * 4:(PATCH_COLUMN + 1) * 4]
        score = patch.mean(dim=(1, 2, 3))
        return torch.stack([-score, score], dim=1)


# One intra-op thread (tests/conftest.py): oversubscribed threads slow a small shared CPU several times.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def image():
    return torch.rand(3, SIDE, SIDE, generator=torch.Generator().manual_seed(0)) + 0.5  # > 0: occluding lowers it


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 2))


METHODS = {"lime": lambda *args, **kw: lime_map(*args, samples=64, **kw),
           "kernel_shap": lambda *args, **kw: kernel_shap_map(*args, samples=64, **kw),
           "occlusion": occlusion_map}


@pytest.mark.parametrize("name", list(METHODS))
def test_each_method_runs_end_to_end_with_the_right_shape(name, image):
    model = small_cnn().train()
    pixel_map = METHODS[name](model, image, 1)
    grid_map = METHODS[name](model, image, 1, pooled=True)
    assert pixel_map.shape == (SIDE, SIDE) and grid_map.shape == (GRID, GRID)
    assert torch.isfinite(pixel_map).all() and torch.isfinite(grid_map).all()
    torch.testing.assert_close(grid_map, pool_to_grid(pixel_map, grid=GRID))
    assert model.training  # evaluated in eval mode, its own mode restored


@pytest.mark.parametrize("method", [lime_map, kernel_shap_map, occlusion_map])
def test_one_patch_model_gets_its_patch_as_the_largest_attribution(method, image):
    grid_map = method(OnePatchModel(), image, 1, pooled=True)
    assert int(grid_map.flatten().argmax()) == PATCH
    assert grid_map.flatten()[PATCH] > 0


def test_lime_finds_a_weak_but_clear_object_where_captums_default_surrogate_draws_a_blank_map():
    """A confident CNN's probability moves by hundredths when patches go off. Class 1's probability here rises by
    0.05 at most with the brightness of a 16x16 object (2x2 patches of the 8x8 grid) on a dark 64 px image:
    captum's default LIME surrogate (Lasso, alpha 0.01) zeroes every coefficient (the blank panel of
    predict.py --explain), ours finds the object's four patches as the four largest attributions."""
    from captum.attr import Lime

    image = torch.zeros(3, 64, 64)
    image[:, 16:32, 16:32] = 1.0

    def probabilities(images):
        p_malignant = torch.sigmoid(0.2 * images[:, :, 16:32, 16:32].mean(dim=(1, 2, 3)))
        return torch.stack([1 - p_malignant, p_malignant], dim=1)

    mask = grid_feature_mask(64, 64, grid=GRID)
    default = Lime(probabilities).attribute(image[None], baselines=0.0, target=1, feature_mask=mask, n_samples=200)
    assert default.abs().max() == 0  # the regime the test is about: the default finds nothing
    grid_map = lime_map(probabilities, image, 1, pooled=True).flatten()
    object_patches = {row * GRID + column for row in (2, 3) for column in (2, 3)}
    assert set(grid_map.argsort(descending=True)[:4].tolist()) == object_patches
    assert grid_map.max() > grid_map.min()  # not a constant map


def test_patch_methods_are_seeded_and_leave_the_callers_generator_alone(image):
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = lime_map(OnePatchModel(), image, 1, samples=32, seed=7)
    assert torch.equal(torch.rand(1), expected_next)
    torch.testing.assert_close(first, lime_map(OnePatchModel(), image, 1, samples=32, seed=7), rtol=0, atol=0)


def test_perturbation_saliency_maps_each_image_for_its_class(image):
    from common.explain.figures import perturbation_map, perturbation_saliency
    images, classes = torch.stack([image, image.flip(-1)]), torch.tensor([1, 0])
    maps = perturbation_saliency(OnePatchModel(), "occlusion")(images, classes)
    assert maps.shape[0] == 2
    torch.testing.assert_close(maps[0], perturbation_map(OnePatchModel(), "occlusion", images[0], 1))
    torch.testing.assert_close(maps[1], perturbation_map(OnePatchModel(), "occlusion", images[1], 0))
    assert not torch.equal(maps[0], maps[1])  # the flipped image's patch is elsewhere


def test_grid_feature_mask_covers_the_image_in_patches():
    mask = grid_feature_mask(10, 12, grid=4)[0, 0]
    assert mask.shape == (10, 12) and set(mask.unique().tolist()) == set(range(16))
    assert mask[0, 0] == 0 and mask[-1, -1] == 15
    with pytest.raises(ValueError, match="grid 20"):
        grid_feature_mask(10, 12, grid=20)


S = 4  # map grid of the MLP's features: 3 x 4 x 4 = 48


def test_ig_shares_sum_to_one_per_image():
    torch.manual_seed(0)
    mlp = build_mlp(3 * S * S, [16], dropout=0.1)
    features = torch.randn(5, 3 * S * S)
    shares = heatmap_shares(mlp, features, grid_size=S, steps=16)
    assert list(shares) == list(MODEL_ORDER)
    np.testing.assert_allclose(sum(shares.values()), np.ones(5), atol=1e-9)
    assert all((share >= 0).all() for share in shares.values())
    assert mlp.training  # evaluated in eval mode, its own mode restored


def test_mlp_reading_only_the_first_map_gives_it_the_whole_share():
    torch.manual_seed(0)
    mlp = build_mlp(3 * S * S + 6, [16], dropout=0.1)
    with torch.no_grad():
        mlp[0].weight[:, S * S:] = 0  # the first layer reads channel 0 (MODEL_ORDER[0]'s map) only
    shares = heatmap_shares(mlp, torch.randn(4, 3 * S * S + 6), grid_size=S, target="malignant", steps=16)
    assert list(shares) == [*MODEL_ORDER, "logits"]
    np.testing.assert_allclose(shares[MODEL_ORDER[0]], np.ones(4), atol=1e-12)
    for other in [*MODEL_ORDER[1:], "logits"]:
        np.testing.assert_allclose(shares[other], np.zeros(4), atol=1e-12)


def test_ig_shares_refuse_features_of_another_grid_and_are_nan_at_the_baseline():
    mlp = build_mlp(3 * S * S, [8], dropout=0.0)
    with pytest.raises(ValueError, match="do not fit 3 maps of 5x5"):
        heatmap_shares(mlp, torch.zeros(2, 3 * S * S), grid_size=5)
    shares = heatmap_shares(mlp, torch.zeros(2, 3 * S * S), grid_size=S, steps=4)
    assert all(np.isnan(share).all() for share in shares.values())
