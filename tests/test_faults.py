"""Faults and bad input on runs of both kinds: a resumed K-fold run that would skip models no longer valid for what
it is asked, folds.json lost, a run of the other kind in the folder, a mistyped option. Each is refused in one line
before any training, touching nothing, or recovered with the same result."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FOLDS, PIPELINE_ARGS, ROOT

from common.core.fileio import sha256_of_file
from common.core.runfiles import FOLDS_FILE, RESULTS_JSON, checkpoint_path, fold_dir, heatmap_path
from common.data.demo import make_demo_dataset
from common.data.partition import load_folds
from common.models.checkpoints import load_checkpoint
from common.models.registry import MODEL_ORDER
from common.run import open_run


def pipeline(data_dir: Path, output_dir: Path, *options: str) -> subprocess.CompletedProcess:
    """run_pipeline.py with the small test settings; options given here come last, so they win."""
    return subprocess.run([sys.executable, str(ROOT / "run_pipeline.py"), "--data-dir", str(data_dir),
                           "--output-dir", str(output_dir), "--folds", str(FOLDS), "--faithfulness-images", "2",
                           "--faithfulness-perturbation-images", "0", *PIPELINE_ARGS, *options],
                          capture_output=True, text=True, timeout=1500)


def tree(folder: Path) -> dict[str, str]:
    """Every entry under `folder` with what it is: a link's target, a file's size; to see that nothing changed."""
    return {str(path.relative_to(folder)): os.readlink(path) if path.is_symlink() else
            str(path.stat().st_size) if path.is_file() else "dir" for path in sorted(folder.rglob("*"))}


def refused_in_one_line(finished: subprocess.CompletedProcess) -> str:
    """The error line of a command that stopped before any training."""
    assert finished.returncode == 2, finished.stdout[-2000:] + finished.stderr[-2000:]
    assert "Traceback" not in finished.stderr
    assert "$ " not in finished.stdout  # no stage was started
    lines = finished.stderr.strip().splitlines()
    assert len(lines) == 1, finished.stderr
    return lines[0]


@pytest.fixture(scope="module")
def other_data(tmp_path_factory) -> Path:
    """Another demo tree: 5 patients per class, another seed (other images, other patients)."""
    out = tmp_path_factory.mktemp("other_data")
    make_demo_dataset(out, patients_per_class=5, images_per_patient=3, magnifications=("100", "400"), width=48,
                      height=32, seed=5)
    return out


def test_resumed_k_fold_run_on_other_data_is_refused_before_any_training(cv_copy, other_data):
    before = tree(cv_copy)
    error = refused_in_one_line(pipeline(other_data, cv_copy))
    assert error.startswith(f"error: the dataset does not match {cv_copy / FOLDS_FILE} (")
    assert tree(cv_copy) == before


@pytest.mark.parametrize("option", [["--lr", "0.01"], ["--image-size", "48"], ["--epochs", "2"],
                                    ["--cam-methods", "gradcam"]])
def test_resumed_k_fold_run_with_other_training_options_is_refused_naming_them(cv_copy, demo_dir, option):
    before = tree(cv_copy)
    error = refused_in_one_line(pipeline(demo_dir, cv_copy, *option))
    checkpoint = checkpoint_path(fold_dir(cv_copy, 1), MODEL_ORDER[0])  # the first model run_pipeline would skip
    trained_with = load_checkpoint(checkpoint, MODEL_ORDER[0])["config"][option[0][2:].replace("-", "_")]
    assert error == (f"error: {checkpoint} was trained with other options ({option[0]} {trained_with!r} there, "
                     f"{type(trained_with)(option[1])!r} now); pass the options it was trained with to resume this "
                     f"run, or use another --output-dir (or delete {cv_copy}/fold_*/ to train every fold again, "
                     "losing its models)")
    assert tree(cv_copy) == before


def test_options_that_do_not_change_a_model_still_resume_it(cv_copy, demo_dir):
    finished = pipeline(demo_dir, cv_copy, "--workers", "1", "--cache", "none", "--overlays", "0")
    assert finished.returncode == 0, finished.stderr[-3000:]
    for fold in range(1, FOLDS + 1):
        for arch in MODEL_ORDER:
            assert f"fold_{fold} {arch}: complete, skipped" in finished.stdout


def test_a_retrained_fold_model_redoes_that_folds_final_stage_only(cv_copy, demo_dir, retrain):
    """A fold model retrained by hand (here: its checkpoint replaced, its maps remade with --heatmaps-only) makes
    that fold's results stale: the resumed run redoes that fold's final stage, from the new files."""
    folder = fold_dir(cv_copy, 2)
    checkpoint = checkpoint_path(folder, "resnet50")
    retrain(checkpoint)
    heatmap_path(folder, "resnet50").unlink()  # a link into the original run: the export writes a new file
    remade = subprocess.run([sys.executable, str(ROOT / "cancer_class_resnet_50.py"), "--data-dir", str(demo_dir),
                             "--output-dir", str(cv_copy), "--folds", str(FOLDS), "--fold", "2", *PIPELINE_ARGS,
                             "--heatmaps-only"], capture_output=True, text=True, timeout=600)
    assert remade.returncode == 0, remade.stderr[-3000:]
    finished = pipeline(demo_dir, cv_copy)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "fold_2 resnet50: complete, skipped" in finished.stdout  # the options are the same: nothing to retrain
    sources = open_run(folder).results()["sources"]["resnet50"]
    assert sources["checkpoint_sha256"] == sha256_of_file(checkpoint)
    assert sources["heatmaps_sha256"] == sha256_of_file(heatmap_path(folder, "resnet50"))
    assert (fold_dir(cv_copy, 1) / RESULTS_JSON).is_symlink()  # fold 1's results were current: left as they were


def test_a_deleted_folds_file_is_remade_and_the_run_resumes(cv_copy, demo_dir, cv_run):
    (cv_copy / FOLDS_FILE).unlink()
    finished = pipeline(demo_dir, cv_copy)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert finished.stdout.count("complete, skipped") == FOLDS * len(MODEL_ORDER)
    assert load_folds(cv_copy / FOLDS_FILE).digest == load_folds(cv_run / FOLDS_FILE).digest


def test_a_deleted_folds_file_and_other_data_say_the_fold_folders_must_go(cv_copy, other_data):
    (cv_copy / FOLDS_FILE).unlink()
    before = tree(cv_copy)
    error = refused_in_one_line(pipeline(other_data, cv_copy))
    assert error == (f"error: {fold_dir(cv_copy, 1)} was trained on other folds than {cv_copy / FOLDS_FILE} was "
                     f"missing and the folds remade from {other_data} with these options; delete {cv_copy}/fold_*/ "
                     f"as well to train every fold again ({FOLDS * len(MODEL_ORDER)} trained model(s) there are "
                     "lost), or use another --output-dir")
    assert tree(cv_copy) == before  # folds.json not written from the other data


def test_a_k_fold_run_into_a_single_split_run_is_refused_touching_nothing(run_copy, demo_dir):
    before = tree(run_copy)
    error = refused_in_one_line(pipeline(demo_dir, run_copy))
    assert error == (f"error: --output-dir {run_copy} holds a single-split run (split.json); a K-fold run needs "
                     "another --output-dir")
    assert tree(run_copy) == before


def test_a_mistyped_model_option_stops_the_run_before_anything_is_written(demo_dir, tmp_path):
    finished = pipeline(demo_dir, tmp_path / "run", "--learning-rate", "0.01")
    assert finished.returncode == 2
    assert "$ " not in finished.stdout
    assert "cancer_class_densenet_121.py: error: unrecognized arguments: --learning-rate 0.01" in finished.stderr
    assert not (tmp_path / "run").exists()
