"""The patient-level partitions of a dataset's records: the train/val/test split of a single-split run and the K
folds of a K-fold run, each made once into its file and verified by every later reader.

    split = prepare_split(data_dir, run / SPLIT_FILE, protocol)        # split.json: a split name per record
    folds = prepare_folds(data_dir, run / FOLDS_FILE, protocol)        # folds.json: a fold (1..K) per record
    fold_split = prepare_fold_split(folds, k, run / "fold_<k>" / SPLIT_FILE)   # fold k as a split

One mechanism makes and checks both files (make_once_or_verify): the first script to run makes the partition and
writes it; every later one must pass the same options and the same dataset, or it stops with a one-line error
naming what differs. One digest (partition_digest: SHA-256 of the protocol and of every row with its side) names a
partition; checkpoints and heatmap files record it, and readers refuse files of another partition.

Folds are numbered 1..K everywhere: in folds.json, in fold_<k>/ folder names, in tables and in the viewer. Fold k's
split: its patients test, val carved from the other folds' patients (seeded with seed + k), the rest train.
"""

import hashlib
import json
import os
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from common.core.errors import PipelineError
from common.core.fileio import write_json
from common.data.records import (
    CLASS_NAMES,
    NO_PATIENT_PREFIX,
    Record,
    filter_magnification,
    group_patients,
    index_dataset,
    patient_labels,
)

SPLIT_NAMES = ("train", "val", "test")
PARTITION_FORMAT_VERSION = 2  # 2: one file format and digest for split.json and folds.json, folds numbered 1..K
DEFAULT_FOLDS = 5


# ------------------------------------------------------------------------------------------ making a split


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


@dataclass(frozen=True)
class Split:
    """The contents of split.json: the dataset's records, one split name each, and how they were made."""

    root: Path
    records: list[Record]
    splits: list[str]
    protocol: dict  # {'method': 'patient'|'image'|'fold'|'kfold', 'seed': .., 'val_fraction': .., ...}
    digest: str  # partition_digest, saved in every checkpoint and heatmap file

    def indices(self, split_name: str) -> list[int]:
        return [index for index, split in enumerate(self.splits) if split == split_name]

    def subset(self, split_name: str) -> list[Record]:
        return [self.records[index] for index in self.indices(split_name)]


@dataclass(frozen=True)
class Folds:
    """The contents of folds.json: the dataset's records, each with the fold (1..K) whose test set it belongs to."""

    root: Path
    records: list[Record]
    folds: np.ndarray  # (N,) int64 in 1..K
    protocol: dict  # {'method': 'kfold'|'fold_files', 'n_folds', 'seed', 'val_fraction', 'stratified_by', ...}
    digest: str  # partition_digest

    @property
    def n_folds(self) -> int:
        return int(self.protocol["n_folds"])

    def test_indices(self, fold: int) -> np.ndarray:
        return np.flatnonzero(self.folds == fold)


def partition_digest(records: list[Record], sides, protocol: dict) -> str:
    """SHA-256 of the protocol and of one line per record with its side (a split name or a fold number)."""
    digest = hashlib.sha256(json.dumps(_plain(protocol), sort_keys=True).encode() + b"\n")
    for record, side in zip(records, sides):
        digest.update(f"{record.path}|{record.label}|{record.patient}|{record.magnification}|{record.subtype}|"
                      f"{side}\n".encode())
    return digest.hexdigest()


def _plain(protocol: dict) -> dict:
    """The protocol as it reads back from JSON (paths as strings, tuples as lists), so it compares equal later."""
    return json.loads(json.dumps(protocol, default=str))


def describe_protocol(protocol: dict) -> str:
    """One line naming the split protocol, printed with every reported number."""
    mag = protocol["magnification"]
    where = "all magnifications" if mag == "all" else f"{mag}X"
    if protocol.get("patient_id") == "accession":
        where += ", patients by accession number"
    if protocol.get("max_images"):
        where += f", subsampled to at most {protocol['max_images']} images (--max-images)"
    if protocol["method"] == "kfold":  # one fold of a K-fold run (common/training/model_script.py)
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
    protocol = _plain({**protocol, "groups": groups})
    return Split(root, records, splits, protocol, partition_digest(records, splits, protocol))


