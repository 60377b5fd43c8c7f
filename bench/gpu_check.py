"""The GPU path, executed once, end to end, with figures: one command for a short loan of a GPU machine.

    python bench/gpu_check.py /tmp/gpu_check                            # one CUDA GPU, under 8 minutes on an H100
    python bench/gpu_check.py $OUT --work-dir /tmp/gpu_check_run         # small summary in $OUT, bulk elsewhere
    python bench/gpu_check.py /tmp/gpu_check_dry --dry-run               # the same stages on the CPU, tiny sizes

Writes OUT_DIR/gpu_check.json (machine, each stage's status and seconds, each figure, each check) and
OUT_DIR/gpu_check.md (the tables, to paste into the README with the card's name), and prints the markdown.
The bulky files (synthetic data, runs, stage logs) go to --work-dir (default OUT_DIR/run).

Stages, each a subprocess as run_pipeline.py starts them, with its wall time and exit status; a failed stage is
recorded and the check goes on with every stage that does not need it:

1. environment (versions, GPU, autocast dtype) and synthetic BreaKHis-like data at 700x460 (a process pool);
2. the three model scripts (random init, 2 epochs, default AMP, --cache disk), --heatmaps-only, torchrun
   (one process), cancer_class_further.py, predict.py on a few images, make_report.py;
3. the same scripts with --cache none (the plain DataLoader path), then per model bench/gpu_measure.py: a
   minimal torchvision training loop on the same images, the batch sources alone, Grad-CAM vs plain inference;
4. checks, in this process, on the CPU: every file loads (weights_only / allow_pickle=False) and no checkpoint
   tensor was saved from device memory; the stored maps agree with a CPU recomputation; no NaN; AMP recorded.

GPU utilisation is sampled with nvidia-smi in a background thread (this process never initialises CUDA, so the
stages have the GPU to themselves); where nvidia-smi is missing or fails, that is recorded instead.
"""

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import Pool
from pathlib import Path

import _timing  # noqa: F401  (puts the repository root on sys.path)
from gpu_check_checks import run_checks
from gpu_check_report import collect_figures, markdown_summary, read_json

from common.core.fileio import write_json, write_text
from common.data.demo import make_demo_dataset
from common.models.registry import ARCHS
from common.training.config import DEFAULTS

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
ARCH_SCRIPTS = {arch: spec.script for arch, spec in ARCHS.items()}
MIN_STAGE_SECONDS = 20  # a stage is not started with less of the time budget left
LOG_TAIL_LINES = 15  # of a failed stage's output, kept in gpu_check.json
NVIDIA_SMI_QUERY = ("nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits", "--id=0")


@dataclass(frozen=True)
class Settings:
    device: str
    data: dict  # make_demo_dataset options
    image_size: int
    epochs: int
    batch_size: int
    workers: int  # DataLoader workers, for the scripts and the plain loop alike
    repeat_archs: tuple  # models measured again: --cache none, --heatmaps-only, gpu_measure.py
    torchrun_arch: str
    predict_images: int
    cam_check_images: int
    gradcam_repeats: int
    budget_seconds: float  # the whole check, data included; later stages are skipped when it is spent
    stage_limit_seconds: float


# An H100 trains ResNet-50 (AMP, 224 px) at ~2,000-3,000 images/s and VGG-16 at ~800: the ~1,400 training images
# take seconds per epoch; start-up, cache builds, exports and checkpoint writes dominate. Estimate: data ~30 s,
# 3 cached runs ~90 s, 3 heatmaps-only ~40 s, torchrun ~25 s, 3 plain-path runs ~60 s, further/predict/report
# ~30 s, 3 measurements ~60 s, checks ~20 s: about 6 minutes; no stage starts after 7 (checks ~20 s follow).
FULL = Settings(device="cuda", data=dict(patients_per_class=16, images_per_patient=16,
                                         magnifications=("40", "100", "200", "400"), width=700, height=460),
                image_size=224, epochs=2, batch_size=32, workers=DEFAULTS["workers"],
                repeat_archs=tuple(ARCH_SCRIPTS), torchrun_arch="resnet50", predict_images=8, cam_check_images=8,
                gradcam_repeats=5, budget_seconds=420, stage_limit_seconds=150)
# The smallest run of every stage: 48 images of 70x46, 32 px, one epoch; the repeated measurements for one
# model (DenseNet-121, the quickest on a CPU; VGG-16 writes 2 GB of checkpoints per run).
DRY_RUN = Settings(device="cpu", data=dict(patients_per_class=4, images_per_patient=3, magnifications=("100", "400"),
                                           width=70, height=46),
                   image_size=32, epochs=1, batch_size=8, workers=0, repeat_archs=("densenet121",),
                   torchrun_arch="densenet121", predict_images=2, cam_check_images=4, gradcam_repeats=1,
                   budget_seconds=1200, stage_limit_seconds=600)


