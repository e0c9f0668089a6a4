"""Presentation helpers shared by the figure/table notebooks.

Fixed colours and order per variant, deterministic figure files (no timestamps in PNG/PDF
metadata, fixed rc settings), Markdown/LaTeX tables via pandas, the provenance sidecars the
manifest collects, and the published reference numbers shown next to our runs. Imports no
torch, so notebooks start fast.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from msr import atomic, catalog
from msr.analysis import aggregate as agg
from msr.analysis import claims
from msr.analysis.aggregate import depth_of_arch

# Published BatchNorm ResNet numbers on CIFAR-10 (test accuracy, %), shown as reference
# columns next to our runs - they are NOT runs of this pipeline.
#   He et al. 2016, "Deep Residual Learning for Image Recognition", Table 6 (100 - error).
#     ResNet-110 is the mean of 5 runs (error 6.61 +- 0.16); its best run is 93.57.
#   Idelbayev, github.com/akamaster/pytorch_resnet_cifar10, README (the widely used PyTorch
#     reproduction whose recipe msr's `bn` variant follows).
# No comparable published numbers for CIFAR-100 with these nets: left empty.
PUBLISHED_REFERENCES: dict[str, dict[tuple[str, str], float]] = {
    "He et al. 2016": {
        ("cifar10", "resnet20"): 91.25,
        ("cifar10", "resnet32"): 92.49,
        ("cifar10", "resnet44"): 92.83,
        ("cifar10", "resnet56"): 93.03,
        ("cifar10", "resnet110"): 93.39,
    },
    "Idelbayev (PyTorch)": {
        ("cifar10", "resnet20"): 91.73,
        ("cifar10", "resnet32"): 92.63,
        ("cifar10", "resnet44"): 93.10,
        ("cifar10", "resnet56"): 93.39,
        ("cifar10", "resnet110"): 93.68,
    },
}


def format_mean_std(mean: float, std: float, n: int, n_diverged: int = 0, scale: float = 100.0,
                    digits: int = 2, pm: str = "±") -> str:
    """``"91.25 ± 0.31 (n=5)"``; diverged runs appended (``"..., 2 diverged"``); ``"-"`` if
    no completed run."""
    if n == 0 or not math.isfinite(mean):
        text = "-"
        return f"{text} ({n_diverged} diverged)" if n_diverged else text
    text = f"{mean * scale:.{digits}f}"
    if math.isfinite(std):
        text += f" {pm} {std * scale:.{digits}f}"
    extra = f"n={n}" + (f", {n_diverged} diverged" if n_diverged else "")
    return f"{text} ({extra})"


def _as_text(frame: pd.DataFrame) -> pd.DataFrame:
    """Every cell as the string ``str()`` gives (as the notebooks format them); missing -> ''."""
    return frame.astype(object).where(frame.notna(), "").map(str)


_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                  "^": r"\textasciicircum{}", "±": r"$\pm$"}


def latex_escape(text: str) -> str:
    """Escape LaTeX's special characters in free text (the table cells go through pandas)."""
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in str(text))


def to_markdown(frame: pd.DataFrame, notes: Sequence[str] = ()) -> str:
    """A GitHub-flavoured pipe table (pandas/tabulate; missing values left empty)."""
    cells = _as_text(frame).map(lambda v: v.replace("|", "\\|"))  # a bare | would split the cell
    text = cells.to_markdown(index=False, tablefmt="pipe", disable_numparse=True)
    return text + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")


def to_latex(frame: pd.DataFrame, caption: str = "", label: str = "",
             notes: Sequence[str] = (), column_format: str | None = None) -> str:
    """A booktabs ``table`` (pandas' Styler; needs ``\\usepackage{booktabs}``), special
    characters escaped, notes as a footnote-sized paragraph under the tabular;
    ``column_format``: LaTeX column specs (e.g. ``p{3cm}`` to wrap a long column)."""
    styler = _as_text(frame).style.hide(axis="index")
    styler = styler.format(escape="latex").format_index(escape="latex", axis=1)
    tex = styler.to_latex(caption=latex_escape(caption) or None, label=label or None, hrules=True,
                          position="t", position_float="centering", column_format=column_format)
    if notes:
        par = r"\par\smallskip{\footnotesize " + " ".join(latex_escape(n) for n in notes) + "}\n"
        tex = tex.replace("\\end{tabular}\n", "\\end{tabular}\n" + par, 1)
    return tex.replace("±", r"$\pm$")


