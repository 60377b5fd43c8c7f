"""The report page of a single-split run (and of each fold of a K-fold run, which is one), built only from the
files the scripts wrote.

    python make_report.py --output-dir runs/breakhis_single_split   ->  report/index.html

Sections:
    header        split protocol, the MLP's fit split, test images and patients, each CNN's input size; a caveat
                  box when a checkpoint says random init or demo data
    comparison    every row of results.json, in display_names order, 3 decimals; accuracy per magnification
    per patient   each row's recognition rate per test patient (results.json per_patient)
    which maps    the heatmap MLP on Grad-CAM vs Grad-CAM++ vs LayerCAM maps, same test patients, patient-bootstrap
                  intervals, paired differences (results.json cam_method_comparison)
    ROC           curves from test_predictions.npz (sklearn roc_curve); the legend's AUC is results.json's
    confusion     one 2x2 grid per row, counts from results.json
    training      train_log_<arch>.jsonl per CNN; the MLP's selection curve from results.json's mlp_training;
                  a loss far above the others (a diverged first epoch) is drawn on the top edge with its value
    calibration   Brier, log loss, ECE before and after temperature scaling, reliability diagrams, conformal sets
                  (common/report/calibration.py)
    gallery       test images, misclassified first (common/report/gallery.py)
    faithfulness  when faithfulness.json exists (common/report/interpretability.py)

Nothing shown is recomputed in another way: predictions are P(malignant) >= 0.5, the rule of
common.evaluation.metrics.binary_metrics that produced results.json, and a probability is shown with the digits
that keep it on its side of 0.5 (format_probability).
"""

import html
import json
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import roc_curve

from common.core.errors import PipelineError
from common.core.fileio import sha256_of_file, write_text
from common.core.runfiles import heatmap_path, probability_key, train_log_path
from common.data.records import CLASS_NAMES
from common.evaluation.metrics import DECISION_THRESHOLD, METRIC_COLUMNS, format_metric
from common.models.registry import MODEL_ORDER
from common.report.calibration import calibration_html, conformal_html
from common.report.gallery import GallerySource, build_gallery, gallery_html
from common.report.html import caveat_html, map_type_html, page_html, save_figure, table_html
from common.report.interpretability import faithfulness_html
from common.run import HeldOut, Run

METRIC_NAMES = {"accuracy": "Accuracy", "balanced_accuracy": "Balanced accuracy", "precision": "Precision",
                "sensitivity": "Sensitivity (recall)", "specificity": "Specificity", "f1": "F1 score",
                "roc_auc": "Area under the ROC curve", "patient_recognition_rate": "Patient recognition rate"}


@dataclass(frozen=True)
class SingleReport:
    """Everything the page reads from one single-split run (or fold)."""

    run: Run
    results: dict  # results.json
    predictions: dict[str, np.ndarray]  # test_predictions.npz: paths, labels, patients, magnifications, prob_<key>
    held: HeldOut  # the test images' maps, in the same order
    train_logs: dict[str, list[dict]]  # arch -> one row per epoch of the last training run ([] when absent)
    caveats: list[str]  # why the CNNs say nothing about real tissue (training_caveats), [] when nothing is known

    @property
    def output_dir(self) -> Path:
        return self.run.output_dir

    @property
    def keys(self) -> list[str]:
        """Row keys of results.json in its display order."""
        return list(self.results["display_names"])

    def name(self, key: str) -> str:
        return self.results["display_names"][key]

    def probabilities(self, key: str) -> np.ndarray:
        return self.predictions[probability_key(key)]

    @property
    def final_key(self) -> str:
        return self.results["final_row"]

    @property
    def results_fold(self) -> int | None:
        """The fold this run is of a K-fold run (None: a single split of its own)."""
        return self.run.partition.protocol.get("fold")

    def gallery_source(self) -> GallerySource:
        return GallerySource(self.held, self.predictions, self.results["display_names"], self.final_key,
                             self.run.data_root, kfold=False)


# ------------------------------------------------------------------------------------------------ reading


def read_train_log(path: Path) -> list[dict]:
    """The epochs of the last training run in a train_log_<arch>.jsonl ([] when there is none).

    The log is appended to: a fresh run in the same output dir starts again at epoch 1, and a resumed run may
    repeat the epoch it was interrupted in, so keep what follows the last epoch 1, the last row per epoch.
    """
    if not path.is_file():
        return []
    try:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except ValueError as error:
        raise PipelineError(f"training log {path} is unreadable ({error})") from None
    start = max((index for index, row in enumerate(rows) if row["epoch"] == 1), default=0)
    return list({row["epoch"]: row for row in rows[start:]}.values())


