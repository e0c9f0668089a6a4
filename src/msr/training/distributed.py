"""Data-parallel training over N processes (torchrun / torch.distributed): gloo on CPU, NCCL on GPU.

A run of global batch B on N processes is the single-process run at batch B, split:

- **data**: every rank iterates the same global batches (the loader's order and augmentation
  are a pure function of (seed, epoch)) and keeps its own contiguous B/N rows
  (``DeviceLoader(shard=(rank, N))``);
- **gradients**: ``DistributedDataParallel`` averages them over the ranks during backward
  (bucketed all-reduce, overlapped with the backward pass). The step (msr.training.step) runs
  the variant's hook after backward, so ZMG projects the *averaged* gradient - the gradient of
  the global batch - and every rank applies the same update: the ranks stay identical;
- **noise**: per-sample noise draws the global batch's noise from the global RNG, which is in
  step on every rank, and keeps the rank's rows (``BlockInputNoise.shard``): different values
  on different ranks, reproducible from the seed, and equal to the single-process run's;
- **BatchNorm**: with ``sync_bn`` (the default) the statistics are those of the global batch
  (``nn.SyncBatchNorm`` on CUDA; msr.training.syncbn.CpuSyncBatchNorm on CPU, where torch's
  refuses): two collectives per BN layer per step. Without it each rank normalizes with its
  shard's statistics ("ghost" BatchNorm of B/N samples): a different algorithm, recorded as such.
  Running statistics: with SyncBN identical on every rank; without, each rank keeps its own
  (``broadcast_buffers=False``) and rank 0's - the average over rank 0's shards - are the ones
  evaluated and checkpointed (a resumed run restores rank 0's on every rank; the other ranks'
  only ever serve training-mode forwards, which do not read them);
- **files**: rank 0 alone locks, checks, writes and evaluates the run directory; the others
  never create or write a file there (they read the checkpoint to resume, so the directory must
  be on a filesystem every node sees). Rank 0 announces its decision - train (fresh or resumed),
  already complete, or an error - before the others start.

Under ``torchrun`` the environment says it (RANK, WORLD_SIZE, LOCAL_RANK; :func:`from_env`);
WORLD_SIZE 1 - or no torchrun - is the single-process path, unchanged.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from msr.core.method import BlockInputNoise
from msr.training.syncbn import convert_sync_batchnorm


class DistributedError(RuntimeError):
    """A data-parallel launch that cannot work (bad torchrun environment, a batch that does not
    split); the message names the setting."""


@dataclass(frozen=True)
class Distributed:
    """This process's place in a data-parallel run."""

    rank: int
    world_size: int
    local_rank: int
    sync_bn: bool = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device_type: str) -> torch.device:
        """The device of this rank: its LOCAL_RANK-th GPU, or the CPU."""
        return torch.device("cuda", self.local_rank) if device_type == "cuda" else torch.device("cpu")

    def record(self, norm: str, batch_size: int) -> dict[str, Any]:
        """What config.json records about the split (``bn_batch``: the samples one BatchNorm
        statistic is computed over - the global batch with SyncBN, a shard without)."""
        return {"world_size": self.world_size, "backend": backend_name(),
                "sync_bn": self.sync_bn,
                "bn_batch": bn_batch(norm, batch_size, self.world_size, self.sync_bn)}


def bn_batch(norm: str, batch_size: int, world_size: int, sync_bn: bool) -> int | None:
    """Samples per BatchNorm statistic (None without BatchNorm): what makes a data-parallel BN
    run a different algorithm from the single-process one."""
    if norm != "bn":
        return None
    return batch_size if sync_bn or world_size == 1 else batch_size // world_size


def recorded_bn_batch(record: dict[str, Any]) -> int | None:
    """``bn_batch`` of a config.json (a single-process record has no ``distributed`` block)."""
    norm = (record.get("variant_spec") or {}).get("norm")
    split = record.get("distributed")
    if split:
        return split.get("bn_batch")
    return record.get("batch_size") if norm == "bn" else None


