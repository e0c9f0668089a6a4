"""``msr reproduce figures/<set> --runs K``: retrain a sample of a published set's runs and
say whether they reproduce - what a reviewer runs before citing a set.

Each sampled run is retrained from the config its manifest records (no Snakemake: the library's
``train``, as ``msr train --config``), into a scratch folder (never into the set's results), on
the recorded device, precision and thread count. Then, per run:

1. **config differs** (FAIL): this code resolves the recorded config into another run (another
   lr, noise level, variant spec, parameter count): it does not train the published run; check
   out the set's commit.
2. **bitwise** (pass): every epoch's step, lr, losses and accuracies (``metrics.csv`` without
   its timing columns, ``results_sha256`` in the manifest), the status and the divergence step
   equal the published run's. ``seconds`` and ``images_per_s`` (and summary.json's timings)
   measure the machine, so whole-file hashes can never match and are not compared.
3. **MISMATCH** (FAIL): not bitwise, where bitwise was expected - the published run was made on
   the same machine (msr.machine: CPU model, kernel ISA flags, torch, oneDNN, MKL, CUDA, cuDNN,
   GPU), device, precision and thread count, and the library code (``src/``) is the set's
   commit's (or cannot be told apart: no clone).
4. Elsewhere the runs can only agree statistically (another CPU sums in another order and the
   trajectories part within an epoch): **within spread** (pass) or **OUTSIDE** (FAIL). The
   reproduced final test accuracy must lie in the two-sided prediction interval of the run's
   published seeds (the runs of its group: same dataset, arch, variant and sweep point):

       mean +- t(1 - ALPHA / (2 K), n - 1) * std * sqrt(1 + 1/n)

   over the n published seeds that completed (std with ddof=1, Student t with n - 1 degrees
   of freedom), clipped to [0, 100] %. That is the range a new seed falls in with probability
   1 - ALPHA / K if the code trains the same distribution of networks, so all K runs pass
   together with probability >= 1 - ALPHA (Bonferroni; ALPHA = 0.05). Neither min..max of
   the published seeds (a new seed falls outside the range of three with probability 1/2) nor
   mean +- 2 std (which ignores how little three seeds say about std; ~22% outside at n = 3)
   would let a faithful reproduction pass reliably. The interval is wide at three seeds -
   honestly so: three seeds cannot tell a 1-point shift from noise, only a broken training.
   A reproduced run that diverges passes if a published seed of its group diverged too; one
   that completes where every published seed diverged is OUTSIDE. A group with one completed
   seed has no spread: such a run is **no spread** (FAIL: pick another run, ``--run``).

Sampling is deterministic (``--seed``): the main grid's runs (tag ``base``) whose group has a
spread come first, in a seeded random order, then the main grid's others, then the sweeps.
The exit status is 0 only if every sampled run passes.

Manifests before version 3 record no per-run configs or results: the run directories (where
the manifest says, or ``--runs-root``) then stand in for them, if their config.json is the one
the manifest hashed; results read from files that were rewritten since are said to be so.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from msr import atomic
from msr import machine as msr_machine
from msr.analysis import aggregate
from msr.analysis.manifest import RUN_FILES, describe_machines, run_record, sha256_file
from msr.analysis.verify import COMMIT, contained_path, git_top, load_manifest, project_root

ALPHA = 0.05
DEFAULT_RUNS = 3
# config keys the reproduction may set differently on purpose (--device, --threads) and the
# data's location; any other difference means the code resolves the config into another run
SETTINGS = ("device", "threads", "precision")
LOCATION_KEYS = ("data_root",)
REPORT = "REPRODUCE.json"


class ReproduceError(ValueError):
    """A set or an option that cannot be reproduced as asked; the message says why."""


@dataclass
class PublishedSet:
    path: Path  # the manifest
    root: Path  # the project root
    manifest: dict[str, Any]
    runs: dict[str, dict[str, Any]]  # run id -> the manifest's run record
    machines: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.manifest.get("name") or self.path.parent.name

    def where(self, rid: str) -> dict[str, Any]:
        index = self.runs[rid].get("machine")
        return self.machines[index] if isinstance(index, int) and 0 <= index < len(self.machines) else {}


def group_of(rid: str) -> str:
    """``<dataset>/<arch>/<variant>/<tag>``: the run's seeds-only group (msr.analysis.aggregate)."""
    return rid.rsplit("/", 1)[0]


def tag_of(rid: str) -> str:
    return group_of(rid).rsplit("/", 1)[-1]


# --------------------------------------------------------------------------------------------
# The published set


