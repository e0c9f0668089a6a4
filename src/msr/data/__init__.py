"""Datasets by name and a device-resident loader.

Every dataset becomes the same thing: uint8 image tensors ``(N, C, H, W)`` plus int64 labels,
prepared once and cached under ``<root>/processed/`` (:mod:`msr.data.cache`). Keeping the raw
bytes (not floats) is what lets a whole split live on the accelerator; :class:`DeviceLoader`
(:mod:`msr.data.loader`) then shuffles, crops, flips and normalizes batches on that device.

One module per source, each with its own integrity checks, and one registry line per dataset
(:data:`_REGISTRY`); adding a dataset is a new module with a :class:`~msr.data.base.DatasetSpec`
subclass plus its line below.

``digits`` (:mod:`msr.data.digits`)
    scikit-learn's bundled handwritten digits, offline: the laptop demo.
``cifar10`` / ``cifar100`` (:mod:`msr.data.cifar`)
    The official python-format archives (download, md5, parse): the paper.
``fashion_mnist`` (:mod:`msr.data.fashion_mnist`)
    Zalando's grey garments: raw/, then a local mirror (Debian's package), then
    the official download; the decompressed content is verified.
``synthetic`` (:mod:`msr.data.synthetic`)
    Generated learnable images, for tests (tests/datagen.py also writes them in the CIFAR
    layout, so the CIFAR path is tested offline).

Splits of the training data: :func:`stratified_subset` (a fixed train subset) and
:func:`validation_split` (:mod:`msr.data.splits`: images held out to choose an lr).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from msr import catalog
from msr.data import cache, cifar, digits, fashion_mnist, synthetic
from msr.data.base import Dataset, DatasetError, DatasetSpec, stratified_subset
from msr.data.cifar import IMAGENET_MEAN, IMAGENET_STD
from msr.data.digits import DIGITS_IMAGE_SIZES, DIGITS_SPLIT_SEED, DIGITS_TEST_FRACTION
from msr.data.loader import DeviceLoader, normalize
from msr.data.splits import validation_split
from msr.data.synthetic import SYNTHETIC_DEFAULTS

__all__ = [
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
    "sources",
    "stratified_subset",
    "validation_split",
]

# The registry: one line per dataset, in the order the CLI and the config schema list them.
_REGISTRY: dict[str, DatasetSpec] = {
    "digits": digits.SPEC,
    "cifar10": cifar.CIFAR10,
    "cifar100": cifar.CIFAR100,
    "synthetic": synthetic.SPEC,
    "fashion_mnist": fashion_mnist.SPEC,
}

DATASETS: tuple[str, ...] = tuple(_REGISTRY)


def _spec(name: str) -> DatasetSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}") from None


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


def load_dataset(
    name: str,
    root: str | Path = catalog.DATA_ROOT,
    *,
    image_size: int | None = None,
    allow_download: bool = True,
    mirror: str | Path | None = None,
    synthetic_kwargs: Mapping[str, int] | None = None,
) -> Dataset:
    """Load dataset ``name``, preparing (and if allowed downloading) it on first use.

    The processed cache ``<root>/processed/...`` (see :func:`cache_path`) is used when present;
    otherwise it is built and written, so the raw data are parsed once.

    ``image_size``: one of the dataset's ``image_sizes`` in msr.catalog (None: its
    ``image_size``); synthetic any (same as ``synthetic_kwargs["image_size"]``). ``mirror``: a local folder to copy raw files from
    (datasets that have one; ``None`` = the dataset's default). ``synthetic_kwargs``: keys of
    :data:`SYNTHETIC_DEFAULTS` (only for ``synthetic``).
    """
    _, payload = _obtain(
        name, Path(root), image_size, allow_download, mirror, synthetic_kwargs
    )
    return _to_dataset(name, payload)


def prepare(
    name: str,
    root: str | Path = catalog.DATA_ROOT,
    *,
    image_size: int | None = None,
    allow_download: bool = True,
    mirror: str | Path | None = None,
    synthetic_kwargs: Mapping[str, int] | None = None,
) -> Path:
    """Build the processed cache for ``name`` if it is missing or stale; return its path.

    This is the pipeline's ``prepare`` step. The cache is written atomically (temp file +
    ``os.replace``), so a killed job or two concurrent jobs never leave a half-written file.
    """
    path, _ = _obtain(
        name, Path(root), image_size, allow_download, mirror, synthetic_kwargs
    )
    return path


def cache_path(
    name: str,
    root: str | Path = catalog.DATA_ROOT,
    *,
    image_size: int | None = None,
    synthetic_kwargs: Mapping[str, int] | None = None,
) -> Path:
    """Where :func:`prepare` puts ``name``: ``<root>/processed/<name>[-<tag>].pt``.

    The file name identifies everything its contents depend on: ``digits-16.pt``,
    ``cifar10.pt``, ``synthetic.pt`` (default settings) or ``synthetic-<hash>.pt`` (others).
    """
    spec = _spec(name)
    return cache.path(root, spec.cache_stem(spec.settings(image_size, synthetic_kwargs)))


def download(name: str, root: str | Path = catalog.DATA_ROOT, *, mirror: str | Path | None = None) -> None:
    """Put ``name``'s raw files under ``<root>/raw/``, verified; no-op for generated/bundled data.

    Whatever is already there and verified is used without any network - that is how an
    offline machine (or a test) supplies the data. A failed download or checksum mismatch
    deletes what was fetched and raises :class:`DatasetError` naming the URL (or the user's
    file) and the expected checksum.
    """
    _spec(name).download(Path(root), mirror=mirror)


def sources(name: str) -> tuple[str, ...]:
    """Where ``name``'s data come from, in the order they are tried (for ``msr datasets``)."""
    return _spec(name).sources


# --------------------------------------------------------------------------------------------
# Registry -> cache -> Dataset
# --------------------------------------------------------------------------------------------


def _obtain(
    name: str,
    root: Path,
    image_size: int | None,
    allow_download: bool,
    mirror: str | Path | None,
    options: Mapping[str, Any] | None,
) -> tuple[Path, dict[str, Any]]:
    """The cache path and its payload: read from the cache if valid, else built and cached."""
    spec = _spec(name)
    settings = spec.settings(image_size, options)
    path = cache.path(root, spec.cache_stem(settings))
    payload = cache.obtain(
        path,
        name=name,
        key=spec.cache_key(settings),
        build=lambda: _build(spec, root, settings, allow_download, mirror),
    )
    return path, payload


def _build(
    spec: DatasetSpec,
    root: Path,
    settings: Mapping[str, Any],
    allow_download: bool,
    mirror: str | Path | None,
) -> dict[str, Any]:
    return spec.build(root, settings, allow_download=allow_download, mirror=mirror)


def _to_dataset(name: str, payload: Mapping[str, Any]) -> Dataset:
    """Attach the input pipeline that belongs to the data (not stored: derived, never stale)."""
    pipe = _spec(name).pipeline(payload["train_x"])
    return Dataset(
        name=name,
        train_x=payload["train_x"],
        train_y=payload["train_y"],
        test_x=payload["test_x"],
        test_y=payload["test_y"],
        num_classes=int(payload["num_classes"]),
        mean=tuple(float(m) for m in pipe.mean),
        std=tuple(float(s) for s in pipe.std),
        flip=pipe.flip,
        crop_padding=pipe.crop_padding,
        provenance=payload.get("provenance") or None,
    )
