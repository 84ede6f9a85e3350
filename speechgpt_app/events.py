"""The typed events of one spoken turn, in the order a turn produces them.

Every stage speaks this vocabulary: the parser emits Heard/Answer/Units/Notice,
the pipeline adds Audio and End and stamps `t_ms` (milliseconds since `respond`
had the whole input). `t_ms` is excluded from equality, so two runs of the same
turn compare equal whatever their timing.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal, Union

import numpy as np

# A Notice is born where a prompt is built (history shortened) as well as here; a Turn is what an End
# hands back for the history. Both live in prompt.py, which imports nothing of this module.
from speechgpt_app.prompt import Notice, Turn

EndReason = Literal["eoa", "eos", "max_tokens", "cancelled", "error"]
END_REASONS: tuple[str, ...] = ("eoa", "eos", "max_tokens", "cancelled", "error")


@dataclass(frozen=True)
class Heard:
    """A delta of the transcript of what the model heard (the question)."""

    text: str
    t_ms: float = field(default=0.0, compare=False)


@dataclass(frozen=True)
class Answer:
    """A delta of the text answer."""

    text: str
    t_ms: float = field(default=0.0, compare=False)


@dataclass(frozen=True)
class Units:
    """Answer unit ids, in order, as they arrive (already checked against the vocabulary)."""

    ids: tuple[int, ...]
    t_ms: float = field(default=0.0, compare=False)


@dataclass(frozen=True, eq=False)
class Audio:
    """A chunk of answer speech: mono float32 in [-1, 1]."""

    pcm: np.ndarray
    sample_rate: int
    t_ms: float = field(default=0.0, compare=False)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Audio)
            and self.sample_rate == other.sample_rate
            and np.array_equal(self.pcm, other.pcm)
        )

    __hash__ = None  # type: ignore[assignment]  # arrays are not hashable


@dataclass(frozen=True)
class End:
    """The turn is over. `problems` lists what was wrong with the model's output, in plain words.

    `turn` is the finished exchange to append to the history (None when nothing usable came out).
    """

    reason: EndReason
    problems: tuple[str, ...] = ()
    turn: Turn | None = None
    t_ms: float = field(default=0.0, compare=False)
    # Generation counts and times (generate.GenerationStats as a dict: tokens_per_s, ...); not compared.
    stats: dict[str, float] = field(default_factory=dict, compare=False, hash=False)


Event = Union[Heard, Answer, Units, Audio, Notice, End]


@dataclass
class Accumulator:
    """One turn's events folded into what a reader wants: the transcript, the answer, the units, the
    audio, the notices and the End (`add` each event as it comes). The page (and its export), `ask`,
    `chat --mic` and `eval` all read their turns through it."""

    heard: str = ""
    answer: str = ""
    units: list[int] = field(default_factory=list)
    chunks: list[np.ndarray] = field(default_factory=list)
    sample_rate: int | None = None
    notices: list[Notice] = field(default_factory=list)
    end: End | None = None

    def add(self, event: Event) -> None:
        """Fold in one event."""
        if isinstance(event, Heard):
            self.heard += event.text
        elif isinstance(event, Answer):
            self.answer += event.text
        elif isinstance(event, Units):
            self.units.extend(event.ids)
        elif isinstance(event, Audio):
            self.chunks.append(event.pcm)
            self.sample_rate = event.sample_rate
        elif isinstance(event, Notice):
            self.notices.append(event)
        elif isinstance(event, End):
            self.end = event

    def audio(self) -> np.ndarray:
        """All answer audio so far, float32 mono at `sample_rate`."""
        return np.concatenate(self.chunks) if self.chunks else np.zeros(0, dtype=np.float32)


UPDATE_INTERVAL_S = 0.05  # a page's token-by-token text updates are coalesced to at most 20 per second
# Text updates the whole app sends per second, over all the turns running at once: each update costs
# the app a render of ten panels, and twenty pages at 20 a second would starve the turns themselves.
APP_UPDATES_PER_S = 40
_DONE = object()


def update_interval(turns_running: int) -> float:
    """Seconds between a page's text updates while `turns_running` turns stream at once."""
    return max(UPDATE_INTERVAL_S, turns_running / APP_UPDATES_PER_S)


def batched(events: Iterator[Event], interval_s: float = UPDATE_INTERVAL_S) -> Iterator[list[Event]]:
    """Run `events` (a turn) in its own thread, so that it goes at its own pace, and yield what it made
    in batches: at once for a new stage (the first event of another type), an audio chunk, a notice or
    the end; otherwise at most every `interval_s`. An error of `events` is raised here, where the
    batches are read, after the events made before it. A reader that stops early must stop the turn itself (its cancel flag): the
    thread runs the turn to its end."""
    out: queue.SimpleQueue = queue.SimpleQueue()

    def produce() -> None:
        try:
            for event in events:
                out.put(event)
        except BaseException as e:  # handed to the reader, who raises it
            out.put(_Failed(e))
        out.put(_DONE)

    threading.Thread(target=produce, name="turn", daemon=True).start()
    batch: list[Event] = []
    due = time.monotonic() + interval_s
    while True:
        try:
            item = out.get(timeout=max(0.0, due - time.monotonic()) if batch else None)
        except queue.Empty:  # the interval passed with text waiting
            yield batch
            batch, due = [], time.monotonic() + interval_s
            continue
        if item is _DONE or isinstance(item, _Failed):
            if batch:
                yield batch
            if isinstance(item, _Failed):
                raise item.error
            return
        urgent = isinstance(item, (Audio, Notice, End)) or (bool(batch) and type(batch[-1]) is not type(item))
        batch.append(item)
        if urgent or time.monotonic() >= due:
            yield batch
            batch, due = [], time.monotonic() + interval_s


@dataclass(frozen=True)
class _Failed:
    error: BaseException
