"""The report page of a K-fold run (common/stages/cross_validation.py's files): <output-dir>/report/index.html.

    python make_report.py --output-dir runs/demo_cv    # a folder with cv_results.json gets this page

Sections: the sentences on the paired differences; the image-level and patient-level tables (pooled out-of-fold
figure with its patient-bootstrap 95 % interval, and mean ± sd over folds); per-fold ROC curves of every row
(oof_predictions.csv); patient-level results per magnification; the heatmap MLP on each map type
(Grad-CAM, Grad-CAM++, LayerCAM). Each fold's own single-split report can be built
with make_report.py --output-dir <output-dir>/fold_<k>. Built in a staging folder and swapped in whole, as
common/report/single.py does.
"""

import csv
import html
import json
import shutil
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from common.core.errors import PipelineError
from common.core.fileio import sha256_of_file, write_text
from common.core.runfiles import (
    CV_RESULTS_JSON,
    OOF_PREDICTIONS,
    REPORT_DIR,
    checkpoint_path,
    fold_dir,
    probability_key,
)
from common.models.checkpoints import load_checkpoint, training_caveats
from common.models.registry import MODEL_ORDER
from common.report.html import _table, caveat_html, fresh_folder, map_type_html, page_html, save_figure, swap_in
from common.stages.cross_validation import format_cell

COLUMNS = {"roc_auc": "AUC", "balanced_accuracy": "Balanced accuracy", "accuracy": "Accuracy",
           "sensitivity": "Sensitivity", "specificity": "Specificity", "f1": "F1",
           "patient_recognition_rate": "Patient recognition rate"}


