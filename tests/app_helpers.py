"""Helpers shared by the app's tests: the shipped SpeechGPT-tiny, questions it is known to answer,
and the real app.py serving it."""

from __future__ import annotations

import functools
import importlib.util
import json
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

from speechgpt_app.loaders import DEFAULT_MODEL

REPO = Path(__file__).resolve().parents[1]
TINY = DEFAULT_MODEL  # the app's default model, trained by training/mini and shipped in assets/
EVAL_SUBSET = REPO / "tests" / "data" / "eval-subset"  # the CI evaluation's questions, their audio in the repo
GREEDY = {"temperature": 0.0}  # the page's settings for greedy decoding (SamplingOptions.greedy)


@dataclass(frozen=True)
class Question:
    """A held-out spoken question of SpeechGPT-tiny's domain, with the domain's own answer."""

    audio: Path
    text: str
    answer: str
    key: str


@functools.cache
def known_questions() -> tuple[Question, ...]:
    """CI-subset questions that the shipped model's eval.json records as heard exactly and answered
    exactly, in text and in speech (greedy). The tests then check the app gives the domain's answer
    to them: content the model was never shown, not a recording of its own output."""
    rows = [json.loads(line) for line in (EVAL_SUBSET / "ci-subset.jsonl").read_text().splitlines() if line]
    by_name = {Path(r["audio"]).name: r for r in rows}
    found = []
    for item in json.loads((TINY / "eval.json").read_text())["items"]:
        row = by_name.get(Path(item["audio"]).name)
        if row and item["group"] == row["group"] and item["heard"] == row["text"] and item["answer_s2t"] == item.get("answer_s2s") == row["answer"]:
            found.append(Question(EVAL_SUBSET / row["audio"], row["text"], row["answer"], row["key"]))
    assert len(found) >= 2, "the shipped model answers fewer than 2 CI-subset questions right"
    return tuple(found)


def load_app_module() -> ModuleType:
    """app.py is a script at the repository root, not part of the package: load it from its path."""
    spec = importlib.util.spec_from_file_location("speechgpt_root_app", REPO / "app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_app(model: Path, cache: Path, **create: object) -> Iterator[str]:
    """The real app (app.create_app + app.launch) on `model`, on a free loopback port; yields its URL.

    `cache` stands in for $HF_HOME (the app keeps its cached example answers there); `create` goes
    to app.create_app.
    """
    with launched_app(model, cache, **create) as (url, _demo):
        yield url


@contextmanager
def launched_app(model: Path, cache: Path, **create: object) -> Iterator[tuple[str, object]]:
    """`running_app`, also yielding the launched gr.Blocks: (url, demo)."""
    app = load_app_module()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HOME", str(cache))
        demo = app.create_app(model=str(model), **create)
        port = free_port()
        app.launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
        try:
            yield f"http://127.0.0.1:{port}/", demo
        finally:
            demo.close()
