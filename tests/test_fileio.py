"""Atomic writes and the background checkpoint writer: a file is the old complete one or the new complete one,
a snapshot is immune to later training steps, and a failed write is reported as a one-line error naming the file.
A full disk is simulated (the write raises what it raises on a full disk); temporaries left by a process killed
with SIGKILL are removed by the next run, those of live processes never.
"""

import errno
import io
import multiprocessing
import os
import re
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import cancer_class_further
import common.core.fileio as fileio
import common.training.loop as train_module
from common.core.errors import PipelineError, run_main
from common.core.fileio import (
    STALE_AFTER_SECONDS,
    BackgroundWriter,
    atomic_path,
    cpu_snapshot,
    remove_stale_temporaries,
    save_npz,
    save_torch,
    scratch_file,
    write_text,
    written_together,
)
from common.training.model_script import run_model_script


def test_atomic_path_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "result.pth"
    save_torch({"value": torch.tensor(1)}, target)
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_path(target) as temp_path:
            temp_path.write_bytes(b"half a file")
            raise RuntimeError("interrupted")
    assert torch.load(target, weights_only=True)["value"] == 1
    assert os.listdir(tmp_path) == ["result.pth"]  # no temporary file left


def test_files_written_together_replace_the_old_ones_in_order_and_only_when_all_are_written(tmp_path, monkeypatch):
    targets = [tmp_path / "classifier.pth", tmp_path / "predictions.npz", tmp_path / "results.json"]
    for target in targets:
        target.write_text("old")
    with pytest.raises(OSError, match="disk full"):
        with written_together(targets) as temp_paths:
            temp_paths[0].write_text("new")
            raise OSError("disk full")
    assert [target.read_text() for target in targets] == ["old"] * 3
    assert sorted(os.listdir(tmp_path)) == sorted(target.name for target in targets)  # no temporary file left

    renamed = []
    rename = os.replace
    monkeypatch.setattr(os, "replace", lambda source, target: (renamed.append(Path(target)), rename(source, target)))
    with written_together(targets) as temp_paths:
        assert [path.suffix for path in temp_paths] == [".pth", ".npz", ".json"]  # numpy keeps an .npz name as it is
        for path in temp_paths:
            path.write_text("new")
    assert renamed == targets  # the last one (the record of the others) last
    assert [target.read_text() for target in targets] == ["new"] * 3


def test_snapshot_is_a_deep_copy_that_later_steps_cannot_reach():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    live = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 1, "best_score": [0.5, -1.0]}
    snapshot = cpu_snapshot(live)
    expected = {key: value.clone() for key, value in snapshot["model"].items()}
    moment = snapshot["optimizer"]["state"][0]["exp_avg"].clone()
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()  # changes the parameters and the moments in place
    live["best_score"][0] = 0.9
    for key, value in expected.items():
        assert torch.equal(snapshot["model"][key], value)
        assert not torch.equal(model.state_dict()[key], value)
    assert torch.equal(snapshot["optimizer"]["state"][0]["exp_avg"], moment)
    assert snapshot["best_score"] == [0.5, -1.0] and snapshot["epoch"] == 1


def test_background_writer_writes_in_order_while_the_caller_goes_on(tmp_path, monkeypatch):
    released, started = threading.Event(), threading.Event()
    real_save = fileio.save_torch

    def slow_save(obj, target):  # the first file waits until the test lets it go
        started.set()
        released.wait(timeout=30)
        real_save(obj, target)

    monkeypatch.setattr(fileio, "save_torch", slow_save)
    writer = BackgroundWriter()
    weights = {"w": torch.arange(4.0)}
    writer.save([(weights, tmp_path / "best.pth"), ({"epoch": 1}, tmp_path / "state.pth")])
    weights["w"].add_(100)  # the caller goes on changing its tensors: the snapshot was taken before
    assert started.wait(timeout=30)
    assert not (tmp_path / "best.pth").exists()  # save() returned before the write finished ...
    assert not (tmp_path / "state.pth").exists()  # ... and the second file waits for the first
    writer.check()  # does not block on the write in flight
    released.set()
    writer.wait()
    assert torch.equal(torch.load(tmp_path / "best.pth", weights_only=True)["w"], torch.arange(4.0))
    assert torch.load(tmp_path / "state.pth", weights_only=True) == {"epoch": 1}
    writer.save([({"epoch": 2}, tmp_path / "state.pth")])  # the next save replaces the file whole
    writer.wait()
    assert torch.load(tmp_path / "state.pth", weights_only=True) == {"epoch": 2}


