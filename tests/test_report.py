"""The HTML report of both kinds of run.

Single split: the page parses, every file it links exists, its numbers are results.json's, the gallery shows
misclassified images first, and a run with missing or stale files gives a clear one-line error. Most of these
tests use a synthesised run (running the four scripts on the demo set takes minutes on 2 CPU cores): a real
split.json of the demo tree, heatmap files in the exported format, and results.json / test_predictions.npz made
with the same metric functions as cancer_class_further.py. One test reads the report of a real pipeline run.

K-fold (the session's 2-fold pipeline run, conftest.py's cv_run): the page's gallery shows out-of-fold images, each
card with its fold and the maps of that fold's own heatmap files; every fold's own page is linked and is that
fold's single-split page; the faithfulness tables are faithfulness.json's numbers; the wide tables scroll in their
own wrappers.
"""

import csv
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

from common.cams.display import colour_scale_html, combined_map, map_overlay, unit_map_overlay
from common.cams.heatmap_file import HEATMAP_FORMAT_VERSION, load_heatmaps
from common.cams.methods import CAM_DISPLAY_NAMES
from common.core.errors import PipelineError
from common.core.fileio import save_npz, save_torch, sha256_of_file, write_json
from common.core.runfiles import checkpoint_path, heatmap_path, probability_key
from common.data.partition import make_split, save_partition
from common.data.records import index_dataset
from common.evaluation.map_comparison import format_estimate
from common.evaluation.metrics import binary_metrics, per_patient_rates, softmax
from common.models.registry import MODEL_ORDER
from common.report import gallery as gallery_module
from common.report import single as single_module
from common.report.build import build_report
from common.report.gallery import THUMBNAIL
from common.report.single import load_single_report, plot_cnn_training
from common.run import open_run
from common.stages.cross_validation import format_cell

DISPLAY_NAMES = {"densenet121": "DenseNet-121", "resnet50": "ResNet-50", "vgg16": "VGG-16",
                 "soft_vote": "Soft vote (mean probability)", "mlp_heatmaps": "MLP on heatmaps",
                 "mlp_heatmaps+logits": "MLP on heatmaps + logits"}
CAM_SIDES = {"densenet121": 4, "resnet50": 4, "vgg16": 8}  # VGG-16's maps are twice as fine
IMAGE_SIZES = {"densenet121": 32, "resnet50": 48, "vgg16": 64}  # each model trained at its own size
PROTOCOL = {"method": "patient", "fold_file": None, "val_fraction": 0.25, "test_fraction": 0.25, "seed": 0,
            "magnification": "all"}
VOID_TAGS = {"meta", "img", "br", "hr", "input", "link", "source", "wbr"}
DEMO_IMAGE_SIZE = (48, 32)  # conftest.py's demo tree: width, height
FOLD_GALLERY_SIZE = 12  # common.report.kfold: images in each fold's own page
SHARE_ROWS_SHOWN = 20  # common.report.interpretability: per-image rows of the MLP's shares table


def write_checkpoints(run_dir: Path, data_dir: Path) -> None:
    """Stand-ins for fine_tuned_<arch>.pth: the report hashes them and reads a stale one's config, nothing else."""
    for arch in MODEL_ORDER:
        save_torch({"model": {}, "arch": arch, "epoch": 1, "config": {"data_dir": str(data_dir), **PROTOCOL}},
                   checkpoint_path(run_dir, arch))


