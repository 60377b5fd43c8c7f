"""A repeatable fault and bad-input campaign against K-fold runs: kill -9 in every stage, tampered run files, bad
inputs. It counts how each fault ends: recovered, refused with a one-line error, a traceback, a silent wrong
result, temporaries left behind.

    python bench/fault_campaign.py --work-dir /tmp/campaign_work             # everything (long on 2 CPU cores)
    python bench/fault_campaign.py --work-dir /tmp/campaign_work --quick     # a representative subset
    python bench/fault_campaign.py --sections kill,bad                       # some sections only
    python bench/fault_campaign.py --sections tamper --each-file --reuse-reference --work-dir /tmp/campaign_work
                                                                             # every run file once

In --work-dir (default: a new temporary folder, kept), with the test suite's small settings (random init, 32 px,
one epoch, a 48-image synthetic tree):

1. reference: the demo data and a 2-fold run_pipeline.py run. Its oof_predictions.csv (bytes, SHA-256) and the
   pooled numbers of cv_results.json's rows are what every recovered run must reproduce; CPU training with the
   same seed is deterministic, so a difference is a wrong result, not noise (a run in another folder cannot be
   byte-identical: its checkpoint_sha256_* columns hash checkpoints that record their folder, so there every other
   column must be identical as written, to the last digit). While it runs, the listing of the
   run folder (size and mtime of every file) is taken at the start of every stage, with the run stopped
   (SIGSTOP) for the moment of the listing.
2. kill: for every stage (each fold's three model scripts, cancer_class_further.py, score_explanations.py,
   make_report.py) run_pipeline.py starts into a fresh folder in its own process group; a seeded random delay
   (0.3-3 s) after the stage's `$ ...` line the whole group gets SIGKILL; the same command then runs to the end.
   To spare retraining the stages before the killed one, the fresh folder is seeded with the reference's files
   that existed when the reference started that stage, and only if each is still byte for byte the file of that
   moment (same size and mtime: never rewritten later); otherwise the run starts from an empty folder.
3. tamper: every run file of a real copy of the reference (folds.json, fold_k/split.json, the checkpoints,
   heatmap files, final_classifier.pth, cv_results.json, oof_predictions.csv, fold_k/results.json) is truncated
   to half, has bytes flipped in the middle, is replaced by the same file of the other fold, or is deleted; after
   each, predict.py, make_report.py, the viewer (app.build_app) and run_pipeline.py run on the copy, which is
   restored before the next tampering.
4. bad: the bad inputs of the issue (other data or options on a resumed run, folds.json deleted, a K-fold run into
   a single-split folder, an output path that is a file, a float TIFF, two images of one name, an undecodable PNG
   in report/).

Every outcome is one of: recovered (exit 0, results identical to the reference, or to the same reader on the
untouched copy), refused (exit 2 and stderr exactly one line starting `error: `), bad refusal (exit 2 otherwise),
traceback (`Traceback` in stderr or an exit status other than 0 and 2), silent wrong (exit 0, results differ).
Files left behind (names starting with '.', or ending in .tmp, in the run folder after the last command) are
counted besides. A table per section is printed and written with every case to --out (default
WORK/fault_campaign.json); each failure is printed with its command and the end of its stderr. Exit status 1 when
a traceback, silent wrong result, bad refusal or file left behind was found.
"""

import argparse
import csv
import hashlib
import json
import os
import queue
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.core.runfiles import (  # noqa: E402
    CV_RESULTS_JSON,
    FINAL_CLASSIFIER,
    FOLDS_FILE,
    OOF_PREDICTIONS,
    PREDICTIONS_CSV,
    REPORT_DIR,
    RESULTS_JSON,
    SPLIT_FILE,
    checkpoint_path,
    heatmap_path,
)
from common.models.registry import ARCHS, MODEL_ORDER  # noqa: E402

PYTHON = sys.executable
# The test suite's small settings (tests/conftest.py): random init, 32 px, one epoch, a quarter of the patients
# each for val and test.
PIPELINE_ARGS = ["--weights", "none", "--image-size", "32", "--epochs", "1", "--batch-size", "8", "--workers", "0",
                 "--overlays", "1", "--val-fraction", "0.25", "--test-fraction", "0.25"]
DEMO_DATA_ARGS = ["--patients-per-class", "4", "--images-per-patient", "3", "--magnifications", "100,400",
                  "--width", "48", "--height", "32"]
OTHER_DATA_ARGS = ["--patients-per-class", "5", "--images-per-patient", "3", "--magnifications", "100,400",
                   "--width", "48", "--height", "32", "--seed", "5"]
FOLDS = 2
KILL_DELAY_SECONDS = (0.3, 3.0)
PIPELINE_TIMEOUT = 1800
READER_TIMEOUT = 600
STDERR_TAIL_LINES = 12
READERS = ("predict", "make_report", "viewer", "run_pipeline")
OUTCOMES = ("recovered", "refused", "bad_refusal", "traceback", "silent_wrong")
SCRIPT_OF_ARCH = {arch: ARCHS[arch].script for arch in MODEL_ORDER}
ARCH_OF_SCRIPT = {script: arch for arch, script in SCRIPT_OF_ARCH.items()}


# ------------------------------------------------------------------------------------------------ running commands


@dataclass
class Finished:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def command(self) -> str:
        return shlex.join(self.argv)


