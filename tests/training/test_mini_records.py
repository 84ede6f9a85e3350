"""SpeechInstruct-mini's text-made records: phoneme-spelled word strings and the domain's facts as text."""

from __future__ import annotations

import json
import random

from speechgpt_app import prompt
from speechgpt_app.parser import ChainParser
from speechgpt_app.units import text_to_units, units_to_text
from training.mini import domain, phonemes, records


def test_word_strings_are_spelled_in_the_encoders_phonemes() -> None:
    train, held = domain.split()
    texts = [q.text for q in train]
    symbols = phonemes.inventory(domain.all_texts())
    strings = records.word_strings(texts, symbols, random.Random(0))
    assert len(strings) == records.WORD_STRINGS
    heldout = {q.text for q in held}
    vocabulary = {w for t in texts for w in t.split()}
    for text, units in strings[:200]:
        assert text not in heldout
        assert set(text.split()) <= vocabulary
        lo, hi = records.WORD_STRING_LENGTH
        assert lo <= len(text.split()) <= hi
        assert [symbols[u] for u in units] == list(phonemes.phonemes(text))
    assert records.word_strings(texts, [], random.Random(0)) == []  # units that are not phonemes: none


def test_knowledge_is_every_training_fact_as_text_and_no_heldout_question() -> None:
    train, held = domain.split()
    convs, _ = domain.split_conversations()
    lines = records.knowledge(train, convs, random.Random(0))
    assert len(lines) == len(train) + len(convs)
    heldout = {q.text for q in held}
    answers = set()
    for line in lines:
        record = json.loads(line)
        text = record["plain_text"]
        exchange = text.rsplit("[Human]: ", 1)[1]
        question = exchange.split(" (Answer in text.)")[0].rstrip("?").lower()
        assert question not in heldout
        parser = ChainParser(50)
        events = parser.feed(exchange.split("[SpeechGPT]: ", 1)[1])
        answers.add("".join(getattr(e, "text", "") for e in events).strip())
        assert "<sosp>" not in text
    assert {q.answer for q in train} <= answers
    follow = next(line for line in lines if "and what is that times two" in line.lower())
    assert follow.count("[Human]: ") == 2  # the follow-up comes after its first exchange


def test_word_string_record_is_an_app_transcribe_turn() -> None:
    symbols = phonemes.inventory(domain.all_texts())
    text, units = records.word_strings(["cat dog sun"], symbols, random.Random(1))[0]
    user = prompt.user_message("transcribe", units=units_to_text(units))
    assert text_to_units(user[user.index("<sosp>") :], len(symbols)) == units
