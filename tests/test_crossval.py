"""Patient-level K-fold (common.data.partition): folds, each fold's splits, official fold files, the folds file, and
cross-fitted stacking that never fits on the patients it predicts. Synthetic records only, no images; CPU, seconds.
"""

import json
from collections import Counter, defaultdict

import numpy as np
import pytest

from common.core.errors import PipelineError
from common.data.partition import fold_splits, folds_from_fold_files, load_folds, make_kfold, prepare_folds, save_folds
from common.data.records import Record
from common.evaluation.metrics import roc_auc, softmax
from common.fusion.stacking import OutOfFold, cross_fit, logistic_regression_stacker, soft_vote

# BreaKHis-like patients per subtype (the real dataset: A 4, F 10, PT 3, TA 7 | DC 38, LC 5, MC 9, PC 6).
SUBTYPE_PATIENTS = {0: {"A": 3, "F": 6, "PT": 2, "TA": 4}, 1: {"DC": 12, "LC": 3, "MC": 5, "PC": 4}}


def breakhis_like_records(*, seed: int = 0, subtypes: bool = True) -> list[Record]:
    """Records of 39 patients (15 benign, 24 malignant), 2 magnifications, 1 to 4 images each (names only)."""
    rng = np.random.default_rng(seed)
    records = []
    for label, per_subtype in SUBTYPE_PATIENTS.items():
        for subtype, count in per_subtype.items():
            for number in range(count):
                patient = f"14-{label}{subtype}{number:03d}"
                for magnification in ("100", "400"):
                    for sequence in range(1, int(rng.integers(1, 5)) + 1):
                        name = f"SOB_{'BM'[label]}_{subtype}-{patient}-{magnification}-{sequence:03d}.png"
                        records.append(Record(f"tree/{patient}/{magnification}X/{name}", label,
                                              subtype if subtypes else "", patient, magnification))
    return records


def patients_of(records, mask) -> set[str]:
    return {record.patient for record, chosen in zip(records, mask) if chosen}


def test_kfold_every_image_in_exactly_one_test_fold_and_each_patient_in_one_fold():
    records = breakhis_like_records()
    folds = make_kfold(records, n_folds=5, seed=0)
    assert folds.folds.shape == (len(records),) and set(folds.folds) == set(range(5))
    times_tested = np.zeros(len(records), dtype=int)
    for fold in range(5):
        times_tested += np.array([split == "test" for split in fold_splits(folds, fold)])
    assert times_tested.tolist() == [1] * len(records)
    folds_of_patient = defaultdict(set)
    for record, fold in zip(records, folds.folds):
        folds_of_patient[record.patient].add(int(fold))
    assert all(len(found) == 1 for found in folds_of_patient.values())


def test_kfold_is_stratified_by_class_and_subtype():
    records = breakhis_like_records()
    folds = make_kfold(records, n_folds=5, seed=3)
    assert folds.protocol["stratified_by"] == "label+subtype"
    fold_of_patient = {record.patient: int(fold) for record, fold in zip(records, folds.folds)}
    stratum_of = {record.patient: (record.label, record.subtype) for record in records}
    per_fold = defaultdict(Counter)  # stratum -> patients per fold
    for patient, fold in fold_of_patient.items():
        per_fold[stratum_of[patient]][fold] += 1
        per_fold[stratum_of[patient][0]][fold] += 1  # the class as a whole
        per_fold["all"][fold] += 1
    for stratum, counts in per_fold.items():  # spread as evenly as the stratum's size allows
        spread = [counts[fold] for fold in range(5)]
        assert max(spread) - min(spread) <= 1, (stratum, spread)
    for fold in range(5):  # every test fold has both classes
        assert {record.label for record, record_fold in zip(records, folds.folds) if record_fold == fold} == {0, 1}


