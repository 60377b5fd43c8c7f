"""An interactive viewer of a finished run, in the browser: any image through all three CNNs and the final MLP.

    python app.py --output-dir runs/breakhis          # then open http://127.0.0.1:7860
    make app                                          # the demo run (runs/demo, made by `make demo`)

Both kinds of run. Tabs:
    Predict   drop images (PNG, JPEG, TIFF; any size): each CNN's P(malignant), the soft vote, the final MLP's
              probability and decision; the image beside each model's map and the combined map, with a map
              opacity slider and a choice of map method. On a K-fold run each CNN is the bagged ensemble of its
              fold models.
    Browse    the run's held-out images (a single split: its test split; K-fold: every image, out of fold),
              filtered by true class, prediction, outcome, patient, magnification, subtype and fold, sorted by the
              final MLP's confidence; a click shows the same view from the stored files (nothing recomputed), the
              maps made by the fold model that never saw the patient
    Results   the comparison table (results.md, or cv_results.md with its intervals) and the report's plots
              (report/*.png, when it was built)

The models load once, at start-up; a run whose files do not match stops with the same one-line errors as
predict.py and make_report.py, before the server starts. Nothing is written into the run folder: uploads and the
pictures served go to Gradio's temporary folder (GRADIO_TEMP_DIR). Binds to 127.0.0.1 unless --host says otherwise.
"""

import argparse
import atexit
import contextlib
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from common.core.fileio import remove_stale_temporaries, scratch_folder

UPLOADS = "breakhis_viewer"  # the name of each viewer process's own folder for uploads and served pictures
# Gradio reads both when it is imported: no usage analytics (these machines have no network, and a local viewer
# of medical images should not call home anyway), and its uploads and served pictures in a folder of this process
# alone (unless GRADIO_TEMP_DIR says otherwise), removed when it ends; one a killed viewer left, by the next one.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
if "GRADIO_TEMP_DIR" not in os.environ:
    remove_stale_temporaries(tempfile.gettempdir(), name=UPLOADS)
    _uploads = contextlib.ExitStack()
    os.environ["GRADIO_TEMP_DIR"] = str(_uploads.enter_context(scratch_folder(tempfile.gettempdir(), UPLOADS)))
    atexit.register(_uploads.close)

import gradio as gr  # noqa: E402

from common.cams.display import colour_scale_html  # noqa: E402
from common.core.console import CommandParser  # noqa: E402
from common.core.errors import PipelineError, message_of, run_main  # noqa: E402
from common.core.runfiles import REPORT_SCRIPT  # noqa: E402
from common.data.records import CLASS_NAMES, IMAGE_EXTENSIONS  # noqa: E402
from common.models.registry import MODEL_ORDER  # noqa: E402
from common.training.runtime import pick_device  # noqa: E402
from common.viewer import (DEFAULT_OPACITY, ImageView, ViewerRun, browse_rows, filter_rows,  # noqa: E402
                           load_viewer_run, mark_own_images, method_name, open_uploads, predict_views,
                           probability_markdown, render_panels, report_plots, results_markdown, stored_view,
                           verdict, with_patient_set)

PANEL_NAMES = ("image",) + MODEL_ORDER + ("combined",)  # the pictures of a view, left to right
CSS = "#warning-banner {background: #fff3cd; border: 1px solid #e0b400; padding: 0.5em 1em; border-radius: 6px}"
ORDERS = ("most confident first", "least confident first")
# Events that only redraw from what is in memory (no model runs): answered directly, not through Gradio's queue
# (which serialises the uploads' model passes), and without a progress overlay: ~100 ms less per click.
REDRAW = {"queue": False, "show_progress": "hidden"}
# Browse: each filter's common.viewer.filter_rows keyword and its label (the fold: K-fold runs only); the table's
# columns.
BROWSE_FILTERS = (("truth", "true class"), ("predicted", "predicted (final MLP)"), ("outcome", "correct / wrong"),
                  ("patient", "patient"), ("magnification", "magnification"), ("subtype", "subtype"),
                  ("fold", "fold"))
