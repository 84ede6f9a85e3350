"""Export: the trained stages -> the model bundle the app loads (`Pipeline.load(bundle_dir)`).

    python -m training.export --config training/recipes/tiny/export.yaml [--merge false] [--push_to_hub me/speechgpt-tiny]

Writes bundle.py's layout: `lm/` (the stage-2 model, or it with the stage-3 LoRA merged in),
`adapter/` (the LoRA, when not merged), `speech/` (the speech tokenizer the data was built with, plus
a unit vocoder), `bundle.json` (schema version, prompt style `explicit`, provenance: every stage's
config, steps and losses, the data files, seeds, library versions) and a model card (README.md).
Without a trained vocoder (`vocoder_dir`), a small randomly initialised one is written and the
provenance says so: its speech is noise until the vocoder is trained.
"""

from __future__ import annotations

import json
import platform
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from speechgpt_app.loaders import sha256_file
from training.config import parse_args, to_dict
from training.fit import TRAINING_JSON

# A small fairseq-shaped unit HiFi-GAN: hop 5*4*4*2*2 = 320 samples = 50 units/s at 16 kHz, like the released one.
TINY_VOCODER = {
    "upsample_rates": [5, 4, 4, 2, 2],
    "upsample_kernel_sizes": [11, 8, 8, 4, 4],
    "upsample_initial_channel": 64,
    "resblock_kernel_sizes": [3],
    "resblock_dilation_sizes": [[1, 3, 5]],
    "embedding_dim": 32,
    "model_in_dim": 32,
    "dur_predictor_params": {
        "encoder_embed_dim": 32,
        "var_pred_hidden_dim": 32,
        "var_pred_kernel_size": 3,
        "var_pred_dropout": 0.5,
    },
    "sampling_rate": 16_000,
    "code_hop_size": 320,
}
TRAINER_CHECKPOINT = "checkpoint.pt"  # the unit encoder's and vocoder's resumable state: not shipped
LIBRARIES = ("torch", "transformers", "peft", "accelerate", "tokenizers", "sentencepiece", "safetensors")


@dataclass(frozen=True)
class ExportConfig:
    """Where the stages' outputs are and how to assemble the bundle."""

    lm: str  # stage-2 model directory (the LoRA's base)
    speech_dir: str  # the speech tokenizer the training data was built with
    out: str  # the bundle directory to write
    adapter: str | None = None  # stage-3 model directory (PEFT LoRA); None = the stage-2 model alone
    merge: bool = True  # merge the LoRA into lm/ (one full model) or keep it as adapter/
    name: str = "speechgpt-tiny"
    vocoder_dir: str | None = None  # a trained vocoder directory; None = small untrained vocoder
    vocoder_seed: int = 0
    context_length: int = 1024  # the tiny models' position budget (7B: 2048)
    recipe: str | None = None  # recorded in provenance
    data: tuple[str, ...] = ()  # training data files, recorded (path, size, sha256) in provenance
    description: str = ""
    weights_dtype: str = "float32"  # "float16" halves the bundle (small models ship in the repository)
    max_new_tokens: int | None = None  # the bundle's generation override (its answers' longest sensible length)
    greedy: bool = False  # default decoding greedy (temperature 0, which the page's slider shows too)
    notice: str = ""  # a plain line the page shows beside the model's name (what it cannot do)
    push_to_hub: str | None = None  # Hub repo id to upload the bundle to (needs a token and network)
    private: bool = True


def generation(cfg: ExportConfig) -> dict[str, object]:
    """bundle.json's `generation` overrides from the export settings."""
    out: dict[str, object] = {"max_new_tokens": cfg.max_new_tokens} if cfg.max_new_tokens else {}
    return {**out, "temperature": 0.0} if cfg.greedy else out  # SamplingOptions.greedy: temperature 0


class ExportError(ValueError):
    """A stage output the export cannot use."""


