"""The data layer: BreaKHis name parsing, indexing of the three layouts, patient-level splits, fold files,
the split file and its checks, and each bad input's error. CPU only, synthetic data (the `demo_dir` fixture),
seconds in all.

The demo tree (tests/conftest.py) holds, per class, 4 patients x magnifications {100, 400} x 3 images = 24 images:
  benign    14-10000AB (A), 14-10100AB (F), 14-10200AB (PT), 14-10300AB (TA)
  malignant 14-10050 (DC),  14-10150 (LC),  14-10250 (MC),  14-10350 (PC)
"""

import json
import re
import shutil
import struct
import zlib
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.core.errors import PipelineError
from common.core.runfiles import SPLIT_FILE
from common.data.demo import SYNTHETIC_MARKER, is_synthetic_dataset, make_demo_dataset
from common.data.images import ImageRecords, build_cache, load_rgb
from common.data.partition import (
    PARTITION_FORMAT_VERSION,
    describe_protocol,
    load_folds,
    load_split,
    make_split,
    partition_digest,
    prepare_split,
    read_fold_file,
    split_by_fold_file,
    split_by_image,
    split_by_patient,
    subsample_split,
)
from common.data.records import (
    Record,
    accession_number,
    filter_magnification,
    index_dataset,
    parse_breakhis_name,
    patient_labels,
)
from common.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transforms, resize_image
from common.training.config import parse_config, split_protocol

BENIGN_PATIENTS = {"14-10000AB", "14-10100AB", "14-10200AB", "14-10300AB"}
MALIGNANT_PATIENTS = {"14-10050", "14-10150", "14-10250", "14-10350"}
SUBTYPE_OF = {"14-10000AB": "A", "14-10100AB": "F", "14-10200AB": "PT", "14-10300AB": "TA",
              "14-10050": "DC", "14-10150": "LC", "14-10250": "MC", "14-10350": "PC"}


def protocol(**overrides) -> dict:
    """A split protocol as `common.training.config.split_protocol` makes it (the parser's defaults)."""
    base = dict(method="patient", fold_file=None, val_fraction=0.1, test_fraction=0.2, seed=0, magnification="all",
                patient_id="folder")
    return {**base, **overrides}


