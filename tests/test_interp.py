"""Interpretability in the pipeline (issue #14): the export stores Grad-CAM, Grad-CAM++ and LayerCAM of one pass;
heatmap files written before the variants still load; the faithfulness command on a finished run; the final MLP
on another stored map type; predict.py --explain.

Run-level tests use the session fixture `pipeline_run` (tests/conftest.py: the pipeline on the demo tree, 32 px).
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common.cam_methods import (CAM_ARRAY_KEYS, CAM_METHODS, cams_and_logits, parse_cam_methods, stored_cam_methods,
                                stored_cams)
from common.checkpoints import load_checkpoint, model_from_checkpoint
from common.cli import heatmaps_only_command
from common.data import load_split
from common.dataset import load_rgb
from common.errors import PipelineError
from common.fileio import save_npz
from common.fusion import load_aligned_heatmaps
from common.heatmaps import load_heatmaps
from common.models import MODEL_ORDER
from common.runfiles import checkpoint_path, heatmap_path
from common.transforms import build_transforms

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


# ------------------------------------------------------------------------------------------ the export


@pytest.mark.parametrize("arch", MODEL_ORDER)
def test_export_stores_every_cam_method_equal_to_a_recomputed_pass(pipeline_run, arch):
    heatmaps = load_heatmaps(heatmap_path(pipeline_run, arch))
    assert stored_cam_methods(heatmaps) == CAM_METHODS
    split = load_split(pipeline_run / "split.json")
    checkpoint = load_checkpoint(checkpoint_path(pipeline_run, arch), arch)
    model = model_from_checkpoint(checkpoint)
    rows = [int(np.flatnonzero(heatmaps["splits"] == "test")[0]), int(np.flatnonzero(heatmaps["splits"] == "train")[0])]
    transform = build_transforms(train=False, image_size=checkpoint["image_size"])
    images = torch.stack([transform(load_rgb(split.root / str(heatmaps["paths"][row]))) for row in rows])
    maps, logits = cams_and_logits(model, arch, images, target=str(heatmaps["target_class_rule"]))
    np.testing.assert_allclose(logits.numpy(), heatmaps["logits"][rows], atol=1e-4)
    for method in CAM_METHODS:
        stored = heatmaps[CAM_ARRAY_KEYS[method]][rows]
        assert stored.dtype == np.float32 and (stored >= 0).all()
        np.testing.assert_allclose(maps[method].numpy(), stored, rtol=1e-3, atol=1e-5, err_msg=method)
    assert not np.allclose(heatmaps["cams"], heatmaps["cams_layercam"])  # three maps, not one copied


def _without_variants(path: Path, target: Path) -> None:
    """A copy of a heatmap file as written before the variants: Grad-CAM's `cams` only, no `cam_methods`."""
    arrays = load_heatmaps(path)
    save_npz(target, **{key: value for key, value in arrays.items()
                        if key not in ("cam_methods", "cams_gradcampp", "cams_layercam")})


def test_heatmap_files_without_the_variants_still_load(pipeline_run, tmp_path):
    for arch in MODEL_ORDER:
        _without_variants(heatmap_path(pipeline_run, arch), heatmap_path(tmp_path, arch))
    loaded = load_aligned_heatmaps(tmp_path)
    for arch in MODEL_ORDER:
        assert stored_cam_methods(loaded[arch]) == ("gradcam",)
        np.testing.assert_array_equal(stored_cams(loaded[arch], "gradcam", "x"), loaded[arch]["cams"])
        with pytest.raises(PipelineError, match=r"holds no layercam maps .* --heatmaps-only --cam-methods"):
            stored_cams(loaded[arch], "layercam", heatmap_path(tmp_path, arch))


def test_cam_methods_option():
    assert parse_cam_methods("layercam") == ("gradcam", "layercam")  # Grad-CAM is the file's `cams`: always there
    assert parse_cam_methods("layercam,gradcam++,gradcam") == CAM_METHODS  # the table's order
    with pytest.raises(PipelineError, match="--cam-methods 'gradcam,scorecam': unknown method"):
        parse_cam_methods("gradcam,scorecam")
    config = {"data_dir": "/data", "cam_methods": "gradcam"}
    assert "--cam-methods gradcam --heatmaps-only" in heatmaps_only_command("cancer_class_vgg_16.py", config, "run")
    default = {"data_dir": "/data", "cam_methods": ",".join(CAM_METHODS)}
    assert "--cam-methods" not in heatmaps_only_command("cancer_class_vgg_16.py", default, "run")


def test_model_script_refuses_an_unknown_cam_method(tmp_path):
    finished = run_script("cancer_class_resnet_50.py", "--data-dir", str(tmp_path), "--cam-methods", "scorecam")
    assert finished.returncode == 2 and "--cam-methods 'scorecam': unknown method(s) scorecam" in finished.stderr

