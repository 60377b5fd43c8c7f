"""Datasets as records, and the patient-level split every script shares.

Three layouts are indexed into the same `Record`s:
  * the official BreaKHis tree (`.../histology_slides/breast/{benign,malignant}/SOB/<type>/<patient>/<mag>X/*.png`),
    with label, subtype, patient and magnification parsed from each file name;
  * a plain `benign/` + `malignant/` folder pair (patient unknown: each image is its own group);
  * a CSV manifest with columns `path,label` and optional `patient,magnification,subtype`.

Indexing only lists directories (os.scandir); images are decoded later, when they are loaded.
"""

import csv
import hashlib
import json
import os
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from common.errors import PipelineError
from common.fileio import write_json

CLASS_NAMES = ("benign", "malignant")
MAGNIFICATIONS = ("40", "100", "200", "400")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
# The group of an image whose patient is unknown (a plain folder pair, a manifest row without a patient): itself.
NO_PATIENT_PREFIX = "image:"
SPLIT_NAMES = ("train", "val", "test")
SPLIT_FILE_NAME = "split.json"
SPLIT_FORMAT_VERSION = 1

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


# ----------------------------------------------------------------------------------------------- splits


def majority_labels(groups, labels) -> dict[str, int]:
    """One class per group (patient) for stratification: the majority label, malignant on a tie."""
    votes: dict[str, Counter] = defaultdict(Counter)
    for group, label in zip(groups, labels):
        votes[str(group)][int(label)] += 1
    return {group: int(count[1] >= count[0]) for group, count in votes.items()}


def patient_labels(records: list[Record]) -> dict[str, int]:
    return majority_labels([record.patient for record in records], [record.label for record in records])


def _group_counts(n_groups: int, fractions: dict[str, float]) -> dict[str, int]:
    """How many groups of one class go to each part: rounded, every part with a positive fraction gets one."""
    counts = {name: (max(1, round(n_groups * fraction)) if fraction > 0 else 0) for name, fraction in fractions.items()}
    first = next(iter(fractions))  # the first part (train) absorbs rounding
    counts[first] = n_groups - sum(count for name, count in counts.items() if name != first)
    return counts


def assign_groups(groups: dict[str, int], fractions: dict[str, float], seed: int) -> dict[str, str]:
    """Assign each group (patient -> class) to a named part, stratified by class, shuffled with `seed`."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[str]] = defaultdict(list)
    for group, label in sorted(groups.items()):
        by_class[label].append(group)
    assignment = {}
    for label in sorted(by_class):
        members = list(by_class[label])
        rng.shuffle(members)
        counts = _group_counts(len(members), fractions)
        if min(counts[name] for name, fraction in fractions.items() if fraction > 0) < 1:
            needed = sum(1 for fraction in fractions.values() if fraction > 0)
            raise PipelineError(
                f"too few patients for the requested split: class '{CLASS_NAMES[label]}' has {len(members)} "
                f"patient(s), the split needs at least {needed}; lower --val-fraction/--test-fraction or add data"
            )
        start = 0
        for name, count in counts.items():
            for group in members[start:start + count]:
                assignment[group] = name
            start += count
    return assignment


def split_by_patient(records: list[Record], *, val_fraction: float, test_fraction: float, seed: int) -> list[str]:
    """Split name per record; all images of a patient (every magnification) land on the same side."""
    fractions = {"train": 1.0 - val_fraction - test_fraction, "val": val_fraction, "test": test_fraction}
    assignment = assign_groups(patient_labels(records), fractions, seed)
    return [assignment[record.patient] for record in records]


def split_by_image(records: list[Record], *, val_fraction: float, test_fraction: float, seed: int) -> list[str]:
    """Image-level random split, stratified by class. Leaks patients across splits: only on explicit request."""
    groups = {str(index): record.label for index, record in enumerate(records)}
    fractions = {"train": 1.0 - val_fraction - test_fraction, "val": val_fraction, "test": test_fraction}
    assignment = assign_groups(groups, fractions, seed)
    return [assignment[str(index)] for index in range(len(records))]


def read_fold_file(fold_file: str | os.PathLike) -> dict[str, str]:
    """Official BreaKHis fold file (dsfoldN.txt), lines `SOB_B_A-14-22549AB-100-001.png|100|1|train`."""
    fold_file = Path(fold_file)
    if not fold_file.is_file():
        raise PipelineError(f"--fold-file {fold_file} does not exist")
    assignment = {}
    try:
        lines = fold_file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise PipelineError(f"--fold-file {fold_file} is not UTF-8 text ({error.reason})") from None
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.strip().split("|")
        if len(fields) != 4 or fields[3] not in ("train", "test"):
            raise PipelineError(f"--fold-file {fold_file} line {line_number}: expected 'name|mag|fold|train-or-test'")
        assignment[fields[0]] = fields[3]
    return assignment


def split_by_fold_file(records: list[Record], fold_file: str, *, val_fraction: float, seed: int) -> list[str]:
    """Test images as the fold file says; val patients carved from the fold's train patients. '' = not in fold."""
    fold = read_fold_file(fold_file)
    fold_splits = [fold.get(Path(record.path).name, "") for record in records]
    train_records = [record for record, split in zip(records, fold_splits) if split == "train"]
    if not train_records or "test" not in fold_splits:
        raise PipelineError(f"--fold-file {fold_file} names no train or no test image of this dataset")
    sides_of_patient = defaultdict(set)
    for record, split in zip(records, fold_splits):
        if split:
            sides_of_patient[record.patient].add(split)
    on_both_sides = sorted(patient for patient, sides in sides_of_patient.items() if len(sides) == 2)
    if on_both_sides:
        raise PipelineError(f"--fold-file {fold_file} puts patient(s) {', '.join(on_both_sides[:5])} (as --patient-id "
                            "groups them) on both its train and test sides; a patient-level evaluation needs each "
                            "patient on one side")
    train_fraction = 1.0 - val_fraction
    val_of = assign_groups(patient_labels(train_records), {"train": train_fraction, "val": val_fraction}, seed)
    return [val_of[record.patient] if split == "train" else split for record, split in zip(records, fold_splits)]


