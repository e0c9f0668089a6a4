"""``fashion_mnist``: Zalando's Fashion-MNIST, grey 28x28 garments (sizes and classes: msr.catalog).

Four gzipped IDX files (:mod:`msr.data.idx`), looked for in this order, file by file:

1. ``<root>/raw/fashion-mnist/`` - already there (copied or downloaded before, or put there by
   the user);
2. a local mirror folder holding the same four files - default :data:`DEFAULT_MIRROR`, where
   Debian's ``dataset-fashion-mnist`` package installs them; ``mirror=DIR`` / ``msr prepare
   --mirror DIR`` for a shared filesystem - copied into ``raw/``;
3. the official download, from torchvision's list of Fashion-MNIST mirrors, each ``.gz``
   checked against torchvision's md5.

Integrity is checked on the **decompressed** content (byte count and md5, :data:`CONTENT`),
not on the ``.gz`` bytes: Debian recompressed the archives, so their ``.gz`` md5s differ from
the official ones while the data are identical (measured from Debian's dataset-fashion-mnist: the table below). Files copied or
downloaded are staged under temporary names and verified before any is renamed into ``raw/``;
a mismatch leaves ``raw/`` and ``processed/`` as they were and names the file, the expected and
the actual checksum.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from msr import catalog
from msr.data import fetch, idx
from msr.data.base import (
    DatasetError,
    DatasetSpec,
    InputPipeline,
    TooLarge,
    histogram_stats,
    train_stats_pipeline,
)

NAME = "fashion_mnist"
RAW_FOLDER = "fashion-mnist"
DEFAULT_MIRROR = "/usr/share/datasets/fashion-mnist"
IMAGE_SIZE = catalog.DATASETS[NAME].native_size
NUM_CLASSES = catalog.DATASETS[NAME].num_classes

# split -> (images file, labels file), names without ".gz" (as in the official distribution)
SPLITS: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FILES: tuple[str, ...] = tuple(f for pair in SPLITS.values() for f in pair)

# Decompressed content of the official files: (bytes, md5). Measured on Debian's package and
# equal to the official data (measured from Debian's package). Read at call time, so tests can inject a table for
# small generated files; it is also part of the cache key.
CONTENT: dict[str, tuple[int, str]] = {
    "train-images-idx3-ubyte": (47_040_016, "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
    "train-labels-idx1-ubyte": (60_008, "9018921c3c673c538a1fc5bad174d6f9"),
    "t10k-images-idx3-ubyte": (7_840_016, "8181f5470baa50b63fa0f6fddb340f0a"),
    "t10k-labels-idx1-ubyte": (10_008, "15d484375f8d13e6eb1aabb0c3f46965"),
}

# Random crop with 2 pixels of zero padding (shifts of up to +-2, 7% of the side), not CIFAR's 4:
# Fashion-MNIST garments were trimmed and scaled so their longer side spans the whole 28-pixel
# frame, whereas CIFAR objects sit in background. A 4-pixel shift (14%) would regularly cut off
# sleeves, hems and collars - the very parts that tell shirt, T-shirt, pullover and coat apart -
# while 2 pixels still moves every garment against the frame.
CROP_PADDING = 2
# Horizontal flips are label-preserving here: a mirrored shirt, dress or bag is the same class,
# and a mirrored shoe (all point left in the data) is still a sandal, sneaker or boot. (Digits,
# by contrast, are not flipped.)
FLIP = True


def official_sources() -> tuple[list[str], dict[str, str]]:
    """torchvision's Fashion-MNIST mirrors and the official ``.gz`` md5s, by file name."""
    from torchvision.datasets import FashionMNIST

    return list(FashionMNIST.mirrors), dict(FashionMNIST.resources)


def gz_limit(name: str) -> int:
    """The most bytes a ``.gz`` of ``name``'s official content can take: deflate grows
    incompressible data by a few bytes per 16 KB block at most (zlib's deflateBound), plus the
    gzip header - so anything larger is not that file, whatever it decompresses to."""
    size = CONTENT[name][0]
    return size + size // 256 + 65_536