def write_heatmaps(run_dir: Path, split, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """heatmaps_<arch>.npz in the exported format, made by the checkpoints beside them; returns each CNN's logits."""
    logits = {}
    for arch in MODEL_ORDER:
        side = CAM_SIDES[arch]
        logits[arch] = rng.normal(0, 1.5, (len(split.records), 2)).astype(np.float32)
        save_npz(run_dir / f"heatmaps_{arch}.npz",
                 cams=np.maximum(rng.normal(0, 1, (len(split.records), side, side)), 0).astype(np.float32),
                 logits=logits[arch], labels=np.array([r.label for r in split.records], np.int64),
                 paths=np.array([r.path for r in split.records]), patients=np.array([r.patient for r in split.records]),
                 magnifications=np.array([r.magnification for r in split.records]), splits=np.array(split.splits),
                 arch=np.array(arch), target_layer=np.array("layer"), target_class_rule=np.array("predicted"),
                 split_digest=np.array(split.digest), image_size=np.array(IMAGE_SIZES[arch]),
                 format_version=np.array(HEATMAP_FORMAT_VERSION),
                 checkpoint_sha256=np.array(sha256_of_file(checkpoint_path(run_dir, arch))))
    return logits


def write_train_logs(run_dir: Path, rng: np.random.Generator) -> None:
    for arch in MODEL_ORDER:
        rows = [{"epoch": epoch, "train_loss": 0.7 - 0.1 * epoch, "train_accuracy": 0.5 + 0.1 * epoch,
                 "val_loss": 0.7 - 0.05 * epoch, "val_accuracy": 0.5, "val_balanced_accuracy": 0.5,
                 "val_roc_auc": float(rng.uniform()), "best_so_far": epoch != 3} for epoch in (1, 2, 3)]
        (run_dir / f"train_log_{arch}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def write_results(run_dir: Path, split, logits: dict[str, np.ndarray], rng: np.random.Generator) -> None:
    """results.json and test_predictions.npz as cancer_class_further.py writes them (results.json lists the
    predictions file's SHA-256: the run loader refuses predictions it does not list)."""
    test = np.array(split.indices("test"))
    labels = np.array([split.records[i].label for i in test])
    patients = np.array([split.records[i].patient for i in test])
    magnifications = np.array([split.records[i].magnification for i in test])
    probabilities = {arch: softmax(logits[arch][test])[:, 1] for arch in MODEL_ORDER}
    probabilities["soft_vote"] = np.mean([probabilities[arch] for arch in MODEL_ORDER], axis=0)
    # The final MLP gets every third test image wrong, so the gallery has both kinds to order.
    wrong = np.arange(len(test)) % 3 == 1
    probabilities["mlp_heatmaps"] = np.where(labels.astype(bool) ^ wrong, rng.uniform(0.6, 1, len(test)),
                                             rng.uniform(0, 0.4, len(test)))
    probabilities["mlp_heatmaps+logits"] = rng.uniform(0, 1, len(test))
    rows = {key: binary_metrics(labels, probabilities[key], patients, magnifications) for key in DISPLAY_NAMES}
    per_patient = {key: per_patient_rates(labels, (probabilities[key] >= 0.5).astype(int), patients)
                   for key in DISPLAY_NAMES}
    history = [{"epoch": epoch, "fit_loss": 1 / epoch, "select_loss": 0.6, "select_balanced_accuracy": 0.5 + epoch / 20,
                "select_accuracy": 0.6, **({"best_so_far": True} if epoch < 4 else {})} for epoch in range(1, 6)]
    save_npz(run_dir / "test_predictions.npz", paths=np.array([split.records[i].path for i in test]), labels=labels,
             patients=patients, magnifications=magnifications,
             **{f"prob_{key.replace('+', '_')}": probabilities[key].astype(np.float32) for key in DISPLAY_NAMES})
    write_json(run_dir / "results.json", {
        "split_protocol": "patient-level split (synthetic run)", "fit_split": "train", "final_features": "heatmaps",
        "final_row": "mlp_heatmaps", "cam_method": "gradcam",
        "test_images": len(test), "test_patients": sorted(set(patients)), "display_names": DISPLAY_NAMES,
        "rows": rows, "per_patient": per_patient,
        "mlp_training": {"heatmaps": history, "heatmaps+logits": history[:4]},
        "sources": {arch: {"heatmaps": str(heatmap_path(run_dir, arch)),
                           "heatmaps_sha256": sha256_of_file(heatmap_path(run_dir, arch))} for arch in MODEL_ORDER},
        "outputs": {"test_predictions.npz": sha256_of_file(run_dir / "test_predictions.npz")}})


@pytest.fixture(scope="module")
def run_dir(demo_dir, tmp_path_factory) -> Path:
    """A finished run's files over the demo tree (12 test images of 2 patients)."""
    run_dir = tmp_path_factory.mktemp("run")
    dataset = index_dataset(demo_dir)
    split = make_split(dataset.records, dataset.root, PROTOCOL)
    save_partition(run_dir / "split.json", split)
    rng = np.random.default_rng(0)
    write_checkpoints(run_dir, demo_dir)
    logits = write_heatmaps(run_dir, split, rng)
    write_train_logs(run_dir, rng)
    write_results(run_dir, split, logits, rng)
    return run_dir


@pytest.fixture(scope="module")
def report(run_dir) -> Path:
    return build_report(run_dir)


# ------------------------------------------------------------------------------------------------ reading pages


@dataclass
class Table:
    table_id: str | None
    css_class: str | None
    wrapped: bool  # the direct child of a <div class="table-wrap"> (the scrolling box)
    in_card: bool  # inside a gallery card (each card's small prediction table)
    rows: list[list[str]] = field(default_factory=list)  # cell texts, header row first


class PageParser(HTMLParser):
    """Checks that tags nest and close; collects links, ids, every table (with its wrapper) and the gallery cards
    (their data-path, heading and pictures)."""

    def __init__(self):
        super().__init__()
        self.stack: list[tuple[str, dict]] = []  # the open elements
        self.errors, self.links, self.ids = [], [], set()
        self.all_tables: list[Table] = []
        self.cards: list[str] = []  # each card's data-path, in page order
        self.card_titles: dict[str, str] = {}  # data-path -> the card's heading text
        self.card_pictures: dict[str, dict[str, dict]] = {}  # data-path -> panel name (alt) -> the <img> attributes
        self._table: Table | None = None
        self._cell: list[str] | None = None
        self._title: list[str] | None = None

    @property
    def tables(self) -> dict[str, list[list[str]]]:
        """Cell texts of the tables that have an id, by id."""
        return {table.table_id: table.rows for table in self.all_tables if table.table_id}

    def _open_card(self) -> str | None:
        return next((attrs["data-path"] for tag, attrs in reversed(self.stack)
                     if tag == "div" and "data-path" in attrs), None)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.links += [attrs[key] for key in ("src", "href") if key in attrs]
        if "id" in attrs:
            self.ids.add(attrs["id"])
        card = self._open_card()
        if tag == "table":
            parent_tag, parent_attrs = self.stack[-1] if self.stack else ("", {})
            wrapped = parent_tag == "div" and "table-wrap" in (parent_attrs.get("class") or "").split()
            self._table = Table(attrs.get("id"), attrs.get("class"), wrapped, card is not None)
            self.all_tables.append(self._table)
        elif tag == "tr" and self._table is not None:
            self._table.rows.append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = []
        elif tag == "div" and "data-path" in attrs:
            self.cards.append(attrs["data-path"])
        elif tag == "h3" and card is not None:
            self._title = []
        elif tag == "br" and self._cell is not None:  # a line break inside a cell reads as a space
            self._cell.append(" ")
        elif tag == "img" and card is not None:
            self.card_pictures.setdefault(card, {})[attrs.get("alt")] = attrs
        if tag not in VOID_TAGS:
            self.stack.append((tag, attrs))

    def handle_endtag(self, tag):
        if tag in VOID_TAGS:
            return
        if not self.stack or self.stack[-1][0] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1][0] if self.stack else 'nothing'}>")
            return
        if tag == "h3" and self._title is not None:
            self.card_titles[self._open_card()] = " ".join("".join(self._title).split())
            self._title = None
        self.stack.pop()
        if tag in ("td", "th") and self._cell is not None:
            self._table.rows[-1].append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        for collecting in (self._cell, self._title):
            if collecting is not None:
                collecting.append(data)


