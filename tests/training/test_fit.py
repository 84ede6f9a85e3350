"""The shared fit loop: schedule, data order, padding/masking, and exact resume."""

from __future__ import annotations

import csv
import json
import math
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from speechgpt_app.units import units_to_text
from training import stage0_base, stage0_text, stage1_pretrain
from training.fit import (
    IGNORE_INDEX,
    PAD_ID,
    Example,
    TrainConfig,
    checkpoints,
    collate,
    data_order,
    group_by_length,
    lr_at,
)

N_UNITS = 16


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(base="b", data="d", out_dir="o", **kw)


def test_lr_schedules() -> None:
    cos = _cfg(lr=1.0, max_steps=100, warmup_ratio=0.03, schedule="cosine")
    assert [round(lr_at(s, cos), 6) for s in range(3)] == [round(1 / 3, 6), round(2 / 3, 6), 1.0]
    assert lr_at(3, cos) == 1.0 and lr_at(99, cos) < 1e-3
    assert lr_at(51, cos) == pytest.approx(0.5 * (1 + math.cos(math.pi * 48 / 97)))
    lin = _cfg(lr=5e-5, max_steps=10, schedule="linear")
    assert lr_at(0, lin) == 5e-5 and lr_at(5, lin) == pytest.approx(2.5e-5)
    assert lr_at(7, _cfg(lr=0.1, schedule="constant")) == 0.1


def test_data_order_is_seeded_epochs_of_permutations() -> None:
    order = data_order(5, 12, seed=3)
    assert len(order) == 12 and sorted(order[:5]) == list(range(5)) and sorted(order[5:10]) == list(range(5))
    assert (order == data_order(5, 12, seed=3)).all() and not (order == data_order(5, 12, seed=4)).all()


def test_group_by_length_keeps_each_window_and_cuts_padding() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 300, size=400).tolist()
    order = data_order(400, 1000, seed=1)
    grouped = group_by_length(order, lengths, batch=8, window=10, seed=1)
    assert (grouped == group_by_length(order, lengths, batch=8, window=10, seed=1)).all()
    for start in range(0, 1000, 80):  # the same examples in each window of 10 micro-batches
        assert sorted(grouped[start : start + 80]) == sorted(order[start : start + 80])

    def padded(o: np.ndarray) -> int:
        return sum(8 * max(lengths[i] for i in o[b : b + 8]) for b in range(0, len(o), 8))

    assert padded(grouped) < 0.75 * padded(order)


def test_collate_pads_right_and_masks_padding() -> None:
    batch = collate([Example([1, 5, 6], [IGNORE_INDEX, 5, 6]), Example([1, 7], [1, 7])])
    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 7, PAD_ID]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 5, 6], [1, 7, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fit")
    text = Path(__file__).resolve().parents[2] / "training" / "recipes" / "tiny" / "sentences.txt"
    cfg = stage0_base.Stage0Config(texts=(str(text),), out_dir=str(root / "stage0"), vocab_size=400)
    return stage0_base.main(cfg)


@pytest.fixture(scope="module")
def unit_lines(tmp_path_factory) -> Path:
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("units") / "units.txt"
    path.write_text("".join(units_to_text(rng.randrange(N_UNITS) for _ in range(rng.randint(20, 60))) + "\n" for _ in range(40)))
    return path


def _stage1(tiny_base: Path, unit_lines: Path, out: Path, **kw) -> TrainConfig:
    return TrainConfig(
        base=str(tiny_base), data=str(unit_lines), out_dir=str(out), n_units=N_UNITS, block_size=64,
        micro_batch_size=2, grad_accum=2, max_steps=6, lr=3e-3, schedule="cosine", warmup_ratio=0.2,
        weight_decay=0.1, eval_examples=4, eval_every=3, save_every=2, seed=11, threads=1, tensorboard=False, **kw,
    )  # fmt: skip


def _train_rows(out: Path) -> list[tuple[int, float]]:
    with (out / "log.csv").open() as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f) if r["split"] == "train"]