def load_set(target: str | Path, *, root: str | Path | None = None,
             runs_root: str | Path | None = None) -> PublishedSet:
    """A set's manifest with a record of every run; ReproduceError if it has none to give."""
    try:
        path, manifest = load_manifest(target)
        base = project_root(manifest, path.parent, root)
    except ValueError as err:
        raise ReproduceError(str(err)) from None
    if manifest.get("runs"):
        runs = {rid: rec for rid, rec in manifest["runs"].items() if contained_path(rid) is not None}
        return PublishedSet(path, base, manifest, runs, list(manifest.get("machines") or []))
    return _from_run_dirs(path, base, manifest, Path(runs_root) if runs_root is not None else None)


def _from_run_dirs(path: Path, root: Path, manifest: dict, runs_root: Path | None) -> PublishedSet:
    """An older manifest: the run records from the run directories it names, where their
    config.json is the one it hashed."""
    locations = manifest.get("run_dirs") or {}
    hashes = manifest.get("run_sha256") or {rid: {"config.json": d}
                                            for rid, d in (manifest.get("run_config_sha256") or {}).items()}
    run_ids = sorted({r for item in manifest.get("items", []) for r in item.get("runs", [])})
    runs, machines, notes = {}, [], []
    rewritten, other = 0, []
    for rid in run_ids:
        if contained_path(rid) is None or (rid in locations and contained_path(locations[rid]) is None):
            continue
        if runs_root is not None:
            rdir = runs_root / rid
        elif rid in locations:
            rdir = root / locations[rid]
        else:  # the first manifests record no run directories: the pipeline's runs roots
            name = manifest.get("name")
            candidates = [root / "results" / name / "runs" / rid] if contained_path(name) is not None else []
            rdir = next((c for c in candidates if c.is_dir()), root / "results/runs" / rid)
        expected = hashes.get(rid) or {}
        if not (rdir / "config.json").is_file():
            continue
        if sha256_file(rdir / "config.json") != expected.get("config.json"):
            other.append(rid)
            continue
        if any(name in expected and (not (rdir / name).is_file() or sha256_file(rdir / name) != expected[name])
               for name in RUN_FILES[1:]):
            rewritten += 1
        record, where = run_record(rdir)
        if where not in machines:
            machines.append(where)
        record["machine"] = machines.index(where)
        runs[rid] = record
    for i, entry in enumerate(machines):
        entry["n_runs"] = sum(1 for r in runs.values() if r["machine"] == i)
    if not runs:
        raise ReproduceError(
            f"{path}: manifest version {manifest.get('manifest_version')} records no run configs, and none of "
            f"its {len(run_ids)} run directories is here (give --runs-root, or regenerate the manifest: "
            "`msr manifest`, version 3, records them)")
    notes.append(f"manifest version {manifest.get('manifest_version')}: the published runs are read from their "
                 f"run directories ({len(runs)} of {len(run_ids)} found with the config.json it hashed)")
    if other:
        notes.append(f"{len(other)} run directories hold another config than the manifest's (e.g. {other[0]}): "
                     "not sampled")
    if rewritten:
        notes.append(f"{rewritten} run directories were rewritten since the manifest (summary.json or metrics.csv "
                     "differ from it: retrained?): their results stand in for the published ones")
    return PublishedSet(path, root, manifest, runs, machines, notes)


# --------------------------------------------------------------------------------------------
# The rule


@dataclass
class Spread:
    """A group's published outcomes: final test accuracies (fractions) of the seeds that
    completed, and how many diverged."""

    completed: list[float]
    diverged: int

    def allowed(self, k: int, alpha: float = ALPHA) -> tuple[float, float] | None:
        """The prediction interval (module docstring) for one of ``k`` runs; None below two
        completed seeds."""
        n = len(self.completed)
        if n < 2:
            return None
        mean, std, _, _ = aggregate.mean_std_ci(self.completed)
        half = aggregate.t_quantile(1 - alpha / k, n - 1) * std * math.sqrt(1 + 1 / n)
        return max(0.0, mean - half), min(1.0, mean + half)


def spread_of(pset: PublishedSet, rid: str) -> Spread:
    group = group_of(rid)
    members = [r for rid_, r in pset.runs.items() if group_of(rid_) == group]
    done = [r["final_test_acc"] for r in members if r.get("status") == "completed"
            and isinstance(r.get("final_test_acc"), int | float) and math.isfinite(r["final_test_acc"])]
    return Spread(done, sum(1 for r in members if r.get("status") == "diverged"))


def judgeable(spread: Spread) -> bool:
    """A group whose spread can judge a run on another machine."""
    return len(spread.completed) >= 2 or (spread.diverged > 0 and not spread.completed)


