"""Faults and bad input on runs of both kinds: a resumed K-fold run that would skip models no longer valid for what
it is asked, folds.json lost, a run of the other kind in the folder, a mistyped option. Each is refused in one line
before any training, touching nothing, or recovered with the same result."""

import contextlib
import importlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FOLDS, PIPELINE_ARGS, ROOT

from common.core import fileio
from common.core.errors import PipelineError, run_main
from common.core.fileio import (
    STALE_AFTER_SECONDS,
    check_writable_folder,
    remove_stale_temporaries,
    scratch_folder,
    sha256_of_file,
)
from common.core.runfiles import FOLDS_FILE, RESULTS_JSON, checkpoint_path, fold_dir, heatmap_path
from common.data.demo import make_demo_dataset
from common.data.partition import load_folds
from common.models.checkpoints import load_checkpoint
from common.models.registry import MODEL_ORDER
from common.report.build import build_report
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
    assert refused_in_one_line(finished).startswith("error: unknown option --learning-rate (see python "
                                                    "run_pipeline.py --help")
    assert not (tmp_path / "run").exists()


def test_a_bad_value_for_a_model_option_is_named_as_one_run_pipeline_passes_on(demo_dir, tmp_path):
    finished = pipeline(demo_dir, tmp_path / "run", "--epochs", "abc")
    assert refused_in_one_line(finished) == (
        "error: argument --epochs: invalid int value: 'abc' (an option run_pipeline.py passes on to the model "
        "scripts; see python cancer_class_densenet_121.py --help)")
    assert not (tmp_path / "run").exists()


def test_ctrl_c_in_run_pipeline_prints_one_line_with_the_command_that_resumes(demo_dir, tmp_path):
    """A Ctrl-C in a terminal reaches the driver and the running stage (one process group): one line, the
    driver's, naming the folder and the command that resumes; exit status 130; the stage's files stay intact."""
    output_dir = tmp_path / "run"
    command = [sys.executable, str(ROOT / "run_pipeline.py"), "--data-dir", str(demo_dir), "--output-dir",
               str(output_dir), "--folds", str(FOLDS), *PIPELINE_ARGS]
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    for line in driver.stdout:  # the first model stage is running (it has read its split)
        if line.startswith("split protocol:"):
            break
    try:
        os.killpg(driver.pid, signal.SIGINT)  # as a terminal's Ctrl-C does: every process of the group
        _, stderr = driver.communicate(timeout=300)
    finally:  # never leave a stage training in the background of the rest of the suite
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == 130, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()  # (the stage's progress lines may come first)
    expected = (f"interrupted: the models and stages that finished are intact in {output_dir}; resume with "
                f"python run_pipeline.py {' '.join(command[2:])} (finished models are skipped)")
    assert [line for line in lines if line.startswith(("interrupted", "error"))] == [expected] == lines[-1:], stderr
    assert (output_dir / FOLDS_FILE).is_file()  # made before the first stage, kept


# ------------------------------------------------------------------------------ output paths that cannot be used


def test_an_output_path_that_is_a_file_or_lies_under_one_is_refused(tmp_path):
    file = tmp_path / "a_file"
    file.write_text("not a folder")
    for folder in (file, file / "run"):
        with pytest.raises(PipelineError, match=rf"^--out {re.escape(str(folder))}: {re.escape(str(file))} is a "
                                                r"file, not a folder; pass a folder$"):
            check_writable_folder(folder, option="--out")
    check_writable_folder(tmp_path / "new" / "run", option="--out")  # made later by the writer; nothing made here
    assert sorted(tmp_path.iterdir()) == [file]


def test_a_folder_that_cannot_be_written_is_refused(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):  # what a read-only file system or a missing permission gives
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(fileio.tempfile, "TemporaryFile", refuse)
    with pytest.raises(PipelineError, match=rf"^--output-dir {re.escape(str(tmp_path / 'run'))}: cannot write in "
                                            rf"{re.escape(str(tmp_path))} \(Permission denied\); pass a folder you "
                                            "can write to$"):
        check_writable_folder(tmp_path / "run", option="--output-dir")


