"""Atomic writes: a result file is either the old complete one or the new complete one, never half-written.

Each writer writes to a temporary file in the destination folder and renames it over the target;
rename within one file system is atomic on POSIX and Windows (os.replace). A write that fails because the disk is
full stops with a one-line PipelineError naming the file. A temporary left by a killed process is removed by the
next run (`remove_stale_temporaries`).
"""

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from common.core.errors import DISK_FULL_ERRNOS, PipelineError, message_of

try:
    import fcntl  # POSIX only: the lock that marks a temporary as in use
except ImportError:  # Windows: temporaries are neither locked nor cleaned up
    fcntl = None

# What torch.save's C++ writer raises (as a RuntimeError, without errno) when a write comes up short.
TORCH_WRITE_FAILURES = ("unexpected pos", "file write failed")
# `.<target name>.<pid>.<8 random characters from tempfile><suffix>`: the temporaries this module makes.
TEMPORARY_NAME = re.compile(r"^\..+\.\d+\.[a-z0-9_]{8}(\.[A-Za-z0-9.]+)?$")
SCRATCH_SUFFIX = ".scratch"  # a scratch folder's name ends so (see scratch_folder)
# A temporary is unlocked between its creation and the lock call (microseconds); one untouched for this long is
# past that moment.
STALE_AFTER_SECONDS = 60


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def disk_full_message(error: BaseException, target: Path, *, what: str | None = None) -> str | None:
    """The one-line message for a write of `target` that failed for want of space; None for any other failure.
    `what` names the files when the write was one of several (default: `target` itself)."""
    if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
        reason = error.strerror
    elif isinstance(error, RuntimeError) and any(marker in str(error) for marker in TORCH_WRITE_FAILURES):
        first_line = (str(error).strip().splitlines() or [""])[0]
        reason = f"torch: {first_line}; most likely no space left on the device"
    else:
        return None
    previous = f"the previous {target.name}, if any," if what is None else "the previous ones, if any,"
    return (f"the disk is full: cannot write {what or target} ({reason}); {previous} and all earlier results are "
            "intact; free space and rerun")


