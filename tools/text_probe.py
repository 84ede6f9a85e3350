"""What a SpeechGPT-tiny language model knows, text in: greedy answers to SpeechInstruct-mini's held-out
questions (and a sample of training ones), by kind. No speech: it isolates the language model's
knowledge from hearing, so a stage's effect can be read in seconds.

    python tools/text_probe.py runs/mini/stage0_text/model            # stage 0/1: `question; [ta]` -> answer
    python tools/text_probe.py runs/mini/bundle/lm --format chat      # stage 2/3, bundle: a typed question

`plain` prompts as stage 0's text is written (the chain's text part); `chat` prompts as the app does for a
typed question answered in text. Follow-ups (plain only) get the right first answer in their history.
"""

from __future__ import annotations

import argparse
import random
from collections import Counter
from collections.abc import Sequence

import torch

from speechgpt_app import prompt
from speechgpt_app.vocab import load_tokenizer
from training.mini import domain

BATCH = 64
MAX_NEW_TOKENS = 40  # the longest answer ("... is spelled s e p t e m b e r") is about 30 tokens


def group(q: domain.Question) -> str:
    """Arithmetic by operation (their accuracies differ), other kinds by kind."""
    return q.fact.split(":")[0] if q.kind == "arithmetic" else q.kind


def greedy_answers(model, tokenizer, prompts: Sequence[str]) -> list[str]:
    """The text each prompt is continued with, up to `<eoa>`, greedy, in batches (left-padded)."""
    out: list[str] = []
    for i in range(0, len(prompts), BATCH):
        enc = tokenizer(list(prompts[i : i + BATCH]), return_tensors="pt", padding=True)
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        for row in ids[:, enc.input_ids.shape[1] :]:
            text = tokenizer.decode(row, skip_special_tokens=False).split(prompt.EOA)[0]
            out.append(text.replace(prompt.ANSWER_TAG, "").replace(tokenizer.eos_token, "").strip())
    return out


def question_prompt(q: domain.Question, fmt: str) -> str:
    """The prompt a model of this format answers `q` after."""
    if fmt == "plain":
        return f"{q.text}; {prompt.ANSWER_TAG}"
    user = prompt.user_message("chat", "text", text=q.text, style="explicit")
    return prompt.SYSTEM_PROMPT + prompt.format_exchange(user)


def score(model, tokenizer, questions: Sequence[domain.Question], fmt: str) -> tuple[float, dict[str, str]]:
    """(share right, 'right/asked' per group): right when the answer is the reference answer exactly."""
    answers = greedy_answers(model, tokenizer, [question_prompt(q, fmt) for q in questions])
    asked, right = Counter(map(group, questions)), Counter()
    for q, a in zip(questions, answers):
        right[group(q)] += a == q.answer
    return sum(right.values()) / len(questions), {k: f"{right[k]}/{asked[k]}" for k in sorted(asked)}


def main(argv: list[str] | None = None) -> None:
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a language model directory (config.json, weights, tokenizer)")
    p.add_argument("--format", choices=("plain", "chat"), default="plain")
    p.add_argument("--train-sample", type=int, default=300, help="training questions asked too")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.model)
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    train, held = domain.split()
    sets = {"held-out": held, "training": random.Random(0).sample(train, min(args.train_sample, len(train)))}
    for name, questions in sets.items():
        share, by_group = score(model, tokenizer, questions, args.format)
        print(f"{name}: {100 * share:.1f} %  " + "  ".join(f"{k} {v}" for k, v in by_group.items()))
    if args.format == "plain":
        _, conversations = domain.split_conversations()
        prompts = [prompt.format_answer(heard=c.first.text, answer=c.first.answer) + " "
                   + question_prompt(c.follow, "plain") for c in conversations]  # fmt: skip
        answers = greedy_answers(model, tokenizer, prompts)
        right = sum(a == c.follow.answer for a, c in zip(answers, conversations))
        print(f"held-out follow-ups, the right first answer given: {100 * right / len(conversations):.1f} %")


if __name__ == "__main__":
    main()
