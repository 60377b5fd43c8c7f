"""Patient-level K-fold (common.data.partition): folds numbered 1..K, each fold's sides, official fold files, the
folds file (made once, then verified), fold k's split file, and cross-fitted stacking (common.fusion.stacking) that
never fits on the patients it predicts. Synthetic records and empty image files only; CPU, seconds.
"""

import json
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from common.core.errors import PipelineError
from common.core.runfiles import FOLDS_FILE, SPLIT_FILE, fold_dir
from common.data.partition import (
    PARTITION_FORMAT_VERSION,
    Folds,
    assign_groups,
    fold_sides,
    fold_split,
    folds_from_fold_files,
    load_folds,
    load_split,
    make_folds,
    make_kfold,
    partition_digest,
    prepare_fold_split,
    prepare_folds,
    save_partition,
)
from common.data.records import Record, index_dataset, patient_labels
from common.evaluation.metrics import roc_auc, softmax
from common.fusion.stacking import OutOfFold, cross_fit, logistic_regression_stacker, soft_vote

# BreaKHis-like patients per subtype (the real dataset: A 4, F 10, PT 3, TA 7 | DC 38, LC 5, MC 9, PC 6).
SUBTYPE_PATIENTS = {0: {"A": 3, "F": 6, "PT": 2, "TA": 4}, 1: {"DC": 12, "LC": 3, "MC": 5, "PC": 4}}
DATA_ROOT = Path("/data/breakhis")  # the root recorded by partitions made from records alone (no files read)


def breakhis_like_records(*, seed: int = 0, subtypes: bool = True) -> list[Record]:
    """Records of 39 patients (15 benign, 24 malignant), 2 magnifications, 1 to 4 images each, sorted by path as
    index_dataset sorts them; the paths are those of an official tree (see write_dataset)."""
    rng = np.random.default_rng(seed)
    records = []
    for label, per_subtype in SUBTYPE_PATIENTS.items():
        for subtype, count in per_subtype.items():
            for number in range(count):
                patient = f"14-{label}{subtype}{number:03d}"
                for magnification in ("100", "400"):
                    for sequence in range(1, int(rng.integers(1, 5)) + 1):
                        name = f"SOB_{'BM'[label]}_{subtype}-{patient}-{magnification}-{sequence:03d}.png"
                        records.append(Record(f"histology_slides/breast/{patient}/{magnification}X/{name}", label,
                                              subtype if subtypes else "", patient, magnification))
    return sorted(records, key=lambda record: record.path)


def write_dataset(folder: Path, records: list[Record]) -> Path:
    """The records as an official tree of empty files: indexing only lists and parses file names, so prepare_folds
    finds exactly these records there."""
    for record in records:
        (folder / record.path).parent.mkdir(parents=True, exist_ok=True)
        (folder / record.path).touch()
    assert index_dataset(folder).records == records
    return folder


def kfold(records: list[Record], *, n_folds: int = 5, seed: int = 0, val_fraction: float = 0.2) -> Folds:
    """Folds as a K-fold run's protocol asks for them."""
    return make_folds(records, DATA_ROOT, {"method": "kfold", "n_folds": n_folds, "seed": seed,
                                           "val_fraction": val_fraction})


def fold_protocol(**overrides) -> dict:
    """A K-fold protocol as `common.training.config.fold_protocol` makes it (the parser's defaults, --folds 5)."""
    base = {"method": "kfold", "n_folds": 5, "seed": 0, "val_fraction": 0.1, "magnification": "all",
            "patient_id": "folder"}
    return {**base, **overrides}


def patients_of(records, mask) -> set[str]:
    return {record.patient for record, chosen in zip(records, mask) if chosen}