def from_env(sync_bn: bool = True, environ: dict[str, str] | None = None) -> Distributed | None:
    """The torchrun environment as a :class:`Distributed`; None when not launched by torchrun
    or with one process (the single-process path)."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env:
        return None
    try:
        world = int(env["WORLD_SIZE"])
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", "0"))
    except ValueError:
        raise DistributedError(f"torchrun environment not integers: WORLD_SIZE={env.get('WORLD_SIZE')!r} "
                               f"RANK={env.get('RANK')!r} LOCAL_RANK={env.get('LOCAL_RANK')!r}") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise DistributedError(f"torchrun environment out of range: WORLD_SIZE={world} RANK={rank} LOCAL_RANK={local}")
    if world == 1:
        return None
    return Distributed(rank=rank, world_size=world, local_rank=local, sync_bn=sync_bn)


def backend_name() -> str:
    return dist.get_backend() if dist.is_initialized() else "none"


def init_process_group(ctx: Distributed, device_type: str, *, timeout_s: float = 1800.0) -> None:
    """Join the process group (torchrun's env:// rendezvous): NCCL on CUDA, gloo on CPU.

    A CUDA rank binds its LOCAL_RANK-th GPU first. No-op when already joined (a test script
    that trains several runs in one group)."""
    if dist.is_initialized():
        if dist.get_world_size() != ctx.world_size or dist.get_rank() != ctx.rank:
            raise DistributedError(f"process group is rank {dist.get_rank()} of {dist.get_world_size()}, "
                                   f"the environment says {ctx.rank} of {ctx.world_size}")
        return
    if device_type == "cuda":
        if ctx.local_rank >= torch.cuda.device_count():
            raise DistributedError(f"LOCAL_RANK={ctx.local_rank} but this node has {torch.cuda.device_count()} "
                                   "GPU(s): one process per GPU (torchrun --nproc_per_node <= GPUs)")
        torch.cuda.set_device(ctx.local_rank)
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=ctx.rank, world_size=ctx.world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))


def leave() -> None:
    """Leave the process group (the end of ``msr train`` on every rank)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def prepare_model(model: nn.Module, ctx: Distributed, *, norm: str, device: torch.device) -> nn.Module:
    """Before the model moves to its device and the optimizer sees it: SyncBN for a BatchNorm
    model (``sync_bn``), the noise modules told their rows. Returns the (same) model."""
    if norm == "bn" and ctx.sync_bn:
        model = convert_sync_batchnorm(model, device)
    for m in model.modules():
        if isinstance(m, BlockInputNoise):
            m.shard = (ctx.rank, ctx.world_size)
    return model


def wrap(model: nn.Module, ctx: Distributed, device: torch.device) -> nn.parallel.DistributedDataParallel:
    """The model under DDP: gradients averaged over the ranks during backward. Rank 0's
    parameters and buffers are broadcast once here (equal anyway: same seed, or the same
    checkpoint); buffers are not broadcast before every forward (module docstring, BatchNorm)."""
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)


# --------------------------------------------------------------------------- agreement between ranks
def announce(ctx: Distributed, message: Any = None) -> Any:
    """Rank 0's ``message`` on every rank (a picklable object; others pass None)."""
    box = [message if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """The element-wise sum over the ranks (an epoch's loss sum, correct count, samples)."""
    out = values.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def first_bad_step(first_bad: torch.Tensor) -> torch.Tensor:
    """The earliest step any rank saw a non-finite loss (-1: none). Each rank sees its shard's
    loss; the gradient average spreads a non-finite one to all ranks a step later, so the
    earliest is the global batch's first non-finite step."""
    never = torch.iinfo(torch.long).max
    x = torch.where(first_bad < 0, never, first_bad).to(torch.long).reshape(1)
    dist.all_reduce(x, op=dist.ReduceOp.MIN)
    return torch.where(x[0] == never, -1, x[0])