def load_single_report(run: Run) -> SingleReport:
    """The page's files, checked: results, predictions and heatmap files of one run of the final stage."""
    results = run.results()
    predictions = run.predictions()  # listed in results.json: not of another (or an interrupted) run
    held = run.held_out()  # the maps of the models beside them (a rerun may have stopped before its export)
    if not np.array_equal(predictions["paths"], held.paths) or len(held.paths) != results["test_images"]:
        raise PipelineError(f"results.json, test_predictions.npz and the heatmap files in {run.output_dir} describe "
                            f"different test images; rerun {run.further_command()}")
    for arch in MODEL_ORDER:  # same images, other maps: a model retrained on the same split
        made_from = results.get("sources", {}).get(arch, {}).get("heatmaps_sha256")
        if made_from is not None and sha256_of_file(heatmap_path(run.output_dir, arch)) != made_from:
            raise PipelineError(f"{heatmap_path(run.output_dir, arch)} changed after the final stage ran (its model "
                                "was retrained, or it was given other --heatmaps), so the maps would not match the "
                                f"results; rerun {run.further_command()}")
    train_logs = {arch: read_train_log(train_log_path(run.output_dir, arch)) for arch in MODEL_ORDER}
    return SingleReport(run, results, predictions, held, train_logs, run.caveats())


# ------------------------------------------------------------------------------------------------ plots


def _line_style(key: str) -> dict:
    # The CNNs thin, their soft vote dashed, the MLPs thick: the fused models stand out.
    if key.startswith("mlp_"):
        return {"linewidth": 2.6}
    return {"linewidth": 1.6, "linestyle": "--"} if key == "soft_vote" else {"linewidth": 1.2}


def plot_roc(report: SingleReport, target: Path) -> str:
    figure = Figure(figsize=(6.4, 5.6))
    axes = figure.add_subplot()
    labels = report.predictions["labels"]
    for key in report.keys:
        auc = report.results["rows"][key]["roc_auc"]
        if auc is None:  # one class only in the test split: no curve exists
            continue
        false_positive, true_positive, _ = roc_curve(labels, report.probabilities(key))
        axes.plot(false_positive, true_positive, label=f"{report.name(key)} (AUC {auc:.3f})", **_line_style(key))
    axes.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle=":", label="chance")
    axes.set(xlabel="false positive rate (1 - specificity)", ylabel="true positive rate (sensitivity)",
             xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), aspect="equal",
             title=f"ROC, test split ({len(labels)} images)")
    axes.legend(loc="lower right", fontsize=8)
    return save_figure(figure, target)


def plot_confusion_matrices(report: SingleReport, target: Path) -> str:
    columns = 3
    rows = -(-len(report.keys) // columns)
    figure = Figure(figsize=(3.0 * columns, 2.9 * rows), layout="constrained")
    for index, key in enumerate(report.keys):
        counts = np.array(report.results["rows"][key]["confusion_matrix"])  # [[tn, fp], [fn, tp]]
        axes = figure.add_subplot(rows, columns, index + 1)
        axes.imshow(counts, cmap="Blues", vmin=0, vmax=max(int(counts.max()), 1))
        for (true, predicted), count in np.ndenumerate(counts):
            dark = count > counts.max() / 2
            axes.text(predicted, true, str(count), ha="center", va="center", fontsize=13,
                      color="white" if dark else "black")
        axes.set_xticks([0, 1], CLASS_NAMES)
        axes.set_yticks([0, 1], CLASS_NAMES, rotation=90, va="center")
        axes.set(xlabel="predicted", ylabel="true")
        axes.set_title(report.name(key), fontsize=10)
    return save_figure(figure, target)


def clip_outlying_losses(axes) -> None:
    """Fit the y-range to the bulk of the loss curves drawn so far; points far above it (a first epoch of loss
    21.5 beside 0.7s, which would flatten every other point) are drawn on the top edge as triangles labelled
    with their value.

    Far above: beyond Tukey's far-out fence (third quartile + 3 interquartile ranges) and beyond twice the
    median, so an ordinary falling curve (first epoch 2-3x the last) keeps its natural scale."""
    lines = [line for line in axes.get_lines() if line.get_transform() == axes.transData]
    values = np.concatenate([np.asarray(line.get_ydata(), float) for line in lines]) if lines else np.zeros(0)
    values = values[np.isfinite(values)]
    if len(values) < 3:
        return
    first_quartile, median, third_quartile = np.percentile(values, [25, 50, 75])
    limit = max(third_quartile + 3 * (third_quartile - first_quartile), 2 * median)
    kept = values[values <= limit]
    if len(kept) == len(values):
        return
    margin = 0.08 * max(kept.max() - kept.min(), 1e-3)
    top = kept.max() + margin
    axes.set_ylim(kept.min() - margin, top)
    for line in lines:
        epochs, losses = np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)
        for epoch, loss in zip(epochs[losses > limit], losses[losses > limit]):
            axes.plot([epoch], [top], marker="^", color=line.get_color(), markersize=8, clip_on=False)
            axes.annotate(f"{loss:.3g} (off scale)", (epoch, top), xytext=(6, -10), textcoords="offset points",
                          fontsize=7, color=line.get_color())