def _copy_model_dir(src: Path, dst: Path) -> None:
    """Copy a saved model directory, without training-only files."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("README.md"), dirs_exist_ok=False)


def write_lm(cfg: ExportConfig, out: Path) -> tuple[str, str | None]:
    """lm/ and adapter/ in the bundle; returns their locations for bundle.json."""
    lm_src = Path(cfg.lm)
    if not (lm_src / "config.json").is_file():
        raise ExportError(f"{lm_src} is not a saved model directory (no config.json): pass the stage-2 model")
    if cfg.adapter is None:
        _copy_model_dir(lm_src, out / "lm")
        return "lm", None
    adapter_src = Path(cfg.adapter)
    if not (adapter_src / "adapter_config.json").is_file():
        raise ExportError(f"{adapter_src} is not a PEFT adapter directory (no adapter_config.json): pass the stage-3 model")
    if not cfg.merge:
        _copy_model_dir(lm_src, out / "lm")
        _copy_model_dir(adapter_src, out / "adapter")
        return "lm", "adapter"
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from training.lm import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(lm_src, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter_src).merge_and_unload()
    merged.to(getattr(torch, cfg.weights_dtype)).save_pretrained(out / "lm", safe_serialization=True)
    load_tokenizer(str(adapter_src)).save_pretrained(out / "lm")
    for extra in (TRAINING_JSON,):  # keep the lm's own training record next to its weights
        if (lm_src / extra).is_file():
            shutil.copy(lm_src / extra, out / "lm" / extra)
    return "lm", None


def write_speech(cfg: ExportConfig, out: Path, n_units: int) -> dict[str, Any]:
    """speech/: the tokenizer's files and a vocoder; returns the vocoder's provenance."""
    import torch

    from speechgpt_app.units import read_speech_config
    from speechgpt_app.vocoder import CodeHiFiGAN, VocoderConfig, save_vocoder_dir

    src = Path(cfg.speech_dir)
    speech = read_speech_config(src)
    if speech.n_units != n_units:
        raise ExportError(f"the speech dir has {speech.n_units} units but the language model knows {n_units}")
    dst = out / "speech"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("vocoder", TRAINER_CHECKPOINT))
    if cfg.vocoder_dir is not None:
        shutil.copytree(cfg.vocoder_dir, dst / "vocoder", ignore=shutil.ignore_patterns(TRAINER_CHECKPOINT))
        return {"source": str(cfg.vocoder_dir), "trained": True}
    config = {**TINY_VOCODER, "num_embeddings": n_units}
    torch.manual_seed(cfg.vocoder_seed)
    model = CodeHiFiGAN(VocoderConfig.from_dict(config))
    save_vocoder_dir(dst / "vocoder", config, model.legacy_state_dict())
    return {
        "trained": False,
        "note": "UNTRAINED: randomly initialised small unit HiFi-GAN; its speech is noise (training it is a later task)",
        "seed": cfg.vocoder_seed,
    }


def stage_chain(model_dir: Path) -> list[dict[str, Any]]:
    """The training.json of this model and of every model it was trained from, oldest first."""
    chain, seen = [], set()
    current: Path | None = model_dir
    while current is not None and (current / TRAINING_JSON).is_file() and current.resolve() not in seen:
        seen.add(current.resolve())
        record = json.loads((current / TRAINING_JSON).read_text())
        chain.append(record)
        base = record.get("config", {}).get("base")
        current = Path(base) if base else None
    return chain[::-1]


def _file_facts(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        return {"path": path, "missing": True}
    return {"path": path, "bytes": p.stat().st_size, "sha256": sha256_file(p)}


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for lib in LIBRARIES:
        try:
            found[lib] = version(lib)
        except PackageNotFoundError:
            continue
    return found


def provenance(cfg: ExportConfig, vocoder: dict[str, Any]) -> dict[str, Any]:
    """Recipe, stages (config, steps, losses, seeds), data files, vocoder, library versions."""
    last = Path(cfg.adapter) if cfg.adapter else Path(cfg.lm)
    return {
        "recipe": cfg.recipe,
        "stages": stage_chain(last),
        "data": [_file_facts(d) for d in cfg.data],
        "adapter": "merged" if cfg.adapter and cfg.merge else ("kept" if cfg.adapter else None),
        "vocoder": vocoder,
        "libraries": _versions(),
        "exported": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "export_config": to_dict(cfg),
    }


def model_card(info) -> str:
    """README.md for the bundle (and the Hub): what it is, how it was trained, how to run it."""
    stages = info.provenance.get("stages", [])
    rows = "\n".join(
        f"| {s['stage']} | {s.get('steps', 0)} | {s.get('final_train_loss')} | {s.get('final_eval_loss')} |"
        for s in stages
    )
    vocoder = info.provenance.get("vocoder", {})
    warning = f"\n**Vocoder:** {vocoder['note']}\n" if not vocoder.get("trained", True) else ""
    return f"""---
library_name: transformers
tags: [speechgpt, speech, discrete-units]
---
# {info.name}

A SpeechGPT-style model bundle trained with this project's `training/` scripts: a Llama language
model with {info.n_units} speech-unit tokens, its speech tokenizer and a unit vocoder.
{warning}
Run it: `python -m speechgpt_app ask --model <this bundle> --audio question.wav`, or in Python
`Pipeline.load("<this bundle>").respond(audio=...)`.

| stage | steps | last train loss | held-out loss |
| --- | --- | --- | --- |
{rows}

Prompt style: `{info.prompt_style}`. Full provenance (configs, data hashes, library versions) is in `bundle.json`.
"""


def main(cfg: ExportConfig) -> Path:
    """Write the bundle and check it reads back; optionally push it to the Hub."""
    from speechgpt_app.bundle import BundleInfo, read_bundle, write_bundle
    from speechgpt_app.vocab import count_units
    from training.lm import load_tokenizer

    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} exists and is not empty: choose a new bundle directory")
    out.mkdir(parents=True, exist_ok=True)
    lm, adapter = write_lm(cfg, out)
    n_units = count_units(load_tokenizer(str(out / lm)))
    vocoder = write_speech(cfg, out, n_units)
    info = BundleInfo(
        name=cfg.name,
        n_units=n_units,
        prompt_style="explicit",  # stage-3 records carry the explicit output instruction
        lm=lm,
        adapter=adapter,
        context_length=cfg.context_length,
        generation=generation(cfg),
        provenance=provenance(cfg, vocoder),
        description=cfg.description or f"{cfg.name}: trained with training/ ({cfg.recipe or 'no recipe given'})",
        notice=cfg.notice,
    )
    write_bundle(out, info)
    (out / "README.md").write_text(model_card(info), encoding="utf-8")
    read_bundle(out)  # the app's own check: parts present, unit counts agree
    if cfg.push_to_hub:
        push(out, cfg.push_to_hub, cfg.private)
    return out


def push(bundle: Path, repo: str, private: bool) -> str:
    """Upload the bundle directory to a Hub model repo (needs `huggingface-cli login` and network)."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(folder_path=str(bundle), repo_id=repo, repo_type="model", commit_message="Upload SpeechGPT bundle")
    return f"https://huggingface.co/{repo}"


if __name__ == "__main__":
    print(main(parse_args(ExportConfig)))
