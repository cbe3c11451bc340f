"""The bdserve command: help on every subcommand, and the demo end to end on a tiny model."""

import os
import subprocess
import sys

import pytest

from bdserve.cli import COMMAND_MODULES, app


def bdserve(*args, timeout=300, **env):
    return subprocess.run([sys.executable, "-m", "bdserve.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "BDSERVE_PROGRESS": "0", **env})


def subcommands() -> list[list[str]]:
    import typer.main

    click_app = typer.main.get_command(app)
    paths = []
    for name, cmd in click_app.commands.items():
        paths.append([name])
        for sub in getattr(cmd, "commands", {}) or {}:
            paths.append([name, sub])
    return paths


def test_every_subcommand_has_help():
    paths = subcommands()
    assert len(paths) >= len(COMMAND_MODULES)
    for path in paths:
        proc = bdserve(*path, "--help", timeout=60)
        assert proc.returncode == 0, (path, proc.stderr)
        assert "Usage" in proc.stdout


def test_train_reports_a_bad_target_clearly(tmp_path, cifar_dir):
    proc = bdserve("train", "--model", "tiny", "--target", "unicorn", "--subset", "100", "--epochs", "1",
                   "--out", str(tmp_path / "m"), BDSERVE_DATA=str(cifar_dir))
    assert proc.returncode == 2
    assert "unknown class 'unicorn'" in proc.stdout


def test_demo_serves_the_model_and_sends_requests(tiny_badnets_dir, cifar_dir):
    proc = bdserve("demo", "--out", str(tiny_badnets_dir), "--images", "4", BDSERVE_DATA=str(cifar_dir),
                   COLUMNS="200")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "shrinkpad:4" in out
    assert "Requests through the live service" in out
    assert 'bdserve_requests_total{code="200",model="' in out
    assert "POST /predictions/" in out and "-> 200" in out
    assert "--detect scaleup" in out and "trigger score" in out  # calibrated on the way (none in the card)
