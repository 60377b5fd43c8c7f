"""The report of a K-fold run (cancer_class_further.py's cross-validated files): <output-dir>/report/index.html,
with each fold's own page in report/fold_<k>/.

    python make_report.py --output-dir runs/breakhis     # a K-fold run (run_pipeline.py's default)

Sections: the sentences on the paired differences; the image-level and patient-level tables (pooled out-of-fold
figure with its patient-bootstrap 95 % interval, and mean ± sd over folds); per-fold ROC curves of every row
(oof_predictions.csv); patient-level results per magnification; the heatmap MLP on each map type; the Grad-CAM
gallery of out-of-fold images (misclassified first, each map from the fold model that never saw the patient); the
faithfulness of the explanations (faithfulness.json, when score_explanations.py has run); calibration before and
after the cross-fitted temperature scaling with reliability diagrams, and the conformal sets
(common/report/calibration.py); links to the folds' pages. The folder is self-contained: the folds' pages are inside it.
"""

import html
import sys
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from common.core.fileio import write_text
from common.core.runfiles import probability_key
from common.evaluation.stats import MIN_PATIENTS_PER_CLASS
from common.report.calibration import calibration_html, conformal_html
from common.report.gallery import GallerySource, build_gallery, gallery_html
from common.report.html import caveat_html, map_type_html, page_html, save_figure, table_html
from common.report.interpretability import faithfulness_html
from common.report.single import load_single_report, write_single_report
from common.run import Run, open_run
from common.stages.cross_validation import format_cell

COLUMNS = {"roc_auc": "AUC", "balanced_accuracy": "Balanced accuracy", "accuracy": "Accuracy",
           "sensitivity": "Sensitivity", "specificity": "Specificity", "f1": "F1",
           "patient_recognition_rate": "Patient recognition rate"}
FOLD_GALLERY_SIZE = 12  # images in each fold's own page (the run's page shows the pooled gallery)


def _cell(entry: dict, *, interval: bool) -> str:
    """The Markdown table's cell with its interval or sd on a second line, so that the wide tables fit the page."""
    value, _, spread = format_cell(entry, interval=interval, plus_minus="&plusmn;").partition(" ")
    css = "spread note" if entry.get("ci95_note") and interval else "spread"
    return f'{value}<br><span class="{css}">{spread}</span>' if spread else value


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
    return table_html(header, rows, table_id=f"cv-{level}", row_classes=classes)


def plot_fold_rocs(results: dict, predictions: dict[str, np.ndarray], target: Path) -> str:
    """One panel per row of the table: the ROC curve of each fold's out-of-fold predictions, and the pooled one."""
    keys = list(results["rows"])
    labels, folds = predictions["labels"], predictions["folds"]
    columns = 4
    figure = Figure(figsize=(4 * columns, 4 * -(-len(keys) // columns)))
    for index, key in enumerate(keys):
        axes = figure.add_subplot(-(-len(keys) // columns), columns, index + 1)
        scores = predictions[probability_key(key)]
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
    return table_html(header, rows, table_id="cv-magnification")


def fold_pages(fold_reports: dict, report_dir: Path) -> str:
    """Each fold's single-split page into report_dir/fold_<k>/; returns the list of links to them."""
    links = []
    for fold, fold_report in fold_reports.items():
        print(f"report: fold {fold}'s page", file=sys.stderr, flush=True)
        folder = report_dir / f"fold_{fold}"
        folder.mkdir()
        write_single_report(fold_report, folder, gallery_size=FOLD_GALLERY_SIZE)
        links.append(f'<li><a href="fold_{fold}/index.html">fold {fold}</a>: its models on its own test patients '
                     "(the fold's table, per-patient rates, training curves, gallery)</li>")
    return ("<p>Each fold is a single-split run whose test split is that fold's patients; its table is one fold's "
            f"illustration, the pooled table above is the result.</p><ul>{''.join(links)}</ul>")


def write_kfold_report(run: Run, report_dir: Path, *, gallery_size: int) -> None:
    """index.html, its plots, gallery/ and fold_<k>/ into report_dir (an empty folder)."""
    results, predictions, held = run.results(), run.predictions(), run.held_out()
    # Every fold's files are read before any work, so an unreadable one stops the build at once, in one line.
    fold_reports = {fold: load_single_report(open_run(run.model_dir(fold))) for fold in run.folds}
    roc = plot_fold_rocs(results, predictions, report_dir / "cv_roc.png")
    source = GallerySource(held, predictions, results["display_names"], results["final_row"], run.data_root,
                           kfold=True)
    gallery = build_gallery(source, report_dir, gallery_size)
    sentences = "".join(f"<li>{html.escape(item['sentence'])}</li>" for item in results["differences"])
    best = results["display_names"][results["best_cnn"]]
    sections = {
        "Differences": f"<ul>{sentences}</ul><p>Best single CNN: {html.escape(best)}, chosen by pooled "
                       "out-of-fold AUC on these same images (which favours it).</p>",
        "Image level": "<p>Pooled: all out-of-fold predictions together, 95 % patient-bootstrap interval in "
                       f"brackets (none below {MIN_PATIENTS_PER_CLASS} patients of a class: the cell says so); "
                       "folds: mean &plusmn; sd over the folds. The final classifier is bold.</p>"
                       + level_table(results, "image"),
        "Patient level": f"<p>{results['patients']} patients, each diagnosed by the mean P(malignant) of its "
                         "images.</p>" + level_table(results, "patient") + "<h3>Per magnification</h3>"
                         + magnification_table(results),
        "ROC curves per fold": f'<img class="plot" src="{roc}" alt="per-fold ROC curves of every row">',
        "Which maps": map_type_html(results.get("cam_method_comparison")),
        "Grad-CAM gallery": gallery_html(source, gallery),
    }
    for title, section in (("Calibration", calibration_html(results, predictions, report_dir)),
                           ("Conformal sets", conformal_html(results))):
        if section is not None:  # absent in results of earlier versions
            sections[title] = section
    faithfulness = faithfulness_html(run, report_dir)  # None until score_explanations.py ran
    if faithfulness is not None:
        sections["Faithfulness"] = faithfulness
    sections["Folds"] = fold_pages(fold_reports, report_dir)
    header = (f"<h1>Cross-validation report ({results['n_folds']} folds)</h1>{caveat_html(run.caveats())}"
              f'<dl class="facts"><dt>Protocol</dt><dd>{html.escape(results["protocol"])}</dd>'
              f"<dt>Run folder</dt><dd>{html.escape(str(run.output_dir.resolve()))}</dd></dl>")
    write_text(report_dir / "index.html", page_html(f"Cross-validation: {run.output_dir.name}", sections, header))
