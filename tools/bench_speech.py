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
from speechgpt_app.vocoder import CodeHiFiGAN, Vocoder, VocoderConfig

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "samples" / "LJ050-0131.wav"
# The released vocoder's network (REFERENCE.md section 5).
RELEASED_VOCODER = {
    "resblock": "1",
    "upsample_rates": [5, 4, 4, 2, 2],
    "upsample_kernel_sizes": [11, 8, 8, 4, 4],
    "upsample_initial_channel": 512,
    "resblock_kernel_sizes": [3, 7, 11],
    "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
    "num_embeddings": 1000,
    "embedding_dim": 128,
    "model_in_dim": 128,
    "dur_predictor_params": {"encoder_embed_dim": 128, "var_pred_hidden_dim": 128, "var_pred_kernel_size": 3,
                             "var_pred_dropout": 0.5},
    "sampling_rate": 16000,
    "code_hop_size": 320,
}
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
    ids = np.random.default_rng(seed).integers(0, N_UNITS, frames).tolist()  # durations are >= 1 frame
    ends = np.cumsum(vocoder.durations(ids))
    return ids[: int(np.searchsorted(ends, frames)) + 1]


def main() -> None:
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

    from transformers import HubertConfig, HubertModel

    wav = load_audio(SAMPLE)[: int(args.seconds * SAMPLE_RATE)]
    hubert = HubertModel(HubertConfig()).eval()  # base: 12 layers, 768 dims, 12 heads, FFN 3072
    tokenizer = SpeechTokenizer(
        SpeechConfig(n_units=N_UNITS, features={"type": "hubert", "layer": HUBERT_LAYER}),
        HubertFeatures(hubert, layer=HUBERT_LAYER),
        torch.randn(N_UNITS, 768),
    )
    ms = median_ms(lambda: tokenizer.encode(wav), args.runs)
    print(f"speech -> units  ({len(wav) / SAMPLE_RATE:.2f} s audio, HuBERT-base to layer 11 + 1000x768 k-means): "
          f"{ms:8.1f} ms")

    model = CodeHiFiGAN(VocoderConfig.from_dict(RELEASED_VOCODER))
    vocoder = Vocoder.from_state_dict(model.cfg, model.legacy_state_dict())
    params = sum(t.numel() for t in vocoder.model.parameters())
    ids = units_for(vocoder, args.seconds)
    audio_s = len(vocoder.decode(ids)) / vocoder.sample_rate

    def streamed(min_frames: int) -> None:
        stream = vocoder.stream(min_frames=min_frames)
        for i in range(0, len(ids), args.chunk_units):
            stream.push(ids[i : i + args.chunk_units])
        stream.flush()

    lookahead = vocoder.stream().lookahead
    print(f"units -> speech  ({len(ids)} units, {audio_s:.2f} s audio, {params / 1e6:.2f} M params, "
          f"context {vocoder.model.generator_context()} frames, lookahead {lookahead} units):")
    print(f"  whole utterance                               {median_ms(lambda: vocoder.decode(ids), args.runs):8.1f} ms")
    for min_frames in (1, 25, 50):
        ms = median_ms(lambda m=min_frames: streamed(m), args.runs)
        print(f"  streamed, {args.chunk_units} units per push, min_frames {min_frames:3d}     {ms:8.1f} ms")
    first = median_ms(lambda: vocoder.stream().push(ids[: args.chunk_units + lookahead]), args.runs)
    print(f"  first push of {args.chunk_units} + {lookahead} lookahead units              {first:8.1f} ms")


if __name__ == "__main__":
    main()
