"""tools/text_probe.py reads what the shipped SpeechGPT-tiny's language model knows, typed, without speech."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from speechgpt_app import prompt
from speechgpt_app.loaders import default_model
from speechgpt_app.vocab import load_tokenizer
from training.mini import domain

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "text_probe.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("text_probe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["text_probe"] = module
    spec.loader.exec_module(module)
    return module


def test_the_shipped_model_answers_typed_training_questions() -> None:
    from transformers import AutoModelForCausalLM

    probe = _load_script()
    lm = str(Path(default_model()) / "lm")
    tokenizer = load_tokenizer(lm)
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(lm, dtype=torch.float32).eval()
    train, _ = domain.split()
    counting = [q for q in train if q.kind == "counting"][:12]  # answered right by every bundle so far
    share, by_group = probe.score(model, tokenizer, counting, "chat")
    assert share >= 0.9 and by_group == {"counting": f"{round(share * 12)}/12"}
    # The prompt is the app's typed question; a plain prompt (stage 0's format) is another text.
    assert probe.question_prompt(counting[0], "chat").startswith(prompt.SYSTEM_PROMPT)
    assert probe.question_prompt(counting[0], "plain") == f"{counting[0].text}; [ta]"
    assert probe.group(next(q for q in train if q.fact.startswith("minus:"))) == "minus"

