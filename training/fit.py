"""The one training loop every stage uses: Accelerate, resumable checkpoints, CSV/TensorBoard logs.

A stage hands `fit()` a model, a tokenizer and two lists of `Example`s; `fit()` owns the data order
(seeded permutations, so the data position is a pure function of the step), the learning-rate schedule
(a pure function of the step, set by hand each step like nanoGPT, so a resumed run needs no scheduler
state), evaluation, checkpoints (`accelerator.save_state` + `trainer.json`), and the final model directory.
Distribution (DDP on gloo/NCCL, FSDP, DeepSpeed) comes from the `accelerate launch` config file alone.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from training.config import to_dict

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value the loss skips (prefix tokens and padding)
PAD_ID = 0  # the reference pads with id 0 (LLaMA's <unk>)
CHECKPOINTS = "checkpoints"  # under out_dir: step-000010/ ... (accelerate state + trainer.json)
MODEL_DIR = "model"  # under out_dir: what the next stage and the app load by path
TRAINING_JSON = "training.json"  # in the model dir: stage, config, steps, losses (export's provenance)
LOG_CSV = "log.csv"
LOG_FIELDS = ("step", "split", "loss", "lr", "tokens", "seconds")


@dataclass(frozen=True)
class LoraArgs:
    """PEFT LoRA settings (the reference's stage 3: r 8, alpha 16, dropout 0.05, q_proj/v_proj)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    targets: tuple[str, ...] = ("q_proj", "v_proj")


@dataclass(frozen=True)
class TrainConfig:
    """Arguments shared by stages 1-3 (one shape; the recipe YAML sets them)."""

    base: str  # model directory (or Hub id) this stage starts from
    data: str  # stage 1: unit lines (.txt); stages 2-3: records (.jsonl), see training/data/FORMATS.md
    out_dir: str
    n_units: int = 1000
    block_size: int = 1024  # tokens per example (stage 1: packed block length)
    micro_batch_size: int = 1  # examples per process per forward pass
    # Micro-batches of similar length: the order is cut into windows of this many micro-batches, each
    # window sorted by length and its micro-batches shuffled, so short records are not padded to long
    # ones. 0 = off (each micro-batch is a random draw).
    group_by_length: int = 0
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 100  # optimizer steps (the schedule's length)
    stop_at_step: int = 0  # end this invocation after this step, with a checkpoint (time-boxed jobs); 0 = run to max_steps
    lr: float = 2e-5
    schedule: Literal["linear", "cosine", "constant"] = "cosine"
    warmup_ratio: float = 0.0  # fraction of max_steps spent warming up linearly from 0
    min_lr_ratio: float = 0.0  # the schedule ends at lr * min_lr_ratio
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    max_grad_norm: float = 1.0
    eval_examples: int = 8  # held-out split: the last N lines/records of the data file
    eval_every: int = 50  # steps; 0 = only at the end
    save_every: int = 50  # steps between resumable checkpoints; 0 = only at the end
    keep_checkpoints: int = 2
    log_every: int = 1
    seed: int = 1234
    precision: Literal["fp32", "bf16"] = "fp32"
    gradient_checkpointing: bool = False
    lora: LoraArgs | None = None  # stage 3 only
    quant: Literal["none", "nf4", "int8"] = "none"  # 4-/8-bit frozen base for LoRA (QLoRA)
    resume: bool = True  # continue from the newest checkpoint in out_dir when there is one
    tensorboard: bool = True  # also log to out_dir/tb when tensorboard is installed
    save_model: bool = True
    threads: int = 0  # torch CPU threads per process; 0 = torch's default (all cores)
    # Rehearsal (small recipes): plain-text lines (stage 0's text) packed into blocks and trained beside
    # this stage's examples, `replay_share` replay blocks per stage example. A model of a few million
    # weights forgets what stage 0 taught it within 200 steps of units alone; the 7B keeps LLaMA's.
    replay: str | None = None
    replay_share: float = 0.0


@dataclass
class Example:
    """One training sequence: token ids and labels (IGNORE_INDEX where the loss must not look)."""

    input_ids: list[int]
    labels: list[int]


@dataclass
class FitResult:
    """What a run did: steps, the last train and eval losses, and where its model went."""

    step: int
    train_losses: list[float] = field(default_factory=list)
    eval_loss: float | None = None
    model_dir: Path | None = None
    resumed_from: int = 0
    tokens_per_process: list[int] = field(default_factory=list)  # tokens each process trained on in this run


class _Ordered(Dataset):
    """Examples in the run's fixed order (epochs of seeded permutations), so position = f(step)."""

    def __init__(self, examples: Sequence[Example], order: np.ndarray) -> None:
        self.examples, self.order = examples, order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> Example:
        return self.examples[int(self.order[i])]


def collate(batch: list[Example]) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch with PAD_ID; padded positions get no attention and no loss."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), PAD_ID, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def data_order(n_examples: int, n_needed: int, seed: int) -> np.ndarray:
    """Indices for `n_needed` draws: concatenated seeded permutations of range(n_examples)."""
    rng = np.random.default_rng(seed)
    epochs = math.ceil(n_needed / n_examples)
    return np.concatenate([rng.permutation(n_examples) for _ in range(epochs)])[:n_needed]


def group_by_length(order: np.ndarray, lengths: Sequence[int], batch: int, window: int, seed: int) -> np.ndarray:
    """`order` with each window of `window` micro-batches sorted by length, its micro-batches shuffled:
    the same examples at about the same steps, with little padding in each micro-batch."""
    rng = np.random.default_rng(seed + 1)
    out = []
    span = batch * window
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: lengths[i])
        batches = [chunk[i : i + batch] for i in range(0, len(chunk), batch)]
        out += [i for b in rng.permutation(len(batches)) for i in batches[b]]
    return np.asarray(out, dtype=order.dtype)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then linear/cosine/constant."""
    warmup = math.ceil(cfg.warmup_ratio * cfg.max_steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - warmup) / max(1, cfg.max_steps - warmup)
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "linear":
        return floor + (cfg.lr - floor) * (1.0 - progress)
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_accelerator(cfg: TrainConfig):
    """An Accelerator for this run; the launch config (if any) picks DDP/FSDP/DeepSpeed."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    acc = Accelerator(
        # Without CUDA, say so: torchrun-launched processes then form a CPU (gloo) group instead of
        # each training alone (Accelerate only picks MULTI_CPU when told the run is on CPU).
        cpu=not torch.cuda.is_available(),
        gradient_accumulation_steps=cfg.grad_accum,
        mixed_precision="bf16" if cfg.precision == "bf16" else "no",
        project_config=ProjectConfiguration(project_dir=cfg.out_dir),
    )
    if cfg.threads > 0:  # on a shared or small CPU, oversubscribed threads are many times slower
        torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed)
    return acc


def checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints (trainer.json is written last), oldest first."""
    root = out_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / "trainer.json").is_file())


def _trainable_parameters(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only (norms and biases are never decayed), as in litgpt/nanoGPT."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    other = [p for p in params if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]


class _Logger:
    """CSV always (main process), TensorBoard when installed and asked for."""

    def __init__(self, out_dir: Path, resume_step: int, enabled: bool, tensorboard: bool) -> None:
        self.enabled = enabled
        self.path = out_dir / LOG_CSV
        self.tb = None
        if not enabled:
            return
        # Rows after the checkpoint we resume from were never part of this run's history: drop them.
        rows = []
        if resume_step and self.path.is_file():
            with self.path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with self.path.open("w", newline="") as f:
            w = csv.DictWriter(f, LOG_FIELDS)
            w.writeheader()
            w.writerows(rows)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.info("tensorboard is not installed: logging to %s only", self.path)
            else:
                self.tb = SummaryWriter(str(out_dir / "tb"), purge_step=resume_step + 1 if resume_step else None)

    def write(self, step: int, split: str, loss: float, lr: float, tokens: int, seconds: float) -> None:
        if not self.enabled:
            return
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow([step, split, f"{loss:.8f}", f"{lr:.8e}", tokens, f"{seconds:.3f}"])
        if self.tb is not None:
            self.tb.add_scalar(f"{split}/loss", loss, step)
            if split == "train":
                self.tb.add_scalar("train/lr", lr, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


@torch.no_grad()
def evaluate(acc, model, loader) -> float:
    """Token-weighted mean loss (nats per token) over the held-out loader, across processes."""
    model.eval()
    total = torch.zeros(2, device=acc.device, dtype=torch.float64)
    for batch in loader:
        n = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        loss = model(**batch).loss
        total += torch.stack([loss.double() * n, n.double()])
    model.train()
    total = acc.reduce(total, reduction="sum")
    return float(total[0] / total[1].clamp(min=1))


def save_model(acc, model, tokenizer, out: Path) -> Path:
    """save_pretrained (safetensors) + tokenizer, from the main process; a PEFT model saves its adapter."""
    acc.wait_for_everyone()
    unwrapped = acc.unwrap_model(model)
    state = acc.get_state_dict(model)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        unwrapped.save_pretrained(out, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(out)
    acc.wait_for_everyone()
    return out


def fit(
    acc,
    cfg: TrainConfig,
    model: torch.nn.Module,
    tokenizer,
    train: Sequence[Example],
    val: Sequence[Example],
    stage: str,
) -> FitResult:
    """Train `model` for cfg.max_steps optimizer steps, resuming from out_dir's newest checkpoint."""
    if not train:
        raise ValueError(f"{stage}: no training examples in {cfg.data}")
    out_dir = Path(cfg.out_dir)
    world = acc.num_processes
    per_step = cfg.micro_batch_size * cfg.grad_accum * world
    order = data_order(len(train), cfg.max_steps * per_step, cfg.seed)
    if cfg.group_by_length:
        lengths = [len(e.input_ids) for e in train]
        order = group_by_length(order, lengths, cfg.micro_batch_size, cfg.group_by_length, cfg.seed)
    loader = DataLoader(_Ordered(train, order), batch_size=cfg.micro_batch_size, shuffle=False, collate_fn=collate)
    val_loader = DataLoader(list(val), batch_size=cfg.micro_batch_size, shuffle=False, collate_fn=collate)

    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing also works when the inputs need no grad (a frozen LoRA base).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    optimizer = torch.optim.AdamW(
        _trainable_parameters(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2)
    )
    model, optimizer, loader, val_loader = acc.prepare(model, optimizer, loader, val_loader)

    start = _resume(acc, cfg, out_dir, per_step, stage)
    if acc.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
    logger = _Logger(out_dir, start, acc.is_main_process, cfg.tensorboard)
    if acc.is_main_process:
        (out_dir / "config.json").write_text(json.dumps({"stage": stage, **to_dict(cfg)}, indent=2))

    result = FitResult(step=start, resumed_from=start)
    # The data position is a function of the step: skip what earlier runs consumed.
    batches = iter(acc.skip_first_batches(loader, start * cfg.grad_accum) if start else loader)
    model.train()
    t0 = time.perf_counter()
    tokens = 0
    stop = min(cfg.max_steps, cfg.stop_at_step) if cfg.stop_at_step > 0 else cfg.max_steps
    bar = tqdm(total=stop, initial=start, desc=stage, unit="step", disable=not acc.is_local_main_process)
    for step in range(start, stop):
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss, step_tokens = _train_step(acc, model, optimizer, batches, cfg)
        tokens += step_tokens
        result.train_losses.append(step_loss)
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            logger.write(done, "train", step_loss, lr, tokens, time.perf_counter() - t0)
        if val and (done == cfg.max_steps or (cfg.eval_every and done % cfg.eval_every == 0)):
            result.eval_loss = evaluate(acc, model, val_loader)
            logger.write(done, "eval", result.eval_loss, lr, tokens, time.perf_counter() - t0)
        if done == stop or (cfg.save_every and done % cfg.save_every == 0):
            _save_checkpoint(acc, out_dir, done, per_step, cfg.keep_checkpoints)
        result.step = done
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", refresh=False)
        bar.update(1)
    bar.close()
    logger.close()
    result.tokens_per_process = acc.gather(torch.tensor([tokens], device=acc.device)).tolist()
    if result.step < cfg.max_steps:  # stopped early on purpose: the checkpoint is the output
        acc.print(f"{stage}: stopped at step {result.step} of {cfg.max_steps}; run again to resume")
        return result
    if cfg.save_model:
        result.model_dir = save_model(acc, model, tokenizer, out_dir / MODEL_DIR)
        if acc.is_main_process:
            _write_summary(result, cfg, stage, world)
    return result