# ----------------------------------------------------------------------------------------------- split file


@dataclass(frozen=True)
class Split:
    """The contents of split.json: the dataset's records, one split name each, and how they were made."""

    root: Path
    records: list[Record]
    splits: list[str]
    protocol: dict  # {'method': 'patient'|'image'|'fold', 'seed': .., 'val_fraction': .., ...}
    digest: str  # sha256 of the rows, saved in every checkpoint and heatmap file

    def indices(self, split_name: str) -> list[int]:
        return [index for index, split in enumerate(self.splits) if split == split_name]

    def subset(self, split_name: str) -> list[Record]:
        return [self.records[index] for index in self.indices(split_name)]


def split_digest(records: list[Record], splits: list[str]) -> str:
    digest = hashlib.sha256()
    for record, split in zip(records, splits):
        digest.update(f"{record.path}|{record.label}|{record.patient}|{record.magnification}|{split}\n".encode())
    return digest.hexdigest()


def describe_protocol(protocol: dict) -> str:
    """One line naming the split protocol, printed with every reported number."""
    mag = protocol["magnification"]
    where = "all magnifications" if mag == "all" else f"{mag}X"
    if protocol.get("patient_id") == "accession":
        where += ", patients by accession number"
    if protocol.get("max_images"):
        where += f", subsampled to at most {protocol['max_images']} images (--max-images)"
    if protocol["method"] == "kfold":  # one fold of a K-fold run (common/foldrun.py)
        made_by = (f"the test sides of {protocol['n_folds']} fold files" if protocol.get("fold_method") == "fold_files"
                   else f"patient-level {protocol['n_folds']}-fold cross-validation")
        return (f"{made_by}, fold {protocol['fold']} of {protocol['n_folds']} (test = fold {protocol['fold']}'s "
                f"patients; val carved from the other folds' patients), seed {protocol['seed']}, {where}")
    if protocol["method"] == "fold":
        return f"official fold {Path(protocol['fold_file']).name} (val patients from its train side), {where}"
    kind = "patient-level" if protocol["method"] == "patient" else "IMAGE-level (patients leak across splits)"
    if protocol["method"] == "patient" and protocol.get("groups") == "image":
        kind = "image-level (no patient IDs in the data: each image its own group)"
    elif protocol["method"] == "patient" and protocol.get("groups") == "partly image":
        kind = "patient-level (images without a patient ID each their own group)"
    return (f"{kind} split train/val/test {1 - protocol['val_fraction'] - protocol['test_fraction']:.2f}/"
            f"{protocol['val_fraction']:.2f}/{protocol['test_fraction']:.2f}, seed {protocol['seed']}, {where}")


def save_split(path: Path, split: Split) -> None:
    rows = [dict(asdict(record), split=name) for record, name in zip(split.records, split.splits)]
    write_json(path, {"format_version": SPLIT_FORMAT_VERSION, "data_root": str(split.root),
                      "protocol": split.protocol, "digest": split.digest, "rows": rows})


