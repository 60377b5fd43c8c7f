"""Shared fixtures: a tiny synthetic BreaKHis tree made once per test session (no real data, no downloads)."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "2")

from common.demo import make_demo_dataset  # noqa: E402


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """4 patients per class, 2 magnifications, 3 images each: 48 small PNGs in the official tree."""
    out = tmp_path_factory.mktemp("demo")
    make_demo_dataset(out, patients_per_class=4, images_per_patient=3, magnifications=("100", "400"),
                      width=48, height=32, seed=0)
    return out


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT
