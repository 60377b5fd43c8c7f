"""A static HTML report of one run, built only from the files the four scripts wrote.

    python make_report.py --output-dir runs/demo      ->  runs/demo/report/index.html

The report folder is self-contained (index.html, PNG plots, gallery/ thumbnails; relative links, inline CSS, no
JavaScript): it opens from disk and can be zipped or copied as it is. Sections:
    header        split protocol, the MLP's fit split, test images and patients, each CNN's input size
                  (results.json, heatmaps); a caveat box when a checkpoint says random init or demo data
    comparison    every row of results.json, in display_names order, 3 decimals; accuracy per magnification
    per patient   each row's recognition rate per test patient (results.json per_patient)
    which maps    the heatmap MLP on Grad-CAM vs Grad-CAM++ vs LayerCAM maps, same test patients, patient-bootstrap
                  intervals, paired differences (results.json cam_method_comparison; common/evaluation/map_comparison.py)
    ROC           curves from test_predictions.npz (sklearn roc_curve); the legend's AUC is results.json's
    confusion     one 2x2 grid per row, counts from results.json
    training      train_log_<arch>.jsonl per CNN; the MLP's selection curve from results.json's mlp_training;
                  a loss far above the others (a diverged first epoch) is drawn on the top edge with its value
    gallery       test images: original, each CNN's Grad-CAM overlay (heatmaps_<arch>.npz), the combined map,
                  truth and every row's P(malignant) (test_predictions.npz); misclassified images first
    faithfulness  when faithfulness.json exists: deletion/insertion of every method, images explained by every
                  method, the final MLP's Integrated Gradients shares (common/report/interpretability.py)

Nothing shown is recomputed in another way: predictions are P(malignant) >= 0.5, the rule of
common.evaluation.metrics.binary_metrics that produced results.json, and a probability is shown with the digits that keep it
on its side of 0.5 (format_probability). The report is built in a staging folder and swapped in whole.
"""

import html
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image
from sklearn.metrics import roc_curve

from common.cams.display import blend, colorize, combined_map, jet
from common.cams.heatmap_file import load_heatmaps
from common.core.errors import PipelineError
from common.core.fileio import atomic_path, sha256_of_file, write_text
from common.core.runfiles import (
    CV_RESULTS_JSON,
    FURTHER_SCRIPT,
    REPORT_DIR,
    TEST_PREDICTIONS,
    checkpoint_path,
    heatmap_path,
    probability_key,
    train_log_path,
)
from common.data.images import load_rgb
from common.data.partition import SPLIT_FILE_NAME, load_split
from common.data.records import CLASS_NAMES
from common.data.transforms import resize_image
from common.evaluation.metrics import DECISION_THRESHOLD, METRIC_COLUMNS, format_metric, format_probability
from common.models.checkpoints import load_checkpoint, training_caveats
from common.models.registry import ARCHS, MODEL_ORDER
from common.report.html import _table, caveat_html, fresh_folder, map_type_html, page_html, save_figure, swap_in
from common.report.interpretability import faithfulness_html
from common.run import check_listed_in_results, check_made_by_checkpoint, read_results

THUMBNAIL = 128  # gallery image side, pixels
METRIC_NAMES = {"accuracy": "Accuracy", "balanced_accuracy": "Balanced accuracy", "precision": "Precision",
                "sensitivity": "Sensitivity (recall)", "specificity": "Specificity", "f1": "F1 score",
                "roc_auc": "Area under the ROC curve", "patient_recognition_rate": "Patient recognition rate"}


@dataclass(frozen=True)
class Run:
    """Everything the report reads from one output dir."""

    output_dir: Path
    results: dict  # results.json
    predictions: dict[str, np.ndarray]  # test_predictions.npz: paths, labels, patients, magnifications, prob_<key>
    heatmaps: dict[str, dict]  # arch -> heatmaps_<arch>.npz arrays
    data_root: Path  # split.json's: test image paths are relative to it
    train_logs: dict[str, list[dict]]  # arch -> one row per epoch of the last training run ([] when absent)
    caveats: list[str]  # why the CNNs say nothing about real tissue (training_caveats), [] when nothing is known

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
        return f"mlp_{self.results.get('final_features', 'heatmaps')}"


# ------------------------------------------------------------------------------------------------ reading


def _require(path: Path, script: str) -> Path:
    if not path.is_file():
        raise PipelineError(f"{path} is missing: run {script} --output-dir {path.parent} first")
    return path


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


