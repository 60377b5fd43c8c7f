"""Train and eval transforms, each defined once, in two equivalent forms.

* `build_transforms`: per-image PIL -> tensor pipelines (the plain DataLoader path).
* `augment_batch` / `normalize_batch`: the same augmentation on a whole uint8 batch already resized and on the
  training device (the decoded-image cache path). Every image draws its own flips and angle.

Both resize with PIL's antialiased bilinear filter to a square `image_size` (the whole field of view is kept;
BreaKHis's 700x460 images are squashed, not cropped), so eval tensors agree between the two paths.
"""

import math

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Histology has no canonical orientation: flips in both axes plus a small rotation. Larger angles would fill
# more of each image with the black corners that rotation leaves.
ROTATION_DEGREES = 20.0


def resize_image(image: Image.Image, image_size: int) -> Image.Image:
    return image.resize((image_size, image_size), Image.Resampling.BILINEAR, reducing_gap=None)


class SquareResize:
    """A picklable transform (DataLoader workers may be spawned) that calls `resize_image`."""

    def __init__(self, image_size: int):
        self.image_size = image_size

    def __call__(self, image: Image.Image) -> Image.Image:
        return resize_image(image, self.image_size)


def build_transforms(*, train: bool, image_size: int) -> T.Compose:
    steps = [SquareResize(image_size)]
    if train:
        steps += [
            T.RandomHorizontalFlip(),
            T.RandomVerticalFlip(),
            T.RandomRotation(ROTATION_DEGREES, interpolation=T.InterpolationMode.BILINEAR, fill=0),
        ]
    steps += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(steps)


def imagenet_mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std as (1, 3, 1, 1) tensors on `device`, to broadcast over (B, 3, H, W) batches."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return mean, std


def normalize_batch(images_uint8: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32, ImageNet-normalised, on the same device."""
    mean, std = imagenet_mean_std(images_uint8.device)
    return images_uint8.permute(0, 3, 1, 2).float().div_(255.0).sub_(mean).div_(std)


def affine_sampling_grid(theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """`F.affine_grid(theta, (B, C, height, width), align_corners=False)` for theta (B, 2, 3), by broadcasting.

    Same grid (to float rounding), but an outer sum instead of affine_grid's batched matmul over every pixel:
    on a CPU core that matmul cost more than the bilinear sampling itself (16 ms vs 13 ms for 32 images at 224 px).
    """
    xs = (torch.arange(width, dtype=theta.dtype, device=theta.device) * 2 + 1) / width - 1  # pixel centres
    ys = (torch.arange(height, dtype=theta.dtype, device=theta.device) * 2 + 1) / height - 1
    grid = torch.empty(theta.shape[0], height, width, 2, dtype=theta.dtype, device=theta.device)
    for axis in (0, 1):  # (B, 1, W) + (B, H, 1) + (B, 1, 1) -> (B, H, W)
        coefficients = theta[:, axis, :, None, None]  # (B, 3, 1, 1)
        torch.add(coefficients[:, 0] * xs + coefficients[:, 2], coefficients[:, 1] * ys[:, None], out=grid[..., axis])
    return grid


# On a CPU the batch is resampled a few images at a time, so that each image's float copy is still in cache
# when grid_sample reads it back: a rotation reads the source along slanted lines, and from main memory that
# made one whole-batch call twice as slow (31 vs 15 ms for 32 images at 224 px, one core). ~2 MiB of source
# pixels per chunk is 3 images at 224 px and a whole batch of 32 at 64 px. A GPU gets the batch in one call.
CPU_CHUNK_BYTES = 2 * 2**20


def random_flip_rotate(batch: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """(B, 2, 3) affine matrices, one per image: horizontal and vertical flips (each p = 0.5) and an angle drawn
    uniformly from [-ROTATION_DEGREES, ROTATION_DEGREES]."""
    draws = torch.rand(batch, 3, generator=generator, device=generator.device if generator else "cpu").to(device)
    flip_x = torch.where(draws[:, 0] < 0.5, -1.0, 1.0)
    flip_y = torch.where(draws[:, 1] < 0.5, -1.0, 1.0)
    angle = (draws[:, 2] * 2 - 1) * math.radians(ROTATION_DEGREES)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # Output pixel (x, y) samples input at R(angle) @ diag(flip) @ (x, y), in normalised coordinates.
    # Square images keep the rotation exact in normalised coordinates.
    theta = torch.zeros(batch, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 0, 1] = cos * flip_x, -sin * flip_y
    theta[:, 1, 0], theta[:, 1, 1] = sin * flip_x, cos * flip_y
    return theta


def augment_batch(images_uint8: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random flips and rotation, drawn per image, then normalisation: (B, H, W, 3) uint8 -> (B, 3, H, W) float.

    grid_sample applies each image's own flip-and-rotate matrix; outside the rotated image the fill is black, as
    in the PIL path (fill=0 before normalisation).
    """
    batch, height, width, _ = images_uint8.shape
    device = images_uint8.device
    theta = random_flip_rotate(batch, generator, device)
    # (x / 255 - mean) / std as one multiply-add, x * (1 / (255 std)) - mean / std; the black fill stays x = 0.
    mean, std = imagenet_mean_std(device)
    shift, scale = -mean / std, 1.0 / (255.0 * std)
    chunk = max(1, CPU_CHUNK_BYTES // (3 * height * width * 4)) if device.type == "cpu" else batch
    augmented = torch.empty(batch, 3, height, width, device=device)
    for start in range(0, batch, chunk):
        stop = min(start + chunk, batch)
        # Float in [0, 255], strided channels-last like the uint8 source: a straight pass, not a transpose.
        source = images_uint8[start:stop].permute(0, 3, 1, 2).float()
        grid = affine_sampling_grid(theta[start:stop], height, width)
        sampled = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        torch.addcmul(shift, sampled, scale, out=augmented[start:stop])
    return augmented