BROWSE_COLUMNS = ["image", "patient", "magnification", "subtype", "fold", "true class", "predicted (final MLP)",
                  "P(malignant)", "confidence"]


# ------------------------------------------------------------------------------------------- what the UI calls


def show_view(run: ViewerRun, view: ImageView | None, method: str, opacity: float) -> list:
    """A view's outputs: its probability table, the method choice, and one picture per panel (as updates: the
    page's components turn them into PNGs in Gradio's temporary folder)."""
    if view is None:
        return [gr.update(value=""), gr.update()] + [gr.update(value=None) for _ in PANEL_NAMES]
    methods = list(view.maps)
    method = method if method in methods else methods[0]
    panels = render_panels(run, view, method=method, opacity=opacity)
    return ([probability_markdown(run, view),
             gr.update(choices=[(method_name(key), key) for key in methods], value=method)]
            + [gr.update(value=picture, label=caption) for picture, caption in panels])


def predict_table(run: ViewerRun, views: list[ImageView]) -> list[list]:
    """One row per uploaded image: every model's P(malignant) and the final decision."""
    return [[view.title] + [round(view.probabilities[key], 3) for key in run.probability_keys]
            + [verdict(view.probabilities[run.final_key])] for view in views]


def predict_uploads(run: ViewerRun, files: list[str] | None, method: str, opacity: float,
                    progress=gr.Progress()) -> list:  # noqa: B008 (Gradio's way to ask for a progress bar)
    """The Predict tab's answer to an upload: the table, the image choice, the first image's view; a progress bar
    (images scored) while the models run."""
    if not files:
        return [[], None, gr.update(choices=[], value=None), []] + show_view(run, None, method, opacity)
    try:
        views = predict_views(run, open_uploads(files), done=lambda scored, total: progress(
            scored / total, desc=f"{scored}/{total} images scored"))
        views = with_patient_set(run, mark_own_images(run, views, files))
    except PipelineError as error:  # e.g. a file that is not an image: said in the page, the server goes on
        raise gr.Error(message_of(error)) from None
    names = [(view.title, index) for index, view in enumerate(views)]
    return ([views, views[0], gr.update(choices=names, value=0), predict_table(run, views)]
            + show_view(run, views[0], method, opacity))


def choose_upload(run: ViewerRun, views: list[ImageView], index: int, method: str, opacity: float) -> list:
    """Another uploaded image picked in the Predict tab's list."""
    return [views[index]] + show_view(run, views[index], method, opacity)


def browse_filters(run: ViewerRun) -> tuple[tuple[str, str], ...]:
    """The Browse tab's filters: the fold only where there are folds."""
    return tuple(item for item in BROWSE_FILTERS if item[0] != "fold" or run.run.kind == "kfold")


def browse_columns(run: ViewerRun) -> list[str]:
    return [column for column in BROWSE_COLUMNS if column != "fold" or run.run.kind == "kfold"]


def browse_table(run: ViewerRun, rows) -> list[list]:
    with_fold = run.run.kind == "kfold"
    return [[row.path.rsplit("/", 1)[-1], row.patient, row.magnification, row.subtype]
            + ([row.fold] if with_fold else [])
            + [CLASS_NAMES[row.truth], CLASS_NAMES[row.predicted], round(row.p_malignant, 3), round(row.confidence, 3)]
            for row in rows]


def browse_filter(run: ViewerRun, *filters: str) -> list:
    """The Browse tab's table for the chosen filters (in browse_filters order) and sort order."""
    names = [name for name, _ in browse_filters(run)] + ["order"]
    rows = filter_rows(browse_rows(run), **dict(zip(names, filters)))
    return [rows, browse_table(run, rows)]


def browse_select(run: ViewerRun, rows, method: str, opacity: float, event: gr.SelectData) -> list:
    """A click on a table row: that image's view from the stored files."""
    view = stored_view(run, rows[event.index[0]])
    return [view] + show_view(run, view, method, opacity)