def parse(index: Path) -> PageParser:
    parser = PageParser()
    parser.feed(index.read_text(encoding="utf-8"))
    parser.close()
    return parser


def check_html_and_links(report: Path) -> None:
    page = parse(report)
    assert page.errors == [] and page.stack == [], (page.errors, page.stack)
    assert any(link.endswith(".png") for link in page.links)
    for link in page.links:
        assert "://" not in link and not link.startswith("/"), f"{link} leaves the report folder"
        if link.startswith("#"):
            assert link[1:] in page.ids, link
        else:
            assert (report.parent / unquote(link)).is_file(), link


def check_comparison_table(report: Path, run_dir: Path) -> None:
    results = json.loads((run_dir / "results.json").read_text())
    table = parse(report).tables["comparison"]
    header, rows = table[0], table[1:]
    assert [row[0] for row in rows] == list(results["display_names"].values())  # same rows, same order
    columns = ["accuracy", "balanced_accuracy", "precision", "sensitivity", "specificity", "f1", "roc_auc",
               "patient_recognition_rate"]
    assert len(header) == len(columns) + 1
    for key, row in zip(results["display_names"], rows):
        expected = [("n/a" if results["rows"][key][column] is None else f"{results['rows'][key][column]:.3f}")
                    for column in columns]
        assert row[1:] == expected, key


def check_map_type_table(report: Path, results_file: Path) -> None:
    """The 'Which maps' table: one row per map type of the results' comparison, its numbers and intervals."""
    comparison = json.loads(results_file.read_text())["cam_method_comparison"]
    rows = parse(report).tables["map-types"][1:]
    assert [row[0] for row in rows] == [CAM_DISPLAY_NAMES[method] + (" (final_classifier.pth)" if method ==
                                        comparison["final_method"] else "") for method in comparison["methods"]]
    for method, row in zip(comparison["methods"], rows):
        entries = comparison["rows"][method]
        assert row[1:] == [format_estimate(entries[level][metric]) for level in ("image", "patient")
                           for metric in ("roc_auc", "balanced_accuracy")]


def check_faithfulness_section(report: Path, run_dir: Path, kind: str) -> None:
    """The Faithfulness section shows faithfulness.json's numbers: per CNN its CAM table (and perturbation table,
    when scored), then the combined map's, in the file's order, each row as mean ± sd; and the final MLP's shares."""
    result = json.loads((run_dir / "faithfulness.json").read_text())
    assert result["run_kind"] == kind  # the file of this run, not of another kind
    page = parse(report)
    assert "faithfulness" in page.ids
    expected_tables = [tables[name] for tables in result["cnns"].values() for name in ("cams", "perturbation")
                       if name in tables] + ([result["combined"]] if result["combined"] else [])
    shown = [table.rows for table in page.all_tables if table.css_class == "faithfulness"]
    assert len(shown) == len(expected_tables) == len(result["cnns"]) + bool(result["combined"])
    for rows, expected in zip(shown, expected_tables):
        assert rows[1:] == [[name, f"{row['deletion_auc']:.3f} ± {row['deletion_auc_std']:.3f}",
                             f"{row['insertion_auc']:.3f} ± {row['insertion_auc_std']:.3f}",
                             f"{1000 * row['map_seconds_per_image']:.1f}"]
                            for name, row in expected["methods"].items()]
    shares = result["mlp_shares"]
    names = list(shares["average"])
    share_rows = page.tables["mlp-shares"]
    assert share_rows[1] == [f"mean over {len(shares['per_image']['paths'])}"] + \
        [f"{shares['average'][name]:.3f}" for name in names]
    per_image = shares["per_image"]
    assert len(share_rows) - 2 == min(SHARE_ROWS_SHOWN, len(per_image["paths"]))  # then the first images' rows
    for index, row in enumerate(share_rows[2:]):
        assert row == [per_image["paths"][index]] + [f"{per_image[name][index]:.3f}" for name in names]
    assert result["held_out"] in report.read_text(encoding="utf-8")  # which images: the test split, or out of fold