def copy_demo(demo_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "data"
    shutil.copytree(demo_dir, target)
    return target


def patients_by_split(records: list[Record], splits: list[str]) -> dict[str, set[str]]:
    sides = defaultdict(set)
    for record, split in zip(records, splits):
        sides[split].add(record.patient)
    return sides


# ------------------------------------------------------------------------------------------- file names


@pytest.mark.parametrize("name, label, subtype, patient, magnification", [
    ("SOB_B_A-14-29960CD-100-002.png", 0, "A", "14-29960CD", "100"),
    ("SOB_B_F-14-23060CD-100-006.png", 0, "F", "14-23060CD", "100"),
    ("SOB_B_PT-14-29315EF-100-016.png", 0, "PT", "14-29315EF", "100"),
    ("SOB_M_PC-14-15687B-100-006.png", 1, "PC", "14-15687B", "100"),
    ("SOB_M_DC-14-10926-100-001.png", 1, "DC", "14-10926", "100"),
    ("SOB_M_LC-14-12204-100-057.png", 1, "LC", "14-12204", "100"),
    ("SOB_M_MC-14-18842-100-017.png", 1, "MC", "14-18842", "100"),
    ("SOB_M_DC-14-2523-400-001.png", 1, "DC", "14-2523", "400"),
    ("SOB_B_TA-14-3411F-40-001.png", 0, "TA", "14-3411F", "40"),
])
def test_parse_breakhis_name_on_real_names(name, label, subtype, patient, magnification):
    record = parse_breakhis_name(name)
    assert record is not None
    assert (record.label, record.subtype, record.patient, record.magnification) == (label, subtype, patient,
                                                                                    magnification)


@pytest.mark.parametrize("name", [
    "image_001.png", "SOB_X_A-14-29960CD-100-002.png", "SOB_B_A-14-29960CD-100-002.jpg",
    "SOB_B_A-14-29960CD-100.png", "SOB_B_A_14-29960CD-100-002.png", "Thumbs.db", "",
])
def test_parse_breakhis_name_rejects_other_names(name):
    assert parse_breakhis_name(name) is None


# ------------------------------------------------------------------------------------------- indexing


@pytest.mark.parametrize("start", [".", "BreaKHis_v1", "BreaKHis_v1/histology_slides"])
def test_index_finds_the_tree_from_any_folder_above_it(demo_dir, start):
    data_dir = (demo_dir / start).resolve()
    dataset = index_dataset(data_dir)
    assert dataset.root == data_dir
    assert dataset.skipped == []
    assert len(dataset.records) == 48
    for record in dataset.records:
        assert (dataset.root / record.path).is_file()
        assert "/" in record.path and "\\" not in record.path
        parsed = parse_breakhis_name(Path(record.path).name)
        assert (parsed.label, parsed.patient, parsed.magnification) == (record.label, record.patient,
                                                                        record.magnification)
    # The same files whichever folder the user points at.
    assert {Path(record.path).name for record in dataset.records} == {
        Path(record.path).name for record in index_dataset(demo_dir).records}


def test_index_order_is_sorted_and_deterministic(demo_dir):
    first, second = index_dataset(demo_dir), index_dataset(demo_dir)
    paths = [record.path for record in first.records]
    assert paths == sorted(paths)
    assert first.records == second.records


def test_index_counts_match_what_the_generator_wrote(demo_dir):
    records = index_dataset(demo_dir).records
    assert Counter(record.label for record in records) == {0: 24, 1: 24}
    assert {r.patient for r in records if r.label == 0} == BENIGN_PATIENTS
    assert {r.patient for r in records if r.label == 1} == MALIGNANT_PATIENTS
    assert Counter(record.patient for record in records) == {patient: 6 for patient in SUBTYPE_OF}
    assert Counter((r.patient, r.magnification) for r in records) == {
        (patient, mag): 3 for patient in SUBTYPE_OF for mag in ("100", "400")}
    assert all(record.subtype == SUBTYPE_OF[record.patient] for record in records)


def test_index_skips_unparseable_names_and_lists_them(demo_dir, tmp_path):
    data = copy_demo(demo_dir, tmp_path)
    folder = data / "BreaKHis_v1/histology_slides/breast/benign/SOB/adenosis/SOB_B_A_14-10000AB/100X"
    source = folder / "SOB_B_A-14-10000AB-100-001.png"
    shutil.copy(source, folder / "copy of SOB_B_A-14-10000AB-100-001.png")
    shutil.copy(source, folder / "scan.PNG")
    (folder / "notes.txt").write_text("not an image")
    dataset = index_dataset(data)
    assert len(dataset.records) == 48
    prefix = "BreaKHis_v1/histology_slides/breast/benign/SOB/adenosis/SOB_B_A_14-10000AB/100X/"
    assert dataset.skipped == [prefix + "copy of SOB_B_A-14-10000AB-100-001.png", prefix + "scan.PNG"]


def _folder_pair(demo_dir: Path, tmp_path: Path, benign: int, malignant: int) -> Path:
    """benign/ + malignant/ with generic file names (another dataset), one nested subfolder."""
    records = index_dataset(demo_dir).records
    data = tmp_path / "plain"
    for label, class_name, count in ((0, "benign", benign), (1, "malignant", malignant)):
        sources = [r for r in records if r.label == label][:count]
        for index, record in enumerate(sources):
            folder = data / class_name / ("sub" if index % 2 else "")
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy(demo_dir / record.path, folder / f"img{index:02d}.png")
    return data


def test_index_plain_folder_pair_each_image_its_own_patient(demo_dir, tmp_path):
    data = _folder_pair(demo_dir, tmp_path, benign=4, malignant=3)
    dataset = index_dataset(data)
    assert [r.path for r in dataset.records] == [
        "benign/img00.png", "benign/img02.png", "benign/sub/img01.png", "benign/sub/img03.png",
        "malignant/img00.png", "malignant/img02.png", "malignant/sub/img01.png"]
    assert [r.label for r in dataset.records] == [0, 0, 0, 0, 1, 1, 1]
    assert [r.patient for r in dataset.records] == [f"image:{r.path}" for r in dataset.records]
    assert all(r.magnification == "" and r.subtype == "" for r in dataset.records)


def test_index_breakhis_breast_folder_keeps_patients(demo_dir):
    """Pointing at `.../breast` (benign/ + malignant/ with BreaKHis names) must not make each image a patient."""
    dataset = index_dataset(demo_dir / "BreaKHis_v1/histology_slides/breast")
    assert len(dataset.records) == 48
    assert {record.patient for record in dataset.records} == BENIGN_PATIENTS | MALIGNANT_PATIENTS
    assert Counter(record.magnification for record in dataset.records) == {"100": 24, "400": 24}


def test_index_csv_manifest(demo_dir, tmp_path):
    records = index_dataset(demo_dir).records
    picks = [records[0], records[1], records[30], records[31]]  # two benign, two malignant
    folder = tmp_path / "manifest"
    (folder / "images").mkdir(parents=True)
    for index, record in enumerate(picks):
        shutil.copy(demo_dir / record.path, folder / "images" / f"{index}.png")
    absolute = (folder / "images" / "3.png").resolve()
    (folder / "list.csv").write_text(
        "path,label,patient,magnification\n"
        "images/0.png,Benign,p1,100X\n"
        "images/1.png,0,p1,100\n"
        "images/2.png,MALIGNANT,,400\n"
        f"{absolute},1,p2,\n")
    dataset = index_dataset(folder / "list.csv")
    assert dataset.root == folder.resolve()
    assert [(r.path, r.label, r.patient, r.magnification) for r in dataset.records] == [
        ("images/0.png", 0, "p1", "100"),
        ("images/1.png", 0, "p1", "100"),
        ("images/2.png", 1, "image:images/2.png", "400"),
        ("images/3.png", 1, "p2", ""),
    ]


def test_index_manifest_with_only_path_and_label(demo_dir, tmp_path):
    record = index_dataset(demo_dir).records[0]
    shutil.copy(demo_dir / record.path, tmp_path / "a.png")
    shutil.copy(demo_dir / record.path, tmp_path / "b.png")
    (tmp_path / "m.csv").write_text("path,label\nb.png,malignant\na.png,benign\n")
    dataset = index_dataset(tmp_path / "m.csv")
    assert [(r.path, r.label, r.patient) for r in dataset.records] == [("a.png", 0, "image:a.png"),
                                                                       ("b.png", 1, "image:b.png")]


@pytest.mark.parametrize("content, expected", [
    ("path\na.png\n", "lacks the column(s) label"),
    ("path,label\na.png,tumour\n", "line 2: label 'tumour'"),
    ("path,label\nmissing.png,1\n", "missing.png does not exist"),
])
def test_index_bad_manifest(demo_dir, tmp_path, content, expected):
    shutil.copy(demo_dir / index_dataset(demo_dir).records[0].path, tmp_path / "a.png")
    manifest = tmp_path / "m.csv"
    manifest.write_text(content)
    with pytest.raises(PipelineError, match="m.csv") as error:
        index_dataset(manifest)
    assert expected in str(error.value)


# ------------------------------------------------------------------------------------------- splits


def test_split_by_patient_keeps_each_patient_on_one_side(demo_dir):
    records = index_dataset(demo_dir).records
    splits = split_by_patient(records, val_fraction=0.1, test_fraction=0.2, seed=0)
    side_of = defaultdict(set)
    for record, split in zip(records, splits):
        side_of[record.patient].add(split)
    assert all(len(sides) == 1 for sides in side_of.values())
    # 4 patients per class -> val max(1, round(0.4)) = 1, test max(1, round(0.8)) = 1, train the other 2.
    sides = patients_by_split(records, splits)
    for split, expected in (("train", 2), ("val", 1), ("test", 1)):
        assert len(sides[split] & BENIGN_PATIENTS) == expected
        assert len(sides[split] & MALIGNANT_PATIENTS) == expected
    assert Counter(splits) == {"train": 24, "val": 12, "test": 12}


def test_split_by_patient_keeps_all_magnifications_of_a_patient_together(demo_dir):
    records = index_dataset(demo_dir).records
    splits = split_by_patient(records, val_fraction=0.25, test_fraction=0.25, seed=3)
    mags = defaultdict(set)
    for record, split in zip(records, splits):
        mags[(record.patient, split)].add(record.magnification)
    assert len(mags) == 8  # one split per patient
    assert all(found == {"100", "400"} for found in mags.values())


def test_split_by_patient_is_stratified_on_unbalanced_classes():
    # 10 benign and 20 malignant patients, 2 images each. Per class: val round(0.1 n), test round(0.2 n).
    records = [Record(f"{label}/{p}/{i}.png", label, "", f"{label}-{p}", "100")
               for label, n in ((0, 10), (1, 20)) for p in range(n) for i in range(2)]
    splits = split_by_patient(records, val_fraction=0.1, test_fraction=0.2, seed=7)
    side_of = {record.patient: (split, record.label) for record, split in zip(records, splits)}
    patients = Counter(side_of.values())
    assert patients == {("train", 0): 7, ("val", 0): 1, ("test", 0): 2,
                        ("train", 1): 14, ("val", 1): 2, ("test", 1): 4}


def test_split_same_seed_same_split_other_seed_other_split(demo_dir):
    records = index_dataset(demo_dir).records
    split = lambda seed: split_by_patient(records, val_fraction=0.1, test_fraction=0.2, seed=seed)  # noqa: E731
    assert split(5) == split(5)
    # 144 possible patient assignments; ten seeds all giving the same one would mean the seed is ignored.
    assert len({tuple(split(seed)) for seed in range(10)}) > 1


def test_patient_labels_majority_and_tie():
    records = [Record("a", 0, "", "p", ""), Record("b", 0, "", "p", ""), Record("c", 1, "", "p", ""),
               Record("d", 0, "", "q", ""), Record("e", 1, "", "q", "")]
    assert patient_labels(records) == {"p": 0, "q": 1}


def test_filter_magnification(demo_dir):
    records = index_dataset(demo_dir).records
    assert filter_magnification(records, "all") == records
    for option in ("100", "100X", "100x"):
        kept = filter_magnification(records, option)
        assert len(kept) == 24 and {r.magnification for r in kept} == {"100"}
        assert kept == [r for r in records if r.magnification == "100"]  # order kept
    with pytest.raises(PipelineError, match=r"--magnification 200: no images at that magnification"):
        filter_magnification(records, "200")
    with pytest.raises(PipelineError, match=r"--magnification 50: choose one of 40, 100, 200, 400 or all"):
        filter_magnification(records, "50")


def test_image_split_is_stratified_and_warns_through_make_split(demo_dir, capsys):
    records = index_dataset(demo_dir).records
    split = make_split(records, demo_dir, protocol(method="image"))
    assert "WARNING" in capsys.readouterr().out
    # Per class 24 images: val round(2.4) = 2, test round(4.8) = 5, train 17.
    assert Counter(zip(split.splits, (r.label for r in records))) == {
        ("train", 0): 17, ("val", 0): 2, ("test", 0): 5, ("train", 1): 17, ("val", 1): 2, ("test", 1): 5}
    assert split.splits == split_by_image(records, val_fraction=0.1, test_fraction=0.2, seed=0)
    make_split(records, demo_dir, protocol())
    assert "WARNING" not in capsys.readouterr().out


# ------------------------------------------------------------------------------------------- fold files


FOLD_TEST_PATIENTS = {"14-10300AB", "14-10350"}
FOLD_UNLISTED_PATIENT = "14-10250"


def write_fold_file(path: Path, records: list[Record]) -> Path:
    """dsfold1.txt for the demo's 100X images: two test patients, one patient left out, 400X left out."""
    lines = []
    for record in records:
        if record.magnification != "100" or record.patient == FOLD_UNLISTED_PATIENT:
            continue
        side = "test" if record.patient in FOLD_TEST_PATIENTS else "train"
        lines.append(f"{Path(record.path).name}|100|1|{side}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_read_fold_file_official_format(tmp_path):
    fold = tmp_path / "dsfold1.txt"
    fold.write_text("SOB_B_A-14-22549AB-100-001.png|100|1|train\n\nSOB_M_DC-14-2523-400-001.png|400|1|test\n")
    assert read_fold_file(fold) == {"SOB_B_A-14-22549AB-100-001.png": "train",
                                    "SOB_M_DC-14-2523-400-001.png": "test"}
    fold.write_text("SOB_B_A-14-22549AB-100-001.png|100|1|train\nSOB_B_A-14-22549AB-100-002.png|100|1|val\n")
    with pytest.raises(PipelineError, match=r"dsfold1.txt line 2"):
        read_fold_file(fold)
    with pytest.raises(PipelineError, match=r"--fold-file .*dsfold9.txt does not exist"):
        read_fold_file(tmp_path / "dsfold9.txt")


def test_split_by_fold_file(demo_dir, tmp_path):
    records = index_dataset(demo_dir).records
    fold = write_fold_file(tmp_path / "dsfold1.txt", records)
    splits = split_by_fold_file(records, str(fold), val_fraction=0.1, seed=0)
    listed = read_fold_file(fold)
    for record, split in zip(records, splits):
        name = Path(record.path).name
        if name not in listed:
            assert split == ""
        elif listed[name] == "test":
            assert split == "test"
        else:
            assert split in ("train", "val")
    sides = patients_by_split(records, splits)
    assert sides["test"] == FOLD_TEST_PATIENTS
    fold_train = (BENIGN_PATIENTS | MALIGNANT_PATIENTS) - FOLD_TEST_PATIENTS - {FOLD_UNLISTED_PATIENT}
    assert sides["val"] <= fold_train and sides["train"] <= fold_train
    assert not sides["val"] & sides["train"]
    # Fold train patients: 3 benign -> 1 val, 2 train; 2 malignant -> 1 val, 1 train.
    assert len(sides["val"] & BENIGN_PATIENTS) == 1 and len(sides["val"] & MALIGNANT_PATIENTS) == 1
    assert len(sides["train"]) == 3


def test_make_split_with_fold_drops_unlisted_images(demo_dir, tmp_path):
    records = index_dataset(demo_dir).records
    fold = write_fold_file(tmp_path / "dsfold1.txt", records)
    split = make_split(records, demo_dir, protocol(method="fold", fold_file=str(fold), test_fraction=None))
    assert len(split.records) == 7 * 3  # 7 listed patients x 3 images at 100X
    assert all(r.magnification == "100" and r.patient != FOLD_UNLISTED_PATIENT for r in split.records)
    assert "" not in split.splits
    assert {Path(r.path).name for r in split.subset("test")} == {
        name for name, side in read_fold_file(fold).items() if side == "test"}


def test_fold_file_with_a_patient_on_both_sides_is_refused(demo_dir, tmp_path):
    records = index_dataset(demo_dir).records
    fold = write_fold_file(tmp_path / "dsfold1.txt", records)
    moved = next(r for r in records if r.magnification == "100" and r.patient in FOLD_TEST_PATIENTS)
    text = fold.read_text().replace(f"{Path(moved.path).name}|100|1|test", f"{Path(moved.path).name}|100|1|train")
    fold.write_text(text)
    with pytest.raises(PipelineError, match=f"dsfold1.txt puts patient.*{moved.patient} .*on both its train and test"):
        split_by_fold_file(records, str(fold), val_fraction=0.1, seed=0)


def test_fold_file_naming_no_image_of_the_dataset(demo_dir, tmp_path):
    fold = tmp_path / "dsfold2.txt"
    fold.write_text("SOB_B_A-14-22549AB-100-001.png|100|2|train\nSOB_M_DC-14-2523-100-001.png|100|2|test\n")
    with pytest.raises(PipelineError, match="dsfold2.txt names no train or no test image"):
        split_by_fold_file(index_dataset(demo_dir).records, str(fold), val_fraction=0.1, seed=0)


# ------------------------------------------------------------------------------------------- split file


def parse(*argv: str):
    return parse_config(arch="resnet50", description="x", argv=list(argv))


def test_protocol_from_the_command_line(demo_dir, tmp_path):
    config = parse("--data-dir", str(demo_dir))
    assert split_protocol(config) == protocol()
    fold = tmp_path / "dsfold1.txt"
    config = parse("--data-dir", str(demo_dir), "--fold-file", str(fold), "--magnification", "100")
    assert split_protocol(config) == protocol(method="fold", fold_file=str(fold.resolve()), test_fraction=None,
                                              magnification="100")
    # --folds 1 is one split (run_pipeline.py --folds 1): the same single run as no --folds at all.
    one_fold = parse("--data-dir", str(demo_dir), "--folds", "1")
    assert one_fold.n_folds is None and one_fold.fold_configs() == [one_fold]
    assert split_protocol(one_fold) == protocol()


def split_file(tmp_path: Path, name: str = "out") -> Path:
    """A run folder's split.json (prepare_split takes the file's path)."""
    return tmp_path / name / SPLIT_FILE


def test_prepare_split_writes_once_and_reuses(demo_dir, tmp_path):
    split_path = split_file(tmp_path)
    config = parse("--data-dir", str(demo_dir))
    first = prepare_split(str(demo_dir), split_path, split_protocol(config))
    assert split_path.is_file()
    content = json.loads(split_path.read_text())
    assert (content["format_version"], content["kind"]) == (PARTITION_FORMAT_VERSION, "split") == (2, "split")
    assert content["data_root"] == str(demo_dir.resolve())
    assert content["digest"] == first.digest == partition_digest(first.records, first.splits, first.protocol)
    assert len(content["rows"]) == 48
    assert set(content["rows"][0]) == {"path", "label", "subtype", "patient", "magnification", "split"}
    # The digest names the protocol too: the same rows made under other options are another split.
    assert partition_digest(first.records, first.splits, {**first.protocol, "seed": 1}) != first.digest
    before = split_path.stat()

    second = prepare_split(str(demo_dir), split_path, split_protocol(config))
    after = split_path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not rewritten
    assert second.digest == first.digest
    assert second.records == first.records and second.splits == first.splits
    assert second.root == demo_dir.resolve()
    loaded = load_split(split_path)
    assert (loaded.records, loaded.splits, loaded.protocol) == (first.records, first.splits, first.protocol)


def test_accession_number():
    assert accession_number("14-22549AB") == accession_number("14-22549G") == "14-22549"
    assert accession_number("14-2523") == "14-2523" and accession_number("14-15687B") == "14-15687"
    assert accession_number("image:benign/x.png") == "image:benign/x.png" and accession_number("P7") == "P7"


def test_patient_id_accession_keeps_folders_of_one_biopsy_number_together(demo_dir, tmp_path):
    """Rename patient 14-10100AB's files to 14-10000CD: with --patient-id accession it joins 14-10000AB."""
    data = copy_demo(demo_dir, tmp_path)
    for path in list(data.rglob("*14-10100AB*")):
        if path.is_file():
            path.rename(path.with_name(path.name.replace("14-10100AB", "14-10000CD")))
    by_folder = prepare_split(str(data), split_file(tmp_path, "folder"),
                              protocol(val_fraction=0.25, test_fraction=0.25))
    assert {"14-10000AB", "14-10000CD"} <= {r.patient for r in by_folder.records}
    options = protocol(val_fraction=0.25, test_fraction=0.25, patient_id="accession")
    by_accession = prepare_split(str(data), split_file(tmp_path, "accession"), options)
    assert {r.patient for r in by_accession.records if r.label == 0} == {"14-10000", "14-10200", "14-10300"}
    sides = {split for record, split in zip(by_accession.records, by_accession.splits) if record.patient == "14-10000"}
    assert len(sides) == 1  # the 6 images of both folders on one side
    assert "patients by accession number" in describe_protocol(by_accession.protocol)
    with pytest.raises(PipelineError, match=r"other options \(patient_id 'accession' there, 'folder' now\)"):
        prepare_split(str(data), split_file(tmp_path, "accession"), protocol(val_fraction=0.25, test_fraction=0.25))


def test_prepare_split_with_a_fold_file_is_reused(demo_dir, tmp_path):
    fold = write_fold_file(tmp_path / "dsfold1.txt", index_dataset(demo_dir).records)
    options = protocol(method="fold", fold_file=str(fold), test_fraction=None)
    # The fold file names 21 of the 48 images: a split of a part of the dataset is accepted when read back.
    first = prepare_split(str(demo_dir), split_file(tmp_path), options)
    second = prepare_split(str(demo_dir), split_file(tmp_path), options)
    assert second.digest == first.digest and len(second.records) == 21


def test_prepare_split_rejects_a_dataset_with_an_image_removed_or_added(demo_dir, tmp_path):
    data, split_path = copy_demo(demo_dir, tmp_path), split_file(tmp_path)
    split = prepare_split(str(data), split_path, protocol())
    removed = data / split.records[5].path
    added = removed.with_name(f"{removed.stem[:-3]}099.png")  # the same patient's image 099, new to the split
    shutil.copy(removed, added)
    with pytest.raises(PipelineError, match=r"the dataset does not match .*split\.json \(0 image\(s\) of it are "
                                            r"missing or relabelled, 1 image\(s\) are new\)"):
        prepare_split(str(data), split_path, protocol())
    added.unlink()
    removed.unlink()
    with pytest.raises(PipelineError, match=r"the dataset does not match .*split\.json \(1 image\(s\) of it are "
                                            r"missing or relabelled, 0 image\(s\) are new\)"):
        prepare_split(str(data), split_path, protocol())


def test_prepare_split_rejects_another_dataset(demo_dir, tmp_path):
    split_path = split_file(tmp_path)
    prepare_split(str(demo_dir), split_path, protocol())
    other = tmp_path / "other"
    make_demo_dataset(other, patients_per_class=5, images_per_patient=1, magnifications=("100",), width=16,
                      height=16, seed=1)
    with pytest.raises(PipelineError, match=r"the dataset does not match .*split\.json .*use the dataset it was "
                                            r"made for, or another --output-dir"):
        prepare_split(str(other), split_path, protocol())


@pytest.mark.parametrize("option, value", [("seed", 1), ("magnification", "100"), ("val_fraction", 0.25),
                                           ("method", "image")])
def test_prepare_split_rejects_other_split_options(demo_dir, tmp_path, option, value):
    split_path = split_file(tmp_path)
    prepare_split(str(demo_dir), split_path, protocol())
    expected = (f"{split_path} was made with other options ({option} {protocol()[option]!r} there, {value!r} now); "
                "pass the same options, or use another --output-dir")
    with pytest.raises(PipelineError) as error:
        prepare_split(str(demo_dir), split_path, protocol(**{option: value}))
    assert str(error.value) == expected


def test_prepare_split_rejects_a_hand_edited_split_file(demo_dir, tmp_path):
    split_path = split_file(tmp_path)
    prepare_split(str(demo_dir), split_path, protocol())
    original = split_path.read_text()
    content = json.loads(original)
    row = content["rows"][0]
    row["split"] = "test" if row["split"] != "test" else "train"
    split_path.write_text(json.dumps(content))
    with pytest.raises(PipelineError, match=r"split\.json was edited by hand"):
        prepare_split(str(demo_dir), split_path, protocol())
    content = json.loads(original)
    content["protocol"]["seed"] = 1  # the digest covers the protocol: a file cannot be made to claim other options
    split_path.write_text(json.dumps(content))
    with pytest.raises(PipelineError, match=r"split\.json was edited by hand"):
        prepare_split(str(demo_dir), split_path, protocol(seed=1))
    split_path.write_text("{not json")
    with pytest.raises(PipelineError, match=r"split\.json is unreadable"):
        prepare_split(str(demo_dir), split_path, protocol())


def test_a_split_file_of_format_1_is_refused_in_one_line(demo_dir, tmp_path):
    split_path = split_file(tmp_path)
    prepare_split(str(demo_dir), split_path, protocol())
    content = json.loads(split_path.read_text())
    # As the earlier version wrote split.json: format_version 1 and no kind.
    old = {"format_version": 1, **{key: content[key] for key in ("data_root", "protocol", "digest", "rows")}}
    split_path.write_text(json.dumps(old))
    expected = (f"{split_path} was written by an earlier version of the pipeline (format 1, this version reads 2); "
                "start the run again in a new --output-dir")
    with pytest.raises(PipelineError) as error:
        load_split(split_path)
    assert str(error.value) == expected and "\n" not in expected
    with pytest.raises(PipelineError) as error:  # what a model script meets: refused, never remade over the old run
        prepare_split(str(demo_dir), split_path, protocol())
    assert str(error.value) == expected
    assert json.loads(split_path.read_text()) == old


def test_a_split_file_is_not_read_as_a_folds_file(demo_dir, tmp_path):
    split_path = split_file(tmp_path)
    prepare_split(str(demo_dir), split_path, protocol())
    with pytest.raises(PipelineError, match=re.escape(str(split_path))):
        load_folds(split_path)


def test_subsample_split(demo_dir):
    records = index_dataset(demo_dir).records
    split = make_split(records, demo_dir, protocol())
    assert subsample_split(split, 48, seed=0) is split
    small = subsample_split(split, 12, seed=0)
    # Six (split, class) cells, each keeps round(12 * cell / 48) but at least one image.
    assert 6 <= len(small.records) <= 12 + 6
    assert set(small.splits) == {"train", "val", "test"}
    position = {record.path: index for index, record in enumerate(split.records)}
    kept = [position[record.path] for record in small.records]
    assert kept == sorted(kept) and len(set(kept)) == len(kept)  # the split file's order, no duplicates
    assert small.splits == [split.splits[index] for index in kept]  # each image keeps its split
    assert small.digest == split.digest
    assert subsample_split(split, 12, seed=0).records == small.records


# ------------------------------------------------------------------------------------------- bad input


def test_missing_data_dir(tmp_path):
    with pytest.raises(PipelineError, match=r"--data-dir .*nowhere does not exist"):
        index_dataset(tmp_path / "nowhere")


def test_empty_data_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError, match=r"--data-dir .*empty holds no BreaKHis tree"):
        index_dataset(tmp_path / "empty")


def test_breakhis_tree_without_images(tmp_path):
    (tmp_path / "BreaKHis_v1/histology_slides/breast/benign").mkdir(parents=True)
    with pytest.raises(PipelineError, match=r"--data-dir .*: no images found"):
        index_dataset(tmp_path)


def test_data_dir_that_is_a_file_but_not_a_manifest(tmp_path):
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(PipelineError, match=r"data\.txt is a file but not a \.csv manifest"):
        index_dataset(tmp_path / "data.txt")


def test_class_without_images(demo_dir, tmp_path):
    data = copy_demo(demo_dir, tmp_path)
    for image in (data / "BreaKHis_v1/histology_slides/breast/malignant").rglob("*.png"):
        image.unlink()
    with pytest.raises(PipelineError, match=r"the class 'malignant' has no images"):
        index_dataset(data)


def test_too_few_patients_for_the_split(tmp_path):
    make_demo_dataset(tmp_path, patients_per_class=2, images_per_patient=1, magnifications=("100",), width=16,
                      height=16)
    with pytest.raises(PipelineError, match=r"too few patients .*'benign' has 2 patient\(s\), the split needs "
                                            r"at least 3; lower --val-fraction/--test-fraction"):
        prepare_split(str(tmp_path), split_file(tmp_path), protocol())
    assert not split_file(tmp_path).exists()


def test_unknown_magnification(demo_dir, tmp_path):
    with pytest.raises(PipelineError, match=r"--magnification 50"):
        prepare_split(str(demo_dir), split_file(tmp_path), protocol(magnification="50"))


def test_corrupt_image_names_the_file(demo_dir, tmp_path):
    data = copy_demo(demo_dir, tmp_path)
    records = index_dataset(data).records
    garbage, truncated = data / records[0].path, data / records[1].path
    garbage.write_bytes(b"this is not a png\x00\x01\x02" * 10)
    truncated.write_bytes(truncated.read_bytes()[:200])
    assert len(index_dataset(data).records) == 48  # indexing never decodes
    for path in (garbage, truncated):
        with pytest.raises(PipelineError, match=rf"cannot read image .*{path.name}"):
            load_rgb(path)
    dataset = ImageRecords(data, records, build_transforms(train=False, image_size=32))
    with pytest.raises(PipelineError, match=rf"cannot read image .*{garbage.name}"):
        dataset[0]
    image, label, index = dataset[2]  # an intact neighbour still loads
    assert image.shape == (3, 32, 32) and (label, index) == (records[2].label, 2)


def test_a_symbolic_link_loop_is_skipped_with_a_warning(demo_dir, tmp_path, capsys):
    data = copy_demo(demo_dir, tmp_path)
    expected = index_dataset(data).records
    patient_folder = data / Path(expected[0].path).parent.parent
    (patient_folder / "back_to_breast").symlink_to(patient_folder.parent.parent.parent, target_is_directory=True)
    capsys.readouterr()
    assert index_dataset(data).records == expected  # neither an endless walk nor each image indexed twice
    assert f"WARNING: skipped {patient_folder / 'back_to_breast'}: a symbolic link leads to a folder already " \
           "indexed" in capsys.readouterr().out


# Pixel values that tell scaling (v * 255 / 65535, rounded) from clipping (anything > 255 -> 255) and from
# truncation to the high byte (v >> 8): 511 -> 2 (high byte 1), 1000 -> 4 (3), 32767 -> 127, 65535 -> 255.
SIXTEEN_BIT_VALUES = np.array([[0, 511, 1000], [32767, 33023, 65535]], dtype=np.uint16)


def eight_bits(values: np.ndarray) -> np.ndarray:
    return np.round(values.astype(np.float64) * 255 / 65535).astype(np.uint8)


def write_png_16_bit(path: Path, pixels: np.ndarray) -> None:
    """A minimal PNG encoder (PIL cannot write 16-bit colour): (H, W) grey or (H, W, 3) RGB, 16 bits per sample."""
    height, width = pixels.shape[:2]
    color_type = 2 if pixels.ndim == 3 else 0  # truecolour or greyscale
    big_endian = pixels.astype(">u2")
    scanlines = b"".join(b"\x00" + big_endian[row].tobytes() for row in range(height))  # filter 0 on each row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(scanlines))
                     + chunk(b"IEND", b""))


