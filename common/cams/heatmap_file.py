"""One evaluation pass over every image of every split: logits and raw CAM maps -> heatmaps_<arch>.npz.

The maps are written as they are computed into a preallocated memmap, so memory stays flat as the dataset
grows; the finished file replaces any earlier one atomically.

heatmaps_<arch>.npz (np.load(path, allow_pickle=False)):
    cams (N, h, w) float32   raw Grad-CAM, after ReLU, before any scaling
    cams_gradcampp, cams_layercam (N, h, w) float32   raw Grad-CAM++ and LayerCAM of the same pass, when asked for
    cam_methods (M,) unicode the CAM methods stored (CAM_ARRAY_KEYS names their arrays);
                             a file without it (written before the variants) holds Grad-CAM only
    logits (N, 2) float32    the same pass's logits
    labels (N,) int64, paths, patients, magnifications, splits (N,) unicode   rows in split-file order
    arch, target_layer, target_class_rule, split_digest (unicode scalars), image_size, format_version (int)
    checkpoint_sha256 (unicode scalar)   SHA-256 of the fine_tuned_<arch>.pth whose model made the maps: readers
                                         refuse maps of another checkpoint than the one beside them
"""

from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch

from common.cams.display import overlay_panel
from common.cams.methods import CAM_METHODS, cams_and_logits, method_tag
from common.core.console import progress
from common.core.errors import PipelineError
from common.core.fileio import atomic_path, create_memmap, save_npz, scratch_file
from common.core.runfiles import distinct_stems
from common.data.images import load_rgb, make_batches
from common.data.partition import Split
from common.data.transforms import resize_image
from common.models.registry import ARCHS, cam_shape

HEATMAP_FORMAT_VERSION = 1
# Each CAM method's array: `cams` is Grad-CAM (the file's original contract, always present), the others
# cams_<tag> (cams_gradcampp, cams_layercam). A file written before the variants holds Grad-CAM only.
CAM_ARRAY_KEYS = {method: "cams" if method == "gradcam" else f"cams_{method_tag(method)}" for method in CAM_METHODS}
HEATMAP_KEYS = ("cams", "logits", "labels", "paths", "patients", "magnifications", "splits", "arch",
                "target_layer", "target_class_rule", "split_digest", "image_size", "format_version",
                "checkpoint_sha256")


def export_heatmaps(model, arch: str, split: Split, out_path: Path, *, image_size: int, batch_size: int,
                    workers: int, device: torch.device, cache, target_rule: str, checkpoint_sha256: str,
                    overlay_dir: Path | None = None, overlay_count: int = 0, cam_methods=CAM_METHODS) -> dict:
    """Write heatmaps_<arch>.npz for every record of `split`, made by `model`, the model of the checkpoint whose
    digest is `checkpoint_sha256` (and `overlay_count` Grad-CAM overlay PNGs of test images
    into `overlay_dir`, from the maps still on disk); return the file's small arrays (logits, labels, ...).
    `cam_methods`: the maps computed in the same pass and stored each in its own array (Grad-CAM always).

    In float32 even where training used mixed precision: the maps are the final MLP's input, and predict.py
    computes them in float32 for new images, so the MLP sees the same kind of input in training and in use."""
    model.to(device)
    batches = make_batches(split.root, split.records, list(range(len(split.records))), train=False,
                           image_size=image_size, batch_size=batch_size, workers=workers, device=device,
                           seed=0, cache=cache)
    cam_height, cam_width = cam_shape(model, arch, image_size)
    logits = np.zeros((len(split.records), 2), np.float32)
    methods = tuple(name for name in CAM_METHODS if name == "gradcam" or name in cam_methods)
    shape = (len(split.records), cam_height, cam_width)
    # A locked scratch file per method beside the heatmap file: a later run removes it if this process is killed.
    with ExitStack() as scratches:
        maps = {}  # method -> (N, h, w) memmap
        for method in methods:
            scratch = scratches.enter_context(scratch_file(out_path.parent, out_path.name,
                                                           suffix=f".{CAM_ARRAY_KEYS[method]}.npy"))
            maps[method] = create_memmap(scratch, dtype=np.float32, shape=shape)
        cams = maps["gradcam"]
        for images, _labels, indices in progress(batches.batches(), total=len(batches), desc=f"{arch} CAMs"):
            batch_maps, batch_logits = cams_and_logits(model, arch, images, target=target_rule, methods=methods)
            for method, batch_cams in batch_maps.items():
                if batch_cams.shape[1:] != shape[1:]:
                    raise PipelineError(f"{arch} maps are {tuple(batch_cams.shape[1:])}, expected {shape[1:]}")
                maps[method][indices.numpy()] = batch_cams.cpu().numpy()
            logits[indices.numpy()] = batch_logits.cpu().numpy()
        for method_maps in maps.values():
            method_maps.flush()
        arrays = {
            "logits": logits,
            "labels": np.array([r.label for r in split.records], np.int64),
            "paths": np.array([r.path for r in split.records], dtype=str),
            "patients": np.array([r.patient for r in split.records], dtype=str),
            "magnifications": np.array([r.magnification for r in split.records], dtype=str),
            "splits": np.array(split.splits, dtype=str),
            "arch": np.array(arch), "target_layer": np.array(ARCHS[arch].target_layer),
            "target_class_rule": np.array(target_rule), "split_digest": np.array(split.digest),
            "image_size": np.array(image_size), "format_version": np.array(HEATMAP_FORMAT_VERSION),
            "checkpoint_sha256": np.array(checkpoint_sha256), "cam_methods": np.array(methods, dtype=str),
        }
        # numpy streams each memmap into the zip in chunks
        save_npz(out_path, **{CAM_ARRAY_KEYS[method]: method_maps for method, method_maps in maps.items()}, **arrays)
        if overlay_dir is not None:
            save_overlays(split, cams, overlay_dir, count=overlay_count, image_size=image_size)
        del cams, maps
    return arrays


