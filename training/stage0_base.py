"""Stage 0 (tiny recipe only): a small LLaMA-like base, trained tokenizer + randomly initialised Llama.

The 7B recipe starts from LLaMA-7B instead (`--base` of stage 1). Here a SentencePiece BPE model is
trained with LLaMA's settings (byte fallback, split digits, identity normalisation, dummy prefix,
unk/bos/eos = 0/1/2) on the recipe's text, with unit strings and SpeechGPT's added tokens removed
(they become added tokens later), and a small LlamaForCausalLM is initialised from a seed.

    python -m training.stage0_base --config training/recipes/tiny/stage0.yaml
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from speechgpt_app.prompt import without_added_tokens
from training.config import parse_args, to_dict
from training.fit import MODEL_DIR, TRAINING_JSON


@dataclass(frozen=True)
class Stage0Config:
    """A small base model: tokenizer size, Llama shape, seed; `texts` are the recipe's data files."""

    texts: tuple[str, ...]  # .txt (a sentence per line) or .jsonl (every string value is text)
    out_dir: str
    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 192  # a multiple of 64: bitsandbytes CPU NF4 kernels need it (QLoRA)
    num_layers: int = 2
    num_heads: int = 4
    max_positions: int = 1024
    rms_norm_eps: float = 1e-6  # LLaMA-1's value
    seed: int = 1234


def recipe_text(paths: tuple[str, ...]) -> list[str]:
    """Lines of text from the recipe's files, without unit strings or SpeechGPT's added tokens."""
    lines: list[str] = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"stage 0 text file {path} does not exist (build the data first)")
        for raw in path.read_text(encoding="utf-8").splitlines():
            if not raw.strip():
                continue
            texts = [v for v in json.loads(raw).values() if isinstance(v, str)] if path.suffix == ".jsonl" else [raw]
            for t in texts:
                lines += [s for s in without_added_tokens(t).splitlines() if s.strip()]
    if not lines:
        raise ValueError(f"no text in {', '.join(paths)}")
    return lines


def train_sentencepiece(lines: list[str], vocab_size: int, out: Path) -> Path:
    """A LLaMA-like SentencePiece BPE model (vocab.train_sentencepiece) at out/tokenizer.model."""
    from speechgpt_app.vocab import train_sentencepiece as train

    out.mkdir(parents=True, exist_ok=True)
    # Small corpora may not support the full size: take what there is.
    (out / "tokenizer.model").write_bytes(train(lines, vocab_size, hard_vocab_limit=False))
    return out / "tokenizer.model"


def main(cfg: Stage0Config) -> Path:
    """Write out_dir/model: tokenizer (SentencePiece + tokenizer.json) and a seeded tiny Llama."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from training.lm import load_tokenizer

    out = Path(cfg.out_dir) / MODEL_DIR
    train_sentencepiece(recipe_text(cfg.texts), cfg.vocab_size, out)
    tokenizer = load_tokenizer(str(out))
    torch.manual_seed(cfg.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_positions,
        rms_norm_eps=cfg.rms_norm_eps,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / TRAINING_JSON).write_text(json.dumps({"stage": "stage0", "config": to_dict(cfg), "steps": 0}, indent=2))
    return out


if __name__ == "__main__":
    main(parse_args(Stage0Config))