def environment() -> dict[str, str]:
    # Two intra-op threads, as the test suite: the same setting for the reference and every rerun, so that the
    # runs are comparable byte for byte.
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "PYTHONUNBUFFERED": "1"}


def run_command(argv: list[str], timeout: int = READER_TIMEOUT) -> Finished:
    started = time.perf_counter()
    try:
        done = subprocess.run(argv, cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=timeout)
        return Finished(argv, done.returncode, done.stdout, done.stderr, time.perf_counter() - started)
    except subprocess.TimeoutExpired as expired:
        # Recorded as a failure (exit status -1), not raised: the campaign goes on with the other cases.
        def text(value):
            return value.decode(errors="replace") if isinstance(value, bytes) else value or ""
        return Finished(argv, -1, text(expired.stdout), text(expired.stderr) + f"\n[campaign: timed out after "
                        f"{timeout} s]", time.perf_counter() - started)


def pipeline_command(data_dir: Path, output_dir: Path, faithfulness_images: int, *options: str) -> list[str]:
    """The reference run's command (options given here come last, so they win)."""
    return [PYTHON, str(ROOT / "run_pipeline.py"), "--data-dir", str(data_dir), "--output-dir", str(output_dir),
            "--folds", str(FOLDS), "--faithfulness-images", str(faithfulness_images),
            "--faithfulness-perturbation-images", "0", *PIPELINE_ARGS, *options]


def predict_command(images: list[Path], run_dir: Path, out: Path) -> list[str]:
    return [PYTHON, str(ROOT / "predict.py"), *map(str, images), "--output-dir", str(run_dir), "--out", str(out),
            "--device", "cpu"]


def report_command(run_dir: Path) -> list[str]:
    return [PYTHON, str(ROOT / "make_report.py"), "--output-dir", str(run_dir)]


def viewer_command(run_dir: Path) -> list[str]:
    """The viewer's loading and layout (app.build_app), then a fingerprint of the probabilities it shows, so that
    an exit 0 can be checked against the untouched run. Inside run_main, as `python app.py` runs them (app.main):
    a bare `python -c "app.build_app(app.load_viewer_run(...))"` prints every refusal as a traceback, since only
    run_main turns PipelineError into the one-line `error:`."""
    code = ("import app, hashlib, numpy as np, torch; from pathlib import Path\n"
            "from common.core.errors import run_main\n"
            "def main():\n"
            f"    run = app.load_viewer_run(Path({str(run_dir)!r}), device=torch.device('cpu'))\n"
            "    app.build_app(run)\n"
            "    digest = hashlib.sha256()\n"
            "    for key in sorted(run.predictions):\n"
            "        digest.update(key.encode()); digest.update(np.ascontiguousarray(run.predictions[key]).tobytes())\n"
            "    print('VIEWER_FINGERPRINT', digest.hexdigest())\n"
            "run_main(main)")
    return [PYTHON, "-c", code]


def stderr_tail(text: str, lines: int = STDERR_TAIL_LINES) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def exit_verdict(finished: Finished) -> str | None:
    """The outcome that exit status and stderr alone decide; None for an exit 0, whose results must be compared."""
    if "Traceback" in finished.stderr or finished.returncode not in (0, 2):
        return "traceback"
    if finished.returncode == 2:
        lines = finished.stderr.strip().splitlines()
        return "refused" if len(lines) == 1 and lines[0].startswith("error: ") else "bad_refusal"
    return None


def left_behind(*folders: Path) -> list[str]:
    """Temporaries under the folders: names starting with '.' (temporary files, `.scratch` folders) or ending .tmp."""
    found = []
    for folder in folders:
        if folder.is_dir():
            found += sorted(str(path) for path in folder.rglob("*")
                            if path.name.startswith(".") or path.name.endswith(".tmp"))
    return found


# ------------------------------------------------------------------------------------------------ recording cases


@dataclass
class Case:
    section: str
    name: str
    outcome: str  # one of OUTCOMES
    command: str
    returncode: int
    detail: str = ""
    stderr_tail: str = ""
    left_behind: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def is_failure(self) -> bool:
        return self.outcome in ("traceback", "silent_wrong", "bad_refusal") or bool(self.left_behind)


class Ledger:
    """Every case of the campaign, printed as it is decided."""

    def __init__(self):
        self.cases: list[Case] = []

    def add(self, section: str, name: str, finished: Finished, outcome: str, detail: str = "",
            leftovers: list[str] | None = None) -> Case:
        case = Case(section, name, outcome, finished.command, finished.returncode, detail,
                    stderr_tail(finished.stderr), leftovers or [], round(finished.seconds, 1))
        self.cases.append(case)
        mark = "FAIL" if case.is_failure else "ok  "
        first_error = finished.stderr.strip().splitlines()[-1][:160] if finished.stderr.strip() else ""
        print(f"  {mark} [{section}] {name}: {outcome} (exit {finished.returncode}, {finished.seconds:.0f} s)"
              + (f" - {detail}" if detail else "") + (f"\n         stderr: {first_error}" if outcome != "recovered"
                                                      and first_error else "")
              + (f"\n         left behind: {leftovers}" if leftovers else ""), flush=True)
        return case

    def table(self, section: str) -> dict[str, int]:
        cases = [case for case in self.cases if case.section == section]
        row = {"tries": len(cases)}
        row.update({outcome: sum(case.outcome == outcome for case in cases) for outcome in OUTCOMES})
        row["left_behind"] = sum(bool(case.left_behind) for case in cases)
        return row