def _resume(acc, cfg: TrainConfig, out_dir: Path, per_step: int, stage: str) -> int:
    """Load the newest checkpoint (model, optimizer, RNGs) and return its step; 0 when starting fresh."""
    found = checkpoints(out_dir)
    if not found:
        return 0
    if not cfg.resume:
        raise FileExistsError(
            f"{out_dir} already holds checkpoints ({found[-1].name}): resume (--resume true) or choose a new out_dir"
        )
    state = json.loads((found[-1] / "trainer.json").read_text())
    if state.get("samples_per_step", per_step) != per_step:
        # The data position is step x samples per step: another batch shape would replay or skip data.
        raise ValueError(
            f"{found[-1]} was written with {state['samples_per_step']} samples per step, this run has {per_step} "
            "(micro_batch_size x grad_accum x processes): resume with the same shape"
        )
    acc.load_state(str(found[-1]))
    acc.print(f"{stage}: resuming from {found[-1]} at step {state['step']}")
    return state["step"]


def _train_step(acc, model, optimizer, batches, cfg: TrainConfig) -> tuple[float, int]:
    """One optimizer step over grad_accum micro-batches: (mean loss across processes, tokens seen here)."""
    losses, tokens = [], 0
    for _ in range(cfg.grad_accum):
        batch = _next_batch(batches)
        tokens += int(batch["attention_mask"].sum())
        with acc.accumulate(model):  # syncs gradients (and steps) on the last micro-batch only
            loss = model(**batch).loss
            acc.backward(loss)
            if acc.sync_gradients and cfg.max_grad_norm > 0:
                acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
        losses.append(loss.detach().float())
    return float(acc.reduce(torch.stack(losses).mean(), reduction="mean")), tokens


