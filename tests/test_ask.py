"""ask.py: the one-question command line, on the shipped SpeechGPT-tiny (greedy, its bundle's default)."""

from __future__ import annotations

import json

import pytest
import soundfile as sf
from app_helpers import TINY, known_questions

from speechgpt_app.cli import main
from speechgpt_app.vocoder import load_vocoder

CPU = ["--quant", "none", "--device", "cpu", "--precision", "fp32"]


@pytest.fixture(scope="module")
def bundle():
    return TINY


def test_ask_writes_the_wav_and_prints_json(bundle, tmp_path, capsys):
    question = known_questions()[0]
    out = tmp_path / "answer.wav"
    status = main(["ask", "--model", str(bundle), "--audio", str(question.audio), "--out", str(out), "--json", *CPU])
    assert status == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["heard"], doc["answer"], doc["reason"]) == (question.text, question.answer, "eoa")
    vocoder = load_vocoder(bundle / "speech" / "vocoder")
    info = sf.info(out)
    assert len(doc["units"]) > 5 and info.samplerate == 16_000
    assert info.frames == sum(vocoder.durations(doc["units"])) * vocoder.hop
    assert doc["audio_file"] == str(out)
    kinds = [e["type"] for e in doc["events"]]
    assert kinds[-1] == "End" and "Heard" in kinds and "Audio" in kinds
    assert doc["timings"]["time_to_first_audio_ms"] > 0 and doc["stats"]["tokens_per_s"] > 0


def test_ask_text_only_summary(bundle, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SPEECHGPT_MODEL", str(bundle))
    out = tmp_path / "none.wav"
    status = main(["ask", "--text", "count one down from eighty five", "--output", "text", "--out", str(out), *CPU])
    printed = capsys.readouterr().out
    assert status == 0 and not out.exists()
    assert "answer: before eighty five comes eighty four" in printed and "audio:  none" in printed and "ended:  eoa" in printed
    assert "time to first audio – · " in printed and "real-time factor – · total " in printed  # text only: no audio


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--audio", "/no/such/file.wav"], "file.wav"),
        (["--text", "  "], "empty"),
        (["--text", "hi", "--temperature", "-1"], "temperature"),
    ],
)
def test_ask_bad_input_is_one_line_and_status_2(bundle, capsys, argv, words):
    assert main(["ask", "--model", str(bundle), *argv, *CPU]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after any loading progress bar
    assert err.startswith("error: ") and words in err


def test_ask_missing_model(tmp_path, capsys, monkeypatch):
    from speechgpt_app import loaders

    monkeypatch.delenv("SPEECHGPT_MODEL", raising=False)
    # No model named: the shipped SpeechGPT-tiny answers, offline.
    assert main(["ask", "--text", "what is two plus two", "--output", "text", "--greedy", *CPU]) == 0
    out = capsys.readouterr().out
    assert "model:  speechgpt-tiny" in out and "answer:" in out
    # ...and without it, a plain message that says how to get it back.
    monkeypatch.setattr(loaders, "DEFAULT_MODEL", tmp_path / "speechgpt-tiny")
    assert main(["ask", "--text", "hi", *CPU]) == 2
    err = capsys.readouterr().err
    assert "the default model is missing" in err and "SPEECHGPT_MODEL" in err
    assert main(["ask", "--model", str(tmp_path / "nowhere"), "--text", "hi", *CPU]) == 2
    assert "nowhere" in capsys.readouterr().err