def load_split(path: Path) -> Split:
    try:
        content = json.loads(Path(path).read_text(encoding="utf-8"))
        rows = content["rows"]
        records = [Record(row["path"], int(row["label"]), row["subtype"], row["patient"], row["magnification"])
                   for row in rows]
        split = Split(Path(content["data_root"]), records, [row["split"] for row in rows],
                      content["protocol"], content["digest"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise PipelineError(f"split file {path} is unreadable ({error}); delete it to make a new split") from None
    if split_digest(split.records, split.splits) != split.digest:
        raise PipelineError(f"split file {path} was edited by hand (its digest does not match); delete it to remake it")
    return split


def make_split(records: list[Record], root: Path, protocol: dict) -> Split:
    method = protocol["method"]
    options = dict(val_fraction=protocol["val_fraction"], seed=protocol["seed"])
    if method == "fold":
        splits = split_by_fold_file(records, protocol["fold_file"], **options)
        records, splits = [r for r, s in zip(records, splits) if s], [s for s in splits if s]
    elif method == "image":
        print("WARNING: image-level split requested: images of one patient land in train and test, so the "
              "reported accuracy overestimates performance on new patients. Use it only to compare with papers "
              "that did the same.")
        splits = split_by_image(records, test_fraction=protocol["test_fraction"], **options)
    else:
        splits = split_by_patient(records, test_fraction=protocol["test_fraction"], **options)
    # Recorded with the split so that every table says when "patient-level" could not be what it seems.
    without_patient = sum(record.patient.startswith(NO_PATIENT_PREFIX) for record in records)
    if without_patient == 0:
        groups = "patient"
    elif without_patient == len(records):
        groups = "image"
    else:
        groups = "partly image"
    if without_patient and method == "patient":
        print(f"WARNING: {without_patient} of {len(records)} images have no patient ID (a plain folder pair, or a "
              "manifest without a patient column): each is its own group, so images of one patient may land on "
              "both sides of the split. Give a manifest with a patient column for a patient-level split.")
    return Split(root, records, splits, {**protocol, "groups": groups}, split_digest(records, splits))


def prepare_split(data_dir: str, output_dir: str | os.PathLike, protocol: dict) -> Split:
    """Index `data_dir` and return the output dir's split, making and saving it when this is the first script.

    A later script must be given the same dataset and split options; anything else stops with an error,
    so all four scripts see the same patients on the same sides.
    """
    dataset = index_dataset(data_dir)
    if dataset.skipped:
        print(f"skipped {len(dataset.skipped)} file(s) whose names do not follow the BreaKHis scheme, "
              f"e.g. {dataset.skipped[0]}")
    records = filter_magnification(dataset.records, protocol["magnification"])
    records = group_patients(records, protocol["patient_id"])
    split_path = Path(output_dir) / SPLIT_FILE_NAME
    if not split_path.exists():
        split = make_split(records, dataset.root, protocol)
        save_split(split_path, split)
        return split
    split = load_split(split_path)
    saved = {"patient_id": "folder", **split.protocol}  # split files older than --patient-id used folder IDs
    changed = [f"{key}: split file {saved.get(key)!r}, this run {value!r}"
               for key, value in protocol.items() if saved.get(key) != value]
    if changed:
        raise PipelineError(f"{split_path} was made with other split options ({'; '.join(changed)}); "
                            "pass the same options or use another --output-dir")
    indexed = {(record.path, record.label, record.patient) for record in records}
    in_split = {(record.path, record.label, record.patient) for record in split.records}
    if not in_split <= indexed or (protocol["method"] != "fold" and in_split != indexed):
        missing, extra = len(in_split - indexed), len(indexed - in_split)
        raise PipelineError(
            f"--data-dir {dataset.root} does not match {split_path} ({missing} image(s) of the split file are "
            f"missing or relabelled, {extra} image(s) are new); use the dataset the split was made for, "
            "or another --output-dir")
    return Split(dataset.root, split.records, split.splits, split.protocol, split.digest)


def summarize_split(split: Split) -> str:
    """Images, patients and classes per split, as a small text table."""
    lines = [f"{'split':<6} {'images':>7} {'patients':>8} {'benign':>7} {'malignant':>9}"]
    for name in SPLIT_NAMES:
        subset = split.subset(name)
        labels = Counter(record.label for record in subset)
        patients = len({record.patient for record in subset})
        lines.append(f"{name:<6} {len(subset):>7} {patients:>8} {labels[0]:>7} {labels[1]:>9}")
    return "\n".join(lines)


def subsample_split(split: Split, max_images: int, seed: int) -> Split:
    """At most `max_images` images for a quick trial: each split and class keeps its share (at least one image)."""
    if max_images >= len(split.records):
        return split
    rng = np.random.default_rng(seed)
    keep = []
    for split_name in SPLIT_NAMES:
        for label in range(len(CLASS_NAMES)):
            members = [i for i in split.indices(split_name) if split.records[i].label == label]
            if members:
                count = max(1, round(max_images * len(members) / len(split.records)))
                keep.extend(rng.choice(members, size=min(count, len(members)), replace=False).tolist())
    keep.sort()  # the split file's order
    records, splits = [split.records[i] for i in keep], [split.splits[i] for i in keep]
    return Split(split.root, records, splits, {**split.protocol, "max_images": max_images}, split.digest)
