"""Patient-level K-fold evaluation: the folds, each fold's train/val/test split, the folds file, and cross-fitted
stacking on out-of-fold rows.

    folds = make_kfold(records, n_folds=5, seed=0, val_fraction=0.2)     # or folds_from_fold_files(records, [...])
    folds.folds                  # (N,) fold index of every record: fold k's patients are fold k's test set
    fold_splits(folds, k)        # 'train' / 'val' / 'test' of every record for fold k
    save_folds(path, folds); load_folds(path)                              # folds.json, digest-checked
    prepare_folds(records, path, protocol)                                 # make + save once, then load + check

Cross-fitting (DESIGN.md, "Cross-fitted stacking"): each CNN trained on fold k's train side exports the rows of
fold k's images; together these are the out-of-fold set (every image once, each row made by a model that never
saw its patient). A stacker for outer fold k is fitted on the other folds' rows only and predicts fold k:

    oof = OutOfFold(folds=..., labels=..., patients=..., logits={"densenet121": (N, 2), ...}, features=(N, F))
    stacked = cross_fit(oof, logistic_regression_stacker(), select_fraction=0.2, seed=0)
    stacked.prob_malignant       # (N,) pooled out-of-fold P(malignant)
    stacked.fit_rows[k]          # the rows the stacker of fold k was fitted on (never a fold-k patient)
"""

import hashlib
import json
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from common.data import CLASS_NAMES, Record, assign_groups, majority_labels, patient_labels, read_fold_file
from common.errors import PipelineError
from common.fileio import write_json
from common.metrics import softmax

FOLDS_FILE_NAME = "folds.json"
FOLDS_FORMAT_VERSION = 1
DEFAULT_FOLDS = 5


@dataclass(frozen=True)
class Folds:
    """Every record with the fold whose test set it belongs to, and how the folds were made."""

    records: list[Record]
    folds: np.ndarray  # (N,) int64 in [0, n_folds)
    protocol: dict  # {'method': 'kfold'|'fold_files', 'n_folds', 'seed', 'val_fraction', 'stratified_by', ...}
    digest: str  # sha256 of the protocol and the rows (folds_digest)

    @property
    def n_folds(self) -> int:
        return int(self.protocol["n_folds"])

    def test_indices(self, fold: int) -> np.ndarray:
        return np.flatnonzero(self.folds == fold)