def test_kfold_every_image_in_exactly_one_test_fold_and_each_patient_in_one_fold():
    records = breakhis_like_records()
    folds, made = make_kfold(records, n_folds=5, seed=0)
    assert folds.shape == (len(records),) and folds.dtype == np.int64
    assert set(folds.tolist()) == {1, 2, 3, 4, 5}  # numbered 1..K, as folds.json and fold_<k>/ name them
    assert made == {"stratified_by": "label+subtype"}
    partition = kfold(records)
    assert np.array_equal(partition.folds, folds) and partition.n_folds == 5 and partition.root == DATA_ROOT
    times_tested = np.zeros(len(records), dtype=int)
    for fold in range(1, 6):
        times_tested += np.array([side == "test" for side in fold_sides(partition, fold)])
        assert np.array_equal(partition.test_indices(fold), np.flatnonzero(folds == fold))
    assert times_tested.tolist() == [1] * len(records)
    folds_of_patient = defaultdict(set)
    for record, fold in zip(records, folds):
        folds_of_patient[record.patient].add(int(fold))
    assert all(len(found) == 1 for found in folds_of_patient.values())


def test_kfold_is_stratified_by_class_and_subtype():
    records = breakhis_like_records()
    folds = kfold(records, seed=3)
    assert folds.protocol["stratified_by"] == "label+subtype"
    fold_of_patient = {record.patient: int(fold) for record, fold in zip(records, folds.folds)}
    stratum_of = {record.patient: (record.label, record.subtype) for record in records}
    per_fold = defaultdict(Counter)  # stratum -> patients per fold
    for patient, fold in fold_of_patient.items():
        per_fold[stratum_of[patient]][fold] += 1
        per_fold[stratum_of[patient][0]][fold] += 1  # the class as a whole
        per_fold["all"][fold] += 1
    for stratum, counts in per_fold.items():  # spread as evenly as the stratum's size allows
        spread = [counts[fold] for fold in range(1, 6)]
        assert max(spread) - min(spread) <= 1, (stratum, spread)
    for fold in range(1, 6):  # every test fold has both classes
        assert {record.label for record, record_fold in zip(records, folds.folds) if record_fold == fold} == {0, 1}


def test_kfold_without_subtypes_stratifies_by_class_and_says_so():
    records = breakhis_like_records(subtypes=False)
    folds = kfold(records, n_folds=4)
    assert folds.protocol["stratified_by"] == "label" and set(folds.folds.tolist()) == {1, 2, 3, 4}
    per_class = Counter((record.label, int(fold)) for record, fold in
                        {record.patient: (record, fold) for record, fold in zip(records, folds.folds)}.values())
    for label in (0, 1):
        counts = [per_class[(label, fold)] for fold in range(1, 5)]
        assert max(counts) - min(counts) <= 1 and min(counts) >= 1


def test_kfold_same_seed_same_folds_other_seed_other_folds():
    records = breakhis_like_records()
    first, again, other = (kfold(records, seed=seed) for seed in (7, 7, 8))
    assert np.array_equal(first.folds, again.folds) and first.digest == again.digest
    assert not np.array_equal(first.folds, other.folds) and first.digest != other.digest


def test_val_patients_come_from_the_other_folds_only():
    records = breakhis_like_records()
    folds = kfold(records, val_fraction=0.25, seed=4)
    for fold in range(1, 6):
        sides = np.array(fold_sides(folds, fold))
        test = patients_of(records, sides == "test")
        val, train = patients_of(records, sides == "val"), patients_of(records, sides == "train")
        assert test == patients_of(records, folds.folds == fold)
        assert not (val & test) and not (train & test) and not (train & val)
        assert {record.label for record, side in zip(records, sides) if side == "val"} == {0, 1}
        others = [record for record, record_fold in zip(records, folds.folds) if record_fold != fold]
        assert abs(len(val) - 0.25 * len(patient_labels(others))) <= 2  # a quarter per class, rounded
        # The val carving is seeded with seed + fold, fold counted from 1: a fold's split does not depend on
        # how the folds are numbered elsewhere (the viewer, the tables and fold_<k>/ all say fold k).
        carved = assign_groups(patient_labels(others), {"train": 0.75, "val": 0.25}, 4 + fold)
        assert val == {patient for patient, side in carved.items() if side == "val"}