def test_kfold_without_subtypes_stratifies_by_class_and_says_so():
    records = breakhis_like_records(subtypes=False)
    folds = make_kfold(records, n_folds=4, seed=0)
    assert folds.protocol["stratified_by"] == "label"
    per_class = Counter((record.label, int(fold)) for record, fold in
                        {record.patient: (record, fold) for record, fold in zip(records, folds.folds)}.values())
    for label in (0, 1):
        counts = [per_class[(label, fold)] for fold in range(4)]
        assert max(counts) - min(counts) <= 1 and min(counts) >= 1


def test_kfold_same_seed_same_folds_other_seed_other_folds():
    records = breakhis_like_records()
    first, again, other = (make_kfold(records, n_folds=5, seed=seed) for seed in (7, 7, 8))
    assert np.array_equal(first.folds, again.folds) and first.digest == again.digest
    assert not np.array_equal(first.folds, other.folds) and first.digest != other.digest


def test_val_patients_come_from_the_other_folds_only():
    records = breakhis_like_records()
    folds = make_kfold(records, n_folds=5, seed=0, val_fraction=0.25)
    for fold in range(5):
        splits = np.array(fold_splits(folds, fold))
        test = patients_of(records, splits == "test")
        val, train = patients_of(records, splits == "val"), patients_of(records, splits == "train")
        assert test == patients_of(records, folds.folds == fold)
        assert not (val & test) and not (train & test) and not (train & val)
        assert {record.label for record, split in zip(records, splits) if split == "val"} == {0, 1}
        others = len(patients_of(records, folds.folds != fold))
        assert abs(len(val) - 0.25 * others) <= 2  # a quarter per class, rounded


def test_kfold_refuses_too_few_patients_and_unknown_folds():
    records = [record for record in breakhis_like_records() if record.label == 1 or "-0A" in record.patient]
    with pytest.raises(PipelineError, match=r"--folds 5: class 'benign' has 3 patient\(s\)"):
        make_kfold(records, n_folds=5)
    with pytest.raises(PipelineError, match="at least 2 folds"):
        make_kfold(breakhis_like_records(), n_folds=1)
    with pytest.raises(PipelineError, match="fold 5 does not exist"):
        fold_splits(make_kfold(breakhis_like_records(), n_folds=5), 5)


# ----------------------------------------------------------------------------------- official fold files


def write_fold_files(folder, records, fold_of_patient: dict[str, int], n_folds: int, *, leave_out=()) -> list:
    """dsfold1..n.txt in the official format: every named image on the test side of its patient's fold."""
    paths = []
    for fold in range(n_folds):
        lines = []
        for record in records:
            if record.patient in leave_out:
                continue
            name = record.path.rsplit("/", 1)[1]
            side = "test" if fold_of_patient[record.patient] == fold else "train"
            lines.append(f"{name}|{record.magnification}|{fold + 1}|{side}")
        path = folder / f"dsfold{fold + 1}.txt"
        path.write_text("\n".join(lines) + "\n")
        paths.append(path)
    return paths


def test_official_fold_files_as_the_folds(tmp_path):
    records = breakhis_like_records()
    patients = sorted({record.patient for record in records})
    fold_of_patient = {patient: index % 5 for index, patient in enumerate(patients)}
    left_out = patients[0]
    paths = write_fold_files(tmp_path, records, fold_of_patient, 5, leave_out={left_out})
    folds = folds_from_fold_files(records, paths, val_fraction=0.2, seed=0)
    assert folds.protocol["method"] == "fold_files" and folds.n_folds == 5
    assert folds.protocol["stratified_by"] == "the fold files"
    assert folds.protocol["left_out"] == sum(record.patient == left_out for record in records)
    assert left_out not in {record.patient for record in folds.records}
    assert [int(fold) for fold in folds.folds] == [fold_of_patient[record.patient] for record in folds.records]
    splits = np.array(fold_splits(folds, 2))
    fold_2 = {patient for patient, fold in fold_of_patient.items() if fold == 2}
    assert patients_of(folds.records, splits == "test") == fold_2 - {left_out}


