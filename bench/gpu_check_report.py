"""The figures of bench/gpu_check.py, read from the runs' files, and its markdown summary."""

import json
from pathlib import Path

ARCH_ORDER = ("densenet121", "resnet50", "vgg16")
GRADCAM_TARGET = 1.10  # ours / plain inference, as on the CPU


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def logged_rate(log_path: Path, epoch: int) -> float | None:
    """train_images_per_second of `epoch` in a train_log_<arch>.jsonl (the last epoch: after warm-up)."""
    try:
        rows = [json.loads(line) for line in Path(log_path).read_text().splitlines()]
    except (OSError, ValueError):
        return None
    return next((row["train_images_per_second"] for row in rows if row["epoch"] == epoch), None)


def ratio(numerator, denominator) -> float | None:
    return round(numerator / denominator, 2) if numerator and denominator else None


def model_figures(work_dir: Path, arch: str, *, epochs: int, measured: bool) -> dict:
    runs = work_dir / "runs"
    cached = logged_rate(runs / "main" / f"train_log_{arch}.jsonl", epochs)
    row = {"cached_images_per_second": cached}
    if not measured:
        return row
    plain = logged_rate(runs / "nocache" / f"train_log_{arch}.jsonl", epochs)
    measure = read_json(work_dir / f"measure_{arch}.json") or {}
    loop = measure.get("plain_loop") or {}
    row.update(plain_path_images_per_second=plain, torchvision_loop_images_per_second=loop.get("images_per_second"),
               torchvision_loop_data_wait_share=loop.get("data_wait_share"),
               cached_over_loop=ratio(cached, loop.get("images_per_second")),
               plain_over_loop=ratio(plain, loop.get("images_per_second")), cached_over_plain=ratio(cached, plain),
               data_only=measure.get("data_only"), gradcam=measure.get("gradcam"))
    return row


def collect_figures(work_dir: Path, *, repeat_archs: tuple, epochs: int, torchrun_arch: str, data: dict | None) -> dict:
    models = {arch: model_figures(work_dir, arch, epochs=epochs, measured=arch in repeat_archs) for arch in ARCH_ORDER}
    torchrun_rate = logged_rate(work_dir / "runs" / "torchrun" / f"train_log_{torchrun_arch}.jsonl", epochs)
    return {"epoch_measured": epochs, "data": data, "models": models,
            "torchrun": {"arch": torchrun_arch, "images_per_second": torchrun_rate}}


# ------------------------------------------------------------------------------------------------ markdown


def cell(value, suffix: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}{suffix}" if abs(value) < 10 else f"{value:,.0f}{suffix}"
    return f"{value}{suffix}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(row) + " |" for row in rows)]


def machine_line(summary: dict) -> str:
    machine = summary.get("machine") or {}
    cuda = machine.get("cuda") if isinstance(machine.get("cuda"), dict) else {}
    card = cuda.get("gpu") or ("CPU" if summary["mode"].startswith("dry") else "GPU unknown")
    parts = [f"**{card}**", f"torch {machine.get('torch', '?')}", f"CUDA {machine.get('cuda_build')}",
             f"cuDNN {cuda.get('cudnn', '-')}", f"NCCL {cuda.get('nccl', '-')}",
             f"autocast {cuda.get('autocast_dtype', 'off')}", f"{machine.get('cpu_count', '?')} CPU cores",
             f"driver: {machine.get('nvidia_smi', '-')}"]
    return ", ".join(parts)


def stage_rows(summary: dict) -> list[list[str]]:
    rows = []
    for name, result in summary["stages"].items():
        gpu = result.get("gpu") or {}
        rows.append([name, result["status"], cell(result["seconds"]), cell(result.get("cpu_seconds")),
                     f"{cell(gpu.get('utilisation_mean'))} / {cell(gpu.get('utilisation_max'))}" if gpu else "-",
                     cell(gpu.get("memory_max_mib"))])
    return rows


