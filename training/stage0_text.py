"""Stage 0, text pretraining (tiny recipes only): the seeded base learns its domain's text.

The 7B recipe starts from LLaMA-7B, which already knows what the answers say; a base seeded by
`stage0_base` knows nothing, and teaching facts through the speech stages alone is slow (the LoRA of
stage 3 then has to learn them from speech records). So the small recipe first trains every weight on
plain text lines (the recipe's `text.txt`: `question; [ta] answer<eoa>`, the chain's own text), packed
into blocks like stage 1's units, with the base tokenizer and no added tokens.

    python -m training.stage0_text --config training/recipes/mini/stage0_text.yaml
"""

from __future__ import annotations

from training.config import parse_args
from training.data.formats import read_text_lines
from training.examples import fit_heldout, packed_blocks
from training.fit import FitResult, TrainConfig, make_accelerator
from training.lm import load_model, load_tokenizer, resolve_base

STAGE = "stage0_text"


def setup(cfg: TrainConfig) -> FitResult:
    """Seed, build the Accelerator, run main()."""
    return main(make_accelerator(cfg), cfg)


def main(acc, cfg: TrainConfig) -> FitResult:
    """Pretrain every weight of the stage-0 base on the recipe's text lines."""
    base = resolve_base(cfg.base)
    tokenizer, model = load_tokenizer(base), load_model(base, precision=cfg.precision)
    return fit_heldout(acc, cfg, model, tokenizer, read_text_lines(cfg.data), packed_blocks, STAGE)


if __name__ == "__main__":
    setup(parse_args(TrainConfig))
