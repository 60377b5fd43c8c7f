"""bench/gpu_check.py --dry-run: every stage of the GPU check runs on the CPU at tiny sizes, so the script that
a short GPU loan depends on cannot rot unnoticed. One run (a few minutes on 2 CPU cores), several assertions."""

import json
import subprocess
import sys

import pytest

EXPECTED_STAGES = ["environment", "data", "train:densenet121", "train:resnet50", "train:vgg16",
                   "heatmaps-only:densenet121", "further", "predict", "report", "torchrun:densenet121",
                   "train-nocache:densenet121", "measure:densenet121", "checks"]
EXPECTED_CHECKS = ["files_load", "cam_agreement:densenet121", "cam_agreement:resnet50", "cam_agreement:vgg16",
                   "finite", "amp_recorded"]


@pytest.fixture(scope="module")
def dry_run(repo_root, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("gpu_check")
    finished = subprocess.run([sys.executable, str(repo_root / "bench" / "gpu_check.py"), str(out_dir), "--dry-run"],
                              capture_output=True, text=True, timeout=1500)
    summary_path = out_dir / "gpu_check.json"
    assert summary_path.is_file(), f"no summary written:\n{finished.stdout[-3000:]}\n{finished.stderr[-3000:]}"
    return finished, json.loads(summary_path.read_text()), out_dir


def test_dry_run_passes_every_stage_in_order(dry_run):
    finished, summary, _ = dry_run
    statuses = {name: result["status"] for name, result in summary["stages"].items()}
    assert list(statuses) == EXPECTED_STAGES
    assert set(statuses.values()) == {"passed"}, summary["stages"]
    assert summary["failures"] == [] and finished.returncode == 0


def test_dry_run_has_every_check_passed(dry_run):
    _, summary, _ = dry_run
    assert list(summary["checks"]) == EXPECTED_CHECKS
    assert all(check["passed"] for check in summary["checks"].values()), summary["checks"]
    # On the CPU, export and recomputation are both float32 on the same device: they agree far inside the tolerance.
    for arch in ("densenet121", "resnet50", "vgg16"):
        assert summary["checks"][f"cam_agreement:{arch}"]["max_map_error"] < 1e-3
    assert summary["checks"]["files_load"]["loaded"][".pth"] >= 8  # 3 best + 3 states + final MLPs + ...


def test_dry_run_reports_each_figure(dry_run):
    _, summary, out_dir = dry_run
    figures = summary["figures"]
    measured = figures["models"]["densenet121"]
    for key in ("cached_images_per_second", "plain_path_images_per_second", "torchvision_loop_images_per_second",
                "cached_over_loop", "cached_over_plain"):
        assert measured[key] > 0, key
    assert set(measured["gradcam"]["ms_per_batch"]) >= {"plain", "ours", "full"}
    assert measured["data_only"]["cached_images_per_second"] > 0
    assert figures["models"]["vgg16"]["cached_images_per_second"] > 0
    assert figures["torchrun"]["images_per_second"] > 0
    assert figures["data"]["images"] == 48
    markdown = (out_dir / "gpu_check.md").read_text()
    assert "| densenet121 |" in markdown and "0 failure(s)" in markdown
