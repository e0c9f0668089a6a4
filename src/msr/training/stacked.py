"""K seeds of one variant trained as one stacked model in one process (torch.func + vmap).

A ResNet-20 step at batch 128 is ~300 small kernels, so one run leaves a big GPU mostly idle
(docs/architecture.md, "Speed"). Stacking the K seeds of one (variant, arch, dataset) cell turns every
kernel into one K-times larger kernel (``vmap`` lowers each conv to one grouped conv) while
each model stays exactly what its own run would be:

- **parameters / buffers**: ``torch.func.stack_module_state`` stacks the K models' tensors
  along a new leading dim; ``functional_call`` + ``vmap`` run one forward per model. BatchNorm
  in train mode computes each model's batch statistics and updates each model's running stats
  (the buffers are stacked and vmapped too).
- **loss**: each model's cross-entropy (mean over its own batch) plus its own extra loss (the
  variant's unity decay, the method's ``unity_decay`` vmapped per model); the K totals are
  *summed* for backward, so model i's gradient is exactly its own loss's gradient.
- **gradient hook**: the variant's ``after_backward`` acts per model on true gradients. ZMG /
  cmrr (rows of one model never mix with another's) run once on the stacked gradients through
  the method's own functions; any other hook (e.g. AGC, which needs per-model norms) runs
  model by model through the variant itself, on views of the stacked tensors.
- **optimizer**: one ``torch.optim.SGD`` over the stacked leaves, in the variant's param groups.
  SGD with momentum and weight decay is elementwise, so each model gets its own momentum and
  its group's lr / decay. All K models share one schedule (they are seeds of one variant, so
  their groups are identical: checked).
- **noise**: each model keeps its own noise draws. With ``noise_rng="per_model"`` (default)
  model i draws from its own generator, started where a separate run seeded ``seeds[i]``
  would start drawing (after building its model: the CPU generator's state on CPU, the
  device generator seeded with ``seeds[i]`` on CUDA), site by site in forward order - so on
  CPU the stacked run reproduces the K separate runs to float tolerance
  (tests/test_stacked.py). ``"shared"`` draws every model's noise of a site in one call from
  the device's default generator: fewer kernels, same distribution, not equal to separate
  runs. Both are safe to capture in a CUDA graph: the default generator needs nothing, the
  per-model generators are registered with the graph (msr.training.step.GraphedStep).

The data stays per model too: ``step(xs, ys)`` takes ``xs`` of shape ``(K, B, C, H, W)``, each
model's own batch (e.g. from K ``DeviceLoader``s seeded like the K runs).

After construction every model's own ``nn.Parameter`` / buffer *is a view* of the stacked
tensors, so ``models[i]`` is always model i's current state: evaluate it, probe it, or save its
``state_dict()`` exactly as for a separate run.

Limits (each raises ``NotImplementedError`` naming it): gain noise (a per-filter draw shared by
the batch inside ``GainConv2d``), a variant whose extra loss is not unity decay over named
parameters, fp16 (needs loss scaling); channels_last is not used for the 5-D stacked tensors.
One step trains all K (``train_step``, msr.training.step.TrainStep: the same step as every
other path). ``msr train --seeds ... --stacked`` (msr.training.stacked_loop) trains K runs this
way into K ordinary run directories; ``msr bench`` measures it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from msr.core.method import BlockInputNoise, cmrr_gradients_, project_gradients_, unity_decay
from msr.core.models import CHANNELS, CLASSES, GainConv2d
from msr.core.variants import Variant, build
from msr.training.step import StepResult, TrainStep

NOISE_RNGS = ("per_model", "shared")


class _FedNoise(nn.Module):
    """Stands in for a ``BlockInputNoise`` in the stacked forward: multiplies by the next noise
    tensor of a feed filled before the forward (random draws cannot carry per-model generators
    through ``vmap``), or records the shape and dtype a draw would have."""

    def __init__(self, owner: StackedSeeds, original: BlockInputNoise):
        super().__init__()
        self._owner = [owner, original]  # in a list, so neither is registered as a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        owner, original = self._owner
        if owner._recording is not None:  # noise of shape (N, C, 1, ...), as BlockInputNoise draws it
            owner._recording.append((original, (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2), x.dtype))
            return x
        return (x * next(owner._feed)).to(x.dtype)  # fp32 product, one rounding: as BlockInputNoise


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor, *, param: bool) -> None:
    prefix, _, attr = name.rpartition(".")
    owner = module.get_submodule(prefix) if prefix else module
    if param:
        getattr(owner, attr).data = value  # the same nn.Parameter, now aliasing the stack
    else:
        owner._buffers[attr] = value


class StackedSeeds:
    """K models of one variant, one per seed, with one forward/backward/update per step."""

    def __init__(
        self,
        variant: str,
        seeds: Sequence[int],
        *,
        depth: int = 20,
        num_classes: int = CLASSES,
        in_channels: int = CHANNELS,
        overrides: dict | None = None,
        lr: float | None = None,
        momentum: float = 0.9,
        device: str | torch.device = "cpu",
        amp_dtype: torch.dtype | None = None,
        noise_rng: str = "per_model",
    ):
        if len(seeds) < 1 or len(set(seeds)) != len(seeds):
            raise ValueError(f"stacked seeds must be distinct and at least one, got {list(seeds)}")  # before building K models
        device = torch.device(device)
        # build each model exactly as its own run would: seed, build, (noise stream starts here)
        variants, generators = [], []
        for seed in seeds:
            torch.manual_seed(seed)
            v = build(variant, depth=depth, num_classes=num_classes, in_channels=in_channels, **(overrides or {}))
            generators.append(noise_generator(device))
            v.model.to(device)
            variants.append(v)
        self._stack(variants, generators, seeds=seeds, lr=lr, momentum=momentum, device=device,
                    amp_dtype=amp_dtype, noise_rng=noise_rng)

    @classmethod
    def of_variants(cls, variants: Sequence[Variant], generators: Sequence[torch.Generator], *, seeds: Sequence[int],
                    lr: float | None = None, momentum: float = 0.9, device: str | torch.device = "cpu",
                    amp_dtype: torch.dtype | None = None, noise_rng: str = "per_model") -> StackedSeeds:
        """Stack models built elsewhere (each by its own run: seeded, built, moved to ``device``),
        each with the generator its noise would come from (:func:`noise_generator`, taken right
        after its run was set up)."""
        self = cls.__new__(cls)
        self._stack(list(variants), list(generators), seeds=seeds, lr=lr, momentum=momentum,
                    device=torch.device(device), amp_dtype=amp_dtype, noise_rng=noise_rng)
        return self

    def _stack(self, variants: list[Variant], generators: list[torch.Generator], *, seeds: Sequence[int],
               lr: float | None, momentum: float, device: torch.device, amp_dtype: torch.dtype | None,
               noise_rng: str) -> None:
        if len(seeds) < 1 or len(set(seeds)) != len(seeds):
            raise ValueError(f"stacked seeds must be distinct and at least one, got {list(seeds)}")
        if noise_rng not in NOISE_RNGS:
            raise ValueError(f"noise_rng must be one of {NOISE_RNGS}, got {noise_rng!r}")
        if amp_dtype is torch.float16:
            raise NotImplementedError("stacked seeds: fp16 needs loss scaling; use bf16 or fp32")
        if not len(variants) == len(generators) == len(seeds):
            raise ValueError("stacked seeds: one variant and one noise generator per seed")
        self.device = device
        self.amp_dtype = amp_dtype
        self.seeds = list(seeds)
        self.k = len(self.seeds)
        self.noise_rng = noise_rng
        self.variants: list[Variant] = variants
        self._generators: list[torch.Generator] = generators
        self.spec = self.variants[0].spec
        self.models = [v.model for v in self.variants]
        self._check_supported()

        self.params, self.buffers = stack_module_state(self.models)
        for i, m in enumerate(self.models):
            for name in self.params:
                _set_tensor(m, name, self.params[name].detach()[i], param=True)
            for name in self.buffers:
                _set_tensor(m, name, self.buffers[name][i], param=False)
        names = {id(p): n for n, p in self.models[0].named_parameters()}

        # the module the vmapped forward calls: model 0's structure, no storage of its own
        self.base = copy.deepcopy(self.models[0]).to("meta")
        # model 0's noise modules (their delta and dist) replaced in the base by fed stand-ins
        originals = {n: m for n, m in self.models[0].named_modules() if isinstance(m, BlockInputNoise) and m.delta > 0}
        for name, original in originals.items():
            prefix, _, attr = name.rpartition(".")
            setattr(self.base.get_submodule(prefix) if prefix else self.base, attr, _FedNoise(self, original))
        self._feed: Iterator[torch.Tensor] = iter(())
        self._recording: list | None = None
        self._noise_shapes: dict[tuple, list[tuple]] = {}
        self._originals = originals
        self.base.train()

        # optimizer: the variant's groups, each parameter replaced by its stacked leaf
        groups = [v.param_groups(lr) for v in self.variants]
        for g in groups[1:]:
            if [(x["name"], x["lr"], x.get("weight_decay")) for x in g] != [(x["name"], x["lr"], x.get("weight_decay")) for x in groups[0]]:
                raise ValueError("stacked seeds need identical param groups (lr, decay) in every model")
        stacked_groups = []
        for g in groups[0]:
            sg = {k: v for k, v in g.items() if k != "params"}
            sg["params"] = [self.params[names[id(p)]] for p in g["params"]]
            stacked_groups.append(sg)
        self.optimizer = torch.optim.SGD(stacked_groups, momentum=momentum, fused=self.device.type == "cuda" or None)

        # the hooks, by stacked name
        self._projected = [names[id(p)] for p in self.variants[0].projected]
        self._decayed = [names[id(p)] for p in self.variants[0].unity_decayed]
        self._per_model_hook = bool(getattr(self.variants[0], "agc_clipped", None)) or type(self.variants[0]).after_backward is not Variant.after_backward
        # forward, summed loss, backward, the hook, the update: the step every path shares
        self.train_step = TrainStep(self, self.optimizer, inspect=self.grad_norms)

    # ------------------------------------------------------------------ checks
    def _check_supported(self) -> None:
        v = self.variants[0]
        if any(isinstance(m, GainConv2d) and m.gain_noise > 0 for m in v.model.modules()):
            raise NotImplementedError("stacked seeds: gain noise (one draw per filter inside GainConv2d) is not supported")
        if type(v).extra_loss is not Variant.extra_loss:
            raise NotImplementedError(f"stacked seeds: variant {v.name!r} has its own extra loss")
        named = {id(p) for p in v.model.parameters()}
        for what, tensors in (("unity-decayed", v.unity_decayed), ("projected", v.projected)):
            if any(id(t) not in named for t in tensors):
                raise NotImplementedError(f"stacked seeds: variant {v.name!r} has {what} tensors that are not parameters")

    # ------------------------------------------------------------------ noise
    def _noise_layout(self, x: torch.Tensor) -> list[tuple]:
        """(site, shape, dtype) of every noise draw of one model's forward on a batch like ``x``,
        in the order the forward draws them.

        Found once per input shape by running model 0's forward on a copy of its buffers with
        recording stand-ins (no draw, no state change), under the same autocast as training.
        """
        key = tuple(x.shape[1:])
        if key not in self._noise_shapes:
            self._recording = []
            try:
                p0 = {n: t[0].detach() for n, t in self.params.items()}
                b0 = {n: t[0].clone() for n, t in self.buffers.items()}
                with torch.no_grad(), self._autocast():
                    functional_call(self.base, (p0, b0), (x[0],))
                self._noise_shapes[key] = self._recording
            finally:
                self._recording = None
            if sorted(id(site) for site, _, _ in self._noise_shapes[key]) != sorted(map(id, self._originals.values())):
                raise NotImplementedError("stacked seeds: a noise module runs other than once per forward")
        return self._noise_shapes[key]

    def _draw(self, site: BlockInputNoise, shape: tuple, dtype: torch.dtype, gen: torch.Generator | None) -> torch.Tensor:
        # BlockInputNoise.multiplier's two distributions, with an explicit generator, drawn in fp32
        # whatever the activations' dtype, as it draws them
        dtype = torch.float32
        if site.dist == "uniform":
            return torch.empty(shape, device=self.device, dtype=dtype).uniform_(1 - site.delta, 1 + site.delta, generator=gen)
        return torch.randn(shape, device=self.device, dtype=dtype, generator=gen).mul_(site.delta).add_(1).clamp_(0, 2)

    def _noise(self, xs: torch.Tensor) -> list[torch.Tensor]:
        if not self._originals:
            return []
        layout = self._noise_layout(xs)
        if self.noise_rng == "per_model":
            # model by model, site by site in forward order: the sequence its own run draws
            per_model = [[self._draw(site, shape, dt, g) for site, shape, dt in layout] for g in self._generators]
            return [torch.stack([per_model[i][j] for i in range(self.k)]) for j in range(len(layout))]
        return [self._draw(site, (self.k, *shape), dt, None) for site, shape, dt in layout]

    # ------------------------------------------------------------------ the step
    def _autocast(self):
        # no weight-cast cache: each weight is cast once per forward anyway, and a cache must not
        # outlive a CUDA-graph capture of the step
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None, cache_enabled=False)

    def _one_model(self, params: dict, buffers: dict, noise: list, x: torch.Tensor, y: torch.Tensor):
        self._feed = iter(noise)
        logits = functional_call(self.base, (params, buffers), (x,))
        return logits, F.cross_entropy(logits.float(), y)

    def _extra(self) -> torch.Tensor:
        """Each model's extra loss, shape (K,): the variant's unity decay on its own weights."""
        if not self._decayed:
            return torch.zeros(self.k, device=self.device)
        kappa = self.spec.unity_kappa
        return vmap(lambda ws: unity_decay(ws, kappa))([self.params[n] for n in self._decayed])

    def forward_loss(self, xs: torch.Tensor, ys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits (K, B, classes), data loss (K,), total loss (K,)) of the models in train mode."""
        if xs.shape[0] != self.k or ys.shape[0] != self.k:
            raise ValueError(f"expected a leading dim of {self.k} models, got {tuple(xs.shape)} and {tuple(ys.shape)}")
        noise = self._noise(xs)
        with self._autocast():
            logits, ce = vmap(self._one_model)(self.params, self.buffers, noise, xs, ys)
        return logits, ce, ce + self._extra()

    def after_backward(self) -> None:
        """The variant's gradient modification, per model, on the stacked true gradients."""
        if self._per_model_hook:
            for i, (v, m) in enumerate(zip(self.variants, self.models, strict=True)):
                for name, p in m.named_parameters():
                    g = self.params[name].grad
                    p.grad = None if g is None else g[i]
                v.after_backward()  # writes through the views into the stacked gradients
                for p in m.parameters():
                    p.grad = None
            return
        grad = self.spec.grad
        if grad == "none":
            return
        # (K, O, I, kh, kw) -> (K*O, I, kh, kw): the same rows per model, for both granularities
        views = [_GradView(self.params[n].grad.flatten(0, 1)) for n in self._projected if self.params[n].grad is not None]
        if grad == "project":
            project_gradients_(views, granularity=self.spec.granularity, lam=self.spec.lam)
        elif grad == "cmrr":
            cmrr_gradients_(views, m=self.spec.cmrr_m, granularity=self.spec.granularity)
        else:
            raise NotImplementedError(f"stacked seeds: gradient mode {grad!r}")

    @torch.no_grad()
    def grad_norms(self) -> torch.Tensor:
        """Each model's global gradient norm, shape (K,) (msr.training.probes.grad_norm per model)."""
        grads = [t.grad for t in self.params.values() if t.grad is not None]
        if not grads:
            return torch.zeros(self.k, device=self.device)
        per_tensor = torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads])  # (P, K)
        return torch.linalg.vector_norm(per_tensor, dim=0)

    def step(self, xs: torch.Tensor, ys: torch.Tensor, *, inspect: bool = False) -> StepResult:
        """One training step of all K models (msr.training.step.TrainStep); ``inspected`` is the
        models' grad norms (K,) when asked for.

        A model whose loss is non-finite does not disturb the others (no tensor mixes models);
        the caller decides what a diverged model means, as the trainer does for one run.
        """
        return self.train_step(xs, ys, inspect=inspect)


def noise_generator(device: torch.device) -> torch.Generator:
    """A generator that continues where this process's own generator for ``device`` is now -
    taken right after a run's model is built, it draws the noise that run would draw."""
    gen = torch.Generator(device=device)
    gen.set_state(torch.get_rng_state() if device.type == "cpu" else torch.cuda.get_rng_state(device))
    return gen


class _GradView:
    """Something with a ``.grad`` for the method's gradient functions: a view of stacked grads."""

    __slots__ = ("grad",)

    def __init__(self, grad: torch.Tensor):
        self.grad = grad
