"""Calibration metrics against scikit-learn and a plain loop, temperature scaling against a known temperature,
split-conformal sets against their finite-sample guarantee, and the cross-fitted plan against leakage."""

import math

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss, log_loss

from common.core.errors import PipelineError
from common.evaluation.calibration import (
    ECE_BINS,
    apply_temperature,
    bin_edges,
    calibration_metrics,
    fit_temperature,
    reliability_curve,
)
from common.evaluation.conformal import conformal_threshold, prediction_sets, set_names, set_outcomes
from common.evaluation.stats import PatientBootstrap
from common.evaluation.uncertainty import HeldOutPlan, evaluate_uncertainty, uncertainty_markdown


def over_confident(seed: int, n: int = 600, temperature: float = 2.5):
    """Labels drawn from sigmoid(z / temperature), reported as sigmoid(z): a model over-confident by that factor."""
    rng = np.random.default_rng(seed)
    margins = rng.normal(0.0, 3.0, n)
    labels = (rng.random(n) < 1 / (1 + np.exp(-margins / temperature))).astype(int)
    return labels, 1 / (1 + np.exp(-margins))


def ece_by_plain_loop(labels, prob, edges):
    """Expected calibration error the long way: each row into its bin, one bin at a time."""
    total = 0.0
    for bin_index in range(len(edges) - 1):
        last = len(edges) - 2
        members = [i for i, p in enumerate(prob)
                   if (bin_index == 0 or p > edges[bin_index]) and (bin_index == last or p <= edges[bin_index + 1])]
        if members:
            gap = np.mean([labels[i] for i in members]) - np.mean([prob[i] for i in members])
            total += len(members) / len(prob) * abs(gap)
    return total


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_calibration_metrics_equal_scikit_learn_and_a_plain_loop(seed):
    labels, prob = over_confident(seed)
    prob[:3] = [0.0, 1.0, 0.5]  # the clipped ends of the log loss and a probability on an inner bin edge
    found = calibration_metrics(labels, prob)
    assert found["brier"] == pytest.approx(brier_score_loss(labels, prob), abs=1e-12)
    assert found["log_loss"] == pytest.approx(log_loss(labels, prob, labels=[0, 1]), abs=1e-12)
    for name, strategy in (("ece", "uniform"), ("ece_adaptive", "quantile")):
        edges = bin_edges(prob, strategy)
        assert found[name] == pytest.approx(ece_by_plain_loop(labels, prob, edges), abs=1e-12)
        observed, predicted = calibration_curve(labels, prob, n_bins=ECE_BINS, strategy=strategy)
        curve = reliability_curve(labels, prob, strategy=strategy)
        assert np.allclose(curve["observed"], observed) and np.allclose(curve["mean_predicted"], predicted)
        assert sum(curve["rows"]) == len(prob)
        weighted_gap = np.sum(np.asarray(curve["rows"]) / len(prob) * np.abs(observed - predicted))
        assert found[name] == pytest.approx(weighted_gap, abs=1e-12)


def test_a_perfectly_calibrated_model_has_small_ece_and_an_over_confident_one_does_not():
    labels, prob = over_confident(3, n=20000, temperature=1.0)
    assert calibration_metrics(labels, prob)["ece"] < 0.02
    labels, prob = over_confident(3, n=20000, temperature=3.0)
    assert calibration_metrics(labels, prob)["ece"] > 0.08


@pytest.mark.parametrize("true_temperature", [0.5, 1.0, 2.5])
def test_temperature_scaling_recovers_a_known_temperature(true_temperature):
    labels, prob = over_confident(4, n=40000, temperature=true_temperature)
    assert fit_temperature(prob, labels) == pytest.approx(true_temperature, rel=0.05)
    scaled = apply_temperature(prob, fit_temperature(prob, labels))
    assert calibration_metrics(labels, scaled)["log_loss"] <= calibration_metrics(labels, prob)["log_loss"] + 1e-12


