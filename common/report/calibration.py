"""The report's 'Calibration' and 'Conformal sets' sections, the same for both kinds of run: the tables of the
results file's calibration section (common.evaluation.uncertainty) and a reliability diagram per row and level,
drawn from the stored predictions (test_predictions.npz or oof_predictions.csv), before and after temperature
scaling, with the rows in each bin written beside its point.
"""

import html
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from common.core.runfiles import probability_key, scaled_probability_key
from common.evaluation.calibration import ECE_BINS, reliability_curve
from common.evaluation.stats import LEVELS, diagnose_patients
from common.evaluation.uncertainty import (
    CALIBRATION_HEADER,
    CONFORMAL_HEADER,
    calibration_table,
    conformal_sentence,
    conformal_table,
)
from common.report.html import note_on_second_line, save_figure, table_html

RELIABILITY_PLOT = "reliability_{level}.png"


def html_cell(cell: str) -> str:
    """A table cell with its interval or too-few-patients note on a second line, so that the tables fit the page."""
    cell = note_on_second_line(html.escape(cell))
    value, bracket, interval = cell.partition(" [")
    return f'{value}<br><span class="spread">[{interval}</span>' if bracket else cell


def level_probabilities(predictions: dict, key: str, level: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, P, temperature-scaled P) of one row at image level, or per patient (mean over its images)."""
    labels = predictions["labels"]
    prob, scaled = predictions[probability_key(key)], predictions[scaled_probability_key(key)]
    if level == "image":
        return labels, prob, scaled
    before = diagnose_patients(prob, labels, predictions["patients"])
    after = diagnose_patients(scaled, labels, predictions["patients"])
    return before.labels, before.prob_malignant, after.prob_malignant


def plot_reliability(results: dict, predictions: dict, level: str, target: Path) -> str:
    """One panel per row: observed malignant share against mean P in ECE_BINS equal-width bins, before (grey) and
    after temperature scaling; each point labelled with its bin's count."""
    keys = list(results["calibration"]["before"])
    columns = 4
    figure = Figure(figsize=(3.6 * columns, 3.6 * -(-len(keys) // columns)), layout="constrained")
    for index, key in enumerate(keys):
        axes = figure.add_subplot(-(-len(keys) // columns), columns, index + 1)
        labels, before, after = level_probabilities(predictions, key, level)
        for prob, colour, name in ((before, "grey", "as trained"), (after, "tab:red", "temperature-scaled")):
            curve = reliability_curve(labels, prob)
            axes.plot(curve["mean_predicted"], curve["observed"], marker="o", markersize=3, color=colour,
                      linewidth=1, label=name)
            for x, y, rows in zip(curve["mean_predicted"], curve["observed"], curve["rows"]):
                axes.annotate(str(rows), (x, y), fontsize=6, color=colour, xytext=(2, 2), textcoords="offset points")
        axes.plot([0, 1], [0, 1], color="black", linestyle=":", linewidth=1)
        axes.set_xlim(0, 1)
        axes.set_ylim(0, 1)
        axes.set_title(results["display_names"][key], fontsize=9)
        axes.set_xlabel("mean P(malignant) in bin", fontsize=8)
        axes.set_ylabel("observed malignant share", fontsize=8)
        axes.legend(fontsize=6, loc="upper left")
    return save_figure(figure, target)


def calibration_html(results: dict, predictions: dict, report_dir: Path) -> str | None:
    """The calibration section (None for a results file written before calibration was reported)."""
    section = results.get("calibration")
    if section is None:
        return None
    parts = [f"<p>{html.escape(section['definition'])} Temperature scaling: {html.escape(section['protocol'])}. "
             "In brackets the patient-bootstrap 95 % interval.</p>"]
    for level in LEVELS:
        table = calibration_table(section, results["display_names"], level)
        rows = [[html_cell(cell) for cell in row] for row in table]
        plot = plot_reliability(results, predictions, level, report_dir / RELIABILITY_PLOT.format(level=level))
        parts += [f"<h3>{level.capitalize()} level</h3>",
                  table_html(CALIBRATION_HEADER, rows, table_id=f"calibration-{level}"),
                  f'<img class="plot" src="{plot}" alt="reliability diagrams, {level} level, every row">',
                  f"<p>Reliability diagrams, {level} level: {ECE_BINS} equal-width bins; the number beside each "
                  "point is the bin's count; on the dotted diagonal a model's P is the observed share.</p>"]
    return "".join(parts)


def conformal_html(results: dict) -> str | None:
    section = results.get("calibration")
    if section is None:
        return None
    rows = [[html_cell(cell) for cell in row] for row in conformal_table(section, results["display_names"])]
    return f"<p>{html.escape(conformal_sentence(section))}</p>" + table_html(CONFORMAL_HEADER, rows,
                                                                             table_id="conformal")
