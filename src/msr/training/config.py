"""The config of one run: every option, its default, and the checks that name a bad one.

This is the one definition of a run's defaults: ``msr train``'s help text is generated from
these fields and the pipeline's config schema is checked against them (tests/test_defaults.py).
``None`` means "the variant's or the dataset's default" (msr.catalog holds the dataset defaults;
the variant registry the variants'). :meth:`RunConfig.validate` fills them in and checks every
field before anything is written.

Torch-free at import (torch and the registry are imported where a config is validated), so the
command line reads these defaults without paying torch's import.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from msr import catalog

if TYPE_CHECKING:
    import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
# what a run evaluates every epoch (its "test_*" columns): the test set, or a validation split
# held out of the training data (msr.data.splits) for choosing an lr - never the test set
EVAL_SPLITS = ("test", "validation")


class ConfigError(ValueError):
    """A bad run configuration; the message names the key and the valid choices."""


@dataclass
class RunConfig:
    """Everything that defines a run. ``None`` means "the variant's / dataset's default"."""

    dataset: str = "digits"
    arch: str = "resnet20"
    variant: str = "msr"
    epochs: int | None = None  # None: the dataset's default (msr.catalog)
    seed: int = 0
    lr: float | None = None  # base (conv-group) lr; other groups keep their ratio (= lr_factor lr/spec.lr)
    # every param group at this factor of the variant's own lr (1 = its default); one sweep
    # value then means the same for every variant. At most one of lr and lr_factor
    lr_factor: float | None = None
    batch_size: int | None = None  # None: the dataset's default
    noise_delta: float | None = None  # shortcut for overrides["noise_delta"]
    overrides: dict[str, Any] = field(default_factory=dict)  # any VariantSpec field
    data_root: str = catalog.DATA_ROOT
    image_size: int | None = None  # None: the dataset's (msr.catalog: image_size, image_sizes)
    # train on a fixed class-stratified subset of this many training images (None: all; the
    # limits: msr.catalog.DatasetFacts.check_train_subset); the same subset for every run and
    # seed (msr.data.stratified_subset); the test set stays whole
    train_subset: int | None = None
    # "validation": hold out validation_size class-stratified training images (from outside
    # train_subset when one is set), train on the rest and evaluate on them instead of the test
    # set (msr.data.splits.validation_split); the test set is never touched
    eval_split: str = "test"
    validation_size: int | None = None
    momentum: float = 0.9
    milestones: tuple[float, ...] = (0.5, 0.75)  # fractions of the epochs where lr *= gamma
    gamma: float = 0.1
    device: str = "auto"
    threads: int | None = None  # torch intra-op threads; default: the cores this process may use
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    channels_last: bool = True
    compile: bool = False
    # the whole step as one CUDA graph (msr.training.step.GraphedStep); CUDA, bf16/fp32 only
    cuda_graph: bool = False
    probe_every: int = 50  # steps between probes (also at step 0 and every epoch end)
    probe_batch: int = 256
    eval_batch_size: int = 1000
    # evaluate (test set and clean train subset) after every this many epochs and after the
    # last; None: after every epoch. Evaluation draws no random numbers and changes no weight,
    # so it changes nothing else a run records: metrics.csv holds NaN where it was skipped
    eval_every: int | None = None

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - valid)
        if unknown:
            raise ConfigError(f"unknown config key(s) {unknown}; valid keys: {', '.join(sorted(valid))}")
        values = dict(values)
        if "milestones" in values and values["milestones"] is not None:
            values["milestones"] = tuple(values["milestones"])
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Check every field before anything is written; errors name the key.

        Also fills the dataset-dependent defaults (epochs, batch size) left as ``None``.
        """
        from msr.core.models import parse_arch
        from msr.core.variants import VARIANTS, get_spec

        def need(ok: bool, key: str, what: str) -> None:
            if not ok:
                raise ConfigError(f"{key}={getattr(self, key)!r}: {what}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)

        need(self.dataset in catalog.DATASETS, "dataset", f"valid datasets: {', '.join(catalog.DATASETS)}")
        facts = catalog.dataset(self.dataset)
        self.epochs = facts.or_default("epochs", self.epochs)
        self.batch_size = facts.or_default("batch_size", self.batch_size)
        try:
            parse_arch(self.arch)
        except ValueError as e:
            raise ConfigError(f"arch: {e}") from None
        need(self.variant in VARIANTS, "variant", f"valid variants: {', '.join(VARIANTS)}")
        need(is_int(self.epochs) and self.epochs >= 1, "epochs", "must be an integer >= 1")
        need(is_int(self.seed) and self.seed >= 0, "seed", "must be an integer >= 0")
        need(self.lr is None or (is_num(self.lr) and self.lr > 0), "lr", "must be a number > 0")
        need(self.lr_factor is None or (is_num(self.lr_factor) and self.lr_factor > 0), "lr_factor", "must be a number > 0")
        need(self.lr is None or self.lr_factor is None, "lr_factor",
             f"give lr (the conv group's lr, {self.lr!r}) or lr_factor (every group's factor), not both")
        need(is_int(self.batch_size) and self.batch_size >= 1, "batch_size", "must be an integer >= 1")
        need(self.noise_delta is None or (is_num(self.noise_delta) and 0 <= self.noise_delta <= 1), "noise_delta", "must be in [0, 1]")
        need(isinstance(self.overrides, dict), "overrides", "must be a mapping of variant fields")
        need(self.image_size is None or (is_int(self.image_size) and self.image_size >= 4), "image_size", "must be an integer >= 4")
        try:
            facts.check_train_subset(self.train_subset)
        except ValueError as e:
            raise ConfigError(f"train_subset={self.train_subset!r}: {e}") from None
        need(self.eval_split in EVAL_SPLITS, "eval_split", f"valid: {', '.join(EVAL_SPLITS)}")
        if self.eval_split == "validation":
            need(is_int(self.validation_size) and self.validation_size >= 1, "validation_size",
                 "eval_split='validation' needs the number of training images to hold out (an integer >= 1)")
        else:
            need(self.validation_size is None, "validation_size", "only with eval_split='validation'")
        need(is_num(self.momentum) and 0 <= self.momentum < 1, "momentum", "must be in [0, 1)")
        need(all(is_num(m) and 0 < m <= 1 for m in self.milestones), "milestones", "must be fractions of the run in (0, 1]")
        need(is_num(self.gamma) and 0 < self.gamma <= 1, "gamma", "must be in (0, 1]")
        need(self.device in DEVICES, "device", f"valid devices: {', '.join(DEVICES)}")
        if self.device == "cuda" and not _cuda_available():
            raise ConfigError("device='cuda' but no CUDA device is available (use --device auto or cpu)")
        need(self.threads is None or (is_int(self.threads) and self.threads >= 1), "threads", "must be an integer >= 1")
        need(self.precision in PRECISIONS, "precision", f"valid: {', '.join(PRECISIONS)}")
        need(is_int(self.probe_every) and self.probe_every >= 1, "probe_every", "must be an integer >= 1")
        need(isinstance(self.cuda_graph, bool), "cuda_graph", "must be true or false")
        if self.cuda_graph:
            need(not self.compile, "cuda_graph", "captures the eager step: use it or compile, not both")
            need(self.precision != "fp16", "cuda_graph", "cannot capture fp16 loss scaling (it syncs with the host): use bf16 or fp32")
            need(self.resolved_device().type == "cuda", "cuda_graph", "needs a CUDA device (device cuda, or auto on a machine with one)")
        need(is_int(self.probe_batch) and self.probe_batch >= 1, "probe_batch", "must be an integer >= 1")
        need(is_int(self.eval_batch_size) and self.eval_batch_size >= 1, "eval_batch_size", "must be an integer >= 1")
        need(self.eval_every is None or (is_int(self.eval_every) and self.eval_every >= 1), "eval_every",
             "must be an integer >= 1 (epochs between evaluations) or null (every epoch)")
        try:
            get_spec(self.variant, **self.variant_overrides())
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def resolved_lr_factor(self, spec_lr: float) -> float:
        """The factor every param group's lr gets (``lr`` given: ``lr / spec_lr``, the old
        conv-group spelling, which scaled every group alike too)."""
        if self.lr_factor is not None:
            return float(self.lr_factor)
        if self.lr is not None:
            return self.lr / spec_lr if spec_lr > 0 else 0.0
        return 1.0

    def resolved_lr(self, spec_lr: float) -> float:
        """The conv group's lr, as config.json records it (``lr`` itself when given)."""
        return float(self.lr) if self.lr is not None else spec_lr * self.resolved_lr_factor(spec_lr)

    def variant_overrides(self) -> dict[str, Any]:
        over = dict(self.overrides)
        if self.noise_delta is not None:
            over["noise_delta"] = self.noise_delta
        return over

    def resolved_device(self) -> torch.device:
        """The ``torch.device`` to train on (``auto``: CUDA when available)."""
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolved_threads(self) -> int:
        return self.threads or len(os.sched_getaffinity(0))


def defaults() -> dict[str, Any]:
    """Every field's default, as ``msr train`` documents it (None: the dataset's / variant's)."""
    return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(RunConfig)}


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
