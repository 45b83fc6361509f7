"""Writing files so that a reader never sees half of one: the one atomic-write helper that
checkpoints, caches, shards and run outputs all use.

A file is written to a temporary name in the same folder, flushed and fsynced, renamed over the
target (os.replace is atomic on POSIX), and the folder is fsynced so that the rename survives a
crash. Nothing here imports torch.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np


def fsync_dir(path: Path) -> None:
    """Make renames/creations in ``path`` durable (not supported on every platform/filesystem)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def json_bytes(obj: Any, indent: int | None = 2) -> bytes:
    def default(x: Any) -> Any:
        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, np.ndarray):
            return x.tolist()
        if isinstance(x, Path):
            return str(x)
        raise TypeError(f"{type(x).__name__} is not JSON-serialisable")

    # NaN (e.g. AUROC of a single-class split) is kept as Python's JSON extension, read back as NaN.
    return json.dumps(obj, indent=indent, default=default).encode()


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write a file so that readers see either the old file or the complete new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        _write_bytes(tmp, data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """JSON, written with write_bytes_atomic."""
    write_bytes_atomic(path, json_bytes(obj))
