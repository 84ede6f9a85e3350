"""SpeechInstruct builder: manifests and instruction text -> stage-1 unit lines, stage-2/3 records.

    python -m training.data.build synth  --texts sentences.txt --out runs/tiny/corpus
    python -m training.data.build speech --corpus runs/tiny/corpus/manifest.jsonl --n-units 64 --out runs/tiny/speech
    python -m training.data.build stage1 --corpus C --speech-dir S --out units.txt
    python -m training.data.build stage2 --corpus C --speech-dir S --out stage2.jsonl
    python -m training.data.build stage3 --instructions I.jsonl --speech-dir S --out stage3.jsonl

A corpus C (`--corpus`, or its old name `--manifest`) is a JSONL manifest, a LibriSpeech or LibriLight
directory, or a Hub dataset `hf://ORG/NAME[@REVISION][/FOLDER-OR-GLOB]` (see corpora.py, FORMATS.md).

Every command is resumable: items are processed in a fixed order, each item's lines are appended
whole, and `<out>.progress` records how many items and bytes are done, so a killed build restarts
where it stopped without duplicates. Each item's random choices (task wording, voice, direction) come
from its own generator seeded by (seed, item index), so a resumed build writes what an unbroken one
would. Work runs in a process pool (one speech tokenizer per worker); `--workers 0` runs inline.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from training.data import synth
from training.data.corpora import Corpus, CorpusError, Utterance, open_corpus
from training.data.formats import DataFormatError, Record, record_line
from training.data.tasks import pick_task

log = logging.getLogger(__name__)

APP_INSTRUCTION_SHARE = 0.25  # stage-2 records that use the app's own ASR/TTS instruction verbatim
STAGE3_FORMATS = ("s2s", "s2t", "t2s", "t2t")  # speech/text question -> speech(+text)/text answer
DEFAULT_ANSWER_VOICE = "espeak-ng:en-us"  # one voice for answers: the vocoder speaks with one voice too
DEFAULT_MAX_CHARS = 400  # longer questions/answers are skipped: their units would not fit the block
KMEANS_MAX_FRAMES = 200_000  # frames sampled to fit the tiny speech tokenizer's centres
MAX_SECONDS = 3600.0  # corpus recordings (LibriLight) run far past the app's 20 s upload limit
PREFETCH_PER_WORKER = 4  # items in flight per worker: keeps the pool busy without reading a corpus ahead


class BuildError(RuntimeError):
    """An input the builder cannot use (missing file, missing transcript, unknown option)."""


class ItemSkipped(Exception):
    """One item cannot become a record (too long, bad audio); it is logged and the build goes on."""


# ---------------------------------------------------------------------------------------------------
# The resumable, ordered, parallel writer
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    """How much of an output file is done: items processed and bytes of whole lines written."""

    items: int = 0
    bytes: int = 0


def _progress_path(out: Path) -> Path:
    return out.with_name(out.name + ".progress")


def read_progress(out: Path) -> Progress:
    """The saved progress of `out`, or none; the output is cut back to the recorded bytes."""
    path = _progress_path(out)
    if not out.exists() or not path.exists():
        return Progress()
    p = Progress(**json.loads(path.read_text()))
    if out.stat().st_size < p.bytes:
        raise BuildError(f"{out} is shorter than its progress file says: delete both to rebuild")
    with out.open("r+b") as f:
        f.truncate(p.bytes)  # lines of an item whose progress was never recorded are written again
    return p


def _write_progress(out: Path, p: Progress) -> None:
    tmp = _progress_path(out).with_suffix(".tmp")
    tmp.write_text(json.dumps({"items": p.items, "bytes": p.bytes}))
    os.replace(tmp, _progress_path(out))  # atomic: a kill leaves the old or the new count


_WORKER: dict[str, Any] = {}


def _init_worker(speech_dir: str | None) -> None:
    """One speech tokenizer per worker process; one torch thread each (the pool gives the parallelism)."""
    import torch

    torch.set_num_threads(1)
    if speech_dir is not None:
        from speechgpt_app.units import SpeechTokenizer

        _WORKER["speech"] = SpeechTokenizer.from_dir(speech_dir)


def _safe(fn: Callable[[Any], list[str]], item: Any) -> tuple[list[str], str | None]:
    """Run one item in a worker; a skipped item returns its reason instead of lines."""
    try:
        return fn(item), None
    except ItemSkipped as e:
        return [], str(e)


def run_items(
    items: Sequence[Any] | Corpus,
    fn: Callable[[Any], list[str]],
    out: Path,
    speech_dir: str | None,
    workers: int,
    desc: str,
) -> Progress:
    """Apply `fn` to items[done:] in order and append its lines to `out`, recording progress per item.

    A Corpus is read lazily from the first item not done; `fn` gets (index, item)."""
    from tqdm import tqdm

    out.parent.mkdir(parents=True, exist_ok=True)
    progress = read_progress(out)
    rest = items.iter_from(progress.items) if isinstance(items, Corpus) else iter(items[progress.items :])
    todo = enumerate(rest, progress.items)
    skipped = 0
    with out.open("ab") as f, tqdm(total=len(items), initial=progress.items, desc=desc, unit="item") as bar:
        for lines, reason in _map(partial(_safe, fn), todo, speech_dir, workers):
            if reason is not None:
                skipped += 1
                log.warning("%s: skipped item %d: %s", desc, progress.items, reason)
            f.write("".join(line + "\n" for line in lines).encode("utf-8"))
            f.flush()
            progress = Progress(progress.items + 1, f.tell())
            _write_progress(out, progress)
            bar.update(1)
    if skipped:
        log.warning("%s: %d of %d items skipped", desc, skipped, len(items))
    return progress


def _map(fn: Callable, items: Iterator, speech_dir: str | None, workers: int) -> Iterator:
    """Ordered map, in a process pool unless workers == 0. At most PREFETCH_PER_WORKER items per worker
    are in flight (Executor.map would submit, and so read, the whole corpus at once)."""
    if workers == 0:
        _init_worker(speech_dir)
        yield from map(fn, items)
        return
    import multiprocessing as mp

    ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(speech_dir,)) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= workers * PREFETCH_PER_WORKER:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def item_rng(seed: int, index: int) -> random.Random:
    """The generator for item `index`: independent of how many items ran before (resume-safe)."""
    return random.Random(f"{seed}:{index}")


# ---------------------------------------------------------------------------------------------------
# Per-item work (runs in the workers)
# ---------------------------------------------------------------------------------------------------


def _units(wav: np.ndarray) -> list[int]:
    units = _WORKER["speech"].encode(wav)
    if not units:
        raise ItemSkipped("no speech units")
    return units


def _audio_units(utt: Utterance) -> list[int]:
    from speechgpt_app.audio import AudioError, AudioLimits, load_audio

    try:
        return _units(load_audio(utt.audio, limits=AudioLimits(max_seconds=MAX_SECONDS)))
    except (AudioError, OSError, ValueError) as e:
        raise ItemSkipped(f"{utt.key}: {e}") from e


def stage1_item(indexed: tuple[int, Utterance]) -> list[str]:
    """One unit line for one recording."""
    from speechgpt_app.units import units_to_text

    return [units_to_text(_audio_units(indexed[1]))]


def stage2_item(indexed: tuple[int, Utterance], seed: int, directions: tuple[str, ...], app_share: float) -> list[str]:
    """One ASR- or TTS-style record for one (audio, transcript) pair."""
    from speechgpt_app import prompt

    index, entry = indexed
    if not entry.text:  # a Hub dataset's text column may hold nulls
        raise ItemSkipped(f"{entry.key}: no transcript")
    rng = item_rng(seed, index)
    direction = rng.choice(directions)
    task = pick_task(direction, rng)
    use_app = rng.random() < app_share
    units = _audio_units(entry)
    unit_text = prompt.units_to_text(units)
    try:
        if direction == "asr":
            app_user = prompt.user_message("transcribe", units=unit_text)
            answer = prompt.format_answer(heard=entry.text)
        else:
            app_user = prompt.user_message("speak", text=entry.text)
            answer = prompt.format_answer(units=units)
    except prompt.PromptError as e:
        raise ItemSkipped(f"{entry.key}: {e}") from e
    user = app_user if use_app else task + prompt.INPUT_MARKER + (unit_text if direction == "asr" else entry.text)
    return [record_line(Record(prompt.SYSTEM_PROMPT, prompt.format_exchange(user, answer)))]


def _speak(text: str, voice: synth.Voice) -> list[int]:
    try:
        return _units(synth.synthesize(text, voice))
    except synth.SynthError as e:
        raise ItemSkipped(str(e)) from e


def stage3_item(
    indexed: tuple[int, dict],
    seed: int,
    formats: tuple[str, ...],
    backends: tuple[str, ...],
    answer_voice: synth.Voice | None,
    max_chars: int,
) -> list[str]:
    """Chain-of-modality records, one per format, for one instruction/response pair.

    Each user message carries the app's explicit output instruction, so the model learns which
    modality to answer in and the app's output modes ask for it the same way.
    """
    from speechgpt_app import prompt

    index, item = indexed
    rng = item_rng(seed, index)
    question, response = item["instruction"], item["response"]
    if len(question) > max_chars or len(response) > max_chars:
        raise ItemSkipped(f"longer than {max_chars} characters")
    q_voice = synth.pick_voice(backends, rng)
    a_voice = answer_voice or synth.pick_voice(backends, rng)
    q_units = _speak(question, q_voice) if {"s2s", "s2t"} & set(formats) else None
    a_units = _speak(response, a_voice) if {"s2s", "t2s"} & set(formats) else None
    lines = []
    try:
        for fmt in formats:
            spoken_q, spoken_a = fmt[0] == "s", fmt[2] == "s"
            user = prompt.user_message(
                "chat",
                "speech+text" if spoken_a else "text",
                units=prompt.units_to_text(q_units) if spoken_q else None,
                text=None if spoken_q else question,
                style="explicit",
            )
            answer = prompt.format_answer(
                heard=question if spoken_q else None, answer=response, units=a_units if spoken_a else None
            )
            record = Record(prompt.SYSTEM_PROMPT, prompt.format_exchange(user, answer))
            lines.append(record_line(record, voice=f"{q_voice.backend}:{q_voice.name}"))
    except prompt.PromptError as e:
        raise ItemSkipped(str(e)) from e
    return lines


def synth_item(indexed: tuple[int, str], seed: int, backends: tuple[str, ...], wav_dir: str) -> list[str]:
    """Speak one sentence with a seeded voice; write the wav and return its manifest line."""
    import soundfile as sf

    from speechgpt_app.audio import SAMPLE_RATE

    index, text = indexed
    voice = synth.pick_voice(backends, item_rng(seed, index))
    try:
        wav = synth.synthesize(text, voice)
    except synth.SynthError as e:
        raise ItemSkipped(str(e)) from e
    path = Path(wav_dir) / f"{index:08d}.wav"
    sf.write(path, wav, SAMPLE_RATE, subtype="PCM_16")
    return [json.dumps({"audio": f"wav/{path.name}", "text": text, "voice": f"{voice.backend}:{voice.name}"})]


# ---------------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------------


def _need(path: str | Path, what: str, hint: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise BuildError(f"{what} {path} does not exist; {hint}")
    return path


SPEECH_HINT = "build one with `python -m training.data.build speech` or pass a released speech dir"


def _corpus(source: str, need_text: bool) -> Corpus:
    """The corpus `source` names (corpora.open_corpus); stage 2 needs a transcript for every recording."""
    try:
        corpus = open_corpus(source)
    except CorpusError as e:
        raise BuildError(str(e)) from e
    if need_text and corpus.missing_text:
        raise BuildError(
            f"{source}: stage 2 needs (audio, transcript) pairs, a transcript for every recording; {corpus.missing_text}"
        )
    return corpus


def build_stage1(corpus: str, speech_dir: str, out: str, workers: int) -> Progress:
    """Unit lines of unlabelled audio (LibriLight in the reference) from any corpus (corpora.py)."""
    _need(speech_dir, "speech dir", SPEECH_HINT)
    return run_items(_corpus(corpus, False), stage1_item, Path(out), speech_dir, workers, "stage1")


def build_stage2(
    corpus: str,
    speech_dir: str,
    out: str,
    workers: int,
    seed: int,
    directions: Sequence[str] = ("asr", "tts"),
    app_share: float = APP_INSTRUCTION_SHARE,
) -> Progress:
    """One ASR- or TTS-style record per transcribed recording of `corpus` (corpora.py); `app_share` of
    them use the app's own instruction (prompt.user_message), the rest one of tasks.py's descriptions."""
    bad = sorted(set(directions) - {"asr", "tts"})
    if bad or not directions:
        raise BuildError(f"directions must be asr and/or tts, got {list(directions)}")
    if not 0.0 <= app_share <= 1.0:
        raise BuildError(f"app_share must be between 0 and 1, got {app_share}")
    _need(speech_dir, "speech dir", SPEECH_HINT)
    fn = partial(stage2_item, seed=seed, directions=tuple(directions), app_share=app_share)
    return run_items(_corpus(corpus, True), fn, Path(out), speech_dir, workers, "stage2")


def read_instructions(path: str) -> list[dict]:
    """`{"instruction": str, "response": str}` per line (e.g. converted from moss-002-sft-data)."""
    items = []
    with _need(path, "instruction file", "write JSONL lines {\"instruction\": ..., \"response\": ...}").open() as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                obj = json.loads(line)
                if not (isinstance(obj.get("instruction"), str) and isinstance(obj.get("response"), str)):
                    raise DataFormatError(f"{path}:{n}: needs string 'instruction' and 'response'")
                items.append({"instruction": obj["instruction"].strip(), "response": obj["response"].strip()})
    return items


def parse_voice(spec: str | None) -> synth.Voice | None:
    """'backend:voice' -> Voice (checked against the registry); None or '' -> draw per record."""
    if not spec:
        return None
    backend, _, name = spec.partition(":")
    if name not in synth.get(backend).voices:
        raise BuildError(f"{backend} has no voice {name!r}; voices: {', '.join(synth.get(backend).voices)}")
    return synth.Voice(backend, name)


def build_stage3(
    instructions: str,
    speech_dir: str,
    out: str,
    workers: int,
    seed: int,
    formats: Sequence[str] = STAGE3_FORMATS,
    backends: Sequence[str] = ("espeak-ng", "flite"),
    answer_voice: str | None = DEFAULT_ANSWER_VOICE,
    max_chars: int = DEFAULT_MAX_CHARS,
) -> Progress:
    """Chain-of-modality records: questions spoken by seeded voices, answers by `answer_voice`."""
    bad = sorted(set(formats) - set(STAGE3_FORMATS))
    if bad or not formats:
        raise BuildError(f"formats must be among {', '.join(STAGE3_FORMATS)}, got {list(formats)}")
    for b in backends:
        synth.get(b)
    _need(speech_dir, "speech dir", SPEECH_HINT)
    fn = partial(
        stage3_item,
        seed=seed,
        formats=tuple(formats),
        backends=tuple(backends),
        answer_voice=parse_voice(answer_voice),
        max_chars=max_chars,
    )
    return run_items(read_instructions(instructions), fn, Path(out), speech_dir, workers, "stage3")


def build_synth_corpus(texts: str, out_dir: str, workers: int, seed: int, backends: Sequence[str]) -> Path:
    """Speak each line of `texts` (seeded voices) into out_dir/wav/ and list them in out_dir/manifest.jsonl."""
    lines = [t.strip() for t in _need(texts, "text file", "one sentence per line").read_text().splitlines()]
    lines = [t for t in lines if t]
    wav_dir = Path(out_dir) / "wav"
    wav_dir.mkdir(parents=True, exist_ok=True)
    fn = partial(synth_item, seed=seed, backends=tuple(backends), wav_dir=str(wav_dir))
    out = Path(out_dir) / "manifest.jsonl"
    run_items(lines, fn, out, None, workers, "synth")
    return out


def fit_speech_dir(corpus: str, out: str, n_units: int, seed: int, max_frames: int = KMEANS_MAX_FRAMES) -> Path:
    """A `logmel` speech tokenizer whose centres are units.kmeans of the corpus audio's frames."""
    import torch

    from speechgpt_app.audio import AudioLimits, load_audio
    from speechgpt_app.units import SpeechConfig, SpeechTokenizer, extractor_from_config, kmeans

    config = SpeechConfig(n_units=n_units, features={"type": "logmel"})
    extractor = extractor_from_config(config, out)
    limits = AudioLimits(max_seconds=MAX_SECONDS)
    frames = np.concatenate(
        [extractor(torch.from_numpy(load_audio(u.audio, limits=limits))).numpy() for u in _corpus(corpus, False)]
    )
    if len(frames) > max_frames:  # a seeded sample keeps k-means time bounded on large corpora
        frames = frames[np.random.default_rng(seed).choice(len(frames), max_frames, replace=False)]
    centres = kmeans(torch.from_numpy(frames), n_units, seed=seed)
    SpeechTokenizer(config, extractor, centres).save(out)
    return Path(out)


