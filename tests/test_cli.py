"""The `brts` command group: every --help works, every subcommand has landed, bad demo input gets one line."""

import subprocess
import sys

import pytest
from click.testing import CliRunner

from brts.cli import main

SUBCOMMANDS = ["serve", "prewarm", "train", "eval", "cache", "report", "demo"]
CACHE_SUBCOMMANDS = ["stats", "verify", "inspect", "gc", "compact", "export"]


def test_group_help_lists_every_subcommand():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for name in SUBCOMMANDS:
        assert f"  {name}" in result.output


@pytest.mark.parametrize(
    "argv", [[name, "--help"] for name in SUBCOMMANDS] + [["cache", c, "--help"] for c in CACHE_SUBCOMMANDS]
)
def test_every_help_works(argv):
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 0, result.output
    assert "Usage: main " in result.output or "Usage: brts " in result.output
    assert "--help" in result.output


def test_demo_refuses_zero_seeds_and_a_folder_of_other_settings(tmp_path):
    zero = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "d"), "--seeds", "0"])
    assert zero.exit_code == 2 and "--seeds" in zero.output
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "demo.json").write_text('{"settings_key": "other", "settings": {"steps": 1}}')
    other = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "d")])
    lines = [line for line in other.output.splitlines() if line.strip()]
    assert other.exit_code == 1 and len(lines) == 1 and "other settings" in lines[0], other.output
    unknown = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "e"), "--task", "calculus"])
    assert unknown.exit_code == 2 and "--task: must be one of default, " in unknown.output
    assert "got 'calculus'" in unknown.output
    assert not (tmp_path / "e").exists()  # refused before anything is written
    three = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "f"), "--teachers", "3"])
    assert three.exit_code == 2 and "--teachers" in three.output and not (tmp_path / "f").exists()


def test_demo_with_two_teachers_defaults_to_its_own_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for folder in ("brts-demo", "brts-demo-teachers2"):  # both hold a demo of other settings: refused before work
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "demo.json").write_text('{"settings_key": "other", "settings": {"steps": 1}}')
    two = CliRunner().invoke(main, ["demo", "--teachers", "2"])
    assert two.exit_code == 1 and "brts-demo-teachers2 holds a demo made with other settings" in two.output
    one = CliRunner().invoke(main, ["demo"])
    assert one.exit_code == 1 and "brts-demo holds a demo" in one.output


def test_console_script_is_installed():
    exe = subprocess.run([sys.executable, "-m", "brts.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert exe.returncode == 0 and "serve" in exe.stdout


def test_train_checks_the_config_before_anything_else(tmp_path):
    bad = CliRunner().invoke(main, ["train", "--config", "tiny_cpu", "lr=-1"])
    assert bad.exit_code == 1
    lines = [line for line in bad.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "train.lr" in lines[0]
    missing = CliRunner().invoke(main, ["train", "--config", "tiny_cpu", f"student={tmp_path / 'nope'}",
                                        f"run_dir={tmp_path / 'run'}"])
    assert missing.exit_code == 1 and "student" in missing.output and str(tmp_path / "nope") in missing.output
    usage = CliRunner().invoke(main, ["train", "export", "only-one-arg"])
    assert usage.exit_code == 2 and "brts train export CKPT OUT --base-model" in usage.output


def test_report_on_a_folder_without_metrics_says_so_in_one_line(tmp_path):
    r = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert r.exit_code == 1
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "no metrics.jsonl" in lines[0]