def test_fold_split_is_fold_k_with_a_digest_of_its_own():
    records = breakhis_like_records()
    folds = kfold(records, seed=2)
    split = fold_split(folds, 3)
    assert split.records == folds.records and split.splits == fold_sides(folds, 3) and split.root == DATA_ROOT
    assert (split.protocol["method"], split.protocol["fold"], split.protocol["n_folds"]) == ("kfold", 3, 5)
    assert split.protocol["fold_method"] == "kfold" and split.protocol["folds_digest"] == folds.digest
    assert split.digest == partition_digest(split.records, split.splits, split.protocol)
    assert len({fold_split(folds, fold).digest for fold in range(1, 6)}) == 5  # each fold's split is named apart


def test_kfold_refuses_too_few_patients_and_unknown_folds():
    records = [record for record in breakhis_like_records() if record.label == 1 or "-0A" in record.patient]
    with pytest.raises(PipelineError, match=r"--folds 5: class 'benign' has 3 patient\(s\)"):
        make_kfold(records, n_folds=5)
    with pytest.raises(PipelineError, match=r"--folds 1: K-fold evaluation needs at least 2 folds \(--folds 1 is one "
                                            r"split\)"):
        make_kfold(breakhis_like_records(), n_folds=1)
    folds = kfold(breakhis_like_records())
    for fold in (0, 6):  # folds are numbered 1..K: neither a 0-based fold 0 nor a fold K+1
        with pytest.raises(PipelineError, match=f"fold {fold} does not exist: the folds are numbered 1 to 5"):
            fold_sides(folds, fold)
    with pytest.raises(PipelineError, match="unknown fold method 'image'"):
        make_folds(breakhis_like_records(), DATA_ROOT, {"method": "image", "seed": 0, "val_fraction": 0.2})


# ----------------------------------------------------------------------------------- official fold files


def write_fold_files(folder, records, fold_of_patient: dict[str, int], n_folds: int, *, leave_out=()) -> list:
    """dsfold1..n.txt in the official format: every named image on the test side of its patient's fold (1..n)."""
    paths = []
    for fold in range(1, n_folds + 1):
        lines = []
        for record in records:
            if record.patient in leave_out:
                continue
            name = record.path.rsplit("/", 1)[1]
            side = "test" if fold_of_patient[record.patient] == fold else "train"
            lines.append(f"{name}|{record.magnification}|{fold}|{side}")
        path = folder / f"dsfold{fold}.txt"
        path.write_text("\n".join(lines) + "\n")
        paths.append(path)
    return paths


def round_robin_folds(records, n_folds: int) -> dict[str, int]:
    """Patient -> fold 1..n_folds, dealt in sorted order."""
    patients = sorted({record.patient for record in records})
    return {patient: index % n_folds + 1 for index, patient in enumerate(patients)}


def test_official_fold_files_as_the_folds(tmp_path):
    records = breakhis_like_records()
    fold_of_patient = round_robin_folds(records, 5)
    left_out = min(fold_of_patient)
    paths = write_fold_files(tmp_path, records, fold_of_patient, 5, leave_out={left_out})
    n_left_out = sum(record.patient == left_out for record in records)
    kept, folds, made = folds_from_fold_files(records, paths)
    assert made == {"left_out": n_left_out, "stratified_by": "the fold files"}
    assert kept == [record for record in records if record.patient != left_out]
    assert folds.tolist() == [fold_of_patient[record.patient] for record in kept]  # fold k = dsfold<k>'s test side
    partition = make_folds(records, DATA_ROOT, {"method": "fold_files", "fold_files": paths, "seed": 0,
                                                "val_fraction": 0.2})
    assert partition.protocol["method"] == "fold_files" and partition.n_folds == 5
    assert partition.protocol["fold_files"] == [str(path) for path in paths]  # as it reads back from folds.json
    assert partition.protocol["stratified_by"] == "the fold files"
    assert partition.protocol["left_out"] == n_left_out
    assert partition.records == kept and np.array_equal(partition.folds, folds)
    sides = np.array(fold_sides(partition, 2))
    fold_2 = {patient for patient, fold in fold_of_patient.items() if fold == 2}
    assert patients_of(partition.records, sides == "test") == fold_2 - {left_out}


