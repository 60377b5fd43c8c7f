"""The synthetic BreaKHis tree: nuclei drawn on their bounding boxes give the pixels the whole-image formula
gives, and parts of one tree can be written by separate calls (parallel processes)."""

import numpy as np
import pytest

from common.data.demo import make_demo_dataset, render_tissue
from common.data.records import index_dataset


def render_tissue_whole_image(rng, *, malignant, width, height, scale, patient_bias):
    """The reference: every nucleus evaluated over the whole image (the formula, without the bounding box)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    stroma = np.array([236, 190, 214], np.float32) + rng.normal(0, 6, 3)
    image = np.broadcast_to(stroma, (height, width, 3)).copy()
    image += rng.normal(0, 7, (height, width, 1))
    area = width * height / 4096.0
    count = rng.poisson(max((9.0 if malignant else 5.0) * (1.0 + patient_bias) * area, 1.0))
    radius_mean = (3.4 if malignant else 2.5) * scale * (1.0 + 0.5 * patient_bias)
    darkness = 0.75 if malignant else 0.55
    nucleus_colour = np.array([70, 40, 120], np.float32)
    for _ in range(count):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry = max(1.0, rng.normal(radius_mean, radius_mean * (0.35 if malignant else 0.2)))
        rx = ry * rng.uniform(0.6, 1.4) if malignant else ry * rng.uniform(0.85, 1.15)
        blob = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
        weight = (np.clip(1.3 - blob, 0, 1) * (darkness + rng.normal(0, 0.08)))[..., None]
        image = image * (1 - weight) + nucleus_colour * weight
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("malignant", [True, False])
@pytest.mark.parametrize("size_and_scale", [(96, 64, 1.3), (48, 32, 0.6), (150, 100, 1.0)])
def test_nuclei_drawn_on_their_boxes_equal_the_whole_image_formula(seed, malignant, size_and_scale):
    width, height, scale = size_and_scale
    options = dict(malignant=malignant, width=width, height=height, scale=scale, patient_bias=0.25)
    windowed = render_tissue(np.random.default_rng(seed), **options)
    reference = render_tissue_whole_image(np.random.default_rng(seed), **options)
    np.testing.assert_array_equal(windowed, reference)


def test_tree_written_in_parts_holds_every_patient_once(tmp_path):
    for first_patient in (0, 2):  # two "workers", disjoint patient ranges, their own seeds
        make_demo_dataset(tmp_path, patients_per_class=2, images_per_patient=2, magnifications=("100",),
                          width=32, height=32, seed=first_patient, first_patient=first_patient)
    whole = make_demo_dataset(tmp_path / "whole", patients_per_class=4, images_per_patient=2,
                              magnifications=("100",), width=32, height=32)
    parts = index_dataset(tmp_path / "BreaKHis_v1")
    reference = index_dataset(whole)
    assert sorted(r.path for r in parts.records) == sorted(r.path for r in reference.records)
    assert len({r.patient for r in parts.records}) == 8
