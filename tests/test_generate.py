"""generate.py: the sampling loop, its stop conditions and forcing, and the incremental detokeniser."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from lm_fixtures import build_tiny_lm

from speechgpt_app.generate import (
    IncrementalDetokenizer,
    SamplingOptions,
    choose_token,
    decode,
    encode_continuation,
    make_generator,
    mask_top_k,
    mask_top_p,
    prefix_cache,
    stream_tokens,
)

N_UNITS = 20


@pytest.fixture(scope="module")
def lm():
    """(tokenizer, tiny random Llama) with SpeechGPT's added tokens."""
    return build_tiny_lm(N_UNITS)


@pytest.fixture(scope="module")
def prompt_ids(lm):
    tok, _ = lm
    return tok.encode("[Human]: Hello world <eoh>. [SpeechGPT]: ")


def run(lm, prompt_ids, options=SamplingOptions(), **kwargs):
    """All steps of one stream, and the ids it produced."""
    tok, model = lm
    steps = list(stream_tokens(model, tok, prompt_ids, options, **kwargs))
    return steps, [s.token_id for s in steps if s.token_id is not None]


def text_of(steps) -> str:
    return "".join(s.text for s in steps)


def forcing(tok, target: str):
    """A logits hook that makes the answer's ids exactly `tok.encode(target)`, then `</s>`."""
    target_ids = tok.encode(target, add_special_tokens=False) + [tok.eos_token_id]

    def hook(ids, logits):
        out = torch.full_like(logits, float("-inf"))
        out[target_ids[len(ids)]] = 0.0
        return out

    return hook


# --- the detokeniser ------------------------------------------------------------------------------

PIECES = list("ab é你;:[]<>\n") + ["<3>", "<sosp>", "<eosp>", "<eoa>", "[ta] ", "hello", "country"]
TEXT = st.lists(st.sampled_from(PIECES), max_size=25).map("".join)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT)
def test_detokenizer_deltas_join_to_decode_of_encoded_text(lm, text):
    tok, _ = lm
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(deltas) == decode(tok, ids)
    # Pieces of a character never come out on their own.
    assert all("\ufffd" not in d for d in deltas)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_detokenizer_on_any_ids_including_invalid_byte_runs(lm, data):
    tok, _ = lm
    ids = data.draw(st.lists(st.integers(3, len(tok) - 1), max_size=30))
    detok = IncrementalDetokenizer(tok)
    joined = "".join(detok.push(i) for i in ids) + detok.flush()
    assert joined == decode(tok, ids) == detok.text


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_detokenizer_truncate_then_continue(lm, data):
    tok, _ = lm
    ids = data.draw(st.lists(st.integers(3, len(tok) - 1), min_size=1, max_size=20))
    more = data.draw(st.lists(st.integers(3, len(tok) - 1), max_size=10))
    cut = data.draw(st.integers(0, len(ids)))
    # A byte-fallback run that spans the cut would change text already final (truncate's contract).
    is_byte = [t.startswith("<0x") for t in tok.convert_ids_to_tokens(ids[:cut][-1:] + more[:1])]
    assume(not (len(is_byte) == 2 and all(is_byte)))
    detok = IncrementalDetokenizer(tok)
    for i in ids:
        detok.push(i)
    detok.truncate(cut)
    assert detok.text == decode(tok, ids[:cut])
    joined = detok.text + "".join(detok.push(i) for i in more) + detok.flush()
    assert joined == decode(tok, ids[:cut] + more)


def test_detokenizer_holds_a_multibyte_character_until_complete(lm):
    tok, _ = lm
    ids = tok.encode("é你 ok", add_special_tokens=False)
    pieces = tok.convert_ids_to_tokens(ids)
    assert sum(p.startswith("<0x") for p in pieces) == 5  # é and 你 as byte-fallback pieces
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.push(i) for i in ids]
    # Nothing while the byte run lasts; the whole characters once a normal piece ends it.
    first_normal = next(i for i, p in enumerate(pieces) if i > 1 and not p.startswith("<0x"))
    assert deltas[:first_normal] == [""] * first_normal
    assert "".join(deltas) + detok.flush() == "é你 ok"
    assert deltas[first_normal].startswith("é你")