def test_official_fold_files_with_overlapping_test_sides_are_refused(tmp_path):
    records = breakhis_like_records()
    paths = write_fold_files(tmp_path, records, round_robin_folds(records, 5), 5)
    # What the official BreaKHis folds are: independent train/test splits whose test sides overlap.
    first_test = next(line for line in paths[0].read_text().splitlines() if line.endswith("|test"))
    lines = paths[1].read_text().replace(first_test.replace("|1|test", "|2|train"), first_test.replace("|1|", "|2|"))
    paths[1].write_text(lines)
    with pytest.raises(PipelineError, match=r"dsfold1.txt and .*dsfold2.txt both put 1 image\(s\) on their test "
                                            r"side .*disjoint test sides"):
        folds_from_fold_files(records, paths)


def test_official_fold_files_that_do_not_cover_the_images_are_refused(tmp_path):
    records = breakhis_like_records()
    paths = write_fold_files(tmp_path, records, round_robin_folds(records, 5), 5)
    with pytest.raises(PipelineError, match=r"image\(s\) are on no file's test side"):
        folds_from_fold_files(records, paths[:4])  # fold 5's test images are on the train side of the others
    with pytest.raises(PipelineError, match="needs at least 2 fold files"):
        folds_from_fold_files(records, paths[:1])


def test_official_fold_files_putting_a_patient_in_two_folds_are_refused(tmp_path):
    records = breakhis_like_records()
    fold_of_patient = round_robin_folds(records, 5)
    paths = write_fold_files(tmp_path, records, fold_of_patient, 5)
    first_patient = min(fold_of_patient)  # in fold 1: one of its images moves to fold 2
    moved = next(record for record in records if record.patient == first_patient)
    name = moved.path.rsplit("/", 1)[1]
    paths[0].write_text(paths[0].read_text().replace(f"{name}|{moved.magnification}|1|test",
                                                     f"{name}|{moved.magnification}|1|train"))
    paths[1].write_text(paths[1].read_text().replace(f"{name}|{moved.magnification}|2|train",
                                                     f"{name}|{moved.magnification}|2|test"))
    with pytest.raises(PipelineError, match=f"patient\\(s\\) {first_patient} on the test sides of two files"):
        folds_from_fold_files(records, paths)


# ----------------------------------------------------------------------------------- the folds file


def test_folds_file_round_trip_and_digest_check(tmp_path):
    folds = kfold(breakhis_like_records(), seed=1)
    path = tmp_path / FOLDS_FILE
    save_partition(path, folds)
    loaded = load_folds(path)
    assert loaded.records == folds.records and np.array_equal(loaded.folds, folds.folds)
    assert loaded.protocol == folds.protocol and loaded.digest == folds.digest and loaded.root == DATA_ROOT
    content = json.loads(path.read_text())
    assert (content["format_version"], content["kind"]) == (PARTITION_FORMAT_VERSION, "folds") == (2, "folds")
    assert set(content["rows"][0]) == {"path", "label", "patient", "magnification", "subtype", "fold"}
    assert sorted({row["fold"] for row in content["rows"]}) == [1, 2, 3, 4, 5]
    original = path.read_text()

    content["rows"][0]["fold"] = content["rows"][0]["fold"] % 5 + 1  # another fold 1..5
    path.write_text(json.dumps(content))
    with pytest.raises(PipelineError, match=r"folds.json was edited by hand"):
        load_folds(path)
    content = json.loads(original)
    content["protocol"]["seed"] = 2  # the digest covers the protocol too: a file cannot claim other options
    path.write_text(json.dumps(content))
    with pytest.raises(PipelineError, match=r"folds.json was edited by hand"):
        load_folds(path)
    path.write_text("{not json")
    with pytest.raises(PipelineError, match=r"folds.json is unreadable"):
        load_folds(path)