def _grey_png(path: Path) -> np.ndarray:
    Image.fromarray(SIXTEEN_BIT_VALUES).save(path)  # PIL mode I;16
    return np.repeat(eight_bits(SIXTEEN_BIT_VALUES)[..., None], 3, axis=2)


def _rgb_png(path: Path) -> np.ndarray:
    rgb = np.stack([SIXTEEN_BIT_VALUES, SIXTEEN_BIT_VALUES[::-1], 65535 - SIXTEEN_BIT_VALUES], axis=2)
    write_png_16_bit(path, rgb)
    return eight_bits(rgb)


def _grey_png_by_hand(path: Path) -> np.ndarray:
    write_png_16_bit(path, SIXTEEN_BIT_VALUES)
    return np.repeat(eight_bits(SIXTEEN_BIT_VALUES)[..., None], 3, axis=2)


def _grey_tiff(path: Path) -> np.ndarray:
    Image.fromarray(SIXTEEN_BIT_VALUES).save(path.with_suffix(".tif"))
    path.with_suffix(".tif").rename(path)  # the decoder goes by the content, not the name
    return np.repeat(eight_bits(SIXTEEN_BIT_VALUES)[..., None], 3, axis=2)


@pytest.mark.parametrize("write", [_grey_png, _rgb_png, _grey_png_by_hand, _grey_tiff])
def test_16_bit_images_are_scaled_to_8_bits_not_clipped(tmp_path, write):
    path = tmp_path / "image.png"
    expected = write(path)
    with Image.open(path) as image:
        assert image.size == (3, 2)
    pixels = np.asarray(load_rgb(path))
    assert pixels.dtype == np.uint8 and pixels.shape == (2, 3, 3)
    np.testing.assert_array_equal(pixels, expected)