def test_continuation_has_no_dummy_prefix_and_matches_training_ids(lm):
    tok, _ = lm
    previous = tok.encode("answer", add_special_tokens=False)
    ids = encode_continuation(tok, "; [ua] <sosp><3>", previous)
    # Same ids as the answer encoded in one piece, as training did.
    assert previous + ids == tok.encode("answer; [ua] <sosp><3>", add_special_tokens=False)
    assert decode(tok, previous + ids).startswith("answer; [ua]")


# --- masks and sampling ---------------------------------------------------------------------------


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([0.1, 3.0, -1.0, 2.0, 0.5])
    masked = mask_top_k(logits, 2)
    assert torch.isfinite(masked).nonzero().flatten().tolist() == [1, 3]
    assert torch.equal(mask_top_k(logits, 0), logits)
    assert torch.equal(mask_top_k(logits, 10), logits)


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.floats(-5, 5, allow_nan=False), min_size=1, max_size=12, unique=True),
    p=st.floats(0.01, 1.0),
)
def test_top_p_keeps_the_smallest_head_that_reaches_p(values, p):
    logits = torch.tensor(values, dtype=torch.float64)
    kept = torch.isfinite(mask_top_p(logits, p)).tolist()
    probs = logits.softmax(-1).tolist()
    # Reference definition: walking down by probability, a token stays while the mass above it is < p.
    mass = 0.0
    for i in sorted(range(len(values)), key=lambda i: -values[i]):
        if abs(mass - p) > 1e-9:  # leave float rounding at the exact boundary alone
            assert kept[i] == (mass < p or mass == 0.0)
        mass += probs[i]


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.integers(0, 40), p=st.floats(0.05, 1.0), t=st.floats(0.1, 2.0))
def test_masks_keep_what_transformers_warpers_keep(seed, k, p, t):
    """Same candidate set as `generate(do_sample=True, temperature, top_k, top_p)` would sample from."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.randn(1, 64, generator=torch.Generator().manual_seed(seed)) * 3
    ours = mask_top_p(mask_top_k(logits[0] / t, k), p)
    theirs = TemperatureLogitsWarper(t)(None, logits.clone())
    if k > 0:
        theirs = TopKLogitsWarper(k)(None, theirs)
    theirs = TopPLogitsWarper(p)(None, theirs)[0] if p < 1 else theirs[0]
    kept_ours, kept_theirs = torch.isfinite(ours), torch.isfinite(theirs)
    near_edge = (ours.softmax(-1).sort(descending=True).values.cumsum(-1) - p).abs().min() < 1e-5
    assert torch.equal(kept_ours, kept_theirs) or near_edge  # rounding may differ exactly at p


def test_sampling_stays_inside_top_k():
    gen = make_generator(0)
    logits = torch.randn(100, generator=torch.Generator().manual_seed(1))
    top = set(torch.topk(logits, 5).indices.tolist())
    options = SamplingOptions(top_k=5, top_p=1.0, temperature=1.5)
    assert {choose_token(logits, options, gen) for _ in range(200)} <= top


def test_greedy_when_not_sampling_or_at_temperature_zero():
    logits = torch.tensor([0.0, 2.0, 1.0])
    for options in (SamplingOptions(do_sample=False), SamplingOptions(temperature=0)):
        assert choose_token(logits, options, make_generator(0)) == 1


def test_defaults_are_the_released_inference_settings():
    # REFERENCE.md §4, spelled out by hand: sampling at 0.7 / top-p 0.8 / top-k 50, 2048 new tokens, at least 10.
    o = SamplingOptions()
    assert (o.do_sample, o.temperature, o.top_p, o.top_k) == (True, 0.7, 0.8, 50)
    assert (o.max_new_tokens, o.min_new_tokens, o.greedy) == (2048, 10, False)


def test_options_reject_bad_values():
    for bad in ({"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -1}, {"max_new_tokens": 0}):
        with pytest.raises(ValueError):
            SamplingOptions(**bad)
    for seed in (2**64, -(2**63) - 1, 2**70):  # torch cannot seed with these: refused before the answer starts
        with pytest.raises(ValueError, match="seed must be"):
            SamplingOptions(seed=seed)
    for seed in (2**64 - 1, -(2**63), -1, 0):
        make_generator(SamplingOptions(seed=seed).seed)


# --- the loop ---------------------------------------------------------------------------------------


def test_same_seed_same_answer_other_seeds_differ(lm, prompt_ids):
    options = SamplingOptions(seed=7, max_new_tokens=12, temperature=1.0, top_k=0, top_p=1.0)
    _, a = run(lm, prompt_ids, options)
    _, b = run(lm, prompt_ids, options)
    assert a == b and len(a) == 12
    others = {tuple(run(lm, prompt_ids, replace(options, seed=s))[1]) for s in range(4)}
    assert len(others) > 1


def test_greedy_matches_a_full_forward_each_step(lm, prompt_ids):
    tok, model = lm
    steps, ids = run(lm, prompt_ids, SamplingOptions(do_sample=False, max_new_tokens=8, min_new_tokens=8))
    seq = list(prompt_ids)
    with torch.no_grad():
        for _ in range(8):
            logits = model(torch.tensor([seq])).logits[0, -1]
            logits[tok.eos_token_id] = float("-inf")
            seq.append(int(logits.argmax()))
    assert ids == seq[len(prompt_ids) :]
    assert steps[-1].finish == "max_tokens"


def test_stops_at_eoa_in_text_without_streaming_it(lm, prompt_ids):
    tok, _ = lm
    steps, ids = run(lm, prompt_ids, logits_hook=forcing(tok, "hello world; [ta] a<eoa> more text"))
    assert steps[-1].finish == "eoa" and steps[-1].stop == "<eoa>"
    assert text_of(steps) == "hello world; [ta] a"
    assert "<eoa>" in decode(tok, ids)  # the model did write it


def test_stops_at_eos_not_before_min_new_tokens(lm, prompt_ids):
    tok, _ = lm

    def eager_to_end(ids, logits):
        return logits + 100 * torch.nn.functional.one_hot(torch.tensor(tok.eos_token_id), len(logits))

    steps, ids = run(lm, prompt_ids, SamplingOptions(seed=0, min_new_tokens=4), logits_hook=eager_to_end)
    assert steps[-1].finish == "eos"
    assert len(ids) == 4 and tok.eos_token_id not in ids


def test_max_tokens_and_the_context_cap(lm, prompt_ids):
    steps, ids = run(lm, prompt_ids, SamplingOptions(seed=0, max_new_tokens=5, min_new_tokens=5))
    assert steps[-1].finish == "max_tokens" and len(ids) == 5
    steps, ids = run(lm, prompt_ids, SamplingOptions(seed=0, min_new_tokens=50), context_length=len(prompt_ids) + 3)
    assert steps[-1].finish == "max_tokens" and len(ids) == 3
    with pytest.raises(ValueError, match="no room"):
        run(lm, prompt_ids, context_length=len(prompt_ids))


def test_cancel_stops_before_the_next_step(lm, prompt_ids):
    tok, model = lm
    cancel = threading.Event()
    steps = []
    for step in stream_tokens(model, tok, prompt_ids, SamplingOptions(seed=0, min_new_tokens=100), cancel=cancel):
        steps.append(step)
        if len(steps) == 3:
            cancel.set()
    assert steps[-1].finish == "cancelled"
    assert len([s for s in steps if s.token_id is not None]) == 3


def test_forced_prefix_is_streamed_and_the_model_goes_on(lm, prompt_ids):
    tok, _ = lm
    steps, ids = run(lm, prompt_ids, SamplingOptions(seed=0, max_new_tokens=20, min_new_tokens=20), prefix="ask not; [ta] ")
    forced = [s for s in steps if s.forced]
    assert ids[: len(forced)] == tok.encode("ask not; [ta] ", add_special_tokens=False)
    assert text_of(steps).startswith("ask not; [ta] ")
    assert steps[-1].stats.forced_tokens == len(forced) and steps[-1].stats.sampled_tokens == 20 - len(forced)


def _recording(hook, seen):
    def record(ids, logits):
        seen.append((list(ids), logits.clone()))
        return hook(ids, logits)

    return record


def _assert_cache_consistent(model, prompt_ids, seen, eos_id):
    """Every logits the loop used equal a fresh forward over prompt + answer so far (no stale cache)."""
    with torch.no_grad():
        for ids, logits in seen:
            fresh = model(torch.tensor([list(prompt_ids) + ids])).logits[0, -1]
            keep = torch.arange(len(fresh)) != eos_id  # </s> is masked before min_new_tokens
            torch.testing.assert_close(logits[keep], fresh[keep], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("ending", ["<eoa>", "</s>"])
def test_on_stop_forces_a_continuation_in_place_of_the_stop(lm, prompt_ids, ending):
    """A text answer that ends (by <eoa> or </s>) is taken back and continued with forced text."""
    tok, model = lm
    first = "hi; [ta] ok"

    def script(ids, logits):
        text = decode(tok, ids)
        if "<sosp>" in text:
            target = text[: text.index("<sosp>")] + "<sosp><3><eosp><eoa>"
        else:
            target = first + ("<eoa>" if ending == "<eoa>" else "")
        remaining = target[len(text) :] if target.startswith(text) else ""
        out = torch.full_like(logits, float("-inf"))
        out[encode_continuation(tok, remaining, ids)[0] if remaining else tok.eos_token_id] = 0.0
        return out

    calls = []

    def on_stop(reason, text):
        calls.append((reason, text))
        return "; [ua] <sosp>" if len(calls) == 1 else None

    seen = []
    steps, _ = run(lm, prompt_ids, logits_hook=_recording(script, seen), on_stop=on_stop)
    # This tokenizer renders added tokens without the spaces around them.
    final = first + "; [ua]<sosp><3><eosp>"
    assert calls == [("eoa" if ending == "<eoa>" else "eos", first), ("eoa", final)]
    assert text_of(steps) == final
    assert steps[-1].finish == "eoa"
    _assert_cache_consistent(model, prompt_ids, seen, tok.eos_token_id)


def test_stats_count_tokens_and_time(lm, prompt_ids):
    steps, ids = run(lm, prompt_ids, SamplingOptions(seed=0, max_new_tokens=6, min_new_tokens=6))
    stats = steps[-1].stats
    assert stats.prompt_tokens == len(prompt_ids) and stats.sampled_tokens == 6
    assert 0 < stats.prefill_s <= stats.total_s and stats.tokens_per_s > 0


def _greedy(lm, ids, n=10):
    steps, out = run(lm, ids, SamplingOptions(do_sample=False, max_new_tokens=n, min_new_tokens=n))
    return steps[-1].stats, out


def test_a_next_turn_reuses_the_cache_and_answers_as_a_full_recompute(lm, prompt_ids):
    """A prompt that repeats an earlier turn's prompt and answer prefills only what follows them."""
    tok, model = lm
    store = prefix_cache(model)
    store.clear()
    _, first = _greedy(lm, prompt_ids)
    follow_up = list(prompt_ids) + first + tok.encode(" And then? <eoh>.", add_special_tokens=False)
    stats, reused = _greedy(lm, follow_up)
    # The first answer's last token was chosen but never run through the model: all the rest is reused.
    assert stats.cached_tokens == len(prompt_ids) + len(first) - 1
    store.clear()
    stats, fresh = _greedy(lm, follow_up)
    assert stats.cached_tokens == 0 and reused == fresh


