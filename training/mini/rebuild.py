"""Rebuild SpeechGPT-tiny from nothing: speak the corpus, train the unit encoder and the vocoder, build
the records, run stage 0 (tokenizer and seed, then text pretraining) -> 1 -> 2 -> 3, export the bundle and evaluate it.

    python -m training.mini.rebuild                 # the shipped recipe, in runs/mini (about 2 hours on 2 cores)
    python -m training.mini.rebuild --quick --root /tmp/mini   # every step, shortened (a few minutes)
    python -m training.mini.rebuild --install       # then copy the bundle and eval.json into assets/

Every step is skipped when its output exists and resumes when it was interrupted (the corpus keeps
finished files, the trainers keep checkpoints), so rerunning the command after a stop continues
from the last finished step. The recipe's YAML files (training/recipes/mini/) name paths under
runs/mini; `--root` moves them.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from training.config import load_yaml

log = logging.getLogger(__name__)

RECIPE = Path("training/recipes/mini")
DEFAULT_ROOT = "runs/mini"
ASSET_DIR = Path("assets/speechgpt-tiny")
CI_SUBSET_DIR = Path("tests/data/eval-subset")  # the CI evaluation's questions, audio kept in the repository
# Each training module and its recipe file (training/recipes/mini/<name>.yaml, writing runs/mini/<name>).
STAGES = {"stage0_base": "stage0", "stage0_text": "stage0_text", "stage1_pretrain": "stage1",
          "stage2_instruct": "stage2", "stage3_chain": "stage3"}  # fmt: skip


@dataclass(frozen=True)
class Plan:
    """Budgets of one rebuild: the shipped recipe or the quick one (every step, tiny)."""

    speak_limit: int | None  # files per corpus part (None = all)
    units_minutes: float
    vocoder_minutes: float
    stage_steps: dict[str, int | None]  # max_steps override per stage (None = the recipe's)
    eval_limit: int | None  # questions per evaluation set
    eval_max_new_tokens: int | None = None  # caps an untrained model's answers (quick runs)


FULL = Plan(None, 20.0, 20.0, {}, 100)  # 100 questions per evaluation set: about 14 minutes
QUICK = Plan(48, 0.2, 0.2, {"stage0_text": 3, "stage1_pretrain": 3, "stage2_instruct": 3, "stage3_chain": 3}, 6, 48)


def _run(args: list[str]) -> None:
    log.info("$ %s", " ".join(args))
    subprocess.run([sys.executable, *args], check=True)


def _stage_args(stage: str, root: str, plan: Plan) -> list[str]:
    """`--config recipe.yaml` plus overrides moving every runs/mini path under `root`."""
    name = STAGES.get(stage, stage)
    cfg = load_yaml(RECIPE / f"{name}.yaml")
    args = ["-m", f"training.{stage}", "--config", str(RECIPE / f"{name}.yaml")]
    for key in ("base", "data", "replay", "out_dir", "out", "lm", "adapter", "speech_dir", "vocoder_dir"):
        if isinstance(cfg.get(key), str) and cfg[key].startswith(DEFAULT_ROOT):
            args += [f"--{key}", root + cfg[key][len(DEFAULT_ROOT) :]]
    for key in ("texts", "data"):
        if isinstance(cfg.get(key), list):
            args += [f"--{key}", ",".join(root + v[len(DEFAULT_ROOT) :] for v in cfg[key])]
    steps = plan.stage_steps.get(stage)
    if steps is not None:
        args += ["--max_steps", str(steps), "--save_every", str(steps), "--eval_examples", "2"]
    return args


def rebuild(root: Path, plan: Plan, workers: int) -> Path:
    """Run every step that has not finished; return the evaluated bundle's directory."""
    corpus, speech, vocoder, data, bundle = (root / n for n in ("corpus", "speech", "vocoder", "data", "bundle"))
    started = time.monotonic()
    for part in ("questions", "answers", "heldout"):
        if not (corpus / f"{part}.jsonl").is_file():
            limit = ["--limit", str(plan.speak_limit)] if plan.speak_limit else []
            _run(["-m", "training.mini.speak", part, "--out", str(corpus), "--workers", str(workers), *limit])
    if not (speech / "speech.json").is_file():
        _run(["-m", "training.mini.train_units", "--corpus", str(corpus / "questions.jsonl"), "--out", str(speech),
              "--minutes", str(plan.units_minutes), "--eval_items", "8" if plan.speak_limit else "200"])  # fmt: skip
    if not (data / "stage3.jsonl").is_file():
        _run(["-m", "training.mini.records", "--corpus", str(corpus), "--speech-dir", str(speech), "--out", str(data)])
    # The vocoder, then the language model's stages, each with both cores: side by side they slowed the
    # language model three to four times (two trainers' threads on two cores), more than they saved.
    if not (vocoder / "model.safetensors").is_file():
        _run(["-m", "training.mini.train_vocoder", "--corpus", str(corpus / "answers.jsonl"), "--speech-dir",
              str(speech), "--out", str(vocoder), "--minutes", str(plan.vocoder_minutes), "--threads", "2",
              "--eval_items", "4" if plan.speak_limit else "100"])  # fmt: skip
    for stage in STAGES:
        out = root / STAGES[stage] / "model"
        if not (out / "training.json").is_file():
            _run(_stage_args(stage, str(root), plan))
    if not (bundle / "bundle.json").is_file():
        _run(["-m", "training.export", *_stage_args("export", str(root), plan)[2:]])
    if not (bundle / "eval.json").is_file():
        limit = ["--limit", str(plan.eval_limit)] if plan.eval_limit else []
        if plan.eval_max_new_tokens:
            limit += ["--max-new-tokens", str(plan.eval_max_new_tokens)]
        _run(["-m", "speechgpt_app", "eval", "--model", str(bundle), "--sets", str(corpus / "eval"),
              "--json", str(bundle / "eval.json"), *limit])  # fmt: skip
    log.info("rebuild done in %.0f s: %s", time.monotonic() - started, bundle)
    return bundle


def install(bundle: Path, corpus: Path, dest: Path = ASSET_DIR, subset_dir: Path = CI_SUBSET_DIR) -> Path:
    """Copy the bundle (with its eval.json) into assets/ as the app's default model, and the CI
    evaluation subset (its lines and audio) into tests/data/eval-subset."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(bundle, dest)
    if subset_dir.exists():
        shutil.rmtree(subset_dir)
    (subset_dir / "audio").mkdir(parents=True)
    lines = []
    for line in (corpus / "eval" / "ci-subset.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        row.pop("answer_audio", None)  # CI scores text answers only: no recogniser, no reference audio
        src = corpus / "eval" / row["audio"]
        shutil.copy(src, subset_dir / "audio" / src.name)
        row["audio"] = f"audio/{src.name}"
        lines.append(json.dumps(row))
    (subset_dir / "ci-subset.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return dest


def main(argv: list[str] | None = None) -> None:
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=Path(DEFAULT_ROOT), help="where every step writes")
    p.add_argument("--quick", action="store_true", help="every step, shortened to a few minutes (CI)")
    p.add_argument("--workers", type=int, default=2, help="synthesis processes")
    p.add_argument("--install", action="store_true", help=f"copy the bundle into {ASSET_DIR}")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    bundle = rebuild(args.root, QUICK if args.quick else FULL, args.workers)
    if args.install:
        print(install(bundle, args.root / "corpus"))
    print(json.dumps({"bundle": str(bundle)}))


if __name__ == "__main__":
    main()
