"""Task descriptions: enough, unique, well-formed, and drawn reproducibly."""

from __future__ import annotations

import random

import pytest

from training.data.tasks import ASR_TASKS, TTS_TASKS, pick_task


@pytest.mark.parametrize("tasks", [ASR_TASKS, TTS_TASKS], ids=["asr", "tts"])
def test_at_least_60_unique_descriptions(tasks: tuple[str, ...]) -> None:
    assert len(tasks) >= 60
    assert len({t.lower() for t in tasks}) == len(tasks)
    for t in tasks:
        assert t == t.strip() and t[-1] in ".?!" and "This is input" not in t, t
        assert "<" not in t and "[" not in t, t  # would collide with added tokens / answer markers


def test_directions_do_not_share_wording() -> None:
    assert not set(ASR_TASKS) & set(TTS_TASKS)


def test_pick_task_is_seeded_and_checks_direction() -> None:
    a = [pick_task("asr", random.Random(f"7:{i}")) for i in range(50)]
    b = [pick_task("asr", random.Random(f"7:{i}")) for i in range(50)]
    assert a == b and len(set(a)) > 20 and set(a) <= set(ASR_TASKS)
    assert pick_task("tts", random.Random(1)) in TTS_TASKS
    with pytest.raises(ValueError, match="direction"):
        pick_task("translate", random.Random(0))
