"""Statistics of a K-fold evaluation: patient-level diagnosis, per-fold mean ± sd, and a paired patient bootstrap.

    bootstrap = PatientBootstrap.draw(labels=labels, patients=patients, resamples=2000, seed=0)
    row = evaluate_row(prob_mlp, labels=labels, patients=patients, folds=folds, bootstrap=bootstrap)
    difference = bootstrap.difference(prob_mlp, prob_vote)      # the SAME resampled patients for both rows
    describe_difference("the heatmap MLP", "the soft vote", "roc_auc", difference["image"]["roc_auc"])

Why patients and not images: images of one patient are strongly correlated (same tissue, 4 magnifications,
dozens of fields), so resampling images would pretend there are thousands of independent cases where there are
82 patients, and the intervals would be far too narrow. Each resample draws patients with replacement; a patient
drawn c times counts c times with all its images. By default the draw is stratified by the patients' class
(as pROC's ci.auc does), so every resample holds both classes and AUC and balanced accuracy are always defined.

Vectorised: all R resamples at once. The (R, P) matrix of drawn patient indices becomes an (R, P) count matrix
(one np.bincount); accuracy-like metrics are (R, P) @ (P, 4) products with per-patient tp/fn/tn/fp counts, and
AUC is a weighted rank statistic computed with cumulative sums over the scores sorted once (weighted_roc_auc).
resampled_metrics_loop is the plain loop over the same index matrix, kept as the reference for the tests and
bench/bench_bootstrap.py.
"""

from dataclasses import asdict, dataclass

import numpy as np

from common.core.errors import PipelineError
from common.data.records import majority_labels
from common.evaluation.calibration import CALIBRATION_METRICS, bin_edges, resampled_calibration
from common.evaluation.metrics import DECISION_THRESHOLD, binary_metrics

DEFAULT_RESAMPLES = 2000
CONFIDENCE = 0.95
# Below this many patients of either class in the evaluated set, no interval is given and no difference claimed:
# a bootstrap of one or two patients per class can only redraw those same patients, so its interval is (nearly)
# zero-wide and says nothing about the next patient. The number is a convention, stated wherever it applies.
MIN_PATIENTS_PER_CLASS = 5
TOO_FEW_PATIENTS = "too few patients for an interval"
DISCRIMINATION_METRICS = ("roc_auc", "balanced_accuracy", "accuracy", "sensitivity", "specificity", "f1",
                          "patient_recognition_rate")
RESAMPLED_METRICS = (*DISCRIMINATION_METRICS, *CALIBRATION_METRICS)
# The metrics of a results table's main rows per level: at patient level (one diagnosis per patient) the
# recognition rate is the accuracy. The calibration metrics have their own table (common.evaluation.uncertainty).
LEVEL_METRICS = {"image": DISCRIMINATION_METRICS, "patient": DISCRIMINATION_METRICS[:5]}
CALIBRATION_LEVEL_METRICS = {"image": CALIBRATION_METRICS, "patient": CALIBRATION_METRICS}
DIFFERENCE_METRICS = ("roc_auc", "balanced_accuracy")
METRIC_NAMES = {"roc_auc": "AUC", "balanced_accuracy": "balanced accuracy", "accuracy": "accuracy",
                "sensitivity": "sensitivity", "specificity": "specificity", "f1": "F1",
                "patient_recognition_rate": "patient recognition rate", "brier": "Brier score", "log_loss": "log loss",
                "ece": "ECE", "ece_adaptive": "adaptive ECE"}
LEVELS = ("image", "patient")
# Rows of resamples handled at once in weighted_roc_auc: (chunk, N) float64 arrays of about 16 MB.
AUC_CHUNK_ELEMENTS = 2_000_000


# ------------------------------------------------------------------------------------ patient-level diagnosis


@dataclass(frozen=True)
class PatientDiagnosis:
    patients: np.ndarray  # (P,) patient IDs, sorted
    labels: np.ndarray  # (P,) the patient's class: majority label of its images (malignant on a tie)
    prob_malignant: np.ndarray  # (P,) mean P(malignant) over the patient's images
    images: np.ndarray  # (P,) images per patient


