"""The calibration and conformal sections of a results file, the same for both kinds of run; only which held-out
rows calibrate which evaluated rows differs (HeldOutPlan).

    plan = HeldOutPlan.cross_fitted(folds)                            # K-fold: fold k from the other folds' rows
    plan = HeldOutPlan.held_out(val_rows, test_rows, "the val split")  # single split
    found = evaluate_uncertainty(probabilities, labels=..., patients=..., magnifications=..., plans={key: plan},
                                 bootstrap=bootstrap_of_the_evaluated_rows, alpha=0.1)
    found.section                 # JSON-ready: calibration before and after temperature scaling, conformal sets
    found.scaled[key]             # (N,) temperature-scaled P(malignant), NaN on rows not evaluated
    found.for_new_images[key]     # what a classifier file stores: the temperature and the conformal scores

Per row of the table (key) and per block of the plan: a temperature fitted on the block's held-out rows scales its
evaluated rows (common.evaluation.calibration); a conformal threshold from the held-out rows' scaled scores gives
each evaluated image and each evaluated patient its set (common.evaluation.conformal). Patient level: a patient's
probability is the mean scaled P(malignant) of its images, its label the majority of theirs; the calibration
patients are the held-out rows' patients. For new images, one temperature and one set of scores from all of the
plan's held-out rows (K-fold: every out-of-fold row; single split: the val rows).

Every figure has the table's patient-bootstrap 95 % interval (the same resampled patients as the main table). For
coverage and referral, the sets stay fixed and the evaluated patients are resampled: the interval is the
uncertainty of the evaluation, not of the threshold.
"""

from dataclasses import dataclass

import numpy as np

from common.data.records import CLASS_NAMES
from common.evaluation.calibration import (
    BINNING,
    CALIBRATION_METRICS,
    ECE_BINS,
    TEMPERATURE_BOUNDS,
    apply_temperature,
    fit_temperature,
)
from common.evaluation.conformal import (
    prediction_sets,
    referral_by,
    resampled_set_summary,
    set_outcomes,
    threshold_from_scores,
    true_label_scores,
)
from common.evaluation.map_comparison import format_estimate, interval_entry
from common.evaluation.stats import CALIBRATION_LEVEL_METRICS, LEVELS, PatientBootstrap, diagnose_patients

SET_SUMMARY = ("coverage", "referred", "accuracy_not_referred")
CALIBRATION_DEFINITION = (
    f"Brier score: mean (P - label)^2. Log loss: mean -log P(true class). ECE: {ECE_BINS} equal-width bins of "
    f"P(malignant), sum of (bin share) x |observed malignant share - mean P|; adaptive ECE: the same with "
    f"{ECE_BINS} equal-mass bins (edges at the quantiles of the evaluated P). Lower is better for all four. "
    "Patient level: each patient's mean P(malignant) against its label.")


@dataclass(frozen=True)
class HeldOutPlan:
    """Which held-out rows calibrate which evaluated rows (positions in the table's arrays)."""

    blocks: tuple[tuple[np.ndarray, np.ndarray], ...]  # (held-out rows, rows they calibrate), disjoint patients
    final_rows: np.ndarray  # the held-out rows whose fit serves new images
    description: str

    @classmethod
    def cross_fitted(cls, folds) -> "HeldOutPlan":
        folds = np.asarray(folds)
        blocks = tuple((np.flatnonzero(folds != fold), np.flatnonzero(folds == fold)) for fold in np.unique(folds))
        return cls(blocks, np.arange(len(folds)),
                   "cross-fitted: the rows of fold k scaled and given sets by a temperature and a threshold fitted "
                   "on the other folds' out-of-fold rows only; for new images, fitted on every out-of-fold row")

    @classmethod
    def held_out(cls, held_out_rows, evaluated_rows, held_out_name: str) -> "HeldOutPlan":
        held_out_rows = np.asarray(held_out_rows, dtype=np.int64)
        return cls(((held_out_rows, np.asarray(evaluated_rows, dtype=np.int64)),), held_out_rows,
                   f"fitted on {held_out_name} (held-out patients), applied to the test split and to new images")

    @property
    def evaluated(self) -> np.ndarray:
        return np.sort(np.concatenate([rows for _, rows in self.blocks]))


