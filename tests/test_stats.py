"""common.evaluation.stats: weighted AUC against scikit-learn, the vectorised patient bootstrap against a plain loop
over the same resampled patients, patient-level diagnosis by hand, paired differences, per-fold summaries, and the
sentence that reports a difference. Synthetic arrays only; CPU, seconds.
"""

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from common.core.errors import PipelineError
from common.evaluation.metrics import binary_metrics
from common.evaluation.stats import (
    LEVEL_METRICS,
    RESAMPLED_METRICS,
    Interval,
    PatientBootstrap,
    describe_difference,
    diagnose_patients,
    draw_patient_resamples,
    evaluate_row,
    fold_summary,
    patient_metrics,
    percentile_interval,
    resample_counts,
    resampled_metrics,
    resampled_metrics_loop,
    weighted_roc_auc,
)


def synthetic_images(*, patients: int = 12, seed: int = 0, coarse: bool = True):
    """(labels, patients, prob): unequal image counts per patient, one label per patient; coarse probabilities
    (a 0.1 grid) make many ties and some exactly at the 0.5 threshold."""
    rng = np.random.default_rng(seed)
    patient_labels = np.array([0, 1] * (patients // 2))
    sizes = rng.integers(1, 7, patients)
    patient_of_image = np.repeat(np.arange(patients), sizes)
    labels = patient_labels[patient_of_image]
    prob = np.clip(0.5 + 0.25 * (2 * labels - 1) + rng.normal(0, 0.3, len(labels)), 0, 1)
    prob = np.round(prob, 1) if coarse else prob
    return labels, np.array([f"P{index:02d}" for index in patient_of_image]), prob


@pytest.mark.parametrize("seed", range(5))
def test_weighted_auc_equals_sklearn_with_sample_weight(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 60)
    labels[:2] = [0, 1]
    scores = rng.integers(0, 8, 60) / 7  # many ties
    weights = rng.random((4, 60)) * (rng.random((4, 60)) > 0.2)  # some zero weights
    expected = [roc_auc_score(labels, scores, sample_weight=row) for row in weights]
    assert weighted_roc_auc(labels, scores, weights[0]) == pytest.approx(expected[0], abs=1e-12)
    assert np.allclose(weighted_roc_auc(labels, scores, weights), expected, rtol=0, atol=1e-12)
    # Weights given per group (patient): each row takes its group's weight.
    groups = rng.integers(0, 9, 60)
    per_group = rng.random(9)
    assert weighted_roc_auc(labels, scores, per_group, group_of_row=groups) == pytest.approx(
        roc_auc_score(labels, scores, sample_weight=per_group[groups]), abs=1e-12)


def test_weighted_auc_is_nan_without_both_classes():
    labels, scores = np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])
    assert np.isnan(weighted_roc_auc(labels, scores, np.array([1.0, 1.0, 0.0, 0.0])))


def test_resample_counts_and_stratified_draws():
    patient_labels = np.array([0, 1, 1, 0, 1, 1, 1])
    indices = draw_patient_resamples(patient_labels, resamples=300, seed=4)
    assert indices.shape == (300, 7)
    assert np.array_equal(indices, draw_patient_resamples(patient_labels, resamples=300, seed=4))  # same seed
    assert (patient_labels[indices] == patient_labels).all()  # stratified: each column keeps its class
    counts = resample_counts(indices, 7)
    assert np.array_equal(counts, [np.bincount(row, minlength=7) for row in indices])
    assert (counts.sum(axis=1) == 7).all()
    plain = draw_patient_resamples(patient_labels, resamples=300, seed=4, stratified=False)
    assert (patient_labels[plain] != patient_labels).any()


@pytest.mark.parametrize("coarse", [True, False])
def test_vectorised_bootstrap_equals_the_slow_loop_on_the_same_resamples(coarse):
    labels, patients, prob = synthetic_images(seed=1, coarse=coarse)
    bootstrap = PatientBootstrap.draw(labels=labels, patients=patients, resamples=200, seed=7)
    vectorised = bootstrap.values(prob)
    image_loop = resampled_metrics_loop(labels, prob, bootstrap.patient_of_image, bootstrap.indices)
    diagnosis = diagnose_patients(prob, labels, patients)
    patient_loop = resampled_metrics_loop(diagnosis.labels, diagnosis.prob_malignant,
                                          np.arange(len(diagnosis.patients)), bootstrap.indices)
    for level, loop in (("image", image_loop), ("patient", patient_loop)):
        for name in RESAMPLED_METRICS:
            assert np.allclose(vectorised[level][name], loop[name], rtol=0, atol=1e-12, equal_nan=True), (level, name)
    intervals = bootstrap.intervals(prob, {"image": RESAMPLED_METRICS, "patient": RESAMPLED_METRICS})
    for name in RESAMPLED_METRICS:  # the calibration metrics included
        low, high = percentile_interval(image_loop[name])
        assert intervals["image"][name].low == pytest.approx(low, abs=1e-12)
        assert intervals["image"][name].high == pytest.approx(high, abs=1e-12)
        assert intervals["image"][name].resamples == 200  # stratified: every resample has both classes