def header_caveat(index: Path) -> str:
    page = index.read_text(encoding="utf-8")
    return page[page.index('class="caveat"'):page.index("<dl")]


def header_facts(index: Path) -> dict[str, str]:
    page = index.read_text(encoding="utf-8")
    header = page[page.index("<h1>"):page.index("<nav>")]
    return dict(re.findall(r"<dt>(.*?)</dt><dd>(.*?)</dd>", header))


def picture(folder: Path, attributes: dict) -> np.ndarray:
    return np.asarray(Image.open(folder / unquote(attributes["src"])).convert("RGB"))


# ------------------------------------------------------------------------------------------------ single split


def test_html_parses_and_every_link_exists(report):
    check_html_and_links(report)


def test_comparison_table_equals_results_json(report, run_dir):
    check_comparison_table(report, run_dir)


def test_results_of_an_earlier_version_say_the_map_type_comparison_is_missing(report):
    """The synthetic results.json predates the map-type comparison: the section says so and how to make it."""
    assert "Not in this run's results (written by an earlier version); rerun cancer_class_further.py" in \
        report.read_text(encoding="utf-8")


def test_per_patient_table_equals_results_json(report, run_dir):
    results = json.loads((run_dir / "results.json").read_text())
    rows = parse(report).tables["per-patient"][1:]
    assert [row[0] for row in rows] == results["test_patients"]
    for row in rows:
        for key, cell in zip(results["display_names"], row[3:]):
            entry = results["per_patient"][key][row[0]]
            assert cell == f"{entry['rate']:.3f} ({entry['correct']}/{entry['images']})"


def test_gallery_lists_misclassified_images_first(report, run_dir):
    with np.load(run_dir / "test_predictions.npz") as predictions:
        labels = predictions["labels"]
        row_of = {str(path): row for row, path in enumerate(predictions["paths"])}
        wrong = {key: (predictions[probability_key(key)] >= 0.5) != labels for key in DISPLAY_NAMES}
    cards = parse(report).cards
    assert len(cards) == min(24, len(labels)) and len(set(cards)) == len(cards)
    order = [(bool(wrong["mlp_heatmaps"][row_of[path]]), sum(int(w[row_of[path]]) for w in wrong.values()))
             for path in cards]
    assert order[0][0] and not order[-1][0]  # the synthetic run has both kinds
    assert order == sorted(order, reverse=True)  # final MLP's mistakes first, then by number of wrong models


def test_gallery_pictures_keep_the_images_aspect_ratio(report):
    """THUMBNAIL is the longer side: the demo's 48x32 images become 128x85 pictures, and the page says so."""
    expected = (THUMBNAIL, round(DEMO_IMAGE_SIZE[1] * THUMBNAIL / DEMO_IMAGE_SIZE[0]))
    page = parse(report)
    for path in page.cards:
        pictures = page.card_pictures[path]
        assert list(pictures) == ["original", *MODEL_ORDER, "combined"]  # each <img> is named by its panel
        for attributes in pictures.values():
            assert (int(attributes["width"]), int(attributes["height"])) == expected
            assert Image.open(report.parent / unquote(attributes["src"])).size == expected


def test_gallery_states_each_models_map_grid_and_its_colour_scale(report):
    """The page says each model's map grid at its input size and from which size it has 2x2 cells, and shows the
    overlays' colour scale with what it means."""
    text = report.read_text(encoding="utf-8")
    assert ("Map grid per model: DenseNet-121 4x4 at 32 px (2x2 from 16 px); ResNet-50 4x4 at 48 px (2x2 from "
            "24 px); VGG-16 8x8 at 64 px (2x2 from 16 px).") in text
    assert colour_scale_html() in text and "evidence for the explained class" in text


def test_small_gallery_rebuild_and_missing_images(report, run_dir, tmp_path, capsys):
    import make_report

    copy = shutil.copytree(run_dir, tmp_path / "run")  # with the 12-image report of the `report` fixture
    split_file = copy / "split.json"  # the images moved away: the gallery shows placeholders, the rest is intact
    split_file.write_text(split_file.read_text().replace(json.loads(split_file.read_text())["data_root"],
                                                         str(tmp_path / "moved")))
    make_report.main(["--output-dir", str(copy), "--gallery-size", "2"])
    printed = capsys.readouterr()
    index = Path(printed.out.strip())
    assert "report gallery: 2/2" in printed.err  # progress (plain lines where stderr is not a terminal)
    assert index == copy / "report" / "index.html"
    page = parse(index)
    assert len(page.cards) == 2 and "grey placeholder" in index.read_text()
    # 2 images x (original, three CNN overlays, combined); the earlier build's 12 are gone
    assert len(list((copy / "report" / "gallery").glob("*.png"))) == 2 * 5
    original = page.card_pictures[page.cards[0]]["original"]
    assert np.all(picture(index.parent, original) == 200)  # the grey placeholder, square: no image to shape it
    assert Image.open(index.parent / unquote(original["src"])).size == (THUMBNAIL, THUMBNAIL)


def test_missing_results_json_names_the_script(run_dir, tmp_path):
    copy = shutil.copytree(run_dir, tmp_path / "run")
    (copy / "results.json").unlink()
    expected = f"{copy / 'results.json'} is missing: run python cancer_class_further.py --output-dir {copy}"
    with pytest.raises(PipelineError, match=re.escape(expected)):
        build_report(copy)


