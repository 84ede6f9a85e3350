"""SpeechInstruct-mini records (training/mini/records.py) from a small fake corpus: what each stage learns."""

from __future__ import annotations

import json
import random
from pathlib import Path

from speechgpt_app import prompt
from training.mini import domain, records


def _corpus(tmp_path: Path) -> tuple[Path, dict[str, list[int]]]:
    train, held = domain.split()
    rng = random.Random(0)
    questions = [*train[:40], *held[:5]]
    units = {}
    q_lines, a_lines = [], []
    for i, q in enumerate(questions):
        units[f"q{i}.flac"] = [rng.randrange(50) for _ in range(12)]
        units[f"a{i}.flac"] = [rng.randrange(50) for _ in range(15)]
        q_lines.append({"audio": f"q{i}.flac", "text": q.text, "voice": "espeak:en"})
        a_lines.append({"audio": f"a{i}.flac", "text": q.answer, "voice": "flite:slt"})
    for name, lines in (("questions", q_lines), ("answers", a_lines)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return tmp_path, units


def test_text_corpus_is_the_chains_text_of_training_questions_only(tmp_path: Path) -> None:
    corpus, units = _corpus(tmp_path)
    out = tmp_path / "data"
    counts = records.build(corpus, units, out, n_units=50)
    train, held = domain.split()
    conv_train, _ = domain.split_conversations()
    text = (out / "text.txt").read_text().splitlines()
    background = domain.background_arithmetic()
    assert counts["text"] == len(text) == records.TEXT_COPIES * (len(train) + len(background) + len(conv_train))
    assert prompt.format_answer(heard=background[0].text, answer=background[0].answer) in text
    assert prompt.format_answer(heard=train[3].text, answer=train[3].answer) in text
    assert text[: len(train)] != [prompt.format_answer(heard=q.text, answer=q.answer) for q in train]  # shuffled
    everything = "\n".join((out / f).read_text() for f in ("text.txt", "stage2.jsonl", "stage3.jsonl"))
    heldout_facts = [q for q in held if q.kind == "arithmetic"][:20]
    for q in heldout_facts:  # an unseen sum is never stated anywhere
        assert q.answer not in everything, q.answer


def test_stage2_replays_typed_questions_with_text_answers(tmp_path: Path) -> None:
    corpus, units = _corpus(tmp_path)
    records.build(corpus, units, tmp_path / "data", n_units=50)
    rows = [json.loads(line) for line in (tmp_path / "data" / "stage2.jsonl").read_text().splitlines()]
    typed = [r for r in rows if "(Answer in text.)" in r["plain_text"]]
    train, _ = domain.split()
    conv_train, _ = domain.split_conversations()
    assert len(typed) == len(train) + len(conv_train)
    follow = [r for r in typed if r["prefix"] != prompt.SYSTEM_PROMPT]  # a typed first turn in the history
    assert len(follow) == len(conv_train)
    conv = conv_train[0]
    assert any(r["plain_text"].endswith(prompt.format_answer(answer=conv.follow.answer))
               and conv.first.answer in r["prefix"] for r in follow)  # fmt: skip
