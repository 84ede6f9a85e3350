"""SpeechInstruct-mini's spoken corpus plan: which texts are spoken, by how many voices (no synthesis)."""

from __future__ import annotations

from collections import Counter

from training.mini import domain, speak


def test_rare_words_are_heard_in_more_voices_and_held_out_texts_never() -> None:
    jobs = list(speak.jobs("questions"))
    per_text = Counter(j.text for j in jobs)
    kind = {q.text: q.kind for q in domain.questions()}
    _, held = speak.question_texts()
    assert not set(per_text) & set(held)
    rare = [t for t in per_text if kind.get(t) in speak.RARE_WORD_KINDS]
    assert rare and all(per_text[t] == 2 + speak.RARE_WORD_EXTRA_VOICES for t in rare)
    assert all(per_text[t] == 1 for t in per_text if kind.get(t) == "arithmetic")
    assert len({(j.voice, j.augmented) for j in jobs if j.text == rare[0]}) > 2  # more voices, not copies


def test_extra_voices_keep_the_other_files_names(monkeypatch) -> None:
    """The extra voices are drawn after every other file: a corpus spoken before them stays valid."""
    jobs = list(speak.jobs("questions"))
    monkeypatch.setattr(speak, "RARE_WORD_EXTRA_VOICES", 0)
    before = list(speak.jobs("questions"))
    assert [j.name for j in jobs[: len(before)]] == [j.name for j in before]
    assert len(jobs) > len(before)