def test_resume_continues_the_step_count_and_matches_an_unbroken_run(tmp_path, tiny_base, unit_lines) -> None:
    whole = stage1_pretrain.setup(replace(_stage1(tiny_base, unit_lines, tmp_path / "whole"), tensorboard=True))
    assert list((tmp_path / "whole" / "tb").glob("events.out.tfevents.*"))  # TensorBoard is installed here
    first = stage1_pretrain.setup(_stage1(tiny_base, unit_lines, tmp_path / "broken", stop_at_step=3))
    assert first.step == 3 and first.model_dir is None  # stopped early: only a checkpoint
    assert [p.name for p in checkpoints(tmp_path / "broken")] == ["step-000002", "step-000003"]
    second = stage1_pretrain.setup(_stage1(tiny_base, unit_lines, tmp_path / "broken"))
    assert second.resumed_from == 3 and second.step == 6 and len(second.train_losses) == 3
    assert second.train_losses == pytest.approx(whole.train_losses[3:], abs=1e-5)
    assert second.eval_loss == pytest.approx(whole.eval_loss, abs=1e-5)
    assert [s for s, _ in _train_rows(tmp_path / "broken")] == list(range(1, 7))
    for (_, a), (_, b) in zip(_train_rows(tmp_path / "whole"), _train_rows(tmp_path / "broken")):
        assert a == pytest.approx(b, abs=1e-5)
    assert whole.train_losses[-1] < whole.train_losses[0]  # it learns
    summary = json.loads((tmp_path / "broken" / "model" / "training.json").read_text())
    assert summary["steps"] == 6 and summary["stage"] == "stage1"
    done = stage1_pretrain.setup(_stage1(tiny_base, unit_lines, tmp_path / "broken"))  # nothing left to do
    assert done.resumed_from == 6 and done.train_losses == []


def test_stage1_refuses_units_beyond_its_vocabulary(tmp_path, tiny_base, unit_lines) -> None:
    from training.data.formats import DataFormatError

    cfg = replace(_stage1(tiny_base, unit_lines, tmp_path / "o"), n_units=8)
    with pytest.raises(DataFormatError, match="out of range"):
        stage1_pretrain.setup(cfg)


def test_stage0_text_learns_the_lines_and_keeps_the_base_vocabulary(tmp_path, tiny_base) -> None:
    from transformers import AutoModelForCausalLM

    from training.lm import load_tokenizer

    lines = tmp_path / "text.txt"
    lines.write_text("".join(f"what is {a} plus one; [ta] {a} plus one is {b}<eoa>\n" for a, b in
                             [("two", "three"), ("five", "six"), ("eight", "nine")] * 12))  # fmt: skip
    cfg = TrainConfig(base=str(tiny_base), data=str(lines), out_dir=str(tmp_path / "s0t"), block_size=64,
                      micro_batch_size=4, max_steps=12, lr=3e-3, eval_examples=3, eval_every=0, save_every=0,
                      threads=1, tensorboard=False)  # fmt: skip
    result = stage0_text.setup(cfg)
    assert result.train_losses[-1] < 0.75 * result.train_losses[0]  # it learns the text
    assert len(load_tokenizer(str(result.model_dir))) == len(load_tokenizer(str(tiny_base)))  # no tokens added
    model = AutoModelForCausalLM.from_pretrained(result.model_dir)
    assert model.config.vocab_size == AutoModelForCausalLM.from_pretrained(tiny_base).config.vocab_size
    assert json.loads((result.model_dir / "training.json").read_text())["stage"] == "stage0_text"
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="no text"):
        stage0_text.setup(replace(cfg, data=str(tmp_path / "empty.txt"), out_dir=str(tmp_path / "e")))