def _write_summary(result: FitResult, cfg: TrainConfig, stage: str, world: int) -> None:
    """model/training.json: what produced these weights (export reads it into the bundle's provenance)."""
    summary = {
        "stage": stage,
        "config": to_dict(cfg),
        "steps": result.step,
        "processes": world,
        "tokens_per_process": result.tokens_per_process,
        "final_train_loss": result.train_losses[-1] if result.train_losses else None,
        "final_eval_loss": result.eval_loss,
    }
    (result.model_dir / TRAINING_JSON).write_text(json.dumps(summary, indent=2))


def _next_batch(batches) -> dict[str, torch.Tensor]:
    """The next batch, leaving torch's RNG as it was: a DataLoader draws a seed when its iterator
    starts, and a resumed run starts one at a different step, so its dropout masks would drift."""
    rng = torch.get_rng_state()
    batch = next(batches)
    torch.set_rng_state(rng)
    return batch


def _save_checkpoint(acc, out_dir: Path, step: int, per_step: int, keep: int) -> None:
    """accelerate state (model, optimizer, RNGs) + trainer.json, which marks the checkpoint complete."""
    path = out_dir / CHECKPOINTS / f"step-{step:06d}"
    acc.save_state(str(path))
    acc.wait_for_everyone()
    if acc.is_main_process:
        (path / "trainer.json").write_text(json.dumps({"step": step, "samples_per_step": per_step}))
        for old in checkpoints(out_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    acc.wait_for_everyone()
