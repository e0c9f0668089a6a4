"""`msr verify figures/<set>`: a figure set checked against its MANIFEST.json (issue 9)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from msr.analysis import figures, manifest
from msr.cli import main as msr_main

RID = "digits/resnet8/msr/base/seed0"
CONFIG = {"name": "demo", "seeds": [0], "train": {"epochs": 4, "lr": None}, "variants": ["msr"]}


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A project with one set `demo`: a figure and a table made from one run."""
    root = tmp_path / "proj"
    run = root / "results/demo/runs" / RID
    run.mkdir(parents=True)
    for name, text in [("config.json", '{"epochs": 4}\n'), ("summary.json", '{"status": "completed"}\n'),
                       ("metrics.csv", "epoch\n1\n"), ("probes.csv", "step\n0\n")]:
        (run / name).write_text(text)
    (root / "results/demo/tables").mkdir(parents=True)
    (root / "results/demo/tables/runs.csv").write_text(f"run_id,run_dir\n{RID},results/demo/runs/{RID}\n")
    (root / "workflow/config").mkdir(parents=True)
    (root / "workflow/config/default.yaml").write_text("name: demo\ntrain:\n  epochs: 4\nseeds: [0]\n")
    (root / "workflow/config/other.yaml").write_text("name: other\ntrain:\n  epochs: 9\n")
    figure_dir = root / "figures/demo"
    figure_dir.mkdir(parents=True)
    (figure_dir / "fig.png").write_bytes(b"png bytes")
    (figure_dir / "tab.csv").write_text("a,b\n1,2\n")
    prov = root / "results/demo/provenance"
    figures.write_provenance(prov / "fig.json", "fig", [RID], ["figures/demo/fig.png"], ["results/demo/tables/runs.csv"])
    figures.write_provenance(prov / "tab.json", "tab", [], ["figures/demo/tab.csv"])
    (prov / "config.json").write_text(json.dumps(CONFIG))
    monkeypatch.chdir(root)
    assert msr_main(["manifest",
        "--provenance", str(prov / "fig.json"), str(prov / "tab.json"), "--runs-table", "results/demo/tables/runs.csv",
        "--config-record", str(prov / "config.json"), "--config-sha256", manifest.config_digest(CONFIG),
        "--out", "figures/demo/MANIFEST.json"]) == 0
    monkeypatch.chdir(tmp_path)  # verify must not depend on the working directory
    return root


def verify(capsys, *args) -> tuple[int, str]:
    code = msr_main(["verify", *map(str, args)])
    return code, capsys.readouterr().out


def test_manifest_records_what_a_reader_needs(project):
    m = json.loads((project / "figures/demo/MANIFEST.json").read_text())
    assert m["set_dir"] == "figures/demo" and m["name"] == "demo" and m["config"] == CONFIG
    assert m["config_sha256"] == manifest.config_digest(CONFIG)
    assert m["run_dirs"] == {RID: f"results/demo/runs/{RID}"}
    run = project / "results/demo/runs" / RID
    assert m["run_sha256"][RID] == {n: manifest.sha256_file(run / n) for n in ("config.json", "summary.json", "metrics.csv")}
    assert m["source_sha256"] == {"results/demo/tables/runs.csv": manifest.sha256_file(project / "results/demo/tables/runs.csv")}


def test_an_untouched_set_is_ok(project, capsys):
    code, out = verify(capsys, project / "figures/demo")
    assert code == 0, out
    assert out.splitlines()[0] == f"{project / 'figures/demo'}: OK (2 files, 1 tables, 1 runs, config " \
        f"{project / 'workflow/config/default.yaml'} match the manifest)"
    assert verify(capsys, project / "figures/demo/MANIFEST.json")[0] == 0  # the manifest itself works too