# Fixed colours per variant across every figure, in the catalog's order (msr.catalog.VARIANTS);
# variants added later sort after these, by name.
VARIANT_ORDER = catalog.VARIANTS
# Families share a hue: BatchNorm references blue (bn_preact navy), MSR reds (msr_rs dark red),
# claim 6's batch-free peers teals (wn cyan, fixup dark teal, skipinit sea green); gc green and
# nf_ws dark gold, told apart where figure 1 draws them in one panel - every colour distinct and
# dark enough for a line on white.
_PALETTE = ("#1f77b4", "#aec7e8", "#7f7f7f", "#bcbd22", "#ff7f0e", "#9467bd", "#d62728",
            "#e377c2", "#2ca02c", "#8c564b",
            "#8b0000", "#17becf", "#005f66", "#2a9d8f", "#b8860b", "#08306b")


_EXTRA_PALETTE = ("#17becf", "#9edae5", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94",
                  "#f7b6d2", "#dbdb8d", "#393b79")


def variant_color(variant: str) -> str:
    """A fixed colour per variant; a variant added to the registry later gets a stable colour
    from a second palette (by a hash of its name), so no figure code needs editing."""
    if variant in VARIANT_ORDER:
        return _PALETTE[VARIANT_ORDER.index(variant)]
    digest = int(hashlib.sha1(variant.encode()).hexdigest(), 16)
    return _EXTRA_PALETTE[digest % len(_EXTRA_PALETTE)]


def ordered_variants(variants: Iterable[str]) -> list[str]:
    """``variants`` in registry order (unknown names last, sorted)."""
    variants = list(dict.fromkeys(variants))
    known = [v for v in VARIANT_ORDER if v in variants]
    return known + sorted(v for v in variants if v not in VARIANT_ORDER)


def panels(runs: pd.DataFrame) -> list[tuple[str, str]]:
    """The (dataset, arch) pairs present in ``runs``, by dataset then depth."""
    if runs.empty:
        return []
    pairs = runs[["dataset", "arch"]].drop_duplicates()
    pairs = pairs.assign(depth=pairs["arch"].map(depth_of_arch)).sort_values(["dataset", "depth"])
    return [(d, a) for d, a in zip(pairs["dataset"], pairs["arch"], strict=True)]


def placeholder(ax, message: str) -> None:
    """An empty panel that says why it is empty (e.g. the config has no runs for it)."""
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, wrap=True,
            fontsize=9, color="0.35")


def standalone_snakemake(name: str, kind: str = "figure", set_name: str | None = None, **params):
    """A stand-in for the ``snakemake`` object when a notebook is run by hand (e.g. in Jupyter
    outside ``snakemake --edit-notebook``): a config set's tables in (``results/<set>/tables/``;
    the set: ``set_name``, else ``$MSR_SET``, else the default set), ``results/<set>/scratch/``
    out. Run it from the project root, where the pipeline writes ``results/``."""
    from types import SimpleNamespace

    results = Path("results") / (set_name or os.environ.get("MSR_SET") or catalog.DEFAULT_SET)
    out = results / "scratch"
    files = ({"png": out / f"{name}.png", "pdf": out / f"{name}.pdf"} if kind == "figure"
             else {"csv": out / f"{name}.csv", "md": out / f"{name}.md", "tex": out / f"{name}.tex"})
    files["provenance"] = out / f"{name}.provenance.json"
    tables = results / "tables"
    return SimpleNamespace(
        input=SimpleNamespace(**{t: str(tables / f"{t}.csv") for t in ("runs", "summary", "curves")}),
        output=SimpleNamespace(**{k: str(v) for k, v in files.items()}),
        params=SimpleNamespace(**params),
    )


def figure_style() -> None:
    """Fixed matplotlib settings so figure bytes do not depend on the user's rc files."""
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcdefaults()
    matplotlib.rcParams.update({
        "figure.dpi": 100,
        "savefig.dpi": 150,
        "font.family": "DejaVu Sans",
        "font.size": 9,
        "axes.titlesize": 9,
        "axes.labelsize": 9,
        "legend.fontsize": 8,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.grid": True,
        "grid.alpha": 0.3,
        "svg.hashsalt": "msr",
        "pdf.fonttype": 42,
        "path.simplify": True,
    })


def save_figure(fig, png: str | Path, pdf: str | Path) -> None:
    """Save ``fig`` as PNG and PDF with no timestamps or version strings in the metadata, so a
    rerun on the same data gives byte-identical files."""
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, format="png", metadata={"Software": None})
    fig.savefig(pdf, format="pdf", metadata={"CreationDate": None, "Producer": None,
                                             "Creator": None})


def write_provenance(path: str | Path, name: str, run_ids: Iterable[str],
                     outputs: Iterable[str | Path], sources: Iterable[str | Path] = ()) -> None:
    """The sidecar a notebook leaves for the manifest: which runs and tables made its outputs."""
    record = {"name": name, "outputs": sorted(Path(p).as_posix() for p in outputs),
              "sources": sorted(Path(p).as_posix() for p in sources),
              "runs": sorted(set(run_ids))}
    atomic.write_text(path, json.dumps(record, indent=1) + "\n")