def test_folds_file_with_a_fold_outside_1_to_k_is_refused(tmp_path):
    folds = kfold(breakhis_like_records())
    out_of_range = folds.folds.copy()
    out_of_range[0] = 6
    # Consistent digest, so the range check (not the digest check) is what refuses it.
    save_partition(tmp_path / FOLDS_FILE, Folds(DATA_ROOT, folds.records, out_of_range, folds.protocol,
                                                partition_digest(folds.records, out_of_range, folds.protocol)))
    with pytest.raises(PipelineError, match=r"folds.json holds fold numbers outside 1..5"):
        load_folds(tmp_path / FOLDS_FILE)


def as_written_by_format_1(content: dict) -> dict:
    """A format-2 folds.json's content as the earlier version wrote folds.json: format_version 1, no kind, no
    data_root, folds numbered 0..K-1."""
    rows = [{**row, "fold": row["fold"] - 1} for row in content["rows"]]
    return {"format_version": 1, "protocol": content["protocol"], "digest": content["digest"], "rows": rows}


def test_a_folds_file_of_format_1_is_refused_in_one_line(tmp_path):
    data = write_dataset(tmp_path / "data", breakhis_like_records())
    path = tmp_path / "run" / FOLDS_FILE
    prepare_folds(data, path, fold_protocol())
    path.write_text(json.dumps(as_written_by_format_1(json.loads(path.read_text()))))
    expected = (f"{path} was written by an earlier version of the pipeline (format 1, this version reads 2); start "
                "the run again in a new --output-dir")
    with pytest.raises(PipelineError) as error:
        load_folds(path)
    assert str(error.value) == expected
    with pytest.raises(PipelineError) as error:  # what a fold run meets: refused, never remade over the old run
        prepare_folds(data, path, fold_protocol())
    assert str(error.value) == expected and "\n" not in expected
    assert json.loads(path.read_text())["format_version"] == 1


def test_prepare_folds_makes_once_then_checks_options_and_data(tmp_path):
    records = breakhis_like_records()
    data = write_dataset(tmp_path / "data", records)
    path = tmp_path / "run" / FOLDS_FILE
    made = prepare_folds(data, path, fold_protocol())
    assert path.is_file() and made.root == data.resolve() and made.records == records
    assert made.protocol == {**fold_protocol(), "stratified_by": "label+subtype"}
    assert np.array_equal(made.folds, make_kfold(records, n_folds=5, seed=0)[0])  # the folds make_kfold makes
    before = path.stat()
    again = prepare_folds(data, path, fold_protocol())
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not rewritten
    assert again.digest == made.digest and np.array_equal(again.folds, made.folds)
    moved = tmp_path / "moved"
    data.rename(moved)  # the same dataset at another place: accepted, and the folds say where it is now
    assert prepare_folds(moved, path, fold_protocol()).root == moved.resolve()
    with pytest.raises(PipelineError, match=r"folds.json was made with other options \(n_folds 5 there, 4 now\); "
                                            r"pass the same options, or use another --output-dir"):
        prepare_folds(moved, path, fold_protocol(n_folds=4))
    with pytest.raises(PipelineError, match=r"other options \(seed 0 there, 1 now; val_fraction 0.1 there, 0.2 now\)"):
        prepare_folds(moved, path, fold_protocol(seed=1, val_fraction=0.2))
    new = Record("histology_slides/breast/14-0A000/100X/SOB_B_A-14-0A000-100-009.png", 0, "A", "14-0A000", "100")
    write_dataset(moved, sorted(records + [new], key=lambda record: record.path))
    with pytest.raises(PipelineError, match=r"the dataset does not match .*folds.json \(0 image\(s\) of it are "
                                            r"missing or relabelled, 1 image\(s\) are new\)"):
        prepare_folds(moved, path, fold_protocol())
    (moved / new.path).unlink()
    (moved / records[0].path).unlink()
    with pytest.raises(PipelineError, match=r"the dataset does not match .*folds.json \(1 image\(s\) of it are "
                                            r"missing or relabelled, 0 image\(s\) are new\)"):
        prepare_folds(moved, path, fold_protocol())