def make_folds(records: list[Record], root: Path, protocol: dict) -> Folds:
    """Folds as `protocol` asks: {'method': 'kfold', 'n_folds', 'seed', 'val_fraction', ...} or
    {'method': 'fold_files', 'fold_files': [...], 'seed', 'val_fraction', ...}; other keys are kept as given."""
    if protocol["method"] == "kfold":
        folds, made = make_kfold(records, n_folds=protocol["n_folds"], seed=protocol["seed"])
    elif protocol["method"] == "fold_files":
        records, folds, made = folds_from_fold_files(records, protocol["fold_files"])
    else:
        raise PipelineError(f"unknown fold method {protocol['method']!r}: use 'kfold' or 'fold_files'")
    protocol = _plain({**protocol, "n_folds": int(folds.max()), **made})
    return Folds(root, list(records), folds, protocol, partition_digest(records, folds, protocol))


# ------------------------------------------------------------------------------------------ making folds


def _patient_strata(records: list[Record]) -> tuple[dict[str, tuple], str]:
    """Patient -> stratum: (label, subtype) when every patient has one known subtype, else (label,).

    Subtype strata never cost class balance: patients are dealt round-robin across folds in one pass over the
    strata of a class (see _deal_round_robin), so each class and each subtype is spread over the folds as evenly as
    its count allows (fold counts differ by at most one), whatever a stratum's size. A subtype with fewer patients
    than folds simply lands in that many different folds. Subtypes are only dropped when they are unknown (a plain
    folder pair, a manifest without that column) or ambiguous (a patient with images of two subtypes)."""
    labels = patient_labels(records)
    subtypes: dict[str, set[str]] = defaultdict(set)
    for record in records:
        subtypes[record.patient].add(record.subtype)
    if all(len(found) == 1 and "" not in found for found in subtypes.values()):
        return {patient: (label, next(iter(subtypes[patient]))) for patient, label in labels.items()}, "label+subtype"
    return {patient: (label,) for patient, label in labels.items()}, "label"


def _deal_round_robin(strata: dict[str, tuple], n_folds: int, seed: int) -> dict[str, int]:
    """Patient -> fold: strata in sorted order (class first), patients shuffled within each, then dealt to folds
    1, 2, ..., K, 1, ... in ONE pass that does not restart per stratum, so the folds' totals, each class and each
    stratum differ between folds by at most one patient. The fold numbers are then permuted with the seed, so
    fold 1 is not always the one that gets the remainders first."""
    rng = np.random.default_rng(seed)
    members: dict[tuple, list[str]] = defaultdict(list)
    for patient in sorted(strata):
        members[strata[patient]].append(patient)
    fold_names = rng.permutation(n_folds) + 1  # folds 1..K
    fold_of, position = {}, 0
    for stratum in sorted(members):
        patients = list(members[stratum])
        rng.shuffle(patients)
        for patient in patients:
            fold_of[patient] = int(fold_names[position % n_folds])
            position += 1
    return fold_of


def make_kfold(records: list[Record], *, n_folds: int = DEFAULT_FOLDS, seed: int = 0) -> tuple[np.ndarray, dict]:
    """(N,) fold 1..K of each record: K folds of patients, stratified by class (and tumour subtype where known);
    every fold has both classes. Also returns how they were stratified."""
    if n_folds < 2:
        raise PipelineError(f"--folds {n_folds}: K-fold evaluation needs at least 2 folds (--folds 1 is one split)")
    patients_per_class = Counter(patient_labels(records).values())
    for label, class_name in enumerate(CLASS_NAMES):
        if patients_per_class[label] < n_folds:
            raise PipelineError(f"--folds {n_folds}: class '{class_name}' has {patients_per_class[label]} patient(s), "
                                "fewer than the folds, so some test fold would lack it; lower --folds or add data")
    strata, stratified_by = _patient_strata(records)
    fold_of = _deal_round_robin(strata, n_folds, seed)
    return np.array([fold_of[record.patient] for record in records], dtype=np.int64), {"stratified_by": stratified_by}


def _disjoint_test_sides(fold_files: list[Path], sides: list[dict[str, str]]) -> list[set[str]]:
    """Each file's test names; refused unless the test sides are disjoint and together cover every named image."""
    tests = [{name for name, side in assignment.items() if side == "test"} for assignment in sides]
    for first in range(len(tests)):
        for second in range(first + 1, len(tests)):
            shared = sorted(tests[first] & tests[second])
            if shared:
                raise PipelineError(
                    f"fold files {fold_files[first]} and {fold_files[second]} both put {len(shared)} image(s) on "
                    f"their test side (e.g. {shared[0]}); K-fold evaluation needs disjoint test sides that together "
                    "cover the images (the official BreaKHis folds are independent train/test splits, not a "
                    "partition): use --folds K (folds made by patient) instead")
    named = set().union(*(assignment.keys() for assignment in sides))
    uncovered = sorted(named - set().union(*tests))
    if uncovered:
        raise PipelineError(f"fold files {', '.join(str(path) for path in fold_files)}: {len(uncovered)} image(s) "
                            f"are on no file's test side (e.g. {uncovered[0]}); K-fold evaluation needs test sides "
                            "that together cover the images")
    return tests


