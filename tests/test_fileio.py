"""Atomic writes and the background checkpoint writer: a file is the old complete one or the new complete one,
a snapshot is immune to later training steps, and a failed write is reported as a one-line error naming the file.
"""

import os
import threading
from pathlib import Path

import pytest
import torch

import common.fileio as fileio
from common.errors import PipelineError
from common.fileio import BackgroundWriter, atomic_path, cpu_snapshot, save_torch, written_together


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
