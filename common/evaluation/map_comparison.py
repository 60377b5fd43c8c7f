"""Which maps make the best final classifier: the heatmap MLP trained on Grad-CAM, Grad-CAM++ and LayerCAM maps,
scored on the same images, with patient-bootstrap intervals and paired differences against Grad-CAM.

    comparison = compare_cam_methods({"gradcam": p_gc, "gradcam++": p_pp, "layercam": p_lc}, labels=labels,
                                     patients=patients, protocol="test split, ...", final_method="gradcam")
    comparison_markdown(comparison)

Who computes the probabilities: cancer_class_further.py trains one MLP per map type on the same fit rows, with the
same seed and settings, and scores the test split (single-split run); common/stages/cross_validation.py cross-fits
one MLP per map type on the out-of-fold rows (K-fold run). Only the map type differs between the rows, so a
difference between them is the maps' doing. The map type of final_classifier.pth is fixed by --cam-method before
the test split is looked at; this table reports, it does not choose (choosing the best row on the data it is scored
on would favour it).

Why paired differences: the rows score the same patients, so what they share (which patients are hard) cancels
out of the difference's interval (common.evaluation.stats.PatientBootstrap.difference); two overlapping marginal
intervals say little about the difference.
"""

import math

import numpy as np

from common.cams.methods import CAM_DISPLAY_NAMES, CAM_METHODS, method_tag
from common.evaluation.stats import (
    LEVELS,
    METRIC_NAMES,
    TOO_FEW_PATIENTS,
    Interval,
    PatientBootstrap,
    describe_difference,
)

REFERENCE_METHOD = "gradcam"  # the design's map; every other map type is compared with it
COMPARED_METRICS = ("roc_auc", "balanced_accuracy")


def cam_probability_key(method: str) -> str:
    """The predictions-file column of the heatmap MLP trained on one map type ('gradcam++' -> 'prob_mlp_gradcampp');
    the comparison is computed from these."""
    return f"prob_mlp_{method_tag(method)}"


def _plain(value: float) -> float | None:
    """JSON has no NaN: an undefined metric (one class among the resampled patients) is null."""
    return None if value is None or math.isnan(value) else float(value)


def compare_cam_methods(probabilities: dict[str, np.ndarray], *, labels, patients, protocol: str, final_method: str,
                        bootstrap: PatientBootstrap | None = None, resamples: int = 2000, seed: int = 0,
                        missing: tuple[str, ...] = ()) -> dict:
    """A JSON-ready dict: per map type, AUC and balanced accuracy at image and patient level with their 95 %
    intervals; each other map type minus Grad-CAM, paired. `probabilities`: map type -> (N,) P(malignant) of the
    heatmap MLP on those maps, all on the same N images. `bootstrap`: the table's own draw, so the rows of this
    comparison and of the main table rest on the same resampled patients (drawn here when not given).
    `missing`: map types the heatmap files do not hold (named in the table so a reader knows why a row is absent)."""
    methods = [method for method in CAM_METHODS if method in probabilities]
    bootstrap = bootstrap or PatientBootstrap.draw(labels=labels, patients=patients, resamples=resamples, seed=seed)
    rows = {}
    for method in methods:
        intervals = bootstrap.intervals(probabilities[method])
        rows[method] = {level: {metric: interval_entry(intervals[level][metric]) for metric in COMPARED_METRICS}
                        for level in LEVELS}
    differences = []
    if REFERENCE_METHOD in probabilities:
        for method in methods:
            if method == REFERENCE_METHOD:
                continue
            by_level = bootstrap.difference(probabilities[method], probabilities[REFERENCE_METHOD],
                                            metrics=COMPARED_METRICS)
            for level in LEVELS:
                for metric, interval in by_level[level].items():
                    differences.append({
                        "a": method, "b": REFERENCE_METHOD, "level": level, "metric": metric,
                        **interval_entry(interval), "resamples": interval.resamples,
                        "sentence": describe_difference(f"the {CAM_DISPLAY_NAMES[method]} MLP",
                                                        f"the {CAM_DISPLAY_NAMES[REFERENCE_METHOD]} MLP",
                                                        metric, interval, level=level)})
    return {"protocol": protocol, "final_method": final_method, "reference_method": REFERENCE_METHOD,
            "methods": methods, "missing": list(missing), "display_names": {m: CAM_DISPLAY_NAMES[m] for m in methods},
            "images": int(len(bootstrap.labels)), "patients": int(len(bootstrap.patients)), "rows": rows,
            "differences": differences,
            "bootstrap": {"resamples": bootstrap.resamples, "seed": bootstrap.seed, "unit": "patient",
                          "stratified": bootstrap.stratified}}