# --------------------------------------------------------------------------------------------
# Runs: which are test results, and how each one ended (the ONE failure definition lives in
# msr.analysis.claims: run_outcome / failure_threshold; figures and tables only count it)

# The sweeps whose runs are evaluated on the test set. Anything else - the validation-split
# learning-rate selection runs have their own sweep - is never a test result, so it never
# reaches a test-based figure or table (an allow-list: a new sweep stays out until named here).
TEST_SWEEPS = ("base", "lr", "batch_size", "noise_delta")
FAILED = "failed (diverged or at chance)"  # the words of every figure that marks failed runs
FAILURE_RULE = "final test accuracy below chance + 0.5 x (1 - chance)"


def test_runs(runs: pd.DataFrame, sweeps: Sequence[str] = TEST_SWEEPS) -> pd.DataFrame:
    """The runs of ``sweeps`` (default: every sweep evaluated on the test set)."""
    if runs.empty or "sweep" not in runs.columns:
        return runs
    return runs[runs["sweep"].isin(list(sweeps))]


def with_outcomes(runs: pd.DataFrame, num_classes: Mapping[str, int] | None = None) -> pd.DataFrame:
    """``runs`` (runs.csv rows) with how each one ended: ``outcome`` (claims.run_outcome:
    trained / diverged / at chance), ``failed`` (not trained), and its dataset's ``chance`` and
    failure ``threshold`` (accuracy, 0-1). ``num_classes``: classes of a dataset the catalog lacks."""
    out = runs.copy()
    if out.empty:
        return out.assign(chance=pd.Series(dtype=float), threshold=pd.Series(dtype=float),
                          outcome=pd.Series(dtype=object), failed=pd.Series(dtype=bool))
    out["chance"] = out["dataset"].map(lambda d: claims.chance_level(d, num_classes)).astype(float)
    out["threshold"] = out["chance"].map(claims.failure_threshold)
    out["outcome"] = claims.outcomes(out, out["chance"])
    out["failed"] = out["outcome"] != claims.TRAINED
    return out


def outcome_counts(outcomes: Iterable[str]) -> dict[str, int]:
    """n, n_trained, n_failed, n_diverged, n_at_chance of a group's outcomes."""
    outcomes = list(outcomes)
    counts = {"n": len(outcomes), "n_trained": outcomes.count(claims.TRAINED),
              "n_diverged": outcomes.count(claims.DIVERGED), "n_at_chance": outcomes.count(claims.AT_CHANCE)}
    counts["n_failed"] = counts["n"] - counts["n_trained"]
    return counts


def summarize_outcomes(runs: pd.DataFrame, by: Sequence[str],
                       metrics: Sequence[str] = ("final_test_acc",)) -> pd.DataFrame:
    """One row per group of ``runs`` (:func:`with_outcomes` rows): the counts of
    :func:`outcome_counts`, ``failure_rate`` and, per metric, mean / std / 95% CI half-width /
    min / max / n over the runs that TRAINED (a failed run is counted, never averaged)."""
    by = list(by)
    stat_cols = [f"{m}_{s}" for m in metrics for s in ("mean", "std", "ci95", "min", "max", "n")]
    columns = [*by, "n", "n_trained", "n_failed", "n_diverged", "n_at_chance", "failure_rate", *stat_cols]
    if runs.empty:
        return pd.DataFrame(columns=columns)
    rows = []
    for key, group in runs.groupby(by, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(by, key, strict=True)) | outcome_counts(group["outcome"])
        row["failure_rate"] = row["n_failed"] / row["n"]
        trained = group[group["outcome"] == claims.TRAINED]
        for m in metrics:
            values = pd.to_numeric(trained[m], errors="coerce") if m in trained else pd.Series(dtype=float)
            values = values[np.isfinite(values.to_numpy(dtype=float))]
            mean, std, ci, n = agg.mean_std_ci(values)
            row.update({f"{m}_mean": mean, f"{m}_std": std, f"{m}_ci95": ci, f"{m}_n": n,
                        f"{m}_min": float(values.min()) if n else math.nan,
                        f"{m}_max": float(values.max()) if n else math.nan})
        rows.append(row)
    return pd.DataFrame(rows, columns=columns)


def failures_text(n_diverged: int, n_at_chance: int) -> str:
    """'2 failed (1 diverged, 1 at chance)'; '' without failures."""
    parts = [f"{k} {w}" for k, w in ((n_diverged, "diverged"), (n_at_chance, "at chance")) if k]
    return f"{n_diverged + n_at_chance} failed ({', '.join(parts)})" if parts else ""


def outcome_text(n: int, n_trained: int, n_diverged: int, n_at_chance: int) -> str:
    """'3/3 trained' or '1/3 trained, 2 failed (2 diverged)'."""
    failed = failures_text(n_diverged, n_at_chance)
    return f"{n_trained}/{n} trained" + (f", {failed}" if failed else "")


