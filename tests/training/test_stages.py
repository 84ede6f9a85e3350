"""The stages chained on the tiny recipe: data -> stage 0 -> 1 -> 2 -> 3 -> export -> the app's Pipeline.

Stage 2 overfits 8 cross-modal records (under 0.1 nats per token); the exported model, fed a
training record's speech units, greedily writes that record's transcript exactly.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

from speechgpt_app import prompt
from speechgpt_app.events import End, Heard
from training import export, stage0_base, stage1_pretrain, stage2_instruct, stage3_chain
from training.config import parse_args
from training.data.build import build_stage1, build_stage2, build_stage3
from training.data.formats import read_manifest, read_records, split_exchange
from training.examples import record_examples
from training.fit import IGNORE_INDEX, LoraArgs, TrainConfig, checkpoints

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "training" / "recipes" / "tiny"
N_UNITS = 32


@dataclass(frozen=True)
class Chain:
    root: Path
    data: dict[str, Path]
    stage0: Path
    stage1: Path
    stage2: Path
    stage3: Path
    bundle: Path
    stage2_result: object


def _recipe(stage: str, root: Path, **overrides) -> TrainConfig:
    """The tiny recipe, pointed at this test's directories."""
    cfg = parse_args(TrainConfig, ["--config", str(TINY / f"{stage}.yaml")])
    return replace(cfg, tensorboard=False, **overrides)


@pytest.fixture(scope="module")
def chain(tmp_path_factory, corpus: Path, speech_dir: Path) -> Chain:
    root = tmp_path_factory.mktemp("chain")
    instructions = root / "instructions.jsonl"
    instructions.write_text("\n".join((TINY / "instructions.jsonl").read_text().splitlines()[:6]) + "\n")
    data = {"stage1": root / "stage1.txt", "stage2": root / "stage2.jsonl", "stage3": root / "stage3.jsonl"}
    build_stage1(str(corpus), str(speech_dir), str(data["stage1"]), workers=2)
    # Every stage-2 record uses the app's own ASR/TTS instruction, so the app's transcribe mode asks
    # exactly what was trained.
    build_stage2(str(corpus), str(speech_dir), str(data["stage2"]), workers=2, seed=3, app_share=1.0)
    build_stage3(str(instructions), str(speech_dir), str(data["stage3"]), workers=2, seed=0)

    s0 = stage0_base.main(
        stage0_base.Stage0Config(texts=(str(data["stage2"]), str(data["stage3"])), out_dir=str(root / "s0"), vocab_size=400)
    )
    s1 = stage1_pretrain.setup(
        _recipe("stage1", root, base=str(s0), data=str(data["stage1"]), out_dir=str(root / "s1"), max_steps=10,
                block_size=128, eval_examples=2, save_every=0)  # fmt: skip
    ).model_dir
    s2 = stage2_instruct.setup(
        _recipe("stage2", root, base=str(s1), data=str(data["stage2"]), out_dir=str(root / "s2"), max_steps=250, lr=5e-3,
                micro_batch_size=8, eval_examples=0, save_every=0)  # fmt: skip
    )
    s3 = stage3_chain.setup(
        _recipe("stage3", root, base=str(s2.model_dir), data=str(data["stage3"]), out_dir=str(root / "s3"),
                max_steps=6, lr=1e-3, save_every=3)  # fmt: skip
    ).model_dir
    bundle = export.main(
        export.ExportConfig(
            lm=str(s2.model_dir), adapter=str(s3), speech_dir=str(speech_dir), out=str(root / "bundle"),
            recipe="training/recipes/tiny", data=tuple(str(p) for p in data.values()),
        )  # fmt: skip
    )
    return Chain(root, data, s0, s1, s2.model_dir, s3, bundle, s2)


def _nats_per_token(model_dir: Path, records_path: Path, n_units: int) -> float:
    from training.lm import load_model, load_tokenizer

    tok = load_tokenizer(str(model_dir), n_units=n_units)
    model = load_model(str(model_dir)).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in record_examples(read_records(records_path), tok, 512):
            ids, labels = torch.tensor([ex.input_ids]), torch.tensor([ex.labels])
            n = int((labels[:, 1:] != IGNORE_INDEX).sum())
            total += float(model(input_ids=ids, labels=labels).loss) * n
            count += n
    return total / count


def test_stage2_overfits_8_records(chain: Chain) -> None:
    assert len(read_records(chain.data["stage2"])) == 8
    assert chain.stage2_result.train_losses[0] > 2.0
    assert _nats_per_token(chain.stage2, chain.data["stage2"], N_UNITS) < 0.1


def _asr_record(chain: Chain, corpus: Path):
    for entry, record in zip(read_manifest(corpus), read_records(chain.data["stage2"])):
        user, answer = split_exchange(record.plain_text)
        if user.startswith(prompt.ASR_INSTRUCTION):
            return entry, record, user
    pytest.fail("seed 3 gave no ASR-style record")


def test_exported_model_greedily_reproduces_a_training_transcript(chain: Chain, corpus: Path) -> None:
    from speechgpt_app.model import LMSpec, load_lm

    entry, record, user = _asr_record(chain, corpus)
    lm = load_lm(LMSpec(path=chain.bundle / "lm", precision="fp32", quant="none", device="cpu", n_units=N_UNITS))
    ids = lm.tokenizer(record.prefix + prompt.format_exchange(user), return_tensors="pt").input_ids
    with torch.no_grad():
        out = lm.model.generate(ids, do_sample=False, max_new_tokens=60, eos_token_id=lm.tokenizer.eos_token_id)
    text = lm.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert text.split(prompt.EOA)[0].strip() == entry.text


