"""Train SpeechGPT-tiny's unit encoder: log-mel -> small Transformer -> CTC over espeak-ng phonemes.

    python -m training.mini.train_units --corpus runs/mini/corpus/questions.jsonl --out runs/mini/speech

The units are the encoder's greedy CTC output, so they name phonemes whoever speaks: one inventory
for what the model hears and what it speaks (the vocoder is trained on the same units of the output
voice). Training uses SpecAugment (time and frequency masks) on top of the corpus' own augmentation,
keeps a checkpoint after every epoch (a rerun resumes) and writes a speech directory that
`SpeechTokenizer.from_dir` loads.
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
from speechgpt_app.evaluate import edit_distance
from speechgpt_app.units import CTCUnitEncoder, SpeechConfig, SpeechTokenizer
from training.mini import domain, phonemes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UnitTrainConfig:
    """Settings of one encoder training run."""

    corpus: tuple[Path, ...]
    out: Path
    minutes: float = 20.0  # wall-clock budget for the optimisation
    batch_frames: int = 12_000  # 100 Hz input frames per batch
    lr: float = 2e-3
    warmup: int = 300
    dropout: float = 0.1
    eval_items: int = 200
    threads: int = 2
    seed: int = 0


def _load(corpus: tuple[Path, ...], enc: CTCUnitEncoder, symbol_ids: dict[str, int]) -> list[tuple[torch.Tensor, list[int], str]]:
    items = []
    for manifest in corpus:
        for line in manifest.read_text(encoding="utf-8").splitlines():
            entry = json.loads(line)
            wav = load_audio(str(manifest.parent / entry["audio"]), limits=AudioLimits(max_seconds=30))
            target = [symbol_ids[p] for p in phonemes.phonemes(entry["text"])]
            items.append((enc.frames(torch.from_numpy(wav)), target, entry["voice"]))
    return items


def _batches(items: list, batch_frames: int, rng: random.Random) -> list[list[int]]:
    """Index batches of similar length, each under `batch_frames` padded frames, in random order."""
    order = sorted(range(len(items)), key=lambda i: (items[i][0].shape[0], rng.random()))
    batches, cur, longest = [], [], 0
    for i in order:
        longest = max(longest, items[i][0].shape[0])
        if cur and longest * (len(cur) + 1) > batch_frames:
            batches.append(cur)
            cur, longest = [], items[i][0].shape[0]
        cur.append(i)
    if cur:
        batches.append(cur)
    rng.shuffle(batches)
    return batches


def _spec_augment(x: torch.Tensor, rng: random.Random) -> torch.Tensor:
    x = x.clone()
    t, f = x.shape
    for _ in range(2):
        w = rng.randrange(0, 12)
        s = rng.randrange(0, max(1, f - w))
        x[:, s : s + w] = 0
    for _ in range(max(1, t // 150)):
        w = rng.randrange(0, 20)
        s = rng.randrange(0, max(1, t - w))
        x[s : s + w] = 0
    return x


def _collate(items, idx, rng, augment: bool):
    mels = [_spec_augment(items[i][0], rng) if augment else items[i][0] for i in idx]
    lengths = torch.tensor([m.shape[0] for m in mels])
    out_lengths = (lengths + 1) // 2
    mel = torch.nn.utils.rnn.pad_sequence(mels, batch_first=True)
    mask = torch.arange(int(out_lengths.max()))[None] >= out_lengths[:, None]
    targets = [torch.tensor(items[i][1]) for i in idx]
    return mel, mask, out_lengths, torch.cat(targets), torch.tensor([len(t) for t in targets])


def phoneme_error_rate(enc: CTCUnitEncoder, items: list) -> float:
    """Edit distance of greedy CTC output to the targets, over the targets' total length."""
    enc.net.eval()
    errors = total = 0
    with torch.inference_mode():
        for mel, target, _ in items:
            best = enc.net(mel[None])[0].argmax(-1).tolist()
            hyp = [k for i, k in enumerate(best) if k != enc.blank and (i == 0 or best[i - 1] != k)]
            errors += edit_distance(hyp, target)
            total += len(target)
    return errors / max(1, total)


