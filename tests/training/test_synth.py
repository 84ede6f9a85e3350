"""Synthesis back-ends: the listed voices exist, speak 16 kHz mono, and other synthesisers plug in."""

from __future__ import annotations

import random
import subprocess

import numpy as np
import pytest

from speechgpt_app.audio import SAMPLE_RATE
from training.data import synth


def _listed(cmd: list[str]) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def test_listed_voices_are_the_binaries_own() -> None:
    espeak = _listed(["espeak-ng", "--voices=en"])
    variants = _listed(["espeak-ng", "--voices=variant"])
    for voice in synth.ESPEAK_VOICES:
        lang, _, variant = voice.partition("+")
        assert f" {lang} " in espeak, voice
        assert not variant or f"!v/{variant} " in variants, voice
    flite = _listed(["flite", "-lv"]).split(":", 1)[1].split()
    assert set(synth.FLITE_VOICES) <= set(flite)


@pytest.mark.parametrize("voice", [synth.Voice("espeak-ng", "en-us+f3"), synth.Voice("flite", "kal"), synth.Voice("flite", "slt")])
def test_builtin_backends_speak_16k_mono(voice: synth.Voice) -> None:
    wav = synth.synthesize("The cat sleeps on the warm chair.", voice)
    assert wav.dtype == np.float32 and wav.ndim == 1
    seconds = len(wav) / SAMPLE_RATE
    assert 0.8 < seconds < 6.0, seconds
    assert np.abs(wav).max() > 0.05  # speech, not silence


def test_voices_differ() -> None:
    a = synth.synthesize("Hello there.", synth.Voice("espeak-ng", "en-us"))
    b = synth.synthesize("Hello there.", synth.Voice("flite", "awb"))
    assert len(a) != len(b) or not np.allclose(a, b)


def test_text_starting_with_a_dash_is_spoken_not_parsed_as_an_option() -> None:
    wav = synth.synthesize("-v is not an option here.", synth.Voice("espeak-ng", "en-gb"))
    assert len(wav) / SAMPLE_RATE > 0.8


def test_callable_backend_is_resampled_and_registered() -> None:
    def tone(text: str, voice: str) -> tuple[np.ndarray, int]:
        t = np.arange(int(0.05 * len(text) * 8000)) / 8000
        return (0.3 * np.sin(2 * np.pi * float(voice) * t)).astype(np.float32), 8000

    synth.register(synth.CallableSynth("test-tone", tone, ("220", "440")))
    try:
        assert "test-tone" in synth.backends()
        wav = synth.synthesize("twenty chars of text", synth.Voice("test-tone", "440"))
        assert abs(len(wav) - 16_000) <= 2  # 1 s at 8 kHz -> 16,000 samples at 16 kHz
        pool = synth.all_voices(["espeak-ng", "test-tone"])
        assert synth.Voice("test-tone", "220") in pool and len(pool) == len(synth.ESPEAK_VOICES) + 2
    finally:
        synth._REGISTRY.pop("test-tone")


def test_command_template_backend(tmp_path) -> None:
    sox = synth.CommandSynth("sox-tone", ("sox", "-n", "-r", "22050", "{out}", "synth", "0.5", "sine", "{voice}"), ("330",))
    wav = sox.synthesize("ignored", "330")
    assert abs(len(wav) - 8000) <= 2


def test_failures_are_typed() -> None:
    with pytest.raises(synth.SynthError, match="unknown synthesiser"):
        synth.get("nope")
    with pytest.raises(synth.SynthError, match="no voice 'no-such-voice'"):
        synth.synthesize("hello", synth.Voice("espeak-ng", "no-such-voice"))
    with pytest.raises(synth.SynthError, match="failed with code 1"):
        synth.CommandSynth("broken", ("false", "{out}"), ("v",)).synthesize("hi", "v")
    with pytest.raises(synth.SynthError, match="not installed"):
        synth.CommandSynth("ghost", ("no-such-binary-xyz", "{out}"), ("v",)).synthesize("hi", "v")
    with pytest.raises(synth.SynthError, match="empty"):
        synth.synthesize("  ", synth.Voice("flite", "kal"))
    with pytest.raises(ValueError, match="no voices"):
        synth.register(synth.CallableSynth("mute", lambda t, v: (np.zeros(1), 16000), ()))


def test_pick_voice_is_seeded_and_covers_both_backends() -> None:
    picks = [synth.pick_voice(("espeak-ng", "flite"), random.Random(f"0:{i}")) for i in range(200)]
    again = [synth.pick_voice(("espeak-ng", "flite"), random.Random(f"0:{i}")) for i in range(200)]
    assert picks == again
    assert {p.backend for p in picks} == {"espeak-ng", "flite"}