def folds_digest(records: list[Record], folds, protocol: dict) -> str:
    """sha256 of the protocol (it fixes each fold's val patients) and one line per record, as split_digest."""
    digest = hashlib.sha256(json.dumps(protocol, sort_keys=True).encode() + b"\n")
    for record, fold in zip(records, folds):
        digest.update(f"{record.path}|{record.label}|{record.patient}|{record.magnification}|{record.subtype}|"
                      f"{int(fold)}\n".encode())
    return digest.hexdigest()


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
    0, 1, ..., K-1, 0, ... in ONE pass that does not restart per stratum, so the folds' totals, each class and each
    stratum differ between folds by at most one patient. The fold numbers are then permuted with the seed, so
    fold 0 is not always the one that gets the remainders first."""
    rng = np.random.default_rng(seed)
    members: dict[tuple, list[str]] = defaultdict(list)
    for patient in sorted(strata):
        members[strata[patient]].append(patient)
    fold_names = rng.permutation(n_folds)
    fold_of, position = {}, 0
    for stratum in sorted(members):
        patients = list(members[stratum])
        rng.shuffle(patients)
        for patient in patients:
            fold_of[patient] = int(fold_names[position % n_folds])
            position += 1
    return fold_of


def make_kfold(records: list[Record], *, n_folds: int = DEFAULT_FOLDS, seed: int = 0,
               val_fraction: float = 0.2) -> Folds:
    """K folds of patients, stratified by class (and tumour subtype where known); every fold has both classes."""
    if n_folds < 2:
        raise PipelineError(f"--folds {n_folds}: K-fold evaluation needs at least 2 folds")
    patients_per_class = Counter(patient_labels(records).values())
    for label, class_name in enumerate(CLASS_NAMES):
        if patients_per_class[label] < n_folds:
            raise PipelineError(f"--folds {n_folds}: class '{class_name}' has {patients_per_class[label]} patient(s), "
                                "fewer than the folds, so some test fold would lack it; lower --folds or add data")
    strata, stratified_by = _patient_strata(records)
    fold_of = _deal_round_robin(strata, n_folds, seed)
    folds = np.array([fold_of[record.patient] for record in records], dtype=np.int64)
    protocol = {"method": "kfold", "n_folds": n_folds, "seed": seed, "val_fraction": val_fraction,
                "stratified_by": stratified_by}
    return Folds(list(records), folds, protocol, folds_digest(records, folds, protocol))


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


def folds_from_fold_files(records: list[Record], fold_files: list, *, val_fraction: float = 0.2,
                          seed: int = 0) -> Folds:
    """Fold k = the test side of the k-th fold file (dsfold1..5.txt). Records the files do not name are left out."""
    fold_files = [Path(path) for path in fold_files]
    if len(fold_files) < 2:
        raise PipelineError("K-fold evaluation from fold files needs at least 2 fold files")
    tests = _disjoint_test_sides(fold_files, [read_fold_file(path) for path in fold_files])
    fold_of_name = {name: fold for fold, names in enumerate(tests) for name in names}
    kept = [record for record in records if Path(record.path).name in fold_of_name]
    folds = np.array([fold_of_name[Path(record.path).name] for record in kept], dtype=np.int64)
    for fold, path in enumerate(fold_files):
        if not np.any(folds == fold):
            raise PipelineError(f"fold file {path} names no test image of this dataset")
    folds_of_patient: dict[str, set[int]] = defaultdict(set)
    for record, fold in zip(kept, folds):
        folds_of_patient[record.patient].add(int(fold))
    split_patients = sorted(patient for patient, found in folds_of_patient.items() if len(found) > 1)
    if split_patients:
        raise PipelineError(f"fold files put patient(s) {', '.join(split_patients[:5])} on the test sides of two "
                            "files; a patient-level evaluation needs each patient in one fold")
    protocol = {"method": "fold_files", "n_folds": len(fold_files), "seed": seed, "val_fraction": val_fraction,
                "fold_files": [str(path) for path in fold_files], "left_out": len(records) - len(kept),
                "stratified_by": "the fold files"}
    return Folds(kept, folds, protocol, folds_digest(kept, folds, protocol))


def fold_splits(folds: Folds, fold: int) -> list[str]:
    """Split name of every record for fold `fold`: its patients 'test'; of the other folds' patients,
    val_fraction per class (seeded with seed + fold) 'val', the rest 'train'."""
    if not 0 <= fold < folds.n_folds:
        raise PipelineError(f"fold {fold} does not exist: the folds file has folds 0 to {folds.n_folds - 1}")
    others = [record for record, record_fold in zip(folds.records, folds.folds) if record_fold != fold]
    val_fraction = folds.protocol["val_fraction"]
    val_of = assign_groups(patient_labels(others), {"train": 1.0 - val_fraction, "val": val_fraction},
                           folds.protocol["seed"] + fold)
    return ["test" if record_fold == fold else val_of[record.patient]
            for record, record_fold in zip(folds.records, folds.folds)]


# ------------------------------------------------------------------------------------------ the folds file


def save_folds(path: str | Path, folds: Folds) -> None:
    rows = [dict(asdict(record), fold=int(fold)) for record, fold in zip(folds.records, folds.folds)]
    write_json(path, {"format_version": FOLDS_FORMAT_VERSION, "protocol": folds.protocol, "digest": folds.digest,
                      "rows": rows})


def load_folds(path: str | Path) -> Folds:
    """The folds file at `path`, checked: readable, known format, folds in range, digest of its rows."""
    try:
        content = json.loads(Path(path).read_text(encoding="utf-8"))
        if content["format_version"] != FOLDS_FORMAT_VERSION:
            raise ValueError(f"format_version {content['format_version']!r}, expected {FOLDS_FORMAT_VERSION}")
        rows, protocol = content["rows"], content["protocol"]
        records = [Record(row["path"], int(row["label"]), row["subtype"], row["patient"], row["magnification"])
                   for row in rows]
        folds = np.array([int(row["fold"]) for row in rows], dtype=np.int64)
        n_folds, digest = int(protocol["n_folds"]), str(content["digest"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise PipelineError(f"folds file {path} is unreadable ({error}); delete it to make new folds") from None
    if folds_digest(records, folds, protocol) != digest:
        raise PipelineError(f"folds file {path} was edited by hand (its digest does not match); delete it to remake it")
    if folds.size and (folds.min() < 0 or folds.max() >= n_folds):
        raise PipelineError(f"folds file {path} holds fold numbers outside 0..{n_folds - 1}; delete it to remake it")
    return Folds(records, folds, protocol, digest)


def _plain(protocol: dict) -> dict:
    """The protocol as it reads back from JSON (paths as strings, tuples as lists), so it compares equal later."""
    return json.loads(json.dumps(protocol, default=str))


def make_folds(records: list[Record], protocol: dict) -> Folds:
    """Folds as `protocol` asks: {'method': 'kfold', 'n_folds', 'seed', 'val_fraction'} or
    {'method': 'fold_files', 'fold_files': [...], 'seed', 'val_fraction'}; other keys are kept as given."""
    protocol = _plain(protocol)
    options = {"seed": protocol["seed"], "val_fraction": protocol["val_fraction"]}
    if protocol["method"] == "kfold":
        folds = make_kfold(records, n_folds=protocol["n_folds"], **options)
    elif protocol["method"] == "fold_files":
        folds = folds_from_fold_files(records, protocol["fold_files"], **options)
    else:
        raise PipelineError(f"unknown fold method {protocol['method']!r}: use 'kfold' or 'fold_files'")
    full_protocol = {**protocol, **folds.protocol}
    return Folds(folds.records, folds.folds, full_protocol, folds_digest(folds.records, folds.folds, full_protocol))


def prepare_folds(records: list[Record], path: str | Path, protocol: dict) -> Folds:
    """The folds in `path`, made and saved there by the first caller; later callers must pass the same protocol
    and the same records (path, label, patient), or they stop with an error instead of mixing two fold sets."""
    path, protocol = Path(path), _plain(protocol)
    if not path.exists():
        folds = make_folds(records, protocol)
        save_folds(path, folds)
        return folds
    folds = load_folds(path)
    changed = [f"{key}: folds file {folds.protocol.get(key)!r}, this run {value!r}"
               for key, value in protocol.items() if folds.protocol.get(key) != value]
    if changed:
        raise PipelineError(f"{path} was made with other fold options ({'; '.join(changed)}); pass the same "
                            "options or use another --output-dir")
    indexed = {(record.path, record.label, record.patient) for record in records}
    in_folds = {(record.path, record.label, record.patient) for record in folds.records}
    if not in_folds <= indexed or (protocol["method"] == "kfold" and in_folds != indexed):
        raise PipelineError(f"the dataset does not match {path} ({len(in_folds - indexed)} image(s) of the folds file "
                            f"are missing or relabelled, {len(indexed - in_folds)} image(s) are new); use the dataset "
                            "the folds were made for, or another --output-dir")
    return folds


# ------------------------------------------------------------------------------------- cross-fitted stacking


@dataclass(frozen=True)
class OutOfFold:
    """Out-of-fold rows, one per image: each made by the models of the fold whose test set holds the image."""

    folds: np.ndarray  # (N,) int, the outer fold of each row
    labels: np.ndarray  # (N,) int, 0 benign, 1 malignant; -1 where hidden from a stacker (rows it predicts)
    patients: np.ndarray  # (N,) str
    logits: dict[str, np.ndarray]  # model name -> (N, 2) logits of that CNN
    features: np.ndarray | None = None  # (N, F), e.g. heatmap features for an MLP
    rows: np.ndarray | None = None  # (N,) positions in the full out-of-fold set; None = the full set itself

    def __post_init__(self):
        n_rows = len(self.folds)
        arrays = {"labels": self.labels, "patients": self.patients, "features": self.features,
                  **{f"logits[{name}]": value for name, value in self.logits.items()}}
        wrong = [name for name, value in arrays.items() if value is not None and len(value) != n_rows]
        if wrong:
            raise PipelineError(f"out-of-fold arrays {', '.join(wrong)} do not have one row per image ({n_rows})")
        if any(np.ndim(value) != 2 or np.shape(value)[1] != 2 for value in self.logits.values()):
            raise PipelineError("out-of-fold logits must be (N, 2) per model")

    def take(self, rows: np.ndarray, *, hide_labels: bool = False) -> "OutOfFold":
        """The given rows (positions in this set); hide_labels replaces their labels by -1."""
        rows = np.asarray(rows, dtype=np.int64)
        labels = np.full(len(rows), -1, dtype=np.int64) if hide_labels else self.labels[rows]
        return OutOfFold(self.folds[rows], labels, self.patients[rows],
                         {name: value[rows] for name, value in self.logits.items()},
                         None if self.features is None else self.features[rows],
                         rows if self.rows is None else self.rows[rows])

    def concatenate(self, other: "OutOfFold") -> "OutOfFold":
        """These rows followed by `other`'s (both taken from one out-of-fold set)."""
        def both(first, second):
            return None if first is None or second is None else np.concatenate([first, second])
        return OutOfFold(both(self.folds, other.folds), both(self.labels, other.labels),
                         both(self.patients, other.patients),
                         {name: both(value, other.logits[name]) for name, value in self.logits.items()},
                         both(self.features, other.features), both(self.rows, other.rows))