@contextlib.contextmanager
def disk_full_as_pipeline_error(target: Path, *, what: str | None = None) -> Iterator[None]:
    """Turn a failed write of `target` for want of space into a PipelineError; other errors pass unchanged."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        message = disk_full_message(error, target, what=what)
        if message is None:
            raise
        raise PipelineError(message) from error


def _temporary_prefix(name: str) -> str:
    # The pid tells a person which process made a temporary; whether it is still in use is told by its lock.
    return f".{name}.{os.getpid()}."


def _mark_in_use(handle: int) -> None:
    """Hold an exclusive flock on the open temporary until the handle is closed. The kernel drops the lock when
    the process ends in any way (kill -9 included), so an unlocked temporary has no live writer."""
    with contextlib.suppress(OSError):  # a file system without flock: the temporary is simply never cleaned
        fcntl.flock(handle, fcntl.LOCK_EX)


@contextlib.contextmanager
def scratch_file(folder: str | os.PathLike, name: str, suffix: str = ".tmp") -> Iterator[Path]:
    """A new empty file `.<name>.<pid>.<random><suffix>` in `folder`, in use (locked) until it is removed on exit.
    Running out of space in the block is a PipelineError naming `folder / name`."""
    folder = Path(folder)
    with disk_full_as_pipeline_error(folder / name):
        folder.mkdir(parents=True, exist_ok=True)
        handle, temp_name = tempfile.mkstemp(prefix=_temporary_prefix(name), suffix=suffix, dir=folder)
    temp_path = Path(temp_name)
    if fcntl is None:  # Windows cannot rename or remove a file that is open
        os.close(handle)
    else:
        _mark_in_use(handle)  # writers open the path anew; this read-write handle only holds the lock
    try:
        with disk_full_as_pipeline_error(folder / name):
            yield temp_path
    finally:
        temp_path.unlink(missing_ok=True)
        if fcntl is not None:
            os.close(handle)


def check_writable_folder(folder: str | os.PathLike, *, option: str) -> None:
    """Stop before any work, in one line, when `folder` (given as `option`) cannot hold results: a file stands at
    its place or above it, or the folder (or the nearest one above it that exists, where it would be made) cannot be
    written to: read-only file system, no permission. Nothing is created."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise PipelineError(f"{option} {folder}: {existing} is a file, not a folder; pass a folder")
    try:  # trying is the only sure test (os.access says yes to root on a read-only mount); O_TMPFILE: no name made
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise PipelineError(f"{option} {folder}: cannot write in {existing} ({error.strerror}); pass a folder you "
                            "can write to") from None


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it replaces `target`, on error it is removed.
    Running out of space anywhere in the block is a PipelineError naming `target`."""
    target = Path(target)
    with scratch_file(target.parent, target.name, suffix or ".tmp") as temp_path:
        yield temp_path
        os.chmod(temp_path, 0o666 & ~_current_umask())  # mkstemp makes 0600; results are for the whole group
        os.replace(temp_path, target)


@contextlib.contextmanager
def scratch_folder(parent: str | os.PathLike, name: str) -> Iterator[Path]:
    """A new empty folder `.<name>.<pid>.<random>.scratch` in `parent` (with the permissions mkdir gives: it may be
    renamed into place as a result folder), in use (locked) until the block ends; then removed if still there.
    One that a killed process left is removed by the next `remove_stale_temporaries(parent)`."""
    parent = Path(parent)
    with disk_full_as_pipeline_error(parent / name):
        parent.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=_temporary_prefix(name), suffix=SCRATCH_SUFFIX, dir=parent))
    os.chmod(folder, 0o777 & ~_current_umask())  # mkdtemp makes 0700
    handle = os.open(folder, os.O_RDONLY) if fcntl is not None else None
    if handle is not None:
        _mark_in_use(handle)  # the lock is on the folder itself: it stays with it through a rename
    try:
        with disk_full_as_pipeline_error(parent / name):
            yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # gone already if it was renamed into place
        if handle is not None:
            os.close(handle)


def remove_stale_temporaries(folder: str | os.PathLike, *, name: str | None = None) -> list[Path]:
    """Remove the temporary files and scratch folders that killed runs left in `folder` (only those made for `name`,
    when given: a shared folder such as /tmp); return their paths.

    Safe beside live runs in the same folder, this process's own writer thread included: a temporary in use is
    locked from its creation until it is renamed or removed (`scratch_file`), so one that can be locked here has
    no live writer. flock conflicts between any two open files, in one process or two, and works on NFS (Linux
    emulates it with byte-range locks). The moment before the lock is taken is covered by STALE_AFTER_SECONDS.
    """
    folder = Path(folder)
    if fcntl is None or not folder.is_dir():
        return []
    removed, freed = [], 0
    with os.scandir(folder) as entries:
        candidates = [Path(entry.path) for entry in entries if TEMPORARY_NAME.match(entry.name)
                      and (name is None or entry.name.startswith(f".{name}.")) and (
            entry.is_file(follow_symlinks=False)
            or entry.name.endswith(SCRATCH_SUFFIX) and entry.is_dir(follow_symlinks=False))]
    for path in candidates:
        size = _remove_if_stale(path)
        if size is not None:
            removed.append(path)
            freed += size
    if removed:
        print(f"removed {len(removed)} temporary file(s) or folder(s) that an interrupted run left in {folder} "
              f"({freed / 2**20:.1f} MiB)")
    return removed


def _remove_if_stale(path: Path) -> int | None:
    """Remove `path` when no process holds its lock and it is older than STALE_AFTER_SECONDS; return the bytes
    freed, or None when it was kept."""
    try:
        handle = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:  # renamed or removed meanwhile, or not ours to read: not ours to remove either
        return None
    try:
        # Shared: conflicts with the writer's exclusive lock, and NFS grants it on a read-only handle.
        fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)  # BlockingIOError: a live process holds it
        opened = os.fstat(handle)
        current = os.stat(path, follow_symlinks=False)
        if time.time() - opened.st_mtime < STALE_AFTER_SECONDS or \
                (current.st_dev, current.st_ino) != (opened.st_dev, opened.st_ino):  # young, or renamed meanwhile
            return None
        if path.is_dir():
            size = sum(file.stat().st_size for file in path.rglob("*") if file.is_file())
            shutil.rmtree(path)
            return size
        path.unlink()
        return opened.st_size
    except OSError:
        return None
    finally:
        os.close(handle)


def create_memmap(path: Path, *, dtype, shape: tuple[int, ...]) -> np.memmap:
    """A new .npy file of `shape` mapped for writing, its disk space reserved first. Without the reservation the
    file is sparse, and a write through the map onto a full disk kills the process with SIGBUS (no exception,
    no clean-up); the reservation fails instead with ENOSPC, an error the caller's atomic_path (or
    scratch_file) reports."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    if hasattr(os, "posix_fallocate"):  # not on macOS or Windows: there the map is written as before
        with open(path, "r+b") as handle:
            try:
                os.posix_fallocate(handle.fileno(), 0, os.fstat(handle.fileno()).st_size)
            except OSError as error:
                if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system that cannot reserve
                    raise
    return array


@contextlib.contextmanager
def written_together(targets: list[Path]) -> Iterator[list[Path]]:
    """Yield a temporary path per target, for files that belong together. When the block succeeds they are renamed
    over their targets in the given order; when it fails (an error, a full disk, Ctrl-C) they are all removed and
    every old file stays as it was. The renames are separate steps, so a process killed between two of them leaves
    a mix: make the last target a record of the others' digests, and have readers check it."""
    with contextlib.ExitStack() as stack:
        # ExitStack leaves its contexts last in, first out: entered in reverse, they rename in the given order.
        temps = [stack.enter_context(atomic_path(target, suffix=Path(target).suffix)) for target in reversed(targets)]
        # Named here, innermost: each atomic_path would name its own target, whichever of the files failed.
        folder = Path(targets[0]).parent
        names = ", ".join(Path(target).name for target in targets)
        with disk_full_as_pipeline_error(folder, what=f"{names} in {folder} (one of them)"):
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
            except PipelineError as error:  # disk full: the message names the file already
                self._failure = message_of(error)
                return
            except Exception as error:  # permissions, a missing folder: reported by the training thread
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