def _index_patients(labels, patients) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(P,) sorted patient IDs, (N,) each image's index among them, (P,) each patient's majority label."""
    patients = np.asarray(patients).astype(str)
    names, patient_of_image = np.unique(patients, return_inverse=True)
    label_of = majority_labels(patients, labels)
    return names, patient_of_image, np.array([label_of[name] for name in names], dtype=np.int64)


def _mean_per_patient(prob_malignant, patient_of_image: np.ndarray, n_patients: int) -> np.ndarray:
    """(P,) mean P(malignant) over each patient's images."""
    images = np.bincount(patient_of_image, minlength=n_patients)
    return np.bincount(patient_of_image, weights=np.asarray(prob_malignant, dtype=np.float64),
                       minlength=n_patients) / images


def diagnose_patients(prob_malignant, labels, patients) -> PatientDiagnosis:
    """One decision per patient: the mean P(malignant) of all its images (>= DECISION_THRESHOLD: malignant)."""
    names, patient_of_image, patient_labels = _index_patients(labels, patients)
    return PatientDiagnosis(names, patient_labels, _mean_per_patient(prob_malignant, patient_of_image, len(names)),
                            np.bincount(patient_of_image, minlength=len(names)))


def _patient_level(prob_malignant, labels, patients, threshold: float) -> dict:
    diagnosis = diagnose_patients(prob_malignant, labels, patients)
    metrics = binary_metrics(diagnosis.labels, diagnosis.prob_malignant, diagnosis.patients, threshold=threshold)
    return {"patients": len(diagnosis.patients), **{name: metrics[name] for name in LEVEL_METRICS["patient"]}}


def patient_metrics(prob_malignant, labels, patients, magnifications=None, *,
                    threshold: float = DECISION_THRESHOLD) -> dict:
    """Patient-level accuracy, balanced accuracy, sensitivity, specificity and AUC: over all images of each
    patient ('all') and, given magnifications, over each magnification's images alone ('by_magnification')."""
    prob_malignant, labels, patients = np.asarray(prob_malignant), np.asarray(labels), np.asarray(patients)
    result = {"all": _patient_level(prob_malignant, labels, patients, threshold)}
    if magnifications is not None and len(set(magnifications)) > 1:
        magnifications = np.asarray(magnifications).astype(str)
        result["by_magnification"] = {
            magnification: _patient_level(prob_malignant[magnifications == magnification],
                                          labels[magnifications == magnification],
                                          patients[magnifications == magnification], threshold)
            for magnification in sorted(set(magnifications), key=lambda mag: (len(mag), mag))}
    return result


# ------------------------------------------------------------------------------------ weighted, resampled metrics


def weighted_roc_auc(labels, scores, weights, *, group_of_row=None) -> np.ndarray | float:
    """AUC with per-row weights: sum over positive i, negative j of w_i w_j [s_i > s_j] (ties 1/2), over
    (sum of positive weights) x (sum of negative weights). `weights` (N,) gives a float; (R, N) gives (R,),
    one AUC per row of weights. With group_of_row (N,), weights are per group, (G,) or (R, G): row i weighs
    weights[..., group_of_row[i]] (a patient drawn twice counts each of its images twice). NaN where a class
    has zero weight.

    Scores are sorted once; per row of weights, the weight of negatives below each positive comes from a
    cumulative sum over the sorted negatives, read at the positive's place (searchsorted left = strictly lower,
    right = lower or tied; their mean counts ties one half). Chunked over rows of weights to bound memory."""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    single = weights.ndim == 1
    weights = np.atleast_2d(weights)
    group_of_row = np.arange(len(labels)) if group_of_row is None else np.asarray(group_of_row)
    positives = np.flatnonzero(labels == 1)
    negatives = np.flatnonzero(labels == 0)
    negatives = negatives[np.argsort(scores[negatives], kind="stable")]
    lower = np.searchsorted(scores[negatives], scores[positives], side="left")
    lower_or_tied = np.searchsorted(scores[negatives], scores[positives], side="right")
    positive_groups, negative_groups = group_of_row[positives], group_of_row[negatives]
    chunk = max(1, AUC_CHUNK_ELEMENTS // max(1, len(labels)))
    auc = np.empty(len(weights))
    for start in range(0, len(weights), chunk):
        rows = weights[start:start + chunk]
        auc[start:start + chunk] = _auc_of_weight_rows(rows[:, positive_groups], rows[:, negative_groups],
                                                       lower, lower_or_tied)
    return float(auc[0]) if single else auc


def _auc_of_weight_rows(positive_weights, sorted_negative_weights, lower, lower_or_tied) -> np.ndarray:
    """(r,) AUC from (r, Npos) weights of positives and (r, Nneg) weights of negatives in ascending score order."""
    cumulative = np.zeros((len(sorted_negative_weights), sorted_negative_weights.shape[1] + 1))
    np.cumsum(sorted_negative_weights, axis=1, out=cumulative[:, 1:])  # [:, j]: weight of the j lowest negatives
    below_twice = cumulative[:, lower] + cumulative[:, lower_or_tied]  # (r, Npos): 2 x (lower + half the ties)
    numerator = 0.5 * np.einsum("rp,rp->r", positive_weights, below_twice)
    denominator = positive_weights.sum(axis=1) * cumulative[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1.0), np.nan)


