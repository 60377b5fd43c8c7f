"""The decoded-image cache and the batched augmentation: cache hit and invalidation, per-image random draws,
eval tensors equal on both paths, a corrupt image named, and the training order of `CachedBatches`.
CPU only, synthetic data (the `demo_dir` fixture: 48 PNGs of 48x32 px), seconds in all.
"""

import errno
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import common.core.fileio as fileio
import common.data.images as dataset_module
import common.data.transforms as transforms_module
from common.core.errors import PipelineError, message_of, run_main
from common.data.images import CachedBatches, build_cache, cache_key, load_rgb, make_batches
from common.data.records import filter_magnification, index_dataset
from common.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    affine_sampling_grid,
    augment_batch,
    random_flip_rotate,
    resize_image,
)

CPU = torch.device("cpu")
SIZE = 32


def copy_demo(demo_dir: Path, tmp_path: Path):
    """A private copy of the demo tree (tests below modify files) and its records."""
    shutil.copytree(demo_dir, tmp_path / "data")
    indexed = index_dataset(tmp_path / "data")
    return indexed.root, indexed.records


def npy_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.npy"))


def collect(batches, epoch: int = 0) -> dict[int, tuple[torch.Tensor, int]]:
    """index -> (image, label) over one pass."""
    found = {}
    for images, labels, indices in batches.batches(epoch):
        for image, label, index in zip(images, labels, indices.tolist()):
            found[index] = (image, int(label))
    return found


def unnormalize(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) normalised -> [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return images * std + mean


# ------------------------------------------------------------------------------------------- disk cache


def test_disk_cache_hit_reuses_the_file_without_decoding(demo_dir, tmp_path, monkeypatch):
    indexed = index_dataset(demo_dir)
    options = dict(image_size=SIZE, mode="disk", cache_dir=tmp_path / "cache", workers=0)
    first = build_cache(indexed.root, indexed.records, **options)
    first_path = Path(first.filename)
    modified = first_path.stat().st_mtime_ns

    def no_decoding(*_args, **_kwargs):
        raise AssertionError("the cache was rebuilt although nothing changed")

    monkeypatch.setattr(dataset_module, "_decode_into", no_decoding)
    second = build_cache(indexed.root, indexed.records, **options)
    assert Path(second.filename) == first_path
    assert first_path.stat().st_mtime_ns == modified
    assert npy_files(tmp_path / "cache") == [first_path]
    assert second.shape == (len(indexed.records), SIZE, SIZE, 3) and second.dtype == np.uint8
    np.testing.assert_array_equal(second, first)


def test_disk_cache_rows_are_the_decoded_resized_images_in_record_order(demo_dir, tmp_path):
    indexed = index_dataset(demo_dir)
    on_disk = build_cache(indexed.root, indexed.records, image_size=SIZE, mode="disk", cache_dir=tmp_path, workers=0)
    in_memory = build_cache(indexed.root, indexed.records, image_size=SIZE, mode="memory", cache_dir=None, workers=0)
    np.testing.assert_array_equal(on_disk, in_memory)
    for row in (0, len(indexed.records) - 1):
        expected = np.asarray(resize_image(load_rgb(indexed.root / indexed.records[row].path), SIZE))
        np.testing.assert_array_equal(in_memory[row], expected)


def _touch_one_file(root, records, tmp_path):
    path = root / records[5].path
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))  # same bytes, newer mtime
    return root, records, SIZE


def _rewrite_one_file(root, records, tmp_path):
    path = root / records[5].path
    Image.new("RGB", (48, 32), (10, 200, 30)).save(path)  # other pixels, other size
    return root, records, SIZE


def _other_image_size(root, records, tmp_path):
    return root, records, SIZE + 8


def _one_record_fewer(root, records, tmp_path):  # a split over other images (e.g. another magnification)
    return root, records[:-1], SIZE


def _one_magnification(root, records, tmp_path):  # --magnification 100: the split covers fewer images
    return root, filter_magnification(records, "100"), SIZE


def _records_reordered(root, records, tmp_path):  # cache rows follow the record order
    return root, records[::-1], SIZE


