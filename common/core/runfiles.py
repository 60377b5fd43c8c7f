"""The layout of a run folder (--output-dir): every file name, written once, for the writers and the readers.

    split.json                          the split (common/data/partition.py: SPLIT_FILE_NAME)
    cache/images_<size>px_<key>.npy     decoded images, shared by the model scripts (common/data/images.py)
    fine_tuned_<arch>.pth               best epoch of each CNN              training_state_<arch>.pth  for --resume
    train_log_<arch>.jsonl              one line per epoch                  metrics_<arch>.json        val and test
    heatmaps_<arch>.npz                 maps and logits of every image      overlays/<arch>/*.png
    final_classifier.pth                the MLP on the chosen features      final_classifier_<features>.pth  the other
    test_predictions.npz                every model's P(malignant) per test image, keys prob_<row key>, and the
                                        heatmap MLP's on each map type, prob_mlp_<gradcam|gradcampp|layercam>
                                        (common.evaluation.map_comparison.cam_probability_key)
    results.md, results.json            the comparison table (results.json written last, listing the others)
    faithfulness.json, faithfulness.md  deletion/insertion AUC of every explanation method (python score_explanations.py)
    faithfulness/*.png                  test images explained by every method side by side
    report/                             the static report                   predictions/  predict.py's default --out

A K-fold run (--folds K) holds folds.json (common/data/partition.py), one fold_<k>/ per fold laid out as above, the shared
cache/, and the aggregation's files (common/stages/cross_validation.py): cv_results.json, cv_results.md, oof_predictions.csv and
final_classifier.pth (the MLP fitted on every out-of-fold row, for predict.py).

(The decision rule, malignant when P(malignant) >= 0.5, is common.evaluation.metrics.DECISION_THRESHOLD.)
"""

from pathlib import Path

CACHE_DIR = "cache"
FINAL_CLASSIFIER = "final_classifier.pth"
TEST_PREDICTIONS = "test_predictions.npz"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
REPORT_DIR = "report"
FAITHFULNESS_JSON = "faithfulness.json"
FAITHFULNESS_MD = "faithfulness.md"
FAITHFULNESS_DIR = "faithfulness"
PREDICTIONS_DIR = "predictions"
FURTHER_SCRIPT = "cancer_class_further.py"
CV_RESULTS_JSON = "cv_results.json"
CV_RESULTS_MD = "cv_results.md"
OOF_PREDICTIONS = "oof_predictions.csv"


def fold_dir(output_dir: str | Path, fold: int) -> Path:
    """Fold k's run folder (k from 1) in a K-fold run."""
    return Path(output_dir) / f"fold_{fold}"


def checkpoint_path(output_dir: str | Path, arch: str) -> Path:
    return Path(output_dir) / f"fine_tuned_{arch}.pth"


def state_path(output_dir: str | Path, arch: str) -> Path:
    return Path(output_dir) / f"training_state_{arch}.pth"


def train_log_path(output_dir: str | Path, arch: str) -> Path:
    return Path(output_dir) / f"train_log_{arch}.jsonl"


def metrics_path(output_dir: str | Path, arch: str) -> Path:
    return Path(output_dir) / f"metrics_{arch}.json"


def heatmap_path(output_dir: str | Path, arch: str) -> Path:
    return Path(output_dir) / f"heatmaps_{arch}.npz"


def overlay_dir(output_dir: str | Path, arch: str) -> Path:
    return Path(output_dir) / "overlays" / arch


def classifier_name(feature_set: str, final_features: str) -> str:
    """final_classifier.pth for the chosen feature set, final_classifier_<features>.pth for the other."""
    return FINAL_CLASSIFIER if feature_set == final_features else \
        f"final_classifier_{feature_set.replace('+', '_')}.pth"


def probability_key(row_key: str) -> str:
    """The test_predictions.npz array of a table row ('mlp_heatmaps+logits' -> 'prob_mlp_heatmaps_logits')."""
    return f"prob_{row_key.replace('+', '_')}"
