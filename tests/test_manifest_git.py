"""The manifest's record of the code state (msr.analysis.manifest.git_state)."""

import subprocess

from msr.analysis.manifest import git_state


def test_git_state_ignores_the_sets_own_folder_but_no_other_change(tmp_path):
    # a pipeline run rewrites figures/<set>/ before its manifest: that alone is no dirty tree
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "figures" / "demo").mkdir(parents=True)
    (tmp_path / "src").mkdir()
    (tmp_path / "figures" / "demo" / "fig.png").write_bytes(b"old")
    (tmp_path / "src" / "code.py").write_text("x = 1\n")
    git("add", "-A")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "init")
    assert git_state(tmp_path, own="figures/demo")["dirty"] is False
    (tmp_path / "figures" / "demo" / "fig.png").write_bytes(b"new")
    assert git_state(tmp_path, own="figures/demo")["dirty"] is False
    assert git_state(tmp_path)["dirty"] is True  # without `own`, every tracked change counts
    (tmp_path / "src" / "code.py").write_text("x = 2\n")
    assert git_state(tmp_path, own="figures/demo")["dirty"] is True
