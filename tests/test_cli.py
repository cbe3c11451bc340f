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
        assert "<bool>" not in proc.stdout, path  # flags take no value; the help must not suggest one
        assert "list[" not in proc.stdout, path  # repeatable options name what one value is


def test_train_reports_a_bad_target_clearly(tmp_path, cifar_dir):
    proc = bdserve("train", "--model", "tiny", "--target", "unicorn", "--subset", "100", "--epochs", "1",
                   "--out", str(tmp_path / "m"), BDSERVE_DATA=str(cifar_dir))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: unknown class 'unicorn'; classes: airplane, automobile, bird, cat, deer, dog, frog, horse, ship, truck"]


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


def test_flag_words_are_read_not_refused():
    """`--torchscript true` is what people type for a flag: read it (false: leave the flag out)."""
    from bdserve.cli import flag_values_read

    assert flag_values_read(["train", "--torchscript", "true", "--epochs", "1"]) == ["train", "--torchscript", "--epochs", "1"]
    assert flag_values_read(["train", "--enhance-benign", "false", "--torchscript=yes"]) == ["train", "--torchscript"]
    assert flag_values_read(["train", "--enhanced", "physical"]) == ["train", "--enhanced", "physical"]  # takes a value
    assert flag_values_read(["serve", "--lab", "--model", "x"]) == ["serve", "--lab", "--model", "x"]
    assert flag_values_read(["eval", "--model", "true"]) == ["eval", "--model", "true"]  # a value, not a flag


def test_enhanced_reads_a_missing_value_and_flag_words():
    from bdserve.commands.train import bare_enhanced_means_shrinkpad as read

    assert read(["train", "--enhanced"]) == ["train", "--enhanced", "shrinkpad"]
    assert read(["train", "--enhanced", "--epochs", "1"]) == ["train", "--enhanced", "shrinkpad", "--epochs", "1"]
    assert read(["train", "--enhanced", "true", "--epochs", "1"]) == ["train", "--enhanced", "shrinkpad", "--epochs", "1"]
    assert read(["train", "--enhanced=yes"]) == ["train", "--enhanced", "shrinkpad"]
    assert read(["train", "--enhanced", "false", "--epochs", "1"]) == ["train", "--epochs", "1"]
    assert read(["train", "--enhanced", "physical"]) == ["train", "--enhanced", "physical"]
    assert read(["eval", "--enhanced"]) == ["eval", "--enhanced"]  # only train has it


def test_an_unexpected_failure_is_one_line_with_a_pointer_to_debug(tmp_path):
    bad = tmp_path / "card.json"
    bad.write_text("[1, 2]")  # valid JSON, not a card
    proc = bdserve("physical", "simulate", "--card", str(bad), "--out", str(tmp_path / "o"), timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
