"""SpeechInstruct-mini records for the three stages, written with prompt.py exactly as the app prompts.

    python -m training.mini.records --corpus runs/mini/corpus --speech-dir runs/mini/speech --out runs/mini/data

- `units.jsonl`: the units of every recording of the corpus (read once by the trained encoder);
- `text.txt`: the domain's knowledge as plain text for stage 0's text pretraining (what LLaMA brings to
  the 7B recipe): every training question and conversation, and the background arithmetic beyond the
  spoken domain (domain.background_arithmetic), as the chain writes its text part
  (`question; [ta] answer<eoa>`), TEXT_COPIES times in shuffled order (stages 1 and 2 replay it);
- `stage1.txt`: one unit line per training recording (questions, and answers in the output voice);
- every spoken question is heard twice: its units, and a noisy copy (NOISE_* rates);
- `stage2.jsonl`: ASR records (question units -> transcript) and TTS records (text -> the output voice's
  units), half of them in the app's own instruction words, the rest in `tasks.py`'s descriptions, and
  typed chat records (question -> text answer, one- and two-turn), so the text knowledge of stage 0
  meets the chat format with every weight trainable;
- `stage3.jsonl`: chain-of-modality records in the app's `explicit` style: every training recording
  speech -> speech, a share speech -> text, typed questions (as people type them: capitalised, with a
  question mark) -> text and speech, and two-turn conversations whose history is the first turn
  exactly as the app keeps it (the spoken question's units, the full answer with its units), and a
  share (TASK_SHARE) of stage 2's records.
Held-out questions never appear.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from collections import defaultdict
from pathlib import Path

import torch

from speechgpt_app import prompt
from speechgpt_app.audio import AudioLimits, load_audio
from speechgpt_app.units import SpeechTokenizer, units_to_text
from training.data.formats import Record, record_line
from training.data.tasks import pick_task
from training.mini import domain

log = logging.getLogger(__name__)

APP_SHARE = 0.5  # stage-2 records in the app's own instruction words
S2T_SHARE = 0.35  # training recordings that also give a speech -> text record
TYPED_SHARE = 0.25  # questions that also give typed (t2s, t2t) records
TASK_SHARE = 0.15  # stage-2 (ASR, TTS) records mixed into stage 3, so the LoRA keeps the app's other two tasks
# The encoder hears its own training recordings better (PER about 3%) than new ones (about 10%): the
# language model also learns from a noisy copy of every spoken question, so new recordings' unit errors
# are familiar to it. Rates per unit.
NOISE_DELETE, NOISE_SUBSTITUTE, NOISE_INSERT = 0.03, 0.03, 0.02
SEED = 7
# Stage 0's text corpus: each training question and conversation this many times (shuffled, so packed
# blocks differ between copies). A text-only probe of the shipped shape answered 77% of held-out
# questions after about 30 presentations of each and 9% after 2-3.
TEXT_COPIES = 8


def read_manifest(path: Path) -> list[dict]:
    """The lines of a corpus manifest."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def extract_units(corpus: Path, speech_dir: Path, out: Path, threads: int = 2) -> dict[str, list[int]]:
    """Units of every recording in the corpus' manifests, cached in `out` (audio path -> units)."""
    cache: dict[str, list[int]] = {}
    if out.is_file():
        cache = {d["audio"]: d["units"] for d in map(json.loads, out.read_text(encoding="utf-8").splitlines())}
    torch.set_num_threads(threads)
    speech = SpeechTokenizer.from_dir(speech_dir)
    with out.open("a", encoding="utf-8") as f:
        for part in ("questions", "answers", "heldout"):
            for entry in read_manifest(corpus / f"{part}.jsonl"):
                if entry["audio"] in cache:
                    continue
                wav = load_audio(str(corpus / entry["audio"]), limits=AudioLimits(max_seconds=30))
                cache[entry["audio"]] = speech.encode(wav)
                f.write(json.dumps({"audio": entry["audio"], "units": cache[entry["audio"]]}) + "\n")
    return cache


def typed(text: str, rng: random.Random) -> str:
    """A question as a person types it: sometimes capitalised, sometimes with a question mark."""
    if rng.random() < 0.5:
        text = text[0].upper() + text[1:]
    return text + ("?" if rng.random() < 0.5 else "")


def noisy(units: list[int], n_units: int, rng: random.Random) -> list[int]:
    """A copy of `units` with random deletions, substitutions and insertions (NOISE_* rates per unit)."""
    out: list[int] = []
    for u in units:
        r = rng.random()
        if r < NOISE_DELETE:
            continue
        out.append(rng.randrange(n_units) if r < NOISE_DELETE + NOISE_SUBSTITUTE else u)
        if rng.random() < NOISE_INSERT:
            out.append(rng.randrange(n_units))
    return out or list(units)


def _rec(user: str, answer: str, history: tuple[prompt.Turn, ...] = (), **extra) -> str:
    prefix = prompt.SYSTEM_PROMPT + prompt.format_history(history)
    return record_line(Record(prefix, prompt.format_exchange(user, answer)), **extra)