@dataclass(frozen=True)
class Calibrated:
    section: dict
    scaled: dict[str, np.ndarray]
    for_new_images: dict[str, dict]


def patient_sets(scaled, labels, patients, held_out, evaluated, alpha) -> tuple[dict[str, np.ndarray], float]:
    """Each evaluated patient's set (patient -> (2,) bool) from the held-out patients' threshold."""
    calibration = diagnose_patients(scaled[held_out], labels[held_out], patients[held_out])
    threshold = threshold_from_scores(true_label_scores(calibration.labels, calibration.prob_malignant), alpha)
    target = diagnose_patients(scaled[evaluated], labels[evaluated], patients[evaluated])
    return dict(zip(target.patients, prediction_sets(target.prob_malignant, threshold))), threshold


def calibrate_row(prob, labels, patients, magnifications, plan: HeldOutPlan, alpha: float, name: str) -> dict:
    """One row of the table through the plan: scaled P, temperatures, image and patient sets (and per
    magnification, each magnification's images alone), and the fit for new images."""
    scaled = np.full(len(prob), np.nan)
    image_sets = np.zeros((len(prob), 2), dtype=bool)
    by_patient, by_magnification, blocks = {}, {}, []
    for held_out, evaluated in plan.blocks:
        temperature = fit_temperature(prob[held_out], labels[held_out], rows_named=f"held-out rows for {name}")
        held_scaled = np.full(len(prob), np.nan)
        held_scaled[held_out] = apply_temperature(prob[held_out], temperature)
        held_scaled[evaluated] = scaled[evaluated] = apply_temperature(prob[evaluated], temperature)
        image_threshold = threshold_from_scores(true_label_scores(labels[held_out], held_scaled[held_out]), alpha)
        image_sets[evaluated] = prediction_sets(scaled[evaluated], image_threshold)
        sets, patient_threshold = patient_sets(held_scaled, labels, patients, held_out, evaluated, alpha)
        by_patient.update(sets)
        for magnification in np.unique(magnifications[evaluated]):
            held_mag = held_out[magnifications[held_out] == magnification]
            evaluated_mag = evaluated[magnifications[evaluated] == magnification]
            if len(held_mag):
                by_magnification.setdefault(str(magnification), {}).update(
                    patient_sets(held_scaled, labels, patients, held_mag, evaluated_mag, alpha)[0])
        blocks.append({"temperature": temperature, "image_threshold": image_threshold,
                       "patient_threshold": patient_threshold, "held_out_rows": len(held_out)})
    final = plan.final_rows
    final_temperature = fit_temperature(prob[final], labels[final], rows_named=f"held-out rows for {name}")
    final_scaled = apply_temperature(prob[final], final_temperature)
    final_patients = diagnose_patients(final_scaled, labels[final], patients[final])
    return {"scaled": scaled, "image_sets": image_sets, "patient_sets": by_patient,
            "patient_sets_by_magnification": by_magnification, "blocks": blocks,
            "for_new_images": {"temperature": final_temperature, "alpha": alpha,
                               "image_scores": np.sort(true_label_scores(labels[final], final_scaled)),
                               "patient_scores": np.sort(true_label_scores(final_patients.labels,
                                                                           final_patients.prob_malignant))}}


def calibration_entries(bootstrap: PatientBootstrap, prob) -> dict[str, dict[str, dict]]:
    """level -> calibration metric -> {'estimate', 'ci95'[, 'ci95_note']}."""
    intervals = bootstrap.intervals(prob, CALIBRATION_LEVEL_METRICS)
    return {level: {metric: interval_entry(interval) for metric, interval in by_metric.items()}
            for level, by_metric in intervals.items()}


def set_summary(bootstrap: PatientBootstrap, sets: np.ndarray, labels, group_of_row) -> dict:
    """Coverage, referred share and accuracy of the decided cases, each with its interval; referral per class."""
    outcomes = set_outcomes(sets, labels)
    values = resampled_set_summary(outcomes, group_of_row, bootstrap.counts)
    estimates = resampled_set_summary(outcomes, group_of_row, np.ones((1, bootstrap.counts.shape[1])))
    summary = {name: interval_entry(bootstrap.interval(float(estimates[name][0]), values[name]))
               for name in SET_SUMMARY}
    summary["cases"] = len(labels)
    summary["referred_by_class"] = referral_by(sets, labels, np.asarray(CLASS_NAMES)[np.asarray(labels)])
    return summary