def _best_epochs(rows: list[dict]) -> list[int]:
    return [row["epoch"] for row in rows if row.get("best_so_far")]


def plot_cnn_training(report: SingleReport, target: Path) -> str:
    """Per CNN: train/val loss (top) and accuracies (bottom) per epoch; the dotted line is the kept epoch."""
    figure = Figure(figsize=(4.2 * len(MODEL_ORDER), 6.0), layout="constrained")
    grid = figure.subplots(2, len(MODEL_ORDER), squeeze=False)
    for column, arch in enumerate(MODEL_ORDER):
        loss_axes, accuracy_axes = grid[0, column], grid[1, column]
        log = report.train_logs[arch]
        loss_axes.set_title(report.results["display_names"].get(arch, arch))
        if not log:
            loss_axes.text(0.5, 0.5, f"no train_log_{arch}.jsonl", ha="center", transform=loss_axes.transAxes)
            continue
        epochs = [row["epoch"] for row in log]
        loss_axes.plot(epochs, [row["train_loss"] for row in log], "o-", label="train loss")
        loss_axes.plot(epochs, [row["val_loss"] for row in log], "o-", label="val loss")
        clip_outlying_losses(loss_axes)
        accuracy_axes.plot(epochs, [row["train_accuracy"] for row in log], "o-", label="train accuracy")
        accuracy_axes.plot(epochs, [row["val_accuracy"] for row in log], "o-", label="val accuracy")
        accuracy_axes.plot(epochs, [row["val_balanced_accuracy"] for row in log], "s--",
                           label="val balanced accuracy")
        for axes in (loss_axes, accuracy_axes):
            for epoch in _best_epochs(log)[-1:]:
                axes.axvline(epoch, color="grey", linestyle=":", label="kept epoch")
            axes.set_xlabel("epoch")
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
            axes.legend(fontsize=7)
        accuracy_axes.set_ylim(-0.02, 1.02)
    return save_figure(figure, target)


def plot_mlp_training(report: SingleReport, target: Path) -> str:
    """Each feature set's MLP: fit and selection loss, selection balanced accuracy; dotted: the kept epoch."""
    figure = Figure(figsize=(11.0, 3.8), layout="constrained")
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    for index, (feature_set, history) in enumerate(report.results["mlp_training"].items()):
        colour = f"C{index}"
        name = report.results["display_names"].get(f"mlp_{feature_set}", feature_set)
        epochs = [row["epoch"] for row in history]
        loss_axes.plot(epochs, [row["fit_loss"] for row in history], "-", color=colour, label=f"{name}: fit")
        loss_axes.plot(epochs, [row["select_loss"] for row in history], "--", color=colour, label=f"{name}: select")
        accuracy_axes.plot(epochs, [row["select_balanced_accuracy"] for row in history], "o-", markersize=3,
                           color=colour, label=name)
        for axes in (loss_axes, accuracy_axes):
            for epoch in _best_epochs(history)[-1:]:
                axes.axvline(epoch, color=colour, linestyle=":")
    clip_outlying_losses(loss_axes)
    loss_axes.set(xlabel="epoch", ylabel="cross-entropy", title="MLP loss")
    accuracy_axes.set(xlabel="epoch", ylabel="balanced accuracy", ylim=(-0.02, 1.02),
                      title="MLP selection rows (picks the epoch)")
    for axes in (loss_axes, accuracy_axes):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.legend(fontsize=7)
    return save_figure(figure, target)


# ------------------------------------------------------------------------------------------------ gallery


# ------------------------------------------------------------------------------------------------ HTML


def header_html(report: SingleReport) -> str:
    results = report.results
    patients = results["test_patients"]
    facts = {
        "Split protocol": results["split_protocol"],
        "Heatmap MLP fit on": f"the {results['fit_split']} split (never on test patients)",
        "Final classifier": results["display_names"].get(report.final_key, report.final_key),
        "Test split": f"{results['test_images']} images of {len(patients)} patients ({', '.join(patients)})",
        "Grad-CAM": f"target class rule '{report.held.target_class_rule}'",
        "CNN input": ", ".join(f"{results['display_names'].get(arch, arch)} {report.held.image_sizes[arch]} px"
                               for arch in MODEL_ORDER),  # each model's own: they may be trained at other sizes
        "Run folder": str(report.output_dir.resolve()),
    }
    items = "".join(f"<dt>{html.escape(name)}</dt><dd>{html.escape(value)}</dd>" for name, value in facts.items())
    title = f"Fold {fold} of a K-fold run" if (fold := report.results_fold) else "BreaKHis run report"
    return f"<h1>{title}</h1>{caveat_html(report.caveats)}<dl class=\"facts\">{items}</dl>"