# fit_predict(fit_rows, select_rows, predict_rows) -> (len(predict_rows),) P(malignant). The stacker learns its
# weights on fit_rows, picks any epoch or hyperparameter on select_rows (other patients), and predicts
# predict_rows, whose labels it is given as -1.
FitPredict = Callable[[OutOfFold, OutOfFold, OutOfFold], np.ndarray]


@dataclass(frozen=True)
class CrossFit:
    prob_malignant: np.ndarray  # (N,) pooled out-of-fold P(malignant)
    fit_rows: dict[int, np.ndarray]  # outer fold -> row positions the stacker was fitted on
    select_rows: dict[int, np.ndarray]  # outer fold -> row positions it selected its hyperparameters on


def _check_patients_in_one_fold(oof: OutOfFold) -> None:
    folds_of_patient: dict[str, set[int]] = defaultdict(set)
    for patient, fold in zip(oof.patients, oof.folds):
        folds_of_patient[str(patient)].add(int(fold))
    split_patients = sorted(patient for patient, found in folds_of_patient.items() if len(found) > 1)
    if split_patients:
        raise PipelineError(f"out-of-fold rows put patient(s) {', '.join(split_patients[:5])} in two folds; "
                            "cross-fitting needs patient-level folds")


def cross_fit(oof: OutOfFold, fit_predict: FitPredict, *, select_fraction: float = 0.2, seed: int = 0) -> CrossFit:
    """For each outer fold k: fit on the other folds' rows (select_fraction of their patients per class held out
    as select rows, seeded with seed + k), predict fold k. Returns the pooled predictions and the rows used."""
    _check_patients_in_one_fold(oof)
    prob_malignant = np.full(len(oof.folds), np.nan)
    fit_rows, select_rows = {}, {}
    for fold in sorted(int(fold) for fold in np.unique(oof.folds)):
        outer_test = np.flatnonzero(oof.folds == fold)
        others = np.flatnonzero(oof.folds != fold)
        side_of = assign_groups(majority_labels(oof.patients[others], oof.labels[others]),
                                {"fit": 1.0 - select_fraction, "select": select_fraction}, seed + fold)
        sides = np.array([side_of[str(patient)] for patient in oof.patients[others]])
        fit_rows[fold], select_rows[fold] = others[sides == "fit"], others[sides == "select"]
        predicted = np.asarray(fit_predict(oof.take(fit_rows[fold]), oof.take(select_rows[fold]),
                                           oof.take(outer_test, hide_labels=True)), dtype=np.float64)
        if predicted.shape != outer_test.shape:
            raise PipelineError(f"the stacker returned {predicted.shape} predictions for fold {fold}'s "
                                f"{len(outer_test)} rows; it must return one P(malignant) per row")
        prob_malignant[outer_test] = predicted
    return CrossFit(prob_malignant, fit_rows, select_rows)