def folds_from_fold_files(records: list[Record], fold_files: list) -> tuple[list[Record], np.ndarray, dict]:
    """Fold k = the test side of the k-th fold file (dsfold1..5.txt). Records the files do not name are left out:
    returns the kept records, their folds (1..K) and what the protocol records of it."""
    fold_files = [Path(path) for path in fold_files]
    if len(fold_files) < 2:
        raise PipelineError("K-fold evaluation from fold files needs at least 2 fold files")
    tests = _disjoint_test_sides(fold_files, [read_fold_file(path) for path in fold_files])
    fold_of_name = {name: fold for fold, names in enumerate(tests, start=1) for name in names}
    kept = [record for record in records if Path(record.path).name in fold_of_name]
    folds = np.array([fold_of_name[Path(record.path).name] for record in kept], dtype=np.int64)
    for fold, path in enumerate(fold_files, start=1):
        if not np.any(folds == fold):
            raise PipelineError(f"fold file {path} names no test image of this dataset")
    folds_of_patient: dict[str, set[int]] = defaultdict(set)
    for record, fold in zip(kept, folds):
        folds_of_patient[record.patient].add(int(fold))
    split_patients = sorted(patient for patient, found in folds_of_patient.items() if len(found) > 1)
    if split_patients:
        raise PipelineError(f"fold files put patient(s) {', '.join(split_patients[:5])} on the test sides of two "
                            "files; a patient-level evaluation needs each patient in one fold")
    return kept, folds, {"left_out": len(records) - len(kept), "stratified_by": "the fold files"}


def fold_sides(folds: Folds, fold: int) -> list[str]:
    """Split name of every record for fold `fold` (1..K): its patients 'test'; of the other folds' patients,
    val_fraction per class (seeded with seed + fold) 'val', the rest 'train'."""
    if not 1 <= fold <= folds.n_folds:
        raise PipelineError(f"fold {fold} does not exist: the folds are numbered 1 to {folds.n_folds}")
    others = [record for record, record_fold in zip(folds.records, folds.folds) if record_fold != fold]
    val_fraction = folds.protocol["val_fraction"]
    val_of = assign_groups(patient_labels(others), {"train": 1.0 - val_fraction, "val": val_fraction},
                           folds.protocol["seed"] + fold)
    return ["test" if record_fold == fold else val_of[record.patient]
            for record, record_fold in zip(folds.records, folds.folds)]


def fold_split(folds: Folds, fold: int) -> Split:
    """Fold `fold` (1..K) of `folds` as a Split: its patients test, val from the other folds' patients."""
    sides = fold_sides(folds, fold)
    protocol = {**{key: folds.protocol[key] for key in ("seed", "val_fraction", "magnification", "patient_id")
                   if key in folds.protocol},
                "method": "kfold", "fold_method": folds.protocol["method"], "fold": fold, "n_folds": folds.n_folds,
                "folds_digest": folds.digest, "test_fraction": None,
                "stratified_by": folds.protocol.get("stratified_by"), "groups": "patient"}
    return Split(folds.root, folds.records, sides, protocol, partition_digest(folds.records, sides, protocol))


# ------------------------------------------------------------------------------------------ the files


def save_partition(path: Path, partition: Split | Folds) -> None:
    """split.json or folds.json: format, kind, data root, protocol, digest, one row per record with its side."""
    kind, column, sides = ("split", "split", partition.splits) if isinstance(partition, Split) else \
        ("folds", "fold", [int(fold) for fold in partition.folds])
    rows = [dict(asdict(record), **{column: side}) for record, side in zip(partition.records, sides)]
    write_json(path, {"format_version": PARTITION_FORMAT_VERSION, "kind": kind, "data_root": str(partition.root),
                      "protocol": partition.protocol, "digest": partition.digest, "rows": rows})