def test_official_fold_files_with_overlapping_test_sides_are_refused(tmp_path):
    records = breakhis_like_records()
    patients = sorted({record.patient for record in records})
    paths = write_fold_files(tmp_path, records, {patient: index % 5 for index, patient in enumerate(patients)}, 5)
    # What the official BreaKHis folds are: independent train/test splits whose test sides overlap.
    first_test = next(line for line in paths[0].read_text().splitlines() if line.endswith("|test"))
    lines = paths[1].read_text().replace(first_test.replace("|1|test", "|2|train"), first_test.replace("|1|", "|2|"))
    paths[1].write_text(lines)
    with pytest.raises(PipelineError, match=r"dsfold1.txt and .*dsfold2.txt both put 1 image\(s\) on their test "
                                            r"side .*disjoint test sides"):
        folds_from_fold_files(records, paths)


def test_official_fold_files_that_do_not_cover_the_images_are_refused(tmp_path):
    records = breakhis_like_records()
    patients = sorted({record.patient for record in records})
    paths = write_fold_files(tmp_path, records, {patient: index % 5 for index, patient in enumerate(patients)}, 5)
    with pytest.raises(PipelineError, match=r"image\(s\) are on no file's test side"):
        folds_from_fold_files(records, paths[:4])  # fold 5's test images are on the train side of the others


def test_official_fold_files_putting_a_patient_in_two_folds_are_refused(tmp_path):
    records = breakhis_like_records()
    patients = sorted({record.patient for record in records})
    fold_of_patient = {patient: index % 5 for index, patient in enumerate(patients)}
    paths = write_fold_files(tmp_path, records, fold_of_patient, 5)
    moved = next(record for record in records if record.patient == patients[0])  # fold 0 -> its image to fold 1
    name = moved.path.rsplit("/", 1)[1]
    paths[0].write_text(paths[0].read_text().replace(f"{name}|{moved.magnification}|1|test",
                                                     f"{name}|{moved.magnification}|1|train"))
    paths[1].write_text(paths[1].read_text().replace(f"{name}|{moved.magnification}|2|train",
                                                     f"{name}|{moved.magnification}|2|test"))
    with pytest.raises(PipelineError, match=f"patient\\(s\\) {patients[0]} on the test sides of two files"):
        folds_from_fold_files(records, paths)


# ----------------------------------------------------------------------------------- the folds file


def test_folds_file_round_trip_and_digest_check(tmp_path):
    folds = make_kfold(breakhis_like_records(), n_folds=5, seed=1)
    path = tmp_path / "folds.json"
    save_folds(path, folds)
    loaded = load_folds(path)
    assert loaded.records == folds.records and np.array_equal(loaded.folds, folds.folds)
    assert loaded.protocol == folds.protocol and loaded.digest == folds.digest
    content = json.loads(path.read_text())
    assert set(content["rows"][0]) == {"path", "label", "patient", "magnification", "subtype", "fold"}
    content["rows"][0]["fold"] = (content["rows"][0]["fold"] + 1) % 5
    path.write_text(json.dumps(content))
    with pytest.raises(PipelineError, match=r"folds file .*folds.json was edited by hand"):
        load_folds(path)
    path.write_text("{not json")
    with pytest.raises(PipelineError, match=r"folds file .*folds.json is unreadable"):
        load_folds(path)


def test_prepare_folds_makes_once_then_checks_options_and_data(tmp_path):
    records = breakhis_like_records()
    protocol = {"method": "kfold", "n_folds": 5, "seed": 0, "val_fraction": 0.2, "magnification": "all"}
    path = tmp_path / "run" / "folds.json"
    made = prepare_folds(records, path, protocol)
    assert path.is_file() and made.protocol["magnification"] == "all"
    again = prepare_folds(records, path, protocol)
    assert again.digest == made.digest and np.array_equal(again.folds, made.folds)
    with pytest.raises(PipelineError, match=r"other fold options \(n_folds: folds file 5, this run 4\)"):
        prepare_folds(records, path, {**protocol, "n_folds": 4})
    with pytest.raises(PipelineError, match=r"does not match .*folds.json \(0 image\(s\) .* 1 image\(s\) are new"):
        prepare_folds(records + [Record("tree/new.png", 0, "A", "14-new", "100")], path, protocol)


