"""model.py: loading the tiny LM in bf16/fp32/NF4, with LoRA merged or not, .bin conversion, and errors."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from lm_fixtures import fake_hub_cache, lora_adapter_dir, released_tokenizer_dir, sharded_bin_dir, tiny_lm_dir
from peft import PeftModel
from safetensors import safe_open

import speechgpt_app.model as model_module
from speechgpt_app.model import (
    LMSpec,
    ModelLoadError,
    converted_dir,
    load_lm,
    quant_from_env,
    resolve_precision,
    resolve_quant,
)
from speechgpt_app.vocab import PAD_ID

N_UNITS = 20
PROMPT = "You are SpeechGPT.\n[Human]: <sosp><1><2><3><eosp> <eoh>. [SpeechGPT]: ask not; [ta] "
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def logits(lm) -> torch.Tensor:
    ids = torch.tensor([lm.tokenizer(PROMPT)["input_ids"]], device=lm.device)
    with torch.no_grad():
        return lm.model(ids).logits.float().cpu()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def bf16_logits() -> torch.Tensor:
    return logits(load_lm(LMSpec(tiny_lm_dir(N_UNITS), device="cpu")))


@pytest.fixture(scope="module")
def fp32_logits() -> torch.Tensor:
    return logits(load_lm(LMSpec(tiny_lm_dir(N_UNITS), precision="fp32", device="cpu")))


def test_spec_rejects_unknown_options():
    with pytest.raises(ValueError, match="quant must be one of"):
        LMSpec("x", quant="fp8")
    with pytest.raises(ValueError, match="precision must be one of"):
        LMSpec("x", precision="half")


def test_quant_from_env(monkeypatch):
    monkeypatch.delenv("SPEECHGPT_QUANT", raising=False)
    assert quant_from_env() == "auto"
    assert quant_from_env("none") == "none"
    monkeypatch.setenv("SPEECHGPT_QUANT", "NF4")
    assert quant_from_env() == "nf4"
    monkeypatch.setenv("SPEECHGPT_QUANT", "int3")
    with pytest.raises(ValueError, match="SPEECHGPT_QUANT='int3'"):
        quant_from_env()


def test_auto_on_cpu_is_fp32_for_small_models_without_quantisation(fp32_logits):
    lm = load_lm(LMSpec(tiny_lm_dir(N_UNITS), device="cpu"))
    assert (lm.dtype, lm.quant, lm.device, lm.n_units) == (torch.float32, "none", torch.device("cpu"), N_UNITS)
    assert {p.dtype for p in lm.model.parameters()} == {torch.float32}
    assert lm.description == f"{tiny_lm_dir(N_UNITS)}, fp32, cpu"
    assert not lm.model.training
    assert not any(p.requires_grad for p in lm.model.parameters())
    assert lm.tokenizer.pad_token_id == PAD_ID and lm.tokenizer.padding_side == "left"
    torch.testing.assert_close(logits(lm), fp32_logits)


def test_auto_precision_is_bf16_for_large_models_on_cpu_and_on_cuda(tmp_path):
    # A 7B-shaped config.json is enough: the choice is made before any weight is read.
    llama7b = {"vocab_size": 33006, "hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 11008}
    (tmp_path / "config.json").write_text(json.dumps(llama7b))
    assert resolve_precision("auto", torch.device("cpu"), tmp_path) == "bf16"
    assert resolve_precision("auto", torch.device("cuda"), Path(tiny_lm_dir(N_UNITS))) == "bf16"
    assert resolve_precision("auto", torch.device("cpu"), Path(tiny_lm_dir(N_UNITS))) == "fp32"
    assert resolve_precision("fp16", torch.device("cpu"), tmp_path) == "fp16"


def test_bf16_on_request(fp32_logits):
    lm = load_lm(LMSpec(tiny_lm_dir(N_UNITS), precision="bf16", device="cpu"))
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}
    assert lm.description == f"{tiny_lm_dir(N_UNITS)}, bf16, cpu"
    assert relative_error(logits(lm), fp32_logits) < 0.02


def test_fp32(fp32_logits):
    lm = load_lm(LMSpec(tiny_lm_dir(N_UNITS), precision="fp32", device="cpu"))
    assert {p.dtype for p in lm.model.parameters()} == {torch.float32}
    assert lm.description.endswith(", fp32, cpu")
    torch.testing.assert_close(logits(lm), fp32_logits)


def test_nf4_on_cpu(bf16_logits):
    import bitsandbytes as bnb

    lm = load_lm(LMSpec(tiny_lm_dir(N_UNITS), quant="nf4", device="cpu"))
    assert lm.quant == "nf4"
    assert lm.description == f"{tiny_lm_dir(N_UNITS)}, NF4 (bf16 compute), cpu"
    for layer in lm.model.model.layers:
        for name in LINEARS:
            module = getattr(layer.self_attn, name, None) or getattr(layer.mlp, name)
            assert isinstance(module, bnb.nn.Linear4bit), name
            assert module.weight.quant_state.quant_type == "nf4"
            assert module.weight.quant_state.nested  # double quantisation
            assert module.compute_dtype == torch.bfloat16
    out = logits(lm)
    assert 0 < relative_error(out, bf16_logits) < 0.15  # quantised: close, not identical


def test_lora_changes_logits_and_merged_equals_unmerged(fp32_logits):
    spec = LMSpec(tiny_lm_dir(N_UNITS), adapter=lora_adapter_dir(N_UNITS), precision="fp32", device="cpu")
    merged = load_lm(spec)
    apart = load_lm(LMSpec(**{**spec.__dict__, "merge_adapter": False}))
    assert not isinstance(merged.model, PeftModel) and isinstance(apart.model, PeftModel)
    assert merged.description.endswith(f"+ LoRA {lora_adapter_dir(N_UNITS)} (merged), fp32, cpu")
    assert "(kept apart)" in apart.description
    with_lora = logits(merged)
    assert relative_error(with_lora, fp32_logits) > 0.01  # the adapter really acts
    torch.testing.assert_close(logits(apart), with_lora, rtol=1e-4, atol=1e-5)


def test_lora_in_bf16_merged_close_to_unmerged():
    spec = LMSpec(tiny_lm_dir(N_UNITS), adapter=lora_adapter_dir(N_UNITS), device="cpu")
    merged = logits(load_lm(spec))
    apart = logits(load_lm(LMSpec(**{**spec.__dict__, "merge_adapter": False})))
    assert relative_error(merged, apart) < 0.02


def test_lora_on_nf4_is_kept_apart():
    lm = load_lm(LMSpec(tiny_lm_dir(N_UNITS), adapter=lora_adapter_dir(N_UNITS), quant="nf4", device="cpu"))
    assert isinstance(lm.model, PeftModel)
    assert "(kept apart: a quantised base cannot be merged)" in lm.description


def test_fp32_bin_is_converted_once_to_bf16_safetensors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    calls = []
    convert = model_module.convert_bin_to_bf16_safetensors
    monkeypatch.setattr(model_module, "convert_bin_to_bf16_safetensors", lambda *a: calls.append(a) or convert(*a))
    src = sharded_bin_dir(N_UNITS)
    first = load_lm(LMSpec(src, precision="bf16", device="cpu"))
    assert len(calls) == 1
    (dest,) = (tmp_path / "hf" / "speechgpt" / "converted").iterdir()
    assert dest.name.endswith("--bf16") and dest == calls[0][1]
    shards = sorted(dest.glob("model-*-of-00003.safetensors"))
    assert len(shards) == 3 and not list(dest.glob("*.bin"))
    index = json.loads((dest / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    with safe_open(shards[0], "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((dest / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert not list(dest.parent.glob("*.partial-*"))

    second = load_lm(LMSpec(src, precision="bf16", device="cpu"))
    assert len(calls) == 1  # reused, not converted again
    reference = load_lm(LMSpec(tiny_lm_dir(N_UNITS), precision="bf16", device="cpu"))  # same weights, safetensors, cast on load
    torch.testing.assert_close(logits(first), logits(reference), rtol=0, atol=0)
    torch.testing.assert_close(logits(second), logits(reference), rtol=0, atol=0)


def test_released_layout_from_the_hub_cache_offline(tmp_path, monkeypatch):
    """Hub ids resolve through the cache offline; the fp32 .bin repo is converted under its repo name."""
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    fake_hub_cache(tmp_path / "hub", "speechgpt-tests/tiny-cm", sharded_bin_dir(N_UNITS))
    fake_hub_cache(tmp_path / "hub", "speechgpt-tests/tiny-com", lora_adapter_dir(N_UNITS))
    lm = load_lm(LMSpec("speechgpt-tests/tiny-cm", adapter="speechgpt-tests/tiny-com", quant="nf4", device="cpu"))
    assert lm.description == (
        "speechgpt-tests/tiny-cm + LoRA speechgpt-tests/tiny-com (kept apart: a quantised base cannot be merged), "
        "NF4 (bf16 compute), cpu"
    )
    assert (converted_dir("speechgpt-tests--tiny-cm") / "model.safetensors.index.json").is_file()
    assert lm.n_units == N_UNITS


def test_converted_dir_is_under_hf_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert converted_dir("fnlp--SpeechGPT-7B-cm") == tmp_path / "speechgpt" / "converted" / "fnlp--SpeechGPT-7B-cm--bf16"


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_gpu_only_quant_on_cpu_is_refused(quant):
    with pytest.raises(ModelLoadError, match=f"quant='{quant}'.*only on a CUDA GPU.*device is cpu"):
        load_lm(LMSpec(tiny_lm_dir(N_UNITS), quant=quant, device="cpu"))


def test_no_device_means_cpu_without_cuda_never_a_hard_coded_cuda(monkeypatch):
    # REFERENCE.md §8: the reference hard-codes `cuda`; here no device means CUDA only when present.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    lm = load_lm(LMSpec(tiny_lm_dir(N_UNITS), precision="fp32"))
    assert lm.device == torch.device("cpu") and next(lm.model.parameters()).device == torch.device("cpu")


def test_cuda_device_without_cuda_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelLoadError, match="asks for a CUDA GPU but this machine has none"):
        load_lm(LMSpec(tiny_lm_dir(N_UNITS), device="cuda"))
    assert resolve_quant("auto", torch.device("cpu")) == "none"


def test_missing_bitsandbytes_is_explained(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    with pytest.raises(ModelLoadError, match="quant='nf4' needs the bitsandbytes package.*pip install bitsandbytes"):
        load_lm(LMSpec(tiny_lm_dir(N_UNITS), quant="nf4", device="cpu"))


def test_missing_torchao_is_explained(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)
    with pytest.raises(ModelLoadError, match="quant='int4' needs the torchao package"):
        resolve_quant("int4", torch.device("cuda", 0))


def test_missing_local_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="language model directory .*nowhere' does not exist"):
        load_lm(LMSpec(tmp_path / "nowhere", device="cpu"))
    with pytest.raises(ModelLoadError, match="LoRA adapter directory .*nowhere' does not exist"):
        load_lm(LMSpec(tiny_lm_dir(N_UNITS), adapter=str(tmp_path / "nowhere"), device="cpu"))


def test_hub_id_not_cached_while_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as err:
        load_lm(LMSpec("speechgpt-tests/no-such-model", device="cpu"))
    message = str(err.value)
    assert "'speechgpt-tests/no-such-model'" in message
    assert "HF_HUB_OFFLINE=1" in message and "hf download speechgpt-tests/no-such-model" in message


def test_directory_without_weights(tmp_path):
    shutil.copytree(released_tokenizer_dir(N_UNITS), tmp_path / "lm")
    with pytest.raises(ModelLoadError, match="no config.json in .*not a transformers model directory"):
        load_lm(LMSpec(tmp_path / "lm", device="cpu"))
    shutil.copy(tiny_lm_dir(N_UNITS) / "config.json", tmp_path / "lm")
    with pytest.raises(ModelLoadError, match=r"no model weights \(\*.safetensors or pytorch_model\*.bin\)"):
        load_lm(LMSpec(tmp_path / "lm", device="cpu"))


def test_vocabulary_must_match_the_speech_model():
    with pytest.raises(ModelLoadError, match=f"language model knows {N_UNITS} units but the speech model has 50"):
        load_lm(LMSpec(tiny_lm_dir(N_UNITS), n_units=50, device="cpu"))
    assert load_lm(LMSpec(tiny_lm_dir(N_UNITS), n_units=N_UNITS, device="cpu")).n_units == N_UNITS


def test_tokenizer_larger_than_embeddings_is_refused(tmp_path):
    shutil.copytree(tiny_lm_dir(N_UNITS), tmp_path / "lm")
    for f in released_tokenizer_dir(N_UNITS + 10).iterdir():  # 10 more units than the model has rows
        shutil.copy(f, tmp_path / "lm" / f.name)
    (tmp_path / "lm" / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match=f"tokenizer has {len(load_lm_tokenizer(N_UNITS + 10))} tokens"):
        load_lm(LMSpec(tmp_path / "lm", device="cpu"))


def load_lm_tokenizer(n_units: int):
    from speechgpt_app.vocab import load_tokenizer

    return load_tokenizer(released_tokenizer_dir(n_units))


@pytest.mark.gpu
def test_auto_on_cuda_is_nf4_and_close_to_bf16(bf16_logits):
    lm = load_lm(LMSpec(tiny_lm_dir(N_UNITS)))
    assert lm.device.type == "cuda" and lm.quant == "nf4"
    assert "NF4 (bf16 compute), cuda:" in lm.description
    assert relative_error(logits(lm), bf16_logits) < 0.15


@pytest.mark.gpu
def test_int8_on_cuda(bf16_logits):
    lm = load_lm(LMSpec(tiny_lm_dir(N_UNITS), quant="int8"))
    assert "int8 LLM.int8" in lm.description
    assert relative_error(logits(lm), bf16_logits) < 0.15
