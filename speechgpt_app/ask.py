"""`python -m speechgpt_app ask`: answer one spoken or typed question, write the answer audio.

    python -m speechgpt_app ask --audio question.wav --out answer.wav
    python -m speechgpt_app ask --text "What is the capital of France?" --output text
    python -m speechgpt_app ask --audio q.flac --task transcribe --json

Prints what the model heard, its answer and the timings (or, with --json, one JSON document with
every event and the timings). Bad input or a missing model is one line on stderr and exit status 2;
a turn that fails during generation exits with 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from speechgpt_app.cli import add_model_flags, add_sampling_flags, load_pipeline, sampling_options
from speechgpt_app.events import Accumulator, Audio, End, Event, Notice, Units
from speechgpt_app.lm_server import ServerError
from speechgpt_app.loaders import MissingWeightsError
from speechgpt_app.model import ModelLoadError
from speechgpt_app.pipeline import Timings
from speechgpt_app.prompt import TASKS

EXIT_BAD_INPUT = 2  # bad input, unknown or missing model
EXIT_FAILED = 1  # the turn ended with an error
EXIT_INTERRUPTED = 130  # Ctrl-C


def configure_parser(p: argparse.ArgumentParser) -> None:
    """Add the `ask` arguments."""
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--audio", type=Path, help="the spoken question (wav, flac, mp3, ogg, webm, m4a)")
    source.add_argument("--text", help="a typed question (chat) or the text to say (--task speak)")
    p.add_argument("--out", type=Path, default=Path("answer.wav"), help="answer audio (default: answer.wav)")
    add_model_flags(p)
    p.add_argument("--task", choices=TASKS, default="chat")
    add_sampling_flags(p)
    p.add_argument("--assistant-prefix", default=None, help="force the start of the answer (e.g. 'corrected words; [ta] ')")
    p.add_argument("--json", action="store_true", help="print every event and the timings as one JSON document")


def event_to_json(event: Event) -> dict[str, Any]:
    """One event as JSON: its type and fields (audio as its length, not its samples)."""
    if isinstance(event, Audio):
        return {"type": "Audio", "samples": len(event.pcm), "sample_rate": event.sample_rate, "t_ms": event.t_ms}
    data = {f.name: getattr(event, f.name) for f in fields(event)}
    if isinstance(event, End):
        data["turn"] = asdict(event.turn) if event.turn is not None else None
        data["problems"] = list(event.problems)
    if isinstance(event, Units):
        data["ids"] = list(event.ids)
    return {"type": type(event).__name__, **data}


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def run_cli(args: argparse.Namespace) -> int:
    """Run one turn as the arguments say; returns the exit status."""
    import soundfile as sf


    try:
        pipeline = load_pipeline(args)
        options = sampling_options(args, pipeline.default_options, task=args.task, assistant_prefix=args.assistant_prefix)
        events = pipeline.respond(audio=args.audio, text=args.text, options=options)
    # Every input and model error of ours is one of these (AudioError, PromptError, BundleError,
    # ModelNameError and VocoderError are ValueErrors); an OSError is an unreadable file.
    except (ValueError, OSError, MissingWeightsError, ModelLoadError, ServerError) as e:
        return _fail(str(e))

    timings, turn = Timings(), Accumulator()
    seen: list[Event] = []
    try:
        for event in events:
            timings.observe(event)
            turn.add(event)
            seen.append(event)
            if isinstance(event, Notice) and not args.json:
                print(f"note: {event.message}", file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    end = turn.end
    assert end is not None

    wrote = None
    if turn.chunks:
        wrote = args.out
        sf.write(wrote, turn.audio(), pipeline.sample_rate, subtype="PCM_16")
    if args.json:
        doc = {
            "model": pipeline.description,
            "model_details": pipeline.details,
            "heard": turn.heard,
            "answer": turn.answer,
            "units": turn.units,
            "reason": end.reason,
            "problems": list(end.problems),
            "audio_file": str(wrote) if wrote else None,
            "timings": timings.as_dict(),
            "stats": end.stats,
            "events": [event_to_json(e) for e in seen],
        }
        print(json.dumps(doc, ensure_ascii=False, indent=1))
    else:
        _print_summary(pipeline, turn.heard, turn.answer, turn.units, end, wrote, timings)
    return EXIT_FAILED if end.reason == "error" else 0


def _print_summary(pipeline, heard, answer, units, end, wrote, timings: Timings) -> None:
    """The plain-text report: model, what was heard, the answer, the audio file and the timings."""
    print(f"model:  {pipeline.description}")
    if pipeline.warning:
        print(f"note:   {pipeline.warning}")
    if heard.strip():
        print(f"heard:  {heard.strip()}")
    if answer.strip():
        print(f"answer: {answer.strip()}")
    if units:
        print(f"units:  {len(units)}")
    print(f"audio:  {wrote} ({timings.audio_seconds:.2f} s)" if wrote else "audio:  none")
    total = "–" if timings.total_ms is None else f"{timings.total_ms / 1000:.2f} s"
    print(f"timings: {timings.summary()} · total {total}")
    print(f"ended:  {end.reason}")
    for problem in end.problems:
        print(f"problem: {problem}", file=sys.stderr)
