"""Speak SpeechInstruct-mini: every utterance the recipe needs, as 16 kHz FLAC files with manifests.

Parts (each `runs/mini/corpus/<part>.jsonl`, one `{"audio", "text", "voice", "augmented"}` line per file):
- `questions`: training questions, by training voices (espeak-ng voices and variants, flite, Festival),
  most of them augmented (tempo, pitch, equaliser, reverberation, noise);
- `answers`: every answer text (and every question text, for TTS records) by the output voice;
- `heldout`: held-out questions by a training voice, clean, and by the held-out Piper voice (`joe`).
Files are named by what they hold, so a rerun skips what exists and an interrupted run continues.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import soundfile as sf

from speechgpt_app.audio import SAMPLE_RATE
from training.data import augment, synth
from training.mini import domain

log = logging.getLogger(__name__)

TRAIN_VOICES: tuple[synth.Voice, ...] = (
    *(synth.Voice("espeak-ng", v) for v in synth.ESPEAK_ALL_VOICES),
    *(synth.Voice("flite", v) for v in ("kal", "kal16", "awb", "rms", "slt")),
    *(synth.Voice("festival", v) for v in synth.FESTIVAL_VOICES),
)
OUTPUT_VOICE = synth.Voice("flite", "slt")  # the one voice the unit vocoder speaks
HELDOUT_VOICE = synth.Voice("piper", "en_US-joe-medium")
CLEAN_SHARE = 0.3  # training question files left unaugmented
# Countries, opposites, spelled words, days and months each occur in a handful of questions, while
# number words occur in thousands: with two voices per question the model confused them ("kenya" heard
# as "cuba"). Their questions get this many more voices, drawn after every other file so the names
# (and so the finished files) of the rest stay the same.
RARE_WORD_KINDS = ("capital", "opposite", "spelling", "calendar")
RARE_WORD_EXTRA_VOICES = 4
SEED = 20260


@dataclass(frozen=True)
class Job:
    """One file to speak."""

    part: str
    text: str
    voice: synth.Voice
    augmented: bool
    seed: int

    @property
    def name(self) -> str:
        key = f"{self.part}|{self.text}|{self.voice.backend}:{self.voice.name}|{self.augmented}|{self.seed}"
        return hashlib.sha1(key.encode()).hexdigest()[:16] + ".flac"


def _pick(rng: random.Random) -> synth.Voice:
    """A training voice: a back-end first (equally likely), then one of its voices."""
    backend = rng.choice(("espeak-ng", "flite", "festival"))
    return rng.choice([v for v in TRAIN_VOICES if v.backend == backend])


def question_texts() -> tuple[list[str], list[str]]:
    """(training, held-out) question texts, follow-ups included, each once."""
    train, held = domain.split()
    conv_train, conv_held = domain.split_conversations()
    tr = [q.text for q in train] + sorted({c.follow.text for c in conv_train})
    ho = [q.text for q in held] + sorted({c.follow.text for c in conv_held} - set(tr))
    return list(dict.fromkeys(tr)), list(dict.fromkeys(ho))


def jobs(part: str, voices_per_question: int = 2) -> Iterator[Job]:
    """The files of one part, in a fixed order."""
    rng = random.Random(f"{SEED}:{part}")
    train, held = question_texts()
    if part == "questions":
        for text in train:
            n = 1 if text.startswith(("what is", "how much", "what do you get", "tell me")) and any(
                op in text for op in (" plus ", " minus ", " times ", " add ", " take ", " multiply ")
            ) else voices_per_question  # arithmetic has four phrasings per pair already
            if text.startswith("and "):
                n = 8  # few follow-up texts, each heard in many conversations
            for _ in range(n):
                yield Job(part, text, _pick(rng), rng.random() >= CLEAN_SHARE, rng.randrange(2**31))
    elif part == "answers":
        qs = domain.questions() + [c.follow for c in domain.conversations()]
        texts = list(dict.fromkeys([q.answer for q in qs] + train))
        for text in texts:
            yield Job(part, text, OUTPUT_VOICE, False, 0)
    elif part == "heldout":
        for text in held:
            yield Job(part, text, _pick(rng), False, 0)
            yield Job(part, text, HELDOUT_VOICE, False, 0)
    else:
        raise ValueError(f"unknown part {part!r}: questions, answers or heldout")


def rare_word_jobs(part: str) -> Iterator[Job]:
    """The extra voices of RARE_WORD_KINDS' training questions (none for other parts), from their own
    seeded draw: the files of `jobs` keep their names."""
    if part != "questions":
        return
    rare = {q.text for q in domain.questions() if q.kind in RARE_WORD_KINDS}
    extra = random.Random(f"{SEED}:{part}:rare")
    for text in (t for t in question_texts()[0] if t in rare):
        for _ in range(RARE_WORD_EXTRA_VOICES):
            yield Job(part, text, _pick(extra), extra.random() >= CLEAN_SHARE, extra.randrange(2**31))


_IMPULSES: list[np.ndarray] = []


def _init(impulse_dir: str) -> None:
    """A synthesis worker: every espeak-ng variant (registered here, not at import, so that importing
    this module changes no other code's voices) and the room impulses."""
    synth.register(synth.ESPEAK_MANY)
    _IMPULSES.extend(augment.load_impulses(augment.fetch_impulses(impulse_dir)))


def speak_job(job: Job, audio_dir: str) -> dict | None:
    """Speak one job into `audio_dir` (skipped when the file exists); its manifest line, or None on failure."""
    path = Path(audio_dir) / job.name
    line = {"audio": f"audio/{job.name}", "text": job.text, "voice": f"{job.voice.backend}:{job.voice.name}",
            "augmented": job.augmented}  # fmt: skip
    if path.is_file():
        return line
    try:
        wav = synth.synthesize(job.text, job.voice)
        if job.augmented:
            wav = augment.augment(wav, random.Random(job.seed), _IMPULSES)
    except Exception as e:  # one failed utterance is logged; the corpus goes on
        log.warning("could not speak %r with %s: %s", job.text, line["voice"], e)
        return None
    tmp = path.with_suffix(".tmp.flac")
    sf.write(str(tmp), wav, SAMPLE_RATE, subtype="PCM_16")
    tmp.rename(path)
    return line


def speak_part(part: str, out_dir: Path, workers: int, limit: int | None = None) -> Path:
    """Speak every job of `part` (or its first `limit`) and write `<out_dir>/<part>.jsonl`."""
    audio_dir = out_dir / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    todo, extra = list(jobs(part)), list(rare_word_jobs(part))
    # Any prefix (a short run, a partial corpus) mixes every kind and voice; the extra voices come last,
    # so a short run speaks the same files as before they existed.
    random.Random(SEED).shuffle(todo)
    random.Random(SEED).shuffle(extra)
    todo = (todo + extra)[:limit]
    manifest = out_dir / f"{part}.jsonl"
    done = 0
    with Pool(workers, initializer=_init, initargs=(str(out_dir / "impulses"),)) as pool:
        with manifest.with_suffix(".tmp").open("w", encoding="utf-8") as f:
            for line in pool.imap(partial(speak_job, audio_dir=str(audio_dir)), todo, chunksize=8):
                done += 1
                if line is not None:
                    f.write(json.dumps(line) + "\n")
                if done % 500 == 0:
                    log.info("%s: %d/%d", part, done, len(todo))
    manifest.with_suffix(".tmp").rename(manifest)
    return manifest


def main(argv: list[str] | None = None) -> None:
    """`python -m training.mini.speak PART [--out DIR] [--workers N] [--limit N]`."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("part", choices=("questions", "answers", "heldout"))
    p.add_argument("--out", type=Path, default=Path("runs/mini/corpus"))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--limit", type=int, default=None, help="only the first N files (a short run)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    print(speak_part(args.part, args.out, args.workers, args.limit))


if __name__ == "__main__":
    main()