def test_background_writer_reports_a_failed_write_naming_the_file(tmp_path):
    blocked = tmp_path / "not_a_folder"
    blocked.write_text("a file where the checkpoint folder should be")
    writer = BackgroundWriter()
    writer.save([({"epoch": 1}, blocked / "state.pth")])
    with pytest.raises(PipelineError, match=r"^cannot write checkpoint .*not_a_folder/state\.pth: \w+Error"):
        writer.wait()
    writer.wait()  # reported once; the writer stays usable
    writer.save([({"epoch": 1}, tmp_path / "state.pth")])
    writer.wait()
    assert torch.load(tmp_path / "state.pth", weights_only=True) == {"epoch": 1}


def test_leaving_the_block_after_another_error_keeps_that_error_and_prints_the_failed_write(tmp_path, capsys):
    blocked = tmp_path / "not_a_folder"
    blocked.write_text("a file where the checkpoint folder should be")
    with pytest.raises(FloatingPointError, match="loss became nan"):
        with BackgroundWriter() as writer:
            writer.save([({"epoch": 1}, blocked / "state.pth")])
            raise FloatingPointError("loss became nan")
    assert capsys.readouterr().err.startswith(f"error: cannot write checkpoint {blocked / 'state.pth'}")
    with pytest.raises(PipelineError, match="cannot write checkpoint"):  # no other error: the failure is raised
        with BackgroundWriter() as writer:
            writer.save([({"epoch": 1}, blocked / "state.pth")])


def test_check_raises_a_failure_once_the_write_has_ended(tmp_path):
    blocked = tmp_path / "not_a_folder"
    blocked.write_text("not a folder")
    writer = BackgroundWriter()
    writer.save([({"epoch": 1}, blocked / "state.pth")])
    writer._thread.join()  # the write has ended (failed)
    with pytest.raises(PipelineError, match="cannot write checkpoint"):
        writer.check()


# ------------------------------------------------------------------------------------------- a full disk

DISK_FULL_MESSAGE = r"^the disk is full: cannot write {target} \(.+\); the previous {name}, if any, and all earlier " \
                    r"results are intact; free space and rerun$"


def _torch_save_on_a_full_disk(obj, path):
    Path(path).write_bytes(b"PK\x03\x04 the first blocks")  # what torch's writer wrote before the disk filled up
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")


def _write_on_a_full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("writer, patch", [
    (lambda target: save_torch({"value": torch.tensor(2)}, target), ("torch", "save", _torch_save_on_a_full_disk)),
    (lambda target: save_npz(target, value=np.arange(3)), ("np", "savez", _write_on_a_full_disk)),
    (lambda target: write_text(target, "new"), ("Path", "write_text", _write_on_a_full_disk)),
], ids=["torch.save", "np.savez", "write_text"])
def test_a_full_disk_is_one_line_naming_the_file_and_the_old_file_is_kept(tmp_path, monkeypatch, writer, patch):
    target = tmp_path / "result.bin"
    target.write_bytes(b"the complete result of an earlier run")
    module_name, attribute, replacement = patch
    owner = {"torch": torch, "np": np, "Path": Path}[module_name]
    monkeypatch.setattr(owner, attribute, replacement)
    with pytest.raises(PipelineError) as raised:
        writer(target)
    message = str(raised.value)
    assert "\n" not in message
    assert re.match(DISK_FULL_MESSAGE.format(target=re.escape(str(target)), name=r"result\.bin"), message), message
    assert target.read_bytes() == b"the complete result of an earlier run"
    assert os.listdir(tmp_path) == ["result.bin"]  # no temporary file left


def test_other_write_errors_are_not_called_a_full_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(Path, "write_text", lambda *args, **kwargs: (_ for _ in ()).throw(
        OSError(errno.EIO, os.strerror(errno.EIO))))
    with pytest.raises(OSError, match="Input/output error"):
        write_text(tmp_path / "result.txt", "new")
    assert os.listdir(tmp_path) == []


def test_background_writer_reports_a_full_disk_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "save", _torch_save_on_a_full_disk)
    writer = BackgroundWriter()
    writer.save([({"epoch": 1}, tmp_path / "state.pth")])
    with pytest.raises(PipelineError) as raised:
        writer.wait()
    assert str(raised.value).startswith(f"the disk is full: cannot write {tmp_path / 'state.pth'} (torch: ")
    assert "earlier results are intact" in str(raised.value) and "\n" not in str(raised.value)
    assert os.listdir(tmp_path) == []


def test_run_main_turns_a_full_disk_anywhere_into_one_line(tmp_path, capsys):
    def main():  # a write outside common/core/fileio.py, e.g. the training log's append
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "train_log.jsonl"))

    with pytest.raises(SystemExit) as exited:
        run_main(main)
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert error == (f"error: the disk is full: cannot write {tmp_path / 'train_log.jsonl'} (No space left on "
                     "device); results written before are intact; free space and rerun\n")


