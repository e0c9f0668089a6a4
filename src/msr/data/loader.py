"""The device-resident loader and the one normalization formula.

Keeping a split on the accelerator as uint8 (CIFAR-10's 50k training images are 150 MB) lets
:class:`DeviceLoader` do what a DataLoader with per-sample transforms would do - shuffle, random
crop with zero padding, horizontal flip, normalization - as a few batched tensor operations on
that device, with no worker processes and no per-sample Python.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from msr.data.base import derive_seed

__all__ = ["DeviceLoader", "normalize"]

# Tag that separates the loader's random stream from the others derived from one user seed.
_STREAM_LOADER = 0x10AD


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

    ``shard = (rank, world)`` (train loaders, data-parallel training): ``batch_size`` stays the
    *global* batch; each yielded batch is this rank's contiguous ``batch_size / world`` rows of
    it - the same samples, crops and flips the unsharded loader puts there, since every draw is
    made for the whole epoch first. ``len()`` counts global batches, the same on every rank.
    Needs whole global batches: ``batch_size`` divisible by ``world``, ``drop_last``.
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
        shard: tuple[int, int] = (0, 1),
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
        rank, world = shard
        if not (isinstance(world, int) and isinstance(rank, int) and world >= 1 and 0 <= rank < world):
            raise ValueError(f"shard must be (rank, world) with 0 <= rank < world, got {shard}")
        if world > 1:
            if not self.train:
                raise ValueError("only a train loader is sharded (an eval loader runs on one rank)")
            if batch_size % world:
                raise ValueError(f"batch_size={batch_size} must be divisible by the {world} data-parallel processes")
            if not self.drop_last:
                raise ValueError(f"a sharded loader needs whole global batches: {n} samples, batch_size={batch_size}, drop_last")
        self.shard = (rank, world)

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
        gen.manual_seed(derive_seed(_STREAM_LOADER, self.seed, self.epoch))
        # Fixed draw order (permutation, offsets, flips), each for the whole epoch, so that an
        # epoch does not depend on batch size or drop_last beyond where it is cut.
        order = torch.randperm(n, generator=gen).to(self.device)
        offsets = flips = None
        if p > 0:
            offsets = torch.randint(0, 2 * p + 1, (n, 2), generator=gen).to(self.device)
        if self.flip:
            flips = (torch.rand(n, generator=gen) < 0.5).to(self.device)
        rank, world = self.shard
        local = self.batch_size // world
        for start in range(rank * local, len(self) * self.batch_size, self.batch_size):
            stop = start + local
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