def test_temperature_scaling_never_changes_a_decision():
    rng = np.random.default_rng(5)
    prob = np.concatenate([rng.random(5000), [0.5, 0.0, 1.0, 0.5 + 1e-12, 0.5 - 1e-12]])
    for temperature in (0.05, 0.7, 1.0, 3.0, 80.0):
        scaled = apply_temperature(prob, temperature)
        assert np.array_equal(scaled >= 0.5, prob >= 0.5), temperature
        assert np.all(np.diff(scaled[np.argsort(prob)]) >= 0)  # order kept: AUC unchanged


def test_no_held_out_rows_is_refused_with_a_clear_message():
    with pytest.raises(PipelineError, match="no val rows to fit a temperature on"):
        fit_temperature(np.array([]), np.array([]), rows_named="val rows")


def exchangeable_cases(rng, n):
    labels = (rng.random(n) < 0.4).astype(int)
    prob = np.clip(rng.normal(np.where(labels == 1, 0.65, 0.35), 0.2), 0, 1)  # overlapping classes: sets vary
    return labels, prob


@pytest.mark.parametrize("alpha,n_calibration", [(0.1, 19), (0.1, 50), (0.2, 30)])
def test_split_conformal_coverage_keeps_its_finite_sample_guarantee(alpha, n_calibration):
    """Over many random calibration/test draws the coverage is >= 1 - alpha and <= 1 - alpha + 1/(n + 1) (no ties
    with continuous scores), up to Monte-Carlo error: with exchangeable cases its expectation is exactly
    ceil((n + 1)(1 - alpha)) / (n + 1)."""
    rng = np.random.default_rng(6)
    coverages = []
    for _ in range(3000):
        labels, prob = exchangeable_cases(rng, n_calibration + 20)
        threshold = conformal_threshold(labels[:n_calibration], prob[:n_calibration], alpha=alpha)
        sets = prediction_sets(prob[n_calibration:], threshold)
        coverages.append(set_outcomes(sets, labels[n_calibration:])["covered"].mean())
    mean, error = np.mean(coverages), 4 * np.std(coverages) / np.sqrt(len(coverages))
    expected = math.ceil((n_calibration + 1) * (1 - alpha)) / (n_calibration + 1)
    assert mean == pytest.approx(expected, abs=error)
    assert 1 - alpha - error <= mean <= 1 - alpha + 1 / (n_calibration + 1) + error


def test_too_few_calibration_cases_give_both_labels_and_set_names_say_refer():
    labels, prob = np.array([0, 1, 1]), np.array([0.1, 0.8, 0.9])
    assert conformal_threshold(labels, prob, alpha=0.1) == float("inf")  # ceil(4 x 0.9) = 4 > 3 cases
    sets = prediction_sets(np.array([0.02, 0.5, 0.99]), float("inf"))
    assert set_names(sets) == ["uncertain: refer"] * 3
    assert set_names(prediction_sets(np.array([0.05, 0.5, 0.95]), 0.2)) == ["benign", "no label fits: refer",
                                                                           "malignant"]
    assert set_names(prediction_sets(np.array([0.5]), 0.6)) == ["uncertain: refer"]


def cohort(seed: int, patients_per_class: int = 12, images: int = 6):
    """Images of patients whose P(malignant) is over-confident around a per-patient level, 3 magnifications."""
    rng = np.random.default_rng(seed)
    labels, patients, margins, mags = [], [], [], []
    for index in range(2 * patients_per_class):
        label = index % 2
        level = rng.normal(1.2 if label else -1.2, 1.0)
        for image in range(images):
            labels.append(label)
            patients.append(f"P{index:02d}")
            margins.append(3 * (level + rng.normal(0, 1.0)))
            mags.append(("40", "100", "200")[image % 3])
    return np.array(labels), np.array(patients), 1 / (1 + np.exp(-np.array(margins))), np.array(mags)


