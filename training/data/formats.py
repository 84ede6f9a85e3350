"""Readers and writers for the on-disk formats in FORMATS.md: manifests, unit lines, records.

Writers are append-only and line-atomic so that a killed build can restart where it stopped
(`resume_lines` drops a torn last line and says how many whole lines are there).
Readers accept the released SpeechInstruct files' spacing variants.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


class DataFormatError(ValueError):
    """A data file line that does not follow FORMATS.md; the message names the file and line."""


@dataclass(frozen=True)
class ManifestEntry:
    """One audio file, with its transcript when known."""

    audio: str
    text: str | None = None


@dataclass(frozen=True)
class Record:
    """A stage-2/3 training record: the system prompt (loss-masked) and the exchange (trained)."""

    prefix: str
    plain_text: str


# "[Human]: X<eoh> [SpeechGPT]: Y<eoa>" (released data) or "[Human]: X <eoh>. [SpeechGPT]: Y<eoa>"
# (our inference template); old slow tokenizers also wrote "[SpeechGPT] :".
_EXCHANGE = re.compile(
    r"^\s*\[Human\]\s*:\s?(?P<user>.*?)\s*<eoh>\s*\.?\s*\[SpeechGPT\]\s*:\s?(?P<answer>.*?)\s*$", re.S
)


def split_exchange(plain_text: str) -> tuple[str, str]:
    """(user message, answer) of one `[Human]: ... <eoh> [SpeechGPT]: ...` exchange, any spacing."""
    m = _EXCHANGE.match(plain_text)
    if not m:
        raise DataFormatError(f"not a '[Human]: ... <eoh> [SpeechGPT]: ...' exchange: {plain_text[:120]!r}")
    return m.group("user"), m.group("answer")


def answer_start(plain_text: str) -> int:
    """Where the answer begins in an exchange: just after `[SpeechGPT]: ` (any spacing variant)."""
    m = _EXCHANGE.match(plain_text)
    if not m:
        raise DataFormatError(f"not a '[Human]: ... <eoh> [SpeechGPT]: ...' exchange: {plain_text[:120]!r}")
    return m.start("answer")


def _json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{path}:{n}: not JSON ({e.msg})") from e
            if not isinstance(obj, dict):
                raise DataFormatError(f"{path}:{n}: expected a JSON object")
            yield n, obj


def iter_manifest(path: str | Path) -> Iterator[tuple[int, ManifestEntry]]:
    """(line number, entry) per `{"audio": path, "text": optional}` line, read lazily; relative audio
    paths are relative to the manifest."""
    path = Path(path)
    for n, obj in _json_lines(path):
        if not isinstance(obj.get("audio"), str):
            raise DataFormatError(f"{path}:{n}: needs an 'audio' path")
        audio = Path(obj["audio"])
        audio = audio if audio.is_absolute() else path.parent / audio
        text = obj.get("text")
        if text is not None and not isinstance(text, str):
            raise DataFormatError(f"{path}:{n}: 'text' must be a string")
        yield n, ManifestEntry(str(audio), text)


def read_manifest(path: str | Path) -> list[ManifestEntry]:
    """All entries of a manifest (see `iter_manifest`)."""
    return [entry for _, entry in iter_manifest(path)]


def write_manifest(path: str | Path, entries: list[ManifestEntry]) -> None:
    """Write a manifest (one JSON object per line, text omitted when unknown)."""
    with Path(path).open("w", encoding="utf-8") as f:
        for e in entries:
            obj = {"audio": e.audio} if e.text is None else {"audio": e.audio, "text": e.text}
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")


def read_records(path: str | Path) -> list[Record]:
    """Stage-2/3 records; each must hold a prefix and a parseable exchange (extra keys are kept out)."""
    path = Path(path)
    records = []
    for n, obj in _json_lines(path):
        prefix, text = obj.get("prefix"), obj.get("plain_text")
        if not isinstance(prefix, str) or not isinstance(text, str):
            raise DataFormatError(f"{path}:{n}: needs string 'prefix' and 'plain_text'")
        try:
            split_exchange(text)
        except DataFormatError as e:
            raise DataFormatError(f"{path}:{n}: {e}") from e
        records.append(Record(prefix, text))
    return records


def record_line(record: Record, **extra: str) -> str:
    """One JSONL line for a record, in the reference's key order; `extra` keys (e.g. voice) follow."""
    return json.dumps({"prefix": record.prefix, "plain_text": record.plain_text, **extra}, ensure_ascii=False)


def read_text_lines(path: str | Path) -> list[str]:
    """The non-empty lines of a plain-text file (stage 0's text, replayed by later stages)."""
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    if not any(lines):
        raise ValueError(f"{path} has no text")
    return [line for line in lines if line]


def read_unit_lines(path: str | Path, n_units: int | None = None) -> list[str]:
    """Stage-1 lines, each one `<sosp>...<eosp>` unit string (ids checked against `n_units`)."""
    from speechgpt_app.units import text_to_units

    path = Path(path)
    lines = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                text_to_units(line, n_units)
            except ValueError as e:
                raise DataFormatError(f"{path}:{n}: {e}") from e
            lines.append(line)
    return lines


def resume_lines(path: Path) -> int:
    """Whole lines already in `path` (0 if absent); a torn last line from a killed run is cut off."""
    if not path.exists():
        return 0
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep != len(data):
        with path.open("r+b") as f:
            f.truncate(keep)
    return data[:keep].count(b"\n")
