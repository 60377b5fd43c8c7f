"""Atomic writes: a result file is either the old complete one or the new complete one, never half-written.

Each writer writes to a temporary file in the destination folder and renames it over the target;
rename within one file system is atomic on POSIX and Windows (os.replace).
"""

import contextlib
import hashlib
import json
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from common.errors import PipelineError


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it replaces `target`, on error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix or ".tmp", dir=target.parent)
    os.close(handle)
    temp_path = Path(temp_name)
    try:
        yield temp_path
        os.chmod(temp_path, 0o666 & ~_current_umask())  # mkstemp makes 0600; results are for the whole group
        os.replace(temp_path, target)
    finally:
        temp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def written_together(targets: list[Path]) -> Iterator[list[Path]]:
    """Yield a temporary path per target, for files that belong together. When the block succeeds they are renamed
    over their targets in the given order; when it fails (an error, a full disk, Ctrl-C) they are all removed and
    every old file stays as it was. The renames are separate steps, so a process killed between two of them leaves
    a mix: make the last target a record of the others' digests, and have readers check it."""
    with contextlib.ExitStack() as stack:
        # ExitStack leaves its contexts last in, first out: entered in reverse, they rename in the given order.
        temps = [stack.enter_context(atomic_path(target, suffix=Path(target).suffix)) for target in reversed(targets)]
        yield temps[::-1]


def save_torch(obj: dict, target: str | os.PathLike) -> None:
    with atomic_path(target) as temp_path:
        torch.save(obj, temp_path)


def cpu_snapshot(obj, copies: dict | None = None):
    """A deep copy of a (nested) checkpoint dict with every tensor copied to CPU memory: what the training loop
    changes afterwards (parameters, optimizer moments, lists in state dicts) cannot reach the copy. An object met
    twice (the same weights dict in two checkpoints) is copied once; `copies` maps id(original) -> copy."""
    copies = {} if copies is None else copies
    if id(obj) in copies:
        return copies[id(obj)]
    if isinstance(obj, torch.Tensor):
        copy = obj.detach().to("cpu", copy=True)
    elif isinstance(obj, dict):
        copy = {key: cpu_snapshot(value, copies) for key, value in obj.items()}
    elif isinstance(obj, (list, tuple)):
        values = [cpu_snapshot(value, copies) for value in obj]
        copy = type(obj)(*values) if hasattr(obj, "_fields") else type(obj)(values)  # a namedtuple takes fields
    else:
        return obj
    copies[id(obj)] = copy
    return copy


class BackgroundWriter:
    """Writes checkpoints on a thread while training goes on.

    Why: after the network itself, writing the best checkpoint and the --resume state every epoch was the largest
    item of a model script's profile (bench/README.md; VGG-16's state alone is 1.6 GB). `save` takes a CPU
    snapshot (the only part the training loop waits for) and returns; the thread writes each file atomically,
    so an interrupted write leaves the previous complete file. One write is in flight at a time: the next `save`,
    `wait` or `check` (which does not block) report its failure as a PipelineError naming the file. Used as a
    context manager, leaving the block waits for the last write. The thread is not a daemon: on Ctrl-C or an
    error the interpreter lets the write finish before it exits.
    """

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._failure: str | None = None

    def save(self, files: list[tuple[dict, Path]]) -> None:
        """Write each (checkpoint dict, target) in order, after the previous call's files."""
        self.wait()
        copies = {}  # shared by the files: weights that appear in two of them are copied once
        snapshots = [(cpu_snapshot(obj, copies), Path(target)) for obj, target in files]
        self._thread = threading.Thread(target=self._write, args=(snapshots,), name="checkpoint-writer")
        self._thread.start()

    def _write(self, snapshots: list[tuple[dict, Path]]) -> None:
        for obj, target in snapshots:
            try:
                save_torch(obj, target)
            except Exception as error:  # disk full, permissions: reported by the training thread
                self._failure = f"cannot write checkpoint {target}: {type(error).__name__}: {error}"
                return

    def check(self) -> None:
        """Without blocking: raise the failure of a write that has already ended."""
        if self._thread is not None and not self._thread.is_alive():
            self.wait()

    def wait(self) -> None:
        """Block until the files of the last `save` are written."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise PipelineError(failure)

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, error_type, error, traceback) -> bool:
        """Wait for the last write. When another error ends the block, that error goes on, and a failed write is
        printed rather than hiding it."""
        if error_type is None:
            self.wait()
        else:
            try:
                self.wait()
            except PipelineError as write_error:
                print(f"error: {write_error}", file=sys.stderr)
        return False


def save_npz(target: str | os.PathLike, **arrays: np.ndarray) -> None:
    # The suffix keeps numpy from appending a second ".npz" to the temporary name.
    with atomic_path(target, suffix=".npz") as temp_path:
        np.savez(temp_path, **arrays)


def write_text(target: str | os.PathLike, text: str) -> None:
    with atomic_path(target) as temp_path:
        temp_path.write_text(text, encoding="utf-8")


def write_json(target: str | os.PathLike, obj: object) -> None:
    write_text(target, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_of_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