# ------------------------------------------------------------------------------------------- GPU sampler


class GpuSampler(threading.Thread):
    """Samples utilization.gpu and memory.used with nvidia-smi every `interval` s, tagged with the running stage."""

    def __init__(self, interval: float = 0.5, command: tuple = NVIDIA_SMI_QUERY):
        super().__init__(daemon=True)
        self.interval, self.command, self.stage, self.samples, self.problem = interval, command, None, [], None
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            stage = self.stage
            try:
                line = subprocess.run(self.command, capture_output=True, text=True, timeout=10, check=True).stdout
                utilisation, memory = (float(value) for value in line.strip().split(","))
            except (OSError, subprocess.SubprocessError, ValueError) as error:
                self.problem = f"nvidia-smi failed ({type(error).__name__}: {error}); sampling stopped"
                return
            if stage is not None:
                self.samples.append((stage, utilisation, memory))

    def summary(self, stage: str) -> dict | None:
        values = [(u, m) for name, u, m in self.samples if name == stage]
        if not values:
            return None
        return {"utilisation_mean": round(sum(u for u, _ in values) / len(values), 1),
                "utilisation_max": max(u for u, _ in values), "memory_max_mib": max(m for _, m in values),
                "samples": len(values)}


# ------------------------------------------------------------------------------------------------ stages


@dataclass
class Stages:
    """Runs stages in order, each with its wall time, status and log; skips those whose inputs failed."""
    log_dir: Path
    deadline: float  # time.monotonic() after which no stage starts
    limit: float
    sampler: GpuSampler | None
    progress_path: Path | None = None  # the stages so far, rewritten after each: a killed check still tells
    started: float = field(default_factory=time.monotonic)
    results: dict = field(default_factory=dict)

    def passed(self, name: str) -> bool:
        return self.results.get(name, {}).get("status") == "passed"

    def _skip_reason(self, needs) -> str | None:
        missing = [name for name in needs if not self.passed(name)]
        if missing:
            return f"skipped: needs {', '.join(missing)}"
        if self.deadline - time.monotonic() < MIN_STAGE_SECONDS:
            return "skipped: time budget spent"
        return None

    def run(self, name: str, command: list[str], *, needs=()) -> bool:
        if reason := self._skip_reason(needs):
            return self._record(name, {"status": reason, "seconds": 0.0})
        limit = min(self.limit, self.deadline - time.monotonic())
        print(f"[{time.monotonic() - self.started:5.0f} s] {name}: {' '.join(map(str, command))}", flush=True)
        log_path = self.log_dir / f"{name.replace(':', '_')}.log"
        if self.sampler:
            self.sampler.stage = name
        started, cpu_before = time.perf_counter(), children_cpu_seconds()
        try:
            exit_status = run_logged(command, log_path, timeout=limit)
            status = "passed" if exit_status == 0 else "failed"
        except subprocess.TimeoutExpired:
            exit_status, status = None, f"timed out after {limit:.0f} s"
        finally:
            if self.sampler:
                self.sampler.stage = None
        result = {"status": status, "seconds": round(time.perf_counter() - started, 1),
                  "cpu_seconds": round(children_cpu_seconds() - cpu_before, 1), "exit_status": exit_status,
                  "command": " ".join(map(str, command)), "log": str(log_path)}
        if status != "passed":
            result["log_tail"] = log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        if self.sampler and (gpu := self.sampler.summary(name)):
            result["gpu"] = gpu
        return self._record(name, result)

    def run_here(self, name: str, work, *, needs=()) -> object:
        """A stage run in this process (no CUDA in it); its exception is recorded, not raised."""
        if reason := self._skip_reason(needs):
            self._record(name, {"status": reason, "seconds": 0.0})
            return None
        print(f"[{time.monotonic() - self.started:5.0f} s] {name}", flush=True)
        started = time.perf_counter()
        try:
            value, status, detail = work(), "passed", {}
        except Exception as error:  # recorded; the stages that do not need this one still run
            value, status, detail = None, "failed", {"error": f"{type(error).__name__}: {error}"}
        self._record(name, {"status": status, "seconds": round(time.perf_counter() - started, 1), **detail})
        return value

    def _record(self, name: str, result: dict) -> bool:
        self.results[name] = result
        if self.progress_path:
            write_json(self.progress_path, {"partial": True, "stages": self.results})
        tail = "".join(f"\n      {line}" for line in result.get("log_tail", [])[-5:])
        print(f"        {name}: {result['status']} ({result['seconds']} s){tail}", flush=True)
        return result["status"] == "passed"


