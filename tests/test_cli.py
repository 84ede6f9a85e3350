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


def test_ask_and_chat_take_the_same_model_and_sampling_flags() -> None:
    from speechgpt_app.cli import build_parser

    def flags(command: str) -> set[str]:
        parser = build_parser([command])
        sub = next(a for a in parser._actions if a.dest == "command").choices[command]
        return {s for a in sub._actions for s in a.option_strings}

    shared = {"--model", "--quant", "--precision", "--device", "--output", "--seed", "--greedy", "--temperature",
              "--top-p", "--top-k", "--max-new-tokens", "--min-new-tokens"}  # fmt: skip
    assert shared <= flags("ask") and shared <= flags("chat")