def load_partition(path: Path, kind: str) -> Split | Folds:
    """A split.json (kind 'split') or folds.json ('folds'), checked: readable, this format, its digest."""
    path = Path(path)
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
        version = content.get("format_version")
        if version != PARTITION_FORMAT_VERSION:
            raise PipelineError(f"{path} was written by an earlier version of the pipeline (format {version}, this "
                                f"version reads {PARTITION_FORMAT_VERSION}); start the run again in a new --output-dir")
        if content.get("kind") != kind:
            raise PipelineError(f"{path} holds {content.get('kind')}, not {kind}")
        rows, protocol = content["rows"], content["protocol"]
        records = [Record(row["path"], int(row["label"]), row["subtype"], row["patient"], row["magnification"])
                   for row in rows]
        sides = [row["split"] for row in rows] if kind == "split" else \
            np.array([int(row["fold"]) for row in rows], dtype=np.int64)
        root, digest = Path(content["data_root"]), str(content["digest"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise PipelineError(f"{path} is unreadable ({error}); restore it from a copy or start the run again in a "
                            "new --output-dir") from None
    if partition_digest(records, sides, protocol) != digest:
        raise PipelineError(f"{path} was edited by hand (its digest does not match its rows); restore it from a copy "
                            "or start the run again in a new --output-dir")
    if kind == "split":
        return Split(root, records, sides, protocol, digest)
    if sides.size and (sides.min() < 1 or sides.max() > int(protocol["n_folds"])):
        raise PipelineError(f"{path} holds fold numbers outside 1..{protocol['n_folds']}")
    return Folds(root, records, sides, protocol, digest)


def load_split(path: Path) -> Split:
    return load_partition(path, "split")


def load_folds(path: Path) -> Folds:
    return load_partition(path, "folds")


def make_once_or_verify(path: Path, kind: str, records: list[Record], protocol: dict,
                        make: Callable[[], Split | Folds], *, subset_allowed: bool) -> Split | Folds:
    """The partition in `path`: made by `make()` and saved there by the first caller; a later caller must pass the
    same `protocol` (every key it gives) and the same records (path, label, patient), or it stops with a one-line
    error naming what differs. `subset_allowed`: the partition may leave records out (an official fold file names
    only some images)."""
    path = Path(path)
    if not path.exists():
        partition = make()
        path.parent.mkdir(parents=True, exist_ok=True)
        save_partition(path, partition)
        return partition
    partition = load_partition(path, kind)
    protocol = _plain(protocol)
    changed = [f"{key} {partition.protocol.get(key)!r} there, {value!r} now" for key, value in protocol.items()
               if partition.protocol.get(key) != value]
    if changed:
        raise PipelineError(f"{path} was made with other options ({'; '.join(changed)}); pass the same options, or "
                            "use another --output-dir")
    indexed = {(record.path, record.label, record.patient) for record in records}
    made_of = {(record.path, record.label, record.patient) for record in partition.records}
    if not made_of <= indexed or (not subset_allowed and made_of != indexed):
        raise PipelineError(f"the dataset does not match {path} ({len(made_of - indexed)} image(s) of it are missing "
                            f"or relabelled, {len(indexed - made_of)} image(s) are new); use the dataset it was made "
                            "for, or another --output-dir")
    return partition


def indexed_records(data_dir: str | os.PathLike, protocol: dict) -> tuple[Path, list[Record]]:
    """The dataset's root and its records as the protocol selects them (magnification, patient grouping)."""
    dataset = index_dataset(data_dir)
    if dataset.skipped:
        print(f"skipped {len(dataset.skipped)} file(s) whose names do not follow the BreaKHis scheme, "
              f"e.g. {dataset.skipped[0]}")
    records = filter_magnification(dataset.records, protocol["magnification"])
    return dataset.root, group_patients(records, protocol["patient_id"])


def prepare_split(data_dir: str | os.PathLike, path: Path, protocol: dict) -> Split:
    """The split in `path` (split.json), made from `data_dir` by the first script, verified by the others."""
    root, records = indexed_records(data_dir, protocol)
    split = make_once_or_verify(path, "split", records, protocol, lambda: make_split(records, root, protocol),
                                subset_allowed=protocol["method"] == "fold")
    return Split(root, split.records, split.splits, split.protocol, split.digest)  # the data where it is now


def prepare_folds(data_dir: str | os.PathLike, path: Path, protocol: dict) -> Folds:
    """The folds in `path` (folds.json), made from `data_dir` by the first fold run, verified by the others."""
    root, records = indexed_records(data_dir, protocol)
    folds = make_once_or_verify(path, "folds", records, protocol, lambda: make_folds(records, root, protocol),
                                subset_allowed=protocol["method"] == "fold_files")
    return Folds(root, folds.records, folds.folds, folds.protocol, folds.digest)


def prepare_fold_split(folds: Folds, fold: int, path: Path) -> Split:
    """Fold k's split, written to `path` (fold_<k>/split.json) by its first run; a later run must find the same
    split there (a folder made from other folds stops with an error)."""
    split = fold_split(folds, fold)
    return make_once_or_verify(path, "split", folds.records, {"folds_digest": folds.digest, "fold": fold},
                               lambda: split, subset_allowed=False)


# ------------------------------------------------------------------------------------------ summaries


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
