"""Datasets as records: what each image is (its label, subtype, patient and magnification).

Three layouts are indexed into the same `Record`s:
  * the official BreaKHis tree (`.../histology_slides/breast/{benign,malignant}/SOB/<type>/<patient>/<mag>X/*.png`),
    with label, subtype, patient and magnification parsed from each file name;
  * a plain `benign/` + `malignant/` folder pair (patient unknown: each image is its own group);
  * a CSV manifest with columns `path,label` and optional `patient,magnification,subtype`.

Indexing only lists directories (os.scandir); images are decoded later, when they are loaded.
"""

import csv
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

from common.core.errors import PipelineError

CLASS_NAMES = ("benign", "malignant")
MAGNIFICATIONS = ("40", "100", "200", "400")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
# The group of an image whose patient is unknown (a plain folder pair, a manifest row without a patient): itself.
NO_PATIENT_PREFIX = "image:"

# SOB_M_DC-14-2523-400-001.png: biopsy procedure SOB, class M, type DC, patient 14-2523, 400X, image 001.
BREAKHIS_NAME = re.compile(
    r"^SOB_(?P<cls>[BM])_(?P<subtype>[A-Z]+)-(?P<patient>\d+-[0-9A-Za-z]+)-(?P<mag>\d+)-(?P<seq>\d+)\.png$"
)


@dataclass(frozen=True)
class Record:
    path: str  # relative to the dataset root, '/'-separated
    label: int  # 0 benign, 1 malignant
    subtype: str  # BreaKHis tumour type (A, F, PT, TA, DC, LC, MC, PC) or '' when unknown
    patient: str  # group that must stay on one side of a split
    magnification: str  # '40', '100', '200', '400', or '' when unknown


@dataclass(frozen=True)
class IndexedDataset:
    root: Path  # image paths in records are relative to this folder
    records: list[Record]
    skipped: list[str]  # files that looked like images but could not be parsed


def parse_breakhis_name(file_name: str) -> Record | None:
    """Label and metadata from an official BreaKHis file name; None when the name does not follow the scheme."""
    match = BREAKHIS_NAME.match(file_name)
    if match is None:
        return None
    return Record(
        path=file_name,
        label=CLASS_NAMES.index("malignant") if match["cls"] == "M" else CLASS_NAMES.index("benign"),
        subtype=match["subtype"],
        patient=match["patient"],
        magnification=str(int(match["mag"])),
    )


def _walk_files(folder: Path) -> list[Path]:
    """Every file below `folder` (os.scandir: one stat call per folder beyond what the listings give), following
    symbolic links. A folder reached a second time (a link back to a folder above it, or two links to one folder)
    is skipped with a warning: its images would otherwise be indexed twice, or the walk would never end."""
    found, pending, visited = [], [folder], set()
    while pending:
        current = pending.pop()
        try:
            identity = current.stat()
            if (identity.st_dev, identity.st_ino) in visited:
                print(f"WARNING: skipped {current}: a symbolic link leads to a folder already indexed")
                continue
            visited.add((identity.st_dev, identity.st_ino))
            with os.scandir(current) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=True):
                        pending.append(Path(entry.path))
                    elif entry.is_file(follow_symlinks=True):
                        found.append(Path(entry.path))
        except OSError as error:
            raise PipelineError(f"--data-dir: cannot list the folder {current} ({error.strerror}); "
                                "fix its permissions or links, or move it out of the dataset") from None
    return found


def _find_histology_slides(data_dir: Path, max_depth: int = 3) -> Path | None:
    """The `histology_slides` folder at or below `data_dir` (users point at any folder above it)."""
    level = [data_dir]
    for _ in range(max_depth + 1):
        for folder in level:
            if folder.name == "histology_slides":
                return folder
        level = [child for folder in level for child in sorted(folder.iterdir()) if child.is_dir()]
    return None


def _index_breakhis(data_dir: Path, slides: Path) -> IndexedDataset:
    records, skipped = [], []
    for file_path in _walk_files(slides):
        if file_path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        parsed = parse_breakhis_name(file_path.name)
        relative = file_path.relative_to(data_dir).as_posix()
        if parsed is None:
            skipped.append(relative)
            continue
        records.append(Record(relative, parsed.label, parsed.subtype, parsed.patient, parsed.magnification))
    return IndexedDataset(data_dir, sorted(records, key=lambda r: r.path), sorted(skipped))


def _index_folders(data_dir: Path) -> IndexedDataset:
    records = []
    for label, class_name in enumerate(CLASS_NAMES):
        for file_path in _walk_files(data_dir / class_name):
            if file_path.suffix.lower() in IMAGE_EXTENSIONS:
                relative = file_path.relative_to(data_dir).as_posix()
                parsed = parse_breakhis_name(file_path.name)
                if parsed is not None and parsed.label == label:
                    # BreaKHis names below the tree (e.g. --data-dir .../breast) still carry the patient.
                    records.append(Record(relative, label, parsed.subtype, parsed.patient, parsed.magnification))
                    continue
                # No patient information: each image is its own group, which is only honest when images are
                # independent. A manifest with a patient column gives real groups.
                records.append(Record(relative, label, "", f"{NO_PATIENT_PREFIX}{relative}", ""))
    return IndexedDataset(data_dir, sorted(records, key=lambda r: r.path), [])