# ----------------------------------------------------------------------------------- cross-fitted stacking


def out_of_fold_rows(*, seed: int = 0) -> OutOfFold:
    """Out-of-fold rows of the K-fold records: three CNNs whose logits carry the label plus noise, and features."""
    records = breakhis_like_records(seed=seed)
    folds = make_kfold(records, n_folds=5, seed=seed)
    rng = np.random.default_rng(seed)
    labels = np.array([record.label for record in records])
    logits = {}
    for name, strength in (("densenet121", 2.0), ("resnet50", 1.0), ("vgg16", 0.2)):
        margin = strength * (2 * labels - 1) + rng.normal(0, 1, len(labels))
        logits[name] = np.stack([-margin / 2, margin / 2], axis=1)
    features = np.stack([labels + rng.normal(0, 0.5, len(labels)), rng.normal(0, 1, len(labels))], axis=1)
    return OutOfFold(folds.folds, labels, np.array([record.patient for record in records]), logits, features)


def test_stacker_fit_rows_never_include_the_outer_test_folds_patients():
    oof = out_of_fold_rows()
    calls = []

    def nearest_centroid(fit_rows: OutOfFold, select_rows: OutOfFold, predict_rows: OutOfFold) -> np.ndarray:
        """An example of the generic hook (what the heatmap MLP will plug into): features -> P(malignant)."""
        calls.append((fit_rows, select_rows, predict_rows))
        centroids = [fit_rows.features[fit_rows.labels == label].mean(axis=0) for label in (0, 1)]
        distances = [np.linalg.norm(predict_rows.features - centroid, axis=1) for centroid in centroids]
        return distances[0] / (distances[0] + distances[1])

    stacked = cross_fit(oof, nearest_centroid, select_fraction=0.2, seed=0)
    assert len(calls) == 5 and not np.isnan(stacked.prob_malignant).any()
    for fold in range(5):
        test_patients = set(oof.patients[oof.folds == fold])
        fit_rows, select_rows = stacked.fit_rows[fold], stacked.select_rows[fold]
        assert not set(oof.patients[fit_rows]) & test_patients
        assert not set(oof.patients[select_rows]) & test_patients
        assert not set(oof.patients[fit_rows]) & set(oof.patients[select_rows])  # select: other patients
        assert sorted(np.concatenate([fit_rows, select_rows])) == np.flatnonzero(oof.folds != fold).tolist()
        fit_seen, select_seen, predict_seen = calls[fold]
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
    with pytest.raises(PipelineError, match="returned .* predictions for fold 0"):
        cross_fit(oof, lambda fit_rows, select_rows, predict_rows: np.zeros(3))
    with pytest.raises(PipelineError, match=r"labels do not have one row per image"):
        OutOfFold(oof.folds, oof.labels[:-1], oof.patients, oof.logits)
    mixed = oof.folds.copy()
    mixed[np.flatnonzero(oof.patients == oof.patients[0])[0]] = (oof.folds[0] + 1) % 5
    with pytest.raises(PipelineError, match=f"put patient\\(s\\) {oof.patients[0]} in two folds"):
        cross_fit(OutOfFold(mixed, oof.labels, oof.patients, oof.logits), logistic_regression_stacker())


def test_prepare_folds_accepts_paths_for_fold_files(tmp_path):
    records = breakhis_like_records()
    patients = sorted({record.patient for record in records})
    paths = write_fold_files(tmp_path, records, {patient: index % 3 for index, patient in enumerate(patients)}, 3)
    protocol = {"method": "fold_files", "fold_files": paths, "seed": 0, "val_fraction": 0.2}  # Path objects
    made = prepare_folds(records, tmp_path / "folds.json", protocol)
    assert made.protocol["fold_files"] == [str(path) for path in paths] and made.n_folds == 3
    assert prepare_folds(records, tmp_path / "folds.json", protocol).digest == made.digest
