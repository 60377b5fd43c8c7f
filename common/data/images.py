"""Images in, normalised batches on the training device out, by one of two equivalent paths.

* plain (`--cache none`): a DataLoader decodes each PNG and applies the PIL transforms per image, in workers.
* cached (`--cache memory|disk`): every image is decoded and resized once into a uint8 array (RAM, or a memmap
  in the output dir shared by the three model scripts); each batch is then gathered from it, moved to the
  device and augmented there as a whole (`augment_batch`). Decoding a 700x460 PNG costs ~9 ms of CPU; gathering
  a cached 224x224 image costs microseconds, so the GPU, not the PNG decoder, sets the pace.

Both yield `(images (B, 3, S, S) float32 on device, labels (B,) int64 on device, indices (B,) int64)`, where
indices point into the record list, so callers can write results row by row.
"""

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.io import ImageReadMode, decode_png, read_file

from common.core.errors import PipelineError
from common.core.fileio import atomic_path, create_memmap, remove_stale_temporaries, write_json
from common.data.records import Record
from common.data.transforms import augment_batch, build_transforms, normalize_batch, resize_image

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
CACHE_FORMAT_VERSION = 2  # 2: 16-bit images scaled to 8 bits (version 1 decoded 16-bit grey as white)


def load_rgb(path: Path) -> Image.Image:
    """Decode an image as 8-bit RGB, or stop with an error that names the file.

    16 bits per sample are scaled to 8 (value * 255 / 65535, rounded). PIL alone clips 16-bit grey to white and
    keeps only the high byte of 16-bit colour (it has no 16-bit RGB mode): such PNGs are decoded by torchvision."""
    try:
        with Image.open(path) as image:
            if image.format == "PNG" and _png_bit_depth(path) == 16:
                pixels = decode_png(read_file(str(path)), mode=ImageReadMode.RGB)  # (3, H, W) 16-bit values
                return Image.fromarray(_sixteen_to_eight_bits(pixels.permute(1, 2, 0).numpy(), path))
            if image.mode.startswith("I"):  # 16-bit grey (I;16, I;16B, ...) or 32-bit integers (I), e.g. a TIFF
                return Image.fromarray(_sixteen_to_eight_bits(np.asarray(image), path)).convert("RGB")
            if image.mode == "F":  # 32-bit float grey, e.g. a TIFF: PIL would clip 0..1 to 0 or 1 (black)
                return Image.fromarray(_unit_float_to_eight_bits(np.asarray(image), path)).convert("RGB")
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, RuntimeError, Image.DecompressionBombError) as error:
        # DecompressionBombError: over twice PIL's MAX_IMAGE_PIXELS (~179 MP), far above any microscopy tile.
        # RuntimeError: torchvision's PNG decoder.
        raise PipelineError(f"cannot read image {path}: {error}") from None


def _png_bit_depth(path: Path) -> int:
    """Bits per sample, from the IHDR chunk that the PNG standard puts first: byte 24 of the file."""
    with open(path, "rb") as handle:
        header = handle.read(25)
    return header[24] if len(header) == 25 else 8


def _unit_float_to_eight_bits(values: np.ndarray, path: Path) -> np.ndarray:
    """Float pixels in 0..1 (the convention of float images) -> 0..255 uint8, rounded; other ranges are refused
    rather than guessed at (0..255? 0..65535?)."""
    if not np.isfinite(values).all() or values.size and (values.min() < 0 or values.max() > 1):
        raise PipelineError(f"cannot read image {path}: its float pixel values are not all within 0..1; "
                            "save it as 8- or 16-bit integers")
    return np.rint(values.astype(np.float64) * 255).astype(np.uint8)