def test_heatmaps_changed_after_the_mlp_ran_are_refused(run_dir, tmp_path):
    """A model script rerun on the same split: same test images, other maps. The report must not mix them."""
    copy = shutil.copytree(run_dir, tmp_path / "run")
    heatmap_file = copy / "heatmaps_resnet50.npz"
    with np.load(heatmap_file, allow_pickle=False) as content:
        arrays = {key: content[key] for key in content.files}
    arrays["cams"] = arrays["cams"][::-1].copy()
    save_npz(heatmap_file, **arrays)
    expected = (rf"{re.escape(str(heatmap_file))} changed after the final stage ran .*; "
                rf"rerun {re.escape(f'python cancer_class_further.py --output-dir {copy}')}$")
    with pytest.raises(PipelineError, match=expected):
        build_report(copy)


def stale_checkpoint_message(run_dir: Path, tmp_path: Path, retrain) -> tuple[Path, str]:
    """A copy of the run whose VGG-16 checkpoint was retrained after its maps were made, and the report's error."""
    copy = shutil.copytree(run_dir, tmp_path / "run")
    retrain(copy / "fine_tuned_vgg16.pth")
    with pytest.raises(PipelineError) as error:
        build_report(copy)
    return copy, str(error.value)


def test_heatmaps_of_another_checkpoint_are_refused(run_dir, tmp_path, demo_dir, retrain):
    """A model script rerun that wrote its checkpoint and stopped before its heatmap export: the old maps would be
    shown as the new model's. The one-line error names the file and the command that regenerates it."""
    copy, message = stale_checkpoint_message(run_dir, tmp_path, retrain)
    assert f"{copy / 'heatmaps_vgg16.npz'} is stale" in message and "\n" not in message
    assert (f"regenerate it with python cancer_class_vgg_16.py --data-dir {demo_dir} --output-dir {copy} "
            "--val-fraction 0.25 --test-fraction 0.25 --heatmaps-only") in message


def test_heatmaps_of_another_checkpoint_name_the_final_stage_to_rerun(run_dir, tmp_path, retrain):
    """After the maps are regenerated the results are stale too: the same message says what to run next."""
    copy, message = stale_checkpoint_message(run_dir, tmp_path, retrain)
    assert message.endswith(f"--heatmaps-only, then python cancer_class_further.py --output-dir {copy}")


def test_report_of_a_real_pipeline_run(pipeline_run):
    """The report run_pipeline.py built from a real run (conftest.py): it parses, every link exists, its
    comparison and map-type tables are results.json's, its faithfulness section faithfulness.json's."""
    index = pipeline_run / "report" / "index.html"
    check_html_and_links(index)
    check_comparison_table(index, pipeline_run)
    check_map_type_table(index, pipeline_run / "results.json")
    check_faithfulness_section(index, pipeline_run, "single")
    assert "Folds" not in header_facts(index) and 'href="fold_' not in index.read_text(encoding="utf-8")
    # Random init on the synthetic demo tree: the header says so.
    caveat = header_caveat(index)
    assert "DenseNet-121, ResNet-50, VGG-16: trained from random initialisation (--weights none)" in caveat
    assert "DenseNet-121, ResNet-50, VGG-16: trained on synthetic demo data" in caveat


def test_failed_rebuild_leaves_the_old_report_complete(run_dir, tmp_path, monkeypatch):
    """A build that fails midway (here the gallery's third image) must not touch the report being replaced:
    the new one is built beside it and swapped in only when complete."""
    copy = shutil.copytree(run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("report"))
    index = build_report(copy)
    before = {path.relative_to(copy): path.read_bytes() for path in (copy / "report").rglob("*") if path.is_file()}
    written = []

    def panels_then_failure(*args, **kwargs):
        if len(written) == 2:
            raise OSError("No space left on device")
        written.append(real_panels(*args, **kwargs))
        return written[-1]

    real_panels = gallery_module.gallery_panels
    monkeypatch.setattr(gallery_module, "gallery_panels", panels_then_failure)
    with pytest.raises(OSError, match="No space left"):
        build_report(copy, gallery_size=4)
    assert len(written) == 2  # it did fail midway, in the gallery
    after = {path.relative_to(copy): path.read_bytes() for path in (copy / "report").rglob("*") if path.is_file()}
    assert after == before  # the old report, every file as it was
    check_html_and_links(index)  # and complete: every image index.html links exists
    assert sorted(path.name for path in copy.iterdir() if path.name.startswith(".")) == []  # no staging left


def test_rebuild_replaces_the_whole_report_folder(run_dir, tmp_path):
    copy = shutil.copytree(run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("report"))
    build_report(copy)
    (copy / "report" / "stale.png").write_bytes(b"from an older build")
    index = build_report(copy, gallery_size=1)
    assert not (copy / "report" / "stale.png").exists()
    assert len(parse(index).cards) == 1
    check_html_and_links(index)
    umask = os.umask(0)
    os.umask(umask)
    assert (copy / "report").stat().st_mode & 0o777 == 0o777 & ~umask  # not the owner-only mode of a temp dir
    assert [path.name for path in copy.iterdir() if path.name.startswith(".")] == []


def test_header_shows_each_models_own_image_size(report):
    assert header_facts(report)["CNN input"] == "DenseNet-121 32 px, ResNet-50 48 px, VGG-16 64 px"