def test_float_images_in_0_to_1_are_scaled_not_read_as_black(tmp_path):
    """PIL's own conversion of a float (mode F) TIFF clips 0..1 to 0 or 1: an image read as black."""
    values = np.array([[0.0, 0.25, 0.5], [0.75, 0.999, 1.0]], dtype=np.float32)
    path = tmp_path / "image.tif"
    Image.fromarray(values, mode="F").save(path)
    pixels = np.asarray(load_rgb(path))
    expected = np.round(values.astype(np.float64) * 255).astype(np.uint8)  # 0, 64, 128, 191, 255, 255
    np.testing.assert_array_equal(pixels, np.repeat(expected[..., None], 3, axis=2))


@pytest.mark.parametrize("bad", [2.0, -0.5, np.nan])
def test_float_images_outside_0_to_1_are_refused_naming_the_file(tmp_path, bad):
    path = tmp_path / "image.tif"
    Image.fromarray(np.array([[0.0, bad]], dtype=np.float32), mode="F").save(path)
    with pytest.raises(PipelineError, match=rf"^cannot read image {re.escape(str(path))}: its float pixel values "
                                            r"are not all within 0\.\.1"):
        load_rgb(path)


def test_16_bit_images_reach_the_cache_scaled(tmp_path):
    """Training, the cache, the heatmaps and predict all decode through load_rgb: the cache holds the scaled images."""
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    expected = []
    for index, class_name in enumerate(("benign", "malignant")):
        (data / class_name).mkdir(parents=True)
        rgb = rng.integers(0, 65536, size=(24, 40, 3), dtype=np.uint16)
        write_png_16_bit(data / class_name / f"image{index}.png", rgb)
        expected.append(np.asarray(resize_image(Image.fromarray(eight_bits(rgb)), 16)))
    indexed = index_dataset(data)
    cache = build_cache(indexed.root, indexed.records, image_size=16, mode="memory", cache_dir=None, workers=0)
    np.testing.assert_array_equal(cache, np.stack(expected))


