"""The checks of bench/gpu_check.py, run in its own process on the CPU after the stages (never touching CUDA).

Each check returns a dict with `passed` and what it saw; an exception becomes `passed: False` with the error,
and the other checks still run.
"""

import csv
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common.cams.heatmap_file import load_heatmaps
from common.cams.methods import grad_cam
from common.core.runfiles import checkpoint_path, heatmap_path
from common.data.images import load_rgb
from common.data.partition import load_split
from common.data.transforms import build_transforms
from common.models.checkpoints import load_checkpoint, model_from_checkpoint

# Stored (CUDA) vs CPU float32: cuDNN convolutions use TF32 by default (10-bit mantissa, ~5e-4 rounding per
# layer), so after 16-50 layers the maps can differ by ~1e-3 to 1e-2 of their maximum. On the CPU (dry run) the
# two agree to ~1e-6.
CAM_TOLERANCE = 0.02  # max |stored - CPU| / max(CPU map), per image
LOGIT_TOLERANCE = 0.02  # |stored - CPU| <= tolerance * max(1, |CPU logit|)


def run_checks(*, runs_dir: Path, main_run: Path, archs: tuple, expect_device: str, cam_images: int,
               predictions_dir: Path) -> dict:
    checks = {"files_load": checked(lambda: files_load([runs_dir, predictions_dir],
                                                       expected_files(main_run, archs, predictions_dir)))}
    for arch in archs:
        checks[f"cam_agreement:{arch}"] = checked(lambda arch=arch: cam_agreement(main_run, arch, images=cam_images))
    checks["finite"] = checked(lambda: finite_values(runs_dir))
    checks["amp_recorded"] = checked(lambda: amp_recorded(main_run, archs, expect_device))
    for name, result in checks.items():
        print(f"        check {name}: {'passed' if result['passed'] else 'FAILED'}", flush=True)
    return checks


def checked(check) -> dict:
    try:
        return check()
    except Exception as error:  # one check's failure must not hide the others' results
        return {"passed": False, "error": f"{type(error).__name__}: {error}"}


# ------------------------------------------------------------------------------------------- files load


def expected_files(main_run: Path, archs: tuple, predictions_dir: Path) -> list[Path]:
    per_arch = [name.format(arch=arch) for arch in archs for name in (
        "fine_tuned_{arch}.pth", "heatmaps_{arch}.npz", "metrics_{arch}.json", "train_log_{arch}.jsonl")]
    names = ["split.json", "final_classifier.pth", "results.json", "test_predictions.npz", "report/index.html",
             *per_arch]
    return [main_run / name for name in names] + [predictions_dir / "predictions.csv"]


def load_torch(path: Path) -> set[str]:
    """The storage locations recorded in the file ('cpu', 'cuda:0'), read with weights_only=True."""
    locations = set()

    def remember(storage, location):
        locations.add(location)
        return storage  # stays on the CPU: this process never initialises CUDA

    torch.load(path, weights_only=True, mmap=True, map_location=remember)
    return locations


def load_npz(path: Path) -> set[str]:
    with np.load(path, allow_pickle=False) as content:
        for key in content.files:
            content[key]  # noqa: B018  (reading each array is the check)
    return set()


def load_lines(path: Path) -> set[str]:
    for line in path.read_text().splitlines():
        json.loads(line)
    return set()


def load_png(path: Path) -> set[str]:
    with Image.open(path) as image:
        image.verify()
    return set()


LOADERS = {
    ".pth": load_torch,
    ".npz": load_npz,
    ".npy": lambda path: (np.load(path, mmap_mode="r", allow_pickle=False), set())[1],
    ".json": lambda path: (json.loads(path.read_text()), set())[1],
    ".jsonl": load_lines,
    ".csv": lambda path: (list(csv.reader(path.open())), set())[1],
    ".png": load_png,
}


def files_load(folders: list[Path], expected: list[Path]) -> dict:
    """Every result file under `folders` loads safely; the expected ones exist; no tensor was saved from a
    device (the background writer must snapshot to host memory first)."""
    loaded, failures, saved_from_device = Counter(), [], []
    for folder in folders:
        for path in sorted(Path(folder).rglob("*")):
            if not path.is_file() or path.suffix not in LOADERS:
                continue
            try:
                locations = LOADERS[path.suffix](path)
            except Exception as error:  # whatever a truncated or unsafe file raises
                failures.append(f"{path}: {type(error).__name__}: {str(error)[:200]}")
                continue
            loaded[path.suffix] += 1
            if locations - {"cpu"}:
                saved_from_device.append(f"{path}: {sorted(locations)}")
    missing = [str(path) for path in expected if not path.is_file()]
    return {"passed": not (failures or missing or saved_from_device), "loaded": dict(loaded),
            "failures": failures, "missing": missing, "saved_from_device": saved_from_device}


