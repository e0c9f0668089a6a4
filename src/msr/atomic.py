"""Atomic file writes: a reader (or a killed job) never sees a half-written file.

A full disk (or quota) is reported as :class:`NoSpaceError`, one line naming the file that
could not be written, whatever wrote it (a Python file, pandas, torch).
"""

from __future__ import annotations

import errno
import io
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


class NoSpaceError(OSError):
    """The device holding ``path`` is full (ENOSPC) or over quota (EDQUOT)."""

    def __init__(self, path: str | Path, code: int = errno.ENOSPC):
        super().__init__(code, os.strerror(code), str(path))
        self.path = Path(path)

    def __str__(self) -> str:
        return f"No space left on device: {self.path}; free space and rerun"


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``.

    The rename is atomic on POSIX file systems, so ``path`` holds either the old or the new
    content, never a mix. The temporary file is removed if ``write`` fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # unique, so concurrent jobs never share a temp file; not mkstemp, whose 0600 mode would
    # hide results from a group sharing the folder
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and not isinstance(err, NoSpaceError) and err.errno in _NO_SPACE:
            raise NoSpaceError(path, err.errno) from None
        raise
    return path


def write_bytes(path: str | Path, data: bytes | memoryview) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=True) + "\n")


def torch_save(path: str | Path, obj: Any) -> Path:
    """``torch.save`` atomically. Serialized in memory first: torch's own file writer turns a
    full disk into an opaque RuntimeError, a plain write raises the real ENOSPC."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return write_bytes(path, buf.getbuffer())