def _sixteen_to_eight_bits(values: np.ndarray, path: Path) -> np.ndarray:
    """0..65535 -> 0..255 uint8, rounded (v * 255 / 65535 is never exactly halfway)."""
    values = values.astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise PipelineError(f"cannot read image {path}: its integer pixel values exceed 16 bits; "
                            "convert it to an 8- or 16-bit image")
    return ((values * 255 + 32767) // 65535).astype(np.uint8)


class ImageRecords(Dataset):
    """Records -> (transformed image, label, index)."""

    def __init__(self, root: Path, records: list[Record], transform):
        self.root, self.records, self.transform = Path(root), records, transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        record = self.records[index]
        return self.transform(load_rgb(self.root / record.path)), record.label, index


class ResizedUint8(ImageRecords):
    """Records -> (S, S, 3) uint8 array, for filling the cache with DataLoader workers."""

    def __init__(self, root: Path, records: list[Record], image_size: int):
        super().__init__(root, records, transform=None)
        self.image_size = image_size

    def __getitem__(self, index: int):
        image = load_rgb(self.root / self.records[index].path)
        return np.asarray(resize_image(image, self.image_size)), self.records[index].label, index


def _keep_as_list(items: list) -> list:
    return items


def loader_options(*, workers: int, device: torch.device) -> dict:
    """DataLoader settings that keep a GPU fed: parallel decoding, pinned memory, batches prefetched."""
    options = dict(num_workers=workers, pin_memory=device.type == "cuda")
    if workers > 0:
        options.update(persistent_workers=True, prefetch_factor=4)
    return options


class PlainBatches:
    """Per-image PIL decoding and augmentation in DataLoader workers."""

    def __init__(self, root: Path, records: list[Record], *, train: bool, image_size: int, batch_size: int,
                 workers: int, device: torch.device, seed: int, rank: int = 0, world_size: int = 1):
        dataset = ImageRecords(root, records, build_transforms(train=train, image_size=image_size))
        self.sampler = None
        if train and world_size > 1:
            self.sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        elif not train and world_size > 1:
            self.sampler = list(range(rank, len(dataset), world_size))  # a shard each, no padding duplicates
        generator = torch.Generator().manual_seed(seed)
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler,
                                 shuffle=train and self.sampler is None, drop_last=False, generator=generator,
                                 **loader_options(workers=workers, device=device))
        self.device = device

    def __len__(self) -> int:
        return len(self.loader)

    def batches(self, epoch: int = 0) -> Iterator[Batch]:
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(epoch)
        for images, labels, indices in self.loader:
            yield (images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True), indices)


# ------------------------------------------------------------------------------------------ decoded cache