def sample(pset: PublishedSet, k: int, seed: int = 0) -> list[str]:
    """``k`` run ids, deterministic in ``seed`` (module docstring: main grid first)."""
    rng = random.Random(seed)
    tiers: list[list[str]] = [[], [], [], []]
    for rid in sorted(pset.runs):
        main = tag_of(rid) == "base"
        ok = judgeable(spread_of(pset, rid))
        tiers[(0 if main else 2) + (0 if ok else 1)].append(rid)
    chosen: list[str] = []
    for tier in tiers:
        rng.shuffle(tier)
        chosen.extend(tier)
    return chosen[:k]


@dataclass
class Verdict:
    run_id: str
    published: dict[str, Any]  # status, final_test_acc, diverged_at_step
    reproduced: dict[str, Any]
    allowed: tuple[float, float] | None
    kind: str  # bitwise | within spread | MISMATCH | OUTSIDE | no spread | config differs
    passed: bool
    detail: str = ""

    def row(self) -> dict[str, Any]:
        return {"run": self.run_id, "published": _outcome(self.published), "reproduced": _outcome(self.reproduced),
                "allowed": _range(self.allowed), "match": self.kind, "verdict": "pass" if self.passed else "FAIL",
                "detail": self.detail}


def _outcome(rec: dict[str, Any]) -> str:
    if rec.get("status") == "diverged":
        return f"diverged@{rec.get('diverged_at_step')}"
    acc = rec.get("final_test_acc")
    return f"{100 * acc:.2f}" if isinstance(acc, int | float) and math.isfinite(acc) else "-"


def _range(allowed: tuple[float, float] | None) -> str:
    return "-" if allowed is None else f"{100 * allowed[0]:.2f} .. {100 * allowed[1]:.2f}"


def _comparable(config: dict[str, Any] | None, skip: Sequence[str]) -> dict[str, Any]:
    return {k: v for k, v in (config or {}).items() if k not in skip}


def config_differences(published: dict[str, Any], reproduced: dict[str, Any]) -> list[str]:
    """The keys of the published run's resolved config (and its variant spec) that the
    reproduced run does not share, beyond the data's location and the settings (SETTINGS).
    A key only the reproduced run has is an option added since, which the published run could
    not set: not a difference (if it changed the result, the comparison of results shows it)."""
    skip = (*LOCATION_KEYS, *SETTINGS)
    a, b = _comparable(published.get("config"), skip), _comparable(reproduced.get("config"), skip)
    keys = sorted(k for k in a if k not in b or a[k] != b[k])
    if published.get("variant_spec_sha256") and published["variant_spec_sha256"] != reproduced.get("variant_spec_sha256"):
        keys.append("variant_spec")
    return keys


def same_setup(pub_where: dict[str, Any], rep_where: dict[str, Any]) -> list[str] | None:
    """What differs between where the published run was made and where it was reproduced,
    among what decides the bits; None if the published machine is unrecorded."""
    published = msr_machine.bitwise_key(pub_where.get("machine"))
    if published is None:
        return None
    here = msr_machine.bitwise_key(rep_where.get("machine")) or {}
    differ = [k for k in published if published[k] != here.get(k)]
    differ += [k for k in SETTINGS if pub_where.get(k) != rep_where.get(k)]
    return differ


def judge(published: dict[str, Any], pub_where: dict[str, Any], reproduced: dict[str, Any],
          rep_where: dict[str, Any], spread: Spread, k: int, *, code_same: bool | None = None,
          run_id: str = "") -> Verdict:
    """The verdict for one reproduced run (module docstring, rules 1-4)."""
    pub_out = {key: published.get(key) for key in ("status", "final_test_acc", "diverged_at_step")}
    rep_out = {key: reproduced.get(key) for key in ("status", "final_test_acc", "diverged_at_step")}
    allowed = spread.allowed(k)

    def verdict(kind: str, passed: bool, detail: str = "") -> Verdict:
        return Verdict(run_id, pub_out, rep_out, allowed, kind, passed, detail)

    differs = config_differences(published, reproduced)
    if differs:
        return verdict("config differs", False, f"this code resolves the recorded config differently: {', '.join(differs)} "
                       "(check out the set's commit)")
    if published.get("results_sha256") and reproduced.get("results_sha256") == published["results_sha256"] \
            and all(_same(pub_out[key], rep_out[key]) for key in pub_out):
        return verdict("bitwise", True)
    statistical = _statistical(rep_out, spread, allowed)
    setup = same_setup(pub_where, rep_where)
    if setup == [] and code_same is not False:
        note = "" if code_same else " (the code could not be compared with the set's commit)"
        return verdict("MISMATCH", False, "expected bitwise: same machine, device, precision and threads"
                       f"{note}; not bitwise, {statistical[0]}")
    where = ("the published run's machine is unrecorded" if setup is None
             else f"differs from the published run in {', '.join(setup)}" if setup
             else "the code differs from the set's commit")
    kind, passed = statistical
    return verdict(kind, passed, f"not bitwise; {where}")