def spoken_turn(q_units: list[int], q: domain.Question, a_units: list[int]) -> tuple[str, str]:
    """(user, answer) of a speech -> speech turn, as the app writes it."""
    user = prompt.user_message("chat", "speech+text", units=units_to_text(q_units), style="explicit")
    return user, prompt.format_answer(heard=q.text, answer=q.answer, units=a_units)


def build(corpus: Path, units: dict[str, list[int]], out: Path, n_units: int) -> dict[str, int]:
    """Write stage1.txt, stage2.jsonl and stage3.jsonl; return how many lines each has."""
    rng = random.Random(SEED)
    heard: dict[str, list[tuple[list[int], str]]] = defaultdict(list)  # question text -> (units, voice)
    for e in read_manifest(corpus / "questions.jsonl"):
        if units[e["audio"]]:
            heard[e["text"]].append((units[e["audio"]], e["voice"]))
    # What the language model hears: every recording's units, and a noisy copy of them.
    said = {text: recs + [(noisy(u, n_units, rng), v) for u, v in recs] for text, recs in heard.items()}
    train, _ = domain.split()
    conv_train, _ = domain.split_conversations()
    # The output voice speaks every answer (the evaluation's references need the held-out ones), but
    # training hears only the texts of training questions and answers: a held-out sum said in a TTS
    # record or a unit line would teach the fact it is meant to test.
    allowed = {q.answer for q in train} | {q.text for q in train}
    allowed |= {t for c in conv_train for t in (c.first.answer, c.follow.text, c.follow.answer)}
    spoken = {e["text"]: units[e["audio"]] for e in read_manifest(corpus / "answers.jsonl")
              if units[e["audio"]] and e["text"] in allowed}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)

    knowledge = [prompt.format_answer(heard=q.text, answer=q.answer) for q in train + domain.background_arithmetic()]
    knowledge += [prompt.format_answer(heard=c.first.text, answer=c.first.answer) + " "
                  + prompt.format_answer(heard=c.follow.text, answer=c.follow.answer) for c in conv_train]  # fmt: skip
    knowledge = [line for _ in range(TEXT_COPIES) for line in knowledge]
    rng.shuffle(knowledge)
    (out / "text.txt").write_text("\n".join(knowledge) + "\n", encoding="utf-8")

    stage1 = [units_to_text(u) for recs in heard.values() for u, _ in recs] + [units_to_text(u) for u in spoken.values()]
    rng.shuffle(stage1)
    (out / "stage1.txt").write_text("\n".join(stage1) + "\n", encoding="utf-8")

    stage2 = []
    for text, recs in said.items():
        for u, _ in recs:
            app = rng.random() < APP_SHARE
            user = (prompt.user_message("transcribe", units=units_to_text(u)) if app
                    else pick_task("asr", rng) + prompt.INPUT_MARKER + units_to_text(u))  # fmt: skip
            stage2.append(_rec(user, prompt.format_answer(heard=text)))
    for text, u in spoken.items():
        for shown in {text, typed(text, rng)}:
            app = rng.random() < APP_SHARE
            user = prompt.user_message("speak", text=shown) if app else pick_task("tts", rng) + prompt.INPUT_MARKER + shown
            stage2.append(_rec(user, prompt.format_answer(units=u)))
    stage2 += typed_text_records(train, conv_train, rng)
    rng.shuffle(stage2)
    (out / "stage2.jsonl").write_text("\n".join(stage2) + "\n", encoding="utf-8")

    stage3 = []
    for q in train:
        a_units = spoken.get(q.answer)
        if not a_units:
            continue
        for u, voice in said.get(q.text, []):
            stage3.append(_rec(*spoken_turn(u, q, a_units), voice=voice))
            if rng.random() < S2T_SHARE:
                user = prompt.user_message("chat", "text", units=units_to_text(u), style="explicit")
                stage3.append(_rec(user, prompt.format_answer(heard=q.text, answer=q.answer), voice=voice))
        if rng.random() < TYPED_SHARE:
            for output, a in (("text", None), ("speech+text", a_units)):
                user = prompt.user_message("chat", output, text=typed(q.text, rng), style="explicit")
                stage3.append(_rec(user, prompt.format_answer(answer=q.answer, units=a)))
    for conv in conv_train:
        first_said, follow_said = said.get(conv.first.text), said.get(conv.follow.text)
        a1, a2 = spoken.get(conv.first.answer), spoken.get(conv.follow.answer)
        if not (first_said and follow_said and a1 and a2):
            continue
        for _ in range(2):
            u1, _v = rng.choice(first_said)
            u2, voice = rng.choice(follow_said)
            user1, answer1 = spoken_turn(u1, conv.first, a1)
            history = (prompt.Turn(user1, answer1, heard=conv.first.text),)
            stage3.append(_rec(*spoken_turn(u2, conv.follow, a2), history=history, voice=voice))
    stage3 += rng.sample(stage2, round(TASK_SHARE * len(stage3)))
    rng.shuffle(stage3)
    (out / "stage3.jsonl").write_text("\n".join(stage3) + "\n", encoding="utf-8")
    return {"text": len(knowledge), "stage1": len(stage1), "stage2": len(stage2), "stage3": len(stage3)}