def count_range(counts: Iterable[int]) -> str:
    """'2' or '2-3': the seeds per point of a sweep, for a legend."""
    counts = sorted({int(c) for c in counts})
    if not counts:
        return "0"
    return f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"


# --------------------------------------------------------------------------------------------
# Axes that do not exaggerate


def padded_range(values: Iterable[float], *, min_span: float, include: Iterable[float] = (),
                 lower: float = -math.inf, upper: float = math.inf, pad: float = 0.06,
                 default: tuple[float, float] = (0.0, 100.0)) -> tuple[float, float]:
    """A y range that shows every value (and ``include``, e.g. 0 for a gap) and spans at least
    ``min_span`` - so differences smaller than the seed-to-seed scatter are not blown up into a
    trend - padded by ``pad`` of the span, kept inside [``lower``, ``upper``] (e.g. 100%)."""
    vals = np.asarray([v for v in [*values, *include] if v is not None], dtype=float)
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return default
    lo, hi = float(vals.min()), float(vals.max())
    span = max(hi - lo, float(min_span))
    lo, hi = (lo + hi) / 2 - span / 2, (lo + hi) / 2 + span / 2
    lo, hi = lo - pad * span, hi + pad * span
    if hi > upper:
        lo, hi = lo - (hi - upper), upper
    if lo < lower:
        lo, hi = lower, min(upper, hi + (lower - lo))
    return lo, hi


STRIP = 0.08  # bottom fraction of an accuracy axis kept for runs that have no accuracy (diverged)


def failure_strip(ax, lo: float, hi: float, label: str = "diverged", frac: float = STRIP) -> float:
    """Set the y range to [lo, hi] plus a grey strip below it for runs without a value
    (diverged: non-finite loss, never a point at 0), named by a tick label; returns the strip's
    centre (data units). The other ticks stay inside [lo, hi]."""
    from matplotlib.ticker import MaxNLocator

    bottom = lo - frac / (1 - frac) * (hi - lo)
    ax.set_ylim(bottom, hi)
    ax.axhspan(bottom, lo, color="0.93", lw=0, zorder=0)
    ticks = [float(t) for t in MaxNLocator(nbins=6).tick_values(lo, hi) if lo - 1e-9 <= t <= hi + 1e-9]
    centre = (bottom + lo) / 2
    ax.set_yticks([*ticks, centre], [f"{t:g}" for t in ticks] + [label])
    ax.get_yticklabels()[-1].set_fontsize(7)
    return centre


# --------------------------------------------------------------------------------------------
# Sweep figures (learning rate, batch size, noise): one row of panels per (dataset, arch)


def select_sweep(runs: pd.DataFrame, variants: Sequence[str], sweep: str) -> pd.DataFrame:
    """Runs of ``variants`` from the main grid and the ``sweep``, only for the (dataset, arch)
    pairs where the sweep ran - a main-grid run alone is not a sweep."""
    if runs.empty:
        return runs
    sel = runs[runs["sweep"].isin(["base", sweep]) & runs["variant"].isin(list(variants))]
    swept = sel[sel["sweep"] == sweep][["dataset", "arch"]].drop_duplicates()
    return sel.merge(swept, on=["dataset", "arch"])


def lr_axis(runs: pd.DataFrame) -> tuple[pd.Series, str]:
    """The lr sweep's x values and their axis label: the lr factor of each variant's own
    default (every param group scaled together; a main-grid run without one is factor 1) when
    runs.csv has it for every run (claims.sweep_key decides, as for Table 3), else the absolute lr."""
    key, _ = claims.sweep_key(runs) if not runs.empty else ("lr", "lr")
    if key == "lr_factor":
        x = pd.to_numeric(runs["lr_factor"], errors="coerce")
        x = x.where(x.notna() | (runs["sweep"] != "base"), 1.0)
        return x.astype(float), "lr factor (x each variant's default lr, all param groups)"
    return pd.to_numeric(runs["lr"], errors="coerce").astype(float), "learning rate (conv group; others keep their ratio)"


def sweep_axes(sel: pd.DataFrame, empty_message: str, width: float = 9.0):
    """A figure with two panels per (dataset, arch) of ``sel``; a placeholder row if none."""
    import matplotlib.pyplot as plt

    pairs = panels(sel)
    fig, axes = plt.subplots(max(1, len(pairs)), 2, figsize=(width, 3.2 * max(1, len(pairs))),
                             squeeze=False, layout="constrained")
    if not pairs:
        for ax in axes[0]:
            placeholder(ax, empty_message)
    return fig, list(zip(pairs, axes, strict=False))


