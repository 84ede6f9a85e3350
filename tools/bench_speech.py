"""CPU time of the speech ends at the released sizes, with random weights.

    python tools/bench_speech.py [--seconds 5] [--runs 3] [--chunk-units 10] [--threads N]

Speech -> units: mHuBERT-base-sized HubertModel (12 layers, 768 dims, run to layer 11) on the
first `--seconds` of the real LJ Speech sample, then nearest of 1000x768 centres.
Units -> speech: the released unit HiFi-GAN config (~13.5 M parameters) on enough units for
`--seconds` of audio, decoded whole and pushed through the streaming decoder in chunks.
Prints the median wall-clock milliseconds of `--runs` runs (after one warm-up run).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from speechgpt_app.audio import SAMPLE_RATE, load_audio
from speechgpt_app.units import HubertFeatures, SpeechConfig, SpeechTokenizer
from speechgpt_app.vocoder import RELEASED_CONFIG, CodeHiFiGAN, Vocoder, VocoderConfig

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "samples" / "LJ050-0131.wav"
RELEASED_VOCODER = RELEASED_CONFIG  # the released vocoder's network (REFERENCE.md section 5)
N_UNITS = 1000
HUBERT_LAYER = 11


def median_ms(fn: Callable[[], object], runs: int) -> float:
    """Median wall-clock milliseconds of `runs` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def units_for(vocoder: Vocoder, seconds: float, seed: int = 0) -> list[int]:
    """Random units whose predicted durations add up to `seconds` of audio (to the frame)."""
    frames = round(seconds * vocoder.sample_rate / vocoder.hop)
    ids = np.random.default_rng(seed).integers(0, vocoder.n_units, frames).tolist()  # durations are >= 1 frame
    ends = np.cumsum(vocoder.durations(ids))
    return ids[: int(np.searchsorted(ends, frames)) + 1]


def hubert_tokenizer(config=None, device: str = "cpu") -> SpeechTokenizer:
    """A random HuBERT speech tokenizer (default: base, run to layer 11) with N_UNITS random centres."""
    from transformers import HubertConfig, HubertModel

    config = config or HubertConfig()  # base: 12 layers, 768 dims, 12 heads, FFN 3072
    layer = min(HUBERT_LAYER, config.num_hidden_layers)
    return SpeechTokenizer(
        SpeechConfig(n_units=N_UNITS, features={"type": "hubert", "layer": layer}),
        HubertFeatures(HubertModel(config).eval(), layer=layer, device=device),
        torch.randn(N_UNITS, config.hidden_size),
    )


def bench_units(tokenizer: SpeechTokenizer, wav: np.ndarray, runs: int) -> float:
    """Median milliseconds of speech -> units for `wav`."""
    return median_ms(lambda: tokenizer.encode(wav), runs)


def random_vocoder(config: dict = RELEASED_VOCODER, device: str = "cpu") -> Vocoder:
    """A unit HiFi-GAN with random weights (default: the released network), loaded as the app loads one."""
    model = CodeHiFiGAN(VocoderConfig.from_dict(config))
    return Vocoder.from_state_dict(model.cfg, model.legacy_state_dict(), device)


def bench_vocoder(vocoder: Vocoder, seconds: float, runs: int, chunk_units: int) -> dict:
    """Median milliseconds of units -> speech for `seconds` of audio: whole, streamed, first push."""
    ids = units_for(vocoder, seconds)

    def streamed(min_frames: int) -> None:
        stream = vocoder.stream(min_frames=min_frames)
        for i in range(0, len(ids), chunk_units):
            stream.push(ids[i : i + chunk_units])
        stream.flush()

    lookahead = vocoder.stream().lookahead
    return {
        "units": len(ids),
        "audio_s": len(vocoder.decode(ids)) / vocoder.sample_rate,
        "params_m": sum(t.numel() for t in vocoder.model.parameters()) / 1e6,
        "context_frames": vocoder.model.generator_context(),
        "lookahead_units": lookahead,
        "whole_ms": median_ms(lambda: vocoder.decode(ids), runs),
        "streamed_ms": {m: median_ms(lambda m=m: streamed(m), runs) for m in (1, 25, 50)},
        "first_push_ms": median_ms(lambda: vocoder.stream().push(ids[: chunk_units + lookahead]), runs),
    }


def main() -> None:
    """Print the machine, then the median CPU/GPU milliseconds of each speech stage."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--chunk-units", type=int, default=10, help="units per push when streaming")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    wav = load_audio(SAMPLE)[: int(args.seconds * SAMPLE_RATE)]
    ms = bench_units(hubert_tokenizer(), wav, args.runs)
    print(f"speech -> units  ({len(wav) / SAMPLE_RATE:.2f} s audio, HuBERT-base to layer 11 + 1000x768 k-means): "
          f"{ms:8.1f} ms")

    r = bench_vocoder(random_vocoder(), args.seconds, args.runs, args.chunk_units)
    print(f"units -> speech  ({r['units']} units, {r['audio_s']:.2f} s audio, {r['params_m']:.2f} M params, "
          f"context {r['context_frames']} frames, lookahead {r['lookahead_units']} units):")
    print(f"  whole utterance                               {r['whole_ms']:8.1f} ms")
    for min_frames, ms in r["streamed_ms"].items():
        print(f"  streamed, {args.chunk_units} units per push, min_frames {min_frames:3d}     {ms:8.1f} ms")
    print(f"  first push of {args.chunk_units} + {r['lookahead_units']} lookahead units              "
          f"{r['first_push_ms']:8.1f} ms")


if __name__ == "__main__":
    main()
