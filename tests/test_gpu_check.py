"""bench/gpu_check.py --dry-run: every stage of the GPU check runs on the CPU at tiny sizes, so the script that
a short GPU loan depends on cannot rot unnoticed. One run (a few minutes on 2 CPU cores), several assertions."""

import json
import os
import subprocess
import sys
import time

import pytest

EXPECTED_STAGES = ["environment", "data", "train:densenet121", "train:resnet50", "train:vgg16",
                   "heatmaps-only:densenet121", "further", "predict", "report", "torchrun:densenet121",
                   "train-nocache:densenet121", "measure:densenet121", "checks"]
EXPECTED_CHECKS = ["files_load", "cam_agreement:densenet121", "cam_agreement:resnet50", "cam_agreement:vgg16",
                   "finite", "amp_recorded"]


@pytest.fixture(scope="module")
def dry_run(repo_root, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("gpu_check")
    finished = subprocess.run([sys.executable, str(repo_root / "bench" / "gpu_check.py"), str(out_dir), "--dry-run"],
                              capture_output=True, text=True, timeout=1500)
    summary_path = out_dir / "gpu_check.json"
    assert summary_path.is_file(), f"no summary written:\n{finished.stdout[-3000:]}\n{finished.stderr[-3000:]}"
    for state in (out_dir / "run").rglob("training_state_*.pth"):  # --resume states, ~2 GB with VGG-16's; unused
        state.unlink()
    return finished, json.loads(summary_path.read_text()), out_dir


def test_dry_run_passes_every_stage_in_order(dry_run):
    finished, summary, _ = dry_run
    statuses = {name: result["status"] for name, result in summary["stages"].items()}
    assert list(statuses) == EXPECTED_STAGES
    assert set(statuses.values()) == {"passed"}, summary["stages"]
    assert summary["failures"] == [] and finished.returncode == 0


def test_dry_run_has_every_check_passed(dry_run):
    _, summary, _ = dry_run
    assert list(summary["checks"]) == EXPECTED_CHECKS
    assert all(check["passed"] for check in summary["checks"].values()), summary["checks"]
    # On the CPU, export and recomputation are both float32 on the same device: they agree far inside the tolerance.
    for arch in ("densenet121", "resnet50", "vgg16"):
        assert summary["checks"][f"cam_agreement:{arch}"]["max_map_error"] < 1e-3
    # 3 best checkpoints + 2 final MLPs at least (a finished run removes its training states)
    assert summary["checks"]["files_load"]["loaded"][".pth"] >= 5


def test_dry_run_reports_each_figure(dry_run):
    _, summary, out_dir = dry_run
    figures = summary["figures"]
    measured = figures["models"]["densenet121"]
    for key in ("cached_images_per_second", "plain_path_images_per_second", "torchvision_loop_images_per_second",
                "cached_over_loop", "cached_over_plain"):
        assert measured[key] > 0, key
    assert set(measured["gradcam"]["ms_per_batch"]) >= {"plain", "ours", "full"}
    assert measured["data_only"]["cached_images_per_second"] > 0
    assert figures["models"]["vgg16"]["cached_images_per_second"] > 0
    assert figures["torchrun"]["images_per_second"] > 0
    assert figures["data"]["images"] == 48
    markdown = (out_dir / "gpu_check.md").read_text()
    assert "| densenet121 |" in markdown and "0 failure(s)" in markdown


# ------------------------------------------------------------------ the stage runner and the sampler, in seconds


@pytest.fixture(scope="module")
def gpu_check(repo_root):
    sys.path.insert(0, str(repo_root / "bench"))
    import gpu_check
    return gpu_check


def new_stages(gpu_check, tmp_path, *, budget=60.0, limit=30.0):
    return gpu_check.Stages(tmp_path, deadline=time.monotonic() + budget, limit=limit, sampler=None)


def test_failed_stage_is_recorded_and_only_its_dependants_are_skipped(gpu_check, tmp_path):
    stages = new_stages(gpu_check, tmp_path)
    stages.run("broken", [sys.executable, "-c", "import sys; print('step 1'); sys.exit('error: no GPU here')"])
    stages.run("needs-broken", [sys.executable, "-c", "pass"], needs=["broken"])
    stages.run("independent", [sys.executable, "-c", "print('fine')"])
    broken = stages.results["broken"]
    assert broken["status"] == "failed" and broken["exit_status"] == 1
    assert broken["log_tail"] == ["step 1", "error: no GPU here"]
    assert stages.results["needs-broken"]["status"] == "skipped: needs broken"
    assert stages.results["independent"]["status"] == "passed"


def test_stage_past_its_limit_is_killed_with_its_children_and_recorded(gpu_check, tmp_path):
    stages = new_stages(gpu_check, tmp_path, limit=2.0)
    child_pid_file = tmp_path / "child.pid"
    # A launcher whose own child would outlive it (as torchrun's workers would) unless the whole group is killed.
    launcher = ("import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', "
                "'import time; time.sleep(60)']); open(sys.argv[1], 'w').write(str(child.pid)); time.sleep(60)")
    stages.run("slow", [sys.executable, "-c", launcher, str(child_pid_file)])
    assert stages.results["slow"]["status"] == "timed out after 2 s"
    child_pid = int(child_pid_file.read_text())
    for _ in range(50):  # the killed child is reaped by init shortly after
        if not os.path.exists(f"/proc/{child_pid}") or "Z" in open(f"/proc/{child_pid}/stat").read().split()[2]:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the stage's child process survived the timeout")


def test_no_stage_starts_once_the_budget_is_spent(gpu_check, tmp_path):
    stages = new_stages(gpu_check, tmp_path, budget=gpu_check.MIN_STAGE_SECONDS - 1)
    assert not stages.run("late", [sys.executable, "-c", "pass"])
    assert stages.results["late"]["status"] == "skipped: time budget spent"
    assert stages.run_here("late-here", lambda: 1) is None


def test_in_process_stage_records_its_exception(gpu_check, tmp_path):
    stages = new_stages(gpu_check, tmp_path)
    assert stages.run_here("data", lambda: 1 / 0) is None
    assert stages.results["data"]["status"] == "failed"
    assert "ZeroDivisionError" in stages.results["data"]["error"]


def test_gpu_sampler_without_nvidia_smi_records_why_and_stops(gpu_check):
    sampler = gpu_check.GpuSampler(interval=0.01, command=("no-such-nvidia-smi-here",))
    sampler.start()
    sampler.join(timeout=10)
    assert not sampler.is_alive()
    assert sampler.problem.startswith("nvidia-smi failed (FileNotFoundError")


def test_gpu_sampler_tags_samples_with_the_running_stage(gpu_check):
    fake_nvidia_smi = (sys.executable, "-c", "print('57, 1234')")  # utilisation %, memory MiB, as nvidia-smi prints
    sampler = gpu_check.GpuSampler(interval=0.01, command=fake_nvidia_smi)
    sampler.stage = "train:resnet50"
    sampler.start()
    while len(sampler.samples) < 2 and sampler.is_alive():
        time.sleep(0.05)
    sampler.stopped.set()
    sampler.join(timeout=10)
    assert sampler.summary("train:resnet50") == {"utilisation_mean": 57.0, "utilisation_max": 57.0,
                                                 "memory_max_mib": 1234.0, "samples": len(sampler.samples)}
    assert sampler.summary("report") is None and sampler.problem is None


def test_summary_renders_failed_parts_as_their_errors(gpu_check, tmp_path):
    import gpu_check_report

    log = tmp_path / "runs" / "main" / "train_log_resnet50.jsonl"
    log.parent.mkdir(parents=True)
    log.write_text("".join(json.dumps({"epoch": epoch, "train_images_per_second": rate}) + "\n"
                           for epoch, rate in ((1, 900.0), (2, 2400.0))))
    (tmp_path / "measure_resnet50.json").write_text(json.dumps({
        "plain_loop": {"error": "RuntimeError: CUDA error: out of memory"}, "data_only": {"error": "x"},
        "gradcam": {"error": "RuntimeError: cuDNN error"}}))
    figures = gpu_check_report.collect_figures(tmp_path, repeat_archs=("resnet50",), epochs=2,
                                               torchrun_arch="resnet50", data=None)
    assert figures["models"]["resnet50"]["cached_images_per_second"] == 2400.0  # epoch 2, after warm-up
    assert figures["models"]["resnet50"]["torchvision_loop_images_per_second"] is None
    summary = {"mode": "GPU", "total_seconds": 1.0, "machine": None, "gpu_sampling": "off", "figures": figures,
               "settings": {"image_size": 224, "batch_size": 32, "epochs": 2, "workers": 8,
                            "torchrun_arch": "resnet50"},
               "stages": {"train:resnet50": {"status": "failed", "seconds": 3.0, "cpu_seconds": 1.0}},
               "checks": {"finite": {"passed": False, "error": "KeyError: 'cams'"}},
               "failures": ["stage train:resnet50: failed", "check finite"]}
    markdown = gpu_check_report.markdown_summary(summary)
    assert "RuntimeError: cuDNN error" in markdown and "- check finite" in markdown
    assert "| resnet50 | 2,400 |" in markdown
    summary["figures"] = {"error": "KeyError: 'models'"}
    assert "Figures could not be read: KeyError: 'models'" in gpu_check_report.markdown_summary(summary)
