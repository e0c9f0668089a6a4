"""Datasets by name and a device-resident loader.

Every dataset becomes the same thing: uint8 image tensors ``(N, C, H, W)`` plus int64 labels,
prepared once and cached under ``<root>/processed/``. Keeping the raw bytes (not floats) is what
lets a whole split live on the accelerator: CIFAR-10's 50k training images are 150 MB as
uint8. :class:`DeviceLoader` then does what a DataLoader with per-sample transforms would do -
shuffle, random crop with zero padding, horizontal flip, normalization - as a few batched tensor
operations on that device, with no worker processes and no per-sample Python.

Datasets (see :data:`DATASETS`):

``digits``
    scikit-learn's bundled handwritten digits (1797 grey 8x8 images, 10 classes), offline. A
    fixed stratified 80/20 split (:data:`DIGITS_TEST_FRACTION`, :data:`DIGITS_SPLIT_SEED`),
    optionally upsampled to 16 (default) or 32 pixels.
``cifar10`` / ``cifar100``
    The official python-format archives, downloaded with torchvision's utilities, verified by
    md5 and extracted under ``<root>/raw/``; the pickled batches are parsed here, with their
    shapes and label ranges checked. An already-extracted folder is used without any network.
``synthetic``
    Generated, learnable images of any size, channel count and class count, deterministic for
    a seed - for tests and smoke runs. :func:`write_cifar_batches` writes such images in the
    exact CIFAR file layout so the CIFAR code path can be tested without internet.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import math
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.parse
import urllib.request
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from msr import io as msr_io

__all__ = [
    "CIFAR10_MD5",
    "CIFAR10_URL",
    "CIFAR100_MD5",
    "CIFAR100_URL",
    "DATASETS",
    "DIGITS_IMAGE_SIZES",
    "DIGITS_SPLIT_SEED",
    "DIGITS_TEST_FRACTION",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SYNTHETIC_DEFAULTS",
    "Dataset",
    "DatasetError",
    "DeviceLoader",
    "cache_path",
    "download",
    "load_dataset",
    "normalize",
    "prepare",
    "write_cifar_batches",
]

DATASETS: tuple[str, ...] = ("digits", "cifar10", "cifar100", "synthetic")

# Official archives (https://www.cs.toronto.edu/~kriz/cifar.html). Module constants, read at call
# time, so tests can point them at a local file:// archive.
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"

# METHOD.md: "ImageNet mean/std input normalization" for CIFAR (not CIFAR's own statistics).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# The digits split: sklearn.model_selection.train_test_split(indices, test_size=0.2,
# stratify=labels, random_state=0) over the 1797 images -> 1437 train / 360 test. Both index
# lists are then sorted, so a split's order is the dataset's order. Changing either constant
# changes every digits result; they are part of the experiment's definition.
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
DIGITS_IMAGE_SIZES: tuple[int, ...] = (8, 16, 32)
DIGITS_DEFAULT_IMAGE_SIZE = 16

SYNTHETIC_DEFAULTS: Mapping[str, int] = {
    "n_train": 1000,
    "n_test": 200,
    "channels": 3,
    "image_size": 16,
    "num_classes": 10,
    "seed": 0,
}

CIFAR_IMAGE_SIZE = 32
CIFAR_CROP_PADDING = 4

# Bumped whenever the processed-cache contents change meaning; an old cache is then rebuilt.
_CACHE_FORMAT = 1

# Tags that separate the random streams derived from one user seed.
_STREAM_LOADER = 0x10AD
_STREAM_SYNTH_TEMPLATES = 0x7E31
_STREAM_SYNTH_TRAIN = 0x7A19
_STREAM_SYNTH_TEST = 0x7E57


class DatasetError(Exception):
    """A dataset cannot be obtained or read: failed download, bad checksum, corrupt file.

    Distinct from ``ValueError`` (a bad argument) so callers can tell "your request is wrong"
    from "the data on disk or on the network is wrong"; the message always names the file or
    URL at fault and what was expected.
    """


@dataclass
class Dataset:
    """One dataset's two splits as CPU uint8 images and int64 labels, plus how to feed them.

    ``mean``/``std`` (per channel, in [0, 1] units), ``flip`` and ``crop_padding`` describe the
    input pipeline that belongs to the data - they are passed straight to :class:`DeviceLoader`.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip: bool
    crop_padding: int

    @property
    def in_channels(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train_x.shape[-1])


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


