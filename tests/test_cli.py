"""The `lesionkit` command itself: help lists every subcommand with its one-line description."""

import os
import subprocess
import sys

from lesionkit.cli import COMMANDS


def lesionkit(*args):
    return subprocess.run(
        [sys.executable, "-m", "lesionkit.cli", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env=dict(os.environ, COLUMNS="250"),
    )


def test_help_lists_every_subcommand_with_a_description():
    res = lesionkit("--help")
    assert res.returncode == 0
    flat = " ".join(res.stdout.split())
    for name, (_, description) in COMMANDS.items():
        assert f"{name} {description}" in flat, name


def test_unknown_or_missing_subcommand_is_a_usage_error():
    res = lesionkit("fly")
    assert res.returncode == 2 and "invalid choice: 'fly'" in res.stderr
    res = lesionkit()
    assert res.returncode == 2 and "synth" in res.stdout


def test_subcommand_help_and_bad_flag():
    res = lesionkit("pack", "--help")
    assert res.returncode == 0 and "--shard-size" in res.stdout
    res = lesionkit("pack", "--images", "a", "--labels", "b.csv", "--out", "c", "--no-such-flag")
    assert res.returncode == 2 and "--no-such-flag" in res.stderr