def soft_vote(logits: dict[str, np.ndarray]) -> np.ndarray:
    """(N,) mean of the CNNs' P(malignant): needs no fitting, so no cross-fitting."""
    return np.mean([softmax(np.asarray(value, dtype=np.float64))[:, 1] for value in logits.values()], axis=0)


def logit_margins(rows: OutOfFold) -> np.ndarray:
    """(N, M) each CNN's malignant-minus-benign logit (softmax depends on nothing else), models by sorted name."""
    return np.stack([rows.logits[name][:, 1] - rows.logits[name][:, 0] for name in sorted(rows.logits)], axis=1)


def logistic_regression_stacker(*, c_grid: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)) -> FitPredict:
    """Logistic regression on the CNNs' logit margins (standardised on the fit rows): the inverse regularisation
    strength C with the lowest log loss on the select rows is kept, then refitted on fit + select rows."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    def fit(rows: OutOfFold, c: float):
        if len(np.unique(rows.labels)) < 2:
            raise PipelineError("the logistic-regression stacker's fit rows hold one class only; use more folds "
                                "or patients")
        return make_pipeline(StandardScaler(), LogisticRegression(C=c)).fit(logit_margins(rows), rows.labels)

    def fit_predict(fit_rows: OutOfFold, select_rows: OutOfFold, predict_rows: OutOfFold) -> np.ndarray:
        # A fit on a few thousand rows of M features gains nothing from BLAS threads; on a busy machine their
        # spin-waits made each L-BFGS step take milliseconds (5 folds x 5 fits: seconds instead of a fraction).
        with threadpool_limits(limits=1):
            return _select_and_fit(fit_rows, select_rows, predict_rows)

    def _select_and_fit(fit_rows: OutOfFold, select_rows: OutOfFold, predict_rows: OutOfFold) -> np.ndarray:
        best_c = c_grid[0]
        if len(select_rows.labels) and len(c_grid) > 1:
            losses = [log_loss(select_rows.labels, fit(fit_rows, c).predict_proba(logit_margins(select_rows))[:, 1],
                               labels=[0, 1]) for c in c_grid]
            best_c = c_grid[int(np.argmin(losses))]
        return fit(fit_rows.concatenate(select_rows), best_c).predict_proba(logit_margins(predict_rows))[:, 1]

    return fit_predict