def test_estimates_are_the_pooled_metrics():
    labels, patients, prob = synthetic_images(seed=2)
    bootstrap = PatientBootstrap.draw(labels=labels, patients=patients, resamples=50, seed=0)
    estimates = bootstrap.estimates(prob)
    pooled_image = binary_metrics(labels, prob, patients)
    pooled_patient = patient_metrics(prob, labels, patients)["all"]
    for name in RESAMPLED_METRICS:  # F1, the patient recognition rate and the calibration metrics included
        assert estimates["image"][name] == pytest.approx(pooled_image[name], abs=1e-12)
    for name in LEVEL_METRICS["patient"]:
        assert estimates["patient"][name] == pytest.approx(pooled_patient[name], abs=1e-12)
    low, high = bootstrap.intervals(prob)["image"]["roc_auc"].low, bootstrap.intervals(prob)["image"]["roc_auc"].high
    assert low <= estimates["image"]["roc_auc"] <= high


def test_patient_level_diagnosis_by_hand():
    # B1: mean(0.2, 0.6) = 0.4 -> benign, right; B2: mean(0.7, 0.5) = 0.6 -> malignant, wrong;
    # M1: mean(0.9, 0.4, 0.5) = 0.6 -> malignant, right; M2: mean(0.3, 0.5) = 0.4 -> benign, wrong.
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1])
    prob = np.array([0.2, 0.6, 0.7, 0.5, 0.9, 0.4, 0.5, 0.3, 0.5])
    patients = np.array(["B1", "B1", "B2", "B2", "M1", "M1", "M1", "M2", "M2"])
    magnifications = np.array(["100", "400", "100", "400", "100", "400", "40", "100", "400"])
    diagnosis = diagnose_patients(prob, labels, patients)
    assert diagnosis.patients.tolist() == ["B1", "B2", "M1", "M2"]
    assert np.allclose(diagnosis.prob_malignant, [0.4, 0.6, 0.6, 0.4], atol=1e-15)
    assert diagnosis.labels.tolist() == [0, 0, 1, 1] and diagnosis.images.tolist() == [2, 2, 3, 2]
    metrics = patient_metrics(prob, labels, patients, magnifications)
    assert metrics["all"] == {"patients": 4, "roc_auc": 0.5, "balanced_accuracy": 0.5, "accuracy": 0.5,
                              "sensitivity": 0.5, "specificity": 0.5}
    # 100X alone: B1 0.2 right, B2 0.7 wrong, M1 0.9 right, M2 0.3 wrong; AUC: 0.9 > 0.2, 0.7 and 0.3 > 0.2,
    # 0.3 < 0.7: 3 of 4 pairs. 40X: only M1 (0.5, malignant).
    at_100 = metrics["by_magnification"]["100"]
    assert at_100["accuracy"] == 0.5 and at_100["roc_auc"] == 0.75 and at_100["patients"] == 4
    at_40 = metrics["by_magnification"]["40"]
    assert at_40["patients"] == 1 and at_40["sensitivity"] == 1.0 and at_40["specificity"] is None
    assert list(metrics["by_magnification"]) == ["40", "100", "400"]


def test_paired_difference_of_a_row_with_itself_is_exactly_zero():
    labels, patients, prob = synthetic_images(seed=3)
    bootstrap = PatientBootstrap.draw(labels=labels, patients=patients, resamples=300, seed=1)
    difference = bootstrap.difference(prob, prob)
    for level in ("image", "patient"):
        for name in ("roc_auc", "balanced_accuracy"):
            interval = difference[level][name]
            assert (interval.estimate, interval.low, interval.high) == (0.0, 0.0, 0.0)
            assert interval.resamples == 300


def test_paired_difference_uses_the_same_resampled_patients_for_both_rows():
    labels, patients, prob_a = synthetic_images(seed=4, coarse=False)
    prob_b = np.clip(prob_a + np.random.default_rng(0).normal(0, 0.2, len(prob_a)), 0, 1)
    bootstrap = PatientBootstrap.draw(labels=labels, patients=patients, resamples=200, seed=2)
    difference = bootstrap.difference(prob_a, prob_b)
    loop_a = resampled_metrics_loop(labels, prob_a, bootstrap.patient_of_image, bootstrap.indices)
    loop_b = resampled_metrics_loop(labels, prob_b, bootstrap.patient_of_image, bootstrap.indices)
    for name in ("roc_auc", "balanced_accuracy"):
        low, high = percentile_interval(loop_a[name] - loop_b[name])
        assert difference["image"][name].low == pytest.approx(low, abs=1e-12)
        assert difference["image"][name].high == pytest.approx(high, abs=1e-12)
        expected = binary_metrics(labels, prob_a, patients)[name] - binary_metrics(labels, prob_b, patients)[name]
        assert difference["image"][name].estimate == pytest.approx(expected, abs=1e-12)
    # Unpaired (independent draws for the two rows) would be wider: the shared patients cancel out when paired.
    independent = resampled_metrics(labels, prob_b, bootstrap.patient_of_image,
                                    resample_counts(draw_patient_resamples(bootstrap.patient_labels, resamples=200,
                                                                           seed=99), len(bootstrap.patients)))
    unpaired_low, unpaired_high = percentile_interval(loop_a["roc_auc"] - independent["roc_auc"])
    assert difference["image"]["roc_auc"].high - difference["image"]["roc_auc"].low < unpaired_high - unpaired_low