# --------------------------------------------------------------------------------------------- the page


def filter_choices(run: ViewerRun) -> dict[str, list[str]]:
    rows = browse_rows(run)
    return {"truth": list(CLASS_NAMES), "predicted": list(CLASS_NAMES), "outcome": ["correct", "wrong"],
            "patient": sorted({row.patient for row in rows}),
            "magnification": sorted({row.magnification for row in rows}, key=lambda value: (len(value), value)),
            "subtype": sorted({row.subtype for row in rows}), "fold": [str(fold) for fold in run.run.folds]}


@dataclass(frozen=True)
class ViewPanel:
    """The view shared by Predict and Browse: map method, opacity, the pictures, the probability table."""

    method: gr.Radio
    opacity: gr.Slider
    outputs: list  # in show_view's order


def view_panel(run: ViewerRun, prefix: str, view_state: gr.State) -> ViewPanel:
    """Lay out a view; moving its opacity or choosing its method re-renders the view held in `view_state`."""
    with gr.Row():
        method = gr.Radio(label="map method", choices=[("Grad-CAM", "gradcam")], value="gradcam",
                          elem_id=f"{prefix}-method")
        opacity = gr.Slider(0, 1, value=DEFAULT_OPACITY, step=0.05, label="map opacity",
                            elem_id=f"{prefix}-opacity")
    with gr.Row():
        pictures = [gr.Image(label=name, type="pil", format="png", interactive=False,
                             buttons=["download", "fullscreen"], elem_id=f"{prefix}-{name}") for name in PANEL_NAMES]
    gr.HTML(colour_scale_html(), elem_id=f"{prefix}-colour-scale")
    table = gr.Markdown(elem_id=f"{prefix}-probabilities")
    panel = ViewPanel(method, opacity, [table, method] + pictures)
    for control in (method, opacity):
        control.input(partial(show_view, run), [view_state, method, opacity], panel.outputs, **REDRAW)
    return panel


def predict_tab(run: ViewerRun) -> None:
    upload = gr.File(file_count="multiple", file_types=list(IMAGE_EXTENSIONS), type="filepath",
                     elem_id="predict-upload",
                     label="images (PNG, JPEG, TIFF; any size): each goes through the three CNNs and the final MLP")
    views, current = gr.State([]), gr.State(None)
    summary = gr.Dataframe(headers=["image"] + [run.name(key) for key in run.probability_keys] + ["decision"],
                           interactive=False, elem_id="predict-summary", label="P(malignant) per image")
    chooser = gr.Dropdown(label="show image", choices=[], elem_id="predict-chooser")
    panel = view_panel(run, "predict", current)
    upload.change(partial(predict_uploads, run), [upload, panel.method, panel.opacity],
                  [views, current, chooser, summary] + panel.outputs)
    chooser.input(partial(choose_upload, run), [views, chooser, panel.method, panel.opacity],
                  [current] + panel.outputs, **REDRAW)


def browse_tab(run: ViewerRun) -> None:
    gr.Markdown(f"The run's held-out images: {run.held_out_name}.", elem_id="browse-what")
    choices = filter_choices(run)
    with gr.Row():
        filters = [gr.Dropdown(label=label, choices=["all"] + choices[name], value="all", elem_id=f"browse-{name}")
                   for name, label in browse_filters(run)]
        filters.append(gr.Dropdown(label="sort by the final MLP's confidence", choices=list(ORDERS),
                                   value=ORDERS[0], elem_id="browse-order"))
    rows, table_value = browse_filter(run, *(["all"] * len(browse_filters(run)) + [ORDERS[0]]))
    shown_rows, current = gr.State(rows), gr.State(None)
    table = gr.Dataframe(value=table_value, headers=browse_columns(run), interactive=False, elem_id="browse-table",
                         label="click an image to see it", max_height=320)
    panel = view_panel(run, "browse", current)
    for control in filters:
        control.input(partial(browse_filter, run), filters, [shown_rows, table], **REDRAW)

    def on_select(rows, method: str, opacity: float, event: gr.SelectData) -> list:
        return browse_select(run, rows, method, opacity, event)  # Gradio fills `event` by its type

    table.select(on_select, [shown_rows, panel.method, panel.opacity], [current] + panel.outputs, **REDRAW)


