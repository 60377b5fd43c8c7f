"""Shared fixtures: a tiny synthetic BreaKHis tree made once per test session (no real data, no downloads)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "2")

from common.core.fileio import save_torch  # noqa: E402
from common.data.demo import make_demo_dataset  # noqa: E402


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """4 patients per class, 2 magnifications, 3 images each: 48 small PNGs in the official tree."""
    out = tmp_path_factory.mktemp("demo")
    make_demo_dataset(out, patients_per_class=4, images_per_patient=3, magnifications=("100", "400"),
                      width=48, height=32, seed=0)
    return out


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's in-process models: on a small, shared CPU, oversubscribed BLAS threads
    made these tests several times slower. Used as `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# Seeds chosen so that every (arch, target rule) pair has a non-zero map at 64 px (a random VGG-16 head often has none).
CAM_MODEL_SEEDS = {"resnet50": 0, "densenet121": 1, "vgg16": 3}


@pytest.fixture(scope="module")
def cam_models(one_thread):
    """One random-init model per architecture, in eval mode, for a module's Grad-CAM tests (built once per module:
    VGG-16 alone has 134M parameters; a test that changes a model's mode restores it)."""
    import torch

    from common.models.registry import build_model

    built = {}
    for arch, seed in CAM_MODEL_SEEDS.items():
        torch.manual_seed(seed)
        built[arch] = build_model(arch, "none").eval()
    return built


@pytest.fixture(scope="module")
def cam_images():
    """Two random 64 px inputs for cam_models."""
    import torch

    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


# Small settings: random init, 32 px, one epoch; val and test a quarter of the patients each (2 per class).
PIPELINE_ARGS = ["--weights", "none", "--image-size", "32", "--epochs", "1", "--batch-size", "8", "--workers", "0",
                 "--overlays", "1", "--val-fraction", "0.25", "--test-fraction", "0.25"]


FOLDS = 2  # the K of the K-fold test run: 4 patients per class give each fold 2 test patients per class


def run_pipeline(base: Path, demo_dir: Path, name: str, *options: str) -> subprocess.CompletedProcess:
    """run_pipeline.py on the demo tree into base/name, started from `base` with relative paths (they must mean
    the caller's folder); the faithfulness of the explanations on two held-out images, CAMs only."""
    finished = subprocess.run([sys.executable, str(ROOT / "run_pipeline.py"), "--data-dir",
                               os.path.relpath(demo_dir, base), "--output-dir", name, "--faithfulness-images", "2",
                               "--faithfulness-perturbation-images", "0", *options, *PIPELINE_ARGS],
                              cwd=base, capture_output=True, text=True, timeout=1500)
    assert finished.returncode == 0, f"run_pipeline.py failed:\n{finished.stdout[-3000:]}\n{finished.stderr[-3000:]}"
    return finished


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory, demo_dir) -> Path:
    """A single-split run (run_pipeline.py --folds 1: the three model scripts, cancer_class_further.py,
    score_explanations.py, the report) of the demo tree, once."""
    base = tmp_path_factory.getbasetemp()
    run_pipeline(base, demo_dir, "pipeline_run", "--folds", "1")
    return base / "pipeline_run"


@pytest.fixture(scope="session")
def cv_run(tmp_path_factory, demo_dir) -> Path:
    """A K-fold run (run_pipeline.py --folds 2: every fold's three models and table, the cross-validated table and
    final classifier, score_explanations.py on out-of-fold images, the report with its folds' pages), once."""
    base = tmp_path_factory.getbasetemp()
    run_pipeline(base, demo_dir, "cv_run", "--folds", str(FOLDS))
    return base / "cv_run"


@pytest.fixture
def cv_copy(cv_run, tmp_path) -> Path:
    """A copy of the K-fold run to change, made of symbolic links (see run_copy)."""
    return Path(shutil.copytree(cv_run, tmp_path / "cv", copy_function=os.symlink))


@pytest.fixture
def run_copy(pipeline_run, tmp_path) -> Path:
    """A copy of the pipeline run to change, made of symbolic links to its files (its checkpoints take hundreds of
    MB). The scripts write by renaming a new file over the link, so the original stays as it was; a test must do
    the same (save anew, or unlink first), never write into a file in place."""
    return Path(shutil.copytree(pipeline_run, tmp_path / "run", copy_function=os.symlink))


@pytest.fixture
def retrain():
    """A function that replaces a model's checkpoint by another valid one, as a rerun of its model script does
    (a new file renamed over the old one, so a `run_copy` link is replaced, not written through)."""
    def replace(path: Path) -> None:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        save_torch({**checkpoint, "epoch": checkpoint["epoch"] + 1}, path)
    return replace
