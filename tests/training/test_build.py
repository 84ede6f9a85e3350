"""The SpeechInstruct builder: unit lines, stage-2/3 records equal to prompt.py's strings, voices, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from speechgpt_app import prompt
from speechgpt_app.audio import load_audio
from speechgpt_app.units import SpeechTokenizer, text_to_units, units_to_text
from training.data import synth
from training.data.build import (
    DEFAULT_ANSWER_VOICE,
    STAGE3_FORMATS,
    BuildError,
    build_stage1,
    build_stage2,
    build_stage3,
    read_progress,
)
from training.data.formats import Record, read_manifest, read_records, read_unit_lines, split_exchange
from training.data.tasks import ASR_TASKS, TTS_TASKS

REPO = Path(__file__).resolve().parents[2]
INSTRUCTIONS = REPO / "training" / "recipes" / "tiny" / "instructions.jsonl"


@pytest.fixture(scope="module")
def tokenizer(speech_dir: Path) -> SpeechTokenizer:
    return SpeechTokenizer.from_dir(speech_dir)


@pytest.fixture(scope="module")
def instructions(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("instr") / "instructions.jsonl"
    path.write_text("\n".join(INSTRUCTIONS.read_text().splitlines()[:6]) + "\n")
    return path


def test_stage1_lines_are_the_speech_tokenizers_units(tmp_path, corpus, speech_dir, tokenizer) -> None:
    out = tmp_path / "units.txt"
    build_stage1(str(corpus), str(speech_dir), str(out), workers=2)
    entries = read_manifest(corpus)
    lines = read_unit_lines(out, n_units=tokenizer.n_units)
    assert lines == [units_to_text(tokenizer.encode(load_audio(e.audio))) for e in entries]
    assert all(len(text_to_units(line)) > 10 for line in lines)


def test_stage2_records_are_prompt_py_strings(tmp_path, corpus, speech_dir, tokenizer) -> None:
    out = tmp_path / "s2.jsonl"
    build_stage2(str(corpus), str(speech_dir), str(out), workers=2, seed=3)
    entries = read_manifest(corpus)
    records = read_records(out)
    assert len(records) == len(entries)
    directions = set()
    for entry, record in zip(entries, records):
        assert record.prefix == prompt.SYSTEM_PROMPT
        user, answer = split_exchange(record.plain_text)
        units = tokenizer.encode(load_audio(entry.audio))
        task, marker, given = user.partition(prompt.INPUT_MARKER)
        assert marker, user
        if answer.endswith(prompt.EOSP + prompt.EOA):  # TTS-style: text in, units out
            directions.add("tts")
            assert given == entry.text and answer == prompt.format_answer(units=units)
            app = prompt.user_message("speak", text=entry.text)
            assert user == app or task in TTS_TASKS
        else:
            directions.add("asr")
            assert given == units_to_text(units) and answer == prompt.format_answer(heard=entry.text)
            app = prompt.user_message("transcribe", units=units_to_text(units))
            assert user == app or task in ASR_TASKS
        assert record.plain_text == prompt.format_exchange(user, answer)
    assert directions == {"asr", "tts"}


def test_stage2_is_seeded(tmp_path, corpus, speech_dir) -> None:
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    build_stage2(str(corpus), str(speech_dir), str(a), workers=0, seed=3, directions=("asr",))
    build_stage2(str(corpus), str(speech_dir), str(b), workers=2, seed=3, directions=("asr",))
    build_stage2(str(corpus), str(speech_dir), str(c), workers=0, seed=4, directions=("asr",))
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()


def _units_of(text: str, voice: str, tokenizer: SpeechTokenizer) -> list[int]:
    backend, _, name = voice.partition(":")
    return tokenizer.encode(synth.synthesize(text, synth.Voice(backend, name)))


def test_stage3_records_all_formats_both_backends_exact_strings(tmp_path, instructions, speech_dir, tokenizer) -> None:
    out = tmp_path / "s3.jsonl"
    build_stage3(str(instructions), str(speech_dir), str(out), workers=2, seed=0)
    items = [json.loads(line) for line in instructions.read_text().splitlines()]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == len(items) * len(STAGE3_FORMATS)
    assert {line["voice"].split(":")[0] for line in lines} == {"espeak-ng", "flite"}
    for i, item in enumerate(items):
        q, a = item["instruction"], item["response"]
        group = lines[i * 4 : i * 4 + 4]
        q_units = units_to_text(_units_of(q, group[0]["voice"], tokenizer))
        a_units = _units_of(a, DEFAULT_ANSWER_VOICE, tokenizer)
        expected = {
            "s2s": (prompt.user_message("chat", "speech+text", units=q_units, style="explicit"), prompt.format_answer(q, a, a_units)),
            "s2t": (prompt.user_message("chat", "text", units=q_units, style="explicit"), prompt.format_answer(q, a)),
            "t2s": (prompt.user_message("chat", "speech+text", text=q, style="explicit"), prompt.format_answer(None, a, a_units)),
            "t2t": (prompt.user_message("chat", "text", text=q, style="explicit"), prompt.format_answer(None, a)),
        }
        for fmt, line in zip(STAGE3_FORMATS, group):
            assert line["prefix"] == prompt.SYSTEM_PROMPT
            assert line["plain_text"] == prompt.format_exchange(*expected[fmt]), fmt


def test_stage3_resumes_after_a_kill_without_duplicates(tmp_path, instructions, speech_dir) -> None:
    whole, killed = tmp_path / "whole.jsonl", tmp_path / "killed.jsonl"
    build_stage3(str(instructions), str(speech_dir), str(whole), workers=0, seed=5)
    cmd = [sys.executable, "-m", "training.data.build", "stage3", "--instructions", str(instructions),
           "--speech-dir", str(speech_dir), "--out", str(killed), "--workers", "0", "--seed", "5"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = Path(str(killed) + ".progress")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if progress.exists() and json.loads(progress.read_text() or '{"items": 0}')["items"] >= 2:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the build finished before it could be killed"
    done = read_progress(killed).items
    assert 2 <= done < 6
    with killed.open("ab") as f:  # a line torn by the kill, after the recorded progress
        f.write(b'{"prefix": "You are')
    build_stage3(str(instructions), str(speech_dir), str(killed), workers=2, seed=5)
    assert killed.read_bytes() == whole.read_bytes()
    assert len(read_records(killed)) == 6 * 4


def test_builder_errors_are_clear(tmp_path, corpus, speech_dir, instructions) -> None:
    no_text = tmp_path / "m.jsonl"
    no_text.write_text(json.dumps({"audio": str(read_manifest(corpus)[0].audio)}) + "\n")
    with pytest.raises(BuildError, match="transcript"):
        build_stage2(str(no_text), str(speech_dir), str(tmp_path / "o.jsonl"), workers=0, seed=0)
    with pytest.raises(BuildError, match="speech dir .* does not exist"):
        build_stage1(str(corpus), str(tmp_path / "nowhere"), str(tmp_path / "o.txt"), workers=0)
    with pytest.raises(BuildError, match="manifest .* does not exist.*LibriSpeech"):
        build_stage1(str(tmp_path / "none.jsonl"), str(speech_dir), str(tmp_path / "o.txt"), workers=0)
    with pytest.raises(BuildError, match="formats"):
        build_stage3(str(instructions), str(speech_dir), str(tmp_path / "o.jsonl"), workers=0, seed=0, formats=("s2x",))
    with pytest.raises(BuildError, match="no voice"):
        build_stage3(str(instructions), str(speech_dir), str(tmp_path / "o.jsonl"), workers=0, seed=0, answer_voice="flite:nobody")


def test_records_skip_bad_items_and_keep_going(tmp_path, speech_dir) -> None:
    path = tmp_path / "i.jsonl"
    rows = [{"instruction": "Say <sosp> please.", "response": "No."}, {"instruction": "Hi?", "response": "Hello."}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "o.jsonl"
    build_stage3(str(path), str(speech_dir), str(out), workers=0, seed=0, formats=("t2t",))
    assert read_records(out) == [Record(prompt.SYSTEM_PROMPT, prompt.format_exchange(
        prompt.user_message("chat", "text", text="Hi?", style="explicit"), prompt.format_answer(None, "Hello.")))]  # fmt: skip
    assert read_progress(out).items == 2