# ------------------------------------------------------------------------------------------- transforms


def test_eval_transform_shape_and_imagenet_normalisation():
    pixels = np.zeros((40, 60, 3), np.uint8)
    pixels[...] = (200, 100, 50)  # uniform, so resizing keeps each value exactly
    tensor = build_transforms(train=False, image_size=32)(Image.fromarray(pixels))
    assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.float32
    expected = [(200 / 255 - IMAGENET_MEAN[0]) / IMAGENET_STD[0],
                (100 / 255 - IMAGENET_MEAN[1]) / IMAGENET_STD[1],
                (50 / 255 - IMAGENET_MEAN[2]) / IMAGENET_STD[2]]
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)
    assert torch.allclose(tensor[:, 7, 11], torch.tensor(expected), atol=1e-5)
    assert torch.allclose(tensor, torch.tensor(expected).view(3, 1, 1).expand(3, 32, 32), atol=1e-5)


def test_train_transform_shape(demo_dir):
    image = load_rgb(demo_dir / index_dataset(demo_dir).records[0].path)
    torch.manual_seed(0)
    tensor = build_transforms(train=True, image_size=32)(image)
    assert tensor.shape == (3, 32, 32) and torch.isfinite(tensor).all()


def test_protocol_line_says_when_the_data_has_no_patient_ids(demo_dir, tmp_path, capsys):
    breakhis = make_split(index_dataset(demo_dir).records, demo_dir, protocol())
    assert breakhis.protocol["groups"] == "patient"
    assert describe_protocol(breakhis.protocol).startswith("patient-level split")
    folders = index_dataset(_folder_pair(demo_dir, tmp_path, benign=6, malignant=6))
    capsys.readouterr()
    no_ids = make_split(folders.records, folders.root, protocol(val_fraction=0.2, test_fraction=0.2))
    assert "WARNING: 12 of 12 images have no patient ID" in capsys.readouterr().out
    assert no_ids.protocol["groups"] == "image"
    assert describe_protocol(no_ids.protocol).startswith("image-level (no patient IDs in the data")
    mixed = make_split(breakhis.records + folders.records, demo_dir, protocol())
    assert describe_protocol(mixed.protocol).startswith("patient-level (images without a patient ID each their own")


