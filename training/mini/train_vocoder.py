"""Train SpeechGPT-tiny's unit vocoder on the output voice: units -> durations + log spectrogram.

    python -m training.mini.train_vocoder --corpus runs/mini/corpus/answers.jsonl --speech-dir runs/mini/speech \
        --out runs/mini/vocoder

Each recording of the output voice is read by the trained unit encoder: its per-frame CTC classes give
the units (greedy CTC) and their durations (each run of a unit's frames, with the blank frames between
two units split between them). The network (`spectral_vocoder.UnitSpectrogramNet`) learns the
durations (squared error of log frame counts) and, given the true durations, the log magnitude of the
recording (L1). A checkpoint is kept after every epoch; a rerun resumes.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from speechgpt_app.audio import AudioLimits, load_audio
from speechgpt_app.spectral_vocoder import LOG_FLOOR, SpectralConfig, SpectralVocoder, UnitSpectrogramNet
from speechgpt_app.units import SpeechTokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VocoderTrainConfig:
    """Settings of one vocoder training run."""

    corpus: Path
    speech_dir: Path
    out: Path
    minutes: float = 20.0
    batch: int = 16
    lr: float = 1e-3
    eval_items: int = 100
    threads: int = 2
    seed: int = 0


def segment(frame_classes: list[int], blank: int) -> tuple[list[int], list[int]]:
    """Per-frame CTC classes -> (units, frames per unit): repeats collapsed, blanks dropped, and
    each stretch of blank frames split between the units on either side (the first and last unit
    take the blanks before and after them)."""
    units: list[int] = []
    spans: list[list[int]] = []  # [first frame, last frame] of each unit's run
    for t, k in enumerate(frame_classes):
        if k == blank:
            continue
        if units and units[-1] == k and spans[-1][1] == t - 1:
            spans[-1][1] = t
        elif units and units[-1] == k and all(c == blank for c in frame_classes[spans[-1][1] + 1 : t]):
            spans[-1][1] = t  # a unit, blanks, the same unit: CTC reads one unit
        else:
            units.append(k)
            spans.append([t, t])
    if not units:
        return [], []
    bounds = [0] + [(spans[i][1] + 1 + spans[i + 1][0]) // 2 for i in range(len(spans) - 1)] + [len(frame_classes)]
    return units, [bounds[i + 1] - bounds[i] for i in range(len(units))]


def log_magnitude(wav: torch.Tensor, cfg: SpectralConfig, frames: int) -> torch.Tensor:
    """The training target: log |STFT| [frames * sub, bins] of `wav`, cut or padded to `frames` unit frames."""
    n = frames * cfg.unit_hop
    wav = torch.nn.functional.pad(wav[:n], (0, max(0, n - wav.shape[0])))
    spec = torch.stft(wav, cfg.n_fft, cfg.hop_length, window=torch.hann_window(cfg.n_fft), center=True, return_complex=True)
    return torch.log(spec.abs().clamp(min=LOG_FLOOR)).T[: frames * cfg.sub]


def _load(cfg: VocoderTrainConfig, speech: SpeechTokenizer, vcfg: SpectralConfig) -> list[tuple[list[int], list[int], torch.Tensor]]:
    items = []
    for line in cfg.corpus.read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        wav = load_audio(str(cfg.corpus.parent / entry["audio"]), limits=AudioLimits(max_seconds=30))
        classes = speech.encode_frames(wav)
        units, durs = segment(classes, speech.n_units)
        if units:
            items.append((units, durs, log_magnitude(torch.from_numpy(wav), vcfg, sum(durs))))
    return items


def _loss(net: UnitSpectrogramNet, item) -> tuple[torch.Tensor, torch.Tensor]:
    units, durs, target = item
    h, logd = net.encode(torch.tensor([units]))
    d = torch.tensor(durs)
    dur_loss = torch.nn.functional.mse_loss(logd[0], torch.log(d.float()))
    pred = net.spectrogram(h, d)[0]
    return torch.nn.functional.l1_loss(pred, target), dur_loss


def fit(cfg: VocoderTrainConfig) -> Path:
    """Train (resuming from `out/checkpoint.pt`) and write the vocoder directory to `cfg.out`."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    speech = SpeechTokenizer.from_dir(cfg.speech_dir)
    vcfg = SpectralConfig(num_embeddings=speech.n_units)
    items = _load(cfg, speech, vcfg)
    random.Random(cfg.seed).shuffle(items)
    val, train = items[: cfg.eval_items], items[cfg.eval_items :]
    log.info("vocoder: %d training, %d validation recordings", len(train), len(val))
    net = UnitSpectrogramNet(vcfg)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=0.0)
    cfg.out.mkdir(parents=True, exist_ok=True)
    ckpt = cfg.out / "checkpoint.pt"
    state = {"step": 0, "epoch": 0, "seconds": 0.0}
    if ckpt.is_file():
        saved = torch.load(ckpt, weights_only=True)
        net.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        state = saved["state"]
    budget = cfg.minutes * 60
    rng = random.Random(cfg.seed)
    while state["seconds"] < budget:
        net.train()
        start = time.monotonic()
        order = list(range(len(train)))
        rng.shuffle(order)
        for b in range(0, len(order), cfg.batch):
            elapsed = state["seconds"] + time.monotonic() - start
            if elapsed >= budget:
                break
            for g in opt.param_groups:
                g["lr"] = cfg.lr * max(0.05, 0.5 * (1 + math.cos(math.pi * elapsed / budget))) * min(1.0, (state["step"] + 1) / 200)
            opt.zero_grad()
            total = torch.zeros(())
            for i in order[b : b + cfg.batch]:
                spec, dur = _loss(net, train[i])
                total = total + spec + dur
            (total / cfg.batch).backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            state["step"] += 1
            if state["step"] % 50 == 0:
                log.info("step %d, %.0f s: loss %.3f", state["step"], elapsed, total.item() / cfg.batch)
        state["seconds"] += time.monotonic() - start
        state["epoch"] += 1
        net.eval()
        with torch.no_grad():
            losses = [_loss(net, it) for it in val]
        state["val_spectral_l1"] = sum(s.item() for s, _ in losses) / len(losses)
        state["val_duration_mse"] = sum(d.item() for _, d in losses) / len(losses)
        log.info("epoch %d: %.0f s, validation L1 %.3f, duration MSE %.3f", state["epoch"], state["seconds"],
                 state["val_spectral_l1"], state["val_duration_mse"])  # fmt: skip
        torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(), "state": state}, ckpt)
    SpectralVocoder(net.eval()).save(cfg.out)
    (cfg.out / "training.json").write_text(json.dumps(state, indent=2) + "\n")
    return cfg.out


def main(argv: list[str] | None = None) -> None:
    """Command line: every VocoderTrainConfig field is a flag."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", type=Path, required=True, help="manifest of the output voice's recordings")
    p.add_argument("--speech-dir", dest="speech_dir", type=Path, required=True, help="the trained unit encoder")
    p.add_argument("--out", type=Path, required=True)
    for name in ("minutes", "batch", "lr", "eval_items", "threads", "seed"):
        default = VocoderTrainConfig.__dataclass_fields__[name].default
        p.add_argument(f"--{name}", type=type(default), default=default)
    args = vars(p.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    print(fit(VocoderTrainConfig(**args)))


if __name__ == "__main__":
    main()
