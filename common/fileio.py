"""Atomic writes: a result file is either the old complete one or the new complete one, never half-written.

Each writer writes to a temporary file in the destination folder and renames it over the target;
rename within one file system is atomic on POSIX and Windows (os.replace).
"""

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch


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


def save_torch(obj: dict, target: str | os.PathLike) -> None:
    with atomic_path(target) as temp_path:
        torch.save(obj, temp_path)


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