def _content_md5(path: Path, name: str) -> tuple[int, str]:
    """Byte count and md5 of a ``.gz`` file's decompressed content, streamed and stopped one
    byte past the official size (a bomb is never expanded: a count above the official size
    means "more than that")."""
    limit = CONTENT[name][0]
    h = hashlib.md5(usedforsecurity=False)
    n = 0
    try:
        with gzip.open(path, "rb") as f:
            while n <= limit and (chunk := f.read(min(1 << 20, limit + 1 - n))):
                h.update(chunk)
                n += len(chunk)
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(f"{path}: not a readable gzip file ({exc})") from exc
    return n, h.hexdigest()


def _content_mismatch(name: str, got: tuple[int, str]) -> str | None:
    """None if ``got`` is the official content of ``name``, else what differs."""
    size, md5 = CONTENT[name]
    if got == (size, md5):
        return None
    if got[0] > size:
        return (f"expected {size} bytes with md5 {md5}, got more than {size} bytes (reading stopped "
                f"there: another file, or a decompression bomb)")
    return f"expected {size} bytes with md5 {md5}, got {got[0]} bytes with md5 {got[1]}"


class FashionMNIST(DatasetSpec):
    name = NAME
    sources = (
        f"raw/{RAW_FOLDER}/ (the four *-ubyte.gz files)",
        f"mirror folder (default {DEFAULT_MIRROR}, Debian's dataset-fashion-mnist; --mirror DIR), copied into raw/",
        "download from torchvision's Fashion-MNIST mirrors (official .gz md5)",
    )

    def settings(self, image_size: int | None, options: Mapping[str, Any] | None) -> dict[str, Any]:
        if image_size not in (None, IMAGE_SIZE):
            raise ValueError(
                f"{NAME} images are {IMAGE_SIZE}x{IMAGE_SIZE}; got image_size={image_size!r}"
            )
        return {}

    def cache_stem(self, settings: Mapping[str, Any]) -> str:
        return NAME

    def cache_key(self, settings: Mapping[str, Any]) -> str:
        return json.dumps({"name": NAME, "content": {f: list(CONTENT[f]) for f in FILES}})

    def pipeline(self, train_x: torch.Tensor) -> InputPipeline:
        return train_stats_pipeline(
            train_x, flip=FLIP, crop_padding=CROP_PADDING, stats=histogram_stats
        )

    # ---------------------------------------------------------------------------- raw files

    def download(self, root: Path, *, mirror: str | Path | None = None) -> None:
        self.ensure_raw(root, mirror=mirror, allow_download=True)

    def ensure_raw(
        self, root: Path, *, mirror: str | Path | None, allow_download: bool
    ) -> dict[str, str]:
        """Make all four files present in ``<root>/raw/fashion-mnist/``; return, per file,
        where it came from. Files already there are used as they are (verified when parsed);
        missing ones are taken from the mirror, else downloaded - all staged and verified
        before any is renamed into place."""
        folder = Path(root) / "raw" / RAW_FOLDER
        origin = {f: f"{folder} (already there)" for f in FILES if (folder / f"{f}.gz").is_file()}
        missing = [f for f in FILES if f not in origin]
        if not missing:
            return origin
        mirror_dir = Path(DEFAULT_MIRROR if mirror is None else mirror)
        if mirror is not None and not mirror_dir.is_dir():
            raise DatasetError(f"mirror folder {mirror_dir} does not exist (given as mirror)")
        with fetch.Staging(folder) as stage:
            for name in missing:
                target = folder / f"{name}.gz"
                source = mirror_dir / f"{name}.gz"
                if source.is_file():
                    origin[name] = self._copy_from_mirror(source, stage.temp(target), name)
                elif allow_download:
                    origin[name] = self._download(stage.temp(target), name)
                else:
                    raise DatasetError(
                        f"{NAME}: {name}.gz is neither in {folder}/ nor in the mirror "
                        f"{mirror_dir}/, and download is off. Install Debian's "
                        f"dataset-fashion-mnist (apt-get install dataset-fashion-mnist), pass "
                        f"--mirror DIR, or allow the download"
                    )
            stage.commit()
        return origin

    def _copy_from_mirror(self, source: Path, tmp: Path, name: str) -> str:
        size = source.stat().st_size
        if size > gz_limit(name):
            raise TooLarge(
                f"mirror file {source} is {size} bytes, more than any gzip of the official {name} "
                f"({CONTENT[name][0]} bytes) can be; nothing was copied. Repair or remove the mirror "
                f"copy, or pass another --mirror"
            )
        shutil.copyfile(source, tmp)
        problem = _content_mismatch(name, _content_md5(tmp, name))
        if problem:
            raise DatasetError(
                f"mirror file {source} is not the official {name} content ({problem}); nothing "
                f"was copied. Repair or remove the mirror copy, or pass another --mirror"
            )
        return f"mirror {source}"

    def _download(self, tmp: Path, name: str) -> str:
        mirrors, md5s = official_sources()
        archive = f"{name}.gz"
        failures = []
        for base in mirrors:
            url = f"{base.rstrip('/')}/{archive}"
            try:
                fetch.fetch(url, tmp, max_bytes=gz_limit(name))
            except fetch.DownloadFailed as exc:
                failures.append(str(exc))
                continue
            actual = fetch.md5_file(tmp)
            if actual != md5s[archive]:
                detail = f"expected md5 {md5s[archive]}, got {actual}"
                failures.append(str(fetch.download_mismatch(url, archive, detail)))
                tmp.unlink(missing_ok=True)
                continue
            problem = _content_mismatch(name, _content_md5(tmp, name))
            if problem:
                tmp.unlink(missing_ok=True)
                failures.append(str(fetch.download_mismatch(url, f"{name} content", problem)))
                continue
            return f"download {url}"
        raise DatasetError(
            f"{NAME}: could not download {archive} from any of {len(mirrors)} mirror(s): "
            f"{' | '.join(failures)}. Offline, install Debian's dataset-fashion-mnist or pass "
            f"--mirror DIR"
        )

    # ---------------------------------------------------------------------------- parsing

    def build(
        self,
        root: Path,
        settings: Mapping[str, Any],
        *,
        allow_download: bool,
        mirror: str | Path | None,
    ) -> dict[str, Any]:
        origin = self.ensure_raw(root, mirror=mirror, allow_download=allow_download)
        folder = Path(root) / "raw" / RAW_FOLDER
        tensors: dict[str, torch.Tensor] = {}
        verified: dict[str, dict[str, Any]] = {}
        for split, (images_name, labels_name) in SPLITS.items():
            contents = {}
            for name in (images_name, labels_name):
                path = folder / f"{name}.gz"
                content = idx.read_gz(path, max_bytes=CONTENT[name][0])  # streamed, capped
                got = (len(content), hashlib.md5(content, usedforsecurity=False).hexdigest())
                problem = _content_mismatch(name, got)
                if problem:
                    # staged files were verified on the way in: this one was already in raw/
                    raise fetch.preplaced_mismatch(path, f"the official {name} content", problem)
                contents[name] = content
                verified[name] = {"bytes": got[0], "md5": got[1], "from": origin[name]}
            x = idx.parse_images(
                contents[images_name], str(folder / f"{images_name}.gz"), rows=IMAGE_SIZE, cols=IMAGE_SIZE
            )
            y = idx.parse_labels(
                contents[labels_name], str(folder / f"{labels_name}.gz"), num_classes=NUM_CLASSES
            )
            if len(x) != len(y):
                raise DatasetError(
                    f"{folder}: {images_name}.gz has {len(x)} images but {labels_name}.gz has "
                    f"{len(y)} labels"
                )
            tensors[f"{split}_x"], tensors[f"{split}_y"] = x, y
        return {**tensors, "num_classes": NUM_CLASSES, "provenance": {"files": verified}}


SPEC = FashionMNIST()
