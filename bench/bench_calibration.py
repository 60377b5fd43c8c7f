"""The cost of the calibration and conformal sections on a table of full BreaKHis size, on one core.

    python bench/bench_calibration.py                      # 7,909 images, 82 patients, 5 folds, 7 rows, 3 repeats
    python bench/bench_calibration.py --repeats 5 --resamples 2000

What is timed is everything cancer_class_further.py does for calibration and conformal sets on a K-fold run
(common.evaluation.uncertainty.evaluate_uncertainty): for each row of the table, the cross-fitted temperatures and
conformal thresholds, the temperature for new images, Brier / log loss / both ECEs before and after scaling with
their patient-bootstrap intervals at image and patient level, and the conformal summaries with their intervals.
The patient bootstrap itself is drawn once per table and is shared with the main table, so its draw is not timed.
Synthetic over-confident probabilities (no model); BLAS held to one thread. Target: under 5 s.
"""

import argparse
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core, before numpy loads its BLAS
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from _timing import interleaved_medians  # noqa: E402

from common.evaluation.stats import PatientBootstrap  # noqa: E402
from common.evaluation.uncertainty import HeldOutPlan, evaluate_uncertainty  # noqa: E402

ROWS = ("densenet121", "resnet50", "vgg16", "soft_vote", "logistic_regression", "mlp_heatmaps",
        "mlp_heatmaps+logits")


def breakhis_sized_table(images: int, patients: int, folds: int, seed: int = 0):
    """Labels, patients (24 benign : 58 malignant, as BreaKHis), folds, magnifications and one P per row."""
    rng = np.random.default_rng(seed)
    patient_of_image = np.sort(rng.integers(0, patients, images))
    malignant_patients = rng.permutation(patients) < round(patients * 58 / 82)
    labels = malignant_patients[patient_of_image].astype(int)
    patient_names = np.array([f"P{index:03d}" for index in range(patients)])[patient_of_image]
    fold_of_patient = rng.permutation(np.arange(patients) % folds) + 1
    magnifications = np.array(["40", "100", "200", "400"])[rng.integers(0, 4, images)]
    level = rng.normal(np.where(labels == 1, 1.5, -1.5), 1.0)
    probabilities = {row: 1 / (1 + np.exp(-3 * (level + rng.normal(0, 1.0, images)))) for row in ROWS}
    return labels, patient_names, fold_of_patient[patient_of_image], magnifications, probabilities


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=7909)
    parser.add_argument("--patients", type=int, default=82)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one repeat (bench/run_all.py --quick)")
    args = parser.parse_args()
    if args.quick:
        args.repeats = 1
    labels, patients, folds, magnifications, probabilities = breakhis_sized_table(args.images, args.patients,
                                                                                  args.folds)
    bootstrap = PatientBootstrap.draw(labels=labels, patients=patients, resamples=args.resamples, seed=0)
    plan = HeldOutPlan.cross_fitted(folds)

    def sections():
        return evaluate_uncertainty(probabilities, labels=labels, patients=patients, magnifications=magnifications,
                                    plans=dict.fromkeys(probabilities, plan), bootstrap=bootstrap, alpha=0.1)

    timing = interleaved_medians({"calibration + conformal sections": sections}, repeats=args.repeats)
    load = os.getloadavg()
    for name, found in timing.items():
        print(f"{name}: {found.wall:.2f} s wall, {found.cpu:.2f} s CPU (median of {args.repeats}); "
              f"{args.images} images, {args.patients} patients, {args.folds} folds, {len(ROWS)} rows, "
              f"{args.resamples} resamples; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
              f"target under 5 s: {'met' if found.wall < 5 else 'NOT met'}")


if __name__ == "__main__":
    main()