# --------------------------------------------------------------------------------------- maps on the CPU


def cam_agreement(main_run: Path, arch: str, *, images: int) -> dict:
    """A few images' maps and logits recomputed on the CPU in float32 from the checkpoint, via the plain (PIL)
    eval transform, against the stored ones (made on the run's device, through the cache path)."""
    stored = load_heatmaps(heatmap_path(main_run, arch))
    checkpoint = load_checkpoint(checkpoint_path(main_run, arch), arch)
    model = model_from_checkpoint(checkpoint).eval()
    root = load_split(main_run / "split.json").root
    rows = np.unique(np.linspace(0, len(stored["paths"]) - 1, num=images).astype(int))
    transform = build_transforms(train=False, image_size=checkpoint["image_size"])
    batch = torch.stack([transform(load_rgb(root / stored["paths"][row])) for row in rows])
    cams, logits = (tensor.numpy() for tensor in grad_cam(model, arch, batch, target=str(stored["target_class_rule"])))
    stored_cams, stored_logits = stored["cams"][rows], stored["logits"][rows]
    logit_error = float(np.max(np.abs(logits - stored_logits) / np.maximum(1.0, np.abs(logits))))
    same_class = logits.argmax(1) == stored_logits.argmax(1)
    # Where the two classes' logits are within the tolerance, the predicted class (hence the map) may flip.
    near_tie = np.abs(logits[:, 1] - logits[:, 0]) <= 2 * LOGIT_TOLERANCE * np.maximum(1.0, np.abs(logits).max(1))
    scale = np.maximum(np.maximum(cams.max(axis=(1, 2)), stored_cams.max(axis=(1, 2))), 1e-12)
    map_errors = np.abs(cams - stored_cams).max(axis=(1, 2)) / scale
    map_error = float(map_errors[same_class].max()) if same_class.any() else None
    return {"passed": bool(logit_error <= LOGIT_TOLERANCE and (map_error or 0.0) <= CAM_TOLERANCE
                           and np.all(same_class | near_tie) and same_class.any()),
            "images": len(rows), "same_predicted_class": int(same_class.sum()), "max_map_error": map_error,
            "max_logit_error": logit_error, "map_tolerance": CAM_TOLERANCE, "logit_tolerance": LOGIT_TOLERANCE,
            "map_shape": list(stored_cams.shape[1:])}


# ---------------------------------------------------------------------------------------- finite, AMP


def finite_values(runs_dir: Path) -> dict:
    """No NaN/inf in any stored logits or maps, logged loss, or checkpoint's val loss (AMP's failure mode)."""
    checked_values, non_finite = 0, []
    for path in sorted(Path(runs_dir).rglob("heatmaps_*.npz")):
        with np.load(path, allow_pickle=False) as content:
            for key in ("cams", "logits"):
                checked_values += content[key].size
                if not np.isfinite(content[key]).all():
                    non_finite.append(f"{path}: {key}")
    for path in sorted(Path(runs_dir).rglob("train_log_*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            for key in ("train_loss", "val_loss"):
                checked_values += 1
                if not math.isfinite(row[key]):
                    non_finite.append(f"{path}: epoch {row['epoch']} {key} {row[key]}")
    for path in sorted(Path(runs_dir).rglob("fine_tuned_*.pth")):
        loss = load_checkpoint(path)["val_metrics"]["loss"]
        checked_values += 1
        if not math.isfinite(loss):
            non_finite.append(f"{path}: val loss {loss}")
    return {"passed": checked_values > 0 and not non_finite, "values": checked_values, "non_finite": non_finite}


def amp_recorded(main_run: Path, archs: tuple, expect_device: str) -> dict:
    """Each checkpoint's config says AMP was on and names the device the check asked for."""
    configs = {}
    for arch in archs:
        config = load_checkpoint(checkpoint_path(main_run, arch), arch)["config"]
        configs[arch] = {"amp": config.get("amp"), "device": config.get("device")}
    passed = all(config == {"amp": True, "device": expect_device} for config in configs.values())
    return {"passed": passed, "configs": configs}
