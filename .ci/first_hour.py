"""A new user's first hour, scripted: what the README tells a newcomer to do, and three typical mistakes, each
expected to end in the right exit status with the right message, never in a traceback.

    python .ci/first_hour.py                 # with the Python that has the requirements (CI: the fresh venv)

In a fresh clone of this checkout's committed state (in a temporary folder, removed at the end):

1. the K-fold demo at its smallest settings (`run_pipeline.py --demo`, 32 px, one epoch, no explanation scores);
2. a subset of `make test` (tests/test_messages.py);
3. predict.py on a demo image (the run's own image: scored by its fold, flagged);
4. the viewer started on the demo run and rendered in headless Chromium (the run header names the three models),
   then stopped with Ctrl-C;
5. the mistakes: a mistyped option (`--imagesize 32`: one line naming --image-size), predict.py before any run
   (one line naming the command to run first), Ctrl-C in run_pipeline.py (one line with the command that
   resumes).

Each step prints `ok` or what went wrong (its command and the end of its output); the exit status is 1 when any
step failed.
"""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
SMALLEST_DEMO = ["--image-size", "32", "--epochs", "1", "--faithfulness-images", "0"]
ENV = {**os.environ, "OMP_NUM_THREADS": "2"}
failures: list[str] = []


def check(step: str, passed: bool, finished: subprocess.CompletedProcess | None = None, why: str = "") -> None:
    if passed:
        print(f"ok    {step}", flush=True)
        return
    print(f"FAIL  {step}: {why}", flush=True)
    if finished is not None:
        print(f"      $ {' '.join(map(str, finished.args))}\n      exit {finished.returncode}\n"
              + "\n".join("      " + line for line in (finished.stdout + finished.stderr).splitlines()[-25:]))
    failures.append(step)


def run(clone: Path, *argv: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, *argv], cwd=clone, env=ENV, capture_output=True, text=True, timeout=timeout)


def one_error_line(finished: subprocess.CompletedProcess, status: int, *fragments: str) -> tuple[bool, str]:
    lines = [line for line in finished.stderr.splitlines() if line.startswith(("error:", "interrupted:"))]
    if "Traceback" in finished.stderr:
        return False, "a traceback"
    if finished.returncode != status:
        return False, f"exit status {finished.returncode}, expected {status}"
    if len(lines) != 1:
        return False, f"{len(lines)} error lines, expected 1"
    missing = [fragment for fragment in fragments if fragment not in lines[0]]
    return not missing, f"the line lacks {missing}" if missing else ""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def viewer_renders(clone: Path) -> None:
    """app.py on the demo run, the page rendered in Chromium, then Ctrl-C: exit status 0, no traceback."""
    from playwright.sync_api import sync_playwright

    port = free_port()
    viewer = subprocess.Popen([PYTHON, "app.py", "--output-dir", "runs/demo", "--port", str(port), "--device",
                               "cpu"], cwd=clone, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        deadline = time.time() + 180
        started = False
        while time.time() < deadline and viewer.poll() is None:
            line = viewer.stdout.readline()
            if line.startswith("viewing "):
                started = True
                break
        if not started:
            check("viewer starts", False, why=f"no 'viewing' line (exit {viewer.poll()})")
            return
        chromium = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector("#run-header", timeout=60_000)
            header = page.locator("#run-header").inner_text()
            predict_tab = page.locator("#predict-summary").inner_text()
            browser.close()
        check("viewer renders in Chromium", "K-fold" in header and all(
            name in predict_tab for name in ("DenseNet-121", "ResNet-50", "VGG-16")), why=header[:200])
    finally:
        viewer.send_signal(signal.SIGINT)
        try:
            _, stderr = viewer.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            viewer.kill()
            _, stderr = viewer.communicate()
    check("viewer stops on Ctrl-C", viewer.returncode == 0 and "Traceback" not in stderr,
          why=f"exit {viewer.returncode}; {stderr[-500:]}")


def ctrl_c_in_run_pipeline(clone: Path) -> None:
    """Ctrl-C to the whole process group (as a terminal sends it) while the first model stage runs."""
    command = [PYTHON, "run_pipeline.py", "--demo", "--output-dir", "runs/interrupted", *SMALLEST_DEMO]
    driver = subprocess.Popen(command, cwd=clone, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True)
    for line in driver.stdout:  # the first model stage is running (it has read its split)
        if line.startswith("split protocol:"):
            break
    try:
        os.killpg(driver.pid, signal.SIGINT)
        stdout, stderr = driver.communicate(timeout=300)
    finally:  # nothing left training in the background
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
    finished = subprocess.CompletedProcess(command, driver.returncode, stdout, stderr)
    passed, why = one_error_line(finished, 130, "resume with python run_pipeline.py --demo")
    check("mistake 3: Ctrl-C in run_pipeline.py says what is intact and how to resume", passed, finished, why)


def main() -> int:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="first_hour_") as work:
        clone = Path(work) / "clone"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True,
                                text=True).stdout.strip()
        print(f"first hour in a fresh clone of {ROOT} ({commit})", flush=True)

        demo = run(clone, "run_pipeline.py", "--demo", *SMALLEST_DEMO, timeout=1200)
        check("the K-fold demo at its smallest settings", demo.returncode == 0
              and (clone / "runs/demo/report/index.html").is_file() and "Traceback" not in demo.stderr, demo,
              "no report or a nonzero exit")

        tests = run(clone, "-m", "pytest", "-q", "tests/test_messages.py")
        check("make test, a subset (tests/test_messages.py)", tests.returncode == 0, tests, "tests failed")

        image = next((clone / "demo_data").rglob("*.png"))
        predicted = run(clone, "predict.py", "--output-dir", "runs/demo", str(image), "--device", "cpu")
        check("predict.py on a demo image (the run's own: flagged, scored by its fold)",
              predicted.returncode == 0 and "note: " in predicted.stdout and "one of this run's own images"
              in predicted.stdout and "Traceback" not in predicted.stderr, predicted, "no flag or a nonzero exit")

        if (clone / "runs/demo/final_classifier.pth").is_file():
            viewer_renders(clone)

        typo = run(clone, "run_pipeline.py", "--demo", "--imagesize", "32")
        passed, why = one_error_line(typo, 2, "unknown option --imagesize; did you mean --image-size?")
        check("mistake 1: a mistyped option names the closest valid one", passed, typo, why)

        no_run = run(clone, "predict.py", "--output-dir", "runs/nothing_here", str(image))
        passed, why = one_error_line(no_run, 2, "make a run there first with python run_pipeline.py")
        check("mistake 2: predict.py before any run names what to run first", passed, no_run, why)

        ctrl_c_in_run_pipeline(clone)
    print(f"first hour: {len(failures)} failed step(s) in {time.perf_counter() - started:.0f} s", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