def print_tables(ledger: Ledger, sections: list[str]) -> None:
    columns = ["tries", *OUTCOMES, "left_behind"]
    headers = ["tries", "recovered", "refused (1 line)", "bad refusal", "tracebacks", "silent wrong", "left behind"]
    width = max(len(header) for header in headers)
    print("\n" + "section".ljust(14) + " ".join(header.rjust(width) for header in headers))
    for section in sections:
        row = ledger.table(section)
        print(section.ljust(14) + " ".join(str(row[column]).rjust(width) for column in columns))


def print_failures(ledger: Ledger) -> None:
    failures = [case for case in ledger.cases if case.is_failure]
    print(f"\n{len(failures)} failure case(s)")
    for case in failures:
        print(f"\n--- [{case.section}] {case.name}: {case.outcome} (exit {case.returncode})"
              + (f"; left behind: {case.left_behind}" if case.left_behind else ""))
        if case.detail:
            print(f"    {case.detail}")
        print(f"    command: {case.command}")
        print("    stderr (end):\n" + "\n".join("      " + line for line in case.stderr_tail.splitlines()))


# ------------------------------------------------------------------------------------------------ reference results


def oof_rows(run_dir: Path) -> dict[str, dict[str, str]]:
    """oof_predictions.csv as path -> its row (values as written)."""
    with open(run_dir / OOF_PREDICTIONS, newline="") as handle:
        return {row["path"]: row for row in csv.DictReader(handle)}


def pooled_numbers(value, path: str = "") -> dict[str, float]:
    """Every `pooled` number under cv_results.json's rows, by its path (row/level/metric)."""
    found = {}
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "pooled" and isinstance(item, (int, float)):
                found[path] = float(item)
            else:
                found.update(pooled_numbers(item, f"{path}/{key}" if path else key))
    return found


def run_results(run_dir: Path) -> dict:
    oof = (run_dir / OOF_PREDICTIONS).read_bytes()
    return {"oof_sha256": hashlib.sha256(oof).hexdigest(), "oof_bytes": len(oof),
            "pooled": pooled_numbers(json.loads((run_dir / CV_RESULTS_JSON).read_text())["rows"])}


def compare_with_reference(run_dir: Path, reference: dict, reference_dir: Path) -> tuple[bool, str]:
    """(same results, how) for a finished run against the reference run. The bytes of oof_predictions.csv are
    identical only for a run in the reference's own folder: its checkpoint_sha256_* columns hash checkpoints that
    record the folder they were trained in (config output_dir). So every other column is compared as written, to
    the last digit, and the checkpoint hashes are only reported."""
    try:
        results = run_results(run_dir)
        ours, theirs = oof_rows(run_dir), oof_rows(reference_dir)
    except (OSError, ValueError, KeyError) as error:
        return False, f"the run's results cannot be read ({type(error).__name__}: {error})"
    if results["oof_sha256"] == reference["oof_sha256"] and results["pooled"] == reference["pooled"]:
        return True, "oof_predictions.csv byte-identical, pooled numbers equal"
    if set(ours) != set(theirs):
        return False, f"oof_predictions.csv lists other images ({len(ours)} vs {len(theirs)} rows)"
    hash_columns = [key for key in next(iter(theirs.values())) if key.startswith("checkpoint_sha256_")]
    differing = sorted({key for path in theirs for key, value in theirs[path].items()
                        if key not in hash_columns and ours[path].get(key) != value})
    rehashed = sorted({key for path in theirs for key in hash_columns if ours[path].get(key) != theirs[path][key]})
    pooled_equal = results["pooled"] == reference["pooled"]
    if not differing and pooled_equal:
        return True, ("every probability and label column of oof_predictions.csv identical, pooled numbers equal; "
                      f"bytes differ only in {rehashed} (retrained checkpoints record their folder)")
    largest = max((abs(float(ours[path][key]) - float(theirs[path][key])) for path in theirs for key in differing
                   if key.startswith("prob_")), default=0.0)
    pooled = max((abs(results["pooled"].get(key, np.nan) - value) for key, value in reference["pooled"].items()),
                 default=0.0)
    return False, (f"differs from the reference: columns {differing} (largest probability difference {largest:.3g}),"
                   f" largest pooled-number difference {pooled:.3g}")


# ------------------------------------------------------------------------------------------------ stages


def stage_of(line: str) -> str | None:
    """The stage a run_pipeline.py `$ <python> <script> ...` line starts: 'fold_<k> <arch>' or the script's name."""
    if not line.startswith("$ "):
        return None
    tokens = line[2:].split()
    script = Path(tokens[1]).name if len(tokens) > 1 else ""
    if script in ARCH_OF_SCRIPT:
        fold = tokens[tokens.index("--fold") + 1] if "--fold" in tokens else "?"
        return f"fold_{fold} {ARCH_OF_SCRIPT[script]}"
    return script


def listing(folder: Path) -> dict[str, list[int]]:
    """Every file under `folder`: relative path -> [size, mtime_ns]."""
    found = {}
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            status = path.stat()
            found[str(path.relative_to(folder))] = [status.st_size, status.st_mtime_ns]
    return found


