"""Stage 3, chain-of-modality finetuning: a LoRA on the stage-2 model, optionally over a 4-/8-bit base.

Trains only the adapter (recipe: r, alpha, dropout, target modules) on chain-of-modality records in
the four formats; `--quant nf4` loads the frozen base in bitsandbytes NF4 (QLoRA). Saves the adapter
(adapter_config.json + adapter_model.safetensors) and the tokenizer in out_dir/model.

    python -m training.stage3_chain --config training/recipes/tiny/stage3.yaml
"""

from __future__ import annotations

from training.config import ConfigError, parse_args
from training.data.formats import read_records
from training.examples import fit_heldout, record_examples
from training.fit import FitResult, TrainConfig, make_accelerator
from training.lm import add_lora, load_model, load_tokenizer, resolve_base

STAGE = "stage3"


def setup(cfg: TrainConfig) -> FitResult:
    """Seed, build the Accelerator, run main()."""
    if cfg.lora is None:
        raise ConfigError("stage 3 trains a LoRA: the recipe needs a 'lora' section (r, alpha, dropout, targets)")
    return main(make_accelerator(cfg), cfg)


def main(acc, cfg: TrainConfig) -> FitResult:
    """Wrap the stage-2 model in a LoRA and finetune it on chain-of-modality records."""
    base = resolve_base(cfg.base)
    tokenizer = load_tokenizer(base, n_units=cfg.n_units, stage2=True)  # must already be a stage-2 model
    model = load_model(base, quant=cfg.quant, precision=cfg.precision)
    model = add_lora(model, cfg.lora, quantized=cfg.quant != "none", gradient_checkpointing=cfg.gradient_checkpointing)
    return fit_heldout(acc, cfg, model, tokenizer, read_records(cfg.data), record_examples, STAGE)


if __name__ == "__main__":
    setup(parse_args(TrainConfig))
