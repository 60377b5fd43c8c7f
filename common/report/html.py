"""The report pages' HTML pieces: tables, the page frame and its style, figures, the staging-folder swap."""

import html
import os
import re
from pathlib import Path

from matplotlib.figure import Figure

from common.core.fileio import atomic_path, scratch_folder
from common.evaluation.map_comparison import (
    comparison_cells,
    comparison_header,
    missing_sentence,
    multiplicity_sentence,
)
from common.evaluation.stats import TOO_FEW_PATIENTS


def save_figure(figure: Figure, target: Path) -> str:
    """Write the figure as a PNG atomically; return its name for the page."""
    with atomic_path(target, suffix=".png") as temp_path:
        figure.savefig(temp_path, format="png", dpi=100, bbox_inches="tight")
    return target.name


def table_html(header: list[str], rows: list[list[str]], *, table_id: str = "", row_classes=None) -> str:
    """An HTML table; cells are already-escaped HTML."""
    head = "".join(f"<th>{cell}</th>" for cell in header)
    lines = []
    for index, row in enumerate(rows):
        css = f' class="{row_classes[index]}"' if row_classes and row_classes[index] else ""
        lines.append(f"<tr{css}>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>")
    identifier = f' id="{table_id}"' if table_id else ""
    # In a scrolling box: a wide table (the K-fold tables have a column per metric and interval) never pushes the
    # page wider than the window.
    return (f'<div class="table-wrap"><table{identifier}><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(lines)}</tbody></table></div>')


def note_on_second_line(cell: str) -> str:
    """A cell that ends with the too-few-patients note: the note on a second, wrapping line, so that the table
    still fits the page."""
    note = f" ({TOO_FEW_PATIENTS})"
    if not cell.endswith(note):
        return cell
    return f'{cell.removesuffix(note)}<br><span class="spread note">{note.strip()}</span>'


def caveat_html(caveats: list[str]) -> str:
    """A warning box above everything when the checkpoints say the CNNs cannot speak about real tissue
    (common.models.checkpoints.training_caveats)."""
    if not caveats:
        return ""
    reasons = "".join(f"<li>{html.escape(line)}</li>" for line in caveats)
    return ('<div class="caveat" id="caveat"><strong>Caveat: these models say nothing about real tissue; read the '
            f"numbers and maps below as a test of the pipeline only.</strong><ul>{reasons}</ul></div>")


def map_type_html(comparison: dict | None) -> str:
    """The heatmap MLP on Grad-CAM vs Grad-CAM++ vs LayerCAM maps (common.evaluation.map_comparison's dict, from
    results.json or cv_results.json): the protocol, the table with intervals, the paired differences."""
    if comparison is None:
        return ("<p>Not in this run's results (written by an earlier version); rerun cancer_class_further.py.</p>")
    rows = [[note_on_second_line(html.escape(cell)) for cell in comparison_cells(comparison, method)]
            for method in comparison["methods"]]
    classes = ["final" if method == comparison["final_method"] else "" for method in comparison["methods"]]
    sentences = "".join(f"<li>{html.escape(item['sentence'])}</li>" for item in comparison["differences"])
    missing = missing_sentence(comparison)
    return (f"<p>{html.escape(comparison['protocol'])} {comparison['images']} images of {comparison['patients']} "
            f"patients; in brackets the 95 % patient-bootstrap interval ({comparison['bootstrap']['resamples']:,} "
            "resamples). This table reports; it did not choose the final classifier's maps (bold).</p>"
            + table_html([html.escape(cell) for cell in comparison_header()], rows, table_id="map-types",
                     row_classes=classes)
            + (f"<ul>{sentences}</ul><p>{html.escape(multiplicity_sentence(comparison))}</p>" if sentences else "")
            + (f"<p>{html.escape(missing)}</p>" if missing else ""))


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1200px;
       padding: 1em 2em; color: #222; }
h1 { margin-bottom: 0.3em; } h2 { border-bottom: 2px solid #ddd; padding-bottom: 0.2em; margin-top: 1.8em; }
nav a { margin-right: 1em; }
dl.facts { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; }
dl.facts dt { font-weight: 600; } dl.facts dd { margin: 0; }
div.table-wrap { max-width: 100%; overflow-x: auto; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { white-space: normal; vertical-align: bottom; }
td { white-space: nowrap; }
td .spread { color: #555; font-size: 0.9em; }
td .note { white-space: normal; display: inline-block; max-width: 8em; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f0f0f0; }
tr.final td { font-weight: 700; } #comparison tr.final td { background: #eef6ee; }
img.plot { max-width: 100%; height: auto; display: block; margin: 0.5em 0; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 0.4em 0.8em 0.6em; margin: 0.8em 0; }
.card h3 { margin: 0.2em 0; font-size: 1em; } .card .path { margin: 0 0 0.4em; font-size: 0.75em; color: #777; }
.card-body { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
.strip { display: flex; gap: 0.4em; }
figure { margin: 0; text-align: center; } figcaption { font-size: 0.75em; color: #444; }
figure img { image-rendering: auto; border: 1px solid #ccc; }
table.predictions { margin: 0; font-size: 0.8em; }
tr.wrong td { color: #b00020; } tr.right td:last-child { color: #1b7f2a; }
div.caveat { border: 2px solid #b00020; background: #fdecee; padding: 0.5em 1em; margin: 0.5em 0 1em; }
div.caveat ul { margin: 0.3em 0 0; }
span.malignant { color: #b00020; } span.benign { color: #1b5fb0; } span.low { color: #b00020; font-weight: 600; }
"""


def page_html(title: str, sections: dict[str, str], header: str) -> str:
    """The page: header, a link bar, one <section> per entry; sections are already HTML."""
    anchors = {name: re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") for name in sections}
    nav = "".join(f'<a href="#{anchors[name]}">{html.escape(name)}</a>' for name in sections)
    body = "".join(f'<section id="{anchors[name]}"><h2>{html.escape(name)}</h2>{content}</section>'
                   for name, content in sections.items())
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head><body>{header}<nav>{nav}</nav>{body}</body></html>\n")


def swap_in(staging: Path, report_dir: Path) -> None:
    """Replace report_dir by the complete staging folder. What a reader of report/ sees meanwhile:
        before the first rename    the old report, complete
        between the two renames    no report/ folder (microseconds; a reload says "not found", never a mix)
        after the second rename    the new report, complete
    A crash between the renames leaves the old report in a scratch folder (no reader ever sees half of one),
    removed by the next build, which makes a new one."""
    with scratch_folder(report_dir.parent, "report.old") as backup_parent:
        backup = backup_parent / "report"
        if report_dir.exists():
            os.replace(report_dir, backup)
        try:
            os.replace(staging, report_dir)
        except BaseException:
            if backup.exists():  # the new one could not take its place: the old one goes back
                os.replace(backup, report_dir)
            raise
