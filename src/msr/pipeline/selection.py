"""Choosing each tuned variant's learning rate on a validation split, never on the test set.

The pipeline's ``select_lr`` checkpoint (workflow/rules/train.smk) calls :func:`select` on the
validation runs of ``lr_selection`` (msr.pipeline.grid: tag ``val-lrx<f>``, trained on the
training data less a held-out, class-stratified validation split and evaluated on that split,
msr.data.splits). THE RULE (:data:`RULE`, also in docs/method.md and in every output), per
dataset, arch and variant:

1. each factor f of ``lr_selection.factors`` (every param group at f x the variant's own lr)
   has one validation run per selection seed; a run FAILS by the study's one definition
   (msr.outcome.run_outcome): it diverged, or its final validation accuracy stayed
   under chance + 0.5 x (1 - chance);
2. a factor is ELIGIBLE when none of its runs failed;
3. the chosen factor is the eligible one with the highest final-epoch validation accuracy,
   averaged over the selection seeds; a TIE (equal means) goes to the factor nearest the
   variant's default (smallest |log2 f|), then to the smaller factor;
4. when no factor is eligible, the variant keeps its default (factor 1), and the outputs say
   so (``status`` ``none trained: default kept``).

Outputs: ``lr_selection.json`` (the chosen factor of every tuned variant, with every candidate;
the main grid reads it), a CSV of every candidate (published with the figures and listed in the
manifest) and the provenance record the manifest reads (the runs it was made from).

Torch-free; reads only run directories (msr.training.rundir's strict readers).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from msr import atomic
from msr.outcome import TRAINED, chance_level, run_outcome
from msr.pipeline.grid import GridError, Run
from msr.training.rundir import check_complete, read_json

RULE = (
    "lr selection: every param group at factor f x the variant's own lr, f from the selection grid; "
    "one validation run per selection seed, trained on the training data less a held-out, "
    "class-stratified validation split and evaluated on it (never on the test set). A factor is "
    "eligible when none of its runs failed (diverged, or final validation accuracy under chance + "
    "0.5 x (1 - chance)); the chosen factor has the highest final-epoch validation accuracy, mean "
    "over the seeds; ties go to the factor nearest the default (|log2 f|), then to the smaller; "
    "with no eligible factor the default (1) is kept."
)
CHOSEN, DEFAULT_KEPT = "chosen", "none trained: default kept"
CSV_COLUMNS = ["dataset", "arch", "variant", "lr_factor", "lr", "seeds", "n_runs", "n_trained", "n_diverged",
               "n_at_chance", "val_acc_mean", "val_acc_min", "val_acc_max", "eligible", "chosen", "status"]


def choose(candidates: Mapping[float, Sequence[tuple[str, float]]]) -> tuple[float, str]:
    """(chosen factor, status) from factor -> [(outcome, final validation accuracy), ...]: the
    rule of the module docstring, steps 2-4."""
    eligible = {f: runs for f, runs in candidates.items() if runs and all(o == TRAINED for o, _ in runs)}
    if not eligible:
        return 1.0, DEFAULT_KEPT
    means = {f: sum(acc for _, acc in runs) / len(runs) for f, runs in eligible.items()}
    best = max(means.values())
    tied = [f for f, m in means.items() if m == best]
    return min(tied, key=lambda f: (abs(math.log2(f)), f)), CHOSEN


def select(runs: Sequence[Run], runs_root: str | Path, *, out: str | Path, table: str | Path | None = None,
           provenance: str | Path | None = None, log: str | Path | None = None) -> dict[str, Any]:
    """Apply :data:`RULE` to the selection runs ``runs`` (complete run directories under
    ``runs_root``); write ``out`` (JSON), ``table`` (CSV) and ``provenance`` (for the manifest)
    atomically; return the JSON's content."""
    groups: dict[tuple[str, str, str], dict[float, list[dict]]] = {}
    for run in runs:
        if run.eval_split != "validation":
            raise GridError(f"{run.path}: not a validation run; the lr is never chosen on the test set")
        run_dir = Path(runs_root) / run.path
        summary = check_complete(run_dir)
        config = read_json(run_dir / "config.json")
        if config.get("eval_split") != "validation":
            raise GridError(f"{run_dir}/config.json: eval_split={config.get('eval_split')!r}, not 'validation'")
        chance = chance_level(run.dataset)
        acc = summary.get("final_test_acc")  # the run's evaluation split: validation images
        groups.setdefault((run.dataset, run.arch, run.variant), {}).setdefault(float(run.lr_factor), []).append({
            "run_id": run.path, "seed": run.seed, "lr": float(config["lr"]),
            "outcome": run_outcome(summary["status"], acc if acc is not None else math.nan, chance),
            "val_acc": float(acc) if acc is not None and math.isfinite(float(acc)) else None,
            "eval_images": config.get("eval_images"),
        })
    selected, rows = [], []
    for (dataset, arch, variant), by_factor in sorted(groups.items()):
        factor, status = choose({f: [(r["outcome"], r["val_acc"]) for r in rs] for f, rs in by_factor.items()})
        candidates = []
        for f in sorted(by_factor):
            rs = sorted(by_factor[f], key=lambda r: r["seed"])
            accs = [r["val_acc"] for r in rs if r["val_acc"] is not None]  # completed runs (not diverged)
            count = {o: sum(r["outcome"] == o for r in rs) for o in ("trained", "diverged", "at chance")}
            eligible = count["trained"] == len(rs)
            cand = {
                "lr_factor": f, "lr": rs[0]["lr"], "seeds": [r["seed"] for r in rs], "n_runs": len(rs),
                "n_trained": count["trained"], "n_diverged": count["diverged"], "n_at_chance": count["at chance"],
                # over the completed runs, shown for every factor (the rule compares eligible ones)
                "val_acc_mean": sum(accs) / len(accs) if accs else None,
                "val_acc_min": min(accs) if accs else None, "val_acc_max": max(accs) if accs else None,
                "eligible": eligible, "chosen": f == factor and status == CHOSEN,
                "runs": [r["run_id"] for r in rs],
            }
            candidates.append(cand)
            rows.append({"dataset": dataset, "arch": arch, "variant": variant, **cand,
                         "seeds": " ".join(map(str, cand["seeds"])), "status": status if cand["chosen"] else ""})
        chosen = next((c for c in candidates if c["lr_factor"] == factor), None)
        own_lr = candidates[0]["lr"] / candidates[0]["lr_factor"]  # the variant's conv lr at factor 1
        selected.append({
            "dataset": dataset, "arch": arch, "variant": variant, "lr_factor": factor, "status": status,
            "lr": chosen["lr"] if chosen else own_lr * factor,
            "val_acc_mean": chosen["val_acc_mean"] if chosen and status == CHOSEN else None,
            "eval_images": next(iter(by_factor.values()))[0]["eval_images"],
            "candidates": candidates,
        })
    record = {"rule": RULE, "metric": "final-epoch validation accuracy, mean over the selection seeds",
              "selected": selected}
    atomic.write_json(Path(out), record)
    if table is not None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: _cell(v) for k, v in row.items()} for row in rows)
        atomic.write_text(Path(table), buf.getvalue())
    if provenance is not None:
        atomic.write_text(Path(provenance), json.dumps({
            "name": Path(table).stem if table is not None else "lr_selection",
            "outputs": [Path(table).as_posix()] if table is not None else [],
            "sources": [], "runs": sorted(r.path for r in runs)}, indent=1) + "\n")
    if log is not None:
        lines = [f"{s['dataset']}/{s['arch']}/{s['variant']}: x{s['lr_factor']:g} (lr {s['lr']}) {s['status']}"
                 for s in selected]
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        Path(log).write_text(RULE + "\n" + "\n".join(lines) + "\n")
    return record


def _cell(value: Any) -> Any:
    """A CSV cell: floats to 6 significant digits (accuracies of a few hundred images), None empty."""
    if value is None:
        return ""
    if isinstance(value, float):
        return format(value, ".6g")
    return value


def load(path: str | Path) -> dict[tuple[str, str, str], float]:
    """(dataset, arch, variant) -> chosen factor, from :func:`select`'s JSON; a missing or
    damaged file is a GridError naming it."""
    try:
        record = json.loads(Path(path).read_text())
        return {(s["dataset"], s["arch"], s["variant"]): float(s["lr_factor"]) for s in record["selected"]}
    except FileNotFoundError:
        raise GridError(f"{path}: missing; the lr selection (select_lr) has not run") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise GridError(f"{path}: not an lr selection record ({type(err).__name__}); delete it to choose again") from None