def conformal_entry(bootstrap: PatientBootstrap, row: dict, labels, magnifications, evaluated) -> dict:
    """The conformal summary of one row at image and patient level (and per magnification, patient level)."""
    patients = bootstrap.patients
    sets_of_patients = np.array([row["patient_sets"][patient] for patient in patients])
    label_of = dict(zip(patients, bootstrap.patient_labels))
    by_magnification = {}
    for magnification, sets in row["patient_sets_by_magnification"].items():
        names = sorted(sets)
        mag_labels = np.array([label_of[name] for name in names])
        mag_sets = np.array([sets[name] for name in names])
        by_magnification[magnification] = {
            "patients": len(names), "coverage": float(set_outcomes(mag_sets, mag_labels)["covered"].mean()),
            "referred": float(set_outcomes(mag_sets, mag_labels)["referred"].mean()),
            "referred_by_class": referral_by(mag_sets, mag_labels, np.asarray(CLASS_NAMES)[mag_labels])}
    image = set_summary(bootstrap, row["image_sets"][evaluated], labels[evaluated], bootstrap.patient_of_image)
    image["referred_by_magnification"] = referral_by(row["image_sets"][evaluated], labels[evaluated],
                                                     magnifications[evaluated])
    return {"patient": set_summary(bootstrap, sets_of_patients, bootstrap.patient_labels, np.arange(len(patients))),
            "image": image, "patient_by_magnification": by_magnification}


def evaluate_uncertainty(probabilities: dict[str, np.ndarray], *, labels, patients, magnifications,
                         plans: dict[str, HeldOutPlan], bootstrap: PatientBootstrap, alpha: float) -> Calibrated:
    """Calibration of every row before and after temperature scaling, and its conformal sets, on the evaluated
    rows (the same for every plan: the rows the bootstrap was drawn on)."""
    labels, patients = np.asarray(labels, dtype=np.int64), np.asarray(patients).astype(str)
    magnifications = np.asarray(magnifications).astype(str)
    evaluated = next(iter(plans.values())).evaluated
    if any(not np.array_equal(plan.evaluated, evaluated) for plan in plans.values()):
        raise ValueError("every row's plan must evaluate the same rows")
    rows = {key: calibrate_row(np.asarray(prob, dtype=np.float64), labels, patients, magnifications, plans[key],
                               alpha, key) for key, prob in probabilities.items()}
    section = {
        "definition": CALIBRATION_DEFINITION, "binning": {name: {"strategy": strategy, "bins": ECE_BINS}
                                                          for name, strategy in BINNING.items()},
        "before": {key: calibration_entries(bootstrap, np.asarray(probabilities[key])[evaluated]) for key in rows},
        "temperature_scaled": {key: calibration_entries(bootstrap, row["scaled"][evaluated])
                               for key, row in rows.items()},
        "temperatures": {key: {"per_block": [block["temperature"] for block in row["blocks"]],
                               "for_new_images": row["for_new_images"]["temperature"]} for key, row in rows.items()},
        "protocol": next(iter(plans.values())).description,
        "conformal": {"alpha": alpha, "rows": {key: conformal_entry(bootstrap, row, labels, magnifications, evaluated)
                                               for key, row in rows.items()},
                      # JSON has no infinity: null is a threshold too few held-out cases allow (both labels always)
                      "thresholds": {key: [{name: None if np.isinf(block[name]) else block[name]
                                            for name in ("image_threshold", "patient_threshold")}
                                           for block in row["blocks"]] for key, row in rows.items()}},
        "levels": list(LEVELS),
    }
    return Calibrated(section, {key: row["scaled"] for key, row in rows.items()},
                      {key: row["for_new_images"] for key, row in rows.items()})


# ------------------------------------------------------------------------------------ the tables