def test_pipeline_loads_the_bundle_and_answers(chain: Chain, corpus: Path, lj_wav: Path) -> None:
    from speechgpt_app.generate import SamplingOptions
    from speechgpt_app.pipeline import Options, Pipeline

    pipe = Pipeline.load(str(chain.bundle), quant="none", device="cpu", precision="fp32")
    entry, _, _ = _asr_record(chain, corpus)
    heard = list(pipe.respond(audio=entry.audio, options=Options(SamplingOptions(do_sample=False, max_new_tokens=60), task="transcribe", output="text")))
    assert isinstance(heard[-1], End) and heard[-1].reason != "error", heard[-1]
    assert "".join(e.text for e in heard if isinstance(e, Heard)).strip() == entry.text
    spoken = list(pipe.respond(audio=str(lj_wav), options=Options(SamplingOptions(max_new_tokens=40, seed=0))))
    assert isinstance(spoken[-1], End) and spoken[-1].reason != "error", spoken[-1]


def test_bundle_provenance_records_every_stage(chain: Chain) -> None:
    info = json.loads((chain.bundle / "bundle.json").read_text())
    assert info["schema_version"] == 1 and info["prompt_style"] == "explicit" and info["n_units"] == N_UNITS
    prov = info["provenance"]
    assert [s["stage"] for s in prov["stages"]] == ["stage0", "stage1", "stage2", "stage3"]
    assert [s["steps"] for s in prov["stages"]] == [0, 10, 250, 6]
    assert all(s["config"]["seed"] == 1234 for s in prov["stages"])
    assert prov["vocoder"]["trained"] is False and "UNTRAINED" in prov["vocoder"]["note"]
    assert {"torch", "transformers", "peft", "accelerate"} <= set(prov["libraries"])
    assert all(len(d["sha256"]) == 64 for d in prov["data"])
    assert "UNTRAINED" in (chain.bundle / "README.md").read_text()


def test_export_keeps_the_adapter_apart_when_asked(chain: Chain, speech_dir: Path, tmp_path: Path) -> None:
    from speechgpt_app.bundle import read_bundle

    out = export.main(export.ExportConfig(lm=str(chain.stage2), adapter=str(chain.stage3), merge=False,
                                          speech_dir=str(speech_dir), out=str(tmp_path / "b"), greedy=True,
                                          notice="answers only its domain", max_new_tokens=64))  # fmt: skip
    info = read_bundle(out)
    assert info.adapter == "adapter" and (out / "adapter" / "adapter_config.json").is_file()
    assert info.generation == {"max_new_tokens": 64, "temperature": 0.0} and info.notice == "answers only its domain"
    with pytest.raises(export.ExportError, match="not empty"):
        export.main(export.ExportConfig(lm=str(chain.stage2), speech_dir=str(speech_dir), out=str(out)))


def test_stage3_resumes_exactly_with_lora_dropout(chain: Chain, tmp_path: Path) -> None:
    cfg = _recipe("stage3", tmp_path, base=str(chain.stage2), data=str(chain.data["stage3"]), out_dir=str(tmp_path / "a"),
                  max_steps=4, save_every=0, eval_every=0, save_model=False)  # fmt: skip
    assert cfg.lora.dropout > 0
    whole = stage3_chain.setup(cfg)
    broken = replace(cfg, out_dir=str(tmp_path / "b"), stop_at_step=2)
    stage3_chain.setup(broken)
    rest = stage3_chain.setup(replace(broken, stop_at_step=0))
    assert rest.resumed_from == 2
    assert rest.train_losses == pytest.approx(whole.train_losses[2:], abs=1e-5)


def test_stage3_qlora_on_a_4bit_base(chain: Chain, tmp_path: Path) -> None:
    cfg = _recipe("stage3", tmp_path, base=str(chain.stage2), data=str(chain.data["stage3"]), out_dir=str(tmp_path / "q"),
                  max_steps=2, save_every=0, eval_every=0, quant="nf4", lora=LoraArgs(r=4, alpha=8, dropout=0.0))  # fmt: skip
    result = stage3_chain.setup(cfg)
    assert result.step == 2 and all(torch.isfinite(torch.tensor(result.train_losses)))
    assert (result.model_dir / "adapter_model.safetensors").is_file()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_stage1_under_accelerate_launch_with_two_cpu_processes(chain: Chain, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "training/accelerate/cpu_2proc.yaml"),
        "--num_processes", "2", "--main_process_port", str(_free_port()),
        "-m", "training.stage1_pretrain", "--config", str(TINY / "stage1.yaml"), "--base", str(chain.stage0),
        "--data", str(chain.data["stage1"]), "--out_dir", str(out), "--max_steps", "3", "--save_every", "0",
        "--eval_examples", "2", "--block_size", "64", "--micro_batch_size", "2", "--tensorboard", "false",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "model" / "training.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 3
    assert len(summary["tokens_per_process"]) == 2 and min(summary["tokens_per_process"]) > 0
    [ckpt] = checkpoints(out)
    assert sorted(p.name for p in ckpt.glob("random_states_*.pkl")) == ["random_states_0.pkl", "random_states_1.pkl"]
    assert (out / "model" / "model.safetensors").is_file()
