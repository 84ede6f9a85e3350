"""The event vocabulary: frozen, timing-blind equality, Audio compares samples; batched turns."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from speechgpt_app.events import (
    APP_UPDATES_PER_S,
    END_REASONS,
    UPDATE_INTERVAL_S,
    Answer,
    Audio,
    End,
    Heard,
    Units,
    batched,
    update_interval,
)


def test_events_are_frozen() -> None:
    ev = Heard("hello")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ev.text = "other"  # type: ignore[misc]


def test_timing_is_not_part_of_equality() -> None:
    assert Answer("hi", t_ms=1.0) == Answer("hi", t_ms=99.0)
    assert Units((1, 2), t_ms=3.0) != Units((2, 1), t_ms=3.0)
    assert dataclasses.replace(Heard("a"), t_ms=5.0).t_ms == 5.0


def test_audio_compares_samples() -> None:
    pcm = np.linspace(-1, 1, 16, dtype=np.float32)
    assert Audio(pcm, 16000) == Audio(pcm.copy(), 16000)
    assert Audio(pcm, 16000) != Audio(pcm * 0.5, 16000)
    assert Audio(pcm, 16000) != Audio(pcm, 22050)


def test_end_reasons() -> None:
    assert set(END_REASONS) == {"eoa", "eos", "max_tokens", "cancelled", "error"}
    assert End("eoa").problems == ()


def test_batched_keeps_every_event_in_order_and_coalesces_text() -> None:
    text = [Answer("a")] * 40
    turn = [Heard("x"), Heard("y"), *text, Units((1, 2)), Audio(np.zeros(4, np.float32), 16000), Units((3,)), End("eoa")]
    batches = list(batched(iter(turn), interval_s=5.0))  # the turn outruns the interval: only stages split it
    assert [e for b in batches for e in b] == turn
    assert len(batches) < len(turn) / 3  # 40 text deltas: a few updates, not 40
    # A new stage, an audio chunk and the end each close a batch at once.
    lasts = [b[-1] for b in batches]
    assert isinstance(lasts[-1], End) and any(isinstance(e, Audio) for e in lasts)
    first_answer = next(b for b in batches if any(isinstance(e, Answer) for e in b))
    assert isinstance(first_answer[-1], Answer) and first_answer.count(Answer("a")) == 1  # sent at once


def test_batched_runs_the_turn_at_its_own_pace_and_passes_errors_on() -> None:
    produced: list[float] = []

    def turn():
        for i in range(5):
            produced.append(time.monotonic())
            yield Answer(str(i))
            time.sleep(0.02)
        raise RuntimeError("the model failed")

    reader = batched(turn(), interval_s=0.001)
    first = next(reader)
    time.sleep(0.5)  # a slow page: the turn does not wait for it (pulled, it would still be at its start)
    assert len(produced) == 5
    rest = []
    with pytest.raises(RuntimeError, match="the model failed"):
        for batch in reader:
            rest += batch
    assert [e.text for e in first + rest] == list("01234")


def test_update_interval_bounds_the_whole_apps_update_rate() -> None:
    assert update_interval(0) == update_interval(1) == UPDATE_INTERVAL_S  # one page: 20 updates a second
    for running in (2, 5, 20, 100):  # all pages together: at most APP_UPDATES_PER_S a second
        assert running / update_interval(running) <= APP_UPDATES_PER_S + 1e-9
    assert update_interval(20) == pytest.approx(20 / APP_UPDATES_PER_S)
