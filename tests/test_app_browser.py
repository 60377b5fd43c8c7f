"""app.py end to end in a real browser: headless Chromium (Debian's `chromium`) driven by Playwright against the
app serving a finished demo run, started in a subprocess on a free port of 127.0.0.1; both kinds of run.

Single split: upload an image and read the probabilities and overlays the page shows; move the opacity slider;
open a test image from Browse; read the Results tab; the run folder is left exactly as it was. K-fold: the page
names the run and the three models, Browse has a fold column, and a clicked image's view says which fold's models
scored it and shows that fold's maps. The pictures the page serves are compared pixel for pixel with
common.viewer's (PNG, lossless).

Skipped only when Chromium, Playwright or Gradio is missing on a developer's machine; with CI=true a missing piece
fails the test (.ci/install_browser installs them). SAVE_SCREENSHOT=1 writes docs/viewer_screenshot.png (else the
screenshot goes to the test's tmp folder); VIEWER_RUN=runs/demo runs the tests of that run's kind (a folds.json
run: the K-fold test; a split.json run: the others) against it instead of the session's tiny pipeline run (for a
screenshot with finer maps).
"""

import importlib.util
import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 300  # loading three CNNs on a busy 2-core machine
STEP_TIMEOUT_MS = 120_000


def chromium_executable() -> str | None:
    """$CHROMIUM when set (None when it names no file), else chromium on the PATH."""
    if "CHROMIUM" in os.environ:
        return os.environ["CHROMIUM"] if Path(os.environ["CHROMIUM"]).is_file() else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


def require_browser_tools() -> str:
    """Chromium's path; skip on a developer's machine without the tools, fail in CI (CI=true)."""
    missing = [name for name in ("playwright", "gradio") if importlib.util.find_spec(name) is None]
    if chromium_executable() is None:
        missing.append("chromium")
    if missing:
        message = f"{', '.join(missing)} not installed: run .ci/install_browser"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message, allow_module_level=True)
    return chromium_executable()


CHROMIUM = require_browser_tools()
from playwright.sync_api import expect, sync_playwright  # noqa: E402

