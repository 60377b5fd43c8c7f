"""The patient bootstrap: vectorised (common.evaluation.stats.resampled_metrics) vs a plain loop over resamples.

    python bench/bench_bootstrap.py            # 8,000 images, 82 patients, 2,000 resamples; loop on 40 resamples
    python bench/bench_bootstrap.py --quick    # 2,000 images, 500 resamples; loop on 10 resamples

One core: OMP/OpenBLAS/MKL threads set to 1 before numpy loads, and threadpoolctl limits any pool it finds.
Synthetic BreaKHis-like data: 82 patients (about 2/3 malignant) with unequal image counts, P(malignant) in
float32 precision (so some scores tie, as real softmax outputs do near 0 and 1).

Timed, for ONE row (one model's predictions), image level, AUC + balanced accuracy + accuracy (and sensitivity,
specificity, which come with them):
  vectorised   resampled_metrics on the (R, P) count matrix of all resamples at once;
  loop         resampled_metrics_loop: per resample, the drawn patients' images concatenated and
               common.evaluation.metrics.binary_metrics on them. It is timed on the first --loop-resamples
               rows of the SAME index matrix and scaled linearly to all resamples (each iteration does the same
               work).
Also timed: the whole of PatientBootstrap.intervals for one row (image and patient level, estimates included),
which is what a results table calls per row. Both methods' values are compared on the shared resamples.
Median wall and CPU seconds of interleaved repeats (bench/_timing.py).
"""

import os

for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[variable] = "1"  # before numpy is imported: one core

import argparse  # noqa: E402

import _timing  # noqa: E402,F401  (puts the repository root on sys.path)
import numpy as np  # noqa: E402
from _timing import interleaved_medians, table  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from common.evaluation.stats import PatientBootstrap, resampled_metrics, resampled_metrics_loop  # noqa: E402


def synthetic_row(images: int, patients: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, patients, prob_malignant) of `images` images spread unequally over `patients` patients."""
    rng = np.random.default_rng(seed)
    patient_labels = (rng.random(patients) < 2 / 3).astype(np.int64)
    patient_labels[:2] = [0, 1]
    shares = rng.gamma(2.0, size=patients)
    patient_of_image = rng.choice(patients, size=images, p=shares / shares.sum())
    labels = patient_labels[patient_of_image]
    patient_effect = rng.normal(0, 1, patients)[patient_of_image]  # images of one patient are correlated
    logit = 1.5 * (2 * labels - 1) + patient_effect + rng.normal(0, 1.5, images)
    prob = (1 / (1 + np.exp(-logit))).astype(np.float32).astype(np.float64)
    return labels, np.char.add("patient-", patient_of_image.astype(str)), prob


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8000)
    parser.add_argument("--patients", type=int, default=82)
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--loop-resamples", type=int, default=40, help="resamples the loop is timed on")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="2,000 images, 500 resamples, loop on 10")
    args = parser.parse_args()
    if args.quick:
        args.images, args.resamples, args.loop_resamples, args.repeats = 2000, 500, 10, 2
    labels, patients, prob = synthetic_row(args.images, args.patients, seed=0)
    bootstrap = PatientBootstrap.draw(labels=labels, patients=patients, resamples=args.resamples, seed=0)
    loop_indices = bootstrap.indices[:args.loop_resamples]
    with threadpool_limits(limits=1):
        medians = interleaved_medians({
            "vectorised": lambda: resampled_metrics(labels, prob, bootstrap.patient_of_image, bootstrap.counts),
            "loop": lambda: resampled_metrics_loop(labels, prob, bootstrap.patient_of_image, loop_indices),
            "intervals": lambda: bootstrap.intervals(prob),
        }, repeats=args.repeats)
        vectorised = resampled_metrics(labels, prob, bootstrap.patient_of_image, bootstrap.counts)
        looped = resampled_metrics_loop(labels, prob, bootstrap.patient_of_image, loop_indices)
    largest_gap = max(float(np.max(np.abs(vectorised[name][:args.loop_resamples] - looped[name])))
                      for name in looped)
    scale = args.resamples / args.loop_resamples
    loop_wall, loop_cpu = medians["loop"].wall * scale, medians["loop"].cpu * scale
    vector = medians["vectorised"]
    print(f"\npatient bootstrap, one row, image level: {args.images:,} images, {args.patients} patients, "
          f"{args.resamples:,} resamples, one core; median of {args.repeats} interleaved repeats")
    print(table(["method", "wall s", "CPU s", "loop / this (CPU)"], [
        ["vectorised (resampled_metrics)", f"{vector.wall:.2f}", f"{vector.cpu:.2f}", f"{loop_cpu / vector.cpu:.0f}x"],
        [f"loop, timed on {args.loop_resamples} resamples x {scale:g}", f"{loop_wall:.1f}", f"{loop_cpu:.1f}", "1x"],
        ["PatientBootstrap.intervals (image + patient level)", f"{medians['intervals'].wall:.2f}",
         f"{medians['intervals'].cpu:.2f}", f"{loop_cpu / medians['intervals'].cpu:.0f}x"],
    ]))
    print(f"the loop's time is scaled from {args.loop_resamples} resamples to {args.resamples:,} (same work per "
          f"resample); largest difference between the two methods on those resamples: {largest_gap:.1e}")


if __name__ == "__main__":
    main()
