"""Binary classification metrics (malignant = positive class) at image and patient level.

Computed here from counts, so every number can be checked by hand; tests compare them with scikit-learn.
"""

from collections import defaultdict

import numpy as np

from common.evaluation.calibration import calibration_metrics

DECISION_THRESHOLD = 0.5  # a prediction is malignant when P(malignant) >= this

METRIC_COLUMNS = (
    ("accuracy", "Acc"), ("balanced_accuracy", "BalAcc"), ("precision", "Prec"), ("sensitivity", "Sens"),
    ("specificity", "Spec"), ("f1", "F1"), ("roc_auc", "AUC"), ("patient_recognition_rate", "PatRR"),
)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def _ratio(numerator: float, denominator: float) -> float | None:
    return float(numerator / denominator) if denominator else None


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve = P(score of a random positive > a random negative), ties counting one half."""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    positives, negatives = int((labels == 1).sum()), int((labels == 0).sum())
    if positives == 0 or negatives == 0:
        return None  # undefined with one class
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    start = 0
    while start < len(scores):  # average ranks over ties
        end = start
        while end + 1 < len(scores) and sorted_scores[end + 1] == sorted_scores[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    rank_sum = ranks[labels == 1].sum()
    return float((rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives))


def patient_recognition_rate(labels: np.ndarray, predictions: np.ndarray, patients: np.ndarray) -> float:
    """Spanhol et al. 2016: the mean over patients of (correctly classified images / images of that patient)."""
    per_patient: dict[str, list[bool]] = defaultdict(list)
    for label, prediction, patient in zip(labels, predictions, patients):
        per_patient[patient].append(label == prediction)
    return float(np.mean([np.mean(hits) for hits in per_patient.values()]))


def per_patient_rates(labels: np.ndarray, predictions: np.ndarray, patients: np.ndarray) -> dict[str, dict]:
    """Per patient: images, correct images, recognition rate and majority label."""
    result = {}
    for patient in sorted(set(patients)):
        mask = np.asarray(patients) == patient
        correct = int((np.asarray(labels)[mask] == np.asarray(predictions)[mask]).sum())
        result[patient] = {"images": int(mask.sum()), "correct": correct, "rate": correct / int(mask.sum()),
                           "label": int(np.asarray(labels)[mask].mean() >= 0.5)}
    return result


def format_probability(probability: float, *, digits: int = 3, threshold: float = DECISION_THRESHOLD) -> str:
    """P(malignant) as text that never contradicts its decision: `digits` decimals, more where rounding would
    carry it onto the other side of the threshold (0.4996 shows as 0.4996, not as 0.500 beside "benign")."""
    probability = float(probability)
    for shown in range(digits, 8):
        text = f"{probability:.{shown}f}"
        if (float(text) >= threshold) == (probability >= threshold):
            return text
    return f"<{threshold:g}"  # below the threshold by less than 5e-8


def binary_metrics(labels, prob_malignant, patients, magnifications=None,
                   threshold: float = DECISION_THRESHOLD, *, adaptive_edges: np.ndarray | None = None) -> dict:
    """All reported metrics for one set of predictions; a prediction is malignant when prob >= threshold.
    With the calibration metrics (common.evaluation.calibration; adaptive_edges: the adaptive ECE's bins, by
    default this set's own)."""
    labels = np.asarray(labels, dtype=np.int64)
    prob_malignant = np.asarray(prob_malignant, dtype=np.float64)
    predictions = (prob_malignant >= threshold).astype(np.int64)
    tp = int(((predictions == 1) & (labels == 1)).sum())
    tn = int(((predictions == 0) & (labels == 0)).sum())
    fp = int(((predictions == 1) & (labels == 0)).sum())
    fn = int(((predictions == 0) & (labels == 1)).sum())
    sensitivity, specificity = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    precision = _ratio(tp, tp + fp)
    metrics = {
        "images": len(labels),
        "patients": len(set(patients)),
        "accuracy": _ratio(tp + tn, len(labels)),
        "balanced_accuracy": (sensitivity + specificity) / 2 if None not in (sensitivity, specificity) else None,
        "precision": precision,
        "sensitivity": sensitivity,
        "specificity": specificity,
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "roc_auc": roc_auc(labels, prob_malignant),
        "confusion_matrix": [[tn, fp], [fn, tp]],  # rows: true benign, malignant; columns: predicted
        "patient_recognition_rate": patient_recognition_rate(labels, predictions, np.asarray(patients)),
        **calibration_metrics(labels, prob_malignant, adaptive_edges=adaptive_edges),
    }
    if magnifications is not None and len(set(magnifications)) > 1:
        magnifications = np.asarray(magnifications)
        metrics["accuracy_by_magnification"] = {
            str(mag): float((predictions[magnifications == mag] == labels[magnifications == mag]).mean())
            for mag in sorted(set(magnifications), key=lambda m: (len(m), m))
        }
    return metrics


def selection_score(metrics: dict) -> tuple[float, float]:
    """Model selection on held-out rows: balanced accuracy (accuracy when one class is absent), then lower loss."""
    balanced = metrics["balanced_accuracy"]
    return (metrics["accuracy"] if balanced is None else balanced, -metrics["loss"])


def format_metric(value) -> str:
    """A metric as every table shows it: three decimals, or n/a when undefined (e.g. AUC with one class)."""
    return "n/a" if value is None else f"{value:.3f}"


def metrics_table(rows: dict[str, dict], title: str = "model") -> str:
    """A Markdown table, one row per named metrics dict."""
    header = f"| {title} | " + " | ".join(short for _, short in METRIC_COLUMNS) + " |"
    rule = "|" + "---|" * (len(METRIC_COLUMNS) + 1)
    lines = [header, rule]
    for name, metrics in rows.items():
        lines.append(f"| {name} | " + " | ".join(format_metric(metrics.get(key)) for key, _ in METRIC_COLUMNS) + " |")
    return "\n".join(lines)