from common.core.runfiles import run_kind  # noqa: E402
from common.models.registry import MODEL_ORDER  # noqa: E402
from common.viewer import (  # noqa: E402
    DEFAULT_OPACITY,
    browse_rows,
    filter_rows,
    load_viewer_run,
    open_uploads,
    predict_views,
    render_panels,
    report_plots,
    stored_view,
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def folder_state(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` with its size and modification time (ns)."""
    return {str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns)
            for path in sorted(folder.rglob("*")) if path.is_file()}


def chosen_run(request, kind: str) -> Path:
    """$VIEWER_RUN when it holds a run of this kind, else the session's pipeline run of this kind (conftest.py)."""
    chosen = os.environ.get("VIEWER_RUN")
    if chosen and run_kind(Path(chosen)) == kind:
        return Path(chosen).resolve()
    return request.getfixturevalue("pipeline_run" if kind == "single" else "cv_run")


@pytest.fixture(scope="module")
def run_dir(request) -> Path:
    return chosen_run(request, "single")


@pytest.fixture(scope="module")
def cv_dir(request) -> Path:
    return chosen_run(request, "kfold")


@pytest.fixture(scope="module")
def viewer(run_dir):
    """The same run loaded in the test process: the reference for what the page shows."""
    return load_viewer_run(run_dir, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def cv_viewer(cv_dir):
    return load_viewer_run(cv_dir, device=torch.device("cpu"))


@contextmanager
def serving(run_dir: Path, work: Path):
    """app.py on `run_dir` in a subprocess on a free port; yields its URL and the run folder's state before it
    started; stops it afterwards."""
    before = folder_state(run_dir)
    port = free_port()
    log = open(work / "app.log", "w+")
    process = subprocess.Popen([sys.executable, "app.py", "--output-dir", str(run_dir), "--port", str(port),
                                "--device", "cpu"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "GRADIO_TEMP_DIR": str(work / "gradio")})
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while True:
            if process.poll() is not None:
                log.seek(0)
                pytest.fail(f"app.py exited with {process.returncode} before serving:\n{log.read()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"app.py did not answer on {url} within {START_TIMEOUT_S} s"
            time.sleep(1)
        yield {"url": url, "before": before, "process": process, "log": log}
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.fixture(scope="module")
def server(run_dir, tmp_path_factory):
    with serving(run_dir, tmp_path_factory.mktemp("app_server")) as started:
        yield started


@pytest.fixture(scope="module")
def cv_server(cv_dir, tmp_path_factory):
    with serving(cv_dir, tmp_path_factory.mktemp("cv_app_server")) as started:
        yield started


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@contextmanager
def opened(browser, url: str):
    context = browser.new_context(viewport={"width": 1500, "height": 1100})
    page = context.new_page()
    page.set_default_timeout(STEP_TIMEOUT_MS)
    page.goto(url)
    try:
        yield page
    finally:
        context.close()


@pytest.fixture
def page(browser, server):
    with opened(browser, server["url"]) as single_page:
        yield single_page


@pytest.fixture
def cv_page(browser, cv_server):
    with opened(browser, cv_server["url"]) as kfold_page:
        yield kfold_page


@pytest.fixture(scope="module")
def upload(viewer, tmp_path_factory) -> Path:
    """One of the run's test images as a new upload (a TIFF, under another name)."""
    folder = tmp_path_factory.mktemp("browser_upload")
    source = viewer.run.data_root / viewer.held.paths[0]
    target = folder / "slide_upload.tif"
    Image.open(source).convert("RGB").save(target)
    return target


def served_picture(page, element_id: str) -> np.ndarray:
    """The pixels of the picture a gr.Image of the page shows, fetched from the server as the browser did."""
    picture = page.locator(f"#{element_id} img").first
    source = picture.get_attribute("src")
    body = page.request.get(source).body()
    return np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))


def wait_for_picture(page, element_id: str, *, not_src: str | None = None) -> str:
    """Wait until the gr.Image shows a loaded picture (another one than `not_src`); return its src."""
    page.wait_for_function(
        """([id, old]) => { const img = document.querySelector(`#${id} img`);
                            return img && img.complete && img.naturalWidth > 0 && img.src !== old; }""",
        arg=[element_id, not_src or ""])
    return page.locator(f"#{element_id} img").first.get_attribute("src")


def upload_and_wait(page, upload: Path) -> None:
    page.locator("#predict-upload input[type=file]").set_input_files(str(upload))
    expect(page.locator("#predict-probabilities")).to_contain_text("final MLP, P(malignant)")
    for name in ("image", "densenet121", "resnet50", "vgg16", "combined"):
        wait_for_picture(page, f"predict-{name}")


def save_screenshot(page, tmp_path: Path) -> Path:
    target = ROOT / "docs" / "viewer_screenshot.png" if os.environ.get("SAVE_SCREENSHOT") == "1" \
        else tmp_path / "viewer_screenshot.png"
    page.screenshot(path=str(target), full_page=True)
    return target


def test_upload_shows_every_probability_and_the_overlays(page, viewer, upload, tmp_path):
    expect(page.locator("#warning-banner")).to_contain_text("random initialisation")
    upload_and_wait(page, upload)
    (view,) = predict_views(viewer, open_uploads([str(upload)]))
    shown = page.locator("#predict-probabilities").inner_text()
    final = view.probabilities[viewer.final_key]
    assert f"final MLP, P(malignant) {final:.3f}" in shown
    for key in viewer.probability_keys:
        assert f"{viewer.name(key)}\t{view.probabilities[key]:.3f}" in shown, key
    expect(page.locator("#predict-summary")).to_contain_text("slide_upload.tif")
    expect(page.locator("#predict-colour-scale")).to_contain_text("evidence for the explained class")  # colour bar
    panels = render_panels(viewer, view, opacity=DEFAULT_OPACITY)
    for name, (expected, caption) in zip(("image", "densenet121", "resnet50", "vgg16", "combined"), panels):
        expect(page.locator(f"#predict-{name}")).to_contain_text(caption)
        assert np.array_equal(served_picture(page, f"predict-{name}"), np.asarray(expected)), name
    assert save_screenshot(page, tmp_path).stat().st_size > 10_000


def test_opacity_slider_redraws_the_overlays(page, viewer, upload):
    upload_and_wait(page, upload)
    old_source = page.locator("#predict-vgg16 img").first.get_attribute("src")
    page.locator("#predict-opacity input[type=range]").fill("0.9")
    wait_for_picture(page, "predict-vgg16", not_src=old_source)
    (view,) = predict_views(viewer, open_uploads([str(upload)]))
    panels = render_panels(viewer, view, opacity=0.9)
    assert np.array_equal(served_picture(page, "predict-vgg16"), np.asarray(panels[3][0]))


def open_browse_row(page, viewer, row) -> None:
    """Click `row`'s image name in the Browse table; check the view the page then shows against stored_view's:
    its heading, its true class, and the pictures of one CNN's map and of the combined map, pixel for pixel."""
    name = Path(row.path).name
    table = page.locator("#browse-table")
    expect(table).to_contain_text(name)
    old_source = page.locator("#browse-combined img").first.get_attribute("src") \
        if page.locator("#browse-combined img").count() else None
    table.get_by_text(name, exact=True).filter(visible=True).first.click()  # Gradio keeps a hidden copy
    expect(page.locator("#browse-probabilities")).to_contain_text(f"{name}:")
    expect(page.locator("#browse-probabilities")).to_contain_text("True class:")
    view = stored_view(viewer, row)
    panels = render_panels(viewer, view, opacity=DEFAULT_OPACITY)
    wait_for_picture(page, "browse-combined", not_src=old_source)
    assert np.array_equal(served_picture(page, "browse-densenet121"), np.asarray(panels[1][0]))
    assert np.array_equal(served_picture(page, "browse-combined"), np.asarray(panels[4][0]))


def test_browse_opens_a_stored_test_image(page, viewer):
    page.get_by_role("tab", name="Browse").click()
    rows = filter_rows(browse_rows(viewer))  # the page's default: every test image, most confident first
    open_browse_row(page, viewer, rows[0])
    expect(page.locator("#browse-probabilities")).not_to_contain_text("fold")  # a single split has none


def test_results_tab_shows_the_table_and_the_report_plots(page, viewer):
    page.get_by_role("tab", name="Results").click()
    expect(page.locator("#results-table")).to_contain_text(viewer.name(viewer.final_key))
    expect(page.locator("#results-table")).to_contain_text("Test split")
    # Calibration before and after temperature scaling, the conformal sets and the reliability diagrams.
    for text in ("Calibration", "temperature-scaled", "Conformal sets", "referred"):
        expect(page.locator("#results-table")).to_contain_text(text)
    plots = report_plots(viewer)
    assert plots, "the pipeline run builds the report"
    assert {"reliability_image.png", "reliability_patient.png"} <= {path.name for path, _ in plots}
    expect(page.locator("#results-plots img")).to_have_count(len(plots))


def test_nothing_is_written_into_the_run_folder(server, run_dir, browser, upload):
    """After uploads and browsing (this test also uploads, in case it runs alone) the run folder is unchanged."""
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(STEP_TIMEOUT_MS)
    page.goto(server["url"])
    upload_and_wait(page, upload)
    context.close()
    assert server["process"].poll() is None, "the server is still running"
    assert folder_state(run_dir) == server["before"]


def test_kfold_run_names_its_models_and_browse_shows_each_images_fold(cv_page, cv_viewer, cv_server, cv_dir):
    """A K-fold run: the header says so, the Predict table names the three CNNs, Browse lists every image with its
    fold, and a clicked image's view names the fold whose models scored it and shows that fold's maps (an image of
    each fold); the run folder is left as it was."""
    header = cv_page.locator("#run-header")
    expect(header).to_contain_text(f"K-fold run, {len(cv_viewer.run.folds)} folds:")
    expect(header).to_contain_text("bagged ensemble of the fold models")
    for arch in MODEL_ORDER:
        expect(cv_page.locator("#predict-summary")).to_contain_text(cv_viewer.name(arch))
    cv_page.get_by_role("tab", name="Browse").click()
    expect(cv_page.locator("#browse-what")).to_contain_text("every image, out of fold")
    expect(cv_page.locator("#browse-table")).to_contain_text("fold")  # the column
    rows = filter_rows(browse_rows(cv_viewer))  # the page's default: every image, most confident first
    open_browse_row(cv_page, cv_viewer, rows[0])
    expect(cv_page.locator("#browse-probabilities")).to_contain_text(
        f"fold {rows[0].fold}: scored and explained by fold {rows[0].fold}'s models")
    # The other fold's images, through the page's fold filter (the table only draws the rows in view).
    other_fold = 3 - rows[0].fold
    cv_page.locator("#browse-fold input").click()
    cv_page.get_by_role("option", name=str(other_fold), exact=True).click()
    other_rows = filter_rows(browse_rows(cv_viewer), fold=str(other_fold))
    expect(cv_page.locator("#browse-table")).not_to_contain_text(Path(rows[0].path).name)
    open_browse_row(cv_page, cv_viewer, other_rows[0])
    expect(cv_page.locator("#browse-probabilities")).to_contain_text(
        f"fold {other_fold}: scored and explained by fold {other_fold}'s models")
    assert cv_server["process"].poll() is None, "the server is still running"
    assert folder_state(cv_dir) == cv_server["before"]


@pytest.mark.parametrize("kind", ["single", "kfold"])
def test_the_reports_tables_fit_a_1400_px_window(request, browser, kind):
    """No table of the report (the K-fold one has 10 columns with intervals) runs past the window's right edge."""
    run_dir = request.getfixturevalue("run_dir" if kind == "single" else "cv_dir")
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    try:
        page = context.new_page()
        page.goto((run_dir / "report" / "index.html").as_uri())
        tables = page.locator("table")
        assert tables.count() >= 2
        width = page.evaluate("() => document.documentElement.clientWidth")
        for index in range(tables.count()):
            box = tables.nth(index).bounding_box()
            assert box["x"] >= 0 and box["x"] + box["width"] <= width, (index, box, width)
    finally:
        context.close()