def cache_key(root: Path, records: list[Record], image_size: int) -> str:
    """Changes when any file (path, size, mtime), the record list (split) or the image size changes."""
    digest = hashlib.sha256(f"{CACHE_FORMAT_VERSION}|{image_size}|{root}\n".encode())
    for record in records:
        stat = os.stat(root / record.path)
        digest.update(f"{record.path}|{record.label}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def _decode_into(array: np.ndarray, root: Path, records: list[Record], image_size: int, workers: int) -> None:
    loader = DataLoader(ResizedUint8(root, records, image_size), batch_size=64, num_workers=workers,
                        collate_fn=_keep_as_list)
    for items in loader:
        for pixels, _label, index in items:
            array[index] = pixels


def _open_cache(cache_path: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    """The cache file mapped for reading, or None when it is truncated (a killed copy, a full disk) or its header
    does not describe `shape` uint8 images."""
    try:
        cache = np.load(cache_path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError):  # "mmap length is greater than file size", a damaged header
        return None
    return cache if cache.shape == shape and cache.dtype == np.uint8 else None


def build_cache(root: Path, records: list[Record], *, image_size: int, mode: str, cache_dir: Path | None,
                workers: int) -> np.ndarray:
    """(N, S, S, 3) uint8 images in record order: decoded now (memory) or reused from/written to disk."""
    shape = (len(records), image_size, image_size, 3)
    if mode == "memory":
        array = np.empty(shape, np.uint8)
        _decode_into(array, root, records, image_size, workers)
        return array
    remove_stale_temporaries(cache_dir)
    key = cache_key(root, records, image_size)
    cache_path = Path(cache_dir) / f"images_{image_size}px_{key}.npy"
    if cache_path.exists():
        cache = _open_cache(cache_path, shape)
        if cache is not None:
            print(f"decoded-image cache hit: {cache_path}")
            return cache
        print(f"decoded-image cache {cache_path} is truncated or damaged; rebuilding it")
        cache_path.unlink()  # now, not at the rename: its space may be what the new file needs
    print(f"building decoded-image cache {cache_path} ({np.prod(shape) / 2**30:.2f} GiB)")
    with atomic_path(cache_path, suffix=".npy") as temp_path:
        array = create_memmap(temp_path, dtype=np.uint8, shape=shape)  # a full disk stops here, not with SIGBUS
        _decode_into(array, root, records, image_size, workers)
        array.flush()
        del array
    write_json(Path(cache_dir) / f"images_{image_size}px_{key}.json",
               {"root": str(root), "images": len(records), "image_size": image_size})
    return np.load(cache_path, mmap_mode="r", allow_pickle=False)


class CachedBatches:
    """Batches gathered from the decoded cache and augmented on the device, each image with its own draws."""

    def __init__(self, cache: np.ndarray, records: list[Record], indices: list[int], *, train: bool,
                 batch_size: int, device: torch.device, seed: int, rank: int = 0, world_size: int = 1):
        self.cache, self.train, self.batch_size, self.device, self.seed = cache, train, batch_size, device, seed
        self.indices = np.asarray(indices, dtype=np.int64)  # rows of the cache (= records) this source covers
        self.labels = torch.tensor([records[i].label for i in indices], dtype=torch.int64)
        self.rank, self.world_size = rank, world_size

    def _order(self, epoch: int) -> np.ndarray:
        positions = np.arange(len(self.indices))
        if self.train:
            positions = np.random.default_rng((self.seed, epoch)).permutation(positions)
            # Equal shard sizes on every rank (DDP needs the same number of steps): pad by wrapping around.
            per_rank = -(-len(positions) // self.world_size)
            positions = np.resize(positions, per_rank * self.world_size)
        return positions[self.rank::self.world_size]

    def __len__(self) -> int:
        return -(-len(self._order(0)) // self.batch_size)

    def batches(self, epoch: int = 0) -> Iterator[Batch]:
        generator = torch.Generator(device=self.device).manual_seed(self.seed * 100_003 + epoch * 101 + self.rank)
        pin = self.device.type == "cuda"
        for start in range(0, len(order := self._order(epoch)), self.batch_size):
            positions = order[start:start + self.batch_size]
            if self.train:  # order within a training batch is immaterial: take it sorted, skip the reorder copy
                positions = positions[np.argsort(self.indices[positions], kind="stable")]
            rows = self.indices[positions]
            pixels = self.cache[np.sort(rows)]  # (B, S, S, 3) uint8, sorted: sequential reads from a memmap
            if not self.train:  # back to the caller's order (numpy: a memcpy per row; torch's uint8 indexing is slow)
                pixels = pixels[np.argsort(np.argsort(rows))]
            pixels = torch.from_numpy(np.ascontiguousarray(pixels))
            if pin:
                pixels = pixels.pin_memory()
            pixels = pixels.to(self.device, non_blocking=True)
            images = augment_batch(pixels, generator) if self.train else normalize_batch(pixels)
            labels = self.labels[torch.from_numpy(positions)].to(self.device, non_blocking=True)
            yield images, labels, torch.from_numpy(rows)


def make_batches(root: Path, records: list[Record], indices: list[int], *, train: bool, image_size: int,
                 batch_size: int, workers: int, device: torch.device, seed: int, cache: np.ndarray | None,
                 rank: int = 0, world_size: int = 1):
    """The batch source for one split: cached when a decoded cache is given, else the plain DataLoader path."""
    if cache is not None:
        return CachedBatches(cache, records, indices, train=train, batch_size=batch_size, device=device,
                             seed=seed, rank=rank, world_size=world_size)
    subset = [records[i] for i in indices]
    source = PlainBatches(root, subset, train=train, image_size=image_size, batch_size=batch_size,
                          workers=workers, device=device, seed=seed, rank=rank, world_size=world_size)
    return _ReindexedBatches(source, np.asarray(indices, dtype=np.int64))


class _ReindexedBatches:
    """Maps a subset loader's positions back to indices into the full record list."""

    def __init__(self, source: PlainBatches, indices: np.ndarray):
        self.source, self.indices = source, torch.from_numpy(indices)

    def __len__(self) -> int:
        return len(self.source)

    def batches(self, epoch: int = 0) -> Iterator[Batch]:
        for images, labels, positions in self.source.batches(epoch):
            yield images, labels, self.indices[positions]
