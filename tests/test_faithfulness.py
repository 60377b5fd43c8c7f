"""Deletion and insertion AUC (common.explain.faithfulness): closed-form curves, batching, baselines, the combined map.

Hand-made "models" whose probability is a known function of one image region make the curves exactly
computable; a map that is right by construction must beat the random baseline. CPU only, tiny inputs.
"""

import numpy as np
import pytest
import torch
from torch import nn

from common.explain.faithfulness import (
    GAUSSIAN_BASELINE,
    RANDOM_BASELINE,
    Blur,
    blur_for,
    centred_gaussian_saliency,
    deletion_insertion,
    faithfulness_markdown,
    probability_of,
    score_combined,
    score_methods,
)
from common.models.registry import build_model

SIDE = 8
QUARTER = (slice(0, SIDE // 2), slice(0, SIDE // 2))  # top-left 4x4 region: 16 of 64 pixels


# One intra-op thread (tests/conftest.py): oversubscribed threads slow a small shared CPU several times.
pytestmark = pytest.mark.usefixtures("one_thread")


def region_mean(images: torch.Tensor) -> torch.Tensor:
    """P(target) = mean pixel value over the top-left quadrant (all channels): (B, 3, 8, 8) -> (B,)."""
    return images[:, :, QUARTER[0], QUARTER[1]].mean(dim=(1, 2, 3))


def quadrant_first_map() -> torch.Tensor:
    """Full-resolution map ranking the quadrant's 16 pixels above all others (distinct values, no ties)."""
    saliency = torch.arange(SIDE * SIDE, 0, -1, dtype=torch.float32).view(SIDE, SIDE)
    saliency[QUARTER] += 1000
    return saliency


def test_curves_and_aucs_in_closed_form():
    """Image all ones, substrate all zeros, 16 steps of 4 pixels: deleting in the map's order empties the
    quadrant in 4 steps, so P = 1, .75, .5, .25, 0, ... (AUC 1/8); insertion is its mirror (AUC 7/8)."""
    image, blurred = torch.ones(3, SIDE, SIDE), torch.zeros(3, SIDE, SIDE)
    scores = deletion_insertion(region_mean, image, quadrant_first_map(), blurred=blurred, steps=16)
    expected_deletion = np.clip(1 - np.arange(17) / 4, 0, 1)
    np.testing.assert_allclose(scores["fractions"], np.arange(17) / 16, atol=1e-12)
    np.testing.assert_allclose(scores["deletion_curve"], expected_deletion, atol=1e-6)
    np.testing.assert_allclose(scores["insertion_curve"], 1 - expected_deletion, atol=1e-6)
    assert scores["deletion_auc"] == pytest.approx(0.125, abs=1e-6)
    assert scores["insertion_auc"] == pytest.approx(0.875, abs=1e-6)
    # The reversed map leaves the quadrant for last: the mirror image of both areas.
    reversed_scores = deletion_insertion(region_mean, image, -quadrant_first_map(), blurred=blurred, steps=16)
    assert reversed_scores["deletion_auc"] == pytest.approx(0.875, abs=1e-6)
    assert reversed_scores["insertion_auc"] == pytest.approx(0.125, abs=1e-6)


@torch.no_grad()
def step_by_step(predict_proba, image, saliency, blurred, steps):
    """The definition, one forward per step: replace the top-k pixels of the upsampled map, k = round(i HW / steps)."""
    upsampled = torch.nn.functional.interpolate(saliency[None, None], size=image.shape[1:], mode="bilinear",
                                                align_corners=False).flatten()
    order = torch.argsort(upsampled, descending=True, stable=True)
    deletion, insertion = [], []
    for step in range(steps + 1):
        top = order[:round(step * upsampled.numel() / steps)]
        deleted, inserted = image.clone().flatten(1), blurred.clone().flatten(1)
        deleted[:, top], inserted[:, top] = blurred.flatten(1)[:, top], image.flatten(1)[:, top]
        deletion.append(float(predict_proba(deleted.view(1, *image.shape))))
        insertion.append(float(predict_proba(inserted.view(1, *image.shape))))
    return np.array(deletion), np.array(insertion)


@pytest.mark.parametrize("batch_size", [None, 5])
def test_batched_curves_equal_the_step_by_step_loop(batch_size):
    torch.manual_seed(0)
    network = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                            nn.Linear(4, 2)).eval()
    image = torch.randn(3, 20, 20)
    blurred = blur_for(20)(image)
    saliency = torch.rand(5, 5)  # coarse, upsampled to 20x20 as a CAM is
    calls = []

    def predict_proba(images):
        calls.append(len(images))
        return torch.softmax(network(images), dim=1)[:, 1]

    scores = deletion_insertion(predict_proba, image, saliency, blurred=blurred, steps=16, batch_size=batch_size)
    assert calls == ([17, 17] if batch_size is None else [5] * 6 + [4])  # 34 images: never one forward per step
    deletion, insertion = step_by_step(predict_proba, image, saliency, blurred, 16)
    np.testing.assert_allclose(scores["deletion_curve"], deletion, atol=1e-6)
    np.testing.assert_allclose(scores["insertion_curve"], insertion, atol=1e-6)


def local_detail_probabilities(images: torch.Tensor) -> torch.Tensor:
    """A 'model' that only looks at the top-left quadrant's fine detail (mean |x|, which blurring removes)."""
    probability = torch.sigmoid(8 * (images[:, :, :16, :16].abs().mean(dim=(1, 2, 3)) - 0.4))
    return torch.stack([1 - probability, probability], dim=1)


def test_map_right_by_construction_beats_the_random_and_gaussian_baselines():
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    region = torch.zeros(32, 32)
    region[:16, :16] = 1

    def oracle(batch, classes):
        return region.expand(len(batch), 32, 32)

    table = score_methods(local_detail_probabilities, images, {"oracle": oracle}, target=torch.ones(4), steps=16)
    rows = table["methods"]
    assert list(rows) == ["oracle", RANDOM_BASELINE, GAUSSIAN_BASELINE]
    for baseline in (RANDOM_BASELINE, GAUSSIAN_BASELINE):
        assert rows["oracle"]["deletion_auc"] < rows[baseline]["deletion_auc"]
        assert rows["oracle"]["insertion_auc"] > rows[baseline]["insertion_auc"]
    assert len(rows["oracle"]["per_image"]["deletion_auc"]) == 4
    assert table["blur"]["kernel_size"] == 3  # 32 px: sigma 5 * 32 / 224 = 0.71 px, kernel 2 round(0.71) + 1
    markdown = faithfulness_markdown(table)
    assert "| oracle |" in markdown and "sigma 0.71 px" in markdown and "4 image(s)" in markdown


def test_random_baseline_is_seeded():
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    first, second = (score_methods(local_detail_probabilities, images, {}, seed=3) for _ in range(2))
    for scores in ("deletion_auc", "insertion_auc"):  # (the per-image map times are measured, not seeded)
        assert first["methods"][RANDOM_BASELINE]["per_image"][scores] == \
            second["methods"][RANDOM_BASELINE]["per_image"][scores]


def test_blur_is_rises_substrate_at_224_and_scales():
    assert blur_for(224) == Blur(kernel_size=11, sigma=5.0)
    assert blur_for(448) == Blur(kernel_size=21, sigma=10.0)
    gaussian = centred_gaussian_saliency()(torch.zeros(1, 3, 9, 9), torch.zeros(1))[0]
    assert gaussian.argmax() == 4 * 9 + 4  # the centre pixel


def test_probability_of_selects_the_target_column():
    probabilities = probability_of(local_detail_probabilities, 0)(torch.zeros(2, 3, 32, 32))
    torch.testing.assert_close(probabilities, local_detail_probabilities(torch.zeros(2, 3, 32, 32))[:, 0])


def test_combined_map_scored_against_the_soft_vote():
    torch.manual_seed(0)
    models = [("resnet50", build_model("resnet50", "none")), ("resnet50", build_model("resnet50", "none"))]
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    table = score_combined(models, images, methods=("gradcam", "layercam"), steps=4, baselines=False)
    assert list(table["methods"]) == ["combined gradcam", "combined layercam"]
    for row in table["methods"].values():
        assert 0 <= row["deletion_auc"] <= 1 and 0 <= row["insertion_auc"] <= 1
    assert all(model.training for _, model in models)  # evaluated in eval mode, their own mode restored after


def test_the_sample_lets_patients_take_turns_so_the_first_images_span_patients():
    """LIME, Kernel SHAP, occlusion and the figures take the sample's first images: they must not all be one
    patient's (file order groups images by patient)."""
    from common.stages.explanation_scores import sample_rows

    patients = np.repeat([f"p{index}" for index in range(4)], 20)  # held-out rows in file order: by patient
    rows = sample_rows(patients, 50, seed=3)
    assert len(rows) == len(set(rows)) == 50
    assert len(set(patients[rows[:4]])) == 4  # one image of each patient first
    np.testing.assert_array_equal(rows, sample_rows(patients, 50, seed=3))  # a fixed sample
    assert sorted(sample_rows(patients, 1000, seed=0)) == list(range(80))  # all rows when fewer than asked