def test_a_changed_history_is_recomputed(lm, prompt_ids):
    tok, model = lm
    prefix_cache(model).clear()
    _greedy(lm, prompt_ids)
    trimmed = tok.encode("[Human]: Something else entirely <eoh>. [SpeechGPT]: ")
    stats, _ = _greedy(lm, trimmed)
    assert stats.cached_tokens == 0


def test_the_same_prompt_again_reuses_all_but_its_last_token(lm, prompt_ids):
    _, model = lm
    prefix_cache(model).clear()
    _, a = _greedy(lm, prompt_ids)
    stats, b = _greedy(lm, prompt_ids)
    assert stats.cached_tokens == len(prompt_ids) - 1 and a == b


def test_the_store_keeps_a_bounded_number_of_answers(lm):
    tok, model = lm
    store = prefix_cache(model)
    store.clear()
    for i in range(store.capacity + 3):
        _greedy(lm, tok.encode(f"[Human]: Question number {i} <eoh>. [SpeechGPT]: "), n=2)
    assert len(store) == store.capacity


def test_a_cancelled_answer_leaves_a_consistent_cache(lm, prompt_ids):
    """Stopped mid-answer, the kept cache holds exactly the ids that went through the model."""
    tok, model = lm
    prefix_cache(model).clear()
    cancel = threading.Event()
    ids = []
    for step in stream_tokens(model, tok, prompt_ids, SamplingOptions(do_sample=False, min_new_tokens=50), cancel=cancel):
        if step.token_id is not None:
            ids.append(step.token_id)
        if len(ids) == 5:
            cancel.set()
    follow_up = list(prompt_ids) + ids + tok.encode(" more", add_special_tokens=False)
    stats, reused = _greedy(lm, follow_up)
    prefix_cache(model).clear()
    assert stats.cached_tokens == len(prompt_ids) + 4 and reused == _greedy(lm, follow_up)[1]
