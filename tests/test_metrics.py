"""common.evaluation.metrics against scikit-learn (the trusted reference) and against hand computations."""

import numpy as np
import pytest
from sklearn import metrics as skm

from common.evaluation.metrics import (
    binary_metrics,
    format_probability,
    metrics_table,
    patient_recognition_rate,
    roc_auc,
)

# A hand-made example: 10 images of 4 patients, malignant = 1. Probabilities include ties (0.7 twice, 0.2 twice
# across the classes) and one exactly at the 0.5 threshold (counted malignant: prob >= threshold).
LABELS = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
PROBS = np.array([0.1, 0.2, 0.7, 0.5, 0.9, 0.7, 0.2, 0.6, 0.8, 0.3])
PATIENTS = np.array(["B1", "B1", "B2", "B2", "M1", "M1", "M1", "M2", "M2", "M2"])
MAGS = np.array(["100", "400", "100", "400", "100", "400", "40", "100", "400", "40"])


def sklearn_reference(labels, probs) -> dict:
    predictions = (probs >= 0.5).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(labels, predictions, labels=[0, 1]).ravel()
    return {
        "accuracy": skm.accuracy_score(labels, predictions),
        "balanced_accuracy": skm.balanced_accuracy_score(labels, predictions),
        "precision": skm.precision_score(labels, predictions, zero_division=0),
        "sensitivity": skm.recall_score(labels, predictions),
        "specificity": tn / (tn + fp),
        "f1": skm.f1_score(labels, predictions),
        "roc_auc": skm.roc_auc_score(labels, probs),
        "confusion_matrix": [[int(tn), int(fp)], [int(fn), int(tp)]],
    }


def test_binary_metrics_match_sklearn():
    ours = binary_metrics(LABELS, PROBS, PATIENTS, MAGS)
    reference = sklearn_reference(LABELS, PROBS)
    for key, value in reference.items():
        if key == "confusion_matrix":
            assert ours[key] == value
        else:
            assert ours[key] == pytest.approx(value, abs=1e-12), key
    # By hand: predictions 0 0 1 1 | 1 1 0 1 1 0 -> tn 2, fp 2, fn 2, tp 4.
    assert ours["confusion_matrix"] == [[2, 2], [2, 4]]  # [[tn, fp], [fn, tp]]: rows true, columns predicted
    assert ours["sensitivity"] == pytest.approx(4 / 6) and ours["specificity"] == pytest.approx(2 / 4)
    assert ours["images"] == 10 and ours["patients"] == 4


def test_binary_metrics_random_cases_match_sklearn():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(4, 40))
        labels = rng.integers(0, 2, n)
        labels[:2] = [0, 1]  # both classes present
        probs = rng.integers(0, 11, n) / 10.0  # a coarse grid: many ties, some exactly 0.5
        ours = binary_metrics(labels, probs, np.arange(n).astype(str))
        for key, value in sklearn_reference(labels, probs).items():
            if key == "confusion_matrix":
                assert ours[key] == value
            elif ours[key] is not None:  # precision is undefined (None) when nothing is predicted malignant
                assert ours[key] == pytest.approx(value, abs=1e-12), key
            else:
                assert key == "precision" and (probs >= 0.5).sum() == 0


def test_roc_auc_ties_count_one_half():
    # One positive and one negative with equal scores: P(pos > neg) + 0.5 P(tie) = 0.5.
    assert roc_auc(np.array([0, 1]), np.array([0.4, 0.4])) == pytest.approx(0.5)
    labels, scores = np.array([0, 0, 1, 1, 1]), np.array([0.2, 0.6, 0.6, 0.6, 0.9])
    # Pairs (pos, neg): 0.6>0.2, 0.6=0.6 (x2 positives), 0.9 beats both -> (1 + 0.5 + 1 + 0.5 + 2) / 6.
    assert roc_auc(labels, scores) == pytest.approx(5 / 6)
    assert roc_auc(labels, scores) == pytest.approx(skm.roc_auc_score(labels, scores))


