"""Stage 1, modality-adaptation pretraining: the LM learns unit sequences of unlabelled speech.

Adds `<0>`..`<n-1>`, `<sosp>`, `<eosp>` to the base tokenizer (vocab.extend_tokenizer), grows the
embeddings (vocab.resize_model) and trains every weight on unit lines packed into blocks.

    python -m training.stage1_pretrain --config training/recipes/tiny/stage1.yaml [--max_steps 20 ...]
    accelerate launch --config_file training/accelerate/fsdp.yaml -m training.stage1_pretrain --config training/recipes/7b/stage1.yaml
"""

from __future__ import annotations

from training.config import parse_args
from training.data.formats import read_unit_lines
from training.examples import fit_heldout, packed_blocks
from training.fit import FitResult, TrainConfig, make_accelerator
from training.lm import load_extended, resolve_base

STAGE = "stage1"


def setup(cfg: TrainConfig) -> FitResult:
    """Seed, build the Accelerator, run main()."""
    return main(make_accelerator(cfg), cfg)


def main(acc, cfg: TrainConfig) -> FitResult:
    """Extend the base's vocabulary with the stage-1 tokens and pretrain on packed unit lines."""
    tokenizer, model = load_extended(
        resolve_base(cfg.base), cfg.n_units, stage2=False, precision=cfg.precision
    )
    return fit_heldout(acc, cfg, model, tokenizer, read_unit_lines(cfg.data, cfg.n_units), packed_blocks, STAGE)


if __name__ == "__main__":
    setup(parse_args(TrainConfig))