def load_dataset(
    name: str,
    root: str | Path = "data",
    *,
    image_size: int | None = None,
    download: bool = True,
    synthetic_kwargs: Mapping[str, int] | None = None,
) -> Dataset:
    """Load dataset ``name``, preparing (and for CIFAR downloading) it on first use.

    The processed cache ``<root>/processed/...`` (see :func:`cache_path`) is used when present;
    otherwise it is built and written, so the raw data are parsed once.

    ``image_size``: digits 8, 16 (default) or 32; CIFAR only 32; synthetic any (same as
    ``synthetic_kwargs["image_size"]``). ``synthetic_kwargs``: keys of
    :data:`SYNTHETIC_DEFAULTS` (only for ``synthetic``).
    """
    _, payload = _obtain(name, Path(root), image_size, download, synthetic_kwargs)
    return _to_dataset(name, payload)


def prepare(
    name: str,
    root: str | Path = "data",
    *,
    image_size: int | None = None,
    download: bool = True,
    synthetic_kwargs: Mapping[str, int] | None = None,
) -> Path:
    """Build the processed cache for ``name`` if it is missing or stale; return its path.

    This is the pipeline's ``prepare`` step. The cache is written atomically (temp file +
    ``os.replace``), so a killed job or two concurrent jobs never leave a half-written file.
    """
    path, _ = _obtain(name, Path(root), image_size, download, synthetic_kwargs)
    return path


def cache_path(
    name: str,
    root: str | Path = "data",
    *,
    image_size: int | None = None,
    synthetic_kwargs: Mapping[str, int] | None = None,
) -> Path:
    """Where :func:`prepare` puts ``name``: ``<root>/processed/<name>[-<tag>].pt``.

    The file name identifies everything its contents depend on: ``digits-16.pt``,
    ``cifar10.pt``, ``synthetic.pt`` (default settings) or ``synthetic-<hash>.pt`` (others).
    """
    _check_name(name)
    stem = name
    if name == "digits":
        stem = f"digits-{_digits_size(image_size)}"
    elif name in ("cifar10", "cifar100"):
        _cifar_size(name, image_size)
    elif name == "synthetic":
        kwargs = _synthetic_settings(synthetic_kwargs, image_size)
        if kwargs != dict(SYNTHETIC_DEFAULTS):
            digest = hashlib.sha1(json.dumps(kwargs, sort_keys=True).encode()).hexdigest()
            stem = f"synthetic-{digest[:12]}"
    return Path(root) / "processed" / f"{stem}.pt"


def download(name: str, root: str | Path = "data") -> None:
    """Fetch, verify and extract a CIFAR archive into ``<root>/raw/``; no-op for other datasets.

    If the extracted folder is already there, nothing is fetched - that is how an offline
    machine (or a test) supplies the data. A failed download or md5 mismatch deletes the
    partial file and raises :class:`DatasetError` naming the URL and the expected md5.
    Extraction goes through a temporary folder, so the final folder appears only when complete.
    """
    _check_name(name)
    if name not in ("cifar10", "cifar100"):
        return
    from torchvision.datasets.utils import calculate_md5, check_integrity

    src = _cifar_source(name)
    raw = Path(root) / "raw"
    if (raw / src.folder).is_dir():
        return
    raw.mkdir(parents=True, exist_ok=True)
    archive = raw / src.archive
    if not check_integrity(str(archive), src.md5):
        archive.unlink(missing_ok=True)
        partial = _unique_sibling(archive, ".part")
        try:
            _fetch(src.url, partial)
        except BaseException as exc:
            partial.unlink(missing_ok=True)
            if not isinstance(exc, Exception):
                raise  # KeyboardInterrupt and friends: cleaned up, not rewrapped
            raise DatasetError(
                f"download of {src.url} failed ({type(exc).__name__}: {exc}); expected md5 "
                f"{src.md5}. The partial file was deleted. Without internet, extract the "
                f"archive yourself into {raw}/ (giving {raw / src.folder}/)."
            ) from exc
        actual = calculate_md5(str(partial)) if partial.is_file() else "<no file>"
        if actual != src.md5:
            partial.unlink(missing_ok=True)
            raise DatasetError(
                f"checksum mismatch for {src.url}: expected md5 {src.md5}, got {actual}. "
                f"The downloaded file was deleted."
            )
        os.replace(partial, archive)
    _extract(archive, raw, src.folder)