def _another_dataset_root(root, records, tmp_path):
    shutil.copytree(root, tmp_path / "moved")
    return tmp_path / "moved", records, SIZE


@pytest.mark.parametrize("change", [_touch_one_file, _rewrite_one_file, _other_image_size, _one_record_fewer,
                                    _one_magnification, _records_reordered, _another_dataset_root])
def test_disk_cache_is_rebuilt_when_a_file_the_size_or_the_records_change(demo_dir, tmp_path, change):
    """The key covers every file (path, size, mtime), the image size and the record list the split covers.
    Which split (train/val/test) each image is in is not part of it: the decoded pixels are the same, so the
    three scripts and reruns share one file."""
    root, records = copy_demo(demo_dir, tmp_path)
    cache_dir = tmp_path / "cache"
    old_key = cache_key(root, records, SIZE)
    old = build_cache(root, records, image_size=SIZE, mode="disk", cache_dir=cache_dir, workers=0)
    new_root, new_records, new_size = change(root, records, tmp_path)
    assert cache_key(new_root, new_records, new_size) != old_key
    new = build_cache(new_root, new_records, image_size=new_size, mode="disk", cache_dir=cache_dir, workers=0)
    assert Path(new.filename) != Path(old.filename)
    assert len(npy_files(cache_dir)) == 2
    assert new.shape == (len(new_records), new_size, new_size, 3)
    for row in (0, 5, len(new_records) - 1):  # the new file holds what the files hold now
        expected = np.asarray(resize_image(load_rgb(new_root / new_records[row].path), new_size))
        np.testing.assert_array_equal(new[row], expected)


@pytest.mark.skipif(not hasattr(os, "posix_fallocate"), reason="no space reservation on this system")
def test_a_full_disk_stops_the_cache_build_with_one_line_and_no_partial_file(demo_dir, tmp_path, monkeypatch):
    """Writing through a memory map onto a full disk is a SIGBUS; the space is reserved first, so a full disk is
    the reservation's ENOSPC, reported in one line, and the half-made file is removed."""
    indexed = index_dataset(demo_dir)
    reserved = []

    def full_disk(handle, offset, length):
        reserved.append(length)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full_disk)
    cache_dir = tmp_path / "cache"
    with pytest.raises(PipelineError, match=r"^the disk is full: cannot write .*cache/images_32px_\w+\.npy \(No space "
                                            r"left on device\); .* earlier results are intact; free space and rerun$"):
        build_cache(indexed.root, indexed.records, image_size=SIZE, mode="disk", cache_dir=cache_dir, workers=0)
    assert reserved and reserved[0] >= len(indexed.records) * SIZE * SIZE * 3  # the whole file, header included
    assert os.listdir(cache_dir) == []


