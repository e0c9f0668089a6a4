"""What a run's end means - trained, diverged, or at chance - in one definition for every table.

A run TRAINED, or it FAILED: it diverged (a non-finite loss), or it ended at chance (final
accuracy below chance + 0.5 x (1 - chance): half way from chance to perfect, 55% for 10
classes, 50.5% for 100).

T3's verdicts (msr.analysis.claims), the figures and tables (msr.analysis.figures), and the lr
selection on the validation split (msr.pipeline.selection) all count failures with this module;
it sits below them all and reads only the catalog (the chance level of each dataset).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from msr import catalog

# A run fails below chance + FAIL_FRACTION x (1 - chance) final test accuracy: half way from
# chance to perfect (55% for 10 classes, 50.5% for 100). The same threshold on final clean train
# accuracy decides "failed to train".
FAIL_FRACTION = 0.5
TRAINED, DIVERGED, AT_CHANCE = "trained", "diverged", "at chance"
# Classes per dataset, for the chance level (1 / classes), from the catalog; others via num_classes=.
NUM_CLASSES = {name: facts.num_classes for name, facts in catalog.DATASETS.items()}


def failure_threshold(chance: float) -> float:
    """Final test accuracy under which a run failed (ended at chance): chance + 0.5 (1 - chance).
    The same number on final clean train accuracy decides "failed to train"."""
    return chance + FAIL_FRACTION * (1.0 - chance)


def run_outcome(status: str, final_test_acc: float, chance: float) -> str:
    """:data:`TRAINED`, :data:`DIVERGED` or :data:`AT_CHANCE` (failed: below
    :func:`failure_threshold`). A run that is neither completed nor diverged (e.g. interrupted)
    has no outcome and is an error, never silently dropped."""
    status = str(status)
    if status == "diverged":
        return DIVERGED
    if status != "completed":
        raise ValueError(f"run status {status!r} is neither 'completed' nor 'diverged': not a result")
    acc = float(final_test_acc) if final_test_acc is not None else math.nan
    if not math.isfinite(acc):
        raise ValueError("a completed run without a finite final_test_acc: its run directory is damaged")
    return TRAINED if acc >= failure_threshold(chance) else AT_CHANCE


def run_failed(status: str, final_test_acc: float, chance: float) -> bool:
    """Did this run fail (diverged, or ended at chance)? See :func:`run_outcome`."""
    return run_outcome(status, final_test_acc, chance) != TRAINED


def classes_of(dataset: str, num_classes: Mapping[str, int] | None = None) -> int:
    """The number of classes of ``dataset`` (``num_classes`` adds to or overrides NUM_CLASSES)."""
    classes = {**NUM_CLASSES, **(num_classes or {})}
    if dataset not in classes:
        raise ValueError(f"number of classes of dataset {dataset!r} unknown: add it to "
                         f"msr.catalog.DATASETS or pass num_classes={{{dataset!r}: N}}")
    return int(classes[dataset])


def chance_level(dataset: str, num_classes: Mapping[str, int] | None = None) -> float:
    return 1.0 / classes_of(dataset, num_classes)
