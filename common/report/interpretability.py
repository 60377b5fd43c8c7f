"""The report's interpretability section, from faithfulness.json (python score_explanations.py): the deletion and
insertion table of every method of every CNN and of the combined map, the same held-out images explained by every
method side by side (its figures, copied into the report), and what the final MLP looks at (Integrated Gradients
shares per CNN map, on average and per image).

A faithfulness.json made by other checkpoints than the run's (a model retrained since) is not shown as the run's:
the section says so and how to remake it.
"""

import html
import json
import shutil
from pathlib import Path
from urllib.parse import quote

from common.core.errors import PipelineError
from common.core.fileio import sha256_of_file
from common.core.runfiles import FAITHFULNESS_DIR, FAITHFULNESS_JSON, SCORE_SCRIPT, checkpoint_path
from common.models.registry import ARCHS, MODEL_ORDER
from common.run import Run

SHARE_ROWS_SHOWN = 20  # per-image rows of the MLP's shares table


def _command(output_dir: Path) -> str:
    return f"python {SCORE_SCRIPT} --output-dir {output_dir}"


def _score_table(table: dict) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{row['deletion_auc']:.3f} &plusmn; {row['deletion_auc_std']:.3f}</td>"
        f"<td>{row['insertion_auc']:.3f} &plusmn; {row['insertion_auc_std']:.3f}</td>"
        f"<td>{1000 * row['map_seconds_per_image']:.1f}</td></tr>" for name, row in table["methods"].items())
    return ('<div class="table-wrap"><table class="faithfulness"><thead><tr><th>Method</th>'
            "<th>Deletion AUC (lower is better)</th><th>Insertion AUC (higher is better)</th><th>Map ms / image</th>"
            f"</tr></thead><tbody>{rows}</tbody></table></div><p><small>{table['images']} image(s), "
            f"{table['steps']} steps, {html.escape(table['blur']['description'])}.</small></p>")


def _shares_html(shares: dict | None) -> str:
    if shares is None:
        return "<p>No final classifier in the run.</p>"
    names = list(shares["average"])
    header = "".join(f"<th>{html.escape(ARCHS[name].display_name if name in ARCHS else name)}</th>" for name in names)
    average = "".join(f"<td>{shares['average'][name]:.3f}</td>" for name in names)
    per_image = "".join(
        f"<tr><td>{html.escape(path)}</td>"
        + "".join(f"<td>{shares['per_image'][name][row]:.3f}</td>" for name in names) + "</tr>"
        for row, path in enumerate(shares["per_image"]["paths"][:SHARE_ROWS_SHOWN]))
    count = len(shares["per_image"]["paths"])
    return (f"<p>Share of the final MLP's decision ({html.escape(shares['features'])}, "
            f"{html.escape(shares['cam_method'])} maps) carried by each CNN's map: sum of |Integrated Gradients| over "
            "the map's inputs / total (captum, baseline: the mean feature of the MLP's fit rows; target: "
            f"{html.escape(shares['target'])}).</p>"
            f'<div class="table-wrap"><table id="mlp-shares"><thead><tr><th>Image</th>{header}</tr></thead><tbody>'
            f'<tr class="final"><td>mean over {count}</td>{average}</tr>{per_image}</tbody></table></div>')


def faithfulness_html(run: Run, report_dir: Path) -> str | None:
    """The section's HTML (its figures copied into report_dir/faithfulness/), or None without faithfulness.json."""
    output_dir = run.output_dir
    path = output_dir / FAITHFULNESS_JSON
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise PipelineError(f"{path} is unreadable ({error}); rerun {_command(output_dir)}") from None
    current = {arch: [sha256_of_file(checkpoint_path(run.model_dir(fold), arch)) for fold in run.folds
                      if checkpoint_path(run.model_dir(fold), arch).is_file()] for arch in MODEL_ORDER}
    if result.get("checkpoint_sha256") != current:
        return (f"<p>{FAITHFULNESS_JSON} was made by other checkpoints than this run's (a model was retrained since); "
                f"rerun <code>{html.escape(_command(output_dir))}</code> to score these ones.</p>")
    parts = [f"<p>Deletion and insertion AUC (Petsiuk et al. 2018) of each explanation on {len(result['images'])} "
             f"held-out image(s) ({html.escape(result.get('held_out', 'the test split'))}): pixels ranked by the map "
             "are replaced by a blurred copy (deletion) or put onto it (insertion); the area under the target class's "
             "probability curve. Every method is compared with a random map and a centred Gaussian map "
             "(baselines). From faithfulness.json.</p>"]
    for arch, tables in result["cnns"].items():
        parts.append(f"<h3>{html.escape(ARCHS[arch].display_name)}</h3>" + _score_table(tables["cams"]))
        if "perturbation" in tables:
            parts.append("<p>LIME, Kernel SHAP and occlusion (captum), on the first "
                         f"{tables['perturbation']['images']} image(s):</p>" + _score_table(tables["perturbation"]))
    if result.get("combined"):
        parts.append("<h3>Combined map against the soft vote</h3>" + _score_table(result["combined"]))
    figures = []
    (report_dir / FAITHFULNESS_DIR).mkdir(exist_ok=True)
    for name in result.get("figures", []):
        source = Path(output_dir) / name
        if source.is_file():
            shutil.copyfile(source, report_dir / name)
            figures.append(f'<img class="plot" src="{quote(name)}" alt="{html.escape(Path(name).stem)}">')
    if figures:
        parts.append("<h3>One image, every method</h3><p>Rows: the CNNs, each explaining its own target class; "
                     "columns: the image, the CAMs, then the perturbation methods (min-max scaled for display, jet: "
                     "red = high).</p>" + "".join(figures))
    parts.append("<h3>What the final MLP looks at</h3>" + _shares_html(result.get("mlp_shares")))
    return "".join(parts)