def test_a_truncated_cache_file_is_rebuilt(demo_dir, tmp_path, capsys):
    indexed = index_dataset(demo_dir)
    options = dict(image_size=SIZE, mode="disk", cache_dir=tmp_path / "cache", workers=0)
    complete = np.array(build_cache(indexed.root, indexed.records, **options))
    (cache_path,) = npy_files(tmp_path / "cache")
    with open(cache_path, "r+b") as handle:  # a copy cut short: the header promises more than the file holds
        handle.truncate(cache_path.stat().st_size // 2)
    capsys.readouterr()
    rebuilt = build_cache(indexed.root, indexed.records, **options)
    assert capsys.readouterr().out.startswith(f"decoded-image cache {cache_path} is truncated or damaged; "
                                              "rebuilding it\n")
    assert Path(rebuilt.filename) == cache_path and npy_files(tmp_path / "cache") == [cache_path]
    np.testing.assert_array_equal(rebuilt, complete)


@pytest.mark.skipif(fileio.fcntl is None, reason="temporaries are neither locked nor cleaned here")
def test_a_cache_temporary_left_by_a_killed_run_is_removed(demo_dir, tmp_path):
    indexed = index_dataset(demo_dir)
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    left_behind = cache_dir / ".images_32px_0123456789abcdef0123.npy.4242.x1y2z3w4.npy"  # its process is gone
    left_behind.write_bytes(b"\x93NUMPY half a cache")
    then = time.time() - 3600
    os.utime(left_behind, (then, then))
    build_cache(indexed.root, indexed.records, image_size=SIZE, mode="disk", cache_dir=cache_dir, workers=0)
    assert not left_behind.exists()
    assert [path.name.startswith(".") for path in cache_dir.iterdir()] == [False, False]  # the cache and its .json


# --------------------------------------------------------------------------------------- corrupt images


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_corrupt_png_is_named_when_the_cache_is_built(demo_dir, tmp_path, damage, mode):
    root, records = copy_demo(demo_dir, tmp_path)
    bad = root / records[7].path
    content = bad.read_bytes()
    bad.write_bytes(b"this is not a PNG" if damage == "garbage" else content[: len(content) // 2])
    cache_dir = tmp_path / "cache"
    with pytest.raises(PipelineError, match=bad.name):
        build_cache(root, records, image_size=SIZE, mode=mode, cache_dir=cache_dir, workers=0)
    if cache_dir.exists():
        assert os.listdir(cache_dir) == []  # no half-built cache (or temporary file) left behind


def test_oversized_image_is_named_not_a_traceback(demo_dir, tmp_path, monkeypatch):
    root, records = copy_demo(demo_dir, tmp_path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # the demo's 48x32 images now count as decompression bombs
    with pytest.raises(PipelineError, match=f"cannot read image .*{records[0].path.split('/')[-1]}.*exceeds limit"):
        load_rgb(root / records[0].path)


@pytest.mark.parametrize("cache", ["memory", "none"])
def test_corrupt_png_read_in_a_worker_process_gives_one_line(demo_dir, tmp_path, capsys, cache):
    """torch re-raises a worker's error with the worker's traceback as its message; the user sees one line."""
    root, records = copy_demo(demo_dir, tmp_path)
    bad = root / records[3].path
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")

    def read_everything():
        if cache == "memory":
            build_cache(root, records, image_size=SIZE, mode="memory", cache_dir=None, workers=1)
        else:
            batches = make_batches(root, records, list(range(len(records))), train=True, image_size=SIZE,
                                   batch_size=8, workers=1, device=CPU, seed=0, cache=None)
            for _ in batches.batches():
                pass

    with pytest.raises(SystemExit) as stopped:
        run_main(read_everything)
    assert stopped.value.code == 2
    printed = capsys.readouterr().err
    assert printed.startswith(f"error: cannot read image {bad}: ")
    assert printed.count("\n") == 1 and "Traceback" not in printed and "worker" not in printed


def test_message_of_a_worker_error_keeps_the_whole_message():
    wrapped = PipelineError("Caught PipelineError in DataLoader worker process 0.\nOriginal Traceback (most recent "
                            "call last):\n  File \"x.py\", line 1, in <module>\ncommon.core.errors.PipelineError: "
                            "cannot read image a.png: first line\nsecond line")
    assert message_of(wrapped) == "cannot read image a.png: first line\nsecond line"
    assert message_of(PipelineError("plain message")) == "plain message"


# ------------------------------------------------------------------------------------ batch augmentation


def asymmetric_batch(batch: int, size: int) -> torch.Tensor:
    """`batch` copies of one image whose flips and rotations all differ: bright, with a ramp and a spot."""
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    red = 120 + (100 * x / (size - 1))
    green = 120 + (100 * y / (size - 1))
    blue = torch.full((size, size), 160.0)
    blue[: size // 4, : size // 3] = 250.0
    image = torch.stack([red, green, blue], dim=-1).round().to(torch.uint8)  # (S, S, 3), all values >= 120
    return image.expand(batch, size, size, 3).contiguous()


def test_augment_batch_draws_each_image_on_its_own(tmp_path):
    images = asymmetric_batch(16, 48)
    out = augment_batch(images, torch.Generator().manual_seed(0))
    assert out.shape == (16, 3, 48, 48) and out.dtype == torch.float32
    flat = out.flatten(1)
    distances = torch.cdist(flat, flat)
    off_diagonal = distances[~torch.eye(16, dtype=torch.bool)]
    assert off_diagonal.min() > 1e-3  # no two images got the same flips and angle
    again = augment_batch(images, torch.Generator().manual_seed(0))
    torch.testing.assert_close(again, out)  # the draws come from the generator only


def test_augment_batch_flips_are_per_image(monkeypatch):
    """With rotation off, each output is exactly one of the four flips of the input, and the batch mixes them."""
    monkeypatch.setattr(transforms_module, "ROTATION_DEGREES", 0.0)
    images = asymmetric_batch(32, 40)
    out = unnormalize(augment_batch(images, torch.Generator().manual_seed(1)))
    source = images[0].permute(2, 0, 1).float() / 255  # (3, S, S)
    flips = {(fx, fy): torch.flip(source, dims=[d for d, on in ((2, fx), (1, fy)) if on])
             for fx in (False, True) for fy in (False, True)}
    seen = []
    for image in out:
        matches = [key for key, flipped in flips.items() if torch.allclose(image, flipped, atol=1e-4)]
        assert len(matches) == 1
        seen.append(matches[0])
    assert len(set(seen)) == 4  # horizontal and vertical flips drawn independently, per image


def test_augment_batch_rotation_leaves_only_small_black_corners():
    size = 64
    images = asymmetric_batch(32, size)
    out = unnormalize(augment_batch(images, torch.Generator().manual_seed(2)))  # (B, 3, S, S) in [0, 1]
    black = (out < 0.3).all(dim=1)  # the input has no value below 120/255: only the fill is this dark
    fractions = black.flatten(1).float().mean(dim=1)
    # A square rotated by up to 20 degrees leaves 4 corner triangles uncovered: at most 12.4% of the image.
    theta = math.radians(transforms_module.ROTATION_DEGREES)
    corner = 0.5 * (1 - math.tan(theta / 2)) * (1 - (1 - math.sin(theta)) / math.cos(theta))
    assert fractions.max() <= corner + 0.02
    assert fractions.max() > 0.02  # some images are rotated by a visible angle ...
    assert len(set(fractions.tolist())) > 10  # ... and each by its own angle
    y, x = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    inscribed = (x - size / 2) ** 2 + (y - size / 2) ** 2 < (size / 2 - 1) ** 2
    assert not black[:, inscribed].any()  # black only in the corners, never inside the inscribed circle


def test_sampling_grid_equals_affine_grid():
    theta = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(3))
    reference = torch.nn.functional.affine_grid(theta, (5, 3, 12, 12), align_corners=False)
    torch.testing.assert_close(affine_sampling_grid(theta, 12, 12), reference, atol=1e-6, rtol=0)


@pytest.mark.parametrize("images_per_chunk", [1, 3, 100])
def test_augment_batch_equals_whole_batch_reference(monkeypatch, images_per_chunk):
    """Chunked resampling (the CPU path) equals one affine_grid + grid_sample over the whole batch, normalised."""
    size, batch = 24, 8
    monkeypatch.setattr(transforms_module, "CPU_CHUNK_BYTES", images_per_chunk * 3 * size * size * 4)
    images = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(5))
    theta = random_flip_rotate(batch, torch.Generator().manual_seed(6), CPU)
    grid = torch.nn.functional.affine_grid(theta, (batch, 3, size, size), align_corners=False)
    reference = torch.nn.functional.grid_sample(images.permute(0, 3, 1, 2).float() / 255, grid, mode="bilinear",
                                                padding_mode="zeros", align_corners=False)
    reference = (reference - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    got = augment_batch(images, torch.Generator().manual_seed(6))  # the same draws as theta above
    # Grids equal to float rounding, on noise images with steep edges: far below one uint8 step (0.017 here).
    torch.testing.assert_close(got, reference, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------- both paths, same tensors


def test_eval_tensors_equal_between_cached_and_plain_paths(demo_dir):
    indexed = index_dataset(demo_dir)
    records, root = indexed.records, indexed.root
    indices = list(range(1, len(records), 2))  # a split: every other record
    cache = build_cache(root, records, image_size=SIZE, mode="memory", cache_dir=None, workers=0)
    options = dict(train=False, image_size=SIZE, batch_size=7, workers=0, device=CPU, seed=0)
    cached = collect(make_batches(root, records, indices, cache=cache, **options))
    plain = collect(make_batches(root, records, indices, cache=None, **options))
    assert sorted(cached) == sorted(plain) == indices
    for index in indices:
        assert cached[index][1] == plain[index][1] == records[index].label
        assert cached[index][0].shape == (3, SIZE, SIZE)
        torch.testing.assert_close(cached[index][0], plain[index][0], atol=1e-5, rtol=0)


def test_eval_order_is_the_given_order_on_both_paths(demo_dir):
    indexed = index_dataset(demo_dir)
    indices = [9, 3, 30, 0, 17]
    cache = build_cache(indexed.root, indexed.records, image_size=SIZE, mode="memory", cache_dir=None, workers=0)
    for source in (cache, None):
        batches = make_batches(indexed.root, indexed.records, indices, train=False, image_size=SIZE, batch_size=2,
                               workers=0, device=CPU, seed=0, cache=source)
        assert [i for _, _, chunk in batches.batches() for i in chunk.tolist()] == indices
    coded = CachedBatches(row_coded_cache(len(indexed.records)), indexed.records, indices, train=False, batch_size=3,
                          device=CPU, seed=0)
    for images, labels, rows in coded.batches():
        assert rows_seen_in_pixels(images) == rows.tolist()
        assert labels.tolist() == [indexed.records[row].label for row in rows.tolist()]


# ------------------------------------------------------------------------------------ CachedBatches order


def row_coded_cache(count: int) -> np.ndarray:
    """(count, 8, 8, 3) uint8 whose row i is the constant 5 * i, so an image tells which row it came from."""
    return np.broadcast_to((5 * np.arange(count, dtype=np.uint8))[:, None, None, None], (count, 8, 8, 3)).copy()


def rows_seen_in_pixels(images: torch.Tensor) -> list[int]:
    """The row each image came from, read from its centre pixel (rotation fills only corners)."""
    return (unnormalize(images)[:, 0, 4, 4] * 255 / 5).round().int().tolist()


def test_cached_batches_train_order_covers_every_index_and_changes_each_epoch(demo_dir):
    records = index_dataset(demo_dir).records
    cache = row_coded_cache(len(records))
    indices = list(range(0, len(records), 2))  # 24 rows of the cache
    batches = CachedBatches(cache, records, indices, train=True, batch_size=5, device=CPU, seed=3)
    assert len(batches) == math.ceil(len(indices) / 5)
    orders = []
    for epoch in range(3):
        rows, labels = [], []
        for images, batch_labels, batch_rows in batches.batches(epoch):
            assert images.shape[1:] == (3, 8, 8)
            assert rows_seen_in_pixels(images) == batch_rows.tolist()  # image, label and index stay aligned
            rows += batch_rows.tolist()
            labels += batch_labels.tolist()
        assert sorted(rows) == indices  # every index exactly once
        assert labels == [records[row].label for row in rows]
        orders.append(rows)
    assert orders[0] != orders[1] != orders[2]
    assert [row for _, _, chunk in batches.batches(1) for row in chunk.tolist()] == orders[1]  # reproducible


def test_cached_batches_shards_cover_every_index_with_equal_steps(demo_dir):
    records = index_dataset(demo_dir).records
    cache = np.zeros((len(records), 8, 8, 3), np.uint8)
    indices = list(range(len(records) - 1))  # 47 rows: not divisible by 2 ranks
    shards = [CachedBatches(cache, records, indices, train=True, batch_size=4, device=CPU, seed=0, rank=rank,
                            world_size=2) for rank in (0, 1)]
    rows = [[row for _, _, chunk in shard.batches(0) for row in chunk.tolist()] for shard in shards]
    assert len(shards[0]) == len(shards[1]) and len(rows[0]) == len(rows[1])
    assert set(rows[0]) | set(rows[1]) == set(indices)