class OutputReader:
    """A process's stdout read line by line on a thread (so the campaign can wait on it with a timeout)."""

    def __init__(self, process: subprocess.Popen):
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[str] = []
        self.thread = threading.Thread(target=self._read, args=(process.stdout,), daemon=True)
        self.thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)  # end of output

    def next_line(self, timeout: float) -> str | None:
        """The next line; None at the end of the output; raises queue.Empty after `timeout`."""
        line = self.lines.get(timeout=timeout)
        if line is not None:
            self.seen.append(line)
        return line

    def drain(self) -> list[str]:
        self.thread.join(timeout=30)
        while True:
            try:
                if self.next_line(timeout=0.1) is None:
                    break
            except queue.Empty:
                break
        return self.seen


def start_in_own_group(argv: list[str], stderr_file: Path) -> subprocess.Popen:
    return subprocess.Popen(argv, cwd=ROOT, env=environment(), stdout=subprocess.PIPE, stderr=open(stderr_file, "w"),
                            text=True, start_new_session=True)


def reference_run(argv: list[str], output_dir: Path, logs: Path) -> tuple[Finished, list[tuple[str, dict]]]:
    """Run the reference; at every stage's `$` line stop the process group, list the run folder, let it go on.
    Returns the finished run and (stage, listing at its start) in order."""
    started = time.perf_counter()
    stderr_file = logs / "reference.stderr"
    process = start_in_own_group(argv, stderr_file)
    reader = OutputReader(process)
    snapshots = []
    while (line := reader.next_line(timeout=PIPELINE_TIMEOUT)) is not None:
        stage = stage_of(line)
        if stage:
            # The stage's script has at most just been spawned (the line is printed before it starts): stopped
            # now, it has written nothing yet (its imports alone take seconds).
            os.killpg(process.pid, signal.SIGSTOP)
            try:
                snapshots.append((stage, listing(output_dir) if output_dir.is_dir() else {}))
            finally:
                os.killpg(process.pid, signal.SIGCONT)
    process.wait()
    (logs / "reference.stdout").write_text("\n".join(reader.seen))
    return Finished(argv, process.returncode, "\n".join(reader.seen), stderr_file.read_text(),
                    time.perf_counter() - started), snapshots


# ------------------------------------------------------------------------------------------------ section 1


@dataclass
class Setup:
    work: Path
    data: Path
    other_data: Path
    reference_dir: Path
    reference: dict
    snapshots: list[tuple[str, dict]]
    faithfulness_images: int
    dataset_image: Path  # an image of the run's own dataset (scored out of fold)
    new_image: Path  # an image the run never saw (scored by the bagged fold models and final_classifier.pth)


def make_data(folder: Path, options: list[str]) -> None:
    finished = run_command([PYTHON, str(ROOT / "make_demo_data.py"), str(folder), *options])
    if finished.returncode != 0:
        sys.exit(f"make_demo_data.py failed:\n{finished.stderr}")


def prepare(work: Path, faithfulness_images: int, reuse: bool, need_stages: bool) -> Setup:
    print("== reference: demo data and a 2-fold run", flush=True)
    data, other_data = work / "data", work / "other_data"
    for folder, options in ((data, DEMO_DATA_ARGS), (other_data, OTHER_DATA_ARGS)):
        if not folder.is_dir():
            make_data(folder, options)
    reference_dir, logs = work / "reference", work / "logs"
    logs.mkdir(exist_ok=True)
    stages_file = work / "reference_stages.json"
    argv = pipeline_command(data, reference_dir, faithfulness_images)
    saved = json.loads(stages_file.read_text()) if reuse and stages_file.is_file() else None
    if reuse and not saved and not need_stages and (reference_dir / CV_RESULTS_JSON).is_file():
        # No record of its command or stages (a campaign before this option): enough for tamper and bad only.
        snapshots, seconds = [], 0.0
        print("  reusing the reference run in the work folder (--reuse-reference; its command was not recorded)")
    elif saved and saved["command"] == argv and (reference_dir / CV_RESULTS_JSON).is_file():
        # A reference of an earlier campaign in this work folder, made by the same command: reused, to spare a run.
        snapshots, seconds = [tuple(item) for item in saved["snapshots"]], 0.0
        print("  reusing the reference run of an earlier campaign (--reuse-reference)")
    else:
        if reference_dir.exists():
            shutil.rmtree(reference_dir)
        finished, snapshots = reference_run(argv, reference_dir, logs)
        if finished.returncode != 0:
            sys.exit(f"the reference run failed (exit {finished.returncode}): {finished.command}\n"
                     f"{stderr_tail(finished.stderr, 40)}")
        stages_file.write_text(json.dumps({"command": argv, "snapshots": snapshots}))
        seconds = finished.seconds
    reference = run_results(reference_dir)
    print(f"  reference run: {seconds:.0f} s; oof_predictions.csv {reference['oof_bytes']} bytes, sha256 "
          f"{reference['oof_sha256']}; {len(reference['pooled'])} pooled numbers; stages: "
          f"{', '.join(stage for stage, _ in snapshots)}", flush=True)
    images = sorted(data.rglob("*.png"))
    new_images = sorted(other_data.rglob("*.png"))
    return Setup(work, data, other_data, reference_dir, reference, snapshots, faithfulness_images, images[0],
                 new_images[-1])


# ------------------------------------------------------------------------------------------------ section 2: kill -9


def seed_from_reference(setup: Setup, files_at_start: dict, target: Path) -> str:
    """Copy into `target` the reference files that existed when the stage started, if each is unchanged since;
    returns how the folder was prepared."""
    final = listing(setup.reference_dir)
    rewritten = [path for path, stamp in files_at_start.items() if final.get(path) != stamp]
    if rewritten:
        return f"empty folder (reference files rewritten after this stage started: {rewritten[:3]})"
    for relative in files_at_start:
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(setup.reference_dir / relative, target / relative)
    return f"seeded with the {len(files_at_start)} reference file(s) present at the stage's start" \
        if files_at_start else "empty folder (first stage)"


