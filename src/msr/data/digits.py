"""``digits``: scikit-learn's bundled handwritten digits, grey 8x8 (sizes, classes and the image
sizes it can be upsampled to: msr.catalog).

Offline - it ships with scikit-learn - which makes it the laptop demo. A fixed stratified 80/20
split (:data:`DIGITS_TEST_FRACTION`, :data:`DIGITS_SPLIT_SEED`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from msr import catalog
from msr.data.base import DatasetSpec, InputPipeline, train_stats_pipeline

# The digits split: sklearn.model_selection.train_test_split(indices, test_size=0.2,
# stratify=labels, random_state=0) over all images -> the catalog's train / test sizes (tested). Both index
# lists are then sorted, so a split's order is the dataset's order. Changing either constant
# changes every digits result; they are part of the experiment's definition.
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
DIGITS_IMAGE_SIZES: tuple[int, ...] = catalog.DATASETS["digits"].image_sizes
DIGITS_DEFAULT_IMAGE_SIZE = catalog.DATASETS["digits"].image_size


def check_size(image_size: int | None) -> int:
    size = DIGITS_DEFAULT_IMAGE_SIZE if image_size is None else int(image_size)
    if size not in DIGITS_IMAGE_SIZES:
        raise ValueError(
            f"digits image_size must be one of {DIGITS_IMAGE_SIZES}, got {image_size!r}"
        )
    return size


class Digits(DatasetSpec):
    name = "digits"
    sources = ("scikit-learn's bundled copy (offline)",)

    def settings(self, image_size: int | None, options: Mapping[str, Any] | None) -> dict[str, Any]:
        return {"image_size": check_size(image_size)}

    def cache_stem(self, settings: Mapping[str, Any]) -> str:
        return f"digits-{settings['image_size']}"

    def cache_key(self, settings: Mapping[str, Any]) -> str:
        return json.dumps(
            {
                "name": self.name,
                "image_size": settings["image_size"],
                "test_fraction": DIGITS_TEST_FRACTION,
                "split_seed": DIGITS_SPLIT_SEED,
            }
        )

    def build(
        self,
        root: Path,
        settings: Mapping[str, Any],
        *,
        allow_download: bool,
        mirror: str | Path | None,
    ) -> dict[str, Any]:
        return build_digits(settings["image_size"])

    def pipeline(self, train_x: torch.Tensor) -> InputPipeline:
        # Digits are not mirror-symmetric (a flipped 2 is no 2): shifts only, 1/8 of the side.
        return train_stats_pipeline(train_x, flip=False, crop_padding=int(train_x.shape[-1]) // 8)


def build_digits(size: int) -> dict[str, Any]:
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
        "num_classes": catalog.DATASETS["digits"].num_classes,
    }


SPEC = Digits()