def test_protocol_line_names_a_subsample_and_options_are_checked():
    protocol = {"method": "patient", "fold_file": None, "val_fraction": 0.1, "test_fraction": 0.2, "seed": 0,
                "magnification": "all"}
    assert "max-images" not in describe_protocol(protocol)
    assert "subsampled to at most 200 images (--max-images)" in describe_protocol({**protocol, "max_images": 200})
    for bad in (["--max-images", "0"], ["--workers", "-1"], ["--lr", "0"], ["--overlays", "-2"]):
        with pytest.raises(PipelineError, match=re.escape(bad[0])):
            parse("--data-dir", "d", *bad)


@pytest.mark.parametrize("below", ["", "BreaKHis_v1", "BreaKHis_v1/histology_slides",
                                   "BreaKHis_v1/histology_slides/breast"])
def test_demo_tree_is_known_as_synthetic_wherever_data_dir_points(demo_dir, below):
    """The demo writer's marker is found from every folder a user may give as --data-dir."""
    dataset = index_dataset(demo_dir / below)
    assert is_synthetic_dataset(dataset.root, [record.path for record in dataset.records])


def test_tree_without_the_marker_is_not_synthetic(demo_dir, tmp_path):
    copy = shutil.copytree(demo_dir, tmp_path / "data")
    markers = list(copy.rglob(SYNTHETIC_MARKER))
    assert len(markers) == 1
    markers[0].unlink()
    dataset = index_dataset(copy)
    assert not is_synthetic_dataset(dataset.root, [record.path for record in dataset.records])
