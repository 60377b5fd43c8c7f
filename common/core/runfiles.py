"""The layout of a run folder (--output-dir) and the commands that write it: every name, written once, for the
writers and the readers. A run folder is one of two kinds (common/run.py loads either):

Single split (run_pipeline.py --folds 1, or the model scripts without --folds):
    split.json                          the train/val/test split (common/data/partition.py)
    cache/images_<size>px_<key>.npy     decoded images, shared by the model scripts (common/data/images.py)
    fine_tuned_<arch>.pth               best epoch of each CNN              training_state_<arch>.pth  for --resume
    train_log_<arch>.jsonl              one line per epoch                  metrics_<arch>.json        val and test
    heatmaps_<arch>.npz                 maps and logits of every image      overlays/<arch>/*.png
    final_classifier.pth                the MLP on the chosen features      final_classifier_<features>.pth  the other
    test_predictions.npz                every model's P(malignant) per test image, keys prob_<row key>, and the
                                        heatmap MLP's on each map type (common.evaluation.map_comparison)
    results.md, results.json            the comparison table (results.json written last, listing the others)

K-fold (run_pipeline.py, the default; the model scripts with --folds K):
    folds.json                          the folds of patients, numbered 1..K (common/data/partition.py)
    cache/                              shared by every fold and model
    fold_<k>/                           fold k as a single-split run (its test split = fold k's patients)
    final_classifier.pth                the MLP fitted on every out-of-fold row (for new images)
    oof_predictions.csv                 every image once, scored by the fold models that never saw its patient
    cv_results.md, cv_results.json      the cross-validated table (cv_results.json written last, listing the others)

Both kinds:
    faithfulness.json, faithfulness.md  deletion/insertion AUC of every explanation method (score_explanations.py)
    faithfulness/*.png                  held-out images explained by every method side by side
    report/                             the static report (a K-fold run's holds each fold's page in report/fold_<k>/)
    predictions/                        predict.py's default --out (predictions.csv and the figures)

(The decision rule, malignant when P(malignant) >= 0.5, is common.evaluation.metrics.DECISION_THRESHOLD.)
"""

from pathlib import Path

from common.core.errors import PipelineError

SPLIT_FILE = "split.json"
FOLDS_FILE = "folds.json"
CACHE_DIR = "cache"
FINAL_CLASSIFIER = "final_classifier.pth"
TEST_PREDICTIONS = "test_predictions.npz"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
CV_RESULTS_JSON = "cv_results.json"
CV_RESULTS_MD = "cv_results.md"
OOF_PREDICTIONS = "oof_predictions.csv"
FAITHFULNESS_JSON = "faithfulness.json"
FAITHFULNESS_MD = "faithfulness.md"
FAITHFULNESS_DIR = "faithfulness"
REPORT_DIR = "report"
PREDICTIONS_DIR = "predictions"
PREDICTIONS_CSV = "predictions.csv"  # predict.py's table, in its --out

# The commands (top-level scripts) that write a run, named in messages that say what to run next. The model
# scripts are named by the models table (common.models.registry.ARCHS).
PIPELINE_SCRIPT = "run_pipeline.py"
FURTHER_SCRIPT = "cancer_class_further.py"
SCORE_SCRIPT = "score_explanations.py"
REPORT_SCRIPT = "make_report.py"


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


def distinct_stems(paths: list) -> list[str]:
    """A file-name stem per path, for the files made from it (overlays): its stem; images sharing a stem (e.g. in two
    class folders) get <stem>_2, <stem>_3, ... in order, so no file overwrites another."""
    stems, taken = [], set()
    for path in paths:
        stem, copy = Path(path).stem, 1
        while stem in taken:
            copy += 1
            stem = f"{Path(path).stem}_{copy}"
        taken.add(stem)
        stems.append(stem)
    return stems


def classifier_name(feature_set: str, final_features: str) -> str:
    """final_classifier.pth for the chosen feature set, final_classifier_<features>.pth for the other."""
    return FINAL_CLASSIFIER if feature_set == final_features else \
        f"final_classifier_{feature_set.replace('+', '_')}.pth"


def probability_key(row_key: str) -> str:
    """The predictions-file column of a table row ('mlp_heatmaps+logits' -> 'prob_mlp_heatmaps_logits')."""
    return f"prob_{row_key.replace('+', '_')}"


def scaled_probability_key(row_key: str) -> str:
    """The predictions-file column of a row's temperature-scaled P ('resnet50' -> 'prob_resnet50_scaled')."""
    return f"{probability_key(row_key)}_scaled"


RUN_KINDS = {"single": ("single-split", SPLIT_FILE), "kfold": ("K-fold", FOLDS_FILE)}


def run_kind(output_dir: str | Path) -> str | None:
    """'kfold' when the folder holds folds.json, 'single' when it holds split.json, None when it holds neither."""
    for kind in ("kfold", "single"):
        if (Path(output_dir) / RUN_KINDS[kind][1]).is_file():
            return kind
    return None


def check_run_kind(output_dir: str | Path, kind: str) -> None:
    """Refuse to write a run of `kind` into a folder that holds a run of the other kind (it would mix the two and
    overwrite the other's final classifier and report); nothing is touched."""
    found = run_kind(output_dir)
    if found is not None and found != kind:
        name, marker = RUN_KINDS[found]
        raise PipelineError(f"--output-dir {output_dir} holds a {name} run ({marker}); a {RUN_KINDS[kind][0]} run "
                            f"needs another --output-dir")
