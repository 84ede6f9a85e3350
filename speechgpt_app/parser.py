"""The chain-of-modality parser: the model's decoded answer text -> Heard / Answer / Units events.

What follows `[SpeechGPT]: ` (REFERENCE.md §3):

    [tq] {transcript}; [ta] {text answer}; [ua] <sosp><661><588>...<eosp><eoa>

`[tq]` is optional (the released model omits it), and any part may be missing: `[ta] text<eoa>`,
`[ua] <sosp>...<eosp><eoa>`, a bare `<sosp>...<eosp><eoa>` (TTS-style), or plain text (a transcript).
Whitespace around the separators and inside the unit span is tolerated (old slow tokenizers decode
`<sosp> <661> <588>`), as is a missing `;` or a missing space after it. Unit tokens that come without
`<sosp>` still start the units (reported). `.state` says which part is being read, so a caller that
wants a text answer only can stop generating once it turns "units".

The parser is incremental and never raises on model output. Text is cut into lexemes: tags (`[tq]`,
`[ta]`, `[ua]`, `<sosp>`, `<eosp>`, `<eoa>`), unit tokens `<N>`, `;`, whitespace runs and text runs.
`feed` holds back only a suffix that could still grow into a tag or a unit token (`"[t"`, `"<5"`), or
whitespace and `;` that may turn out to be a separator, and emits everything else at once; so deltas
never hold part of a tag, and feeding a text in any pieces gives the same events as feeding it whole
(up to how the deltas are split: compare with `coalesce`). What does not fit the grammar is dropped
and counted, and `finish` reports it in `End.problems` (and a `Notice` per kind of drop).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from speechgpt_app.events import END_REASONS, Answer, End, EndReason, Event, Heard, Notice, Units
from speechgpt_app.prompt import ANSWER_TAG, EOA, HEARD_TAG, UNITS_TAG
from speechgpt_app.units import EOSP, SOSP

State = Literal["heard", "answer", "units", "done"]

_TAGS = (HEARD_TAG, ANSWER_TAG, UNITS_TAG, SOSP, EOSP, EOA)
MAX_UNIT_DIGITS = 7  # "<1234567>" is still read as a unit (and dropped as out of range); longer is junk
MAX_OTHER_TOKEN = 16  # characters between "<" and ">" of an unknown token inside a unit span
_UNIT = re.compile(rf"<(0|[1-9][0-9]{{0,{MAX_UNIT_DIGITS - 1}}})>")
_UNIT_PREFIX = re.compile(rf"<(?:0|[1-9][0-9]{{0,{MAX_UNIT_DIGITS - 1}}})?")
_OTHER = re.compile(rf"<[^<>\s]{{1,{MAX_OTHER_TOKEN}}}>")
_OTHER_PREFIX = re.compile(rf"<[^<>\s]{{0,{MAX_OTHER_TOKEN}}}")
_TEXT_RUN = re.compile(r"[^\s;\[<]+")  # stops where a lexeme of another kind may start

# Lexeme kinds besides the tags themselves.
_WS, _SEMI, _TEXT, _UNIT_TOKEN, _OTHER_TOKEN = "ws", ";", "text", "unit", "other"

# Internal stages; `ChainParser.state` reports the last four as "units".
_HEARD, _ANSWER, _UA, _SPAN, _AFTER, _DONE = "heard", "answer", "ua", "span", "after", "done"
_PUBLIC_STATE: dict[str, State] = {
    _HEARD: "heard",
    _ANSWER: "answer",
    _UA: "units",
    _SPAN: "units",
    _AFTER: "units",
    _DONE: "done",
}
_REPORT_MISSING_EOA = ("eos", "max_tokens")  # a cancelled or failed turn is not the model's fault


@dataclass(frozen=True)
class _Lexeme:
    kind: str  # a tag string, or one of _WS, _SEMI, _TEXT, _UNIT_TOKEN, _OTHER_TOKEN
    text: str
    unit: int = -1  # the id of a unit token


def _next_lexeme(buf: str, eof: bool, in_units: bool) -> _Lexeme | None:
    """The lexeme at the start of `buf`, or None if more text could still change it.

    `in_units` also reads unknown `<x>` tokens as one lexeme (inside a unit span they are counted as
    tokens; elsewhere a `<` that starts no tag is plain text).
    """
    c = buf[0]
    if c.isspace():  # never held: the grammar treats split whitespace runs like one
        return _Lexeme(_WS, buf[: len(buf) - len(buf.lstrip())])
    if c == ";":
        return _Lexeme(_SEMI, c)
    if c in "[<":
        for tag in _TAGS:
            if buf.startswith(tag):
                return _Lexeme(tag, tag)
        if (m := _UNIT.match(buf)) is not None:
            return _Lexeme(_UNIT_TOKEN, m.group(), int(m.group(1)))
        if in_units and (m := _OTHER.match(buf)) is not None:
            return _Lexeme(_OTHER_TOKEN, m.group())
        could_grow = (
            any(tag.startswith(buf) for tag in _TAGS)
            or _UNIT_PREFIX.fullmatch(buf) is not None
            or (in_units and _OTHER_PREFIX.fullmatch(buf) is not None)
        )
        return None if could_grow and not eof else _Lexeme(_TEXT, c)
    return _Lexeme(_TEXT, _TEXT_RUN.match(buf).group())


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


class ChainParser:
    """Incremental parser of one answer. Feed text deltas as they are decoded, then `finish` once.

    `n_units` is the speech vocabulary size: unit ids outside `0..n_units-1` are dropped.
    """

    def __init__(self, n_units: int) -> None:
        if n_units < 1:
            raise ValueError(f"the number of speech units must be at least 1, got {n_units}")
        self.n_units = n_units
        self._buf = ""  # text not yet cut into lexemes
        self._stage = _HEARD
        self._pending = ""  # whitespace and ';' that are either text or part of a separator
        self._section_started = False  # has the current text section (heard / answer) emitted text?
        self._seen_anything = False  # has any non-whitespace lexeme arrived? (`[tq]` must come first)
        self._blocks = 0  # unit spans opened; only the first one's units are kept
        self._finished = False
        self._after_eoa = 0  # characters after <eoa>, ignored
        self._after_eoa_blank = True  # ... and whether they were all whitespace (then not a problem)
        self._drops: Counter[str] = Counter()  # what was dropped or ignored, by kind
        self._misplaced: list[str] = []  # misplaced tags, distinct, in order of appearance
        self._flags: list[str] = []  # problems without a count, in order of appearance

    @property
    def done(self) -> bool:
        """True once `<eoa>` was seen: the rest is ignored."""
        return self._stage == _DONE

    @property
    def state(self) -> State:
        """Which part of the answer is being read: "heard", "answer", "units" or "done"."""
        return _PUBLIC_STATE[self._stage]

    def feed(self, text: str) -> list[Event]:
        """Parse the next decoded text delta; returns the events it completes (possibly none)."""
        if self._finished:
            raise RuntimeError("ChainParser.feed called after finish")
        return coalesce(self._run(text, eof=False))

    def finish(self, reason: EndReason) -> list[Event]:
        """Flush what was held back and end: Notices for what was dropped, then `End(reason, problems)`.

        `End.turn` stays None (the pipeline fills it).
        """
        if self._finished:
            raise RuntimeError("ChainParser.finish called twice")
        if reason not in END_REASONS:
            raise ValueError(f"unknown end reason {reason!r}; expected one of {', '.join(END_REASONS)}")
        events = self._run("", eof=True)
        self._finished = True
        if not self.done and reason in _REPORT_MISSING_EOA:
            self._flag(f"the answer ended without {EOA} (reason: {reason})")
        problems, notices = self._problems()
        return coalesce(events) + notices + [End(reason, tuple(problems))]

    # --- lexing -------------------------------------------------------------------------------------

    def _run(self, text: str, eof: bool) -> list[Event]:
        if self.done:
            self._ignore_after_eoa(text)
            return []
        self._buf += text
        events: list[Event] = []
        while self._buf and not self.done:
            lexeme = _next_lexeme(self._buf, eof, in_units=self._stage in (_UA, _SPAN))
            if lexeme is None:
                break
            self._buf = self._buf[len(lexeme.text) :]
            events.extend(self._step(lexeme))
        if self.done:
            self._ignore_after_eoa(self._buf)
            self._buf = ""
        return events

    def _ignore_after_eoa(self, text: str) -> None:
        self._after_eoa += len(text)
        self._after_eoa_blank = self._after_eoa_blank and not text.strip()

    # --- the grammar --------------------------------------------------------------------------------

    def _step(self, lx: _Lexeme) -> list[Event]:
        """Advance the grammar by one lexeme."""
        first = not self._seen_anything
        if lx.kind != _WS:
            self._seen_anything = True
        if self._stage in (_HEARD, _ANSWER):
            return self._step_text(lx, first)
        if lx.kind == EOA:
            if self._stage == _SPAN:
                self._flag(f"the unit span was not closed with {EOSP}")
            self._stage = _DONE
            return []
        if self._stage == _AFTER:
            return self._step_after_units(lx)
        return self._step_units(lx)

    def _step_text(self, lx: _Lexeme, first: bool) -> list[Event]:
        """Heard or answer text: emit text, hold whitespace and ';' until the next lexeme decides."""
        if lx.kind == _WS:
            if self._section_started or self._pending:  # leading whitespace of a section is spacing
                self._pending += lx.text
            return []
        if lx.kind == _SEMI:  # held: "; [ta]" is a separator, "; and" is text
            self._pending += lx.text
            return []
        if lx.kind == _TEXT:
            delta, self._pending, self._section_started = self._pending + lx.text, "", True
            return [Heard(delta) if self._stage == _HEARD else Answer(delta)]
        # Every other lexeme ends the section here, so the held whitespace and ';' were a separator.
        self._pending = ""
        if lx.kind == HEARD_TAG and first:
            return []
        if lx.kind == ANSWER_TAG and self._stage == _HEARD:
            self._stage, self._section_started = _ANSWER, False
        elif lx.kind == UNITS_TAG:
            self._stage = _UA
        elif lx.kind in (SOSP, _UNIT_TOKEN):
            self._stage = _UA
            return self._step_units(lx)
        elif lx.kind == EOA:
            self._stage = _DONE
        else:  # [tq] after the start, a second [ta], <eosp> outside a unit span
            self._misplace(lx.kind)
        return []

    def _step_units(self, lx: _Lexeme) -> list[Event]:
        """After `[ua]` (stage _UA) or inside `<sosp>...<eosp>` (stage _SPAN)."""
        kept = self._blocks <= 1
        if lx.kind == _WS:
            return []  # slow tokenizers write "<sosp> <661> <588>"
        if lx.kind == SOSP and self._stage == _UA:
            self._open_span()
            return []
        if lx.kind == _UNIT_TOKEN:
            if self._stage == _UA:
                self._open_span()
                kept = self._blocks <= 1
                if kept:
                    self._flag(f"the answer units began without {SOSP}")
            if not kept:
                self._drops["second_block"] += 1
            elif lx.unit >= self.n_units:
                self._drops["out_of_range"] += 1
            else:
                return [Units((lx.unit,))]
            return []
        if lx.kind == EOSP and self._stage == _SPAN:
            self._stage = _AFTER
        elif lx.kind in (_TEXT, _SEMI):
            self._drops["span_text"] += len(lx.text)
        elif lx.kind == _OTHER_TOKEN:
            self._drops["unknown_token"] += 1
        else:  # [tq], [ta], [ua] among the units, <sosp> twice, <eosp> before <sosp>
            self._misplace(lx.kind)
        return []

    def _step_after_units(self, lx: _Lexeme) -> list[Event]:
        """Between `<eosp>` and `<eoa>`: only whitespace belongs here; a new span is a second block."""
        if lx.kind in (UNITS_TAG, SOSP, _UNIT_TOKEN):
            self._stage = _UA
            return [] if lx.kind == UNITS_TAG else self._step_units(lx)
        if lx.kind in (_TEXT, _SEMI):
            self._drops["after_units"] += len(lx.text)
        elif lx.kind != _WS:
            self._misplace(lx.kind)
        return []

    def _open_span(self) -> None:
        self._stage = _SPAN
        self._blocks += 1

    def _misplace(self, tag: str) -> None:
        self._drops["misplaced_tag"] += 1
        if tag not in self._misplaced:
            self._misplaced.append(tag)

    def _flag(self, problem: str) -> None:
        if problem not in self._flags:
            self._flags.append(problem)

    # --- the report ---------------------------------------------------------------------------------

    def _problems(self) -> tuple[list[str], list[Notice]]:
        """Plain sentences with exact counts, and a Notice for each kind of thing dropped."""
        d = self._drops
        reports = (  # (count, notice kind, the sentence's verb, counted thing, where)
            (d["out_of_range"], "units_dropped", "dropped", "unit", f"outside the vocabulary (0-{self.n_units - 1})"),
            (d["unknown_token"], "units_dropped", "dropped", "unknown token", "inside the unit span"),
            (d["second_block"], "units_dropped", "dropped", "unit", "of a second unit block"),
            (d["span_text"], "text_dropped", "dropped", "character", "of text among the answer units"),
            (d["after_units"], "text_dropped", "ignored", "character", f"of text between {EOSP} and {EOA}"),
            (d["misplaced_tag"], "tags_ignored", "ignored", "misplaced tag", None),
            (0 if self._after_eoa_blank else self._after_eoa, "text_dropped", "ignored", "character", f"after {EOA}"),
        )
        dropped: list[tuple[str, str]] = []  # (notice kind, sentence)
        for count, kind, verb, thing, where in reports:
            if count:
                tail = f" {where}" if where is not None else f": {', '.join(self._misplaced)}"
                dropped.append((kind, f"{verb} {_count(count, thing)}{tail}"))
        problems = self._flags + [sentence for _, sentence in dropped]
        return problems, [Notice(kind, sentence) for kind, sentence in dropped]


def parse(text: str, n_units: int, reason: EndReason = "eoa") -> list[Event]:
    """Parse a whole answer at once: the same events as feeding it in pieces, coalesced."""
    parser = ChainParser(n_units)
    return coalesce(parser.feed(text) + parser.finish(reason))


def coalesce(events: Iterable[Event]) -> list[Event]:
    """Merge adjacent Heard/Heard, Answer/Answer and Units/Units events (the first one's `t_ms` is kept)."""
    out: list[Event] = []
    for event in events:
        last = out[-1] if out else None
        if isinstance(event, (Heard, Answer)) and type(last) is type(event):
            out[-1] = type(event)(last.text + event.text, last.t_ms)
        elif isinstance(event, Units) and isinstance(last, Units):
            out[-1] = Units(last.ids + event.ids, last.t_ms)
        else:
            out.append(event)
    return out
