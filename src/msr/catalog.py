"""The facts every layer reads, in one place and without torch.

Each dataset's sizes, classes, channels, image size and training defaults (and what a null
epochs / batch size / training subset means for it), each variant's name with the claim it
tests, the default data folder and the default config set. The config schema, the grid checks,
the CLI's help, the claims table and the notebooks read them here; ``msr.data`` and
``msr.core.variants`` build what these facts describe, and tests check that what they build
agrees (tests/test_catalog.py, tests/test_defaults.py). Nothing else writes these facts down.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetFacts:
    """What is known about a dataset before it is loaded."""

    name: str
    summary: str
    train_size: int  # images in the training split msr uses
    test_size: int
    num_classes: int
    channels: int
    native_size: int  # side length of the stored images
    image_size: int  # side length trained at when the config gives none
    image_sizes: tuple[int, ...] | None  # the sizes msr can load; None = any
    epochs: int  # `msr train`'s default when none is given
    batch_size: int
    raw_folder: str | None = None  # the folder its official archive unpacks to, under <data>/raw/

    @property
    def chance(self) -> float:
        """Accuracy of guessing: 1 / classes."""
        return 1.0 / self.num_classes

    def or_default(self, key: str, value: int | None) -> int:
        """``value``, or this dataset's own ``key`` (``epochs`` or ``batch_size``) when it is
        ``None``: what a null in a config or an omitted ``msr train`` option means. The one
        place that reads it (RunConfig and the pipeline's grid both ask here)."""
        if key not in ("epochs", "batch_size"):
            raise KeyError(f"{key!r} has no per-dataset default (epochs, batch_size)")
        return getattr(self, key) if value is None else value

    def check_train_subset(self, n: object) -> None:
        """The one rule for a training subset of ``n`` images (``msr train --train-subset``,
        config ``train.train_subset``): an integer from 1 to the training set's size, or None
        (the whole set). A ValueError says what is allowed; the caller names its key."""
        if n is None:
            return
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.train_size:
            raise ValueError(f"must be a number of training images from 1 to {self.train_size} "
                             f"({self.name} has {self.train_size}), or null for all of them")


# Where datasets are downloaded and cached unless a config or option says otherwise (msr.data's
# functions, `msr train/prepare/datasets/bench --data-root`, RunConfig.data_root and the config
# schema's train.data_root all mean this folder; tests/test_defaults.py checks they agree).
DATA_ROOT = "data"

# The config set a plain `make run` / `snakemake` makes (workflow/config/default.yaml's `name:`,
# the schema's default): its files live under results/<set>/ and figures/<set>/, which is where
# the `msr aggregate` / `msr manifest` defaults and a notebook run by hand look.
DEFAULT_SET = "digits"

# The paper's recipe on CIFAR (200 epochs, batch 128). digits has 1437 training images, where
# batch 128 would give 11 steps an epoch, so it defaults to smaller batches.
DATASETS: dict[str, DatasetFacts] = {
    facts.name: facts
    for facts in (
        # scikit-learn's 1797 images, a fixed stratified 80/20 split (msr.data.digits)
        DatasetFacts("digits", "scikit-learn's bundled 8x8 grey handwritten digits",
                     train_size=1437, test_size=360, num_classes=10, channels=1,
                     native_size=8, image_size=16, image_sizes=(8, 16, 32), epochs=10, batch_size=32),
        DatasetFacts("cifar10", "CIFAR-10, 32x32 colour (official archive)",
                     train_size=50_000, test_size=10_000, num_classes=10, channels=3,
                     native_size=32, image_size=32, image_sizes=(32,), epochs=200, batch_size=128,
                     raw_folder="cifar-10-batches-py"),
        DatasetFacts("cifar100", "CIFAR-100, 32x32 colour (official archive)",
                     train_size=50_000, test_size=10_000, num_classes=100, channels=3,
                     native_size=32, image_size=32, image_sizes=(32,), epochs=200, batch_size=128,
                     raw_folder="cifar-100-python"),
        # generated learnable images for tests (msr.data.synthetic; its sizes can be changed
        # per call, these are the defaults)
        DatasetFacts("synthetic", "generated CIFAR-format images (tests)",
                     train_size=1000, test_size=200, num_classes=10, channels=3,
                     native_size=16, image_size=16, image_sizes=None, epochs=10, batch_size=32),
        DatasetFacts("fashion_mnist", "Fashion-MNIST, 28x28 grey garments",
                     train_size=60_000, test_size=10_000, num_classes=10, channels=1,
                     native_size=28, image_size=28, image_sizes=(28,), epochs=30, batch_size=128),
    )
}

# Every variant of the registry (msr.core.variants.VARIANTS, same order) and the claim of
# docs/method.md it tests; the order is the figures' order and colours.
VARIANT_CLAIMS: dict[str, str] = {
    "bn": "reference",
    "bn_noise": "4",
    "plain": "1",
    "nf": "control",
    "zmi": "2",
    "zmg": "2",
    "msr": "2, 3",
    "msr_noise": "4, 5",
    "gc": "peer",
    "msr_cmrr": "fidelity",
    "msr_rs": "stem",
    "wn": "6",
    "fixup": "6",
    "skipinit": "6",
    "nf_ws": "peer",
    "bn_preact": "reference",
}
VARIANTS: tuple[str, ...] = tuple(VARIANT_CLAIMS)


def dataset(name: str) -> DatasetFacts:
    """The facts of dataset ``name``; an unknown name lists the valid ones."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}") from None


def check_variant(name: str) -> str:
    """``name`` if it is a registered variant; otherwise a ValueError listing them."""
    if name not in VARIANT_CLAIMS:
        raise ValueError(f"unknown variant {name!r}; valid variants: {', '.join(VARIANTS)}")
    return name
