"""What every dataset module shares: the error type, the loaded-dataset record, the spec that a
registry line points to, and two small numeric helpers.

A dataset module (``digits``, ``cifar``, ``fashion_mnist``, ``synthetic``) subclasses
:class:`DatasetSpec`; the package's ``__init__`` does the rest (cache, loading, the CLI's
listing) the same way for every dataset.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch


class DatasetError(Exception):
    """A dataset cannot be obtained or read: failed download, bad checksum, corrupt file.

    Distinct from ``ValueError`` (a bad argument) so callers can tell "your request is wrong"
    from "the data on disk or on the network is wrong"; the message always names the file or
    URL at fault and what was expected.
    """


class TooLarge(DatasetError):
    """A file, download, or archive that is (or decompresses to) more bytes than the official
    one: refused as soon as the limit is passed - never read whole into memory or onto disk
    (a decompression bomb, or simply another file)."""


@dataclass
class Dataset:
    """One dataset's two splits as CPU uint8 images and int64 labels, plus how to feed them.

    ``mean``/``std`` (per channel, in [0, 1] units), ``flip`` and ``crop_padding`` describe the
    input pipeline that belongs to the data - they are passed straight to
    :class:`~msr.data.DeviceLoader`. ``provenance`` says where the data came from and which
    checksums were verified when the cache was built (empty where there is nothing to say).
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
    provenance: Mapping[str, Any] | None = None

    @property
    def in_channels(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train_x.shape[-1])


@dataclass(frozen=True)
class InputPipeline:
    """Normalization and augmentation that belong to a dataset (derived, never cached)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip: bool
    crop_padding: int


class DatasetSpec(abc.ABC):
    """One registered dataset: how to name, build, verify and feed it.

    ``settings`` are everything the processed tensors depend on (validated, JSON-able); they
    decide the cache file name and the key stored inside it. A payload is a dict of CPU tensors
    ``train_x``/``test_x`` (uint8 ``(N, C, H, W)``), ``train_y``/``test_y`` (int64) plus
    ``num_classes`` and optionally ``provenance`` (plain str/int dicts).
    """

    #: registry name, e.g. ``"fashion_mnist"``
    name: str
    #: where the data come from, in the order they are tried (shown by ``msr datasets``)
    sources: tuple[str, ...]

    @abc.abstractmethod
    def settings(self, image_size: int | None, options: Mapping[str, Any] | None) -> dict[str, Any]:
        """Validated settings; ``ValueError`` naming the bad argument otherwise. ``options`` are
        dataset-specific keyword settings (only ``synthetic`` has any; others ignore them)."""

    @abc.abstractmethod
    def cache_stem(self, settings: Mapping[str, Any]) -> str:
        """The processed file's stem under ``<root>/processed/``."""

    @abc.abstractmethod
    def cache_key(self, settings: Mapping[str, Any]) -> str:
        """A string identifying the cache's contents, stored in the cache and compared on read."""

    @abc.abstractmethod
    def build(
        self,
        root: Path,
        settings: Mapping[str, Any],
        *,
        allow_download: bool,
        mirror: str | Path | None,
    ) -> dict[str, Any]:
        """Read (and if needed fetch) the raw data and return the payload."""

    @abc.abstractmethod
    def pipeline(self, train_x: torch.Tensor) -> InputPipeline:
        """The input pipeline for this data, from the training images if it needs statistics."""

    def download(self, root: Path, *, mirror: str | Path | None = None) -> None:
        """Put the raw files under ``<root>/raw/`` (no-op for data that need none)."""
        return None


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images, in [0, 1] units."""
    if len(images) == 0:
        channels = images.shape[1]
        return (0.5,) * channels, (0.25,) * channels
    x = images.to(torch.float64).div_(255).transpose(0, 1).reshape(images.shape[1], -1)
    mean = x.mean(dim=1)
    std = x.std(dim=1, unbiased=False).clamp_min(1e-3)  # a constant channel must not divide by 0
    return tuple(mean.tolist()), tuple(std.tolist())


def histogram_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """:func:`channel_stats` from each channel's 256-bin histogram: exact sums, O(256) memory.

    For large sets: Fashion-MNIST's 47M training pixels take ~0.2 s here instead of 1-2.5 s and
    ~750 MB of float64 copies. The results agree with :func:`channel_stats` to float64 rounding
    (identical once cast to float32, as the loader does); the older datasets keep
    :func:`channel_stats` so their recorded statistics stay bit-identical.
    """
    if len(images) == 0:
        return channel_stats(images)
    values = torch.arange(256, dtype=torch.float64) / 255
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].reshape(-1), minlength=256).to(torch.float64)
        n = counts.sum()
        mean = (counts * values).sum() / n
        var = (counts * (values - mean) ** 2).sum() / n
        means.append(float(mean))
        stds.append(max(float(var.sqrt()), 1e-3))  # a constant channel must not divide by 0
    return tuple(means), tuple(stds)


def train_stats_pipeline(
    train_x: torch.Tensor,
    *,
    flip: bool,
    crop_padding: int,
    stats: Callable[[torch.Tensor], tuple[tuple[float, ...], tuple[float, ...]]] = channel_stats,
) -> InputPipeline:
    """Normalize with the training split's own statistics (``stats(train_x)``): the test split
    must not inform the model."""
    mean, std = stats(train_x)
    return InputPipeline(mean=mean, std=std, flip=flip, crop_padding=crop_padding)


def derive_seed(*keys: int) -> int:
    """A 64-bit seed mixed from several integers (numpy's SeedSequence, well-mixed streams)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0])


SUBSET_SEED = 0  # one fixed subset for every run and seed: runs differ only by their own seed


def stratified_subset(labels: torch.Tensor, n: int, seed: int = SUBSET_SEED) -> torch.Tensor:
    """Indices of a fixed, class-stratified subset of ``n`` training samples.

    Each class gets ``n`` times its share of the data (largest remainders break ties, so the
    counts add up to ``n``), its members drawn in the order of one seeded permutation. The
    indices come back in that permutation's order, so any prefix of the subset (the clean-train
    and probe batches take the first images) is itself roughly class-balanced.
    """
    total = len(labels)
    if not 1 <= n <= total:
        raise ValueError(f"a subset of {n} images: must be between 1 and the {total} training images")
    classes, counts = torch.unique(labels, return_counts=True)
    exact = counts.double() * n / total
    quota = exact.floor().long()
    short = n - int(quota.sum())
    quota[torch.argsort(exact - quota, descending=True, stable=True)[:short]] += 1
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    ranked = labels[order]
    rank = torch.zeros(total, dtype=torch.long)  # rank of each permuted sample within its class
    for c in classes:
        members = ranked == c
        rank[members] = torch.arange(int(members.sum()))
    limit = quota[torch.searchsorted(classes, ranked)]
    return order[rank < limit]