# artist ids of the special markers, so the legend shows a key only for what was drawn
_KEY_MEAN, _KEY_SEED, _KEY_SINGLE = "msr-key-mean", "msr-key-seed", "msr-key-single"
_KEY_AT_CHANCE, _KEY_DIVERGED, _KEY_THRESHOLD = "msr-key-at-chance", "msr-key-diverged", "msr-key-threshold"
_KEY_DEAD = "msr-key-dead-layer"


def dodge(i: int, k: int, width: float = 0.1) -> float:
    """A multiplicative x offset for variant ``i`` of ``k`` on a log axis, so markers of
    variants at the same sweep point do not hide each other."""
    return 2.0 ** (width * (i - (k - 1) / 2))


def plot_sweep(ax, runs: pd.DataFrame, variant: str, x: str, y: str = "final_test_acc", *,
               strip_y: float | None = None, offset: float = 1.0, scale: float = 100.0,
               failed_seeds: bool = True) -> pd.DataFrame:
    """One variant of a sweep from its runs (:func:`with_outcomes` rows of one dataset/arch):
    every seed (trained: a small dot; at chance: a hollow triangle at its value; diverged: an x
    in the strip at ``strip_y``, if given) and a line through the mean of the runs that
    TRAINED, with bars of +-1 std over them (a point with one trained run: a hollow circle, no
    bar). A point where no run trained breaks the line. ``failed_seeds``: draw the failed runs.
    Returns the points' summary (:func:`summarize_outcomes` by ``x``)."""
    mine = runs[runs["variant"] == variant]
    stats = summarize_outcomes(mine, [x], metrics=[y])
    if stats.empty:
        return stats
    color = variant_color(variant)
    xs = stats[x].astype(float) * offset
    mean, std = scale * stats[f"{y}_mean"].astype(float), scale * stats[f"{y}_std"].astype(float)
    ax.plot(xs, mean, color=color, marker="o", ms=4, lw=1.2, zorder=3, gid=_KEY_MEAN)
    bars = stats[f"{y}_n"] >= 2
    if bars.any():
        ax.errorbar(xs[bars], mean[bars], yerr=std[bars], color=color, ls="none", capsize=2, lw=1.0, zorder=3)
    single = stats[f"{y}_n"] == 1
    if single.any():
        ax.plot(xs[single], mean[single], ls="none", marker="o", ms=5, mfc="white", mec=color, mew=1.2,
                zorder=4, gid=_KEY_SINGLE)
    seed_x = mine[x].astype(float) * offset
    value = scale * pd.to_numeric(mine[y], errors="coerce") if y in mine else pd.Series(math.nan, index=mine.index)
    trained = mine["outcome"] == claims.TRAINED
    if trained.any():
        ax.plot(seed_x[trained], value[trained], ls="none", marker="o", ms=2.5, color=color, alpha=0.55,
                zorder=2, gid=_KEY_SEED)
    at_chance = (mine["outcome"] == claims.AT_CHANCE) & value.notna()
    if failed_seeds and at_chance.any():
        ax.plot(seed_x[at_chance], value[at_chance], ls="none", marker="v", ms=4, mfc="white", mec=color,
                mew=1.0, zorder=2, gid=_KEY_AT_CHANCE)
    diverged = mine["outcome"] == claims.DIVERGED
    if failed_seeds and strip_y is not None and diverged.any():
        ax.plot(seed_x[diverged], [strip_y] * int(diverged.sum()), ls="none", marker="x", ms=5, mew=1.3,
                color=color, zorder=3, gid=_KEY_DIVERGED)
    return stats


def plot_threshold(ax, threshold: float, scale: float = 100.0) -> None:
    """The failure threshold (chance + 0.5 x (1 - chance)) as a dotted line on an accuracy axis."""
    ax.axhline(scale * threshold, color="0.45", lw=0.8, ls=":", zorder=1, gid=_KEY_THRESHOLD)


def plot_failure_rate(ax, stats: pd.DataFrame, variant: str, x: str, offset: float = 1.0) -> None:
    """The share of runs that failed (diverged or at chance) at each point of a sweep."""
    if stats.empty:
        return
    ax.plot(stats[x].astype(float) * offset, 100 * stats["failure_rate"].astype(float),
            color=variant_color(variant), marker="o", ms=4, lw=1.2)


def annotate_n(ax, stats: pd.DataFrame, x: str, y: float = STRIP + 0.01, offset: float = 1.0,
               color: str = "0.3") -> None:
    """'n=2' (runs at the point; failed ones named) under each point of a sweep, at ``y``
    (axes fraction)."""
    for r in stats.itertuples():
        failed = f", {r.n_failed} failed" if r.n_failed else ""
        ax.text(float(getattr(r, x)) * offset, y, f"n={r.n}{failed}", transform=ax.get_xaxis_transform(),
                fontsize=6, color=color, ha="center", va="bottom")