def children_cpu_seconds() -> float:
    """User + system CPU seconds of every finished child process so far (a stage's CPU cost is the difference)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_logged(command: list[str], log_path: Path, *, timeout: float) -> int:
    """Exit status of `command`, output to `log_path`; on timeout its whole process group is killed (torchrun's
    workers too) and TimeoutExpired raised."""
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=environment,
                                   start_new_session=True)
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise


# -------------------------------------------------------------------------------------------------- data


def _write_part(task: tuple) -> int:
    out_dir, patient_index, magnification, seed, data = task
    make_demo_dataset(out_dir, **{**data, "patients_per_class": 1, "magnifications": (magnification,)},
                      first_patient=patient_index, seed=seed)
    return 2 * data["images_per_patient"]


def make_data(data_dir: Path, data: dict) -> dict:
    """The synthetic BreaKHis tree, one (patient, magnification) per task over a process pool; reused when a
    complete one with the same options is there."""
    marker = data_dir / "complete.json"
    if marker.is_file() and json.loads(marker.read_text()) == json.loads(json.dumps(data)):
        return {"reused": str(data_dir)}
    shutil.rmtree(data_dir, ignore_errors=True)
    tasks = [(data_dir, patient, magnification, 1000 * patient + index, data)
             for patient in range(data["patients_per_class"])
             for index, magnification in enumerate(data["magnifications"])]
    started = time.perf_counter()
    processes = min(len(tasks), os.cpu_count() or 1)
    with Pool(processes) as pool:
        images = sum(pool.map(_write_part, tasks, chunksize=1))
    seconds = time.perf_counter() - started
    write_json(marker, data)
    return {"images": images, "size": f"{data['width']}x{data['height']}", "processes": processes,
            "seconds": round(seconds, 1), "images_per_second": round(images / seconds, 1)}


# ------------------------------------------------------------------------------------------------ commands


@dataclass(frozen=True)
class Layout:
    """Where the bulky files of one check go (the summary files go to OUT_DIR itself)."""
    work_dir: Path

    @property
    def data(self) -> Path:
        return self.work_dir / "data"

    @property
    def logs(self) -> Path:
        return self.work_dir / "logs"

    @property
    def predictions(self) -> Path:
        return self.work_dir / "predictions"

    def run(self, name: str) -> Path:
        return self.work_dir / "runs" / name


def model_arguments(settings: Settings, layout: Layout, run_name: str) -> list[str]:
    return ["--data-dir", str(layout.data), "--output-dir", str(layout.run(run_name)), "--weights", "none",
            "--image-size", str(settings.image_size), "--epochs", str(settings.epochs),
            "--batch-size", str(settings.batch_size), "--workers", str(settings.workers), "--device", settings.device]


def script(arch: str) -> str:
    return str(ROOT / ARCH_SCRIPTS[arch])


def spread_images(data_dir: Path, count: int) -> list[Path]:
    """`count` PNGs spread over the sorted tree (both classes, several patients)."""
    images = sorted(data_dir.rglob("*.png"))
    return images[::max(1, len(images) // count)][:count]


def pipeline_stages(stages: Stages, settings: Settings, layout: Layout) -> None:
    """The user's path on the GPU: three cached runs, heatmaps-only, further, predict, report, torchrun."""
    python, main_run = sys.executable, layout.run("main")
    for arch in ARCH_SCRIPTS:
        stages.run(f"train:{arch}", [python, script(arch), *model_arguments(settings, layout, "main"),
                                     "--cache", "disk"], needs=["data"])
    for arch in settings.repeat_archs:  # before further: the report refuses heatmap files changed after it
        stages.run(f"heatmaps-only:{arch}", [python, script(arch), *model_arguments(settings, layout, "main"),
                                             "--cache", "disk", "--heatmaps-only"], needs=[f"train:{arch}"])
    stages.run("further", [python, str(ROOT / "cancer_class_further.py"), "--output-dir", str(main_run),
                           "--device", settings.device], needs=[f"train:{arch}" for arch in ARCH_SCRIPTS])
    stages.run("predict", [python, str(ROOT / "predict.py"), "--output-dir", str(main_run), "--device",
                           settings.device, "--out", str(layout.predictions),
                           *map(str, spread_images(layout.data, settings.predict_images))], needs=["further"])
    stages.run("report", [python, str(ROOT / "make_report.py"), "--output-dir", str(main_run)], needs=["further"])
    arch = settings.torchrun_arch
    stages.run(f"torchrun:{arch}", [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                                    script(arch), *model_arguments(settings, layout, "torchrun"), "--cache", "disk",
                                    "--overlays", "0"], needs=["data"])


