"""On-disk formats: manifests, unit lines, records (with the released data's spacing variants)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from speechgpt_app.prompt import SYSTEM_PROMPT
from training.data.formats import (
    DataFormatError,
    ManifestEntry,
    Record,
    read_manifest,
    read_records,
    read_unit_lines,
    record_line,
    resume_lines,
    split_exchange,
    write_manifest,
)

# REFERENCE.md §7's example record (released spacing: no space before <eoh>, no period after it).
RELEASED = "[Human]: Try to speak out this sentence, please. This is input: The alchemist rode in front.<eoh> [SpeechGPT]: <sosp><661><588><eosp><eoa>"


@pytest.mark.parametrize(
    "text, user, answer",
    [
        (RELEASED, "Try to speak out this sentence, please. This is input: The alchemist rode in front.", "<sosp><661><588><eosp><eoa>"),
        ("[Human]: hi there <eoh>. [SpeechGPT]: [ta] hello<eoa>", "hi there", "[ta] hello<eoa>"),
        ("[Human] : hi <eoh> . [SpeechGPT] : hello <eoa> ", "hi", "hello <eoa>"),
    ],
)
def test_split_exchange_tolerates_spacing(text: str, user: str, answer: str) -> None:
    assert split_exchange(text) == (user, answer)


def test_split_exchange_refuses_other_text() -> None:
    with pytest.raises(DataFormatError, match="exchange"):
        split_exchange("Human: hi. SpeechGPT: hello")


def test_records_round_trip_and_released_records_load(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    ours = Record(SYSTEM_PROMPT, "[Human]: hi <eoh>. [SpeechGPT]: [ta] hello<eoa>")
    path.write_text(
        record_line(ours, voice="flite:kal") + "\n\n" + json.dumps({"prefix": SYSTEM_PROMPT, "plain_text": RELEASED}) + "\n"
    )
    assert read_records(path) == [ours, Record(SYSTEM_PROMPT, RELEASED)]


@pytest.mark.parametrize(
    "line, message",
    [
        ("not json", "not JSON"),
        ("[1, 2]", "JSON object"),
        ('{"prefix": "p"}', "plain_text"),
        ('{"prefix": "p", "plain_text": "no exchange"}', "exchange"),
    ],
)
def test_bad_records_name_the_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(record_line(Record("p", RELEASED)) + "\n" + line + "\n")
    with pytest.raises(DataFormatError, match=f"bad.jsonl:2: .*{message}"):
        read_records(path)


def test_manifest_paths_are_relative_to_the_manifest(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    write_manifest(path, [ManifestEntry("wav/a.wav", "hello"), ManifestEntry("/abs/b.flac")])
    assert read_manifest(path) == [ManifestEntry(str(tmp_path / "wav/a.wav"), "hello"), ManifestEntry("/abs/b.flac")]
    path.write_text('{"text": "no audio"}\n')
    with pytest.raises(DataFormatError, match="audio"):
        read_manifest(path)


def test_unit_lines_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "u.txt"
    path.write_text("<sosp><1><2><eosp>\n\n<sosp> <3> <eosp>\n")
    assert read_unit_lines(path, n_units=4) == ["<sosp><1><2><eosp>", "<sosp> <3> <eosp>"]
    with pytest.raises(DataFormatError, match="u.txt:3: .*out of range"):
        read_unit_lines(path, n_units=3)
    path.write_text("<sosp><1><2>\n")
    with pytest.raises(DataFormatError, match="u.txt:1"):
        read_unit_lines(path)


def test_resume_lines_cuts_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "out.txt"
    assert resume_lines(path) == 0
    path.write_bytes(b"one\ntwo\nthr")
    assert resume_lines(path) == 2
    assert path.read_bytes() == b"one\ntwo\n"