def typed_text_records(
    train: list[domain.Question], conversations: list[domain.Conversation], rng: random.Random
) -> list[str]:
    """Typed question -> text answer records as the app prompts them: every training question, and
    every training conversation's follow-up with its typed first turn in the history."""
    def turn(q: domain.Question) -> tuple[str, str]:
        return prompt.user_message("chat", "text", text=typed(q.text, rng), style="explicit"), prompt.format_answer(
            answer=q.answer
        )

    records = [_rec(*turn(q)) for q in train]
    for conv in conversations:
        history = (prompt.Turn(*turn(conv.first)),)
        records.append(_rec(*turn(conv.follow), history=history))
    return records


TRAINING_VOICES_GROUP = "training voices"
HELDOUT_VOICE_GROUP = "held-out voice (Piper joe)"
CI_GROUP = "CI subset (training voices)"
CI_SUBSET = 64


def write_eval_sets(corpus: Path, out: Path) -> dict[str, int]:
    """Evaluation sets (speechgpt_app.evaluate's format) of held-out questions in `out`:
    `heldout-training-voices.jsonl`, `heldout-joe.jsonl` and `followups.jsonl` (held-out conversations:
    the first question, then the follow-up, both by training voices)."""
    by_text = {q.text: q for q in domain.questions()}
    answer_audio = {e["text"]: "../" + e["audio"] for e in read_manifest(corpus / "answers.jsonl")}
    heldout = read_manifest(corpus / "heldout.jsonl")
    recordings: dict[str, list[dict]] = defaultdict(list)
    for e in read_manifest(corpus / "questions.jsonl") + heldout:
        if not e["voice"].startswith("piper:"):
            recordings[e["text"]].append(e)

    def line(e: dict, q: domain.Question, group: str) -> dict:
        return {"audio": "../" + e["audio"], "text": q.text, "answer": q.answer, "key": q.key, "kind": q.kind,
                "group": group, "voice": e["voice"], "answer_audio": answer_audio.get(q.answer)}  # fmt: skip

    sets: dict[str, list[dict]] = {"heldout-training-voices": [], "heldout-joe": [], "followups": []}
    for e in heldout:
        q = by_text.get(e["text"])
        if q is None:
            continue
        joe = e["voice"].startswith("piper:")
        sets["heldout-joe" if joe else "heldout-training-voices"].append(
            line(e, q, HELDOUT_VOICE_GROUP if joe else TRAINING_VOICES_GROUP)
        )
    _, held_convs = domain.split_conversations()
    for conv in held_convs:
        first, follow = recordings.get(conv.first.text), recordings.get(conv.follow.text)
        if first and follow:
            row = line(follow[0], conv.follow, TRAINING_VOICES_GROUP)
            row["history"] = [{k: v for k, v in line(first[0], conv.first, TRAINING_VOICES_GROUP).items() if k != "group"}]
            sets["followups"].append(row)
    # The fixed subset CI evaluates (its audio is copied into the repository by `rebuild --install`):
    # every kind, held-out questions by training voices.
    pool = sorted(sets["heldout-training-voices"], key=lambda r: (r["kind"], r["text"]))
    by_kind: dict[str, list[dict]] = defaultdict(list)
    for r in pool:
        by_kind[r["kind"]].append(r)
    subset: list[dict] = []
    while len(subset) < CI_SUBSET and any(by_kind.values()):
        for kind in sorted(by_kind):
            if by_kind[kind] and len(subset) < CI_SUBSET:
                subset.append({**by_kind[kind].pop(0), "group": CI_GROUP})
    sets["ci-subset"] = subset
    shuffle = random.Random(SEED)
    for name in ("heldout-training-voices", "heldout-joe", "followups"):
        shuffle.shuffle(sets[name])  # any prefix (eval --limit N) mixes every kind
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in sets.items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return {name: len(rows) for name, rows in sets.items()}


def main(argv: list[str] | None = None) -> None:
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", type=Path, default=Path("runs/mini/corpus"))
    p.add_argument("--speech-dir", type=Path, default=Path("runs/mini/speech"))
    p.add_argument("--out", type=Path, default=Path("runs/mini/data"))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    units = extract_units(args.corpus, args.speech_dir, args.out / "units.jsonl", args.threads)
    n_units = SpeechTokenizer.from_dir(args.speech_dir).config.n_units
    print(json.dumps(build(args.corpus, units, args.out, n_units)))
    print(json.dumps(write_eval_sets(args.corpus, args.corpus / "eval")))


if __name__ == "__main__":
    main()