def measurement_stages(stages: Stages, settings: Settings, layout: Layout) -> None:
    """Throughput of the plain DataLoader path, then the in-process measurements of bench/gpu_measure.py."""
    python = sys.executable
    for arch in settings.repeat_archs:
        stages.run(f"train-nocache:{arch}", [python, script(arch), *model_arguments(settings, layout, "nocache"),
                                             "--cache", "none", "--overlays", "0"], needs=["data"])
    for arch in settings.repeat_archs:
        stages.run(f"measure:{arch}", [python, str(HERE / "gpu_measure.py"), "measure",
                                       str(layout.work_dir / f"measure_{arch}.json"), "--arch", arch,
                                       "--run-dir", str(layout.run("main")), "--device", settings.device,
                                       "--batch-size", str(settings.batch_size), "--workers", str(settings.workers),
                                       "--epochs", str(settings.epochs),
                                       "--repeats", str(settings.gradcam_repeats)], needs=[f"train:{arch}"])


# ------------------------------------------------------------------------------------------------- main


def run_check(settings: Settings, layout: Layout, *, mode: str, progress_path: Path) -> dict:
    started = time.monotonic()
    shutil.rmtree(layout.work_dir / "runs", ignore_errors=True)  # a fresh run each time; the data is reused
    shutil.rmtree(layout.predictions, ignore_errors=True)
    layout.logs.mkdir(parents=True, exist_ok=True)
    sampler = GpuSampler() if settings.device == "cuda" else None
    if sampler:
        sampler.start()
    stages = Stages(layout.logs, deadline=started + settings.budget_seconds, limit=settings.stage_limit_seconds,
                    sampler=sampler, progress_path=progress_path)
    stages.run("environment", [sys.executable, str(HERE / "gpu_measure.py"), "environment",
                               str(layout.work_dir / "environment.json"), "--device", settings.device])
    data_figures = stages.run_here("data", lambda: make_data(layout.data, settings.data))
    pipeline_stages(stages, settings, layout)
    measurement_stages(stages, settings, layout)
    checks = stages.run_here("checks", lambda: run_checks(
        runs_dir=layout.work_dir / "runs", main_run=layout.run("main"), archs=tuple(ARCH_SCRIPTS),
        expect_device=settings.device, cam_images=settings.cam_check_images, predictions_dir=layout.predictions))
    if sampler:
        sampler.stopped.set()
    try:
        figures = collect_figures(layout.work_dir, repeat_archs=settings.repeat_archs, epochs=settings.epochs,
                                  torchrun_arch=settings.torchrun_arch, data=data_figures)
    except Exception as error:  # the stages' and checks' results must still be written
        figures = {"error": f"{type(error).__name__}: {error}"}
    summary = {
        "mode": mode, "settings": asdict(settings), "total_seconds": round(time.monotonic() - started, 1),
        "machine": read_json(layout.work_dir / "environment.json"),
        "gpu_sampling": "off (CPU)" if sampler is None else sampler.problem or f"{len(sampler.samples)} samples",
        "stages": stages.results,
        "figures": figures,
        "checks": checks or {},
    }
    summary["failures"] = [f"stage {name}: {result['status']}" for name, result in stages.results.items()
                           if result["status"] != "passed"] + \
                          [f"check {name}" for name, result in summary["checks"].items() if not result.get("passed")]
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="gpu_check.json and gpu_check.md are written here")
    parser.add_argument("--work-dir", help="data, runs and stage logs (default OUT_DIR/run)")
    parser.add_argument("--dry-run", action="store_true", help="every stage on the CPU at tiny sizes (the test suite)")
    parser.add_argument("--budget-seconds", type=float, help="no stage starts after this (default 420; dry run 1200)")
    args = parser.parse_args()
    settings = DRY_RUN if args.dry_run else FULL
    if args.budget_seconds:
        settings = replace(settings, budget_seconds=args.budget_seconds)
    out_dir = Path(args.out_dir)
    layout = Layout(Path(args.work_dir) if args.work_dir else out_dir / "run")
    summary = run_check(settings, layout, mode="dry run (CPU)" if args.dry_run else "GPU",
                        progress_path=out_dir / "gpu_check.json")
    write_json(out_dir / "gpu_check.json", summary)
    markdown = markdown_summary(summary)
    write_text(out_dir / "gpu_check.md", markdown)
    print("\n" + markdown)
    print(f"written: {out_dir / 'gpu_check.json'}, {out_dir / 'gpu_check.md'}")
    sys.exit(1 if summary["failures"] else 0)


if __name__ == "__main__":
    main()