def test_every_difference_is_named(project, capsys):
    figures = project / "figures/demo"
    recorded = manifest.sha256_file(figures / "fig.png")
    (figures / "fig.png").write_bytes(b"other png")
    (figures / "tab.csv").unlink()
    (figures / "stale.pdf").write_bytes(b"from an older run")
    run = project / "results/demo/runs" / RID
    (run / "config.json").write_text('{"epochs": 6}\n')
    (run / "metrics.csv").unlink()
    (project / "results/demo/tables/runs.csv").write_text("run_id\n")
    (project / "workflow/config/default.yaml").write_text("name: demo\ntrain:\n  epochs: 6\nseeds: [0]\nextra: 1\n")
    code, out = verify(capsys, figures)
    assert code == 1
    lines = [line.strip() for line in out.splitlines() if not line.strip().startswith("note:")]
    assert lines[0].startswith(f"{figures}: 8 difference(s) from its manifest")
    assert sorted(lines[1:]) == sorted([
        f"changed: figures/demo/fig.png (of fig): sha256 {manifest.sha256_file(figures / 'fig.png')[:12]}, "
        f"manifest {recorded[:12]}",
        "missing: figures/demo/tab.csv (of tab)",
        "not in the manifest: stale.pdf (a file of another run of the set, or added by hand?)",
        "changed: results/demo/tables/runs.csv (a table the figures were made from; re-aggregated since?)",
        f"run {RID}: config.json differs (retrained with other options?)",
        f"run {RID}: metrics.csv missing",
        "config default.yaml: train.epochs = 6, the set was made with 4",
        "config default.yaml: extra = 1, not in the config the set was made with",
    ])


def test_a_given_config_is_compared_and_a_bad_record_is_caught(project, capsys):
    other = project / "workflow/config/other.yaml"
    code, out = verify(capsys, project / "figures/demo", "--config", other)
    assert code == 1
    assert "config other.yaml: name = 'other', the set was made with 'demo'" in out
    assert "config other.yaml: train.epochs = 9, the set was made with 4" in out
    path = project / "figures/demo/MANIFEST.json"
    m = json.loads(path.read_text())
    m["config"]["train"]["epochs"] = 6  # someone edits the record to match another config
    path.write_text(json.dumps(m))
    code, out = verify(capsys, project / "figures/demo")
    assert code == 1 and "does not hash to its config_sha256" in out


def test_a_set_moved_out_of_its_project_still_verifies_its_files(project, tmp_path, capsys):
    elsewhere = tmp_path / "download" / "demo"
    shutil.copytree(project / "figures/demo", elsewhere)
    code, out = verify(capsys, elsewhere)
    assert code == 0, out
    assert out.splitlines()[0] == f"{elsewhere}: OK (2 files match the manifest)"
    assert "note: 1 run(s) not checked: no run directory found" in out
    assert "note: config not checked" in out
    (elsewhere / "fig.png").write_bytes(b"x")
    assert verify(capsys, elsewhere)[0] == 1
    # the runs can be pointed at explicitly
    code, out = verify(capsys, elsewhere, "--runs", tmp_path / "nowhere")
    assert code == 1 and f"run missing: {RID}" in out
    shutil.copytree(project / "figures/demo", tmp_path / "again", dirs_exist_ok=True)
    code, out = verify(capsys, tmp_path / "again", "--root", project)
    assert code == 0 and "1 runs" in out


def test_an_older_manifest_without_set_dir_or_records(project, capsys):
    """The first layout: figures/MANIFEST.json, only config hashes of the runs."""
    path = project / "figures/demo/MANIFEST.json"
    m = json.loads(path.read_text())
    for key in ("set_dir", "run_dirs", "run_sha256", "config", "source_sha256", "name"):
        m.pop(key)
    path.write_text(json.dumps(m))
    code, out = verify(capsys, project / "figures/demo", "--runs", project / "results/demo/runs")
    assert code == 0 and "1 runs" in out, out
    code, out = verify(capsys, project / "figures/demo", "--config", project / "workflow/config/default.yaml")
    assert code == 1 and "cannot be compared" in out
    resolved = project / "resolved.json"
    resolved.write_text(json.dumps(CONFIG))
    assert verify(capsys, project / "figures/demo", "--config", resolved)[0] == 0


