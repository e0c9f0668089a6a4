"""The processed-tensor cache: ``<root>/processed/<stem>.pt``, one file per dataset setting.

Raw data are parsed once; later loads read one ``torch.load(weights_only=True)`` file. The file
stores a key (every setting its contents depend on, see ``DatasetSpec.cache_key``) and a format
number, so a cache written for other settings or by an older layout is rebuilt, never trusted.
Writes go through :mod:`msr.atomic` (unique temp file + rename): a killed job or two concurrent jobs
never leave a half-written cache.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from msr import atomic

# Bumped whenever the processed-cache contents change meaning; an old cache is then rebuilt.
CACHE_FORMAT = 1

_TENSORS = ("train_x", "train_y", "test_x", "test_y")


def path(root: str | Path, stem: str) -> Path:
    return Path(root) / "processed" / f"{stem}.pt"


def read(path: Path, *, expected_key: str) -> dict[str, Any] | None:
    """The cached payload, or None (with a warning) if it is missing, unreadable or stale."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        warnings.warn(f"ignoring unreadable dataset cache {path} ({exc}); rebuilding", stacklevel=4)
        return None
    ok = (
        isinstance(payload, dict)
        and payload.get("format") == CACHE_FORMAT
        and payload.get("key") == expected_key
        and all(isinstance(payload.get(k), torch.Tensor) for k in _TENSORS)
        and payload["train_x"].dtype == torch.uint8
        and payload["test_x"].dtype == torch.uint8
        and payload["train_y"].dtype == torch.int64
        and payload["test_y"].dtype == torch.int64
    )
    if not ok:
        warnings.warn(f"ignoring stale or foreign dataset cache {path}; rebuilding", stacklevel=4)
        return None
    return payload


def obtain(
    path: Path, *, name: str, key: str, build: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """The payload from a valid cache at ``path``, else ``build()``'s, written there atomically.

    Nothing is written when ``build`` raises, so a failed build leaves ``processed/`` as it was.
    """
    payload = read(path, expected_key=key)
    if payload is None:
        payload = build()
        payload["format"] = CACHE_FORMAT
        payload["name"] = name
        payload["key"] = key
        atomic.torch_save(path, payload)
    return payload