def test_the_cross_fitted_plan_never_calibrates_a_fold_with_its_own_patients():
    labels, patients, prob, mags = cohort(7)
    folds = np.array([int(name[1:]) % 3 + 1 for name in patients])
    plan = HeldOutPlan.cross_fitted(folds)
    for held_out, evaluated in plan.blocks:
        assert not set(patients[held_out]) & set(patients[evaluated])
    bootstrap = PatientBootstrap.draw(labels=labels, patients=patients, resamples=200, seed=0)
    found = evaluate_uncertainty({"cnn": prob}, labels=labels, patients=patients, magnifications=mags,
                                 plans={"cnn": plan}, bootstrap=bootstrap, alpha=0.1)
    # Changing fold 1's labels moves fold 1's own temperature not at all (it is fitted on folds 2 and 3).
    flipped = labels.copy()
    flipped[folds == 1] = 1 - flipped[folds == 1]
    other = evaluate_uncertainty({"cnn": prob}, labels=flipped, patients=patients, magnifications=mags,
                                 plans={"cnn": plan}, bootstrap=PatientBootstrap.draw(labels=flipped,
                                                                                      patients=patients,
                                                                                      resamples=200, seed=0),
                                 alpha=0.1)
    before, after = (result.section["temperatures"]["cnn"]["per_block"] for result in (found, other))
    assert before[0] == pytest.approx(after[0], abs=1e-9) and before[1] != pytest.approx(after[1], abs=1e-3)
    assert np.array_equal(found.scaled["cnn"][folds == 1], other.scaled["cnn"][folds == 1])
    # Each fold's rows are scaled by the temperature fitted on the other folds.
    for (held_out, evaluated), temperature in zip(plan.blocks, before):
        assert temperature == pytest.approx(fit_temperature(prob[held_out], labels[held_out]))
        assert np.allclose(found.scaled["cnn"][evaluated], apply_temperature(prob[evaluated], temperature))


def test_the_uncertainty_section_agrees_with_its_parts():
    labels, patients, prob, mags = cohort(8, patients_per_class=15)
    val = np.isin(patients, [f"P{index:02d}" for index in range(10)])
    test_rows, val_rows = np.flatnonzero(~val), np.flatnonzero(val)
    plan = HeldOutPlan.held_out(val_rows, test_rows, "the val split")
    bootstrap = PatientBootstrap.draw(labels=labels[test_rows], patients=patients[test_rows], resamples=300, seed=1)
    found = evaluate_uncertainty({"cnn": prob}, labels=labels, patients=patients, magnifications=mags,
                                 plans={"cnn": plan}, bootstrap=bootstrap, alpha=0.2)
    section = found.section
    temperature = fit_temperature(prob[val_rows], labels[val_rows])
    assert temperature > 1.5  # the cohort is over-confident by design
    assert section["temperatures"]["cnn"]["per_block"] == [pytest.approx(temperature)]
    scaled = apply_temperature(prob[test_rows], temperature)
    direct = calibration_metrics(labels[test_rows], scaled)
    for metric, value in direct.items():
        assert section["temperature_scaled"]["cnn"]["image"][metric]["estimate"] == pytest.approx(value, abs=1e-9)
    assert direct["ece"] < calibration_metrics(labels[test_rows], prob[test_rows])["ece"]
    # Image-level sets: the threshold of the val images' scaled scores.
    threshold = conformal_threshold(labels[val_rows], apply_temperature(prob[val_rows], temperature), alpha=0.2)
    outcomes = set_outcomes(prediction_sets(scaled, threshold), labels[test_rows])
    image = section["conformal"]["rows"]["cnn"]["image"]
    assert image["coverage"]["estimate"] == pytest.approx(outcomes["covered"].mean())
    assert image["referred"]["estimate"] == pytest.approx(outcomes["referred"].mean())
    low, high = image["coverage"]["ci95"]
    assert low <= image["coverage"]["estimate"] <= high
    patient = section["conformal"]["rows"]["cnn"]["patient"]
    assert patient["cases"] == 20 and sum(value["cases"] for value in patient["referred_by_class"].values()) == 20
    for_new = found.for_new_images["cnn"]
    assert for_new["temperature"] == pytest.approx(temperature) and len(for_new["patient_scores"]) == 10
    markdown = uncertainty_markdown(section, {"cnn": "A CNN"})
    assert "A CNN, temperature-scaled (T " in markdown and "| A CNN | patient (20) |" in markdown