def resample_counts(resample_indices: np.ndarray, n_groups: int) -> np.ndarray:
    """(R, P) float64: how often each group (patient) was drawn in each resample, from (R, P') drawn indices."""
    resamples = len(resample_indices)
    offsets = resample_indices + np.arange(resamples)[:, None] * n_groups  # one bincount for all rows
    return np.bincount(offsets.ravel(), minlength=resamples * n_groups).reshape(resamples, n_groups).astype(np.float64)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1.0), np.nan)


def resampled_metrics(labels, prob_malignant, group_of_row, counts: np.ndarray, *,
                      threshold: float = DECISION_THRESHOLD) -> dict[str, np.ndarray]:
    """Each RESAMPLED_METRICS metric, (R,), of rows weighted by counts[r, group_of_row]: the metrics of the
    data set in which group g appears counts[r, g] times (as that many distinct groups: the patient recognition
    rate, the mean over groups of each group's accuracy, counts it that many times). NaN where a metric is
    undefined (a class absent). The adaptive ECE's equal-mass bins are those of the rows as given (unweighted)."""
    labels = np.asarray(labels)
    predicted = np.asarray(prob_malignant, dtype=np.float64) >= threshold
    n_groups = counts.shape[1]
    outcomes = [predicted & (labels == 1), ~predicted & (labels == 1), ~predicted & (labels == 0),
                predicted & (labels == 0)]  # tp, fn, tn, fp per row
    per_group = np.stack([np.bincount(group_of_row, weights=outcome, minlength=n_groups) for outcome in outcomes],
                         axis=1)  # (P, 4)
    tp, fn, tn, fp = (counts @ per_group).T  # each (R,)
    sensitivity, specificity = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    group_accuracy = _ratio(per_group[:, 0] + per_group[:, 2], per_group.sum(axis=1))  # (P,)
    defined = ~np.isnan(group_accuracy)  # a group without rows (none in practice) has no accuracy
    return {
        "roc_auc": weighted_roc_auc(labels, prob_malignant, counts, group_of_row=group_of_row),
        "balanced_accuracy": (sensitivity + specificity) / 2,
        "accuracy": _ratio(tp + tn, tp + fn + tn + fp),
        "sensitivity": sensitivity,
        "specificity": specificity,
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "patient_recognition_rate": _ratio(counts[:, defined] @ group_accuracy[defined],
                                           counts[:, defined].sum(axis=1)),
        **resampled_calibration(labels, prob_malignant, group_of_row, counts,
                                adaptive_edges=bin_edges(prob_malignant, "quantile")),
    }


