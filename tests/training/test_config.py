"""Recipes + overrides -> typed stage arguments."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.config import ConfigError, parse_args
from training.export import ExportConfig
from training.fit import LoraArgs, TrainConfig
from training.stage0_base import Stage0Config

RECIPES = Path(__file__).resolve().parents[2] / "training" / "recipes"


@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("*/stage[123].yaml")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_stage_recipe_parses(recipe: Path) -> None:
    cfg = parse_args(TrainConfig, ["--config", str(recipe)])
    assert cfg.max_steps > 0 and cfg.lr > 0
    if recipe.stem == "stage3":
        assert isinstance(cfg.lora, LoraArgs)


def test_7b_recipes_hold_the_reference_hyperparameters() -> None:
    s1, s2, s3 = (parse_args(TrainConfig, ["--config", str(RECIPES / "7b" / f"stage{i}.yaml")]) for i in (1, 2, 3))
    assert (s1.block_size, s1.lr, s1.schedule, s1.n_units) == (1024, 5e-5, "linear", 1000)
    assert (s2.block_size, s2.lr, s2.schedule, s2.warmup_ratio, s2.weight_decay) == (512, 2e-5, "cosine", 0.03, 0.0)
    assert (s3.block_size, s3.lr, s3.schedule, s3.warmup_ratio) == (1024, 2e-5, "cosine", 0.03)
    assert s3.lora == LoraArgs(r=8, alpha=16, dropout=0.05, targets=("q_proj", "v_proj"))
    assert all(c.precision == "bf16" and c.gradient_checkpointing for c in (s1, s2, s3))
    # stages 1-2 train every weight, stage 3 a LoRA on the reference's 8-bit base
    assert (s1.lora, s1.quant, s2.lora, s2.quant, s3.quant) == (None, "none", None, "none", "int8")
    assert s1.warmup_ratio == 0.0  # "5e-5 default, linear": the HF default schedule has no warmup
    # The paper's scale: steps, and batch = micro x accum x GPUs (96, 96, 8 A100s).
    assert (s1.max_steps, s2.max_steps, s3.max_steps) == (900, 2100, 4200)
    batches = [c.micro_batch_size * c.grad_accum * gpus for c, gpus in ((s1, 96), (s2, 96), (s3, 8))]
    assert batches == [768, 1536, 128]


def test_7b_stages_1_2_launch_fsdp_in_bf16() -> None:
    import yaml

    fsdp = yaml.safe_load((RECIPES.parent / "accelerate" / "fsdp.yaml").read_text())
    assert (fsdp["distributed_type"], fsdp["mixed_precision"]) == ("FSDP", "bf16")
    for stage in (1, 2, 3):  # each recipe's "Launch:" comment: FSDP for stages 1-2, DDP for stage 3
        text = (RECIPES / "7b" / f"stage{stage}.yaml").read_text()
        [launch] = [line for line in text.splitlines() if line.startswith("# Launch: accelerate launch")]
        assert ("fsdp.yaml" in launch) == (stage < 3) and ("--multi_gpu" in launch) == (stage == 3)
        assert f"--config training/recipes/7b/stage{stage}.yaml" in launch


def test_other_recipes_parse() -> None:
    assert parse_args(Stage0Config, ["--config", str(RECIPES / "tiny" / "stage0.yaml")]).vocab_size > 259
    for name in ("tiny", "7b"):
        assert parse_args(ExportConfig, ["--config", str(RECIPES / name / "export.yaml")]).out


def test_overrides_are_typed_and_nested(tmp_path: Path) -> None:
    recipe = RECIPES / "tiny" / "stage3.yaml"
    cfg = parse_args(
        TrainConfig,
        ["--config", str(recipe), "--max_steps", "7", "--lr=0.5", "--lora.r", "4", "--lora.targets", "q_proj,k_proj", "--quant", "nf4"],
    )
    assert (cfg.max_steps, cfg.lr, cfg.quant) == (7, 0.5, "nf4")
    assert cfg.lora == LoraArgs(r=4, alpha=16, dropout=0.05, targets=("q_proj", "k_proj"))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max_stepz", "3"], "unknown option"),
        (["--max_steps", "three"], "expected int"),
        (["--schedule", "exponential"], "not one of"),
        (["--lora.rank", "4"], "unknown option"),
        (["--max_steps"], "needs a value"),
        (["stray"], "unexpected argument"),
        (["--config", "/nonexistent.yaml"], "does not exist"),
    ],
)
def test_bad_arguments_fail_clearly(argv: list[str], message: str) -> None:
    base = ["--base", "b", "--data", "d", "--out_dir", "o"]
    with pytest.raises(ConfigError, match=message):
        parse_args(TrainConfig, base + argv)


def test_missing_required_field() -> None:
    with pytest.raises(ConfigError, match="base"):
        parse_args(TrainConfig, ["--data", "d", "--out_dir", "o"])


@pytest.mark.parametrize("name, kind", [("single_gpu", "NO"), ("fsdp", "FSDP"), ("deepspeed_zero3", "DEEPSPEED"), ("cpu_2proc", "MULTI_GPU")])
def test_accelerate_configs_load(name: str, kind: str) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(RECIPES.parent / "accelerate" / f"{name}.yaml"))
    assert cfg.distributed_type.name == kind
    assert cfg.mixed_precision == ("no" if name == "cpu_2proc" else "bf16")


@pytest.mark.parametrize(
    "stage, recipe",
    [("stage0_base", "tiny/stage0"), ("stage0_text", "mini/stage0_text"), ("stage1_pretrain", "tiny/stage1"),
     ("stage2_instruct", "tiny/stage2"), ("stage3_chain", "tiny/stage3"), ("export", "tiny/export")],
)  # fmt: skip
def test_every_training_script_has_help_with_the_recipe_as_defaults(stage: str, recipe: str) -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", f"training.{stage}", "--config", f"training/recipes/{recipe}.yaml", "--help"],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "usage: python -m training." in proc.stdout and "(recipe)" in proc.stdout
    assert "--out" in proc.stdout