def results_tab(run: ViewerRun) -> None:
    gr.Markdown(results_markdown(run), elem_id="results-table")
    plots = report_plots(run)
    if plots:
        with gr.Column(elem_id="results-plots"):
            for start in range(0, len(plots), 2):  # two plots a row, each shown whole
                with gr.Row():
                    for path, picture in plots[start:start + 2]:
                        gr.Image(picture, label=f"report/{path.name}", show_label=False, format="png",
                                 interactive=False, buttons=["download", "fullscreen"])
    else:
        gr.Markdown(f"No report plots yet: `python {REPORT_SCRIPT} --output-dir {run.output_dir}` builds them.")


def build_app(run: ViewerRun) -> gr.Blocks:
    with gr.Blocks(title=f"BreaKHis viewer: {run.output_dir.name}", analytics_enabled=False, fill_width=True) as app:
        gr.Markdown(f"# Run `{run.output_dir}`\n{run.describe()}", elem_id="run-header")
        if run.warnings:
            gr.Markdown("\n".join(f"**Warning:** {warning}  " for warning in run.warnings), elem_id="warning-banner")
        with gr.Tabs():
            with gr.Tab("Predict", elem_id="tab-predict"):
                predict_tab(run)
            with gr.Tab("Browse", elem_id="tab-browse"):
                browse_tab(run)
            with gr.Tab("Results", elem_id="tab-results"):
                results_tab(run)
    return app


# ------------------------------------------------------------------------------------------------ main


def check_temp_dir(output_dir: Path) -> None:
    """Gradio writes uploads and served pictures to GRADIO_TEMP_DIR; never into the run folder."""
    temp_dir = Path(os.environ["GRADIO_TEMP_DIR"]).resolve()
    if temp_dir == output_dir.resolve() or output_dir.resolve() in temp_dir.parents:
        raise PipelineError(f"GRADIO_TEMP_DIR={temp_dir} is inside the run folder {output_dir}; the viewer writes "
                            "nothing there: point GRADIO_TEMP_DIR elsewhere")


def check_port_free(host: str, port: int) -> None:
    """Fail before the models load (seconds to minutes) when the address cannot be listened on."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will: TIME_WAIT is no conflict
        try:
            probe.bind((host, port))
        except OSError as error:
            raise PipelineError(f"cannot listen on {host}:{port} ({error.strerror}); pass another --port or --host") \
                from None


def main(argv=None) -> None:
    parser = CommandParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/breakhis", help="the finished run to view")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto")
    args = parser.parse_args(argv)
    output_dir = Path(args.output_dir)
    check_temp_dir(output_dir)
    check_port_free(args.host, args.port)
    started = time.perf_counter()
    run = load_viewer_run(output_dir, device=pick_device(args.device))
    app = build_app(run)
    try:
        # run_history=False: the page keeps no record of the images looked at (Gradio's default saves each call in
        # the browser and offers to copy them to a Hugging Face bucket). ssr_mode=False: no Node.js server.
        app.launch(server_name=args.host, server_port=args.port, ssr_mode=False, run_history=False, quiet=True,
                   show_error=True, css=CSS, prevent_thread_lock=True)
    except OSError as error:  # taken since check_port_free
        raise PipelineError(f"cannot listen on {args.host}:{args.port} ({error}); pass another --port or --host") \
            from None
    print(f"viewing {output_dir} (loaded in {time.perf_counter() - started:.1f} s) on "
          f"http://{args.host}:{args.port}; Ctrl-C stops it", flush=True)
    try:
        app.block_thread()
    finally:
        app.close()


if __name__ == "__main__":
    run_main(main)