def comparison_html(report: SingleReport) -> str:
    header = ["Model"] + [f'<abbr title="{METRIC_NAMES.get(key, key)}">{short}</abbr>' for key, short in METRIC_COLUMNS]
    rows = [[html.escape(report.name(key))] + [format_metric(report.results["rows"][key].get(metric))
                                            for metric, _ in METRIC_COLUMNS] for key in report.keys]
    classes = ["final" if key == report.final_key else "" for key in report.keys]
    note = (f"<p>Test split only, read from results.json; a prediction is malignant when P(malignant) &ge; "
            f"{DECISION_THRESHOLD}. The final classifier's row is bold.</p>")
    return note + table_html(header, rows, table_id="comparison", row_classes=classes) + magnification_html(report)


def magnification_html(report: SingleReport) -> str:
    """Test accuracy per magnification, when the test split has more than one."""
    by_key = {key: report.results["rows"][key].get("accuracy_by_magnification") for key in report.keys}
    magnifications = next((list(value) for value in by_key.values() if value), None)
    if not magnifications:
        return ""
    header = ["Model"] + [f"{html.escape(mag)}X" for mag in magnifications]
    rows = [[html.escape(report.name(key))] + [format_metric((by_key[key] or {}).get(mag)) for mag in magnifications]
            for key in report.keys]
    return "<h3>Test accuracy by magnification</h3>" + table_html(header, rows, table_id="by-magnification")


def per_patient_html(report: SingleReport) -> str:
    per_patient = report.results["per_patient"]
    patients = sorted(per_patient[report.keys[0]])
    header = ["Patient", "True class", "Images"] + [html.escape(report.name(key)) for key in report.keys]
    rows = []
    for patient in patients:
        first = per_patient[report.keys[0]][patient]
        cells = [html.escape(patient), CLASS_NAMES[first["label"]], str(first["images"])]
        for key in report.keys:
            entry = per_patient[key][patient]
            css = "low" if entry["rate"] < 0.5 else ""
            cells.append(f'<span class="{css}">{format_metric(entry["rate"])}</span> '
                         f'<small>({entry["correct"]}/{entry["images"]})</small>')
        rows.append(cells)
    note = ("<p>Recognition rate of each test patient: correctly classified images / images of that patient "
            "(Spanhol et al. 2016); the table's patient recognition rate is their mean.</p>")
    return note + table_html(header, rows, table_id="per-patient")


def _plot(name: str, alt: str) -> str:
    return f'<img class="plot" src="{quote(name)}" alt="{html.escape(alt)}">'


def write_single_report(report: SingleReport, report_dir: Path, *, gallery_size: int) -> None:
    """index.html, the plots and gallery/ into report_dir (an empty folder)."""
    plots = {
        "roc": plot_roc(report, report_dir / "roc.png"),
        "confusion": plot_confusion_matrices(report, report_dir / "confusion_matrices.png"),
        "cnn": plot_cnn_training(report, report_dir / "training_cnns.png"),
        "mlp": plot_mlp_training(report, report_dir / "training_mlp.png"),
    }
    gallery = build_gallery(report.gallery_source(), report_dir, gallery_size)
    sections = {
        "Comparison": comparison_html(report),
        "Per patient": per_patient_html(report),
        "Which maps": map_type_html(report.results.get("cam_method_comparison")),
        "ROC curves": _plot(plots["roc"], "ROC curves of every model on the test split"),
        "Confusion matrices": "<p>Test split; rows: true class, columns: predicted class.</p>"
                              + _plot(plots["confusion"], "confusion matrices"),
        "Training": "<h3>CNN fine-tuning (train_log_&lt;arch&gt;.jsonl)</h3>"
                    + _plot(plots["cnn"], "CNN training curves")
                    + "<h3>Heatmap MLP</h3>" + _plot(plots["mlp"], "MLP training curves"),
        "Grad-CAM gallery": gallery_html(report.gallery_source(), gallery),
    }
    for title, section in (("Calibration", calibration_html(report.results, report.predictions, report_dir)),
                           ("Conformal sets", conformal_html(report.results))):
        if section is not None:  # absent in results of earlier versions
            sections[title] = section
    faithfulness = faithfulness_html(report.run, report_dir)  # None until score_explanations.py ran
    if faithfulness is not None:
        sections["Faithfulness"] = faithfulness
    write_text(report_dir / "index.html",
               page_html(f"BreaKHis report: {report.output_dir.name}", sections, header_html(report)))
