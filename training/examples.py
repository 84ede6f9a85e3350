"""Tokenised training examples: packed blocks (stage 0's text, stage 1's units) and prefix-masked
records (stages 2-3)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np

from training.data.formats import Record, answer_start, read_text_lines
from training.fit import IGNORE_INDEX, Example, FitResult, TrainConfig, fit

log = logging.getLogger(__name__)
T = TypeVar("T")


def split_heldout(items: Sequence[T], n_eval: int, what: str) -> tuple[list[T], list[T]]:
    """(train, held-out): the last `n_eval` items are held out; at least one item must remain to train."""
    if n_eval < 0 or len(items) <= n_eval:
        raise ValueError(f"{what}: {len(items)} item(s) cannot spare {n_eval} for evaluation and still train")
    cut = len(items) - n_eval
    return list(items[:cut]), list(items[cut:])


def fit_heldout(
    acc,
    cfg: TrainConfig,
    model,
    tokenizer,
    items: Sequence[T],
    to_examples: Callable[[Sequence[T], object, int], list[Example]],
    stage: str,
) -> FitResult:
    """Every stage's last step: hold out `cfg.eval_examples` items, make examples of both parts, fit."""
    train, val = split_heldout(items, cfg.eval_examples, cfg.data)
    train_examples = to_examples(train, tokenizer, cfg.block_size)
    train_examples += replay_examples(cfg, tokenizer, len(train_examples))
    val_examples = to_examples(val, tokenizer, cfg.block_size)
    return fit(acc, cfg, model, tokenizer, train_examples, val_examples, stage)


def replay_examples(cfg: TrainConfig, tokenizer, n_stage: int) -> list[Example]:
    """`cfg.replay_share` x `n_stage` packed blocks of the replay text (none without `cfg.replay`),
    drawn in a seeded order and cycled when the text is shorter than that."""
    if not cfg.replay or cfg.replay_share <= 0:
        return []
    blocks = packed_blocks(read_text_lines(cfg.replay), tokenizer, cfg.block_size)
    order = np.random.default_rng(cfg.seed).permutation(len(blocks))
    n = round(cfg.replay_share * n_stage)
    log.info("replay: %d blocks of %s beside %d examples", n, cfg.replay, n_stage)
    return [blocks[order[i % len(blocks)]] for i in range(n)]


def packed_blocks(lines: Sequence[str], tokenizer, block_size: int) -> list[Example]:
    """Stages 0 (text) and 1 (units): `<s> line </s>` per line, concatenated and cut into `block_size` blocks.

    The tail shorter than a block is kept as a last, shorter block so small data still trains.
    """
    stream: list[int] = []
    for line in lines:
        stream += tokenizer(line).input_ids + [tokenizer.eos_token_id]
    blocks = [stream[i : i + block_size] for i in range(0, len(stream), block_size)]
    return [Example(b, list(b)) for b in blocks if len(b) > 1]


def record_examples(records: Sequence[Record], tokenizer, block_size: int) -> list[Example]:
    """Stages 2-3: `<s> prefix plain_text </s>`, the loss masked on the prefix, cut to `block_size`.

    Tokenised exactly as the app will see it: `prefix` + the exchange up to `[SpeechGPT]: ` in one
    piece (the app's prompt, so its ids are a prefix of the training ids), then the answer as
    generate.encode_continuation writes text that follows the prompt. SpeechGPT's added tokens strip
    the whitespace around them, so the prefix's final newline merges into `[Human]`; the tokens that
    end inside the prefix, found from the character offsets, get no loss.
    """
    from speechgpt_app.generate import encode_continuation

    examples, cut = [], 0
    for r in records:
        start = answer_start(r.plain_text)
        head = tokenizer(r.prefix + r.plain_text[:start], return_offsets_mapping=True)
        answer = encode_continuation(tokenizer, r.plain_text[start:], head.input_ids)
        ids = list(head.input_ids) + answer + [tokenizer.eos_token_id]
        n_special = 1 if ids and ids[0] == tokenizer.bos_token_id else 0
        # `[Human]`'s span includes the newline it absorbed, so a token is the prefix's if it ends inside it.
        ends = [end for _, end in head.offset_mapping[n_special:]]
        n_prefix = n_special + next((i for i, end in enumerate(ends) if end > len(r.prefix)), len(ends))
        labels = [IGNORE_INDEX] * n_prefix + ids[n_prefix:]
        cut += len(ids) > block_size
        ids, labels = ids[:block_size], labels[:block_size]
        if any(label != IGNORE_INDEX for label in labels):
            examples.append(Example(ids, labels))
    if cut:
        log.warning("%d of %d records were longer than %d tokens and were cut", cut, len(records), block_size)
    return examples