def test_roc_auc_is_none_for_one_class():
    assert roc_auc(np.array([1, 1, 1]), np.array([0.2, 0.5, 0.9])) is None
    metrics = binary_metrics([0, 0, 0], [0.1, 0.6, 0.3], ["a", "a", "b"])
    assert metrics["roc_auc"] is None
    assert metrics["sensitivity"] is None and metrics["balanced_accuracy"] is None  # no malignant image
    assert metrics["specificity"] == pytest.approx(2 / 3) and metrics["accuracy"] == pytest.approx(2 / 3)


def test_patient_recognition_rate_by_hand():
    # Patient A: 2 of 3 images right; patient B: 1 of 1 -> (2/3 + 1) / 2 = 0.8333, not the image accuracy 3/4.
    labels = np.array([1, 1, 1, 0])
    predictions = np.array([1, 0, 1, 0])
    patients = np.array(["A", "A", "A", "B"])
    assert patient_recognition_rate(labels, predictions, patients) == pytest.approx((2 / 3 + 1) / 2)
    metrics = binary_metrics(labels, np.array([0.9, 0.1, 0.8, 0.2]), patients)
    assert metrics["patient_recognition_rate"] == pytest.approx(0.8333, abs=1e-4)
    assert metrics["accuracy"] == pytest.approx(0.75)


def test_patient_recognition_rate_of_example():
    # B1: 2/2, B2: 0/2, M1: 2/3, M2: 2/3 -> mean 0.5833.
    ours = binary_metrics(LABELS, PROBS, PATIENTS)
    assert ours["patient_recognition_rate"] == pytest.approx((1 + 0 + 2 / 3 + 2 / 3) / 4)


def test_accuracy_by_magnification():
    ours = binary_metrics(LABELS, PROBS, PATIENTS, MAGS)
    predictions = (PROBS >= 0.5).astype(int)
    expected = {mag: float((predictions[MAGS == mag] == LABELS[MAGS == mag]).mean()) for mag in ("40", "100", "400")}
    assert ours["accuracy_by_magnification"] == pytest.approx(expected)
    assert list(ours["accuracy_by_magnification"]) == ["40", "100", "400"]  # numeric order, not string order
    assert "accuracy_by_magnification" not in binary_metrics(LABELS, PROBS, PATIENTS, ["100"] * 10)


def test_metrics_table_contains_the_values():
    ours = binary_metrics(LABELS, PROBS, PATIENTS)
    one_class = binary_metrics([1, 1], [0.9, 0.2], ["a", "a"])
    table = metrics_table({"resnet50 test": ours, "only malignant": one_class}, title="model")
    lines = table.splitlines()
    assert lines[0].startswith("| model |") and "AUC" in lines[0] and "PatRR" in lines[0]
    assert len(lines) == 4
    row = [cell.strip() for cell in lines[2].strip("|").split("|")]
    assert row[0] == "resnet50 test"
    expected = [ours[key] for key in ("accuracy", "balanced_accuracy", "precision", "sensitivity", "specificity",
                                      "f1", "roc_auc", "patient_recognition_rate")]
    assert row[1:] == [f"{value:.3f}" for value in expected]
    other = [cell.strip() for cell in lines[3].strip("|").split("|")]
    assert other[7] == "n/a"  # ROC AUC undefined with one class
    assert other[1] == "0.500"


@pytest.mark.parametrize("probability, shown", [
    (0.4996, "0.4996"), (0.49995, "0.49995"), (0.5, "0.500"), (0.9996, "1.000"), (0.123456, "0.123"),
    (0.0, "0.000"), (0.49999999, "<0.5"), (np.float32(0.4996), "0.4996")])
def test_shown_probability_never_contradicts_the_decision(probability, shown):
    """Three decimals, more where rounding would carry a benign probability to 0.500 (malignant at >= 0.5)."""
    assert format_probability(probability) == shown
    predicted = binary_metrics([1], [probability], ["p"])["sensitivity"] == 1.0  # binary_metrics' own rule
    assert (shown != "<0.5" and float(shown) >= 0.5) == predicted
