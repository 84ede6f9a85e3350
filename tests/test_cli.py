"""The command line dispatches to the module that owns each command."""

from __future__ import annotations

import subprocess
import sys

from speechgpt_app.cli import COMMANDS


def test_help_lists_every_command() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "speechgpt_app", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for name in COMMANDS:
        assert name in out


def test_unknown_command_fails() -> None:
    proc = subprocess.run([sys.executable, "-m", "speechgpt_app", "nope"], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "invalid choice" in proc.stderr