def sweep_keys() -> dict[str, tuple[object, str]]:
    """Legend keys of the special markers, by artist id."""
    from matplotlib.lines import Line2D

    grey = "0.3"
    return {
        _KEY_MEAN: (Line2D([], [], color=grey, marker="o", ms=4, lw=1.2),
                    "mean of the seeds that trained, bars: ± 1 std"),
        _KEY_SEED: (Line2D([], [], color=grey, marker="o", ms=2.5, ls="none", alpha=0.55), "one seed (trained)"),
        _KEY_SINGLE: (Line2D([], [], ls="none", marker="o", ms=5, mfc="white", mec=grey, mew=1.2),
                      "1 trained seed (no spread)"),
        _KEY_AT_CHANCE: (Line2D([], [], ls="none", marker="v", ms=4, mfc="white", mec=grey, mew=1.0),
                         "seed failed: at chance"),
        _KEY_DIVERGED: (Line2D([], [], ls="none", marker="x", ms=5, mew=1.3, color=grey), "seed failed: diverged"),
        _KEY_THRESHOLD: (Line2D([], [], color="0.45", lw=0.8, ls=":"),
                         "failure threshold: chance + 0.5 x (1 - chance)"),
        _KEY_DEAD: (Line2D([], [], ls="none", marker="v", ms=5, color=grey), "dead layer (output = 0)"),
    }