def _same(a: Any, b: Any) -> bool:
    """Equal, with NaN equal to NaN (a diverged run's final accuracy)."""
    nan = isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
    return nan or a == b


def _statistical(rep: dict[str, Any], spread: Spread, allowed: tuple[float, float] | None) -> tuple[str, bool]:
    n = len(spread.completed) + spread.diverged
    if rep.get("status") == "diverged":
        if spread.diverged:
            return "within spread", True
        return "OUTSIDE", False  # every published seed completed
    acc = rep.get("final_test_acc")
    if rep.get("status") != "completed" or not isinstance(acc, int | float) or not math.isfinite(acc):
        return "OUTSIDE", False
    if not spread.completed and n:
        return "OUTSIDE", False  # every published seed diverged
    if allowed is None:
        return "no spread", False
    return ("within spread", True) if allowed[0] <= acc <= allowed[1] else ("OUTSIDE", False)


# --------------------------------------------------------------------------------------------
# Retraining


def code_same(pset: PublishedSet) -> bool | None:
    """Whether ``src/`` here is the set's commit's (git tree hashes, no uncommitted changes);
    None where that cannot be told (no clone, no commit, the commit not here)."""
    commit = pset.manifest.get("git_commit")
    if not isinstance(commit, str) or not git_top(pset.root):
        return None

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(pset.root), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    if not COMMIT.fullmatch(commit):
        return None
    then, now = git("rev-parse", f"{commit}:src"), git("rev-parse", "HEAD:src")
    if then is None or now is None:
        return None
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "src")
    return then == now and dirty == ""


def run_values(record: dict[str, Any], *, root: Path, data_root: str | Path | None = None,
               device: str | None = None, threads: int | None = None) -> dict[str, Any]:
    """The ``RunConfig`` values that retrain a recorded run: its resolved config (lr, noise,
    image size, epochs, batch, precision, threads as they were), the device type it ran on,
    the data below the project root unless ``data_root`` says otherwise."""
    from msr.training.config import RunConfig

    config = record.get("config")
    if not isinstance(config, dict) or "dataset" not in config or "variant" not in config:
        raise ReproduceError("its manifest record has no config to retrain it from")
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    values = {k: v for k, v in config.items() if k in fields}
    if values.get("lr_factor") is not None:
        # config.json records both the conv group's lr (resolved) and the factor every group
        # got; the factor alone retrains the run (RunConfig takes one of them)
        values.pop("lr", None)
    if values.get("device"):
        values["device"] = str(values["device"]).split(":")[0]  # cuda:0 -> cuda
    recorded_root = Path(values.get("data_root") or "data")
    values["data_root"] = str(Path(data_root) if data_root is not None
                              else recorded_root if recorded_root.is_absolute() else root / recorded_root)
    if device is not None:
        values["device"] = device
    if threads is not None:
        values["threads"] = threads
    return values


def _check_out(out: Path, pset: PublishedSet, runs_root: Path | None) -> None:
    """The scratch folder is never the set's folder, its results or a published runs root (a
    published run there would be found complete and compared with itself)."""
    out = out.resolve()
    guarded = [pset.path.parent.resolve()]
    if contained_path(pset.name) is not None:
        guarded.append((pset.root / "results" / pset.name).resolve())
    if runs_root is not None:
        guarded.append(runs_root.resolve())
    for rid, where in (pset.manifest.get("run_dirs") or {}).items():
        if isinstance(where, str) and contained_path(where) is not None and where.endswith(rid):
            guarded.append((pset.root / where[: -len(rid)]).resolve())
    for folder in guarded:
        if out == folder or out.is_relative_to(folder) or folder.is_relative_to(out):
            raise ReproduceError(f"--out {out}: inside (or around) {folder}, which the set owns; "
                                 "give a scratch folder elsewhere")