@pytest.mark.parametrize(
    "task, output, units, text, answer",
    [
        ("transcribe", "text", [3, 1, 4], None, {"heard": "Hello there."}),
        ("speak", "speech+text", None, "Hello there.", {"units": [5, 9]}),
        ("chat", "speech+text", [3, 1], None, {"heard": "Hi?", "answer": "The sky.", "units": [2, 7]}),
        ("chat", "text", None, "Hi?", {"answer": "The sky."}),
    ],
)
def test_record_examples_train_what_the_app_prompts(tiny_base, task, output, units, text, answer) -> None:
    from speechgpt_app import prompt
    from speechgpt_app.vocab import extend_tokenizer
    from training.data.formats import Record
    from training.examples import record_examples
    from training.lm import load_tokenizer

    tok = load_tokenizer(str(tiny_base))
    extend_tokenizer(tok, N_UNITS, stage2=True)
    user = prompt.user_message(task, output, units=units_to_text(units) if units else None, text=text, style="explicit")
    record = Record(prompt.SYSTEM_PROMPT, prompt.format_exchange(user, prompt.format_answer(**answer)))
    [ex] = record_examples([record], tok, block_size=512)
    # The app's inference prompt for this request is a prefix of the training sequence, token for token.
    app_ids = tok(prompt.format_prompt(user)).input_ids
    assert ex.input_ids[: len(app_ids)] == app_ids
    decoded = tok.decode(ex.input_ids[len(app_ids) :], skip_special_tokens=True)
    # Added tokens decode with the tokenizer's own spacing around them; the characters are the answer's.
    assert decoded.replace(" ", "") == prompt.format_answer(**answer).replace(" ", "")
    assert ex.input_ids[-1] == tok.eos_token_id
    # No loss on the system prompt; everything from `[Human]` on is trained.
    first = next(i for i, label in enumerate(ex.labels) if label != IGNORE_INDEX)
    assert tok.convert_ids_to_tokens(ex.input_ids[first]) == "[Human]"
    assert ex.labels[first:] == ex.input_ids[first:]
    [short] = record_examples([record], tok, block_size=first + 3)
    assert len(short.input_ids) == first + 3


def test_packed_blocks_pack_lines_with_eos(tiny_base) -> None:
    from speechgpt_app.vocab import extend_tokenizer
    from training.examples import packed_blocks
    from training.lm import load_tokenizer

    tok = load_tokenizer(str(tiny_base))
    extend_tokenizer(tok, N_UNITS, stage2=False)
    lines = [units_to_text(range(i, i + 10)) for i in range(5)]
    blocks = packed_blocks(lines, tok, block_size=16)
    stream = [t for b in blocks for t in b.input_ids]
    assert all(len(b.input_ids) == 16 for b in blocks[:-1]) and blocks[-1].input_ids
    assert stream.count(tok.eos_token_id) == 5 and stream.count(tok.bos_token_id) == 5
    assert all(b.labels == b.input_ids for b in blocks)


def test_a_missing_base_model_says_what_is_needed(tmp_path, unit_lines) -> None:
    from training.lm import BaseModelError

    for base in (str(tmp_path / "no-llama"), "nobody-xyz/no-such-llama"):
        cfg = TrainConfig(base=base, data=str(unit_lines), out_dir=str(tmp_path / "o"), n_units=N_UNITS)
        with pytest.raises(BaseModelError, match="LLaMA-7B.*convert_llama_weights_to_hf"):
            stage1_pretrain.setup(cfg)


def test_replay_packs_text_blocks_beside_the_stage_examples(tmp_path, tiny_base, unit_lines) -> None:
    from training.examples import replay_examples
    from training.lm import load_tokenizer

    text = tmp_path / "text.txt"
    lines = [f"what is {a} plus one; [ta] {a} plus one is {a + 1}<eoa>" for a in range(12)]
    text.write_text("\n".join(lines) + "\n")
    tok = load_tokenizer(str(tiny_base))
    cfg = replace(_stage1(tiny_base, unit_lines, tmp_path / "o"), block_size=32, replay=str(text), replay_share=0.5)
    assert replay_examples(replace(cfg, replay_share=0.0), tok, 10) == []
    blocks = replay_examples(cfg, tok, 10)
    assert len(blocks) == 5 and all(b.labels == b.input_ids for b in blocks)
    many = replay_examples(replace(cfg, replay_share=20.0), tok, 10)  # more than the text has: cycled
    distinct = {tuple(b.input_ids) for b in many}
    assert len(many) == 200 and len(distinct) < 200
    decoded = tok.decode([t for b in distinct for t in b], skip_special_tokens=True)
    assert all(line.split(";")[0] in decoded for line in lines)  # every line is in some block
    # A stage-1 run with replay trains on the text too: same seed and shape, other batches.
    plain = stage1_pretrain.setup(replace(_stage1(tiny_base, unit_lines, tmp_path / "plain"), max_steps=2))
    mixed = stage1_pretrain.setup(
        replace(_stage1(tiny_base, unit_lines, tmp_path / "mixed"), max_steps=2, replay=str(text), replay_share=4.0)
    )
    assert mixed.step == plain.step == 2 and mixed.train_losses != plain.train_losses