def prediction_cells(index: Path, image_path: str) -> dict[str, tuple[str, str]]:
    """One gallery card's prediction table: model name -> (P(malignant) as shown, predicted class)."""
    page = index.read_text(encoding="utf-8")
    card = page[page.index(f'data-path="{image_path}"'):]
    card = card[:card.index("</table>")]
    rows = re.findall(r"<tr[^>]*><td>(.*?)</td><td>(.*?)</td><td>(.*?)</td>", card)
    return {name: (probability, predicted) for name, probability, predicted in rows}


def test_probability_beside_the_threshold_is_shown_on_its_side(run_dir, tmp_path):
    """VGG-16 at 0.4996 is benign (malignant at >= 0.5): the card must not read 0.500 -> benign."""
    copy = shutil.copytree(run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("report"))
    with np.load(copy / "test_predictions.npz", allow_pickle=False) as content:
        arrays = {key: content[key] for key in content.files}
    arrays["prob_vgg16"][0], arrays["prob_resnet50"][0] = 0.4996, 0.5
    save_npz(copy / "test_predictions.npz", **arrays)
    relink_run(copy)
    cells = prediction_cells(build_report(copy, gallery_size=len(arrays["labels"])), str(arrays["paths"][0]))
    assert cells["VGG-16"] == ("0.4996", "benign")
    assert cells["ResNet-50"] == ("0.500", "malignant")
    for probability, predicted in cells.values():
        assert (float(probability) >= 0.5) == (predicted == "malignant"), cells


def fake_checkpoint(arch: str, *, weights: str, synthetic_data: bool) -> dict:
    """What the report reads of a checkpoint: how its model was trained (no weights needed)."""
    return {"model": {}, "arch": arch, "image_size": IMAGE_SIZES[arch], "config": {"weights": weights},
            "synthetic_data": synthetic_data}


def relink_run(run_dir: Path) -> None:
    """After a test replaced a checkpoint or test_predictions.npz: the digests that tie the run's files together
    (heatmaps -> checkpoint, results.json -> heatmaps and predictions), as if the run had been remade."""
    results = json.loads((run_dir / "results.json").read_text())
    for arch in MODEL_ORDER:
        heatmap_file = run_dir / f"heatmaps_{arch}.npz"
        with np.load(heatmap_file, allow_pickle=False) as content:
            arrays = {key: content[key] for key in content.files}
        arrays["checkpoint_sha256"] = np.array(sha256_of_file(checkpoint_path(run_dir, arch)))
        save_npz(heatmap_file, **arrays)
        results["sources"][arch]["heatmaps_sha256"] = sha256_of_file(heatmap_file)
    results["outputs"]["test_predictions.npz"] = sha256_of_file(run_dir / "test_predictions.npz")
    write_json(run_dir / "results.json", results)


def test_header_warns_about_random_init_and_synthetic_data(run_dir, tmp_path):
    copy = shutil.copytree(run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("report"))
    assert 'class="caveat"' not in build_report(copy).read_text()  # the stand-ins say nothing against them
    for arch in MODEL_ORDER:
        save_torch(fake_checkpoint(arch, weights="imagenet", synthetic_data=False), copy / f"fine_tuned_{arch}.pth")
    relink_run(copy)
    assert 'class="caveat"' not in build_report(copy).read_text()  # pretrained, real data: no caveat
    save_torch(fake_checkpoint("vgg16", weights="none", synthetic_data=True), copy / "fine_tuned_vgg16.pth")
    save_torch(fake_checkpoint("resnet50", weights="imagenet", synthetic_data=True), copy / "fine_tuned_resnet50.pth")
    relink_run(copy)
    index = build_report(copy)
    page = index.read_text()
    caveat = header_caveat(index)
    assert page.index('class="caveat"') < page.index("<nav>")  # in the header, above every number
    assert "VGG-16: trained from random initialisation (--weights none)" in caveat
    assert "ResNet-50, VGG-16: trained on synthetic demo data" in caveat
    assert "DenseNet-121" not in caveat