def resampled_metrics_loop(labels, prob_malignant, group_of_row, resample_indices: np.ndarray, *,
                           threshold: float = DECISION_THRESHOLD) -> dict[str, np.ndarray]:
    """Reference for resampled_metrics: for each resample, the rows of every drawn group concatenated (a group
    drawn twice appears twice, as two groups) and common.evaluation.metrics.binary_metrics on them. One Python
    iteration per resample."""
    labels, prob_malignant = np.asarray(labels), np.asarray(prob_malignant, dtype=np.float64)
    group_of_row = np.asarray(group_of_row)
    adaptive_edges = bin_edges(prob_malignant, "quantile")  # of the data as given, as resampled_metrics keeps them
    rows_of_group = [np.flatnonzero(group_of_row == group) for group in range(int(group_of_row.max()) + 1)]
    values = {name: np.empty(len(resample_indices)) for name in RESAMPLED_METRICS}
    for resample, drawn in enumerate(resample_indices):
        rows = np.concatenate([rows_of_group[group] for group in drawn])
        draw_of_row = np.concatenate([np.full(len(rows_of_group[group]), draw) for draw, group in enumerate(drawn)])
        metrics = binary_metrics(labels[rows], prob_malignant[rows], draw_of_row, threshold=threshold,
                                 adaptive_edges=adaptive_edges)
        for name in RESAMPLED_METRICS:
            values[name][resample] = np.nan if metrics[name] is None else metrics[name]
    return values


# ------------------------------------------------------------------------------------ the patient bootstrap


def draw_patient_resamples(patient_labels, *, resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                           stratified: bool = True) -> np.ndarray:
    """(R, P) int64 indices of patients drawn with replacement, one row per resample. Stratified: the columns of
    each class's patients draw from that class only, so every resample keeps the class counts of the data."""
    patient_labels = np.asarray(patient_labels)
    rng = np.random.default_rng(seed)
    n_patients = len(patient_labels)
    if not stratified:
        return rng.integers(0, n_patients, size=(resamples, n_patients))
    indices = np.empty((resamples, n_patients), dtype=np.int64)
    for label in np.unique(patient_labels):
        members = np.flatnonzero(patient_labels == label)
        indices[:, members] = members[rng.integers(0, len(members), size=(resamples, len(members)))]
    return indices