def _parse_label(value: str, where: str) -> int:
    value = value.strip().lower()
    if value in ("0", "1"):
        return int(value)
    if value in CLASS_NAMES:
        return CLASS_NAMES.index(value)
    raise PipelineError(f"{where}: label {value!r} is not one of 0, 1, benign, malignant")


def _index_manifest(manifest: Path) -> IndexedDataset:
    root = manifest.parent
    try:  # -sig: spreadsheets write a byte-order mark
        lines = manifest.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as error:
        raise PipelineError(f"manifest {manifest} is not UTF-8 text ({error.reason})") from None
    reader = csv.DictReader(lines)
    missing = {"path", "label"} - set(reader.fieldnames or [])
    if missing:
        raise PipelineError(f"manifest {manifest} lacks the column(s) {', '.join(sorted(missing))}")
    records = []
    for line_number, row in enumerate(reader, start=2):
        where = f"manifest {manifest} line {line_number}"
        if not row.get("path") or row.get("label") is None:
            raise PipelineError(f"{where}: the row lacks a path or a label")
        image_path = Path(row["path"])
        if not image_path.is_absolute():
            image_path = root / image_path
        if not image_path.is_file():
            raise PipelineError(f"{where}: image {image_path} does not exist")
        relative = os.path.relpath(image_path, root).replace(os.sep, "/")
        magnification = (row.get("magnification") or "").strip().upper().removesuffix("X")
        records.append(Record(
            path=relative,
            label=_parse_label(row["label"], where),
            subtype=(row.get("subtype") or "").strip(),
            patient=(row.get("patient") or "").strip() or f"{NO_PATIENT_PREFIX}{relative}",
            magnification=magnification,
        ))
    return IndexedDataset(root, sorted(records, key=lambda r: r.path), [])


def index_dataset(data_dir: str | os.PathLike) -> IndexedDataset:
    """Index a BreaKHis tree, a benign/ + malignant/ folder pair, or a CSV manifest into sorted records."""
    data_dir = Path(data_dir).expanduser().resolve()
    if not data_dir.exists():
        raise PipelineError(f"--data-dir {data_dir} does not exist")
    if data_dir.is_file():
        if data_dir.suffix.lower() != ".csv":
            raise PipelineError(f"--data-dir {data_dir} is a file but not a .csv manifest")
        dataset = _index_manifest(data_dir)
    elif (slides := _find_histology_slides(data_dir)) is not None:
        dataset = _index_breakhis(data_dir, slides)
    elif all((data_dir / name).is_dir() for name in CLASS_NAMES):
        dataset = _index_folders(data_dir)
    else:
        raise PipelineError(
            f"--data-dir {data_dir} holds no BreaKHis tree (histology_slides/), no benign/ and malignant/ folders, "
            "and is not a .csv manifest"
        )
    if not dataset.records:
        raise PipelineError(f"--data-dir {data_dir}: no images found ({len(dataset.skipped)} unparseable file names)")
    counts = Counter(record.label for record in dataset.records)
    for label, class_name in enumerate(CLASS_NAMES):
        if counts[label] == 0:
            raise PipelineError(f"--data-dir {data_dir}: the class '{class_name}' has no images")
    return dataset


# BreaKHis patient folder IDs are a biopsy (accession) number plus, for some, letters: 14-22549AB, 14-22549CD and
# 14-22549G are three folders of the dataset's 82 "patients" that share one number.
ACCESSION_NUMBER = re.compile(r"^(\d+-\d+)[A-Za-z]*$")


def accession_number(patient: str) -> str:
    """14-22549AB -> 14-22549; an ID of another form is returned unchanged."""
    match = ACCESSION_NUMBER.match(patient)
    return match[1] if match else patient


def group_patients(records: list[Record], patient_id: str) -> list[Record]:
    """patient_id 'folder': BreaKHis's folder IDs as they are; 'accession': folders sharing a biopsy number become
    one patient, so they land on one side of every split (stricter; also how per-patient rates are counted)."""
    if patient_id == "folder":
        return list(records)
    return [replace(record, patient=accession_number(record.patient)) for record in records]


def filter_magnification(records: list[Record], magnification: str) -> list[Record]:
    """Keep one magnification ('40', '100', '200', '400') or all ('all')."""
    if magnification == "all":
        return list(records)
    magnification = magnification.upper().removesuffix("X")
    if magnification not in MAGNIFICATIONS:
        raise PipelineError(f"--magnification {magnification}: choose one of {', '.join(MAGNIFICATIONS)} or all")
    kept = [record for record in records if record.magnification == magnification]
    if not kept:
        present = sorted({record.magnification or "unknown" for record in records})
        raise PipelineError(f"--magnification {magnification}: no images at that magnification (present: {present})")
    return kept


# ----------------------------------------------------------------------------------------------- labels


def majority_labels(groups, labels) -> dict[str, int]:
    """One class per group (patient) for stratification: the majority label, malignant on a tie."""
    votes: dict[str, Counter] = defaultdict(Counter)
    for group, label in zip(groups, labels):
        votes[str(group)][int(label)] += 1
    return {group: int(count[1] >= count[0]) for group, count in votes.items()}


def patient_labels(records: list[Record]) -> dict[str, int]:
    return majority_labels([record.patient for record in records], [record.label for record in records])