def sweep_legend(fig, entries: Mapping[str, str], axes: Iterable, ncol: int = 4) -> None:
    """A legend under the panels: one entry per variant of ``entries`` (variant -> label) -
    every variant, also one whose every point failed and so has no mean line - then the keys
    of the special markers drawn on ``axes``."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=variant_color(v), marker="o", ms=4, lw=1.2) for v in entries]
    labels = list(entries.values())
    gids = {artist.get_gid() for ax in axes for artist in [*ax.lines, *ax.collections]}
    for gid, (handle, label) in sweep_keys().items():
        if gid in gids:
            handles.append(handle)
            labels.append(label)
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=min(len(handles), ncol), frameon=False)


def fixed_ticks(axes: Iterable, values: Iterable[float]) -> None:
    """Ticks exactly at the swept values (log axes would otherwise show powers of ten)."""
    from matplotlib.ticker import FixedLocator, NullLocator

    ticks = sorted({float(v) for v in values if v is not None and math.isfinite(float(v))})
    for ax in axes:
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([f"{t:g}" for t in ticks])


# --------------------------------------------------------------------------------------------
# Figure 1: the training curves, one panel per claim group


def _claims_of(variant: str) -> set[str]:
    return {c.strip() for c in catalog.VARIANT_CLAIMS.get(variant, "").split(",")}


# (title, the claim labels of msr.catalog.VARIANT_CLAIMS a group takes)
CURVE_GROUPS = (
    ("claims 1-2: the ablations", {"1", "2", "control"}),
    ("claims 4-5: noise", {"4", "5"}),
    ("claim 6: batch-free peers", {"6"}),
)


def curve_facets(variants: Iterable[str], max_per_panel: int = 6,
                 reference: str = "bn") -> list[tuple[str, list[str]]]:
    """Figure 1's panels: ``variants`` grouped by the claim they test (msr.catalog's claim
    labels, :data:`CURVE_GROUPS`; a noisy variant's panel also gets its noise-free twin), the
    rest under "other variants"; ``reference`` (when present) in every panel for comparison;
    at most ``max_per_panel`` lines a panel (a larger group is split). Each variant other than
    the reference appears in at least one panel; panels in registry order."""
    variants = ordered_variants(variants)
    ref = [reference] if reference in variants else []
    rest = [v for v in variants if v != reference]
    groups: list[tuple[str, list[str]]] = []
    placed: set[str] = set()
    for title, labels in CURVE_GROUPS:
        members = [v for v in rest if _claims_of(v) & labels]
        if labels & {"4", "5"}:  # the noise panel compares each noisy variant with its twin
            twins = [v.removesuffix("_noise") for v in members if v.endswith("_noise")]
            members = ordered_variants([*members, *(t for t in twins if t in rest)])
        placed |= set(members)
        groups.append((title, members))
    groups.append(("other variants", [v for v in rest if v not in placed]))
    room = max(1, max_per_panel - len(ref))
    facets = []
    for title, members in groups:
        chunks = [members[i:i + room] for i in range(0, len(members), room)]
        for k, chunk in enumerate(chunks):
            name = title if len(chunks) == 1 else f"{title} ({k + 1}/{len(chunks)})"
            facets.append((name, ref + chunk))
    if not facets and ref:
        facets.append(("reference", ref))
    return facets


# --------------------------------------------------------------------------------------------
# Figure 2: dead layers


def is_dead(values) -> np.ndarray:
    """A mean shift of exactly 0: every channel's output mean is exactly 0, which after a ReLU
    means the layer outputs 0 (msr.training.probes divides by a clamped std, so a zero output
    gives 0, not NaN). Such a layer is dead, not "free of mean shift": figures mark it instead
    of drawing it on a log axis."""
    return np.asarray(values, dtype=float) == 0.0


def layer_means(probes: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    """Per group of ``by`` (e.g. layer and step): ``value``, the mean over the seeds where the
    layer is alive (NaN where it is dead in every seed), ``n_seeds`` and ``n_dead`` (seeds where
    it is dead, :func:`is_dead`)."""
    by = list(by)
    if probes.empty:
        return pd.DataFrame(columns=[*by, "value", "n_seeds", "n_dead"])
    frame = probes.assign(_dead=is_dead(probes["value"]))
    frame["_alive"] = frame["value"].where(~frame["_dead"])
    out = frame.groupby(by, sort=True).agg(value=("_alive", "mean"), n_seeds=("value", "size"),
                                           n_dead=("_dead", "sum")).reset_index()
    out["n_dead"] = out["n_dead"].astype(int)
    return out


# --------------------------------------------------------------------------------------------
# Table 3: the claims table, readable (the CSV keeps every number)


def _finite(value) -> bool:
    try:
        return value is not None and not pd.isna(value) and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _true(value) -> bool:
    """True for a true boolean cell (bool, numpy bool, pandas' nullable boolean); NA is not."""
    return value is not None and not pd.isna(value) and bool(value)


def _p_text(p) -> str:
    return "-" if not _finite(p) else (f"{float(p):.2g}" if float(p) >= 1e-3 else f"{float(p):.1e}")


def _side_text(r: Mapping, side: str) -> str:
    """'msr 3/3' (trained / runs) with the failures: 'plain 0/3 (3 div.)'."""
    name, n = r.get(side), r.get(f"n_{side}")
    if not isinstance(name, str) or not name or not _finite(n):
        return ""
    if int(n) == 0:
        return f"{name}: no runs"
    parts = [f"{int(r[k])} {w}" for k, w in ((f"diverged_{side}", "div."), (f"at_chance_{side}", "at chance"))
             if _finite(r.get(k)) and int(r[k])]
    return f"{name} {int(r[f'trained_{side}'])}/{int(n)}" + (f" ({', '.join(parts)})" if parts else "")


def _counts_as_trained(text: str) -> str:
    """claims.Side.counts_text with its name ('plain 13 (12 div., 1 at chance)') as 'plain 0/13
    (12 div., 1 at chance)'; text in another form is kept as it is."""
    match = re.fullmatch(r"(\S+) (\d+)(?: \(([^)]*)\))?", text.strip())
    if not match:
        return text
    name, n, failures = match.group(1), int(match.group(2)), match.group(3) or ""
    failed = sum(int(k) for k in re.findall(r"(\d+) (?:div\.|at chance)", failures))
    return f"{name} {n - failed}/{n}" + (f" ({failures})" if failures else "")


def claim_runs_text(r: Mapping) -> str:
    """Runs per side: trained / all, failures named (claim 2's sweep row: its three sides)."""
    if r.get("unit") == "lr" and isinstance(r.get("seeds"), str) and r["seeds"]:
        return "; ".join(_counts_as_trained(part) for part in r["seeds"].split(" / "))
    return "; ".join(t for t in (_side_text(r, "a"), _side_text(r, "b")) if t)


def claim_pairing_text(r: Mapping) -> str:
    """'paired, n = 3 (same init)', 'unpaired: the sides' seeds differ' or ''."""
    pairing = r.get("pairing") if isinstance(r.get("pairing"), str) else ""
    n = f", n = {int(r['n_test'])}" if _finite(r.get("n_test")) else ""
    if pairing == "paired":
        return f"paired{n}" + (" (same init)" if _true(r.get("shares_init")) else "")
    if pairing == "unpaired":
        detail = r.get("detail") if isinstance(r.get("detail"), str) else ""
        why = detail.removeprefix("unpaired: ") if detail.startswith("unpaired") else ""
        return f"unpaired{n}" + (f": {why}" if why else "")
    return ""


def claim_effect_text(r: Mapping) -> str:
    """The effect with its 95% CI in the row's unit, and the row's measured detail."""
    detail = r.get("detail") if isinstance(r.get("detail"), str) else ""
    if detail.startswith("unpaired"):
        detail = ""  # said in the pairing column
    unit, method = r.get("unit"), r.get("ci_method") if isinstance(r.get("ci_method"), str) else ""
    e, lo, hi = r.get("effect"), r.get("ci_low"), r.get("ci_high")
    if unit in ("lr", "abs") or not _finite(e):
        return detail or "-"
    if unit == "pp" and method.startswith("Newcombe"):
        text = f"failure rate {float(e):+.0f} pp [{float(lo):+.0f}, {float(hi):+.0f}]"
    elif unit == "pp":
        text = f"{float(e):+.2f} pp [{float(lo):+.2f}, {float(hi):+.2f}]"
        if _true(r.get("ci_clipped")):
            text += " (clipped)"
        if _finite(r.get("alt_low")) and _finite(r.get("alt_high")):
            text += f"; sign-flip [{float(r['alt_low']):+.2f}, {float(r['alt_high']):+.2f}]"
    else:
        text = f"{float(e):+.3g} [{float(lo):+.3g}, {float(hi):+.3g}]"
    return f"{text}; {detail}" if detail else text


def claim_margin_text(r: Mapping) -> str:
    if r.get("unit") != "pp" or not _finite(r.get("margin")):
        return ""
    return f"±{float(r['margin']):g} pp"


def claim_p_text(r: Mapping) -> str:
    """The Holm-adjusted p with the size of its family ('0.12 (of 3)'); '-' without a test."""
    if not _finite(r.get("p_holm")):
        return "-"
    m = f" (of {int(r['holm_m'])})" if _finite(r.get("holm_m")) else ""
    return _p_text(r["p_holm"]) + m


CLAIMS_COLUMNS = ("dataset / arch", "claim", "comparison (A - B)", "runs: trained / all (failed)", "pairing",
                  "effect [95% CI]", "margin", "p (Holm)", "verdict", "reason")


def claims_display(table: pd.DataFrame) -> pd.DataFrame:
    """T3 (msr.analysis.claims.claims_table) as people read it: one row per comparison with the
    runs per side (trained / all, failures: diverged, at chance), the pairing, the effect and
    its CI, the margin, the Holm-adjusted p, the verdict and its reason."""
    rows = []
    for r in table.to_dict("records"):
        rows.append(dict(zip(CLAIMS_COLUMNS, (
            f"{r['dataset']} / {r['arch']}", str(r["claim"]), r["comparison"], claim_runs_text(r),
            claim_pairing_text(r), claim_effect_text(r), claim_margin_text(r), claim_p_text(r),
            r["verdict"], r["reason"]), strict=True)))
    return pd.DataFrame(rows, columns=list(CLAIMS_COLUMNS))


def claims_notes() -> list[str]:
    """What the columns and the verdict words mean, then the rule (claims.RULES)."""
    return [
        "Columns. runs: per side, the runs that trained / all runs; failed runs in brackets (div.: "
        f"diverged, a non-finite loss; at chance: {FAILURE_RULE}). pairing: paired = t on the "
        "per-seed differences over the seeds where both sides trained (n = pairs; same init: x and "
        "x_noise build the same weights from a seed); unpaired = Welch t. effect: A - B with its 95% "
        "CI (from 6 pairs also the exact sign-flip interval, which must agree). margin: the "
        "dataset's equivalence margin m. p (Holm): Holm-adjusted p over the tests of one claim "
        "(their number in brackets); the raw p and the test are in the CSV.",
        "Verdicts. supported: the CI lies wholly on the side the claim predicts. contradicted: wholly "
        "on the other side, or (where the claim predicts a difference) wholly inside +-m, i.e. "
        "equivalent. inconclusive: the data cannot tell - the CI touches or spans 0, too few seeds "
        "(n = k), a verdict that rests on survivors, a disagreeing sign-flip interval, or a Holm p "
        "above 0.05; it never means 'equal'. baseline failed to train: a side mostly did not fit its "
        "training data, so it proves nothing. by construction: a property the code guarantees, "
        "shown measured, not evidence.",
        *claims.RULES,
    ]


def claims_markdown(table: pd.DataFrame, title: str = "Table 3 - the paper's claims, judged from the runs.") -> str:
    """T3's Markdown: :func:`claims_display` with :func:`claims_notes` under it."""
    return f"**{title}**\n\n" + to_markdown(claims_display(table), notes=claims_notes())


def claims_latex(table: pd.DataFrame) -> str:
    """T3's LaTeX (booktabs, small type, the long columns wrapped)."""
    tex = to_latex(claims_display(table), label="tab:claims", notes=claims_notes(),
                   caption="The paper's claims (docs/method.md) judged from the runs: runs per side, "
                           "effect with its 95% CI, margin, Holm-adjusted p, verdict and reason.",
                   column_format="p{1.4cm}lp{2.3cm}p{2.0cm}p{1.4cm}p{2.4cm}llp{1.5cm}p{3.2cm}")
    # a wide table (set it in a table* or landscape): small type, narrow gaps
    return tex.replace("\\centering\n", "\\centering\n\\scriptsize\\setlength{\\tabcolsep}{3pt}\n", 1)