def load_run(output_dir: Path) -> Run:
    output_dir = Path(output_dir)
    results = read_results(output_dir)
    predictions_file = _require(output_dir / TEST_PREDICTIONS, FURTHER_SCRIPT)
    check_listed_in_results(results, predictions_file)  # not one of another (or an interrupted) run
    try:
        with np.load(predictions_file, allow_pickle=False) as content:
            predictions = {key: content[key] for key in content.files}
    except Exception as error:  # truncated or foreign file
        raise PipelineError(f"{predictions_file} is unreadable ({type(error).__name__}); rerun {FURTHER_SCRIPT}") from None
    heatmap_files = {arch: _require(heatmap_path(output_dir, arch), ARCHS[arch].script) for arch in MODEL_ORDER}
    heatmaps = {arch: load_heatmaps(path) for arch, path in heatmap_files.items()}
    for arch, path in heatmap_files.items():  # maps of the models beside them (a rerun may have stopped before)
        checkpoint_file = _require(checkpoint_path(output_dir, arch), ARCHS[arch].script)
        check_made_by_checkpoint(arch, path, heatmaps[arch], checkpoint_file, sha256_of_file(checkpoint_file),
                                 rerun_further=True)
    # The report mixes the three files; a model script rerun after cancer_class_further.py would make them disagree.
    stale = len(predictions["labels"]) != results["test_images"] or \
        any(not np.isin(predictions["paths"], heatmaps[arch]["paths"]).all() for arch in MODEL_ORDER)
    if stale:
        raise PipelineError(f"results.json, test_predictions.npz and the heatmap files in {output_dir} describe "
                            f"different test images; rerun {FURTHER_SCRIPT} --output-dir {output_dir}")
    for arch, path in heatmap_files.items():  # same images, other maps: a model retrained on the same split
        made_from = results.get("sources", {}).get(arch, {}).get("heatmaps_sha256")
        if made_from is not None and sha256_of_file(path) != made_from:
            raise PipelineError(f"{path} changed after {FURTHER_SCRIPT} ran (its model was retrained or it was given "
                                f"other --heatmaps), so the maps would not match the results; rerun {FURTHER_SCRIPT} "
                                f"--output-dir {output_dir}")
    split = load_split(_require(output_dir / SPLIT_FILE_NAME, ARCHS[MODEL_ORDER[0]].script))
    train_logs = {arch: read_train_log(train_log_path(output_dir, arch)) for arch in MODEL_ORDER}
    # The checkpoints say how each CNN was trained (read lazily: memory-mapped); a run copied without them
    # still gets its report, without the caveats.
    checkpoints = {results["display_names"].get(arch, arch): load_checkpoint(checkpoint_path(output_dir, arch), arch)
                   for arch in MODEL_ORDER if checkpoint_path(output_dir, arch).is_file()}
    return Run(output_dir, results, predictions, heatmaps, split.root, train_logs, training_caveats(checkpoints))


# ------------------------------------------------------------------------------------------------ plots


def _line_style(key: str) -> dict:
    # The CNNs thin, their soft vote dashed, the MLPs thick: the fused models stand out.
    if key.startswith("mlp_"):
        return {"linewidth": 2.6}
    return {"linewidth": 1.6, "linestyle": "--"} if key == "soft_vote" else {"linewidth": 1.2}


def plot_roc(run: Run, target: Path) -> str:
    figure = Figure(figsize=(6.4, 5.6))
    axes = figure.add_subplot()
    labels = run.predictions["labels"]
    for key in run.keys:
        auc = run.results["rows"][key]["roc_auc"]
        if auc is None:  # one class only in the test split: no curve exists
            continue
        false_positive, true_positive, _ = roc_curve(labels, run.probabilities(key))
        axes.plot(false_positive, true_positive, label=f"{run.name(key)} (AUC {auc:.3f})", **_line_style(key))
    axes.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle=":", label="chance")
    axes.set(xlabel="false positive rate (1 - specificity)", ylabel="true positive rate (sensitivity)",
             xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), aspect="equal",
             title=f"ROC, test split ({len(labels)} images)")
    axes.legend(loc="lower right", fontsize=8)
    return save_figure(figure, target)