def test_a_full_disk_while_logging_an_epoch_names_the_log(tmp_path, monkeypatch):
    log_path = tmp_path / "train_log_vgg16.jsonl"

    class FullDiskFile(io.StringIO):
        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(train_module, "open", lambda *args, **kwargs: FullDiskFile(), raising=False)
    with pytest.raises(PipelineError, match=rf"^the disk is full: cannot write {re.escape(str(log_path))} "):
        train_module.log_epoch(log_path, {"epoch": 1})


# ------------------------------------------------------------------------------- temporaries left behind


def _age(path: Path, seconds: float = 2 * STALE_AFTER_SECONDS) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def _killed_while_writing(folder: Path) -> None:
    """In a child process: start an atomic write (with a scratch file, as the heatmap export has) and die by
    SIGKILL before it ends, as `kill -9` does."""
    with scratch_file(folder, "heatmaps_vgg16.npz", suffix=".cams.npy") as scratch:
        scratch.write_bytes(b"half the maps")
        with atomic_path(folder / "fine_tuned_vgg16.pth") as temp_path:
            temp_path.write_bytes(b"half a checkpoint")
            os.kill(os.getpid(), signal.SIGKILL)


def _writing_until_told(folder: Path, connection) -> None:
    """In a child process: a live run of the same output dir, in the middle of a write."""
    with atomic_path(folder / "training_state_vgg16.pth") as temp_path:
        temp_path.write_bytes(b"the other run's state")
        connection.send(str(temp_path))
        connection.recv()  # until the test says: finish


def _temporaries(folder: Path) -> set[str]:
    return {name for name in os.listdir(folder) if name.startswith(".")}


needs_flock = pytest.mark.skipif(fileio.fcntl is None, reason="temporaries are neither locked nor cleaned here")


@needs_flock
def test_stale_temporaries_are_removed_and_live_ones_of_any_process_kept(tmp_path, capsys):
    fork = multiprocessing.get_context("fork")
    killed = fork.Process(target=_killed_while_writing, args=(tmp_path,))
    killed.start()
    killed.join(timeout=60)
    assert killed.exitcode == -signal.SIGKILL
    dead = _temporaries(tmp_path)
    assert len(dead) == 2 and all(f".{killed.pid}." in name for name in dead)  # the writer's pid in the name
    ours, theirs = fork.Pipe()
    other_run = fork.Process(target=_writing_until_told, args=(tmp_path, theirs))
    other_run.start()
    other_temporary = Path(ours.recv())
    (tmp_path / "result.json").write_text("{}")  # results and other files are never touched
    (tmp_path / ".hidden").write_text("a user's file")
    with atomic_path(tmp_path / "heatmaps_vgg16.npz", suffix=".npz") as own_temporary:  # this process's live one
        own_temporary.write_bytes(b"ours")
        for path in [*(tmp_path / name for name in dead), other_temporary, own_temporary, tmp_path / "result.json",
                     tmp_path / ".hidden"]:
            _age(path)
        removed = remove_stale_temporaries(tmp_path)
        assert sorted(removed) == sorted(tmp_path / name for name in dead)
        assert _temporaries(tmp_path) == {".hidden", other_temporary.name, own_temporary.name}
    ours.send("finish")
    other_run.join(timeout=60)
    assert other_run.exitcode == 0
    assert (tmp_path / "training_state_vgg16.pth").read_bytes() == b"the other run's state"
    assert (tmp_path / "heatmaps_vgg16.npz").read_bytes() == b"ours"
    assert _temporaries(tmp_path) == {".hidden"}
    printed = capsys.readouterr().out
    assert f"removed 2 temporary file(s) or folder(s) that an interrupted run left in {tmp_path}" in printed


@needs_flock
def test_a_temporary_younger_than_the_lock_grace_is_kept(tmp_path):
    """Between its creation and its lock a live temporary is unlocked for an instant: only old ones are removed."""
    unlocked = tmp_path / ".result.json.12345.abcd_123.tmp"
    unlocked.write_bytes(b"")
    assert remove_stale_temporaries(tmp_path) == [] and unlocked.exists()
    _age(unlocked)
    assert remove_stale_temporaries(tmp_path) == [unlocked] and not unlocked.exists()


@needs_flock
@pytest.mark.parametrize("script", ["model script", "cancer_class_further"])
def test_the_scripts_remove_stale_temporaries_at_start(tmp_path, script):
    """Each cleans its output dir before anything else (here: before the error its bad input gives)."""
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    stale = output_dir / ".fine_tuned_vgg16.pth.4242.abcd1234.tmp"  # its process was killed
    stale.write_bytes(b"half a checkpoint")
    _age(stale)
    with pytest.raises(PipelineError):
        if script == "model script":
            run_model_script(arch="vgg16", description="", argv=["--data-dir", str(tmp_path / "missing"),
                                                                 "--output-dir", str(output_dir)])
        else:
            cancer_class_further.main(["--output-dir", str(output_dir)])  # no split.json there
    assert not stale.exists()