def read_cv_files(output_dir: Path) -> tuple[dict, list[dict]]:
    """cv_results.json and oof_predictions.csv, checked to be written together (the digest it lists)."""
    results_file = output_dir / CV_RESULTS_JSON
    try:
        results = json.loads(results_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise PipelineError(f"{results_file} is unreadable ({error}); rerun python -m common.stages.cross_validation --output-dir "
                            f"{output_dir}") from None
    predictions_file = output_dir / OOF_PREDICTIONS
    if not predictions_file.is_file() or results.get("outputs", {}).get(OOF_PREDICTIONS) != \
            sha256_of_file(predictions_file):
        raise PipelineError(f"{predictions_file} is missing or not the file {results_file} lists; rerun python -m "
                            f"common.stages.cross_validation --output-dir {output_dir}")
    with open(predictions_file, encoding="utf-8", newline="") as handle:
        return results, list(csv.DictReader(handle))


def _cell(entry: dict, *, interval: bool) -> str:
    return format_cell(entry, interval=interval, plus_minus="&plusmn;")


def level_table(results: dict, level: str) -> str:
    metrics = list(next(iter(results["rows"].values()))[level])
    header = ["Model"] + [f"{COLUMNS[metric]} pooled [95 % CI]" for metric in metrics[:2]] + \
        [f"{COLUMNS[metric]} folds mean &plusmn; sd" for metric in metrics[:2]] + \
        [f"{COLUMNS[metric]} pooled [95 % CI]" for metric in metrics[2:]]
    rows, classes = [], []
    for key, row in results["rows"].items():
        entries = row[level]
        rows.append([html.escape(results["display_names"][key])]
                    + [_cell(entries[metric], interval=True) for metric in metrics[:2]]
                    + [_cell(entries[metric], interval=False) for metric in metrics[:2]]
                    + [_cell(entries[metric], interval=True) for metric in metrics[2:]])
        classes.append("final" if key == results["final_row"] else "")
    return _table(header, rows, table_id=f"cv-{level}", row_classes=classes)


def plot_fold_rocs(results: dict, predictions: list[dict], target: Path) -> str:
    """One panel per row of the table: the ROC curve of each fold's out-of-fold predictions, and the pooled one."""
    keys = list(results["rows"])
    labels = np.array([row["label"] == "malignant" for row in predictions], dtype=int)
    folds = np.array([int(row["fold"]) for row in predictions])
    columns = 4
    figure = Figure(figsize=(4 * columns, 4 * -(-len(keys) // columns)))
    for index, key in enumerate(keys):
        axes = figure.add_subplot(-(-len(keys) // columns), columns, index + 1)
        scores = np.array([float(row[probability_key(key)]) for row in predictions])
        for fold in sorted(set(folds)):
            chosen = folds == fold
            if len(set(labels[chosen])) == 2:
                false_positive, true_positive, _ = roc_curve(labels[chosen], scores[chosen])
                axes.plot(false_positive, true_positive, linewidth=1, alpha=0.7, label=f"fold {fold}")
        false_positive, true_positive, _ = roc_curve(labels, scores)
        pooled = results["rows"][key]["image"]["roc_auc"]["pooled"]
        axes.plot(false_positive, true_positive, color="black", linewidth=2,
                  label=f"pooled (AUC {pooled:.3f})" if pooled is not None else "pooled")
        axes.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        axes.set_title(results["display_names"][key], fontsize=10)
        axes.set_xlabel("false positive rate")
        axes.set_ylabel("true positive rate")
        axes.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    return save_figure(figure, target)


def magnification_table(results: dict) -> str:
    """Patient-level accuracy and AUC when each patient is diagnosed from one magnification's images alone."""
    by_key = {key: row.get("patient_by_magnification") or {} for key, row in results["rows"].items()}
    magnifications = next((list(value) for value in by_key.values() if value), None)
    if not magnifications:
        return "<p>One magnification only.</p>"
    header = ["Model"] + [f"{mag}X accuracy / AUC" for mag in magnifications]

    def pair(values: dict) -> str:
        return " / ".join("n/a" if values.get(name) is None else f"{values[name]:.3f}" for name in ("accuracy",
                                                                                                   "roc_auc"))
    rows = [[html.escape(results["display_names"][key])] + [pair(by_key[key].get(mag, {})) for mag in magnifications]
            for key in results["rows"]]
    return _table(header, rows, table_id="cv-magnification")


def fold_caveats(output_dir: Path) -> list[str]:
    """training_caveats of fold 1's checkpoints (every fold is trained the same way)."""
    checkpoints = {arch: load_checkpoint(checkpoint_path(fold_dir(output_dir, 1), arch), arch)
                   for arch in MODEL_ORDER if checkpoint_path(fold_dir(output_dir, 1), arch).is_file()}
    return training_caveats(checkpoints)


def build_cv_report(output_dir: Path) -> Path:
    """report/index.html of a K-fold run; returns its path."""
    output_dir = Path(output_dir)
    results, predictions = read_cv_files(output_dir)
    report_dir = output_dir / REPORT_DIR
    staging = fresh_folder(output_dir, prefix=".report.staging.")
    try:
        roc = plot_fold_rocs(results, predictions, staging / "cv_roc.png")
        sentences = "".join(f"<li>{html.escape(item['sentence'])}</li>" for item in results["differences"])
        best = results["display_names"][results["best_cnn"]]
        sections = {
            "Differences": f"<ul>{sentences}</ul><p>Best single CNN: {html.escape(best)}, chosen by pooled "
                           "out-of-fold AUC on these same images (which favours it).</p>",
            "Image level": "<p>Pooled: all out-of-fold predictions together, 95 % patient-bootstrap interval in "
                           "brackets; folds: mean &plusmn; sd over the folds. The final classifier is bold.</p>"
                           + level_table(results, "image"),
            "Patient level": f"<p>{results['patients']} patients, each diagnosed by the mean P(malignant) of its "
                             "images.</p>" + level_table(results, "patient") + "<h3>Per magnification</h3>"
                             + magnification_table(results),
            "ROC curves per fold": f'<img class="plot" src="{roc}" alt="per-fold ROC curves of every row">',
            "Which maps": map_type_html(results.get("cam_method_comparison")),
        }
        header = (f"<h1>Cross-validation report ({results['n_folds']} folds)</h1>{caveat_html(fold_caveats(output_dir))}"
                  f'<dl class="facts"><dt>Protocol</dt><dd>{html.escape(results["protocol"])}</dd>'
                  f"<dt>Run folder</dt><dd>{html.escape(str(output_dir.resolve()))}</dd></dl>")
        write_text(staging / "index.html", page_html(f"Cross-validation: {output_dir.name}", sections, header))
        swap_in(staging, report_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report_dir / "index.html"