def test_bootstrap_refuses_predictions_of_other_images():
    labels, patients, prob = synthetic_images(seed=3)
    bootstrap = PatientBootstrap.draw(labels=labels, patients=patients, resamples=10, seed=0)
    with pytest.raises(PipelineError, match=f"{len(prob) - 1} predictions for the bootstrap's {len(prob)} images"):
        bootstrap.difference(prob, prob[:-1])


def test_fold_summary_mean_and_sd_over_folds():
    labels, patients, prob = synthetic_images(patients=16, seed=5)
    patient_number = np.array([int(patient[1:]) for patient in patients])
    folds = (patient_number // 2) % 4  # patients 2f, 2f+1 (one benign, one malignant) ... in fold f mod 4
    summary = fold_summary(prob, labels=labels, patients=patients, folds=folds)
    assert [fold["fold"] for fold in summary["per_fold"]] == [0, 1, 2, 3]
    per_fold_auc = [binary_metrics(labels[folds == fold], prob[folds == fold], patients[folds == fold])["roc_auc"]
                    for fold in range(4)]
    assert summary["fold_mean"]["image"]["roc_auc"] == pytest.approx(np.mean(per_fold_auc), abs=1e-12)
    assert summary["fold_sd"]["image"]["roc_auc"] == pytest.approx(np.std(per_fold_auc, ddof=1), abs=1e-12)
    per_fold_patient = [patient_metrics(prob[folds == fold], labels[folds == fold], patients[folds == fold])["all"]
                        ["accuracy"] for fold in range(4)]
    assert summary["fold_mean"]["patient"]["accuracy"] == pytest.approx(np.mean(per_fold_patient), abs=1e-12)


def test_evaluate_row_is_json_ready():
    labels, patients, prob = synthetic_images(patients=16, seed=6)
    folds = np.array([int(patient[1:]) // 2 % 4 for patient in patients])
    magnifications = np.array(["100", "400"] * (len(labels) // 2) + ["100"] * (len(labels) % 2))
    bootstrap = PatientBootstrap.draw(labels=labels, patients=patients, resamples=100, seed=0)
    row = evaluate_row(prob, labels=labels, patients=patients, folds=folds, bootstrap=bootstrap,
                       magnifications=magnifications)
    assert set(row) == {"per_fold", "fold_mean", "fold_sd", "pooled", "interval", "bootstrap"}
    assert row["bootstrap"] == {"resamples": 100, "seed": 0, "stratified": True, "unit": "patient"}
    assert set(row["pooled"]["patient"]["by_magnification"]) == {"100", "400"}
    interval = row["interval"]["patient"]["roc_auc"]
    assert interval["low"] <= interval["estimate"] <= interval["high"]
    json.dumps(row)  # plain types only


def test_describe_difference_sentences():
    includes = describe_difference("the heatmap MLP", "the soft vote", "roc_auc", Interval(0.03, -0.01, 0.07, 2000))
    assert includes == ("The heatmap MLP's AUC is 0.03 higher than the soft vote's (95 % CI -0.01 to 0.07, patient "
                        "bootstrap, 2,000 resamples): the interval includes zero, so no difference is shown.")
    lower = describe_difference("the heatmap MLP", "ResNet-50", "balanced_accuracy",
                                Interval(-0.05, -0.09, -0.012, 2000), level="patient")
    assert lower == ("The heatmap MLP's patient-level balanced accuracy is 0.05 lower than ResNet-50's (95 % CI -0.09 "
                     "to -0.01, patient bootstrap, 2,000 resamples): the interval excludes zero, so the heatmap MLP's "
                     "patient-level balanced accuracy is lower.")
    higher = describe_difference("the soft vote", "VGG-16", "roc_auc", Interval(0.1, 0.02, 0.2, 1999))
    assert higher.endswith("1,999 resamples): the interval excludes zero, so the soft vote's AUC is higher.")
    same = describe_difference("the soft vote", "the soft vote", "roc_auc", Interval(0.0, 0.0, 0.0, 2000))
    assert same.startswith("The soft vote's AUC equals the soft vote's (95 % CI 0.00 to 0.00")
    assert same.endswith("the interval includes zero, so no difference is shown.")
    small = describe_difference("the LayerCAM MLP", "the Grad-CAM MLP", "roc_auc", Interval(0.002, 0.0, 0.0048, 2000))
    assert small.startswith("The LayerCAM MLP's AUC is 0.002 higher than the Grad-CAM MLP's (95 % CI 0.00 to 0.005,")
    tiny = describe_difference("a", "b", "roc_auc", Interval(-0.0001, -0.0004, 0.0002, 2000))
    assert "is 0.000 lower than b's (95 % CI 0.000 to 0.000," in tiny  # never "-0.000"
