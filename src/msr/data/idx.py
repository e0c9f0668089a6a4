"""The IDX file format of (Fashion-)MNIST, parsed and validated.

An IDX file is a big-endian header - a 4-byte magic ``0x0000 TT DD`` (``TT`` the element type,
``0x08`` = unsigned byte; ``DD`` the number of dimensions) followed by one uint32 per dimension
- and then the elements, row-major. Images are ``0x00000803`` (count, rows, cols), labels
``0x00000801`` (count). We read them with numpy rather than torchvision's reader so that every
defect of a file (wrong magic, truncation, trailing bytes, wrong image size, bad labels) is a
:class:`~msr.data.base.DatasetError` naming the file and what was expected.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

from msr.data.base import DatasetError, TooLarge

IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension
_KIND = {IMAGES_MAGIC: "images (ubyte, 3 dims)", LABELS_MAGIC: "labels (ubyte, 1 dim)"}


_CHUNK = 1 << 20


def read_gz(path: Path, *, max_bytes: int) -> bytes:
    """The decompressed content of a ``.gz`` file, streamed and never beyond ``max_bytes`` (the
    official file's size): more is a :class:`~msr.data.base.TooLarge` error as soon as the limit
    is passed, so a gzip bomb costs ``max_bytes`` of memory, not what it expands to. A corrupt
    or cut archive is a DatasetError."""
    out = bytearray()
    try:
        with gzip.open(path, "rb") as f:
            # one byte past the limit is enough to know the content is too large
            while chunk := f.read(min(_CHUNK, max_bytes + 1 - len(out))):
                out += chunk
                if len(out) > max_bytes:
                    raise TooLarge(
                        f"{path}: decompresses to more than {max_bytes} bytes, the size of the file it "
                        f"should be; stopped reading there (another file, or a decompression bomb): "
                        f"delete it or replace it with a good copy"
                    )
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(f"{path}: not a readable gzip file ({exc})") from exc
    return bytes(out)


def _header(data: bytes, where: str, magic: int) -> list[int]:
    ndim = magic & 0xFF
    size = 4 * (1 + ndim)
    if len(data) < 4:
        raise DatasetError(f"{where}: truncated IDX file ({len(data)} bytes, no header)")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        what = _KIND.get(found, "not an IDX ubyte file")
        raise DatasetError(
            f"{where}: bad IDX magic 0x{found:08x} ({what}), expected 0x{magic:08x} ({_KIND[magic]})"
        )
    if len(data) < size:
        raise DatasetError(
            f"{where}: truncated IDX header ({len(data)} bytes, need {size} for {ndim} dims)"
        )
    return [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]


def _body(data: bytes, where: str, dims: list[int], what: str) -> np.ndarray:
    """The ``prod(dims)`` bytes after the header; ``what`` names them for errors."""
    start = 4 * (1 + len(dims))
    need = int(np.prod(dims, dtype=np.int64))
    have = len(data) - start
    if have < need:
        raise DatasetError(
            f"{where}: truncated: the header announces {what} ({need} bytes) but only {have} "
            f"bytes follow"
        )
    if have > need:
        raise DatasetError(f"{where}: {have - need} unexpected bytes after {what}")
    return np.frombuffer(data, dtype=np.uint8, count=need, offset=start)


def parse_images(data: bytes, where: str, *, rows: int, cols: int) -> torch.Tensor:
    """IDX image bytes -> uint8 ``(N, 1, rows, cols)``; dimensions must be ``rows x cols``."""
    count, r, c = _header(data, where, IMAGES_MAGIC)
    if (r, c) != (rows, cols):
        raise DatasetError(f"{where}: images are {r}x{c}, expected {rows}x{cols}")
    pixels = _body(data, where, [count, r, c], f"{count} images of {r}x{c}")
    return torch.from_numpy(pixels.copy()).reshape(count, 1, r, c)


def parse_labels(data: bytes, where: str, *, num_classes: int) -> torch.Tensor:
    """IDX label bytes -> int64 ``(N,)``; every label must be in ``[0, num_classes)``."""
    (count,) = _header(data, where, LABELS_MAGIC)
    labels = _body(data, where, [count], f"{count} labels")
    if count and int(labels.max()) >= num_classes:
        bad = np.flatnonzero(labels >= num_classes)
        raise DatasetError(
            f"{where}: labels out of range [0, {num_classes}): {len(bad)} of {count}, "
            f"first at index {bad[0]} (value {labels[bad[0]]})"
        )
    return torch.from_numpy(labels.astype(np.int64))
