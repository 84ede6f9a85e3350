"""The command line: `python -m speechgpt_app <command>` (or `speechgpt <command>`).

Each command lives in the module that owns its stage; this file only dispatches.
A command module exposes `configure_parser(parser)` and `run_cli(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import replace
from typing import Any

from speechgpt_app.logs import setup_logging

# command -> (module, one-line help). Modules are imported only when their command runs,
# so `--help` stays fast and a missing optional dependency only breaks its own command.
COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("speechgpt_app.loaders", "convert the released fairseq files into a speech model directory"),
    "ask": ("speechgpt_app.ask", "answer one spoken or typed question, write the answer audio"),
    "chat": ("speechgpt_app.mic", "talk to the model through the microphone (--mic)"),
    "eval": ("speechgpt_app.evaluate", "evaluate a model on spoken question sets: one table, JSON"),
    "bench": ("speechgpt_app.bench", "time whole spoken turns (and the page, --page): one table, JSON"),
}


# --flag -> SamplingOptions field (None = the bundle's default).
SAMPLING_FLAGS: dict[str, type] = {
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "max_new_tokens": int,
    "min_new_tokens": int,
}


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """The flags that choose and load the model, the same for every command that runs one."""
    p.add_argument("--model", default=None, help="bundle directory or preset (default: $SPEECHGPT_MODEL, else the shipped SpeechGPT-tiny)")  # fmt: skip
    p.add_argument("--quant", default=None, help="auto, none, nf4, int8, int4 (default: $SPEECHGPT_QUANT or auto)")
    p.add_argument("--precision", default=None, help="auto (bf16), bf16, fp16, fp32")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: CUDA if available)")
    p.add_argument("--lm-url", default=None, help="a vLLM server running the bundle's language model, e.g. http://127.0.0.1:8000 (default: $SPEECHGPT_LM_URL; unset: the model runs here)")  # fmt: skip


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """The flags that shape an answer, the same for `ask` and `chat`."""
    # Checked by pipeline.Options (prompt.OUTPUT_MODES), which names the modes when one is wrong.
    p.add_argument("--output", default="speech+text", help="speech+text (default) or text")
    p.add_argument("--seed", type=int, default=None, help="sampling seed, for a reproducible answer")
    p.add_argument("--greedy", action="store_true", help="take the most likely token at each step")
    for name, kind in SAMPLING_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help="default: the model's")


def load_pipeline(args: argparse.Namespace):
    """The pipeline `add_model_flags`' flags name; a language model server is asked now (lm_server.ServerError)."""
    from speechgpt_app.lm_server import lm_url_from_env
    from speechgpt_app.pipeline import Pipeline  # here, so that `--help` does not load torch

    lm_url = args.lm_url or lm_url_from_env()
    pipeline = Pipeline.load(args.model, quant=args.quant, device=args.device, precision=args.precision, lm_url=lm_url)
    pipeline.check_server()  # a server that is not there is found at start-up, not at the first question
    return pipeline


def sampling_options(args: argparse.Namespace, defaults: Any, **more: Any) -> Any:
    """`defaults` (pipeline Options) with what `add_sampling_flags`' flags set, and `more`."""
    given: dict[str, Any] = {name: getattr(args, name) for name in SAMPLING_FLAGS if getattr(args, name) is not None}
    if args.greedy:
        given["do_sample"] = False
    return replace(defaults, sampling=replace(defaults.sampling, **given, seed=args.seed), output=args.output, **more)


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