CORPUS_HELP = "a JSONL manifest, a LibriSpeech/LibriLight directory, or hf://ORG/NAME[@REVISION][/FOLDER-OR-GLOB]"


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v for v in value.split(",") if v)


def main(argv: Iterable[str] | None = None) -> None:
    """Command-line entry point (see the module docstring)."""
    ap = argparse.ArgumentParser(prog="python -m training.data.build", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (0 = inline)")
    common.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("synth", parents=[common], help="speak a text file into a manifest")
    s.add_argument("--texts", required=True)
    s.add_argument("--out", required=True, help="corpus directory (wav/ + manifest.jsonl)")
    s.add_argument("--backends", type=_csv, default=("espeak-ng", "flite"))
    sp = sub.add_parser("speech", parents=[common], help="fit a logmel speech tokenizer (k-means)")
    sp.add_argument("--corpus", "--manifest", dest="corpus", required=True, help=CORPUS_HELP)
    sp.add_argument("--n-units", type=int, required=True)
    sp.add_argument("--out", required=True)
    for name in ("stage1", "stage2", "stage3"):
        p = sub.add_parser(name, parents=[common])
        p.add_argument("--speech-dir", required=True)
        p.add_argument("--out", required=True)
        if name == "stage3":
            p.add_argument("--instructions", required=True)
            p.add_argument("--formats", type=_csv, default=STAGE3_FORMATS)
            p.add_argument("--backends", type=_csv, default=("espeak-ng", "flite"))
            p.add_argument("--answer-voice", default=DEFAULT_ANSWER_VOICE, help="backend:voice, '' = draw per record")
            p.add_argument("--max-chars", type=int, default=DEFAULT_MAX_CHARS)
        else:
            p.add_argument("--corpus", "--manifest", dest="corpus", required=True, help=CORPUS_HELP)
        if name == "stage2":
            p.add_argument("--directions", type=_csv, default=("asr", "tts"))
            p.add_argument("--app-share", type=float, default=APP_INSTRUCTION_SHARE, help="records using the app's instruction")
    a = ap.parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if a.cmd == "synth":
            print(build_synth_corpus(a.texts, a.out, a.workers, a.seed, a.backends))
        elif a.cmd == "speech":
            print(fit_speech_dir(a.corpus, a.out, a.n_units, a.seed))
        elif a.cmd == "stage1":
            build_stage1(a.corpus, a.speech_dir, a.out, a.workers)
        elif a.cmd == "stage2":
            build_stage2(a.corpus, a.speech_dir, a.out, a.workers, a.seed, a.directions, a.app_share)
        else:
            build_stage3(
                a.instructions, a.speech_dir, a.out, a.workers, a.seed, a.formats, a.backends, a.answer_voice, a.max_chars
            )
    except (BuildError, CorpusError, DataFormatError, synth.SynthError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
