"""Tiny language models in the real on-disk formats, for any test that needs one.

- `sentencepiece_model()`: a LLaMA-like SentencePiece BPE model (byte fallback, identity normaliser,
  dummy prefix, split digits), trained here on generated sentences; ~0.1 s.
- `released_tokenizer_dir(n_units)`: that model laid out as the released `fnlp/SpeechGPT-7B-com`
  tokenizer was (transformers 4.33: `tokenizer.model` + `added_tokens.json` + configs).
- `tiny_lm_dir(n_units)`: a 2-layer, 64-wide `LlamaForCausalLM` + extended tokenizer saved with
  `save_pretrained` (safetensors), loadable with `speechgpt_app.model.load_lm`.
- `lora_adapter_dir(n_units)`: a PEFT LoRA (q_proj, v_proj) on that model with non-zero B.
- `sharded_bin_dir(n_units)`: the same model in fp32 `pytorch_model-0000i-of-0000N.bin` shards + index,
  like the released `-cm` checkpoint.

Everything is built once per test session (per argument set) in a temporary directory and returned as
a path. Treat the returned directories as read-only; copy them (`shutil.copytree`) to modify.
"""

from __future__ import annotations

import atexit
import functools
import json
import random
import shutil
import tempfile
from pathlib import Path

import scripted
import torch
from scripted import SP_VOCAB_SIZE

from speechgpt_app.prompt import SYSTEM_PROMPT
from speechgpt_app.vocab import added_tokens, extend_tokenizer, load_tokenizer, train_sentencepiece

# The scripted model's shapes: small enough to build and run in well under a second on one CPU core.
TINY_LLAMA = {**scripted.TINY_LLAMA, "max_position_embeddings": 512}
_WORDS = (
    "the a an of to and in is was for on that with as by at it from this be are have not but they his her "
    "you we what can do your ask country fellow americans so my system established frequent formal review "
    "activities thereunder regard speech answer question hello world please sentence speak out try input "
    "transcribe this is audio text tell me about weather today good morning"
).split()


@functools.cache
def _workdir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="speechgpt-lm-fixtures-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def training_sentences(n: int = 600, seed: int = 0) -> list[str]:
    """Deterministic English-like lines, with the system prompt and the answer tags among them."""
    rng = random.Random(seed)
    lines = SYSTEM_PROMPT.splitlines()
    for _ in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 14))]
        line = " ".join(words).capitalize() + rng.choice(".?!,;:")
        if rng.random() < 0.2:
            line += f" {rng.randint(0, 2000)}"
        if rng.random() < 0.2:
            line = f"{line}; [ta] {words[0]} {words[-1]}; [ua] <eoa>"
        lines.append(line)
    return lines


@functools.cache
def sentencepiece_model(vocab_size: int = SP_VOCAB_SIZE) -> bytes:
    """A serialized SentencePiece model trained with LLaMA's settings (BPE, byte fallback, ...)."""
    return train_sentencepiece(training_sentences(), vocab_size)


def _special(content: str) -> dict:
    # transformers 4.33 wrote special tokens in this serialised AddedToken form
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
            "rstrip": False, "single_word": False}


@functools.cache
def base_tokenizer_dir() -> Path:
    """LLaMA-1's layout without SpeechGPT tokens: `tokenizer.model` + configs (transformers 4.x)."""
    out = _workdir() / "base-tokenizer"
    out.mkdir()
    (out / "tokenizer.model").write_bytes(sentencepiece_model())
    special = {"bos_token": _special("<s>"), "eos_token": _special("</s>"), "unk_token": _special("<unk>")}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {"add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
              "legacy": None, "model_max_length": 2048, "pad_token": None, "sp_model_kwargs": {},
              "tokenizer_class": "LlamaTokenizer", **special}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out


@functools.cache
def released_tokenizer_dir(n_units: int = 20, stage2: bool = True) -> Path:
    """The released tokenizer's layout: the base files + `added_tokens.json` ({token: id})."""
    out = _workdir() / f"released-tokenizer-{n_units}-{int(stage2)}"
    shutil.copytree(base_tokenizer_dir(), out)
    import sentencepiece as spm

    base = spm.SentencePieceProcessor(model_proto=sentencepiece_model()).get_piece_size()
    ids = {token: base + i for i, token in enumerate(added_tokens(n_units, stage2))}
    (out / "added_tokens.json").write_text(json.dumps(ids, indent=2))
    return out


def tiny_llama_config(vocab_size: int):
    """The `LlamaConfig` of the tiny test model."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0, **TINY_LLAMA)


def build_tiny_lm(n_units: int = 20, seed: int = 0):
    """A fresh (tokenizer, fp32 LlamaForCausalLM) pair: base tokenizer extended with `n_units` units."""
    from transformers import LlamaForCausalLM

    tok = load_tokenizer(base_tokenizer_dir())
    extend_tokenizer(tok, n_units)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(len(tok))).eval()
    return tok, model


@functools.cache
def tiny_lm_dir(n_units: int = 20, seed: int = 0) -> Path:
    """A tiny SpeechGPT-shaped LM saved with `save_pretrained` (safetensors) + its tokenizer."""
    out = _workdir() / f"tiny-lm-{n_units}-{seed}"
    tok, model = build_tiny_lm(n_units, seed)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@functools.cache
def lora_adapter_dir(n_units: int = 20, seed: int = 0) -> Path:
    """A PEFT LoRA adapter (r 8, alpha 16, q_proj/v_proj as released) whose B is non-zero."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    out = _workdir() / f"lora-{n_units}-{seed}"
    base = LlamaForCausalLM.from_pretrained(tiny_lm_dir(n_units, seed))
    config = LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **scripted.LORA)  # random B, so it acts
    torch.manual_seed(seed + 1)
    peft_model = get_peft_model(base, config)
    peft_model.save_pretrained(out)
    return out


@functools.cache
def sharded_bin_dir(n_units: int = 20, seed: int = 0, shards: int = 3) -> Path:
    """The tiny LM as fp32 pickled shards + `pytorch_model.bin.index.json`, like `fnlp/SpeechGPT-7B-cm`."""
    from transformers import LlamaForCausalLM

    out = _workdir() / f"tiny-lm-bin-{n_units}-{seed}"
    model = LlamaForCausalLM.from_pretrained(tiny_lm_dir(n_units, seed), dtype=torch.float32)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    names = list(state)
    per = -(-len(names) // shards)
    out.mkdir()
    weight_map = {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k] for k in names[i * per : (i + 1) * per]}
        torch.save(part, out / file)
        weight_map.update(dict.fromkeys(part, file))
    total = sum(v.numel() * v.element_size() for v in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
    model.config.save_pretrained(out)
    for f in released_tokenizer_dir(n_units).iterdir():
        shutil.copy(f, out / f.name)
    return out


def fake_hub_cache(hub: Path, repo_id: str, files: Path) -> None:
    """Lay `files` out as huggingface_hub's cache holds a downloaded snapshot of `repo_id`."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(files, repo / "snapshots" / commit)
