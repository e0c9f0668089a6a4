"""A GPU visit's one-page summary (tools/gpu_session.sh writes it as ``summary.md``) and the choice
of the fastest exact training path from the visit's own bench - torch-free.

The page holds what the visit measured against its goals (research/gpu-speed.md, issue 15):
- ResNet-20 at batch 128, eager vs CUDA graph vs K processes vs K stacked seeds, ms/step and
  images/s at 32x32 and 28x28; the goal is at least 4x the eager images/s per GPU (runs at once
  counted together);
- full-data Fashion-MNIST runs completed in the training visit (goal: >= 40), each with its
  wall time and steps, and the cost of one training step on the whole GPU at the visit's
  concurrency, from which any grid's GPU-hours follow::

      GPU-hours(grid) = sum over runs r of  E_r * floor(N_r / B_r) * c / 3600

  E_r epochs, N_r training images, B_r batch size, c = measured GPU-seconds per step
  (``status.json``'s train_wall_s / steps_done: evaluation, start-up and steps lost at the
  deadline included, so an upper bound at that concurrency).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from msr import catalog
from msr.infra.benchtable import format_table

GOAL_SPEEDUP = 4.0
GOAL_RUNS = 40
# how each bench method trains a plan's runs with msr run-plan: (processes at once, extra msr
# train options, seeds stacked per process); "models" of the row gives K
PATHS = {
    "eager": lambda k: (1, "", 1),
    "cuda_graph": lambda k: (1, "--cuda-graph", 1),
    "processes": lambda k: (k, "", 1),
    "processes_graph": lambda k: (k, "--cuda-graph", 1),
    "stacked": lambda k: (1, "", k),
    "stacked_graph": lambda k: (1, "--cuda-graph", k),
}


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def choose_path(bench_files: list[Path], variant: str = "msr_noise") -> dict[str, Any]:
    """The fastest measured way to train (images/s of all models together) among the rows of
    ``variant`` in the bench tables: its run-plan settings. Eager in one process when nothing
    was measured."""
    best = {"method": "eager", "images_per_s": None, "procs": 1, "extra": "", "stack": 1, "why": "nothing measured"}
    for f in bench_files:
        table = _load(f)
        for row in (table or {}).get("rows", []):
            if row.get("variant") != variant or row.get("status") != "ok" or row.get("method") not in PATHS:
                continue
            if best["images_per_s"] is None or row["images_per_s"] > best["images_per_s"]:
                procs, extra, stack = PATHS[row["method"]](row["models"])
                best = {"method": row["method"], "images_per_s": row["images_per_s"], "procs": procs, "extra": extra,
                        "stack": stack, "models": row["models"], "why": f"fastest in {f.name}"}
    return best


def _steps(path: Path) -> list[dict[str, str]]:
    try:
        with path.open() as f:
            return list(csv.DictReader(f, delimiter="\t"))
    except OSError:
        return []


def _goal_line(tables: list[dict]) -> list[str]:
    lines = []
    for t in tables:
        env = t.get("environment", {})
        shape = "x".join(map(str, env.get("image_shape", (3, 32, 32))))
        for variant in sorted({r["variant"] for r in t.get("rows", [])}):
            rows = [r for r in t["rows"] if r["variant"] == variant and r["status"] == "ok" and r["arch"] == "resnet20"]
            eager = next((r for r in rows if r["method"] == "eager"), None)
            if not eager or len(rows) < 2:
                continue
            best = max(rows, key=lambda r: r["images_per_s"])
            x = best["images_per_s"] / eager["images_per_s"]
            verdict = "met" if x >= GOAL_SPEEDUP else "not met"
            lines.append(f"- {shape}, {variant}: best {best['method']} ({best['models']} model(s)) {best['images_per_s']:.0f} img/s "
                         f"= {x:.2f}x eager ({eager['images_per_s']:.0f} img/s): goal {GOAL_SPEEDUP:g}x {verdict}")
    return lines


def _plan_steps(plan: dict[str, Any]) -> int:
    """Training steps of every run of a plan (its runs' epochs, batch and dataset)."""
    total = 0
    for r in plan.get("runs", []):
        args = r["args"]

        def opt(name: str, default=None, args=args):
            return args[args.index(name) + 1] if name in args and args.index(name) + 1 < len(args) else default

        dataset = opt("--dataset", "digits")
        facts = catalog.dataset(dataset)
        epochs = int(opt("--epochs", facts.epochs))
        batch = int(opt("--batch-size", facts.batch_size))
        n = int(opt("--train-subset", facts.train_size))
        total += epochs * (n // batch)
    return total


def summary(work: str | Path, mode: str, *, plan: str | Path | None = None) -> str:
    """summary.md of a visit whose files are in ``work`` (steps.tsv, env.log, bench_*.json,
    digits_compare.json, status.json, choice.json)."""
    work = Path(work)
    out = [f"# GPU visit: {mode}", ""]
    env = (work / "env.log").read_text() if (work / "env.log").exists() else "(no env.log)"
    out += ["```", env.strip(), "```", "", "## Steps", "", "| step | status | exit | seconds | cap |", "|---|---|---|---|---|"]
    for s in _steps(work / "steps.tsv"):
        out.append(f"| {s.get('step')} | {s.get('status')} | {s.get('rc')} | {s.get('seconds')} | {s.get('cap', '')} |")
    tables = [t for t in (_load(f) for f in sorted(work.glob("bench_*.json"))) if t]
    if tables:
        out += ["", "## Speed (msr bench; the goal is judged on ResNet-20 rows)", ""]
        out += _goal_line(tables) or ["- no table with both an eager row and another method"]
        for f in sorted(work.glob("bench_*.json")):
            t = _load(f)
            if t:
                out += ["", f"### {f.stem}", "", "```", format_table(t), "```"]
    compare = _load(work / "digits_compare.json")
    if compare:
        out += ["", "## digits: the same runs on CUDA and on the CPU", "",
                f"Tolerance: |test accuracy CUDA - CPU| <= {compare.get('tolerance')} for each variant "
                "(different hardware and precision: not bitwise, within seed noise)", "", "```",
                json.dumps(compare, indent=2), "```"]
    choice = _load(work / "choice.json")
    if choice:
        out += ["", "## Training path", "", f"{choice['method']} ({choice.get('why')}): run-plan --procs {choice['procs']} "
                f"--stack {choice['stack']} --extra '{choice['extra']}'"]
    status = _load(work / "status.json")
    if status:
        out += _train_section(status, _load(Path(plan)) if plan else None)
    return "\n".join(out) + "\n"


def _train_section(status: dict[str, Any], plan: dict[str, Any] | None) -> list[str]:
    runs = status.get("runs", [])
    done = [r for r in runs if r["state"] in ("completed", "diverged")]
    full = [r for r in done if r.get("epochs") == r.get("epochs_planned")]
    lines = ["", "## Training", "",
             f"{status.get('procs')} process(es) at once, stack {status.get('stack')}, extra '{' '.join(status.get('extra', []))}', "
             f"deadline {status.get('deadline_s')} s; training phase {status.get('train_wall_s')} s.", "",
             f"- runs finished: {len(done)} (goal {GOAL_RUNS}: {'met' if len(full) >= GOAL_RUNS else 'not met'}); "
             f"partial (resumable): {status.get('runs_partial')}; steps done: {status.get('steps_done')}"]
    c = status.get("gpu_seconds_per_step")
    if c:
        lines.append(f"- measured cost c = {c * 1e3:.3f} ms of the GPU per training step at this concurrency "
                     f"({1 / c:.0f} steps/s in all)")
        lines += ["", "GPU-hours(grid) = sum over runs r of E_r * floor(N_r / B_r) * c / 3600 "
                  "(E epochs, N training images, B batch; c as measured above, evaluation included)."]
        if plan:
            steps = _plan_steps(plan)
            lines.append(f"- this plan's {len(plan.get('runs', []))} runs: {steps} steps -> {steps * c / 3600:.2f} GPU-hours")
        lines.append("- another arch or image size (the paper's CIFAR grid): scale c by the ratio of the chosen "
                     "method's ms/step in the bench tables (resnet20 at 32x32: the quick visit's bench_32)")
    lines += ["", "| run | state | epochs | steps | process wall s | train s | final test acc |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        if r.get("job_state") in ("not_started", "skipped") and r["state"] == "not_started":
            continue
        acc = r.get("final_test_acc")
        acc = f"{acc:.4f}" if isinstance(acc, float) and math.isfinite(acc) else "-"
        lines.append(f"| {r['out'].split('/runs/')[-1]} | {r['state']} | {r.get('epochs')}/{r.get('epochs_planned')} | {r.get('steps')} | "
                     f"{r.get('process_wall_s', '-')} | {_num(r.get('train_seconds'))} | {acc} |")
    left = sum(1 for r in runs if r["state"] == "not_started")
    lines.append(f"\n{left} planned run(s) not started.")
    return lines


def _num(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, int | float) else "-"


def compare_digits(root: str | Path, variants: list[str], tolerance: float) -> dict[str, Any]:
    """The same digits runs on CUDA (``root/cuda/<variant>``) and on the CPU (``root/cpu/<variant>``):
    their test accuracies side by side, and whether each pair is within ``tolerance``."""
    root = Path(root)
    result: dict[str, Any] = {"tolerance": tolerance, "variants": {}, "ok": True}
    for v in variants:
        got = {dev: _load(root / dev / v / "summary.json") for dev in ("cuda", "cpu")}
        row: dict[str, Any] = {dev: ({k: s.get(k) for k in ("status", "final_test_acc", "epochs_completed", "train_seconds")}
                                     if s else "no summary (run failed or skipped)") for dev, s in got.items()}
        if got["cuda"] and got["cpu"]:
            diff = got["cuda"]["final_test_acc"] - got["cpu"]["final_test_acc"]
            row["test_acc_difference"] = diff
            row["within_tolerance"] = got["cuda"]["status"] == got["cpu"]["status"] == "completed" and abs(diff) <= tolerance
        else:
            row["within_tolerance"] = False
        result["ok"] = result["ok"] and row["within_tolerance"]
        result["variants"][v] = row
    return result