def temperature_text(temperatures: dict) -> str:
    """'T 1.42' (one block) or 'T 1.31-1.56 over 5 folds' (cross-fitted); a T at a bound of TEMPERATURE_BOUNDS is
    said to be one: at the upper bound the held-out rows find no signal in P and flatten it to about 0.5."""
    per_block = temperatures["per_block"]
    text = (f"T {per_block[0]:.2f}" if len(per_block) == 1 else
            f"T {min(per_block):.2f}-{max(per_block):.2f} over {len(per_block)} folds")
    at_bound = any(np.isclose(value, bound, rtol=1e-3) for value in per_block for bound in TEMPERATURE_BOUNDS)
    return text + (", at a bound: the held-out rows do not pin T down" if at_bound else "")


def calibration_table(section: dict, display_names: dict[str, str], level: str) -> list[list[str]]:
    """Rows of the calibration table at one level: each model before, then after temperature scaling."""
    rows = []
    for key, before in section["before"].items():
        after = section["temperature_scaled"][key]
        rows.append([display_names[key]] + [format_estimate(before[level][metric]) for metric in CALIBRATION_METRICS])
        rows.append([f"{display_names[key]}, temperature-scaled ({temperature_text(section['temperatures'][key])})"]
                    + [format_estimate(after[level][metric]) for metric in CALIBRATION_METRICS])
    return rows


def referral_text(by_class: dict) -> str:
    return " / ".join(f"{values['referred']:.2f} ({values['cases']})" for values in by_class.values())


def magnification_text(by_magnification: dict) -> str:
    """'40X 0.50 (8), 100X 0.25 (8)': the referred share and cases per magnification."""
    return ", ".join(f"{magnification}X {values['referred']:.2f} ({values.get('cases', values.get('patients'))})"
                     for magnification, values in by_magnification.items())


def conformal_table(section: dict, display_names: dict[str, str]) -> list[list[str]]:
    """Rows of the conformal table: each model at patient and image level (per magnification: at patient level
    each magnification's images alone, calibrated the same way; at image level the images of each)."""
    rows = []
    for key, by_level in section["conformal"]["rows"].items():
        by_magnification = {"patient": by_level["patient_by_magnification"],
                            "image": by_level["image"]["referred_by_magnification"]}
        for level in ("patient", "image"):
            summary = by_level[level]
            rows.append([display_names[key], f"{level} ({summary['cases']})"]
                        + [format_estimate(summary[name]) for name in SET_SUMMARY]
                        + [referral_text(summary["referred_by_class"]),
                           magnification_text(by_magnification[level]) or "n/a"])
    return rows


CALIBRATION_HEADER = ["model", "Brier", "log loss", f"ECE ({ECE_BINS} bins)", f"adaptive ECE ({ECE_BINS} bins)"]
CONFORMAL_HEADER = ["model", "level (cases)", "coverage", "referred", "accuracy, not referred",
                    "referred: benign / malignant (cases)", "referred by magnification (cases)"]


def conformal_sentence(section: dict) -> str:
    alpha = section["conformal"]["alpha"]
    return (f"Split-conformal sets at alpha {alpha:g} (target: the true label in the set for at least "
            f"{100 * (1 - alpha):.0f} % of cases, on average over cases like the held-out ones). A case is referred "
            "when its set is not a single label. Sets from the temperature-scaled P; thresholds "
            f"{section['protocol'].split(':')[0]}. Coverage, referred share and the accuracy of the cases not "
            "referred with the patient-bootstrap 95 % interval (the sets fixed, the evaluated patients resampled).")


def uncertainty_markdown(section: dict, display_names: dict[str, str]) -> str:
    """The calibration and conformal sections of results.md / cv_results.md."""
    def table(header, rows):
        return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
            ["| " + " | ".join(row) + " |" for row in rows]

    lines = ["## Calibration", "", f"{section['definition']} Temperature scaling: {section['protocol']}. In brackets "
             "the patient-bootstrap 95 % interval.", ""]
    for level in LEVELS:
        lines += [f"### {level.capitalize()} level", ""] + table(CALIBRATION_HEADER,
                                                                 calibration_table(section, display_names, level))
        lines.append("")
    lines += ["## Conformal sets: 'refer this case'", "", conformal_sentence(section), ""]
    lines += table(CONFORMAL_HEADER, conformal_table(section, display_names))
    return "\n".join(lines) + "\n"