def test_no_manifest_is_exit_2(tmp_path, capsys):
    assert msr_main(["verify", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"msr verify: error: {tmp_path / 'MANIFEST.json'}: no manifest (is {tmp_path} a figure set?)\n"


def test_manifest_refuses_a_config_record_that_does_not_match_the_hash(project, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(project)
    prov = project / "results/demo/provenance"
    code = msr_main(["manifest", "--provenance", str(prov / "fig.json"), "--config-record", str(prov / "config.json"),
                          "--config-sha256", "0" * 64, "--out", str(tmp_path / "M.json")])
    assert code == 2 and "hashes to" in capsys.readouterr().err


# ---- finding 7: a manifest is input; the folder holds nothing it does not list; the commit exists

def _edit(project: Path, change) -> None:
    path = project / "figures/demo/MANIFEST.json"
    m = json.loads(path.read_text())
    change(m)
    path.write_text(json.dumps(m))


def test_item_paths_that_leave_the_set_are_rejected_unread(project, capsys):
    secret = project / "secret.txt"
    secret.write_text("not part of the set")
    figures = project / "figures/demo"
    (project / "outside.png").write_bytes(b"png bytes elsewhere")
    (figures / "link.png").symlink_to(project / "outside.png")
    digest = manifest.sha256_file(secret)  # the right hash: a rejection, not a mismatch
    entries = [{"path": "figures/demo/../../secret.txt", "sha256": digest},
               {"path": str(secret), "sha256": digest},
               {"path": "results/demo/tables/runs.csv", "sha256": manifest.sha256_file(project / "results/demo/tables/runs.csv")},
               {"path": "figures/demo/link.png", "sha256": manifest.sha256_file(project / "outside.png")}]
    _edit(project, lambda m: m["items"][0]["files"].extend(entries))
    code, out = verify(capsys, figures)
    assert code == 1
    lines = [line.strip() for line in out.splitlines()[1:] if not line.strip().startswith("note:")]
    assert sorted(lines) == sorted([
        "outside the set: 'figures/demo/../../secret.txt' (of fig) - a manifest lists only files inside figures/demo/; not read",
        f"outside the set: '{secret}' (of fig) - a manifest lists only files inside figures/demo/; not read",
        "outside the set: 'results/demo/tables/runs.csv' (of fig) - a manifest lists only files inside figures/demo/; not read",
        f"outside the set: figures/demo/link.png (of fig) is a link to {(project / 'outside.png').resolve()}; not read",
    ])
    # a set_dir, source table or run directory that climbs out of the project is refused too
    _edit(project, lambda m: m.update(source_sha256={"../../etc/passwd": "0" * 64},
                                      run_dirs={RID: "/etc"}))
    code, out = verify(capsys, figures)
    assert "outside the project: source table '../../etc/passwd'; not read" in out
    assert f"outside the project: run '{RID}' ('/etc'); not read" in out
    _edit(project, lambda m: m.update(set_dir="figures/../../.."))
    code = msr_main(["verify", str(figures)])
    assert code == 2 and "is not a folder below the project root" in capsys.readouterr().err


def test_every_unlisted_file_of_any_type_is_reported(project, capsys):
    figures = project / "figures/demo"
    (figures / "README.md").write_text("notes about the set\n")  # allowed next to the manifest
    (figures / "notes.txt").write_text("x")
    (figures / ".hidden").write_text("x")
    (figures / "sub").mkdir()
    (figures / "sub/deep.json").write_text("{}")
    (figures / "sub/README.md").write_text("only the set's own README is allowed")
    (figures / "dirlink").symlink_to(project / "results")  # reported, never followed
    (figures / "other").mkdir()  # another set inside: its own manifest, not this set's files
    (figures / "other/MANIFEST.json").write_text("{}")
    (figures / "other/x.png").write_bytes(b"x")
    code, out = verify(capsys, figures)
    assert code == 1
    reported = sorted(line.strip().split(": ", 1)[1].split(" (")[0] for line in out.splitlines()
                      if line.strip().startswith("not in the manifest"))
    assert reported == [".hidden", "dirlink", "notes.txt", "sub/README.md", "sub/deep.json"]


def _git(root: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True, text=True,
                          env=env).stdout.strip()


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_the_recorded_commit_must_exist_in_the_clone(project, capsys):
    figures = project / "figures/demo"
    # outside a clone: said to be unchecked, not a difference
    _edit(project, lambda m: m.update(git_commit="1" * 40))
    code, out = verify(capsys, figures)
    assert code == 0 and f"note: git commit {'1' * 12} not checked: {project} is not a git clone" in out
    _git(project, "init", "-q")
    _git(project, "add", "-A")
    _git(project, "commit", "-qm", "the set")
    head = _git(project, "rev-parse", "HEAD")
    # inside the clone: a commit that does not exist is a difference ...
    _edit(project, lambda m: m.update(git_commit="1" * 40))
    code, out = verify(capsys, figures)
    assert code == 1 and f"git_commit {'1' * 12} does not exist in this clone" in out
    # ... one that does is checked, and anything but a hash never reaches git as an option
    _edit(project, lambda m: m.update(git_commit=head))
    code, out = verify(capsys, figures)
    assert code == 0, out
    assert f"commit {head[:12]} match the manifest" in out.splitlines()[0]
    _edit(project, lambda m: m.update(git_commit="--output=/tmp/x"))
    code, out = verify(capsys, figures)
    assert code == 1 and "git_commit '--output=/tmp/x' is not a commit hash" in out