def plot_confusion_matrices(run: Run, target: Path) -> str:
    columns = 3
    rows = -(-len(run.keys) // columns)
    figure = Figure(figsize=(3.0 * columns, 2.9 * rows), layout="constrained")
    for index, key in enumerate(run.keys):
        counts = np.array(run.results["rows"][key]["confusion_matrix"])  # [[tn, fp], [fn, tp]]
        axes = figure.add_subplot(rows, columns, index + 1)
        axes.imshow(counts, cmap="Blues", vmin=0, vmax=max(int(counts.max()), 1))
        for (true, predicted), count in np.ndenumerate(counts):
            dark = count > counts.max() / 2
            axes.text(predicted, true, str(count), ha="center", va="center", fontsize=13,
                      color="white" if dark else "black")
        axes.set_xticks([0, 1], CLASS_NAMES)
        axes.set_yticks([0, 1], CLASS_NAMES, rotation=90, va="center")
        axes.set(xlabel="predicted", ylabel="true")
        axes.set_title(run.name(key), fontsize=10)
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


def plot_cnn_training(run: Run, target: Path) -> str:
    """Per CNN: train/val loss (top) and accuracies (bottom) per epoch; the dotted line is the kept epoch."""
    figure = Figure(figsize=(4.2 * len(MODEL_ORDER), 6.0), layout="constrained")
    grid = figure.subplots(2, len(MODEL_ORDER), squeeze=False)
    for column, arch in enumerate(MODEL_ORDER):
        loss_axes, accuracy_axes = grid[0, column], grid[1, column]
        log = run.train_logs[arch]
        loss_axes.set_title(run.results["display_names"].get(arch, arch))
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


def plot_mlp_training(run: Run, target: Path) -> str:
    """Each feature set's MLP: fit and selection loss, selection balanced accuracy; dotted: the kept epoch."""
    figure = Figure(figsize=(11.0, 3.8), layout="constrained")
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    for index, (feature_set, history) in enumerate(run.results["mlp_training"].items()):
        colour = f"C{index}"
        name = run.results["display_names"].get(f"mlp_{feature_set}", feature_set)
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


def wrong_predictions(run: Run) -> dict[str, np.ndarray]:
    """Per row key, (N,) bool: the test images that row misclassifies (binary_metrics' threshold)."""
    labels = run.predictions["labels"]
    return {key: (run.probabilities(key) >= DECISION_THRESHOLD).astype(int) != labels for key in run.keys}


def gallery_order(run: Run) -> list[int]:
    """Test rows, misclassified by the final MLP first, then by how many rows of the table got them wrong."""
    wrong = wrong_predictions(run)
    wrong_count = np.sum(list(wrong.values()), axis=0)
    final_wrong = wrong.get(run.final_key, np.zeros(len(wrong_count), bool))
    return sorted(range(len(wrong_count)), key=lambda row: (not final_wrong[row], -wrong_count[row], row))


def _original(run: Run, relative_path: str) -> tuple[Image.Image, bool]:
    """The test image squashed to the square the models saw, or a grey square when it is no longer on disk."""
    path = run.data_root / relative_path
    if not path.is_file():
        return Image.new("RGB", (THUMBNAIL, THUMBNAIL), (200, 200, 200)), False
    return resize_image(load_rgb(path), THUMBNAIL), True


def gallery_panels(run: Run, test_row: int, folder: Path, rank: int) -> dict:
    """Write one test image's PNGs (original, one overlay per CNN, combined); return what its card shows."""
    relative_path = str(run.predictions["paths"][test_row])
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", Path(relative_path).stem)  # safe in a file name and a URL
    image, found = _original(run, relative_path)
    maps = {}
    for arch in MODEL_ORDER:
        arrays = run.heatmaps[arch]
        heatmap_row = int(np.flatnonzero(arrays["paths"] == relative_path)[0])
        maps[arch] = arrays["cams"][heatmap_row]  # (h, w) raw Grad-CAM
    panels = {"original": image}
    panels.update({arch: blend(image, colorize(cam, image.size)) for arch, cam in maps.items()})
    panels["combined"] = blend(image, jet(combined_map(list(maps.values()), image.size)))
    files = {}
    for name, panel in panels.items():
        target = folder / f"{rank:03d}_{stem}_{name}.png"
        with atomic_path(target, suffix=".png") as temp_path:
            panel.save(temp_path, format="PNG")
        files[name] = f"{folder.name}/{target.name}"
    return {"path": relative_path, "found": found, "files": files, "row": test_row}


def build_gallery(run: Run, report_dir: Path, gallery_size: int) -> list[dict]:
    folder = report_dir / "gallery"
    folder.mkdir(parents=True)  # in a fresh staging folder (build_report): no earlier build's images
    chosen = gallery_order(run)[:gallery_size]
    return [gallery_panels(run, row, folder, rank) for rank, row in enumerate(chosen, start=1)]


# ------------------------------------------------------------------------------------------------ HTML


def header_html(run: Run) -> str:
    results = run.results
    patients = results["test_patients"]
    reference = run.heatmaps[MODEL_ORDER[0]]
    facts = {
        "Split protocol": results["split_protocol"],
        "Heatmap MLP fit on": f"the {results['fit_split']} split (never on test patients)",
        "Final classifier": results["display_names"].get(run.final_key, run.final_key),
        "Test split": f"{results['test_images']} images of {len(patients)} patients ({', '.join(patients)})",
        "Grad-CAM": f"target class rule '{reference['target_class_rule']}'",
        "CNN input": ", ".join(f"{results['display_names'].get(arch, arch)} {int(run.heatmaps[arch]['image_size'])} px"
                               for arch in MODEL_ORDER),  # each model's own: they may be trained at other sizes
        "Run folder": str(run.output_dir.resolve()),
    }
    items = "".join(f"<dt>{html.escape(name)}</dt><dd>{html.escape(value)}</dd>" for name, value in facts.items())
    return f"<h1>BreaKHis run report</h1>{caveat_html(run.caveats)}<dl class=\"facts\">{items}</dl>"


def comparison_html(run: Run) -> str:
    header = ["Model"] + [f'<abbr title="{METRIC_NAMES.get(key, key)}">{short}</abbr>' for key, short in METRIC_COLUMNS]
    rows = [[html.escape(run.name(key))] + [format_metric(run.results["rows"][key].get(metric))
                                            for metric, _ in METRIC_COLUMNS] for key in run.keys]
    classes = ["final" if key == run.final_key else "" for key in run.keys]
    note = (f"<p>Test split only, read from results.json; a prediction is malignant when P(malignant) &ge; "
            f"{DECISION_THRESHOLD}. The final classifier's row is bold.</p>")
    return note + _table(header, rows, table_id="comparison", row_classes=classes) + magnification_html(run)


def magnification_html(run: Run) -> str:
    """Test accuracy per magnification, when the test split has more than one."""
    by_key = {key: run.results["rows"][key].get("accuracy_by_magnification") for key in run.keys}
    magnifications = next((list(value) for value in by_key.values() if value), None)
    if not magnifications:
        return ""
    header = ["Model"] + [f"{html.escape(mag)}X" for mag in magnifications]
    rows = [[html.escape(run.name(key))] + [format_metric((by_key[key] or {}).get(mag)) for mag in magnifications]
            for key in run.keys]
    return "<h3>Test accuracy by magnification</h3>" + _table(header, rows, table_id="by-magnification")


def _prediction_rows(run: Run, test_row: int) -> str:
    label = int(run.predictions["labels"][test_row])
    lines = []
    for key in run.keys:
        probability = float(run.probabilities(key)[test_row])
        predicted = int(probability >= DECISION_THRESHOLD)
        verdict = "right" if predicted == label else "wrong"
        final = " final" if key == run.final_key else ""
        # format_probability: the digits shown never contradict the decision (0.4996, not 0.500, beside benign)
        lines.append(f'<tr class="{verdict}{final}"><td>{html.escape(run.name(key))}</td>'
                     f"<td>{format_probability(probability)}</td><td>{CLASS_NAMES[predicted]}</td>"
                     f"<td>{'&#10003;' if verdict == 'right' else '&#10007;'}</td></tr>")
    return ("<table class=\"predictions\"><thead><tr><th>Model</th><th>P(malignant)</th><th>Predicted</th><th></th>"
            f"</tr></thead><tbody>{''.join(lines)}</tbody></table>")


def gallery_card(run: Run, item: dict) -> str:
    row = item["row"]
    label = CLASS_NAMES[int(run.predictions["labels"][row])]
    captions = {"original": "original", "combined": "combined (mean)"}
    figures = "".join(
        f'<figure><img src="{quote(path)}" width="{THUMBNAIL}" height="{THUMBNAIL}" alt="{html.escape(name)}">'
        f"<figcaption>{html.escape(captions.get(name) or run.results['display_names'].get(name, name))}"
        "</figcaption></figure>" for name, path in item["files"].items())
    missing = "" if item["found"] else " <em>(image no longer at split.json's data_root: grey placeholder)</em>"
    magnification = str(run.predictions["magnifications"][row])
    title = (f"<h3>True: <span class=\"{label}\">{label}</span> &middot; patient "
             f"{html.escape(str(run.predictions['patients'][row]))}"
             f"{f' &middot; {html.escape(magnification)}X' if magnification else ''}</h3>"
             f"<p class=\"path\">{html.escape(item['path'])}{missing}</p>")
    return (f'<div class="card" data-path="{html.escape(item["path"])}">{title}<div class="card-body">'
            f'<div class="strip">{figures}</div>{_prediction_rows(run, row)}</div></div>')


def gallery_html(run: Run, items: list[dict]) -> str:
    final_wrong = wrong_predictions(run).get(run.final_key)
    final_wrong = 0 if final_wrong is None else int(sum(final_wrong[item["row"]] for item in items))
    note = (f"<p>{len(items)} of {len(run.predictions['labels'])} test images; those the final classifier "
            f"misclassified first ({final_wrong} shown), then by the number of models that got them wrong. "
            "Overlays: each CNN's raw Grad-CAM min-max scaled for display (jet, red = high); combined: the mean "
            "of the three scaled maps.</p>")
    return note + "".join(gallery_card(run, item) for item in items)


def per_patient_html(run: Run) -> str:
    per_patient = run.results["per_patient"]
    patients = sorted(per_patient[run.keys[0]])
    header = ["Patient", "True class", "Images"] + [html.escape(run.name(key)) for key in run.keys]
    rows = []
    for patient in patients:
        first = per_patient[run.keys[0]][patient]
        cells = [html.escape(patient), CLASS_NAMES[first["label"]], str(first["images"])]
        for key in run.keys:
            entry = per_patient[key][patient]
            css = "low" if entry["rate"] < 0.5 else ""
            cells.append(f'<span class="{css}">{format_metric(entry["rate"])}</span> '
                         f'<small>({entry["correct"]}/{entry["images"]})</small>')
        rows.append(cells)
    note = ("<p>Recognition rate of each test patient: correctly classified images / images of that patient "
            "(Spanhol et al. 2016); the table's patient recognition rate is their mean.</p>")
    return note + _table(header, rows, table_id="per-patient")


def _plot(name: str, alt: str) -> str:
    return f'<img class="plot" src="{quote(name)}" alt="{html.escape(alt)}">'


def build_report(output_dir: Path, *, gallery_size: int = 24) -> Path:
    """Write <output_dir>/report/index.html and its PNGs from the run's files; return the index.html path.

    The whole report is built in a staging folder beside report/ and swapped in only when complete, so a build
    that fails midway (a bad image, a full disk) leaves the previous report as it was. A K-fold run's folder
    (cv_results.json) gets the cross-validation page instead (common/report/kfold.py)."""
    if (Path(output_dir) / CV_RESULTS_JSON).is_file():
        from common.report.kfold import build_cv_report  # it imports this module's helpers
        return build_cv_report(Path(output_dir))
    run = load_run(Path(output_dir))
    report_dir = run.output_dir / REPORT_DIR
    staging = fresh_folder(run.output_dir, prefix=".report.staging.")
    try:
        write_report_files(run, staging, gallery_size=gallery_size)
        swap_in(staging, report_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a swap; a failed build's half
    return report_dir / "index.html"


def write_report_files(run: Run, report_dir: Path, *, gallery_size: int) -> None:
    """index.html, the plots and gallery/ into report_dir (an empty folder)."""
    plots = {
        "roc": plot_roc(run, report_dir / "roc.png"),
        "confusion": plot_confusion_matrices(run, report_dir / "confusion_matrices.png"),
        "cnn": plot_cnn_training(run, report_dir / "training_cnns.png"),
        "mlp": plot_mlp_training(run, report_dir / "training_mlp.png"),
    }
    gallery = build_gallery(run, report_dir, gallery_size)
    sections = {
        "Comparison": comparison_html(run),
        "Per patient": per_patient_html(run),
        "Which maps": map_type_html(run.results.get("cam_method_comparison")),
        "ROC curves": _plot(plots["roc"], "ROC curves of every model on the test split"),
        "Confusion matrices": "<p>Test split; rows: true class, columns: predicted class.</p>"
                              + _plot(plots["confusion"], "confusion matrices"),
        "Training": "<h3>CNN fine-tuning (train_log_&lt;arch&gt;.jsonl)</h3>"
                    + _plot(plots["cnn"], "CNN training curves")
                    + "<h3>Heatmap MLP</h3>" + _plot(plots["mlp"], "MLP training curves"),
        "Grad-CAM gallery": gallery_html(run, gallery),
    }
    faithfulness = faithfulness_html(run.output_dir, report_dir)  # None until python score_explanations.py ran
    if faithfulness is not None:
        sections["Faithfulness"] = faithfulness
    write_text(report_dir / "index.html",
               page_html(f"BreaKHis report: {run.output_dir.name}", sections, header_html(run)))
