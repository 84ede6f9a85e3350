"""The command line: `python -m speechgpt_app <command>` (or `speechgpt <command>`).

Each command lives in the module that owns its stage; this file only dispatches.
A command module exposes `configure_parser(parser)` and `run_cli(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from speechgpt_app.logs import setup_logging

# command -> (module, one-line help). Modules are imported only when their command runs,
# so `--help` stays fast and a missing optional dependency only breaks its own command.
COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("speechgpt_app.convert", "convert the released fairseq files into a speech model directory"),
    "ask": ("speechgpt_app.ask", "answer one spoken or typed question, write the answer audio"),
    "chat": ("speechgpt_app.mic", "talk to the model through the microphone (--mic)"),
    "eval": ("speechgpt_app.evaluate", "evaluate a model on spoken question sets: one table, JSON"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """Build the top-level parser; only the chosen command's module is imported."""
    parser = argparse.ArgumentParser(prog="speechgpt", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (default: $SPEECHGPT_LOG or INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    chosen = next((a for a in argv if a in COMMANDS), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name == chosen:
            importlib.import_module(module).configure_parser(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command and return its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    setup_logging(args.log_level)
    module = importlib.import_module(COMMANDS[args.command][0])
    return int(module.run_cli(args) or 0)
