"""Split-conformal prediction sets: 'benign', 'malignant', or 'uncertain: refer', with a stated error rate.

    threshold = conformal_threshold(calibration_labels, calibration_prob, alpha=0.1)   # held-out patients only
    sets = prediction_sets(new_prob, threshold)          # (N, 2) bool: [benign in set, malignant in set]
    (common.evaluation.uncertainty: cross-fitted in K-fold, each fold's threshold from the other folds' patients)
    set_names(sets)                                      # ['malignant', 'uncertain: refer', ...]

The score of a label is 1 - P(that label); a label joins the set when its score is at most the threshold, the
ceil((n + 1)(1 - alpha))-th smallest score of the n calibration cases' true labels (Vovk et al. 2005; Angelopoulos
& Bates 2021, "A gentle introduction"). If the calibration cases and a new case are exchangeable, the new case's
set holds its true label with probability at least 1 - alpha, and at most 1 - alpha + 1/(n + 1) (no ties). The
guarantee is marginal (on average over cases, not per case or per class), for cases like the calibration ones:
another lab, scanner or stain breaks it. With fewer than 1/alpha - 1 calibration cases the threshold is infinite
and every set holds both labels: the data cannot support that error rate.

The unit is the patient: a patient's score is the mean P(malignant) of its images (as its diagnosis), and the
calibration cases are held-out patients (single split: the val patients; K-fold: cross-fitted, the other folds'
patients). Image-level sets (each image a case) are given for single images and labelled as such: images of one
patient are not exchangeable with a new patient's, so their guarantee holds only for images of the calibration
patients' kind of case mix.

Written here rather than taken from MAPIE: MAPIE's SplitConformalClassifier fits or wraps an estimator and
calibrates on rows, while here the scores already exist (cross-fitted) and the unit is the patient; the method is
the few lines below, tested against its finite-sample guarantee (tests/test_calibration.py).

A set can be empty when alpha is large (a threshold below 0.5 leaves probabilities near 0.5 with no label); empty
and two-label sets are both 'referred': no single answer at this error rate.
"""

import math

import numpy as np

DEFAULT_ALPHA = 0.1
SET_NAMES = {(True, False): "benign", (False, True): "malignant", (True, True): "uncertain: refer",
             (False, False): "no label fits: refer"}


def true_label_scores(labels, prob) -> np.ndarray:
    """(N,) 1 - P(true label) of each calibration case."""
    labels, prob = np.asarray(labels), np.asarray(prob, dtype=np.float64)
    return np.where(labels == 1, 1.0 - prob, prob)


def conformal_threshold(labels, prob, *, alpha: float = DEFAULT_ALPHA) -> float:
    """The ceil((n + 1)(1 - alpha))-th smallest true-label score of the n calibration cases (inf when n is too small
    for alpha: every set then holds both labels)."""
    return threshold_from_scores(true_label_scores(labels, prob), alpha)


def threshold_from_scores(scores, alpha: float) -> float:
    """conformal_threshold from the calibration cases' true-label scores (a classifier file stores them, so
    predict.py can recompute the threshold for another --alpha)."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    scores = np.sort(np.asarray(scores, dtype=np.float64))
    rank = math.ceil((len(scores) + 1) * (1 - alpha))
    return float("inf") if rank > len(scores) else float(scores[rank - 1])


def prediction_sets(prob, threshold: float) -> np.ndarray:
    """(N, 2) bool: whether benign (score P(malignant)) and malignant (score 1 - P(malignant)) are in each set."""
    prob = np.asarray(prob, dtype=np.float64)
    return np.stack([prob <= threshold, 1.0 - prob <= threshold], axis=1)


def set_names(sets: np.ndarray) -> list[str]:
    return [SET_NAMES[(bool(benign), bool(malignant))] for benign, malignant in np.asarray(sets)]


# ------------------------------------------------------------------------------------ what the sets achieved


def set_outcomes(sets: np.ndarray, labels) -> dict[str, np.ndarray]:
    """Per case (N,) floats: covered (true label in the set), referred (not exactly one label), and, among the
    cases not referred, correct (the one label is the true one)."""
    sets, labels = np.asarray(sets), np.asarray(labels)
    size = sets.sum(axis=1)
    return {"covered": sets[np.arange(len(labels)), labels].astype(np.float64),
            "referred": (size != 1).astype(np.float64),
            "decided": (size == 1).astype(np.float64),
            "decided_correct": ((size == 1) & sets[np.arange(len(labels)), labels]).astype(np.float64)}


def resampled_set_summary(outcomes: dict[str, np.ndarray], group_of_row, counts: np.ndarray) -> dict[str, np.ndarray]:
    """Coverage, referred share and accuracy of the decided cases, (R,) each, with the cases weighted by
    counts[r, group_of_row] (the patient bootstrap; the sets themselves stay fixed)."""
    n_groups = counts.shape[1]
    per_group = {name: counts @ np.bincount(group_of_row, weights=values, minlength=n_groups)
                 for name, values in outcomes.items()}
    cases = counts @ np.bincount(group_of_row, minlength=n_groups).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"coverage": per_group["covered"] / cases, "referred": per_group["referred"] / cases,
                "accuracy_not_referred": np.where(per_group["decided"] > 0,
                                                  per_group["decided_correct"] / np.maximum(per_group["decided"], 1),
                                                  np.nan)}


def referral_by(sets: np.ndarray, labels, groups) -> dict[str, dict]:
    """Per value of `groups` (class names, magnifications): cases and the share referred."""
    referred = set_outcomes(sets, labels)["referred"]
    groups = np.asarray(groups).astype(str)
    return {group: {"cases": int((groups == group).sum()), "referred": float(referred[groups == group].mean())}
            for group in sorted(set(groups), key=lambda value: (len(value), value))}
