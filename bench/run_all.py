"""Every benchmark, one after another, each in its own process.

    python bench/run_all.py            # the full settings (tens of minutes on a 2-core CPU)
    python bench/run_all.py --quick    # smaller inputs and fewer repeats (a few minutes)
"""

import argparse
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
BENCHMARKS = ("bench_gradcam.py", "bench_cam_methods.py", "bench_data.py", "bench_pipeline.py", "bench_checkpoint.py",
              "bench_bootstrap.py", "bench_calibration.py", "bench_app.py")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    args = parser.parse_args()
    failed = []
    for script in BENCHMARKS:
        command = [sys.executable, str(BENCH_DIR / script)] + (["--quick"] if args.quick else [])
        print(f"\n===== {' '.join(command[1:])}", flush=True)
        started = time.perf_counter()
        returncode = subprocess.run(command, check=False).returncode
        print(f"===== {script}: {time.perf_counter() - started:.0f} s, exit {returncode}", flush=True)
        if returncode != 0:
            failed.append(script)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
