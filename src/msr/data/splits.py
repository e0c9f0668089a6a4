"""The validation split: training images held out to choose a learning rate, never the test set.

:func:`validation_split` returns (train indices, validation indices) into a dataset's training
split, both fixed (one seed for every run, variant and seed of a study), disjoint and
class-stratified:

- with ``train_subset`` (a study that trains on a fixed subset, msr.data.base.stratified_subset):
  the selection runs train on exactly that subset, and the validation images come from the
  training images OUTSIDE it (Fashion-MNIST's fashion-cpu study: 5,000 train, validation from
  the other 55,000) - the lr is chosen for the regime the study trains in;
- without: ``n_val`` images are held out of the training split and the selection runs train on
  the rest (digits: 1,437 -> 1,149 + 288).
"""

from __future__ import annotations

import torch

from msr.data.base import stratified_subset

VALIDATION_SEED = 1  # not SUBSET_SEED (0): the held-out set is not the train subset's first images


def validation_split(labels: torch.Tensor, n_val: int, *, train_subset: int | None = None,
                     seed: int = VALIDATION_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) indices into ``labels`` (the training split), disjoint and fixed.

    The training indices keep the stored order (the clean-train and probe batches take the first
    images, as in a test-split run); the validation indices are class-stratified. A request
    that leaves no training image, or asks for more images than exist, is a ``ValueError``
    naming the sizes.
    """
    total = len(labels)
    if isinstance(n_val, bool) or not isinstance(n_val, int) or n_val < 1:
        raise ValueError(f"validation_size={n_val!r}: must be an integer >= 1")
    if train_subset is not None:
        if not 1 <= train_subset <= total:
            raise ValueError(f"train_subset={train_subset}: must be between 1 and the {total} training images")
        train = stratified_subset(labels, train_subset)
        outside = torch.ones(total, dtype=torch.bool)
        outside[train] = False
        rest = outside.nonzero().squeeze(1)
        if n_val > len(rest):
            raise ValueError(f"validation_size={n_val}: only {len(rest)} training images lie outside the "
                             f"train_subset of {train_subset} (of {total})")
        val = rest[stratified_subset(labels[rest], n_val, seed=seed)]
        return train, val
    if n_val >= total:
        raise ValueError(f"validation_size={n_val}: the training split has {total} images, and some must be left to train on")
    val = stratified_subset(labels, n_val, seed=seed)
    keep = torch.ones(total, dtype=torch.bool)
    keep[val] = False
    return keep.nonzero().squeeze(1), val
