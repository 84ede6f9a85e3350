"""The lean Llama forward (llama_step) gives transformers' logits, and the same greedy answers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from speechgpt_app import generate, llama_step
from speechgpt_app.generate import SamplingOptions, stream_tokens
from speechgpt_app.loaders import DEFAULT_MODEL
from speechgpt_app.prompt import format_prompt, user_message

SHIPPED_LM = DEFAULT_MODEL / "lm"


def random_llama(**overrides) -> LlamaForCausalLM:
    """A small random Llama; grouped-query attention (4 query heads, 2 key/value heads) by default."""
    cfg = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**cfg, **overrides})).eval()


@pytest.fixture(scope="module")
def shipped() -> LlamaForCausalLM:
    return AutoModelForCausalLM.from_pretrained(SHIPPED_LM, dtype=torch.float32).eval()


def full_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("which", ["shipped", "gqa"])
def test_prefill_offset_prefill_step_and_crop_give_transformers_logits(which, shipped):
    model = shipped if which == "shipped" else random_llama()
    lean = llama_step.for_model(model)
    assert lean is not None
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (40,), generator=g).tolist()
    ref = full_logits(model, ids)
    cache = lean.new_cache()
    close = dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lean.forward(ids[:30], cache), ref[29], **close)  # prefill
    torch.testing.assert_close(lean.forward(ids[30:35], cache), ref[34], **close)  # prefill after a cache
    for t in range(35, 40):  # single steps
        out = lean.forward(ids[t : t + 1], cache)
        torch.testing.assert_close(out, ref[t], **close)
    assert cache.length == 40
    cache.crop(32)  # forget the tail, then run it again
    torch.testing.assert_close(lean.forward(ids[32:40], cache), ref[39], **close)


def test_bfloat16_stays_close_to_transformers():
    model = random_llama().to(torch.bfloat16)
    lean = llama_step.for_model(model)
    assert lean is not None
    ids = list(range(3, 23))
    cache = lean.new_cache()
    lean.forward(ids[:-1], cache)
    torch.testing.assert_close(lean.forward(ids[-1:], cache), full_logits(model, ids)[-1], atol=0.1, rtol=0.05)


def test_a_full_cache_refuses_more_positions():
    model = random_llama(max_position_embeddings=8)
    lean = llama_step.for_model(model)
    cache = lean.new_cache()
    lean.forward(list(range(3, 11)), cache)
    with pytest.raises(ValueError, match="holds 8 positions"):
        lean.forward([3], cache)


@pytest.mark.parametrize(
    "change",
    [
        {"attention_bias": True},
        {"mlp_bias": True},
        {"hidden_act": "gelu"},
        {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}},
    ],
)
def test_unsupported_configurations_keep_transformers_forward(change):
    assert not llama_step.supports(random_llama(**change))


def test_half_precision_adapters_and_other_models_keep_transformers_forward():
    assert not llama_step.supports(random_llama().to(torch.float16))
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(random_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert not llama_step.supports(lora)
    assert not llama_step.supports(torch.nn.Linear(2, 2))
    assert llama_step.for_model(object()) is None  # not even weakly referenceable


def test_greedy_answer_of_the_shipped_model_is_the_same_either_way(shipped, monkeypatch):
    """Through the real token loop: a typed question answered greedily, on the lean path and on
    transformers' forward, gives the same ids."""
    tok = AutoTokenizer.from_pretrained(SHIPPED_LM)
    ids = tok(format_prompt(user_message("chat", "speech+text", text="What is seven plus five?", style="explicit"))).input_ids
    options = SamplingOptions(do_sample=False, max_new_tokens=60)

    def answer() -> list[int]:
        generate.prefix_cache(shipped).clear()
        return [s.token_id for s in stream_tokens(shipped, tok, ids, options) if s.token_id is not None]

    lean = answer()
    monkeypatch.setattr(llama_step, "for_model", lambda model: None)
    assert answer() == lean
    assert len(lean) >= 32