def write_cifar_batches(
    directory: str | Path,
    *,
    kind: str = "cifar10",
    n_train: int = 500,
    n_test: int = 100,
    seed: int = 0,
) -> Path:
    """Write generated images in the official CIFAR python layout; return the folder written.

    ``<directory>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` for
    ``kind="cifar10"``, ``<directory>/cifar-100-python/{train, test, meta}`` for ``"cifar100"``:
    pickled dicts with bytes keys, ``data`` an ``N x 3072`` uint8 array (channel-major RGB rows)
    and ``labels`` / ``fine_labels`` (+ ``coarse_labels``) lists - what the real archives hold,
    so the parser is exercised exactly as on real data, offline. The images are the
    ``synthetic`` dataset's (32x32, RGB, learnable). Pass ``directory=<root>/raw`` to make
    :func:`load_dataset` pick them up as if downloaded.
    """
    if kind not in ("cifar10", "cifar100"):
        raise ValueError(f"kind must be 'cifar10' or 'cifar100', got {kind!r}")
    num_classes = 10 if kind == "cifar10" else 100
    synth = _generate_synthetic(
        n_train=n_train,
        n_test=n_test,
        channels=3,
        image_size=CIFAR_IMAGE_SIZE,
        num_classes=num_classes,
        seed=seed,
    )
    src = _cifar_source(kind)
    folder = Path(directory) / src.folder
    folder.mkdir(parents=True, exist_ok=True)

    def batch(label: str, x: torch.Tensor, y: torch.Tensor) -> dict[bytes, Any]:
        labels = [int(v) for v in y]
        out: dict[bytes, Any] = {
            b"batch_label": label.encode(),
            b"data": x.reshape(len(x), -1).numpy(),
            b"filenames": [
                f"img_{label.replace(' ', '_')}_{i:05d}.png".encode() for i in range(len(x))
            ],
        }
        if kind == "cifar10":
            out[b"labels"] = labels
        else:
            out[b"fine_labels"] = labels
            out[b"coarse_labels"] = [v // 5 for v in labels]
        return out

    train_x, train_y = synth["train_x"], synth["train_y"]
    if kind == "cifar10":
        parts = np.array_split(np.arange(n_train), 5)
        for i, idx in enumerate(parts, start=1):
            sel = torch.from_numpy(idx)
            _pickle_dump(
                batch(f"training batch {i} of 5", train_x[sel], train_y[sel]),
                folder / f"data_batch_{i}",
            )
        _pickle_dump(
            batch("testing batch 1 of 1", synth["test_x"], synth["test_y"]), folder / "test_batch"
        )
        meta = {
            b"label_names": [f"class{k}".encode() for k in range(10)],
            b"num_cases_per_batch": max(len(p) for p in parts),
            b"num_vis": 3 * CIFAR_IMAGE_SIZE**2,
        }
        _pickle_dump(meta, folder / "batches.meta")
    else:
        _pickle_dump(batch("training batch 1 of 1", train_x, train_y), folder / "train")
        _pickle_dump(
            batch("testing batch 1 of 1", synth["test_x"], synth["test_y"]), folder / "test"
        )
        meta = {
            b"fine_label_names": [f"fine{k}".encode() for k in range(100)],
            b"coarse_label_names": [f"coarse{k}".encode() for k in range(20)],
        }
        _pickle_dump(meta, folder / "meta")
    return folder


def normalize(
    images: torch.Tensor, mean: torch.Tensor | Sequence[float], std: torch.Tensor | Sequence[float]
) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` -> float32 ``(x / 255 - mean) / std``, per channel.

    One function so the loader, probes and tests all normalize bit-identically.
    """
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    # in place on the fresh float copy: the same arithmetic as the formula, one allocation
    return images.to(torch.float32, copy=True).div_(255).sub_(mean_t).div_(std_t)


class DeviceLoader:
    """Whole split on one device as uint8; normalization, random crop (zero padding) and
    horizontal flip run batched on the device.

    Train loaders (``train=True``) visit a fresh permutation each epoch and augment every
    sample; eval loaders keep the stored order and never augment. Everything random in an
    epoch - the order, the crop offsets, the flips - is drawn from a CPU ``torch.Generator``
    seeded from ``(seed, epoch)`` only (see :meth:`set_epoch`), never from the global RNG: a
    trainer resumed after a kill at epoch ``e`` sees exactly the batches it would have seen,
    and the model's own randomness (init, noise, dropout) is unaffected by data loading. The
    draws are made on the CPU, so a seed gives the same batches on every device.

    Crop semantics match ``torchvision.transforms.RandomCrop(size, padding=p)`` followed by
    ``RandomHorizontalFlip``: pad with raw zeros (black, before normalization), then take the
    window at a per-sample uniform offset in ``[0, 2p]``; flip each sample with probability 1/2.
    Both are done as one gather per batch with per-sample index grids.
    """

    def __init__(
        self,
        images_uint8: torch.Tensor,
        labels: torch.Tensor,
        *,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        train: bool,
        seed: int = 0,
        crop_padding: int = 0,
        flip: bool = False,
        device: str | torch.device = "cpu",
        drop_last: bool | None = None,
        channels_last: bool = False,
    ) -> None:
        if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4:
            raise ValueError(
                f"images must be uint8 (N, C, H, W), got {images_uint8.dtype} {tuple(images_uint8.shape)}"
            )
        if labels.dim() != 1 or len(labels) != len(images_uint8):
            raise ValueError(
                f"labels must be 1-D with one entry per image: {tuple(labels.shape)} vs "
                f"{len(images_uint8)} images"
            )
        channels = images_uint8.shape[1]
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean/std need {channels} values, got {len(mean)}/{len(std)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")

        self.device = torch.device(device)
        self.images = images_uint8.to(self.device)
        self.labels = labels.to(device=self.device, dtype=torch.int64)
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=self.device)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=self.device)
        self.batch_size = int(batch_size)
        self.train = bool(train)
        self.seed = int(seed)
        self.crop_padding = int(crop_padding) if train else 0
        self.flip = bool(flip) if train else False
        self.channels_last = bool(channels_last)
        n = len(self.images)
        self.drop_last = (train and n >= batch_size) if drop_last is None else bool(drop_last)
        self.epoch = 0

    @property
    def num_samples(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration yields.

        Iterating twice without calling this yields the same batches twice: an epoch's
        batches are a pure function of ``(seed, epoch)``, never of how often one iterated.
        """
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n, b = self.num_samples, self.batch_size
        return n // b if self.drop_last else math.ceil(n / b)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not self.train:
            for start in range(0, len(self) * self.batch_size, self.batch_size):
                stop = start + self.batch_size
                yield self._finish(self.images[start:stop]), self.labels[start:stop]
            return

        n, p = self.num_samples, self.crop_padding
        gen = torch.Generator(device="cpu")
        gen.manual_seed(_derive_seed(_STREAM_LOADER, self.seed, self.epoch))
        # Fixed draw order (permutation, offsets, flips), each for the whole epoch, so that an
        # epoch does not depend on batch size or drop_last beyond where it is cut.
        order = torch.randperm(n, generator=gen).to(self.device)
        offsets = flips = None
        if p > 0:
            offsets = torch.randint(0, 2 * p + 1, (n, 2), generator=gen).to(self.device)
        if self.flip:
            flips = (torch.rand(n, generator=gen) < 0.5).to(self.device)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            stop = start + self.batch_size
            idx = order[start:stop]
            x = self.images[idx]
            if offsets is not None or flips is not None:
                x = self._crop_flip(
                    x,
                    None if offsets is None else offsets[start:stop],
                    None if flips is None else flips[start:stop],
                )
            yield self._finish(x), self.labels[idx]

    def _crop_flip(
        self, x: torch.Tensor, offsets: torch.Tensor | None, flips: torch.Tensor | None
    ) -> torch.Tensor:
        """Pad by ``crop_padding`` zeros, then gather each sample's (possibly mirrored) window.

        The window of sample ``b`` is rows ``oy[b] + i`` and columns ``ox[b] + j`` of the padded
        image, with ``j`` running backwards for flipped samples - one ``gather`` over the
        flattened padded images does crop and flip together.
        """
        b, c, h, w = x.shape
        p = self.crop_padding
        if p > 0:
            x = F.pad(x, (p, p, p, p))
        wp = w + 2 * p
        if offsets is None:
            offsets = torch.zeros(b, 2, dtype=torch.int64, device=x.device)
        rows = offsets[:, :1] + torch.arange(h, device=x.device)  # (B, H)
        cols = offsets[:, 1:] + torch.arange(w, device=x.device)  # (B, W)
        if flips is not None:
            cols = torch.where(flips[:, None], cols.flip(1), cols)
        linear = (rows[:, :, None] * wp + cols[:, None, :]).reshape(b, 1, h * w)
        out = x.reshape(b, c, -1).gather(2, linear.expand(b, c, h * w))
        return out.reshape(b, c, h, w)

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        x = normalize(x, self.mean, self.std)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


# --------------------------------------------------------------------------------------------
# Building each dataset (-> payload dict of CPU tensors, the processed cache's contents)
# --------------------------------------------------------------------------------------------


def _obtain(
    name: str,
    root: Path,
    image_size: int | None,
    allow_download: bool,
    synthetic_kwargs: Mapping[str, int] | None,
) -> tuple[Path, dict[str, Any]]:
    """The cache path and its payload: read from the cache if valid, else built and cached."""
    path = cache_path(name, root, image_size=image_size, synthetic_kwargs=synthetic_kwargs)
    payload = _read_cache(path, expected_key=_cache_key(name, image_size, synthetic_kwargs))
    if payload is None:
        payload = _build(name, root, image_size, allow_download, synthetic_kwargs)
        msr_io.torch_save(path, payload)
    return path, payload


def _build(
    name: str,
    root: Path,
    image_size: int | None,
    allow_download: bool,
    synthetic_kwargs: Mapping[str, int] | None,
) -> dict[str, Any]:
    if name == "digits":
        payload = _build_digits(_digits_size(image_size))
    elif name in ("cifar10", "cifar100"):
        _cifar_size(name, image_size)
        payload = _build_cifar(name, root, allow_download)
    else:
        payload = _generate_synthetic(**_synthetic_settings(synthetic_kwargs, image_size))
    payload["format"] = _CACHE_FORMAT
    payload["name"] = name
    payload["key"] = _cache_key(name, image_size, synthetic_kwargs)
    return payload


def _build_digits(size: int) -> dict[str, Any]:
    """scikit-learn digits -> uint8 in 0..255, the fixed stratified split, optional upsampling.

    Grey values 0..16 are scaled by 255/16. Upsampling is bilinear (``align_corners=False``,
    no antialiasing - it only matters when shrinking) computed in float64 from the scaled
    values and rounded once (half to even), so the result is identical on every machine.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    labels = np.asarray(bunch.target, dtype=np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)),
        test_size=DIGITS_TEST_FRACTION,
        stratify=labels,
        random_state=DIGITS_SPLIT_SEED,
    )
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    x = torch.from_numpy(np.asarray(bunch.images, dtype=np.float64))[:, None] * (255.0 / 16.0)
    if size != x.shape[-1]:
        x = F.interpolate(
            x, size=(size, size), mode="bilinear", align_corners=False, antialias=False
        )
    x = x.round().clamp_(0, 255).to(torch.uint8)
    y = torch.from_numpy(labels)
    tr, te = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    return {
        "train_x": x[tr].contiguous(),
        "train_y": y[tr].contiguous(),
        "test_x": x[te].contiguous(),
        "test_y": y[te].contiguous(),
        "num_classes": 10,
    }


@dataclass(frozen=True)
class _CifarSource:
    url: str
    md5: str
    archive: str
    folder: str
    train_files: tuple[str, ...]
    test_file: str
    label_key: str
    num_classes: int


def _cifar_source(name: str) -> _CifarSource:
    """The constants for one CIFAR variant, read from the module globals at call time."""
    if name == "cifar10":
        return _CifarSource(
            url=CIFAR10_URL,
            md5=CIFAR10_MD5,
            archive="cifar-10-python.tar.gz",
            folder="cifar-10-batches-py",
            train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
            test_file="test_batch",
            label_key="labels",
            num_classes=10,
        )
    return _CifarSource(
        url=CIFAR100_URL,
        md5=CIFAR100_MD5,
        archive="cifar-100-python.tar.gz",
        folder="cifar-100-python",
        train_files=("train",),
        test_file="test",
        label_key="fine_labels",
        num_classes=100,
    )


def _build_cifar(name: str, root: Path, allow_download: bool) -> dict[str, Any]:
    src = _cifar_source(name)
    folder = root / "raw" / src.folder
    if not folder.is_dir():
        if not allow_download:
            raise DatasetError(
                f"{name} not found at {folder}/ and download=False: fetch {src.url} "
                f"(md5 {src.md5}) and extract it into {folder.parent}/, or allow the download"
            )
        download(name, root)
    train = [_read_cifar_batch(folder / f, src.label_key, src.num_classes) for f in src.train_files]
    test_x, test_y = _read_cifar_batch(folder / src.test_file, src.label_key, src.num_classes)
    return {
        "train_x": torch.cat([x for x, _ in train]),
        "train_y": torch.cat([y for _, y in train]),
        "test_x": test_x,
        "test_y": test_y,
        "num_classes": src.num_classes,
    }


def _numpy_reconstruct() -> Any:
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only.

    The CIFAR batches are pickles; resolving only the globals a numpy array needs means a
    tampered file fails with an error instead of running code. Both numpy module spellings
    are mapped (the archives were written by numpy 1 under Python 2).
    """

    def find_class(self, module: str, name: str) -> Any:
        reconstruct = _numpy_reconstruct()
        allowed = {
            ("numpy.core.multiarray", "_reconstruct"): reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): reconstruct,
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
            ("_codecs", "encode"): codecs.encode,  # how protocol-2 pickles store bytes
        }
        try:
            return allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None


def _read_cifar_batch(
    path: Path, label_key: str, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pickled batch -> uint8 ``(N, 3, 32, 32)`` and int64 ``(N,)``, validated.

    Any N is accepted; the data must be ``N x 3072`` uint8 and every label in
    ``[0, num_classes)``. Every problem is a :class:`DatasetError` naming the file.
    """
    if not path.is_file():
        raise DatasetError(f"{path}: missing CIFAR batch file")
    try:
        with path.open("rb") as f:
            entry = _CifarUnpickler(f, encoding="bytes").load()
    except Exception as exc:
        raise DatasetError(
            f"{path}: not a readable CIFAR batch ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(entry, dict):
        raise DatasetError(f"{path}: expected a pickled dict, got {type(entry).__name__}")
    # The real files have bytes keys (Python 2 str); tolerate re-pickled ones with str keys.
    entry = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
    for key in ("data", label_key):
        if key not in entry:
            raise DatasetError(f"{path}: missing key {key!r} (has {sorted(map(str, entry))})")
    data = entry["data"]
    expected_cols = 3 * CIFAR_IMAGE_SIZE * CIFAR_IMAGE_SIZE
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        kind = data.dtype if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetError(f"{path}: 'data' must be a uint8 numpy array, got {kind}")
    if data.ndim != 2 or data.shape[1] != expected_cols:
        raise DatasetError(f"{path}: 'data' must have shape (N, {expected_cols}), got {data.shape}")
    try:
        labels = np.asarray(entry[label_key])
    except Exception as exc:
        raise DatasetError(f"{path}: {label_key!r} is not a list of integers ({exc})") from exc
    if labels.ndim != 1 or len(labels) != len(data):
        raise DatasetError(
            f"{path}: {label_key!r} has {labels.shape} entries for {len(data)} images"
        )
    if len(labels) and not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(f"{path}: {label_key!r} must be integers, got dtype {labels.dtype}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(
            f"{path}: {label_key!r} out of range [0, {num_classes}): "
            f"min {labels.min()}, max {labels.max()}"
        )
    x = torch.from_numpy(np.ascontiguousarray(data)).reshape(
        -1, 3, CIFAR_IMAGE_SIZE, CIFAR_IMAGE_SIZE
    )
    return x.clone(), torch.from_numpy(labels.astype(np.int64))


def _generate_synthetic(
    *, n_train: int, n_test: int, channels: int, image_size: int, num_classes: int, seed: int
) -> dict[str, Any]:
    """Class templates of smooth patterns plus pixel noise: learnable, and cheap to make.

    Each class has one template per channel: a sum of three random low-frequency cosine
    gratings, made left-right symmetric so that horizontal flips are label-preserving (the
    dataset then uses the same augmentations as CIFAR), scaled to unit RMS. An image is
    ``128 + 48 * template + 32 * N(0, 1)`` per pixel, clipped to uint8. Labels are balanced
    (cycled, then shuffled). Templates, train and test come from separate seeded streams, so
    changing ``n_train`` does not change the test set.
    """
    templates_gen = torch.Generator().manual_seed(_derive_seed(_STREAM_SYNTH_TEMPLATES, seed))
    coords = (torch.arange(image_size, dtype=torch.float64) + 0.5) / image_size
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    shape = (num_classes, channels, 3)
    freq_y = torch.randint(0, 3, shape, generator=templates_gen).double()
    freq_x = torch.randint(0, 3, shape, generator=templates_gen).double()
    phase = torch.rand(shape, generator=templates_gen, dtype=torch.float64) * 2 * math.pi
    amp = torch.rand(shape, generator=templates_gen, dtype=torch.float64) + 0.5
    arg = 2 * math.pi * (freq_y[..., None, None] * yy + freq_x[..., None, None] * xx)
    templates = (amp[..., None, None] * torch.cos(arg + phase[..., None, None])).sum(2)
    templates = (templates + templates.flip(-1)) / 2
    rms = templates.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt().clamp_min(1e-6)
    templates = templates / rms

    def split(n: int, stream: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(_derive_seed(stream, seed))
        y = (torch.arange(n) % num_classes)[torch.randperm(n, generator=gen)]
        noise = torch.randn(
            (n, channels, image_size, image_size), generator=gen, dtype=torch.float64
        )
        x = 128 + 48 * templates[y] + 32 * noise
        return x.round().clamp(0, 255).to(torch.uint8), y.to(torch.int64)

    train_x, train_y = split(n_train, _STREAM_SYNTH_TRAIN)
    test_x, test_y = split(n_test, _STREAM_SYNTH_TEST)
    return {
        "train_x": train_x,
        "train_y": train_y,
        "test_x": test_x,
        "test_y": test_y,
        "num_classes": num_classes,
    }


# --------------------------------------------------------------------------------------------
# Payload <-> Dataset, cache files, small helpers
# --------------------------------------------------------------------------------------------


def _to_dataset(name: str, payload: Mapping[str, Any]) -> Dataset:
    """Attach the input pipeline that belongs to the data (not stored: derived, never stale)."""
    train_x = payload["train_x"]
    size = int(train_x.shape[-1])
    if name in ("cifar10", "cifar100"):
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        flip, crop_padding = True, CIFAR_CROP_PADDING
    else:
        # Statistics of the training split only: the test split must not inform the model.
        mean, std = _channel_stats(train_x)
        flip, crop_padding = name == "synthetic", size // 8
    return Dataset(
        name=name,
        train_x=train_x,
        train_y=payload["train_y"],
        test_x=payload["test_x"],
        test_y=payload["test_y"],
        num_classes=int(payload["num_classes"]),
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        flip=flip,
        crop_padding=crop_padding,
    )


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images, in [0, 1] units."""
    if len(images) == 0:
        channels = images.shape[1]
        return (0.5,) * channels, (0.25,) * channels
    x = images.to(torch.float64).div_(255).transpose(0, 1).reshape(images.shape[1], -1)
    mean = x.mean(dim=1)
    std = x.std(dim=1, unbiased=False).clamp_min(1e-3)  # a constant channel must not divide by 0
    return tuple(mean.tolist()), tuple(std.tolist())


def _read_cache(path: Path, *, expected_key: str) -> dict[str, Any] | None:
    """The cached payload, or None (with a warning) if it is missing, unreadable or stale."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        warnings.warn(f"ignoring unreadable dataset cache {path} ({exc}); rebuilding", stacklevel=3)
        return None
    ok = (
        isinstance(payload, dict)
        and payload.get("format") == _CACHE_FORMAT
        and payload.get("key") == expected_key
        and all(
            isinstance(payload.get(k), torch.Tensor)
            for k in ("train_x", "train_y", "test_x", "test_y")
        )
        and payload["train_x"].dtype == torch.uint8
        and payload["test_x"].dtype == torch.uint8
        and payload["train_y"].dtype == torch.int64
        and payload["test_y"].dtype == torch.int64
    )
    if not ok:
        warnings.warn(f"ignoring stale or foreign dataset cache {path}; rebuilding", stacklevel=3)
        return None
    return payload


def _unique_sibling(path: Path, suffix: str) -> Path:
    """A hidden, unique name next to ``path`` for writing before an atomic rename.

    Unique so concurrent jobs never write into each other's file; created by the caller with
    ordinary permissions (``tempfile.mkstemp`` would make it 0600, unreadable to a group
    sharing a data folder).
    """
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}{suffix}")


def _pickle_dump(obj: Any, path: Path) -> None:
    with path.open("wb") as f:
        pickle.dump(obj, f, protocol=2)


def _fetch(url: str, dest: Path) -> None:
    """Copy ``url`` to ``dest``: torchvision's downloader for http(s), plain urllib otherwise.

    torchvision's retriever needs a Content-Length, which ``file://`` responses lack; a
    ``file://`` URL (a local or shared-filesystem mirror of the archive) is simply copied.
    """
    if urllib.parse.urlparse(url).scheme in ("http", "https"):
        from torchvision.datasets.utils import download_url

        dest.unlink(missing_ok=True)  # download_url(md5=None) skips any existing file
        download_url(url, str(dest.parent), filename=dest.name, md5=None)
    else:
        with urllib.request.urlopen(url) as response, dest.open("wb") as f:
            shutil.copyfileobj(response, f)


def _extract(archive: Path, raw: Path, folder: str) -> None:
    """Extract into a temp folder next to the target, then move ``folder`` into place.

    ``filter="data"`` refuses absolute paths, ``..`` and links out of the tree.
    """
    tmp = Path(tempfile.mkdtemp(dir=raw, prefix=".extract-"))
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                tar.extractall(tmp, filter="data")
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DatasetError(f"{archive}: cannot extract ({exc})") from exc
        if not (tmp / folder).is_dir():
            found = sorted(p.name for p in tmp.iterdir())
            raise DatasetError(f"{archive}: expected a top-level folder {folder!r}, found {found}")
        try:
            os.replace(tmp / folder, raw / folder)
        except OSError:
            if not (raw / folder).is_dir():
                raise
            # another process finished extracting the same verified archive first: keep that
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _derive_seed(*keys: int) -> int:
    """A 64-bit seed mixed from several integers (numpy's SeedSequence, well-mixed streams)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0])


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")


def _digits_size(image_size: int | None) -> int:
    size = DIGITS_DEFAULT_IMAGE_SIZE if image_size is None else int(image_size)
    if size not in DIGITS_IMAGE_SIZES:
        raise ValueError(
            f"digits image_size must be one of {DIGITS_IMAGE_SIZES}, got {image_size!r}"
        )
    return size


def _cifar_size(name: str, image_size: int | None) -> None:
    if image_size not in (None, CIFAR_IMAGE_SIZE):
        raise ValueError(
            f"{name} images are {CIFAR_IMAGE_SIZE}x{CIFAR_IMAGE_SIZE}; got image_size={image_size!r}"
        )


def _synthetic_settings(
    synthetic_kwargs: Mapping[str, int] | None, image_size: int | None
) -> dict[str, int]:
    """Defaults overlaid with the caller's settings, validated."""
    given = dict(synthetic_kwargs or {})
    unknown = sorted(set(given) - set(SYNTHETIC_DEFAULTS))
    if unknown:
        raise ValueError(
            f"unknown synthetic_kwargs {unknown}; valid keys: {', '.join(SYNTHETIC_DEFAULTS)}"
        )
    if image_size is not None:
        if "image_size" in given and given["image_size"] != image_size:
            raise ValueError(
                f"image_size={image_size} conflicts with synthetic_kwargs image_size={given['image_size']}"
            )
        given["image_size"] = image_size
    settings = {**SYNTHETIC_DEFAULTS, **given}
    minimum = {
        "n_train": 1,
        "n_test": 0,
        "channels": 1,
        "image_size": 1,
        "num_classes": 2,
        "seed": 0,
    }
    for key, value in settings.items():
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, np.integer))
            or value < minimum[key]
        ):
            raise ValueError(f"synthetic {key} must be an integer >= {minimum[key]}, got {value!r}")
        settings[key] = int(value)
    return settings


def _cache_key(
    name: str, image_size: int | None, synthetic_kwargs: Mapping[str, int] | None
) -> str:
    """Everything a cache's contents depend on, as a string stored inside the cache."""
    if name == "digits":
        return json.dumps(
            {
                "name": name,
                "image_size": _digits_size(image_size),
                "test_fraction": DIGITS_TEST_FRACTION,
                "split_seed": DIGITS_SPLIT_SEED,
            }
        )
    if name == "synthetic":
        return json.dumps(
            {"name": name, **_synthetic_settings(synthetic_kwargs, image_size)}, sort_keys=True
        )
    return json.dumps({"name": name})