def load_heatmaps(path: Path) -> dict[str, np.ndarray]:
    """Read a heatmap file (never unpickling) and check it has this format's keys."""
    if not Path(path).is_file():
        raise PipelineError(f"heatmap file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as content:
            arrays = {key: content[key] for key in content.files}
    except Exception as error:  # a truncated zip, a bad header, a pickled array: all mean "regenerate it"
        raise PipelineError(f"heatmap file {path} is unreadable ({type(error).__name__}: {error}); "
                            "regenerate it with --heatmaps-only") from None
    missing = [key for key in HEATMAP_KEYS if key not in arrays]
    if missing or int(arrays["format_version"]) != HEATMAP_FORMAT_VERSION:
        raise PipelineError(f"heatmap file {path} is from an older format (missing {missing or 'nothing'}, version "
                            f"{arrays.get('format_version', 'none')}); regenerate it with --heatmaps-only")
    return arrays


def save_overlays(split: Split, cams: np.ndarray, out_dir: Path, *, count: int, image_size: int) -> list[Path]:
    """Overlay PNGs for `count` test images, spread evenly over the test split; cams (N, h, w) in record order."""
    test_rows = np.flatnonzero(np.asarray(split.splits) == "test")
    chosen = test_rows[np.linspace(0, len(test_rows) - 1, num=min(count, len(test_rows))).astype(int)] \
        if len(test_rows) and count > 0 else []
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    stems = distinct_stems([split.records[row].path for row in chosen])  # class folders may share file names
    for row, stem in zip(chosen, stems):
        image = resize_image(load_rgb(split.root / split.records[row].path), image_size)
        target = out_dir / f"{stem}.png"
        with atomic_path(target, suffix=".png") as temp_path:
            overlay_panel(image, cams[row]).save(temp_path, format="PNG")
        written.append(target)
    return written


def stored_cam_methods(heatmaps: dict) -> tuple[str, ...]:
    """The CAM methods a loaded heatmap file holds (a file from before the variants: Grad-CAM only)."""
    if "cam_methods" not in heatmaps:
        return ("gradcam",)
    return tuple(str(name) for name in np.atleast_1d(heatmaps["cam_methods"]))


def stored_cams(heatmaps: dict, method: str, path) -> np.ndarray:
    """(N, h, w) raw maps of `method` from a loaded heatmap file, or an error saying how to make them."""
    if method not in stored_cam_methods(heatmaps) or CAM_ARRAY_KEYS[method] not in heatmaps:
        raise PipelineError(f"heatmap file {path} holds no {method} maps (it has "
                            f"{', '.join(stored_cam_methods(heatmaps))}); "
                            f"regenerate it with --heatmaps-only --cam-methods {','.join(CAM_METHODS)}")
    return heatmaps[CAM_ARRAY_KEYS[method]]