def kill_during(argv: list[str], stage: str, delay: float, logs: Path, name: str) -> dict:
    """Start the run in its own process group, SIGKILL the group `delay` s after `stage` starts; what happened."""
    process = start_in_own_group(argv, logs / f"{name}.killed.stderr")
    reader = OutputReader(process)
    reached = False
    deadline = time.monotonic() + PIPELINE_TIMEOUT
    while not reached and time.monotonic() < deadline:
        try:
            line = reader.next_line(timeout=max(1.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            break
        reached = stage_of(line) == stage
    if reached:
        time.sleep(delay)
    exited_before_kill = process.poll() is not None
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()
    seen = reader.drain()
    stages = [stage_of(line) for line in seen if stage_of(line)]
    # Everything printed was printed before the kill: the last stage started is the one that was running.
    return {"reached": reached, "exited_before_kill": exited_before_kill,
            "stage_at_kill": stages[-1] if stages else None,
            "stage_finished_before_kill": bool(seen) and seen[-1].startswith("(") and seen[-1].endswith(" s)")}


def kill_campaign(setup: Setup, ledger: Ledger, quick: bool, seed: int) -> None:
    print("\n== kill: SIGKILL to the process group during every stage, then the same command again", flush=True)
    random_delays = random.Random(seed)
    base = setup.work / "kill"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir()
    stages = setup.snapshots
    if quick:  # fold 1's models stand for every fold's; the final stages once each
        stages = [(stage, files) for stage, files in stages if not stage.startswith("fold_") or
                  stage.startswith("fold_1 ")]
    for number, (stage, files_at_start) in enumerate(stages, 1):
        delay = round(random_delays.uniform(*KILL_DELAY_SECONDS), 2)
        name = f"{number:02d}_{stage.replace(' ', '_').replace('.py', '')}"
        output_dir = base / name
        output_dir.mkdir()
        prepared = seed_from_reference(setup, files_at_start, output_dir)
        argv = pipeline_command(setup.data, output_dir, setup.faithfulness_images)
        killed = kill_during(argv, stage, delay, base, name)
        leftovers_after_kill = left_behind(output_dir)
        rerun = run_command(argv, timeout=PIPELINE_TIMEOUT)
        outcome = exit_verdict(rerun)
        detail = (f"killed {delay} s after `{stage}` started (running at the kill: {killed['stage_at_kill']}"
                  + (", which had just finished" if killed["stage_finished_before_kill"] else "")
                  + ("; the run had already exited" if killed["exited_before_kill"] else "")
                  + f"); {prepared}; {len(leftovers_after_kill)} temporaries right after the kill")
        if not killed["reached"]:
            detail = f"stage `{stage}` never started in the killed run; " + detail
        if outcome is None:
            identical, differences = compare_with_reference(output_dir, setup.reference, setup.reference_dir)
            outcome = "recovered" if identical else "silent_wrong"
            detail += f"; rerun: {differences}"
        leftovers = left_behind(output_dir)
        if leftovers:
            ages = [f"{Path(path).name}: {time.time() - Path(path).lstat().st_mtime:.0f} s old"
                    for path in leftovers[:5]]
            detail += f"; left behind after the rerun ({', '.join(ages)})"
        ledger.add("kill", f"{number:02d} {stage}", rerun, outcome, detail, leftovers)
        if outcome == "recovered" and not leftovers:
            shutil.rmtree(output_dir)  # a failure's folder is kept to look at


# ------------------------------------------------------------------------------------------------ section 3: tamper


def truncate_to_half(path: Path, _: Path | None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_middle_bytes(path: Path, _: Path | None) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for index in range(max(0, middle - 8), min(len(data), middle + 8)):
        data[index] ^= 0xFF
    path.write_bytes(bytes(data))


def replace_with_other_fold(path: Path, other: Path | None) -> None:
    path.unlink()  # a real copy of the other fold's file, not a link into it
    shutil.copy2(other, path)


def delete(path: Path, _: Path | None) -> None:
    path.unlink()


TAMPERINGS = {"truncate": truncate_to_half, "flip": flip_middle_bytes, "other_fold": replace_with_other_fold,
              "delete": delete}


def run_files() -> list[tuple[str, str | None]]:
    """Every run file to tamper with, relative to the run, with its counterpart in the other fold (or None)."""
    files: list[tuple[str, str | None]] = [(FOLDS_FILE, None)]
    for fold in range(1, FOLDS + 1):
        other = FOLDS + 1 - fold
        per_fold = [SPLIT_FILE, *(checkpoint_path("", arch).name for arch in MODEL_ORDER),
                    *(heatmap_path("", arch).name for arch in MODEL_ORDER), RESULTS_JSON]
        files += [(f"fold_{fold}/{name}", f"fold_{other}/{name}") for name in per_fold]
    # The K-fold final classifier's counterpart: fold 1's own final classifier (same name, same schema).
    files += [(FINAL_CLASSIFIER, f"fold_1/{FINAL_CLASSIFIER}"), (CV_RESULTS_JSON, None), (OOF_PREDICTIONS, None)]
    return files


# The subset for --quick: each kind of file and each kind of tampering at least once.
QUICK_TAMPERINGS = [
    (FOLDS_FILE, "truncate"), ("fold_1/split.json", "other_fold"), ("fold_1/fine_tuned_resnet50.pth", "flip"),
    ("fold_2/fine_tuned_densenet121.pth", "truncate"), ("fold_1/heatmaps_resnet50.npz", "delete"),
    (FINAL_CLASSIFIER, "other_fold"), (CV_RESULTS_JSON, "flip"), (OOF_PREDICTIONS, "flip"),
    ("fold_1/results.json", "truncate"),
]


def predict_probabilities(out: Path) -> dict[str, list[str]]:
    """predictions.csv as image -> its p_malignant_* values (as written, 6 digits)."""
    with open(out / PREDICTIONS_CSV, newline="") as handle:
        return {row["image"]: [value for key, value in row.items() if key.startswith("p_malignant_")]
                for row in csv.DictReader(handle)}


def reader_fingerprint(reader: str, finished: Finished, run_dir: Path, out: Path, setup: Setup):
    """What an exit-0 reader produced, to compare with the same reader on the untouched copy."""
    if reader == "predict":
        return predict_probabilities(out)
    if reader == "make_report":
        return hashlib.sha256((run_dir / REPORT_DIR / "index.html").read_bytes()).hexdigest()
    if reader == "viewer":
        return [line for line in finished.stdout.splitlines() if line.startswith("VIEWER_FINGERPRINT")]
    return None  # run_pipeline: compared with the reference run's results instead


def restore(setup: Setup, copy: Path) -> None:
    if copy.exists():
        shutil.rmtree(copy)
    shutil.copytree(setup.reference_dir, copy, symlinks=True)  # real copies of every file


def run_readers(setup: Setup, ledger: Ledger, copy: Path, label: str, baseline: dict | None,
                readers: list[str]) -> dict:
    """predict.py, make_report.py, the viewer, run_pipeline.py on the copy, in that order (run_pipeline last: it
    rewrites the run); returns each exit-0 reader's fingerprint."""
    out = setup.work / "tamper" / "predictions"
    shutil.rmtree(out, ignore_errors=True)
    commands = {"predict": predict_command([setup.dataset_image, setup.new_image], copy, out),
                "make_report": report_command(copy), "viewer": viewer_command(copy),
                "run_pipeline": pipeline_command(setup.data, copy, setup.faithfulness_images)}
    fingerprints = {}
    for reader, argv in commands.items():
        if reader not in readers:
            continue
        finished = run_command(argv, timeout=PIPELINE_TIMEOUT if reader == "run_pipeline" else READER_TIMEOUT)
        outcome, detail = exit_verdict(finished), ""
        if outcome is None:
            if reader == "run_pipeline":
                identical, detail = compare_with_reference(copy, setup.reference, setup.reference_dir)
            else:
                try:
                    fingerprints[reader] = reader_fingerprint(reader, finished, copy, out, setup)
                except (OSError, ValueError, KeyError) as error:
                    fingerprints[reader] = f"unreadable output ({type(error).__name__}: {error})"
                identical = baseline is None or fingerprints[reader] == baseline.get(reader)
                detail = "same output as on the untouched copy" if identical else \
                    f"output differs from the untouched copy's: {str(fingerprints[reader])[:300]}"
                if reader == "viewer" and not fingerprints[reader]:
                    identical, detail = False, "exit 0 but no fingerprint printed"
            outcome = "recovered" if identical else "silent_wrong"
        # Temporaries are counted after the reader: in the run folder, in predict.py's --out and beside it (its
        # staging folder is made in --out's parent).
        leftovers = left_behind(copy, out) + sorted(str(path) for path in out.parent.glob(".*"))
        ledger.add("tamper", f"{label} | {reader}", finished, outcome, detail, leftovers)
    return fingerprints


def each_file_once() -> list[tuple[str, str]]:
    """Every run file once, the tamperings taken in turn (swapping with the other fold only where it has one)."""
    plan = []
    for turn, (relative, other) in enumerate(run_files()):
        kinds = [kind for kind in TAMPERINGS if kind != "other_fold" or other is not None]
        plan.append((relative, kinds[turn % len(kinds)]))
    return plan


def tamper_campaign(setup: Setup, ledger: Ledger, quick: bool, readers: list[str], each_file: bool) -> None:
    print("\n== tamper: each run file of a copy of the reference truncated, flipped, swapped, deleted; then the "
          "readers", flush=True)
    base = setup.work / "tamper"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir()
    copy = base / "run"
    restore(setup, copy)
    # The readers on the untouched copy: what an exit 0 must reproduce (and a control that they work at all).
    baseline = run_readers(setup, ledger, copy, "untouched copy", None, readers)
    counterparts = dict(run_files())
    if quick:
        plan = QUICK_TAMPERINGS
    elif each_file:
        plan = each_file_once()
    else:
        plan = [(relative, kind) for relative, other in run_files() for kind in TAMPERINGS
                if kind != "other_fold" or other is not None]
    for relative, kind in plan:
        restore(setup, copy)
        other = counterparts[relative]
        TAMPERINGS[kind](copy / relative, copy / other if other else None)
        run_readers(setup, ledger, copy, f"{relative} {kind}", baseline, readers)


# ------------------------------------------------------------------------------------------------ section 4: bad input


def bad_input_campaign(setup: Setup, ledger: Ledger) -> None:
    print("\n== bad: the bad inputs of the issue", flush=True)
    base = setup.work / "bad"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir()
    copy = base / "run"

    def expect_refusal(name: str, argv: list[str], untouched: Path | None = None) -> None:
        """A case whose right answer is a one-line refusal that touches nothing."""
        before = listing(untouched) if untouched else None
        finished = run_command(argv, timeout=PIPELINE_TIMEOUT)
        outcome, detail = exit_verdict(finished), ""
        if outcome is None:
            outcome, detail = "silent_wrong", "exit 0 where a refusal was expected"
        if before is not None and listing(untouched) != before:
            detail += f"; {untouched} was changed"
            outcome = "silent_wrong" if outcome == "refused" else outcome
        ledger.add("bad", name, finished, outcome, detail, left_behind(untouched) if untouched else [])

    for name, argv in [
        ("resume with other data", pipeline_command(setup.other_data, copy, setup.faithfulness_images)),
        ("resume with --lr 0.01", pipeline_command(setup.data, copy, setup.faithfulness_images, "--lr", "0.01")),
        ("resume with --image-size 48",
         pipeline_command(setup.data, copy, setup.faithfulness_images, "--image-size", "48")),
    ]:
        restore(setup, copy)
        expect_refusal(name, argv, copy)

    # folds.json deleted: remade from the same data and options, every model skipped, the same results.
    restore(setup, copy)
    (copy / FOLDS_FILE).unlink()
    finished = run_command(pipeline_command(setup.data, copy, setup.faithfulness_images), timeout=PIPELINE_TIMEOUT)
    outcome, detail = exit_verdict(finished), ""
    if outcome is None:
        identical, detail = compare_with_reference(copy, setup.reference, setup.reference_dir)
        skipped = finished.stdout.count("complete, skipped")
        detail += f"; {skipped} of {FOLDS * len(MODEL_ORDER)} models skipped"
        outcome = "recovered" if identical else "silent_wrong"
    ledger.add("bad", "folds.json deleted, resumed", finished, outcome, detail, left_behind(copy))

    # A K-fold run into a single-split run's folder (one model script without --folds makes one: split.json and
    # a trained model; the refusal is decided by split.json alone).
    single = base / "single_split"
    made = run_command([PYTHON, str(ROOT / SCRIPT_OF_ARCH["resnet50"]), "--data-dir", str(setup.data),
                        "--output-dir", str(single), *PIPELINE_ARGS], timeout=PIPELINE_TIMEOUT)
    if made.returncode != 0:
        ledger.add("bad", "making the single-split run", made, exit_verdict(made) or "traceback",
                   "the single-split run for the next case could not be made")
    else:
        expect_refusal("K-fold run into a single-split folder",
                       pipeline_command(setup.data, single, setup.faithfulness_images), single)

    # Output paths that are files.
    blocker = base / "a_file"
    blocker.write_text("not a folder")
    expect_refusal("run_pipeline --output-dir is a file", pipeline_command(setup.data, blocker,
                                                                           setup.faithfulness_images))
    expect_refusal("run_pipeline --output-dir under a file",
                   pipeline_command(setup.data, blocker / "run", setup.faithfulness_images))
    expect_refusal("predict --out is a file", predict_command([setup.dataset_image], setup.reference_dir, blocker))
    if blocker.read_text() != "not a folder":
        ledger.cases[-1].outcome, ledger.cases[-1].detail = "silent_wrong", f"{blocker} was overwritten"

    # A float TIFF in 0..1 must score as the same picture saved as 8-bit PNG (one channel: PIL writes float
    # images as mode F only; predict.py makes RGB of it).
    gray = np.asarray(Image.open(setup.new_image).convert("L"))
    png, tiff = base / "float_check" / "as_8bit.png", base / "float_check" / "as_float.tif"
    png.parent.mkdir()
    Image.fromarray(gray).save(png)
    Image.fromarray(gray.astype(np.float32) / 255.0).save(tiff)  # mode F
    readback = np.asarray(Image.open(tiff), dtype=np.float64)
    assert np.array_equal(np.round(readback * 255), gray), "the float TIFF does not hold the 8-bit values"
    results = {}
    for name, image in (("png", png), ("tiff", tiff)):
        out = base / f"predict_{name}"
        finished = run_command(predict_command([image], setup.reference_dir, out))
        results[name] = (finished, predict_probabilities(out) if finished.returncode == 0 else None)
    finished, tiff_rows = results["tiff"]
    outcome, detail = exit_verdict(finished), ""
    if outcome is None:
        png_rows = results["png"][1]
        if png_rows is None:
            outcome, detail = "traceback", f"the 8-bit PNG itself failed: {stderr_tail(results['png'][0].stderr, 3)}"
        else:
            png_values = np.array(next(iter(png_rows.values())), dtype=float)
            tiff_values = np.array(next(iter(tiff_rows.values())), dtype=float)
            difference = float(np.max(np.abs(png_values - tiff_values)))
            outcome = "recovered" if difference <= 1e-6 else "silent_wrong"
            detail = (f"float TIFF vs 8-bit PNG: largest probability difference {difference:.3g} (PNG "
                      f"{png_values.tolist()}, TIFF {tiff_values.tolist()})")
    ledger.add("bad", "float TIFF in 0..1 to predict.py", finished, outcome, detail,
               left_behind(base / "predict_tiff") + sorted(str(path) for path in base.glob(".*")))

    # Two images of one file name in two folders: two rows, two overlays, none overwritten.
    pair = [base / "same_name" / folder / "image.png" for folder in ("a", "b")]
    for path, source in zip(pair, (setup.dataset_image, setup.new_image)):
        path.parent.mkdir(parents=True)
        shutil.copy2(source, path)
    out = base / "predict_same_name"
    finished = run_command(predict_command(pair, setup.reference_dir, out))
    outcome, detail = exit_verdict(finished), ""
    if outcome is None:
        overlays = sorted(path.name for path in out.glob("*_gradcam.png"))
        rows = predict_probabilities(out)
        outcome = "recovered" if len(overlays) == 2 and len(rows) == 2 else "silent_wrong"
        detail = f"overlays {overlays}, {len(rows)} row(s) in {PREDICTIONS_CSV}"
    ledger.add("bad", "two images of one name to predict.py", finished, outcome, detail,
               left_behind(out) + sorted(str(path) for path in base.glob(".*")))

    # An undecodable PNG in report/: the viewer starts, with a WARNING naming it.
    restore(setup, copy)
    (copy / REPORT_DIR / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    finished = run_command(viewer_command(copy))
    outcome, detail = exit_verdict(finished), ""
    if outcome is None:
        warned = any(line.startswith("WARNING") and "broken.png" in line for line in finished.stdout.splitlines())
        outcome = "recovered" if warned else "silent_wrong"
        detail = "started, with a WARNING naming broken.png" if warned else "started without a WARNING"
    ledger.add("bad", "undecodable PNG in report/, viewer", finished, outcome, detail, left_behind(copy))


# ------------------------------------------------------------------------------------------------ main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, help="where the data and runs go (default: a new temporary folder)")
    parser.add_argument("--out", type=Path, help="the JSON of tables and cases (default: WORK/fault_campaign.json)")
    parser.add_argument("--quick", action="store_true", help="fold 1's model stages only in the kill section, a "
                        f"subset of {len(QUICK_TAMPERINGS)} tamperings covering every kind of file and tampering")
    parser.add_argument("--each-file", action="store_true", help=f"the tamper section: every one of the "
                        f"{len(run_files())} run files once, the tamperings in turn (default: every file with every "
                        "tampering)")
    parser.add_argument("--sections", default="kill,tamper,bad", help="which sections to run (default: all)")
    parser.add_argument("--reuse-reference", action="store_true", help="reuse the reference run an earlier "
                        "campaign left in --work-dir, if made by the same command (default: make it anew)")
    parser.add_argument("--readers", default=",".join(READERS), help="which readers the tamper section runs after "
                        "each tampering (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill delays (default: 0)")
    parser.add_argument("--faithfulness-images", type=int, default=2,
                        help="run_pipeline.py's --faithfulness-images in every run (default: 2; 0 skips the "
                             "score_explanations.py stage, the slowest on a CPU)")
    args = parser.parse_args()
    sections = [section for section in args.sections.split(",") if section]
    readers = [reader for reader in args.readers.split(",") if reader]
    if set(readers) - set(READERS):
        parser.error(f"unknown readers {sorted(set(readers) - set(READERS))}; choose from {', '.join(READERS)}")
    unknown = set(sections) - {"kill", "tamper", "bad"}
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="fault_campaign_"))
    work.mkdir(parents=True, exist_ok=True)
    out = args.out or work / "fault_campaign.json"
    started, load_at_start = time.perf_counter(), os.getloadavg()
    print(f"fault campaign in {work} ({'quick' if args.quick else 'full'}; sections {', '.join(sections)}; "
          f"load average at start {' '.join(f'{value:.2f}' for value in load_at_start)})", flush=True)

    setup = prepare(work, args.faithfulness_images, args.reuse_reference, "kill" in sections)
    ledger = Ledger()
    campaigns = {"kill": lambda: kill_campaign(setup, ledger, args.quick, args.seed),
                 "tamper": lambda: tamper_campaign(setup, ledger, args.quick, readers, args.each_file),
                 "bad": lambda: bad_input_campaign(setup, ledger)}
    for section in sections:
        campaigns[section]()

    print_tables(ledger, sections)
    print_failures(ledger)
    wall = time.perf_counter() - started
    load_at_end = os.getloadavg()
    print(f"\nwall time {wall:.0f} s; load average at start {' '.join(f'{v:.2f}' for v in load_at_start)}, at end "
          f"{' '.join(f'{v:.2f}' for v in load_at_end)}")
    summary = {"command": shlex.join([PYTHON, *sys.argv]), "quick": args.quick, "each_file": args.each_file,
               "sections": sections,
               "readers": readers,
               "seed": args.seed, "settings": {"pipeline_args": PIPELINE_ARGS, "folds": FOLDS,
                                                "faithfulness_images": args.faithfulness_images,
                                                "demo_data": DEMO_DATA_ARGS, "other_data": OTHER_DATA_ARGS},
               "reference": {key: value for key, value in setup.reference.items() if key != "pooled"}
               | {"pooled_numbers": len(setup.reference["pooled"]), "stages": [s for s, _ in setup.snapshots]},
               "tables": {section: ledger.table(section) for section in sections},
               "cases": [asdict(case) for case in ledger.cases],
               "wall_seconds": round(wall, 1), "load_average_start": load_at_start, "load_average_end": load_at_end}
    out.write_text(json.dumps(summary, indent=1))
    print(f"wrote {out}")
    return 1 if any(case.is_failure for case in ledger.cases) else 0


if __name__ == "__main__":
    sys.exit(main())