@pytest.mark.parametrize("command", ["model script", "run_pipeline", "predict"])
def test_commands_refuse_an_unusable_output_path_in_one_line_before_any_work(command, cv_run, demo_dir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    target = blocker / "out"
    argv = {"model script": ["cancer_class_resnet_50.py", "--data-dir", str(demo_dir), "--output-dir", str(target),
                             *PIPELINE_ARGS],
            "run_pipeline": ["run_pipeline.py", "--data-dir", str(demo_dir), "--output-dir", str(target),
                             *PIPELINE_ARGS],
            "predict": ["predict.py", str(next(demo_dir.rglob("*.png"))), "--output-dir", str(cv_run), "--out",
                        str(target), "--device", "cpu"]}[command]
    finished = subprocess.run([sys.executable, str(ROOT / argv[0]), *argv[1:]], capture_output=True, text=True,
                              timeout=600)
    assert finished.returncode == 2 and "Traceback" not in finished.stderr
    option = "--out" if command == "predict" else "--output-dir"
    assert finished.stderr.strip() == f"error: {option} {target}: {blocker} is a file, not a folder; pass a folder"
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize("script", ["make_report", "score_explanations", "cancer_class_further"])
def test_readers_refuse_a_run_folder_they_cannot_write_before_the_work(script, run_copy, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    module = importlib.import_module(script)
    monkeypatch.setattr(fileio.tempfile, "TemporaryFile", refuse)
    with pytest.raises(PipelineError, match=rf"^--output-dir {re.escape(str(run_copy))}: cannot write in "):
        module.main(["--output-dir", str(run_copy)])


def test_an_os_error_that_escapes_is_one_line_naming_the_path(capsys):
    def fails():
        raise PermissionError(13, "Permission denied", "/some/run/results.json")

    with pytest.raises(SystemExit) as exit_status:
        run_main(fails)
    assert exit_status.value.code == 2
    assert capsys.readouterr().err == ("error: /some/run/results.json: Permission denied; results written before are "
                                       "intact\n")


# ------------------------------------------------------------------------------ nothing left behind


def killed_inside_a_scratch_folder(parent: Path, name: str) -> Path:
    """The scratch folder a process left when it was killed (kill -9) while using it."""
    code = ("import os, sys; from common.core.fileio import scratch_folder\n"
            "with scratch_folder(sys.argv[1], sys.argv[2]) as folder:\n"
            "    (folder / 'half.png').write_bytes(b'half'); print(folder, flush=True); os.kill(os.getpid(), 9)")
    finished = subprocess.run([sys.executable, "-c", code, str(parent), name], capture_output=True, text=True,
                              cwd=ROOT, timeout=120)
    assert finished.returncode == -signal.SIGKILL
    folder = Path(finished.stdout.strip())
    assert folder.is_dir() and folder.parent == parent
    old = time.time() - 2 * STALE_AFTER_SECONDS  # past the moment between a folder's creation and its lock
    os.utime(folder, (old, old))
    return folder


def test_a_killed_processs_scratch_folder_is_removed_and_a_live_one_kept(tmp_path):
    left = killed_inside_a_scratch_folder(tmp_path, "report")
    with scratch_folder(tmp_path, "report") as live:
        old = time.time() - 2 * STALE_AFTER_SECONDS
        os.utime(live, (old, old))
        assert remove_stale_temporaries(tmp_path) == [left]
        assert live.is_dir() and not left.exists()
    assert not live.exists()
    assert list(tmp_path.iterdir()) == []


def test_the_report_build_removes_what_a_killed_build_left(run_copy):
    left = killed_inside_a_scratch_folder(run_copy, "report")
    build_report(run_copy)
    assert not left.exists()
    assert not [path for path in run_copy.iterdir() if path.name.startswith(".")]


def test_predict_removes_what_a_killed_predict_left_and_leaves_nothing(cv_run, demo_dir, tmp_path):
    out = tmp_path / "predictions"
    left = killed_inside_a_scratch_folder(tmp_path, out.name)
    finished = subprocess.run([sys.executable, str(ROOT / "predict.py"), str(next(demo_dir.rglob("*.png"))),
                               "--output-dir", str(cv_run), "--out", str(out), "--device", "cpu"],
                              capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert not left.exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["predictions"]


def test_the_viewers_upload_folder_is_its_own_and_goes_when_it_stops(tmp_path):
    """Each viewer process gets a folder of its own for Gradio's uploads (not a fixed shared one), removed at exit."""
    code = "import os, app; print(os.environ['GRADIO_TEMP_DIR'])"
    environment = {key: value for key, value in os.environ.items() if key != "GRADIO_TEMP_DIR"}
    environment["TMPDIR"] = str(tmp_path)
    folders = []
    for _ in range(2):
        finished = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                                  env=environment, timeout=300)
        assert finished.returncode == 0, finished.stderr[-2000:]
        folders.append(Path(finished.stdout.strip().splitlines()[-1]))
    assert folders[0] != folders[1] and all(folder.parent == tmp_path for folder in folders)
    assert list(tmp_path.iterdir()) == []