def test_off_scale_first_epoch_loss_does_not_flatten_the_other_epochs(run_dir, tmp_path, monkeypatch):
    """VGG-16's first demo epoch at train loss 21.5 beside losses of about 0.7: the y-range fits the others and
    the outlier is marked on the edge with its value."""
    copy = shutil.copytree(run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("report"))
    losses = [21.5, 0.72, 0.70, 0.69, 0.68]
    rows = [{"epoch": epoch, "train_loss": loss, "train_accuracy": 0.5, "val_loss": 0.69 - 0.01 * epoch,
             "val_accuracy": 0.5, "val_balanced_accuracy": 0.5, "best_so_far": epoch == 1}
            for epoch, loss in enumerate(losses, start=1)]
    (copy / "train_log_vgg16.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    figures = []
    monkeypatch.setattr(single_module, "save_figure", lambda figure, target: figures.append(figure) or target.name)
    plot_cnn_training(load_single_report(open_run(copy)), tmp_path / "training_cnns.png")
    vgg_loss_axes = figures[0].axes[MODEL_ORDER.index("vgg16")]  # the top row: loss per CNN
    low, high = vgg_loss_axes.get_ylim()
    others = losses[1:] + [row["val_loss"] for row in rows]
    assert low <= min(others) and max(others) <= high
    assert (max(others) - min(others)) / (high - low) > 0.5  # the other epochs fill the plot
    assert any("21.5" in text.get_text() for text in vgg_loss_axes.texts)  # the clipped point says its value
    densenet_loss_axes = figures[0].axes[MODEL_ORDER.index("densenet121")]  # an ordinary curve: not clipped
    assert len(densenet_loss_axes.texts) == 0 and densenet_loss_axes.get_ylim()[1] >= 0.6


# ------------------------------------------------------------------------------------------------ K-fold


@pytest.fixture(scope="module")
def cv_index(cv_run) -> Path:
    """The K-fold run's report, as run_pipeline.py built it (make_report.py on the finished run)."""
    return cv_run / "report" / "index.html"


def read_oof_predictions(run_dir: Path) -> list[dict[str, str]]:
    """oof_predictions.csv's rows, read with the csv module alone (the reference for what the page shows)."""
    with open(run_dir / "oof_predictions.csv", encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def test_kfold_report_parses_and_every_link_exists(cv_index, cv_run):
    check_html_and_links(cv_index)
    page = cv_index.read_text(encoding="utf-8")
    assert "<h1>Cross-validation report (2 folds)</h1>" in page
    assert "DenseNet-121, ResNet-50, VGG-16: trained from random initialisation (--weights none)" in \
        header_caveat(cv_index)
    assert 'src="cv_roc.png"' in page  # the per-fold ROC curves
    check_map_type_table(cv_index, cv_run / "cv_results.json")


def test_kfold_tables_equal_cv_results_json(cv_index, cv_run):
    """The image- and patient-level tables: one row per row of cv_results.json, the pooled figure with its
    interval and the mean ± sd over folds of the first two metrics, then the other metrics pooled."""
    results = json.loads((cv_run / "cv_results.json").read_text())
    tables = parse(cv_index).tables
    for level in ("image", "patient"):
        rows = tables[f"cv-{level}"][1:]
        assert [row[0] for row in rows] == list(results["display_names"].values()), level
        for key, row in zip(results["display_names"], rows):
            entries = results["rows"][key][level]
            metrics = list(entries)
            expected = ([format_cell(entries[metric], interval=True) for metric in metrics[:2]]
                        + [format_cell(entries[metric], interval=False) for metric in metrics[:2]]
                        + [format_cell(entries[metric], interval=True) for metric in metrics[2:]])
            assert row[1:] == expected, (level, key)


def test_kfold_tables_are_in_scrollable_wrappers(cv_index):
    """The cross-validation tables have a column per metric and interval: each sits in its own box that scrolls
    sideways (div.table-wrap, overflow-x auto), so the page never grows wider than the window."""
    page = parse(cv_index)
    wrapped = {table.table_id: table.wrapped for table in page.all_tables if table.table_id}
    for table_id in ("cv-image", "cv-patient", "cv-magnification", "map-types"):
        assert wrapped.get(table_id) is True, (table_id, wrapped)
    style = cv_index.read_text(encoding="utf-8")
    assert re.search(r"div\.table-wrap\s*\{[^}]*overflow-x:\s*auto", style)


def test_kfold_every_table_outside_the_gallery_is_in_a_scrollable_wrapper(cv_index):
    """The faithfulness tables too: the MLP-shares table lists long image paths in cells that do not wrap."""
    unwrapped = [table.table_id or table.css_class for table in parse(cv_index).all_tables
                 if not table.in_card and not table.wrapped]
    assert unwrapped == []


def test_kfold_gallery_shows_out_of_fold_images_misclassified_first(cv_index, cv_run):
    """24 out-of-fold images: those the final classifier got wrong first, then by how many table rows got them
    wrong; each card names its true class, patient and the fold whose models scored it (oof_predictions.csv)."""
    results = json.loads((cv_run / "cv_results.json").read_text())
    oof = read_oof_predictions(cv_run)
    by_path = {row["path"]: row for row in oof}

    def rank(row: dict[str, str]) -> tuple[bool, int]:
        wrong = {key: (float(row[probability_key(key)]) >= 0.5) != (row["label"] == "malignant")
                 for key in results["display_names"]}
        return wrong[results["final_row"]], sum(wrong.values())

    page = parse(cv_index)
    cards = page.cards
    assert len(cards) == min(24, len(oof)) and len(set(cards)) == len(cards)
    shown = [rank(by_path[path]) for path in cards]
    assert shown == sorted(shown, reverse=True)
    # The first 24 of the whole out-of-fold set: no image left out ranks above one shown.
    left_out = [rank(row) for row in oof if row["path"] not in set(cards)]
    assert not left_out or min(shown) >= max(left_out)
    for path in cards:
        row = by_path[path]
        title = page.card_titles[path]
        assert title.startswith(f"True: {row['label']} · patient {row['patient']} ·"), title
        assert title.endswith(f"· fold {row['fold']}"), title
    assert {by_path[path]["fold"] for path in cards} <= {"1", "2"}
    assert "out-of-fold images" in cv_index.read_text(encoding="utf-8")


def test_kfold_gallery_labels_the_flat_maps_of_a_small_input_size(cv_index):
    """At the tests' 32 px, DenseNet-121's and ResNet-50's maps are 1x1, so flat: their overlays carry the note
    (a white box with dark text in the middle); the page says why (the grid) and from which size maps are 2x2."""
    text = cv_index.read_text(encoding="utf-8")
    assert "DenseNet-121 1x1 at 32 px (2x2 from 64 px); ResNet-50 1x1 at 32 px (2x2 from 64 px)" in text
    page = parse(cv_index)
    for path in page.cards[:3]:
        for arch in ("densenet121", "resnet50"):
            picture = np.asarray(Image.open(cv_index.parent / unquote(page.card_pictures[path][arch]["src"])))
            height, width = picture.shape[:2]
            middle = picture[height // 2 - 3:height // 2 + 3, width // 3:2 * width // 3]
            assert (middle == 255).all(axis=2).any() and (middle < 80).all(axis=2).any(), (path, arch)


def test_kfold_gallery_maps_are_each_folds_own(cv_index, cv_run):
    """Each card's overlays are its original picture blended with the Grad-CAM map that its own fold's heatmap
    file holds for the image (the model that never saw its patient), not another fold's map of it."""
    folds_of = {row["path"]: int(row["fold"]) for row in read_oof_predictions(cv_run)}
    heatmaps = {(fold, arch): load_heatmaps(heatmap_path(cv_run / f"fold_{fold}", arch))
                for fold in (1, 2) for arch in MODEL_ORDER}

    def stored_map(fold: int, arch: str, path: str) -> np.ndarray:
        arrays = heatmaps[fold, arch]
        return arrays["cams"][list(arrays["paths"]).index(path)]

    page = parse(cv_index)
    aspect_kept = (THUMBNAIL, round(DEMO_IMAGE_SIZE[1] * THUMBNAIL / DEMO_IMAGE_SIZE[0]))
    other_fold_differs = 0
    for path in page.cards:
        pictures = page.card_pictures[path]
        original = picture(cv_index.parent, pictures["original"])
        image = Image.fromarray(original)
        assert image.size == aspect_kept
        fold = folds_of[path]
        maps = {arch: stored_map(fold, arch, path) for arch in MODEL_ORDER}
        for arch in MODEL_ORDER:
            shown = picture(cv_index.parent, pictures[arch])
            assert np.array_equal(shown, np.asarray(map_overlay(image, maps[arch]))), (path, arch)
            other = map_overlay(image, stored_map(3 - fold, arch, path))
            other_fold_differs += not np.array_equal(shown, np.asarray(other))
        combined = unit_map_overlay(image, combined_map([maps[arch] for arch in MODEL_ORDER], image.size))
        assert np.array_equal(picture(cv_index.parent, pictures["combined"]), np.asarray(combined)), path
    assert other_fold_differs > 0  # the folds' maps of an image differ, so the check above tells them apart


def test_kfold_report_links_each_folds_own_page(cv_index, cv_run):
    """The Folds section links report/fold_<k>/index.html for every fold: each exists inside the report folder,
    is that fold's single-split page (its comparison table is fold_<k>/results.json's), and shows only that fold's
    test images."""
    fold_links = [link for link in parse(cv_index).links if re.fullmatch(r"fold_\d+/index\.html", link)]
    assert fold_links == ["fold_1/index.html", "fold_2/index.html"]
    folds_of = {row["path"]: row["fold"] for row in read_oof_predictions(cv_run)}
    for fold, link in enumerate(fold_links, start=1):
        fold_index = cv_index.parent / link
        check_html_and_links(fold_index)
        assert f"<h1>Fold {fold} of a K-fold run</h1>" in fold_index.read_text(encoding="utf-8")
        check_comparison_table(fold_index, cv_run / f"fold_{fold}")
        check_map_type_table(fold_index, cv_run / f"fold_{fold}" / "results.json")
        with np.load(cv_run / f"fold_{fold}" / "test_predictions.npz") as predictions:
            test_paths = {str(path) for path in predictions["paths"]}
        assert test_paths == {path for path, of in folds_of.items() if of == str(fold)}  # fold k's test = fold k
        cards = parse(fold_index).cards
        assert len(cards) == min(FOLD_GALLERY_SIZE, len(test_paths)) and set(cards) <= test_paths


def test_kfold_faithfulness_tables_equal_faithfulness_json(cv_index, cv_run):
    check_faithfulness_section(cv_index, cv_run, "kfold")


def test_kfold_report_reads_every_folds_files_before_any_work(cv_copy, capsys):
    """An unreadable fold file stops the build at once: one error naming it, no gallery progress before it (the
    fault campaign counted two lines as a bad refusal), the report already there untouched."""
    results = cv_copy / "fold_1" / "results.json"
    content = results.read_bytes()
    results.unlink()  # a link to the shared run: replace it, never write through it
    results.write_bytes(content[:len(content) // 2])
    report_before = {path: path.read_bytes() for path in (cv_copy / "report").rglob("*") if path.is_file()}
    capsys.readouterr()
    with pytest.raises(PipelineError, match=rf"^{re.escape(str(results))} is unreadable \(.*\); rerun python "
                                            rf"cancer_class_further.py --output-dir {re.escape(str(results.parent))}$"):
        build_report(cv_copy)
    assert capsys.readouterr().err == ""
    assert {path: path.read_bytes() for path in (cv_copy / "report").rglob("*") if path.is_file()} == report_before