def test_prepare_folds_accepts_paths_for_fold_files(tmp_path):
    records = breakhis_like_records()
    data = write_dataset(tmp_path / "data", records)
    paths = write_fold_files(tmp_path, records, round_robin_folds(records, 3), 3)
    protocol = fold_protocol(method="fold_files", fold_files=paths)  # Path objects, and an n_folds the files set
    del protocol["n_folds"]
    made = prepare_folds(data, tmp_path / FOLDS_FILE, protocol)
    assert made.protocol["fold_files"] == [str(path) for path in paths] and made.n_folds == 3
    assert prepare_folds(data, tmp_path / FOLDS_FILE, protocol).digest == made.digest


def test_the_digest_names_the_rows_and_the_protocol():
    records = breakhis_like_records()
    folds = kfold(records)
    digest = partition_digest(records, folds.folds, folds.protocol)
    assert digest == folds.digest and len(digest) == 64
    # Fold numbers as numpy integers or as ints read back from JSON: one digest.
    assert partition_digest(records, [int(fold) for fold in folds.folds], folds.protocol) == digest
    assert partition_digest(records, folds.folds, {**folds.protocol, "seed": 1}) != digest  # same rows
    assert partition_digest(records, folds.folds, {**folds.protocol, "magnification": "100"}) != digest
    other_sides = folds.folds.copy()
    other_sides[0] = other_sides[0] % 5 + 1
    assert partition_digest(records, other_sides, folds.protocol) != digest
    relabelled = [replace(records[0], label=1 - records[0].label)] + records[1:]
    assert partition_digest(relabelled, folds.folds, folds.protocol) != digest


# ----------------------------------------------------------------------------------- fold k's split file


def test_prepare_fold_split_makes_once_and_refuses_a_split_of_other_folds(tmp_path):
    records = breakhis_like_records()
    folds = kfold(records, seed=0)
    path = fold_dir(tmp_path, 2) / SPLIT_FILE
    made = prepare_fold_split(folds, 2, path)
    expected = fold_split(folds, 2)
    assert (made.splits, made.protocol, made.digest) == (expected.splits, expected.protocol, expected.digest)
    loaded = load_split(path)
    assert (loaded.records, loaded.splits, loaded.digest) == (records, expected.splits, expected.digest)
    assert prepare_fold_split(folds, 2, path).digest == made.digest  # a second run reads the same split
    other_folds = kfold(records, seed=1)
    assert other_folds.digest != folds.digest
    with pytest.raises(PipelineError, match=rf"fold_2.split\.json was made with other options \(folds_digest "
                                            rf"'{folds.digest}' there, '{other_folds.digest}' now\); pass the same "
                                            r"options, or use another --output-dir"):
        prepare_fold_split(other_folds, 2, path)
    with pytest.raises(PipelineError, match=r"fold_2.split\.json was made with other options \(fold 2 there, 3 now\)"):
        prepare_fold_split(folds, 3, path)  # another fold's split in this fold's folder
    assert load_split(path).digest == made.digest  # neither refused run touched the file


def test_a_fold_split_file_of_format_1_is_refused(tmp_path):
    folds = kfold(breakhis_like_records())
    path = fold_dir(tmp_path, 1) / SPLIT_FILE
    prepare_fold_split(folds, 1, path)
    content = json.loads(path.read_text())
    del content["kind"]
    path.write_text(json.dumps({**content, "format_version": 1}))
    with pytest.raises(PipelineError, match=r"split\.json was written by an earlier version of the pipeline "
                                            r"\(format 1, this version reads 2\)"):
        prepare_fold_split(folds, 1, path)


# ----------------------------------------------------------------------------------- cross-fitted stacking


def out_of_fold_rows(*, seed: int = 0) -> OutOfFold:
    """Out-of-fold rows of the K-fold records: three CNNs whose logits carry the label plus noise, and features."""
    records = breakhis_like_records(seed=seed)
    folds, _ = make_kfold(records, n_folds=5, seed=seed)
    rng = np.random.default_rng(seed)
    labels = np.array([record.label for record in records])
    logits = {}
    for name, strength in (("densenet121", 2.0), ("resnet50", 1.0), ("vgg16", 0.2)):
        margin = strength * (2 * labels - 1) + rng.normal(0, 1, len(labels))
        logits[name] = np.stack([-margin / 2, margin / 2], axis=1)
    features = np.stack([labels + rng.normal(0, 0.5, len(labels)), rng.normal(0, 1, len(labels))], axis=1)
    return OutOfFold(folds, labels, np.array([record.patient for record in records]), logits, features)


