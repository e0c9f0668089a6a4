"""msr.pipeline.selection: the rule that chooses a variant's lr factor on the validation split
(eligible = no run failed; highest mean validation accuracy; ties to the factor nearest 1, then
the smaller; none eligible: the default), its outputs, and the aggregate's handling of the
validation runs (their own sweep and eval split, never mixed with test results)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from test_aggregate import write_fake_run  # one fake-run writer: the format msr train writes

from msr.analysis import aggregate as agg
from msr.cli import main as msr_main
from msr.outcome import AT_CHANCE, DIVERGED, TRAINED
from msr.pipeline import selection
from msr.pipeline.grid import GridError, Run


@pytest.mark.parametrize("candidates, chosen", [
    # the highest mean validation accuracy among the factors where every run trained
    ({0.5: [(TRAINED, 0.90), (TRAINED, 0.92)], 1.0: [(TRAINED, 0.93), (TRAINED, 0.93)],
      2.0: [(TRAINED, 0.99), (DIVERGED, None)]}, (1.0, selection.CHOSEN)),
    ({0.25: [(TRAINED, 0.95)], 0.5: [(TRAINED, 0.94)], 2.0: [(AT_CHANCE, 0.2)]}, (0.25, selection.CHOSEN)),
    # ties: the factor nearest the default (|log2 f|), then the smaller
    ({0.5: [(TRAINED, 0.9)], 2.0: [(TRAINED, 0.9)], 4.0: [(TRAINED, 0.9)]}, (0.5, selection.CHOSEN)),
    ({0.25: [(TRAINED, 0.9)], 2.0: [(TRAINED, 0.9)]}, (2.0, selection.CHOSEN)),
    ({1.0: [(TRAINED, 0.8)], 2.0: [(TRAINED, 0.8)]}, (1.0, selection.CHOSEN)),
    # nothing eligible: the variant keeps its default, and says so
    ({0.5: [(AT_CHANCE, 0.3)], 2.0: [(DIVERGED, None)]}, (1.0, selection.DEFAULT_KEPT)),
])
def test_choose(candidates, chosen):
    assert selection.choose(candidates) == chosen


def validation_run(root: Path, variant: str, factor: float, seed: int, acc: float | None, *,
                   own_lr: float = 0.1, dataset: str = "digits") -> Run:
    """A complete validation run directory (status diverged when ``acc`` is None)."""
    run = Run(dataset, "resnet20", variant, f"val-lrx{factor:g}", seed, lr_factor=factor, eval_split="validation",
              validation_size=288, batch_size=64)
    out = write_fake_run(root, dataset=dataset, variant=variant, tag=run.tag, seed=seed, lr=own_lr * factor,
                         status="completed" if acc is not None else "diverged", final_test_acc=acc or 0.5,
                         diverged_at_step=3)
    config = json.loads((out / "config.json").read_text())
    config.update(lr_factor=factor, eval_split="validation", validation_size=288, eval_images=288)
    (out / "config.json").write_text(json.dumps(config))
    return run


def test_select_writes_the_choice_every_candidate_and_the_provenance(tmp_path):
    root = tmp_path / "runs"
    runs = [validation_run(root, "bn", 0.5, 0, 0.90), validation_run(root, "bn", 0.5, 1, 0.92),
            validation_run(root, "bn", 1.0, 0, 0.95), validation_run(root, "bn", 1.0, 1, 0.95),
            validation_run(root, "bn", 2.0, 0, 0.97), validation_run(root, "bn", 2.0, 1, None),
            validation_run(root, "wn", 0.5, 0, 0.30), validation_run(root, "wn", 2.0, 0, None)]
    out, table, prov = tmp_path / "sel.json", tmp_path / "figs" / "lr_selection.csv", tmp_path / "prov" / "lr_selection.json"
    record = selection.select(runs, root, out=out, table=table, provenance=prov, log=tmp_path / "sel.log")
    assert record["rule"] == selection.RULE and json.loads(out.read_text()) == record
    chosen = {s["variant"]: s for s in record["selected"]}
    assert (chosen["bn"]["lr_factor"], chosen["bn"]["status"], chosen["bn"]["lr"]) == (1.0, "chosen", pytest.approx(0.1))
    assert chosen["bn"]["val_acc_mean"] == pytest.approx(0.95) and chosen["bn"]["eval_images"] == 288
    assert (chosen["wn"]["lr_factor"], chosen["wn"]["status"], chosen["wn"]["lr"]) == (1.0, selection.DEFAULT_KEPT, pytest.approx(0.1))
    assert selection.load(out) == {("digits", "resnet20", "bn"): 1.0, ("digits", "resnet20", "wn"): 1.0}

    rows = pd.read_csv(table)
    assert list(rows.columns) == selection.CSV_COLUMNS and len(rows) == 5
    bn2 = rows[(rows["variant"] == "bn") & (rows["lr_factor"] == 2.0)].iloc[0]
    assert (bn2["n_runs"], bn2["n_trained"], bn2["n_diverged"], bool(bn2["eligible"]), bool(bn2["chosen"])) == (2, 1, 1, False, False)
    assert rows["chosen"].sum() == 1 and rows.loc[rows["chosen"], "status"].tolist() == ["chosen"]
    provenance = json.loads(prov.read_text())
    assert provenance["name"] == "lr_selection" and provenance["outputs"] == [table.as_posix()]
    assert provenance["runs"] == sorted(r.path for r in runs)
    assert "digits/resnet20/bn: x1 (lr 0.1) chosen" in (tmp_path / "sel.log").read_text()


def test_the_lr_is_never_chosen_on_the_test_set(tmp_path):
    root = tmp_path / "runs"
    run = validation_run(root, "bn", 1.0, 0, 0.9)
    test_run = Run("digits", "resnet20", "bn", "base", 0, batch_size=64)
    with pytest.raises(GridError, match="not a validation run; the lr is never chosen on the test set"):
        selection.select([test_run], root, out=tmp_path / "x.json")
    config = root / run.path / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "eval_split": "test"}))
    with pytest.raises(GridError, match="eval_split='test', not 'validation'"):
        selection.select([run], root, out=tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


def test_load_names_a_missing_or_damaged_record(tmp_path):
    with pytest.raises(GridError, match="missing; the lr selection"):
        selection.load(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text('{"selected": [{"dataset": "digits"}]}')
    with pytest.raises(GridError, match="not an lr selection record"):
        selection.load(tmp_path / "bad.json")


def test_aggregate_keeps_validation_runs_apart_and_marks_the_tuned_variants(tmp_path):
    root = tmp_path / "runs"
    write_fake_run(root, variant="bn", seed=0, lr=0.2, final_test_acc=0.91)
    write_fake_run(root, variant="bn", tag="lrx2", seed=1, lr=0.2, final_test_acc=0.93)
    write_fake_run(root, variant="plain", seed=0, lr=0.1)
    validation_run(root, "bn", 2.0, 0, 0.97)
    sel = tmp_path / "lr_selection.json"
    sel.write_text(json.dumps({"selected": [{"dataset": "digits", "arch": "resnet20", "variant": "bn", "lr_factor": 2.0}]}))
    assert msr_main(["aggregate", "--runs", str(root), "--out", str(tmp_path / "tables"), "--lr-selection", str(sel)]) == 0
    runs = pd.read_csv(tmp_path / "tables" / "runs.csv").set_index("run_id")
    val = runs.loc["digits/resnet20/bn/val-lrx2/seed0"]
    assert (val["sweep"], val["eval_split"], val["lr_factor"]) == ("lr_selection", "validation", 2.0)
    base = runs.loc["digits/resnet20/bn/base/seed0"]
    assert (base["sweep"], base["eval_split"]) == ("base", "test")  # an older config.json: the test set
    assert runs.loc["digits/resnet20/bn/lrx2/seed1", "sweep"] == "lr"
    assert runs["lr_selected_factor"].to_dict() == {
        "digits/resnet20/bn/base/seed0": 2.0, "digits/resnet20/bn/lrx2/seed1": 2.0,
        "digits/resnet20/bn/val-lrx2/seed0": 2.0, "digits/resnet20/plain/base/seed0": pytest.approx(float("nan"), nan_ok=True)}
    # summary.csv: the validation run is its own group (sweep and eval split are group keys)
    summary = pd.read_csv(tmp_path / "tables" / "summary.csv")
    assert {"eval_split", "lr_factor"} <= set(summary.columns)
    groups = summary[summary["variant"] == "bn"].set_index("sweep")
    assert groups.loc["lr_selection", "n"] == 1 and groups.loc["lr_selection", "eval_split"] == "validation"
    assert groups.loc["lr_selection", "final_test_acc_mean"] == pytest.approx(0.97)
    assert groups.loc["base", "final_test_acc_mean"] == pytest.approx(0.91)
    assert agg.sweep_of_tag("val-lrx0.25") == "lr_selection" and agg.sweep_of_tag("lrx0.125") == "lr"
    (tmp_path / "bad.json").write_text("{")
    assert msr_main(["aggregate", "--runs", str(root), "--out", str(tmp_path / "t2"), "--lr-selection",
                     str(tmp_path / "bad.json")]) == 2
