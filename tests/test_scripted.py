"""scripted.py: the scripted test bundle is complete, in the real formats, and says its script exactly."""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors.torch import load_file
from scripted import LABEL, Script, _after, load_scripted, make_scripted_bundle

from speechgpt_app.audio import load_audio
from speechgpt_app.bundle import read_bundle
from speechgpt_app.events import Answer, End, Heard, Units
from speechgpt_app.generate import SamplingOptions, decode, stream_tokens
from speechgpt_app.parser import parse
from speechgpt_app.prompt import format_prompt
from speechgpt_app.units import SpeechTokenizer
from speechgpt_app.vocab import check_vocabulary, load_tokenizer
from speechgpt_app.vocoder import Vocoder

HEARD = "ask not what your country can do"
ANSWER = "Café au lait, s'il vous plaît: 42."
UNITS = (0, 5, 19, 3, 3, 8)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_scripted_bundle(tmp_path_factory.mktemp("s") / "b", HEARD, ANSWER, UNITS, n_units=20, seed=1)


def test_bundle_is_complete_and_labelled(bundle, lj_wav):
    info = read_bundle(bundle)
    assert (info.n_units, info.adapter, info.sample_rate) == (20, "adapter", 16_000)
    assert info.description == LABEL and info.provenance["note"] == LABEL
    assert json.loads((bundle / "lm" / "script.json").read_text())["note"] == LABEL
    tokenizer = load_tokenizer(bundle / "lm")
    check_vocabulary(tokenizer, 20)
    weights = load_file(bundle / "lm" / "model.safetensors")
    assert weights["model.embed_tokens.weight"].shape[0] == len(tokenizer)
    adapter = json.loads((bundle / "adapter" / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"], sorted(adapter["target_modules"])) == (8, 16, ["q_proj", "v_proj"])
    lora = load_file(bundle / "adapter" / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in lora.items())  # the adapter acts
    speech = SpeechTokenizer.from_dir(bundle / "speech")
    units = speech.encode(load_audio(lj_wav))
    assert speech.n_units == 20 and len(set(units)) > 3 and max(units) < 20
    vocoder = Vocoder.from_dir(bundle / "speech" / "vocoder")
    assert (vocoder.sample_rate, vocoder.hop, vocoder.n_units) == (16_000, 320, 20)
    assert max(vocoder.durations(UNITS)) > 1  # the duration predictor matters


def test_same_arguments_same_bundle(bundle, tmp_path):
    started = time.perf_counter()
    again = make_scripted_bundle(tmp_path / "again", HEARD, ANSWER, UNITS, n_units=20, seed=1)
    assert time.perf_counter() - started < 10  # seconds (about 0.4 s on an idle core; imports are warm here)
    for part in ("lm/model.safetensors", "adapter/adapter_model.safetensors", "speech/centres.safetensors",
                 "speech/vocoder/model.safetensors"):  # fmt: skip
        a, b = load_file(bundle / part), load_file(again / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    assert (bundle / "lm" / "tokenizer.model").read_bytes() == (again / "lm" / "tokenizer.model").read_bytes()


@pytest.mark.parametrize(
    ("task", "expected"),
    [
        ("chat", [Heard(HEARD), Answer(ANSWER), Units(UNITS)]),
        ("transcribe", [Heard(HEARD)]),
        ("speak", [Units(UNITS)]),
    ],
)
def test_hook_makes_a_random_model_say_the_script(bundle, task, expected):
    from transformers import LlamaForCausalLM

    tokenizer = load_tokenizer(bundle / "lm")
    model = LlamaForCausalLM.from_pretrained(bundle / "lm").eval()
    script = Script.from_dir(bundle / "lm")
    prompt = tokenizer.encode(format_prompt("hello"))
    steps = list(stream_tokens(model, tokenizer, prompt, SamplingOptions(seed=0, temperature=1.5),
                               logits_hook=script.logits_hook(tokenizer, task)))  # fmt: skip
    text = "".join(s.text for s in steps)
    assert steps[-1].finish == "eoa"
    assert [e for e in parse(text, 20) if not isinstance(e, End)] == expected
    ids = [s.token_id for s in steps if s.token_id is not None]
    assert ids == tokenizer.encode(script.target(task), add_special_tokens=False)  # training-like tokens
    assert decode(tokenizer, ids).endswith("<eoa>")


def test_after_compares_up_to_whitespace():
    assert _after("[ua] <sosp><1><eosp>", "[ua]<sosp>") == "<1><eosp>"
    assert _after("[ta] answer", "[ta] ") == "answer"
    assert _after("[ta] answer", "[ta]") == " answer"
    assert _after("[ta] answer", "[ta] other") is None
    assert _after("abc", "") == "abc"


def test_refuses_bad_scripts(tmp_path):
    with pytest.raises(ValueError, match="units"):
        make_scripted_bundle(tmp_path / "a", HEARD, ANSWER, (1, 99), n_units=20)
    with pytest.raises(ValueError):
        make_scripted_bundle(tmp_path / "b", HEARD, "answer [ua] inside", UNITS, n_units=20)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x").write_text("")
    with pytest.raises(FileExistsError):
        make_scripted_bundle(tmp_path / "c", HEARD, ANSWER, UNITS, n_units=20)


def test_bundle_without_adapter_loads_and_answers(tmp_path, lj_wav):
    from speechgpt_app.pipeline import Options

    bundle = make_scripted_bundle(tmp_path / "plain", HEARD, ANSWER, UNITS, n_units=20, with_adapter=False)
    assert read_bundle(bundle).adapter is None and not (bundle / "adapter").exists()
    pipeline = load_scripted(bundle, quant="none", device="cpu", precision="fp32")
    assert "LoRA" not in pipeline.description
    events = list(pipeline.respond(audio=lj_wav, options=Options(output="text")))
    assert [type(e) for e in events if isinstance(e, (Heard, Answer))][:1] == [Heard]
    assert events[-1].reason == "eoa" and events[-1].turn.heard == HEARD
