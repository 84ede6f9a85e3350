"""The event vocabulary: frozen, timing-blind equality, Audio compares samples."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from speechgpt_app.events import END_REASONS, Answer, Audio, End, Heard, Units


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
