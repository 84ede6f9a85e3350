"""Loading the language model and tokenizer a stage starts from (a directory or a Hub id)."""

from __future__ import annotations

import torch

from speechgpt_app.model import quantization_config
from training.fit import LoraArgs

LLAMA_HELP = (
    "the 7B recipe starts from LLaMA-7B: pass --base with a transformers LlamaForCausalLM directory "
    "(config.json, tokenizer.model, weights), e.g. Meta's weights converted with transformers' "
    "convert_llama_weights_to_hf.py, or a Hub id of such a conversion (e.g. huggyllama/llama-7b)"
)


class BaseModelError(FileNotFoundError):
    """The model a stage starts from is not where the recipe says."""


def resolve_base(base: str) -> str:
    """A local model directory, or a Hub id fetched into the cache (model.resolve_location, as the app does)."""
    from speechgpt_app.model import ModelLoadError, resolve_location

    try:
        path = resolve_location(base, "base model")
    except ModelLoadError as e:
        raise BaseModelError(f"{e} ({LLAMA_HELP})") from e
    if not (path / "config.json").is_file():
        raise BaseModelError(f"{path} has no config.json: not a transformers model directory ({LLAMA_HELP})")
    return str(path)


def load_tokenizer(path: str, n_units: int | None = None, stage2: bool = True):
    """The tokenizer as the app loads it (vocab.load_tokenizer), so ids and spacing match."""
    from speechgpt_app.vocab import load_tokenizer as load

    return load(path, n_units=n_units, stage2=stage2)


def load_model(path: str, quant: str = "none", precision: str = "fp32"):
    """LlamaForCausalLM for training: fp32 master weights (mixed precision comes from Accelerate),
    or a frozen NF4/int8 base for QLoRA."""
    from transformers import AutoModelForCausalLM

    kwargs: dict = {"dtype": torch.float32}
    if quant in ("nf4", "int8"):  # bf16 compute with bf16 training; fp32 otherwise (and on CPU)
        compute = torch.bfloat16 if precision == "bf16" else torch.float32
        kwargs["quantization_config"] = quantization_config(quant, compute)
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def load_extended(base: str, n_units: int, stage2: bool, precision: str = "fp32"):
    """(tokenizer, model) of `base` with the stage's tokens added and the embeddings grown to match.

    Stage 1 adds the units and `<sosp>`/`<eosp>` to a plain base; stage 2 (`stage2=True`) adds its
    four tokens to a stage-1 model, which must already hold exactly these `n_units` units.
    """
    from speechgpt_app.vocab import check_vocabulary, extend_tokenizer, resize_model

    tokenizer = load_tokenizer(base)
    if stage2:
        check_vocabulary(tokenizer, n_units, stage2=False)  # a stage-1 model, for these units
    extend_tokenizer(tokenizer, n_units, stage2=stage2)
    model = load_model(base, precision=precision)
    resize_model(model, tokenizer)
    return tokenizer, model


def add_lora(model, lora: LoraArgs, quantized: bool, gradient_checkpointing: bool):
    """Wrap `model` in a PEFT LoRA; only the adapter trains."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)