def percentile_interval(values: np.ndarray, *, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The percentile interval of the defined (non-NaN) resampled values; NaNs when none is defined."""
    defined = values[~np.isnan(values)]
    if not len(defined):
        return float("nan"), float("nan")
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(defined, [tail, 100 - tail])
    return float(low), float(high)


@dataclass(frozen=True)
class Interval:
    estimate: float  # on the data as it is (NaN when undefined)
    low: float  # percentile interval over the resamples where the metric is defined
    high: float
    resamples: int  # resamples where the metric is defined (all of them, unless a class was absent)
    confidence: float = CONFIDENCE
    note: str | None = None  # why there is no interval (low and high NaN): too few patients of a class


def _interval(estimate: float, values: np.ndarray) -> Interval:
    low, high = percentile_interval(values)
    return Interval(float(estimate), low, high, int(np.count_nonzero(~np.isnan(values))))


@dataclass(frozen=True)
class PatientBootstrap:
    """One draw of resampled patients, shared by every row and every paired difference of a table."""

    labels: np.ndarray  # (N,) image labels
    patient_of_image: np.ndarray  # (N,) index into patients
    patients: np.ndarray  # (P,) patient IDs, sorted
    patient_labels: np.ndarray  # (P,) majority label per patient
    indices: np.ndarray  # (R, P) drawn patient indices: row r is resample r
    counts: np.ndarray  # (R, P) float64: times each patient is drawn in each resample
    seed: int
    stratified: bool

    @classmethod
    def draw(cls, *, labels, patients, resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
             stratified: bool = True) -> "PatientBootstrap":
        labels = np.asarray(labels, dtype=np.int64)
        names, patient_of_image, patient_labels = _index_patients(labels, patients)
        indices = draw_patient_resamples(patient_labels, resamples=resamples, seed=seed, stratified=stratified)
        return cls(labels, patient_of_image, names, patient_labels, indices, resample_counts(indices, len(names)),
                   seed, stratified)

    @property
    def resamples(self) -> int:
        return len(self.indices)

    @property
    def too_few_patients(self) -> str | None:
        """'too few patients for an interval (2 benign, 2 malignant patients; ...)' below MIN_PATIENTS_PER_CLASS
        patients of a class, else None."""
        benign, malignant = np.bincount(self.patient_labels, minlength=2)[:2]
        if min(benign, malignant) >= MIN_PATIENTS_PER_CLASS:
            return None
        return (f"{TOO_FEW_PATIENTS} ({benign} benign, {malignant} malignant patients; an interval needs at least "
                f"{MIN_PATIENTS_PER_CLASS} of each)")

    def interval(self, estimate: float, values: np.ndarray) -> Interval:
        """The estimate with its percentile interval, or with the too-few-patients note and no interval."""
        note = self.too_few_patients
        if note:
            return Interval(float(estimate), float("nan"), float("nan"), 0, note=note)
        return _interval(estimate, values)

    def _metrics(self, prob_malignant, counts: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
        """{'image': {metric: (R,)}, 'patient': {metric: (R,)}} with these patient counts (R, P)."""
        prob_malignant = np.asarray(prob_malignant, dtype=np.float64)
        if prob_malignant.shape != self.labels.shape:
            raise PipelineError(f"{prob_malignant.shape[0] if prob_malignant.ndim else 0} predictions for the "
                                f"bootstrap's {len(self.labels)} images: every row of a table must score the same "
                                "images in the same order")
        patient_rows = np.arange(len(self.patients))
        return {"image": resampled_metrics(self.labels, prob_malignant, self.patient_of_image, counts),
                "patient": resampled_metrics(self.patient_labels, _mean_per_patient(prob_malignant,
                                             self.patient_of_image, len(self.patients)), patient_rows, counts)}

    def values(self, prob_malignant) -> dict[str, dict[str, np.ndarray]]:
        """Each metric at image and patient level in every resample, (R,) each."""
        return self._metrics(prob_malignant, self.counts)

    def estimates(self, prob_malignant) -> dict[str, dict[str, float]]:
        """The same metrics on the data itself (every patient counted once)."""
        once = self._metrics(prob_malignant, np.ones((1, len(self.patients))))
        return {level: {name: float(value[0]) for name, value in metrics.items()} for level, metrics in once.items()}

    def intervals(self, prob_malignant, metrics=LEVEL_METRICS) -> dict[str, dict[str, Interval]]:
        """Each metric's estimate with its percentile interval, at image and patient level (`metrics`: level ->
        names; CALIBRATION_LEVEL_METRICS for the calibration table)."""
        estimates, values = self.estimates(prob_malignant), self.values(prob_malignant)
        return {level: {name: self.interval(estimates[level][name], values[level][name])
                        for name in metrics[level]} for level in LEVELS}

    def difference(self, prob_a, prob_b, *, metrics=DIFFERENCE_METRICS) -> dict[str, dict[str, Interval]]:
        """Row A minus row B, paired: both rows are scored on the same resampled patients, so what the two rows
        share (which patients are easy) cancels out of the interval."""
        estimates_a, estimates_b = self.estimates(prob_a), self.estimates(prob_b)
        values_a, values_b = self.values(prob_a), self.values(prob_b)
        return {level: {name: self.interval(estimates_a[level][name] - estimates_b[level][name],
                                             values_a[level][name] - values_b[level][name]) for name in metrics}
                for level in LEVELS}


# ------------------------------------------------------------------------------------ rows of a results table


def mean_and_sd_over_folds(per_fold: list[dict], names) -> tuple[dict, dict]:
    """Mean and sample sd (ddof 1) over the folds where each metric is defined; None where fewer than 1 / 2."""
    mean, sd = {}, {}
    for name in names:
        defined = [fold[name] for fold in per_fold if fold.get(name) is not None]
        mean[name] = float(np.mean(defined)) if defined else None
        sd[name] = float(np.std(defined, ddof=1)) if len(defined) > 1 else None
    return mean, sd


def fold_summary(prob_malignant, *, labels, patients, folds, magnifications=None,
                 threshold: float = DECISION_THRESHOLD) -> dict:
    """Per-fold image-level (common.evaluation.metrics.binary_metrics) and patient-level metrics, and their
    mean ± sd."""
    prob_malignant, labels = np.asarray(prob_malignant, dtype=np.float64), np.asarray(labels)
    patients, folds = np.asarray(patients).astype(str), np.asarray(folds)
    per_fold = []
    for fold in np.unique(folds):
        rows = folds == fold
        mags = None if magnifications is None else np.asarray(magnifications)[rows]
        per_fold.append({"fold": int(fold),
                         "image": binary_metrics(labels[rows], prob_malignant[rows], patients[rows], mags,
                                                 threshold=threshold),
                         "patient": patient_metrics(prob_malignant[rows], labels[rows], patients[rows],
                                                    threshold=threshold)["all"]})
    summary = {"per_fold": per_fold, "fold_mean": {}, "fold_sd": {}}
    for level in LEVELS:
        mean, sd = mean_and_sd_over_folds([fold[level] for fold in per_fold], LEVEL_METRICS[level])
        summary["fold_mean"][level], summary["fold_sd"][level] = mean, sd
    return summary


def evaluate_row(prob_malignant, *, labels, patients, folds, bootstrap: PatientBootstrap, magnifications=None,
                 threshold: float = DECISION_THRESHOLD) -> dict:
    """Everything a results table needs for one model (a JSON-ready dict): per-fold metrics with mean ± sd over
    folds, the pooled out-of-fold metrics (image and patient level, per magnification), and the pooled figures'
    patient-bootstrap 95 % intervals."""
    summary = fold_summary(prob_malignant, labels=labels, patients=patients, folds=folds,
                           magnifications=magnifications, threshold=threshold)
    pooled = {"image": binary_metrics(labels, prob_malignant, patients, magnifications, threshold=threshold),
              "patient": patient_metrics(prob_malignant, labels, patients, magnifications, threshold=threshold)}
    intervals = bootstrap.intervals(prob_malignant)
    return {**summary, "pooled": pooled,
            "interval": {level: {name: asdict(interval) for name, interval in by_name.items()}
                         for level, by_name in intervals.items()},
            "bootstrap": {"resamples": bootstrap.resamples, "seed": bootstrap.seed,
                          "stratified": bootstrap.stratified, "unit": "patient"}}


def _number(value: float) -> str:
    """Two decimals; three where two would print a nonzero value as 0.00 (a difference of 0.002 is not 'equal')."""
    digits = 2 if value == 0 or abs(value) >= 0.005 else 3
    text = f"{value:.{digits}f}"
    return text.lstrip("-") if float(text) == 0 else text


def describe_difference(name_a: str, name_b: str, metric: str, interval: Interval, *, level: str = "image") -> str:
    """A plain-English sentence: the difference A - B, its interval, and whether the interval excludes zero; with
    too few patients (interval.note), the difference and the note, and no claim."""
    what = METRIC_NAMES[metric] if level == "image" else f"patient-level {METRIC_NAMES[metric]}"
    how = (f"({round(interval.confidence * 100)} % CI {_number(interval.low)} to {_number(interval.high)}, "
           f"patient bootstrap, {interval.resamples:,} resamples)")
    subject = f"{name_a[:1].upper()}{name_a[1:]}'s {what}"
    if interval.note:  # too few patients: the difference is reported, nothing is claimed
        size = "equals" if interval.estimate == 0 else \
            f"is {_number(abs(interval.estimate))} {'higher' if interval.estimate > 0 else 'lower'} than"
        return f"{subject} {size} {name_b}'s, but with {interval.note}, no difference is claimed."
    if interval.estimate == 0:
        claim = f"{subject} equals {name_b}'s {how}"
    else:
        direction = "higher" if interval.estimate > 0 else "lower"
        claim = f"{subject} is {_number(abs(interval.estimate))} {direction} than {name_b}'s {how}"
    if np.isnan(interval.low):
        return f"{claim}: no resample defines the difference, so nothing is shown."
    if interval.low > 0 or interval.high < 0:
        side = "higher" if interval.low > 0 else "lower"
        return f"{claim}: the interval excludes zero, so {name_a}'s {what} is {side}."
    return f"{claim}: the interval includes zero, so no difference is shown."
