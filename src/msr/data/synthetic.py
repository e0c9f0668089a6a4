"""``synthetic``: generated, learnable images of any size, channel count and class count.

Deterministic for a seed, instant to make - for tests and smoke runs. The tests also write
:func:`generate`'s images in the exact CIFAR file layout (tests/datagen.py), so the CIFAR code
path is tested without internet.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from msr import catalog
from msr.data.base import DatasetSpec, InputPipeline, derive_seed, train_stats_pipeline

_FACTS = catalog.DATASETS["synthetic"]
SYNTHETIC_DEFAULTS: Mapping[str, int] = {
    "n_train": _FACTS.train_size,
    "n_test": _FACTS.test_size,
    "channels": _FACTS.channels,
    "image_size": _FACTS.image_size,
    "num_classes": _FACTS.num_classes,
    "seed": 0,
}
_MINIMUM = {"n_train": 1, "n_test": 0, "channels": 1, "image_size": 1, "num_classes": 2, "seed": 0}

# Tags that separate the random streams derived from one user seed.
_STREAM_SYNTH_TEMPLATES = 0x7E31
_STREAM_SYNTH_TRAIN = 0x7A19
_STREAM_SYNTH_TEST = 0x7E57


def resolve_settings(
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
    for key, value in settings.items():
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, np.integer))
            or value < _MINIMUM[key]
        ):
            raise ValueError(f"synthetic {key} must be an integer >= {_MINIMUM[key]}, got {value!r}")
        settings[key] = int(value)
    return settings


class Synthetic(DatasetSpec):
    name = "synthetic"
    sources = ("generated from a seed (offline)",)

    def settings(self, image_size: int | None, options: Mapping[str, Any] | None) -> dict[str, Any]:
        return resolve_settings(options, image_size)

    def cache_stem(self, settings: Mapping[str, Any]) -> str:
        # default settings: synthetic.pt; others: a hash of them, so each setting has its file
        if dict(settings) == dict(SYNTHETIC_DEFAULTS):
            return self.name
        digest = hashlib.sha1(json.dumps(dict(settings), sort_keys=True).encode()).hexdigest()
        return f"synthetic-{digest[:12]}"

    def cache_key(self, settings: Mapping[str, Any]) -> str:
        return json.dumps({"name": self.name, **settings}, sort_keys=True)

    def build(
        self,
        root: Path,
        settings: Mapping[str, Any],
        *,
        allow_download: bool,
        mirror: str | Path | None,
    ) -> dict[str, Any]:
        return generate(**settings)

    def pipeline(self, train_x: torch.Tensor) -> InputPipeline:
        # the templates are left-right symmetric, so flips preserve the label (see generate)
        return train_stats_pipeline(train_x, flip=True, crop_padding=int(train_x.shape[-1]) // 8)


def generate(
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
    templates_gen = torch.Generator().manual_seed(derive_seed(_STREAM_SYNTH_TEMPLATES, seed))
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
        gen = torch.Generator().manual_seed(derive_seed(stream, seed))
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


SPEC = Synthetic()