def fit(cfg: UnitTrainConfig) -> Path:
    """Train (resuming from `out/checkpoint.pt`) and write the speech directory to `cfg.out`."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    rng = random.Random(cfg.seed)
    symbols = phonemes.inventory(domain.all_texts())  # the whole domain, not only what this corpus says
    symbol_ids = {s: i for i, s in enumerate(symbols)}
    enc = CTCUnitEncoder.build({"symbols": symbols}, len(symbols), dropout=cfg.dropout)
    log.info("unit encoder: %d symbols, %.2f M parameters", len(symbols), sum(p.numel() for p in enc.net.parameters()) / 1e6)
    items = _load(cfg.corpus, enc, symbol_ids)
    rng.shuffle(items)
    val, train = items[: cfg.eval_items], items[cfg.eval_items :]
    log.info("unit encoder: %d training, %d validation utterances", len(train), len(val))

    opt = torch.optim.AdamW(enc.net.parameters(), lr=cfg.lr, weight_decay=0.01)
    ctc = torch.nn.CTCLoss(blank=enc.blank, zero_infinity=True)
    cfg.out.mkdir(parents=True, exist_ok=True)
    ckpt = cfg.out / "checkpoint.pt"
    state = {"step": 0, "epoch": 0, "seconds": 0.0}
    if ckpt.is_file():
        saved = torch.load(ckpt, weights_only=True)
        enc.net.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        state = saved["state"]
        log.info("resumed at step %d (%.0f s trained)", state["step"], state["seconds"])
    budget = cfg.minutes * 60
    while state["seconds"] < budget:
        enc.net.train()
        start = time.monotonic()
        for idx in _batches(train, cfg.batch_frames, random.Random(cfg.seed + state["epoch"])):
            if state["seconds"] + time.monotonic() - start >= budget:
                break
            mel, mask, out_len, targets, target_len = _collate(train, idx, rng, augment=True)
            logp = enc.net(mel, mask).log_softmax(-1).transpose(0, 1)
            loss = ctc(logp, targets, out_len, target_len)
            elapsed = state["seconds"] + time.monotonic() - start
            warm = min(1.0, (state["step"] + 1) / cfg.warmup)
            decay = 0.5 * (1 + math.cos(math.pi * min(1.0, elapsed / budget)))
            for g in opt.param_groups:
                g["lr"] = cfg.lr * warm * max(decay, 0.02)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(enc.net.parameters(), 5.0)
            opt.step()
            state["step"] += 1
            if state["step"] % 100 == 0:
                log.info("step %d, %.0f s: loss %.3f", state["step"], elapsed, loss.item())
        state["seconds"] += time.monotonic() - start
        state["epoch"] += 1
        per = phoneme_error_rate(enc, val)
        log.info("epoch %d: %.0f s, validation phoneme error rate %.3f", state["epoch"], state["seconds"], per)
        torch.save({"model": enc.net.state_dict(), "optimizer": opt.state_dict(), "state": state}, ckpt)
    enc.net.eval()
    config = SpeechConfig(n_units=len(symbols), features={"type": "ctc", "symbols": symbols})
    SpeechTokenizer(config, enc, None).save(cfg.out)
    (cfg.out / "training.json").write_text(
        json.dumps({"phoneme_error_rate": phoneme_error_rate(enc, val), **state}, indent=2) + "\n"
    )
    return cfg.out


def main(argv: list[str] | None = None) -> None:
    """Command line: every UnitTrainConfig field is a flag."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", type=Path, nargs="+", required=True, help="manifest(s) of {audio, text, voice}")
    p.add_argument("--out", type=Path, required=True, help="speech directory to write")
    for name in ("minutes", "batch_frames", "lr", "warmup", "dropout", "eval_items", "threads", "seed"):
        default = UnitTrainConfig.__dataclass_fields__[name].default
        p.add_argument(f"--{name}", type=type(default), default=default)
    args = vars(p.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    print(fit(UnitTrainConfig(corpus=tuple(args.pop("corpus")), **args)))


if __name__ == "__main__":
    main()