def interval_entry(interval: Interval) -> dict:
    """{'estimate', 'ci95': [low, high]} (JSON nulls where undefined), and 'ci95_note' where there is no interval
    because there are too few patients."""
    entry = {"estimate": _plain(interval.estimate), "ci95": [_plain(interval.low), _plain(interval.high)]}
    return entry | ({"ci95_note": interval.note} if interval.note else {})


def format_estimate(entry: dict) -> str:
    """'0.912 [0.85, 0.96]', '0.912 (too few patients for an interval)', or n/a when the metric is undefined on
    these images."""
    if entry["estimate"] is None:
        return "n/a"
    low, high = entry["ci95"]
    if entry.get("ci95_note"):
        return f"{entry['estimate']:.3f} ({TOO_FEW_PATIENTS})"
    return f"{entry['estimate']:.3f}" + ("" if low is None else f" [{low:.2f}, {high:.2f}]")


def comparison_header() -> list[str]:
    return ["Maps the MLP reads"] + [f"{'Patient ' if level == 'patient' else ''}{METRIC_NAMES[metric]}"
                                     for level in LEVELS for metric in COMPARED_METRICS]


def comparison_cells(comparison: dict, method: str) -> list[str]:
    row = comparison["rows"][method]
    name = comparison["display_names"][method] + (" (final_classifier.pth)" if method == comparison["final_method"]
                                                  else "")
    return [name] + [format_estimate(row[level][metric]) for level in LEVELS for metric in COMPARED_METRICS]


def missing_sentence(comparison: dict) -> str:
    if not comparison["missing"]:
        return ""
    names = ", ".join(CAM_DISPLAY_NAMES[method] for method in comparison["missing"])
    return (f"Not compared: {names} (not in every heatmap file; regenerate the files with the model scripts' "
            f"--heatmaps-only --cam-methods {','.join(CAM_METHODS)}).")


def multiplicity_sentence(comparison: dict) -> str:
    """Each interval covers its own comparison only: with several, one may exclude zero by chance."""
    count = len(comparison["differences"])
    return (f"Each interval is for its own comparison, with no correction for the {count} made here: when nothing "
            f"differs, about one 95 % interval in twenty still excludes zero.")


def comparison_markdown(comparison: dict) -> str:
    """The section of results.md / cv_results.md: the protocol, the table, the paired differences."""
    header = comparison_header()
    lines = ["## Which maps make the best final classifier", "",
             f"The heatmap MLP trained on each map type, everything else equal. {comparison['protocol']} "
             f"{comparison['images']} images of {comparison['patients']} patients; in brackets the 95 % patient-"
             f"bootstrap interval ({comparison['bootstrap']['resamples']:,} resamples, stratified by class). Patient "
             "level: the mean P(malignant) of each patient's images.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(comparison_cells(comparison, method)) + " |" for method in comparison["methods"]]
    lines += [""] + [f"- {difference['sentence']}" for difference in comparison["differences"]]
    if comparison["differences"]:
        lines += ["", multiplicity_sentence(comparison)]
    if comparison["missing"]:
        lines += ["", missing_sentence(comparison)]
    return "\n".join(lines) + "\n"
