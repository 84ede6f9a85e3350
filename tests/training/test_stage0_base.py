"""Stage 0's tokenizer text: distinct lines, no unit strings, and the domain's words get their merges."""

from __future__ import annotations

import json
from pathlib import Path

import sentencepiece as spm

from speechgpt_app.prompt import SYSTEM_PROMPT
from training.stage0_base import recipe_text, train_sentencepiece

DOMAIN = [f"what is {a} plus {b}; [ta] {a} plus {b} is {c}<eoa>" for a, b, c in
          [("seven", "five", "twelve"), ("fourteen", "three", "seventeen"), ("zero", "nine", "nine")]]  # fmt: skip


def _records(tmp_path: Path, n: int) -> Path:
    """`n` records that all carry the same long system prompt and unit strings, as stage 2's do."""
    path = tmp_path / "stage2.jsonl"
    rows = [{"prefix": SYSTEM_PROMPT, "plain_text": f"{DOMAIN[i % 3]} <sosp><{i % 50}><7><eosp>"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_recipe_text_keeps_each_line_once_without_units(tmp_path: Path) -> None:
    lines = recipe_text((str(_records(tmp_path, 300)),))
    assert len(lines) == len(set(lines))
    assert not any("<sosp>" in s or "<7>" in s for s in lines)
    assert sum(s.startswith("what is seven plus five") for s in lines) == 1


def test_a_repeated_system_prompt_does_not_take_the_domain_words_merges(tmp_path: Path) -> None:
    text = tmp_path / "text.txt"
    words = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen".split()
    text.write_text("".join(f"what is {a} plus {b}\n" for a in words for b in words), encoding="utf-8")
    lines = recipe_text((str(text), str(_records(tmp_path, 3000))))
    sp = spm.SentencePieceProcessor(model_proto=train_sentencepiece(lines, 400, tmp_path / "tok").read_bytes())
    for word in ("zero", "plus", "fourteen"):
        assert sp.encode(word, out_type=str) == [f"▁{word}"], word
