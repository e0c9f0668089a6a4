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
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd

from msr import atomic, catalog
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
             notes: Sequence[str] = ()) -> str:
    """A booktabs ``table`` (pandas' Styler; needs ``\\usepackage{booktabs}``), special
    characters escaped, notes as a footnote-sized paragraph under the tabular."""
    styler = _as_text(frame).style.hide(axis="index")
    styler = styler.format(escape="latex").format_index(escape="latex", axis=1)
    tex = styler.to_latex(caption=latex_escape(caption) or None, label=label or None, hrules=True,
                          position="t", position_float="centering")
    if notes:
        par = r"\par\smallskip{\footnotesize " + " ".join(latex_escape(n) for n in notes) + "}\n"
        tex = tex.replace("\\end{tabular}\n", "\\end{tabular}\n" + par, 1)
    return tex.replace("±", r"$\pm$")


# Fixed colours per variant across every figure, in the catalog's order (msr.catalog.VARIANTS);
# variants added later sort after these, by name.
VARIANT_ORDER = catalog.VARIANTS
# Families share a hue: BatchNorm references blue (bn_preact navy), MSR reds (msr_rs dark red),
# the gradient/standardization peers greens (gc, nf_ws moss green), and claim 6's batch-free
# peers teals (wn cyan, fixup dark teal, skipinit sea green) - every colour distinct and dark
# enough for a line on white.
_PALETTE = ("#1f77b4", "#aec7e8", "#7f7f7f", "#bcbd22", "#ff7f0e", "#9467bd", "#d62728",
            "#e377c2", "#2ca02c", "#8c564b",
            "#8b0000", "#17becf", "#005f66", "#2a9d8f", "#5a8f29", "#08306b")


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
# Sweep figures (learning rate, batch size, noise): one row of panels per (dataset, arch)


def select_sweep(runs: pd.DataFrame, variants: Sequence[str], sweep: str) -> pd.DataFrame:
    """Runs of ``variants`` from the main grid and the ``sweep``, only for the (dataset, arch)
    pairs where the sweep ran - a main-grid run alone is not a sweep."""
    if runs.empty:
        return runs
    sel = runs[runs["sweep"].isin(["base", sweep]) & runs["variant"].isin(list(variants))]
    swept = sel[sel["sweep"] == sweep][["dataset", "arch"]].drop_duplicates()
    return sel.merge(swept, on=["dataset", "arch"])


def sweep_axes(sel: pd.DataFrame, empty_message: str, width: float = 9.0):
    """A figure with two panels per (dataset, arch) of ``sel``; a placeholder row if none."""
    import matplotlib.pyplot as plt

    pairs = panels(sel)
    fig, axes = plt.subplots(max(1, len(pairs)), 2, figsize=(width, 3.0 * max(1, len(pairs))),
                             squeeze=False, layout="constrained")
    if not pairs:
        for ax in axes[0]:
            placeholder(ax, empty_message)
    return fig, list(zip(pairs, axes, strict=False))


_KEY_SINGLE, _KEY_DIVERGED = "msr-key-single-seed", "msr-key-all-diverged"  # artist ids for the legend


def plot_vs(ax, stats: pd.DataFrame, variant: str, x: str, y: str, *, errorbars: bool = True,
            completed_only: bool = True, scale: float = 100.0) -> pd.DataFrame:
    """One variant's ``y`` (``<metric>_mean`` with ``_std`` bars) against ``x``, sorted by x;
    returns the rows drawn."""
    s = stats[stats["variant"] == variant].sort_values(x)
    if completed_only:
        s = s[s["n_completed"] > 0]
    if s.empty:
        return s
    style = dict(color=variant_color(variant), marker="o", ms=4, lw=1.2, label=variant)
    if errorbars:
        std = s[y.removesuffix("_mean") + "_std"].fillna(0)
        ax.errorbar(s[x], scale * s[y], yerr=scale * std, capsize=2, **style)
    else:
        ax.plot(s[x], scale * s[y], **style)
    if completed_only:
        # one completed seed has no spread: a hollow marker, so no bar-less point looks exact
        single = s[s["n_completed"] == 1]
        if not single.empty:
            ax.plot(single[x], scale * single[y], ls="none", marker="o", ms=4, mfc="white",
                    mec=variant_color(variant), mew=1.2, zorder=5, gid=_KEY_SINGLE)
    return s


def mark_all_diverged(ax, stats: pd.DataFrame, variant: str, x: str) -> pd.DataFrame:
    """An ``x`` at the bottom of an accuracy axis where every seed of ``variant`` diverged -
    those points have no accuracy, and an accuracy panel must not just leave them out."""
    s = stats[(stats["variant"] == variant) & (stats["n_completed"] == 0) & (stats["n_diverged"] > 0)]
    if not s.empty:
        ax.plot(s[x], [0.03] * len(s), transform=ax.get_xaxis_transform(), ls="none", marker="x",
                ms=6, mew=1.5, color=variant_color(variant), clip_on=False, zorder=5, gid=_KEY_DIVERGED)
    return s


def sweep_legend(fig, axes: Iterable) -> None:
    """The variants drawn on ``axes`` plus the keys of the special markers drawn (hollow: one
    completed seed; x: every seed diverged), under the panels, where it can cover no data."""
    from matplotlib.lines import Line2D

    seen: dict[str, object] = {}
    gids = set()
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
        gids |= {line.get_gid() for line in ax.lines}
    if not seen:
        return
    keys = {_KEY_SINGLE: (Line2D([], [], ls="none", marker="o", ms=4, mfc="white", mec="0.3", mew=1.2),
                          "1 completed seed (no spread)"),
            _KEY_DIVERGED: (Line2D([], [], ls="none", marker="x", ms=6, mew=1.5, color="0.3"),
                            "every seed diverged")}
    for gid, (handle, label) in keys.items():
        if gid in gids:
            seen[label] = handle
    fig.legend(list(seen.values()), list(seen), loc="outside lower center", ncol=min(len(seen), 6),
               frameon=False)


def fixed_ticks(axes: Iterable, values: Iterable[float]) -> None:
    """Ticks exactly at the swept values (log axes would otherwise show powers of ten)."""
    from matplotlib.ticker import FixedLocator, NullLocator

    ticks = sorted(set(values))
    for ax in axes:
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([f"{t:g}" for t in ticks])
