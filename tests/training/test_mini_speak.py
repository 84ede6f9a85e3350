"""SpeechInstruct-mini's spoken corpus plan: which texts are spoken, by how many voices (no synthesis)."""

from __future__ import annotations

from collections import Counter

from training.mini import domain, speak


def test_rare_words_are_heard_in_more_voices_and_held_out_texts_never() -> None:
    jobs = [*speak.jobs("questions"), *speak.rare_word_jobs("questions")]
    per_text = Counter(j.text for j in jobs)
    kind = {q.text: q.kind for q in domain.questions()}
    _, held = speak.question_texts()
    assert not set(per_text) & set(held)
    rare = [t for t in per_text if kind.get(t) in speak.RARE_WORD_KINDS]
    assert rare and all(per_text[t] == 2 + speak.RARE_WORD_EXTRA_VOICES for t in rare)
    assert all(per_text[t] == 1 for t in per_text if kind.get(t) == "arithmetic")
    assert len({(j.voice, j.augmented) for j in jobs if j.text == rare[0]}) > 2  # more voices, not copies


def test_extra_voices_are_their_own_files() -> None:
    """The extra voices are drawn apart from the others: a corpus spoken before them stays valid."""
    base, extra = list(speak.jobs("questions")), list(speak.rare_word_jobs("questions"))
    assert extra and not {j.name for j in base} & {j.name for j in extra}
    assert not list(speak.rare_word_jobs("answers"))
