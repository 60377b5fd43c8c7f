"""A small synthetic dataset laid out exactly like the BreaKHis tree, for demos and tests.

Each image is pink stroma with purple, nucleus-like blobs. Malignant images have more, larger, darker and
more irregular nuclei than benign ones; the class distributions overlap (per-patient and per-image jitter),
so a model has to learn the signal rather than read one pixel. Magnification scales the nuclei.

The tree holds a marker file (SYNTHETIC_MARKER) in its `breast` folder, which lies inside every folder a user can
point --data-dir at (BreaKHis_v1, histology_slides, breast). The model scripts look for it among the folders of
their images when they save a checkpoint and record the answer there ("synthetic_data"), so predict.py and the
report can warn about a run on demo data even after the data is moved or deleted; a folder name ("demo_data")
would not survive a copy, and the file names are the real dataset's.

The command: make_demo_data.py.
"""

from pathlib import Path

import numpy as np
from PIL import Image

BENIGN_TYPES = {"A": "adenosis", "F": "fibroadenoma", "PT": "phyllodes_tumor", "TA": "tubular_adenoma"}
MALIGNANT_TYPES = {"DC": "ductal_carcinoma", "LC": "lobular_carcinoma", "MC": "mucinous_carcinoma",
                   "PC": "papillary_carcinoma"}
MAGNIFICATION_SCALE = {"40": 0.6, "100": 0.8, "200": 1.0, "400": 1.3}
NUCLEUS_REACH = 1.15  # radii; a little over sqrt(1.3), where a nucleus's weight falls to 0
SYNTHETIC_MARKER = "SYNTHETIC_DEMO_DATA.txt"


def breast_folder(out_dir: str | Path) -> Path:
    """The demo tree's `breast` folder under `out_dir` (the folder make_demo_dataset was given)."""
    return Path(out_dir) / "BreaKHis_v1" / "histology_slides" / "breast"


def mark_as_synthetic(out_dir: str | Path) -> None:
    """Write the marker file into the demo tree under `out_dir` (idempotent; also for trees made before it)."""
    (breast_folder(out_dir) / SYNTHETIC_MARKER).write_text(
        "Synthetic images made by common/data/demo.py: not BreaKHis. Models trained on them say nothing about real "
        "tissue.\n", encoding="utf-8")


def is_synthetic_dataset(root: Path, relative_paths: list[str]) -> bool:
    """Whether `root` or any folder between it and one of the images holds the demo marker (a few hundred
    folders on BreaKHis: one stat each, no listing)."""
    folders = {parent for path in relative_paths for parent in Path(path).parents}
    return any((Path(root) / folder / SYNTHETIC_MARKER).is_file() for folder in folders)


def render_tissue(rng: np.random.Generator, *, malignant: bool, width: int, height: int, scale: float,
                  patient_bias: float) -> np.ndarray:
    """One (height, width, 3) uint8 image of stroma with nuclei."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    stroma = np.array([236, 190, 214], np.float32) + rng.normal(0, 6, 3)
    image = np.broadcast_to(stroma, (height, width, 3)).copy()
    image += rng.normal(0, 7, (height, width, 1))  # fibre texture, shared by all channels
    area = width * height / 4096.0
    # Overlapping class distributions: malignant density ~1.8x, radius ~1.35x, darker, with patient jitter.
    density = (9.0 if malignant else 5.0) * (1.0 + patient_bias) * area
    count = rng.poisson(max(density, 1.0))
    radius_mean = (3.4 if malignant else 2.5) * scale * (1.0 + 0.5 * patient_bias)
    darkness = 0.75 if malignant else 0.55
    nucleus_colour = np.array([70, 40, 120], np.float32)
    for _ in range(count):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry = max(1.0, rng.normal(radius_mean, radius_mean * (0.35 if malignant else 0.2)))
        rx = ry * rng.uniform(0.6, 1.4) if malignant else ry * rng.uniform(0.85, 1.15)
        # A nucleus changes only pixels with blob < 1.3, i.e. within sqrt(1.3) = 1.14 radii of its centre: work
        # on that box alone (the same pixels as the whole image gives; 20-40x faster at BreaKHis's 700x460).
        rows = slice(max(0, int(cy - NUCLEUS_REACH * ry)), max(0, int(cy + NUCLEUS_REACH * ry) + 2))
        columns = slice(max(0, int(cx - NUCLEUS_REACH * rx)), max(0, int(cx + NUCLEUS_REACH * rx) + 2))
        blob = ((yy[rows, columns] - cy) / ry) ** 2 + ((xx[rows, columns] - cx) / rx) ** 2
        weight = (np.clip(1.3 - blob, 0, 1) * (darkness + rng.normal(0, 0.08)))[..., None]
        image[rows, columns] = image[rows, columns] * (1 - weight) + nucleus_colour * weight
    return np.clip(image, 0, 255).astype(np.uint8)


def make_demo_dataset(out_dir: str | Path, *, patients_per_class: int = 4, images_per_patient: int = 6,
                      magnifications: tuple[str, ...] = ("40", "100", "200", "400"), width: int = 96,
                      height: int = 64, seed: int = 0, first_patient: int = 0) -> Path:
    """Write the BreaKHis-like tree under `out_dir` and return the `BreaKHis_v1` folder.

    `first_patient` numbers the patients from there on: calls with disjoint patient ranges (and their own seeds)
    can write parts of one tree in parallel processes."""
    rng = np.random.default_rng(seed)
    breast = breast_folder(out_dir)
    for class_name, types in (("benign", BENIGN_TYPES), ("malignant", MALIGNANT_TYPES)):
        code = class_name[0].upper()
        for patient_index in range(first_patient, first_patient + patients_per_class):
            subtype = list(types)[patient_index % len(types)]
            patient = f"14-{10000 + 100 * patient_index + (50 if code == 'M' else 0)}{'AB' if code == 'B' else ''}"
            patient_bias = rng.uniform(-0.25, 0.25)
            for magnification in magnifications:
                folder = (breast / class_name / "SOB" / types[subtype] / f"SOB_{code}_{subtype}_{patient}"
                          / f"{magnification}X")
                folder.mkdir(parents=True, exist_ok=True)
                for sequence in range(1, images_per_patient + 1):
                    pixels = render_tissue(rng, malignant=code == "M", width=width, height=height,
                                           scale=MAGNIFICATION_SCALE[magnification], patient_bias=patient_bias)
                    name = f"SOB_{code}_{subtype}-{patient}-{magnification}-{sequence:03d}.png"
                    Image.fromarray(pixels).save(folder / name)
    mark_as_synthetic(out_dir)
    return breast.parents[1]