def reproduce(target: str | Path, *, k: int | None = None, seed: int = 0, only: Sequence[str] = (),
              out: str | Path | None = None, root: str | Path | None = None, runs_root: str | Path | None = None,
              device: str | None = None, threads: int | None = None, data_root: str | Path | None = None,
              log: Callable[[str], None] = print, progress: bool | None = None) -> tuple[list[Verdict], Path]:
    """Retrain ``k`` sampled runs of a set (or the runs ``only`` names) into ``out`` (a new
    temporary folder by default, kept) and judge each; the verdicts are also written to
    ``<out>/REPRODUCE.json``. ReproduceError for a set or options that cannot be reproduced."""
    from msr.data import DatasetError
    from msr.training.config import ConfigError, RunConfig
    from msr.training.loop import train
    from msr.training.rundir import RunDirError

    pset = load_set(target, root=root, runs_root=runs_root)
    if only:
        unknown = [rid for rid in only if rid not in pset.runs]
        if unknown:
            raise ReproduceError(f"not a run of {pset.path}: {', '.join(unknown)}")
        chosen = list(dict.fromkeys(only))
    else:
        k = DEFAULT_RUNS if k is None else k
        if k < 1:
            raise ReproduceError(f"--runs {k}: must be at least 1")
        chosen = sample(pset, k, seed)
    out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix=f"msr-reproduce-{pset.name}-"))
    _check_out(out, pset, Path(runs_root) if runs_root is not None else None)
    for note in pset.notes:
        log(f"note: {note}")
    made_on = pset.manifest.get("runs_made_on") or describe_machines(pset.machines)
    log(f"reproducing {len(chosen)} of {len(pset.runs)} runs of {pset.path.parent} into {out}")
    log(f"  published: {made_on}")
    log(f"  here:      {msr_machine.describe(msr_machine.machine_record(None))}")
    same_code = code_same(pset)
    verdicts = []
    for i, rid in enumerate(chosen, 1):
        published = pset.runs[rid]
        try:
            cfg = RunConfig.from_dict(run_values(published, root=pset.root, data_root=data_root,
                                                 device=device, threads=threads))
        except (ConfigError, ReproduceError) as err:
            raise ReproduceError(f"{rid}: {err}") from None
        log(f"[{i}/{len(chosen)}] {rid}: {cfg.epochs} epoch{'s' if cfg.epochs != 1 else ''} on {cfg.device}, {cfg.threads} thread(s)")
        rdir = out / rid
        try:
            train(cfg, rdir, log=log, progress=progress)
        except (RunDirError, DatasetError, ConfigError, OSError, ValueError) as err:
            # ConfigError: --out already holds this run id of another config
            raise ReproduceError(f"{rid}: {err}") from None
        record, where = run_record(rdir)
        verdict = judge(published, pset.where(rid), record, where, spread_of(pset, rid), len(chosen),
                        code_same=same_code, run_id=rid)
        log(f"[{i}/{len(chosen)}] {rid}: {verdict.kind} ({'pass' if verdict.passed else 'FAIL'})")
        verdicts.append(verdict)
    atomic.write_text(out / REPORT, json.dumps({
        "set": str(pset.path.parent), "sample_seed": seed, "alpha": ALPHA, "code_same": same_code,
        "published_on": made_on, "reproduced_on": msr_machine.machine_record(None),
        "runs": [v.row() for v in verdicts], "passed": all(v.passed for v in verdicts),
    }, indent=1) + "\n")
    return verdicts, out


def format_table(verdicts: Sequence[Verdict]) -> str:
    """The table a reviewer reads: run, published, reproduced, allowed range, match, verdict."""
    rows = [v.row() for v in verdicts]
    head = {"run": "run", "published": "published %", "reproduced": "reproduced %", "allowed": "allowed %",
            "match": "match", "verdict": "verdict"}
    cols = list(head)
    width = {c: max(len(head[c]), *(len(str(r[c])) for r in rows)) for c in cols}
    lines = ["  ".join(head[c].ljust(width[c]) for c in cols)]
    lines += ["  ".join(str(r[c]).ljust(width[c]) for c in cols).rstrip() for r in rows]
    lines += [f"  {r['run']}: {r['detail']}" for r in rows if r["detail"]]
    return "\n".join(lines)


def overall(verdicts: Sequence[Verdict]) -> str:
    passed = [v for v in verdicts if v.passed]
    kinds = {kind: sum(1 for v in verdicts if v.kind == kind) for kind in dict.fromkeys(v.kind for v in verdicts)}
    counts = ", ".join(f"{n} {kind}" for kind, n in kinds.items())
    if len(passed) == len(verdicts):
        return f"REPRODUCED: {len(passed)}/{len(verdicts)} runs pass ({counts})"
    return f"NOT REPRODUCED: {len(verdicts) - len(passed)} of {len(verdicts)} runs fail ({counts})"