def throughput_rows(figures: dict) -> list[list[str]]:
    rows = []
    for arch, row in figures["models"].items():
        data_only = row.get("data_only") or {}
        rows.append([arch, cell(row["cached_images_per_second"]), cell(row.get("plain_path_images_per_second")),
                     cell(row.get("torchvision_loop_images_per_second")), cell(row.get("cached_over_loop"), "x"),
                     cell(row.get("plain_over_loop"), "x"), cell(row.get("cached_over_plain"), "x"),
                     cell(row.get("torchvision_loop_data_wait_share")),
                     f"{cell(data_only.get('cached_images_per_second'))} / "
                     f"{cell(data_only.get('plain_images_per_second'))}"])
    return rows


def gradcam_rows(figures: dict) -> list[list[str]]:
    rows = []
    for arch, row in figures["models"].items():
        gradcam = row.get("gradcam")
        if not gradcam or "error" in gradcam:
            rows.append([arch, *["-"] * 7, (gradcam or {}).get("error", "not measured")])
            continue
        ms = gradcam["ms_per_batch"]
        met = "met" if gradcam["ours_over_plain"] <= GRADCAM_TARGET else "MISSED"
        rows.append([arch, cell(ms["plain"]), cell(ms["ours"]), cell(ms["full"]), cell(ms.get("pytorch_grad_cam")),
                     f"{gradcam['ours_over_plain']:.3f}x ({met})", cell(gradcam["full_over_ours"], "x"),
                     cell(gradcam.get("pytorch_grad_cam_over_ours"), "x"), gradcam["pytorch_grad_cam"]])
    return rows


def check_rows(summary: dict) -> list[list[str]]:
    rows = []
    for name, result in summary["checks"].items():
        detail = {key: value for key, value in result.items() if key != "passed" and value not in ([], {}, None)}
        rows.append([name, "passed" if result.get("passed") else "FAILED", json.dumps(detail)[:300]])
    return rows


def markdown_summary(summary: dict) -> str:
    figures, settings = summary["figures"], summary["settings"]
    if "error" in figures:
        figures = {"error": figures["error"], "epoch_measured": settings["epochs"], "data": None, "models": {},
                   "torchrun": {"arch": settings["torchrun_arch"], "images_per_second": None}}
    data = figures.get("data") or {}
    lines = [f"# GPU check ({summary['mode']}): {len(summary['failures'])} failure(s), {summary['total_seconds']} s",
             "", machine_line(summary), "",
             f"Synthetic data: {cell(data.get('images'))} images of {data.get('size', '?')} px written in "
             f"{cell(data.get('seconds'))} s by {cell(data.get('processes'))} processes. Models: random init, "
             f"{settings['image_size']} px, batch {settings['batch_size']}, {settings['epochs']} epoch(s), "
             f"{settings['workers']} workers; GPU sampling: {summary['gpu_sampling']}.", "", "## Stages", "",
             *table(["stage", "status", "seconds", "CPU seconds", "GPU util mean / max %", "GPU memory max MiB"],
                    stage_rows(summary)),
             *([f"Figures could not be read: {figures['error']}", ""] if "error" in figures else []),
             "", f"## Training throughput (images/s, epoch {figures['epoch_measured']}; torchrun "
             f"{figures['torchrun']['arch']}: {cell(figures['torchrun']['images_per_second'])})", "",
             *table(["model", "cached (--cache disk)", "plain path (--cache none)", "torchvision loop",
                     "cached / loop", "plain / loop", "cached / plain", "loop data-wait share",
                     "batches alone: cached / plain"], throughput_rows(figures)),
             "", f"## Grad-CAM vs plain inference (ms per batch of {settings['batch_size']}, float32, median)", "",
             *table(["model", "plain", "ours", "full backward", "pytorch-grad-cam", "ours / plain (<= 1.10)",
                     "full / ours", "pytorch-grad-cam / ours", "pytorch-grad-cam"], gradcam_rows(figures)),
             "", "## Checks", "", *table(["check", "result", "detail"], check_rows(summary)), ""]
    if summary["failures"]:
        lines += ["## Failures", "", *(f"- {failure}" for failure in summary["failures"]), ""]
    return "\n".join(lines)