def test_stacker_fit_rows_never_include_the_outer_test_folds_patients():
    oof = out_of_fold_rows()
    calls = []

    def nearest_centroid(fit_rows: OutOfFold, select_rows: OutOfFold, predict_rows: OutOfFold) -> np.ndarray:
        """An example of the generic hook (what the heatmap MLP plugs into): features -> P(malignant)."""
        calls.append((fit_rows, select_rows, predict_rows))
        centroids = [fit_rows.features[fit_rows.labels == label].mean(axis=0) for label in (0, 1)]
        distances = [np.linalg.norm(predict_rows.features - centroid, axis=1) for centroid in centroids]
        return distances[0] / (distances[0] + distances[1])

    stacked = cross_fit(oof, nearest_centroid, select_fraction=0.2, seed=0)
    assert len(calls) == 5 and not np.isnan(stacked.prob_malignant).any()
    assert sorted(stacked.fit_rows) == sorted(stacked.select_rows) == [1, 2, 3, 4, 5]  # keyed by fold 1..K
    for call, fold in enumerate(range(1, 6)):
        test_patients = set(oof.patients[oof.folds == fold])
        fit_rows, select_rows = stacked.fit_rows[fold], stacked.select_rows[fold]
        assert not set(oof.patients[fit_rows]) & test_patients
        assert not set(oof.patients[select_rows]) & test_patients
        assert not set(oof.patients[fit_rows]) & set(oof.patients[select_rows])  # select: other patients
        assert sorted(np.concatenate([fit_rows, select_rows])) == np.flatnonzero(oof.folds != fold).tolist()
        fit_seen, select_seen, predict_seen = calls[call]
        assert np.array_equal(fit_seen.rows, fit_rows) and np.array_equal(select_seen.rows, select_rows)
        assert np.array_equal(predict_seen.rows, np.flatnonzero(oof.folds == fold))
        assert (predict_seen.labels == -1).all()  # the stacker cannot peek at what it predicts
    assert roc_auc(oof.labels, stacked.prob_malignant) > 0.8


def test_logistic_regression_stacker_and_soft_vote():
    oof = out_of_fold_rows(seed=1)
    stacked = cross_fit(oof, logistic_regression_stacker(), seed=0)
    assert stacked.prob_malignant.shape == oof.labels.shape
    assert ((stacked.prob_malignant > 0) & (stacked.prob_malignant < 1)).all()
    vote = soft_vote(oof.logits)
    expected = np.mean([softmax(oof.logits[name])[:, 1] for name in ("densenet121", "resnet50", "vgg16")], axis=0)
    assert np.allclose(vote, expected, atol=1e-15)
    # The stacker learns to weigh the strong CNN: it beats the vote, which gives the noise-only CNN a third.
    assert roc_auc(oof.labels, stacked.prob_malignant) > roc_auc(oof.labels, vote)


def test_cross_fit_checks_its_inputs():
    oof = out_of_fold_rows()
    with pytest.raises(PipelineError, match="returned .* predictions for fold 1's"):  # the first fold is fold 1
        cross_fit(oof, lambda fit_rows, select_rows, predict_rows: np.zeros(3))
    with pytest.raises(PipelineError, match=r"labels do not have one row per image"):
        OutOfFold(oof.folds, oof.labels[:-1], oof.patients, oof.logits)
    mixed = oof.folds.copy()
    mixed[np.flatnonzero(oof.patients == oof.patients[0])[0]] = oof.folds[0] % 5 + 1  # another fold 1..5
    with pytest.raises(PipelineError, match=f"put patient\\(s\\) {oof.patients[0]} in two folds"):
        cross_fit(OutOfFold(mixed, oof.labels, oof.patients, oof.logits), logistic_regression_stacker())
