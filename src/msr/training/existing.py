"""What a run directory may already hold, checked before a run starts: one config per directory
(another is refused, never mixed), a complete run reported as such, a resumable one accepted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from msr.core.variants import get_spec
from msr.training.config import ConfigError, RunConfig
from msr.training.distributed import Distributed, bn_batch, recorded_bn_batch
from msr.training.rundir import (
    CHECKPOINT,
    CONFIG,
    MISSING_MEANS,
    check_complete,
    damaged,
    read_json,
)

# the config fields that define a run's results: a directory holds one value of each
# (``lr`` is the conv group's; the factor follows from it and the variant)
RESULT_KEYS = ("dataset", "arch", "variant", "epochs", "seed", "lr", "batch_size", "noise_delta", "image_size",
               "train_subset", "eval_split", "validation_size", "overrides", "milestones", "gamma", "momentum")


def requested_record(cfg: RunConfig) -> dict[str, Any]:
    """The RESULT_KEYS of ``cfg`` as config.json records them, without loading the data (an
    image size left to the dataset's default is not compared)."""
    spec = get_spec(cfg.variant, **cfg.variant_overrides())
    rec = {k: getattr(cfg, k) for k in RESULT_KEYS}
    rec.update(lr=cfg.resolved_lr(spec.lr), noise_delta=spec.noise_delta,
               milestones=list(cfg.milestones))
    if cfg.image_size is None:
        del rec["image_size"]
    return rec


def refuse_other_config(out: Path, old: dict[str, Any], record: dict[str, Any]) -> None:
    """A run directory belongs to one config: refuse to mix (or report) results of two."""
    diff = [k for k in RESULT_KEYS if k in record and old.get(k, MISSING_MEANS.get(k)) != record[k]]
    if diff:
        raise ConfigError(f"{out} already holds a run with a different config (differs in: {', '.join(diff)}); use another --out or delete it")


def refuse_other_split(out: Path, old: dict[str, Any], want_bn_batch: int | None) -> None:
    """BatchNorm statistics over another number of samples (a data-parallel run without SyncBN
    normalizes each rank's shard) are another algorithm: never mixed in one directory. Any
    other change of the process count only changes float rounding (msr.training.distributed)."""
    if "variant_spec" not in old:  # a record too old to say: the other checks decide
        return
    have = recorded_bn_batch(old)
    if have != want_bn_batch:
        raise ConfigError(f"{out} already holds a run whose BatchNorm statistics are over {have} samples, this one's over "
                          f"{want_bn_batch} (data-parallel processes / --no-sync-bn differ); use another --out or delete it")


def check_existing(out: Path, record: dict[str, Any], log=print) -> None:
    """Before (re)starting a run: the directory's config.json, if any, is this config's."""
    path = out / CONFIG
    if not path.exists():
        if (out / CHECKPOINT).exists():  # config.json is written before any checkpoint
            raise damaged(path, f"missing next to {CHECKPOINT}")
        return
    old = read_json(path)
    refuse_other_config(out, old, record)
    refuse_other_split(out, old, recorded_bn_batch(record))
    worlds = [(r.get("distributed") or {}).get("world_size", 1) for r in (old, record)]
    if worlds[0] != worlds[1]:
        log(f"warning: {out} was started on {worlds[0]} data-parallel process(es), resuming on {worlds[1]}: "
            "the same run up to float rounding, no longer bitwise")
    if old.get("threads") != record.get("threads"):
        # still a valid run, but no longer bitwise identical to an uninterrupted one
        log(f"warning: {out} was started with {old.get('threads')} threads, resuming with {record.get('threads')}")


def already_complete(cfg: RunConfig, out: Path, log, dist: Distributed | None = None) -> dict[str, Any]:
    """The summary of a complete run of ``cfg`` in ``out`` (on ``dist``'s processes); a damaged
    one, or one of another config, is an error (never reported complete)."""
    summary = check_complete(out)
    old = read_json(out / CONFIG)
    refuse_other_config(out, old, requested_record(cfg))
    if dist is not None:
        norm = get_spec(cfg.variant, **cfg.variant_overrides()).norm
        refuse_other_split(out, old, bn_batch(norm, cfg.batch_size, dist.world_size, dist.sync_bn))
    log(f"{out}: already complete, nothing to do")
    return summary
