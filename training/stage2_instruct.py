"""Stage 2, cross-modal instruction finetuning: ASR- and TTS-style records, all weights.

Adds `[Human]`, `[SpeechGPT]`, `<eoh>`, `<eos>` to the stage-1 tokenizer and trains on
`{"prefix", "plain_text"}` records with the loss masked on the system prompt (prefix) only.

    python -m training.stage2_instruct --config training/recipes/tiny/stage2.yaml
"""

from __future__ import annotations

from training.config import parse_args
from training.data.formats import read_records
from training.examples import fit_heldout, record_examples
from training.fit import FitResult, TrainConfig, make_accelerator
from training.lm import load_extended, resolve_base

STAGE = "stage2"


def setup(cfg: TrainConfig) -> FitResult:
    """Seed, build the Accelerator, run main()."""
    return main(make_accelerator(cfg), cfg)


def main(acc, cfg: TrainConfig) -> FitResult:
    """Add the stage-2 tokens to the stage-1 model and finetune every weight on cross-modal records."""
    tokenizer, model = load_extended(
        resolve_base(cfg.base), cfg.n_units, stage2=True, precision=cfg.precision
    )
    return fit_heldout(acc, cfg, model, tokenizer, read_records(cfg.data), record_examples, STAGE)


if __name__ == "__main__":
    setup(parse_args(TrainConfig))
