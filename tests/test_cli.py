"""The `msr` command's small subcommands (train and bench have their own test files)."""

import subprocess
import sys

import pytest

from msr import __version__
from msr.cli import main


def test_variants_lists_the_registry(capsys):
    assert main(["variants"]) == 0
    out = capsys.readouterr().out.splitlines()
    from msr.core.variants import VARIANTS

    assert [line.split()[0] for line in out] == list(VARIANTS)
    assert {"bn", "msr", "msr_noise", "wn", "fixup", "skipinit", "nf_ws"} <= set(VARIANTS)


def test_prepare_then_datasets_shows_the_cache(tmp_path, capsys):
    root = tmp_path / "data"
    assert main(["datasets", "--data-root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "digits         1437 train / 360 test, 10 classes, 1x16x16 (defaults: 10 epochs, batch 32; image sizes: 8, 16, 32)\n    not prepared\n" in out
    assert main(["prepare", "--dataset", "digits", "--data-root", str(root), "--image-size", "8"]) == 0
    path = capsys.readouterr().out.strip()
    assert path.endswith("digits-8.pt") and (root / "processed" / "digits-8.pt").exists()
    assert main(["datasets", "--data-root", str(root)]) == 0
    assert "batch 32; image sizes: 8, 16, 32)\n    cached: digits-8.pt\n" in capsys.readouterr().out


def test_prepare_cifar_offline_without_archive_fails_cleanly(tmp_path, capsys):
    code = main(["prepare", "--dataset", "cifar10", "--data-root", str(tmp_path), "--no-download"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("msr prepare: error:") and "Traceback" not in err


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "train" in capsys.readouterr().out


def test_python_dash_m_and_version():
    done = subprocess.run([sys.executable, "-m", "msr", "--version"], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and done.stdout.strip() == f"msr {__version__}"


@pytest.mark.parametrize("command", ["aggregate", "manifest", "bench"])
def test_forwarded_commands_have_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert f"msr {command}" in capsys.readouterr().out


def test_a_reader_that_closes_the_pipe_stops_msr_quietly():
    # `msr variants | head -1`: the reader goes away before msr writes. A shell tool stops on
    # SIGPIPE without a word; msr must not print a BrokenPipeError traceback.
    proc = subprocess.Popen([sys.executable, "-m", "msr", "variants"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait() == 141, err
    assert err == ""


def test_a_broken_pipe_that_is_not_stdout_is_still_an_error(monkeypatch):
    # only the reader of stdout going away is quiet; another broken pipe (a subprocess, the fork
    # server) is a real failure and propagates
    from msr.cli import training

    def broken(_args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(training, "cmd_variants", broken)
    with pytest.raises(BrokenPipeError):
        main(["variants"])
