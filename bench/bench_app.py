"""How fast the viewer (app.py) answers, with the app's own functions: one uploaded image through the three CNNs
and the final MLP with its maps and overlays, and one stored test image opened from Browse.

    python bench/bench_app.py                       # trains a 224 px run (random init, 1 epoch) in a temp dir
    python bench/bench_app.py --run-dir runs/x      # that run (trained there first when it is not finished)
    python bench/bench_app.py --quick               # fewer repeats

The run is trained on ../shared/breakhis_sample (60 real BreaKHis PNGs, 700x460; --data-dir to point elsewhere),
or on synthetic 224 px images when that folder is absent. Targets (issue #15): an upload answered in under 1 s at
224 px on 2 CPU cores, after start-up; a stored image in under 200 ms. The upload is the run's first test image as
a 700x460 PNG, decoded each time as an upload is. Also timed: PNG encoding of the five pictures, which Gradio does
after the function returns (part of what the browser waits for).
"""

import argparse
import io
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _timing import ROOT, interleaved_medians, table
from PIL import Image

import app  # noqa: E402  (after _timing put the repository root on the path)
from common.data.demo import make_demo_dataset  # noqa: E402
from common.models.registry import ARCHS  # noqa: E402
from common.viewer import DEFAULT_OPACITY, browse_rows, filter_rows, load_viewer_run  # noqa: E402

SAMPLE = ROOT.parent / "shared" / "breakhis_sample"
MODEL_SCRIPTS = tuple(spec.script for spec in ARCHS.values())
RUN_ARGS = ["--weights", "none", "--image-size", "224", "--epochs", "1", "--batch-size", "8", "--workers", "0",
            "--overlays", "0", "--val-fraction", "0.25", "--test-fraction", "0.25", "--device", "cpu"]


def train_run(run_dir: Path, data_dir: Path | None) -> None:
    """A finished run at 224 px: the three CNNs (random init, one epoch) and the MLP, on `data_dir` or on 16
    synthetic images."""
    if data_dir is None:
        data_dir = make_demo_dataset(run_dir.parent / f"{run_dir.name}_data", patients_per_class=4,
                                     images_per_patient=2, magnifications=("100",), width=224, height=224, seed=0)
    for script in MODEL_SCRIPTS:
        print(f"training {script} at 224 px ...", flush=True)
        subprocess.run([sys.executable, str(ROOT / script), "--data-dir", str(data_dir), "--output-dir", str(run_dir),
                        *RUN_ARGS], check=True, capture_output=True)
    subprocess.run([sys.executable, str(ROOT / "cancer_class_further.py"), "--output-dir", str(run_dir), "--epochs",
                    "2"], check=True, capture_output=True)


def breakhis_sized_upload(run, folder: Path) -> Path:
    """A test image of the run upscaled to 700x460 and saved as PNG, like a BreaKHis file."""
    source = run.run.data_root / run.predictions["paths"][0]
    target = folder / "upload_700x460.png"
    Image.open(source).convert("RGB").resize((700, 460), Image.Resampling.BILINEAR).save(target)
    return target


def encode_pngs(outputs: list) -> None:
    for update in outputs:
        if isinstance(update, dict) and isinstance(update.get("value"), Image.Image):
            update["value"].save(io.BytesIO(), format="PNG")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", help="a finished run, or where to train and keep one (default: a temp dir)")
    parser.add_argument("--data-dir", type=Path, default=SAMPLE if SAMPLE.is_dir() else None,
                        help="images to train the run on (default: the real sample, else synthetic)")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the issue's 2 CPU cores)")
    parser.add_argument("--quick", action="store_true", help="3 repeats")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else args.repeats
    with tempfile.TemporaryDirectory(prefix="bench_app_") as work:
        run_dir = Path(args.run_dir or Path(work) / "run")
        if not (run_dir / "final_classifier.pth").is_file():
            train_run(run_dir, args.data_dir)
        started = time.perf_counter()
        run = load_viewer_run(run_dir, device=torch.device("cpu"))
        startup = time.perf_counter() - started
        sizes = {arch: ensemble.image_size for arch, ensemble in run.models.cnns.items()}
        upload = str(breakhis_sized_upload(run, Path(work)))
        row = filter_rows(browse_rows(run))[0]
        click = app.gr.SelectData(None, {"index": [0, 0], "value": "", "selected": True})
        predicted = app.predict_uploads(run, [upload], "gradcam", DEFAULT_OPACITY)
        browsed = app.browse_select(run, [row], "gradcam", DEFAULT_OPACITY, click)
        timings = interleaved_medians({
            "upload: app.predict_uploads (decode, 3 CNNs + Grad-CAM, MLP, overlays)":
                lambda: app.predict_uploads(run, [upload], "gradcam", DEFAULT_OPACITY),
            "browse: app.browse_select (stored maps, image from disk, overlays)":
                lambda: app.browse_select(run, [row], "gradcam", DEFAULT_OPACITY, click),
            "  + PNG encoding of the 5 pictures of an upload": lambda: encode_pngs(predicted),
            "  + PNG encoding of the 5 pictures of a stored image": lambda: encode_pngs(browsed),
        }, repeats=repeats)
    print(f"\nrun: {run_dir} (input sizes {sizes}); start-up (load_viewer_run): {startup:.1f} s; "
          f"torch threads {args.threads}; median of {repeats}")
    print(table(["what", "wall ms", "CPU ms"],
                [[name, f"{timing.wall * 1000:.0f}", f"{timing.cpu * 1000:.0f}"] for name, timing in timings.items()]))
    names = list(timings)
    print(f"upload with its PNGs: {(timings[names[0]].wall + timings[names[2]].wall) * 1000:.0f} ms (target < 1000); "
          f"stored image with its PNGs: {(timings[names[1]].wall + timings[names[3]].wall) * 1000:.0f} ms "
          "(target < 200)")

if __name__ == "__main__":
    main()
