"""pipeline.py end to end on the scripted test model (real audio in, exact events and audio out), and
on the shipped SpeechGPT-tiny where the model itself must decide (a second turn over a reused cache)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scripted import LABEL, load_scripted, make_scripted_bundle

from speechgpt_app.audio import AudioError
from speechgpt_app.events import Answer, Audio, End, Heard, Notice, Units
from speechgpt_app.generate import SamplingOptions, prefix_cache
from speechgpt_app.loaders import DEFAULT_MODEL
from speechgpt_app.model import ModelLoadError
from speechgpt_app.parser import coalesce
from speechgpt_app.pipeline import (
    CHUNK_GROWTH,
    CHUNK_UNITS,
    MODEL_ENV,
    Options,
    Pipeline,
    Timings,
    VocoderThread,
    VoiceLine,
)
from speechgpt_app.prompt import PromptError, assistant_prefix_for, format_exchange

HEARD = "unless a system is established"
ANSWER = "Yes, a formal review."
UNITS = (3, 7, 12, 40, 1, 22, 9, 30, 5, 17, 44, 2, 8)
GREEDY = Options(SamplingOptions(do_sample=False))


@pytest.fixture(scope="session")
def bundle(tmp_path_factory):
    return make_scripted_bundle(tmp_path_factory.mktemp("scripted") / "b", HEARD, ANSWER, UNITS)


@pytest.fixture(scope="session")
def pipeline(bundle):
    return load_scripted(bundle, quant="none", device="cpu", precision="fp32")


@pytest.fixture(scope="session")
def text_first_pipeline(tmp_path_factory):
    """A scripted model that stops after its text answer (the units come only if forced)."""
    out = tmp_path_factory.mktemp("scripted") / "text-first"
    return load_scripted(make_scripted_bundle(out, HEARD, ANSWER, UNITS, stop_after_text=True), quant="none", device="cpu", precision="fp32")


def parsed(events):
    """The Heard/Answer/Units events, coalesced (what the chain-of-modality answer said)."""
    return coalesce([e for e in events if isinstance(e, (Heard, Answer, Units))])


def audio_of(events) -> np.ndarray:
    chunks = [e.pcm for e in events if isinstance(e, Audio)]
    return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)


def first(events, kind) -> int:
    return next(i for i, e in enumerate(events) if isinstance(e, kind))


def check_spoken_turn(pipeline, events, tmp_path):
    assert parsed(events) == [Heard(HEARD), Answer(ANSWER), Units(UNITS)]
    assert first(events, Heard) < first(events, Answer) < first(events, Units) < first(events, Audio)
    end = events[-1]
    assert isinstance(end, End) and end.reason == "eoa" and end.problems == ()
    assert sum(isinstance(e, End) for e in events) == 1
    # The answer audio: as long as the vocoder says, the same as decoding the units at once.
    wav = audio_of(events)
    assert len(wav) == sum(pipeline.vocoder.durations(UNITS)) * pipeline.vocoder.hop
    np.testing.assert_allclose(wav, pipeline.vocoder.decode(UNITS), atol=1e-5)
    assert {e.sample_rate for e in events if isinstance(e, Audio)} == {16_000}
    out = tmp_path / "answer.wav"
    sf.write(out, wav, pipeline.sample_rate)
    assert sf.info(out).frames == len(wav)
    # Stamps: milliseconds since the input was complete, in order.
    stamps = [e.t_ms for e in events]
    assert stamps == sorted(stamps) and stamps[0] >= 0


def test_spoken_turn_exact_events_and_audio(pipeline, lj_wav, tmp_path):
    events = list(pipeline.respond(audio=lj_wav, options=GREEDY))
    check_spoken_turn(pipeline, events, tmp_path)
    turn = events[-1].turn
    question = pipeline.speech.encode(__import__("speechgpt_app.audio").audio.load_audio(lj_wav))
    assert turn.user == "<sosp>" + "".join(f"<{u}>" for u in question) + "<eosp>"
    assert turn.heard == HEARD and turn.assistant.endswith("<eoa>") and ANSWER in turn.assistant
    assert pipeline.n_units == 50 and pipeline.sample_rate == 16_000 and pipeline.context_length == 1024
    assert pipeline.description == "scripted-test-model (LoRA merged), fp32, cpu"
    assert pipeline.warning == LABEL and LABEL not in pipeline.description  # said once, by the front end
    details = pipeline.details
    assert details["bundle"] == str(pipeline.bundle_dir) and details["adapter"] == str(pipeline.bundle_dir / "adapter")
    assert details["adapter_merged"] is True and details["numerics"] == "fp32" and details["device"] == "cpu"


def test_sampling_settings_do_not_change_a_scripted_answer(pipeline, lj_wav, tmp_path):
    events = list(pipeline.respond(audio=lj_wav, options=Options(SamplingOptions(seed=3, temperature=1.3), chunk_units=3)))
    check_spoken_turn(pipeline, events, tmp_path)


@pytest.mark.parametrize(("quant", "merge"), [("nf4", True), ("none", False), ("none", True)])
def test_quantised_and_adapter_variants(bundle, lj_wav, tmp_path, quant, merge):
    variant = load_scripted(bundle, quant=quant, device="cpu", precision="fp32", merge_adapter=merge)
    kept_apart = type(variant.lm.model).__name__.startswith("Peft")
    assert kept_apart == (quant != "none" or not merge)
    assert ("NF4" in variant.description) == (quant == "nf4")
    assert variant.description.startswith(f"scripted-test-model (LoRA {'kept apart' if kept_apart else 'merged'}), ")
    check_spoken_turn(variant, list(variant.respond(audio=lj_wav, options=GREEDY)), tmp_path)


def test_text_output_stops_where_the_speech_would_begin(pipeline, jfk_flac):
    events = list(pipeline.respond(audio=jfk_flac, options=Options(output="text")))
    assert parsed(events) == [Heard(HEARD), Answer(ANSWER)]
    assert not any(isinstance(e, Audio) for e in events)
    end = events[-1]
    assert end.reason == "eoa" and end.problems == ()
    assert end.turn.assistant.endswith(ANSWER + "<eoa>") and "[ua]" not in end.turn.assistant


def test_speech_mode_forces_units_after_a_text_only_answer(text_first_pipeline, lj_wav, tmp_path):
    text_only = list(text_first_pipeline.respond(audio=lj_wav, options=Options(output="text")))
    assert parsed(text_only) == [Heard(HEARD), Answer(ANSWER)]
    events = list(text_first_pipeline.respond(audio=lj_wav))
    check_spoken_turn(text_first_pipeline, events, tmp_path)
    assert "[ua]" in events[-1].turn.assistant


def test_assistant_prefix_replaces_the_transcript(pipeline, lj_wav, tmp_path):
    corrected = "unless the system is reviewed"
    options = Options(assistant_prefix=assistant_prefix_for("chat", corrected))
    events = list(pipeline.respond(audio=lj_wav, options=options))
    assert parsed(events) == [Heard(corrected), Answer(ANSWER), Units(UNITS)]
    assert events[-1].reason == "eoa" and events[-1].turn.heard == corrected


def test_transcribe_task(pipeline, lj_wav):
    events = list(pipeline.respond(audio=lj_wav, options=Options(task="transcribe")))
    assert parsed(events) == [Heard(HEARD)]
    assert not any(isinstance(e, Audio) for e in events) and events[-1].reason == "eoa"


def test_speak_task(pipeline, tmp_path):
    events = list(pipeline.respond(text="Read this sentence please.", options=Options(task="speak")))
    assert parsed(events) == [Units(UNITS)]
    assert len(audio_of(events)) == sum(pipeline.vocoder.durations(UNITS)) * pipeline.vocoder.hop
    assert events[-1].reason == "eoa" and events[-1].turn.user.endswith("This is input: Read this sentence please.")


def test_typed_chat_question(pipeline):
    events = list(pipeline.respond(text="What is a formal review?"))
    assert parsed(events)[-2:] == [Answer(ANSWER), Units(UNITS)]
    assert events[-1].turn.heard == HEARD  # the script always "hears" the same words


@pytest.mark.parametrize("task", ["chat", "speak"])
def test_a_file_path_typed_as_text_is_sent_as_text_never_read(pipeline, lj_wav, task):
    # REFERENCE.md §8: the reference opens any existing path found in the typed prompt (a file-read
    # hole on a server); here typed text reaches the prompt character for character.
    for typed in (str(lj_wav), f"Say this. This is input: {lj_wav}"):
        request = pipeline.prepare(text=typed, options=Options(task=task))
        assert request.user.endswith(typed) and "<sosp>" not in request.prompt
        assert request.prompt.endswith(format_exchange(request.user))


def test_cancel_mid_turn_ends_promptly(pipeline, lj_wav):
    cancel = threading.Event()
    events = []
    for event in pipeline.respond(audio=lj_wav, cancel=cancel):
        events.append(event)
        if isinstance(event, Answer):
            cancel.set()
            set_at = time.perf_counter()
    ended = time.perf_counter()
    assert events[-1].reason == "cancelled" and events[-1].turn is None
    assert not any(isinstance(e, Units) for e in events)
    assert ended - set_at < 1.0


def test_second_turn_carries_the_first_as_history(pipeline, lj_wav, jfk_flac):
    first_turn = list(pipeline.respond(audio=lj_wav))[-1].turn
    request = pipeline.prepare(audio=jfk_flac, history=[first_turn])
    assert format_exchange(first_turn.user, first_turn.assistant) in request.prompt
    assert request.prompt.endswith(format_exchange(request.user))
    events = list(pipeline.respond(audio=jfk_flac, history=[first_turn]))
    assert events[-1].reason == "eoa" and events[-1].turn.user == request.user


def test_a_second_turn_prefills_only_what_the_first_did_not_hold(tmp_path):
    """On the real tiny model: a spoken question, then a follow-up with it as history. The second turn
    reuses the first turn's cache for everything its prompt repeats exactly (the history spells the
    first answer as one text, so from there on it is prefilled) and answers exactly as a recompute."""
    tiny = Pipeline.load(str(DEFAULT_MODEL))
    audio = Path(__file__).parent / "data" / "eval-subset" / "audio" / "705991bcf590380d.flac"
    first = list(tiny.respond(audio=audio))[-1]
    assert first.reason == "eoa"

    def follow_up() -> list:
        return list(tiny.respond(audio=audio, history=[first.turn]))

    reused = follow_up()
    prefix_cache(tiny.lm.model).clear()
    fresh = follow_up()
    n_prompt1 = first.stats["prompt_tokens"]
    assert n_prompt1 - 1 <= reused[-1].stats["cached_tokens"] < reused[-1].stats["prompt_tokens"]
    assert fresh[-1].stats["cached_tokens"] == 0
    assert parsed(reused) == parsed(fresh) and reused[-1].reason == fresh[-1].reason
    assert np.array_equal(audio_of(reused), audio_of(fresh))


def test_long_history_is_trimmed_with_a_notice(pipeline, lj_wav):
    turn = list(pipeline.respond(audio=lj_wav))[-1].turn
    events = list(pipeline.respond(audio=lj_wav, history=[turn] * 12, options=Options(SamplingOptions(max_new_tokens=200))))
    assert any(isinstance(e, Notice) for e in events[: first(events, Heard)])
    assert events[-1].reason == "eoa"


def test_max_tokens_reason(pipeline, lj_wav):
    events = list(pipeline.respond(audio=lj_wav, options=Options(SamplingOptions(max_new_tokens=5, min_new_tokens=0))))
    end = events[-1]
    assert end.reason == "max_tokens" and end.turn is None
    assert any("<eoa>" in p for p in end.problems)


def test_bad_input_raises_before_any_event(pipeline, tmp_path):
    with pytest.raises(AudioError):
        pipeline.respond(audio=b"this is not audio")
    with pytest.raises(AudioError):
        pipeline.respond(audio=(16_000, np.zeros(16_000, np.float32)))  # digital silence
    with pytest.raises(PromptError):
        pipeline.respond()
    with pytest.raises(PromptError):
        pipeline.respond(text="   ")
    with pytest.raises(ValueError):
        Options(SamplingOptions(temperature=-1))
    with pytest.raises(ValueError):
        Options(task="speak", output="text")


def test_max_seconds_comes_from_the_environment(bundle, lj_wav, monkeypatch):
    monkeypatch.setenv("SPEECHGPT_MAX_SECONDS", "5")  # the LJ clip is 7.66 s
    short = Pipeline.load(bundle, quant="none", device="cpu", precision="fp32")
    with pytest.raises(AudioError) as err:
        short.respond(audio=lj_wav)
    assert err.value.kind == "too_long"


def test_timings_from_events(pipeline, lj_wav):
    timings = Timings()
    events = list(pipeline.respond(audio=lj_wav))
    for event in events:
        timings.observe(event)
    assert 0 <= timings.time_to_transcript_ms <= timings.time_to_answer_ms <= timings.time_to_first_audio_ms
    assert timings.audio_seconds == pytest.approx(len(audio_of(events)) / 16_000)
    assert timings.real_time_factor == pytest.approx(timings.last_audio_ms / 1000 / timings.audio_seconds)
    assert timings.tokens_per_second > 0 and events[-1].stats["sampled_tokens"] > len(UNITS)
    assert set(timings.as_dict()) >= {"time_to_transcript_ms", "time_to_first_audio_ms", "real_time_factor"}


def test_timings_summary_line():
    assert Timings().summary() == "time to transcript – · time to first audio – · – tokens/s · real-time factor –"
    timings = Timings(time_to_transcript_ms=20.4, time_to_first_audio_ms=671.0, last_audio_ms=840.0,
                      audio_seconds=3.0, tokens_per_second=72.94)  # fmt: skip
    assert timings.summary() == (
        "time to transcript 0.02 s · time to first audio 0.67 s · 72.9 tokens/s · real-time factor 0.28"
    )


def test_load_from_env_and_vocabulary_mismatch(bundle, tmp_path, monkeypatch):
    monkeypatch.setenv(MODEL_ENV, str(bundle))
    assert Pipeline.load(quant="none", device="cpu", precision="fp32").bundle_dir == bundle
    # An LM whose unit tokens are not the speech model's: a clear load error.
    other = make_scripted_bundle(tmp_path / "other", HEARD, ANSWER, (1, 2), n_units=20)
    mixed = tmp_path / "mixed"
    shutil.copytree(bundle, mixed)
    shutil.rmtree(mixed / "lm")
    shutil.copytree(other / "lm", mixed / "lm")
    with pytest.raises(ModelLoadError, match="20"):
        Pipeline.load(mixed, quant="none", device="cpu", precision="fp32")


def _failing_hook(task):
    """A logits hook that fails on the fifth token, as a device error would."""

    def hook(ids, logits):
        if len(ids) == 5:
            raise RuntimeError("device lost")
        return logits

    return hook


def test_error_during_generation_ends_the_turn_and_frees_the_pipeline(pipeline, lj_wav, monkeypatch, caplog):
    with monkeypatch.context() as m:
        m.setattr(pipeline, "logits_hook", _failing_hook)
        events = list(pipeline.respond(audio=lj_wav))
    end = events[-1]
    assert end.reason == "error" and "device lost" in end.problems[0] and end.turn is None
    assert "generation failed" in caplog.text
    assert list(pipeline.respond(audio=lj_wav, options=Options(output="text")))[-1].reason == "eoa"


def test_one_turn_at_a_time(pipeline, lj_wav):
    log: list[tuple[str, type]] = []

    def turn(name):
        for event in pipeline.respond(audio=lj_wav, options=Options(output="text")):
            log.append((name, type(event)))

    threads = [threading.Thread(target=turn, args=(name,)) for name in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    names = [name for name, _ in log]
    switches = [i for i in range(1, len(log)) if names[i] != names[i - 1]]
    assert len(switches) == 1 and log[switches[0] - 1][1] is End  # one whole turn, then the other
    assert [kind for _, kind in log].count(End) == 2


def test_default_options_are_the_released_settings(pipeline):
    # REFERENCE.md §4 by hand; a bundle without `generation` overrides (as the speechgpt-7b preset) keeps them.
    want = (True, 0.7, 0.8, 50, 2048, 10)
    for o in (Options().sampling, pipeline.default_options.sampling):
        assert (o.do_sample, o.temperature, o.top_p, o.top_k, o.max_new_tokens, o.min_new_tokens) == want


def test_bundle_generation_defaults_and_bad_values(bundle, tmp_path):
    import json

    from speechgpt_app.bundle import BUNDLE_FILE, BundleError

    copy = tmp_path / "tuned"
    shutil.copytree(bundle, copy)
    raw = json.loads((copy / BUNDLE_FILE).read_text())
    (copy / BUNDLE_FILE).write_text(json.dumps({**raw, "generation": {"temperature": 0.3, "top_k": 5}}))
    tuned = Pipeline.load(copy, quant="none", device="cpu", precision="fp32")
    assert (tuned.default_options.sampling.temperature, tuned.default_options.sampling.top_k) == (0.3, 5)
    assert tuned.default_options.sampling.top_p == SamplingOptions().top_p  # the rest stay the released defaults
    (copy / BUNDLE_FILE).write_text(json.dumps({**raw, "generation": {"temperature": -1.0}}))
    with pytest.raises(BundleError, match="temperature"):
        Pipeline.load(copy, quant="none", device="cpu", precision="fp32")


def test_runtime_needs_neither_fairseq_nor_torchaudio(pipeline, jfk_flac, monkeypatch):
    # REFERENCE.md §8: fairseq does not install on Python 3.11+ and torchaudio's wheels do not match the
    # CPU torch; neither may be imported by the app, at import time or during a turn.
    root = Path(__file__).resolve().parents[1]
    names = {re.split(r"[<>=\[ ]", line.strip())[0].lower() for line in (root / "requirements.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")}
    assert not names & {"fairseq", "torchaudio"}
    script = (
        "import importlib, pkgutil, sys\n"
        "sys.modules['torchaudio'] = sys.modules['fairseq'] = None\n"
        "import speechgpt_app\n"
        "for m in pkgutil.iter_modules(speechgpt_app.__path__):\n"
        "    if m.name != '__main__':\n"
        "        importlib.import_module('speechgpt_app.' + m.name)\n"
    )
    subprocess.run([sys.executable, "-c", script], cwd=root, check=True, timeout=120)
    for name in ("torchaudio", "fairseq"):
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now fails
    events = list(pipeline.respond(audio=jfk_flac))
    assert events[-1].reason == "eoa" and any(isinstance(e, Audio) for e in events)


def test_the_core_knows_no_scripted_model(bundle, lj_wav):
    # The scripted model lives with the tests: the package neither imports it nor reads its script.json.
    package = Path(__file__).resolve().parents[1] / "speechgpt_app"
    for source in package.glob("*.py"):
        text = source.read_text(encoding="utf-8")
        assert "import scripted" not in text and "script.json" not in text and "speechgpt_app.scripted" not in text, source
    plain = Pipeline.load(bundle, quant="none", device="cpu", precision="fp32")
    assert plain.logits_hook is None
    events = list(plain.respond(audio=lj_wav, options=Options(SamplingOptions(max_new_tokens=30, do_sample=False), output="text")))
    assert events[-1].turn is None or events[-1].turn.heard != HEARD  # unforced, the random model says other words


def forcing(stream: list[int], eos_id: int):
    """A Pipeline.logits_hook that makes the model write `stream`, then stop (whatever the task)."""

    def for_task(task):
        def hook(ids, logits):
            forced = torch.full_like(logits, float("-inf"))
            forced[stream[len(ids)] if len(ids) < len(stream) else eos_id] = 0.0
            return forced

        return hook

    return for_task


# Pieces a broken or hostile model might write: markers out of place, unit ids out of range or
# malformed, turn markers, text outside any grammar.
ADVERSARIAL = ("<sosp>", "<eosp>", "<eoa>", "[ta]", "[ua]", "[tq]", "; ", " ", "<49>", "<50>", "<0>", "<999999>",
               "<12345678>", "<-1>", "<07>", "<x>", "[Human]", "[SpeechGPT]", "<eoh>", "é", "你", "\n", "<", ">")  # fmt: skip


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_token_stream_ends_the_turn_plainly_with_units_in_range(pipeline, data):
    tokenizer = pipeline.lm.tokenizer
    pieces = data.draw(st.lists(st.one_of(st.sampled_from(ADVERSARIAL), st.text(max_size=4)), max_size=25))
    stream = tokenizer.encode("".join(pieces), add_special_tokens=False)
    stream += data.draw(st.lists(st.integers(0, len(tokenizer) - 1), max_size=25))  # any id at all
    data.draw(st.randoms()).shuffle(stream)
    budget = data.draw(st.integers(1, 80))
    output = data.draw(st.sampled_from(["speech+text", "text"]))

    with pytest.MonkeyPatch.context() as m:
        m.setattr(pipeline, "logits_hook", forcing(stream, tokenizer.eos_token_id))
        options = Options(SamplingOptions(max_new_tokens=budget, min_new_tokens=0, seed=0), output=output)
        events = list(pipeline.respond(text="what is two plus two", options=options))
    ends = [e for e in events if isinstance(e, End)]
    assert len(ends) == 1 and events[-1] is ends[0]
    end = ends[0]
    assert end.reason in ("eoa", "eos", "max_tokens"), end  # never "error": nothing raised inside
    assert end.stats["sampled_tokens"] + end.stats["forced_tokens"] <= budget  # always bounded
    assert all(0 <= u < pipeline.n_units for e in events if isinstance(e, Units) for u in e.ids)
    for e in events:
        if isinstance(e, Audio):
            assert e.pcm.dtype == np.float32 and np.isfinite(e.pcm).all()
    assert output == "speech+text" or not any(isinstance(e, Audio) for e in events)


def test_out_of_range_units_are_dropped_and_counted(pipeline):
    tokenizer = pipeline.lm.tokenizer
    stream = tokenizer.encode("what; [ta] this; [ua] <sosp><3><77><999999><5><eosp><eoa>", add_special_tokens=False)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(pipeline, "logits_hook", forcing(stream, tokenizer.eos_token_id))
        events = list(pipeline.respond(text="what is two plus two", options=Options(SamplingOptions(seed=0))))
    assert parsed(events) == [Heard("what"), Answer("this"), Units((3, 5))]
    end = events[-1]
    assert end.reason == "eoa" and end.problems == ("dropped 2 units outside the vocabulary (0-49)",)
    assert len(audio_of(events)) == sum(pipeline.vocoder.durations((3, 5))) * pipeline.vocoder.hop


class _SlowVocoder:
    """The pipeline's vocoder, each streamed chunk taking `pause_s` longer; records the chunk sizes."""

    def __init__(self, vocoder, pause_s: float) -> None:
        self.inner, self.pause_s, self.sizes = vocoder, pause_s, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def stream(self):
        inner, outer = self.inner.stream(), self

        class Stream:
            def push(self, ids):
                outer.sizes.append(len(ids))
                time.sleep(outer.pause_s)
                return inner.push(ids)

            def flush(self):
                return inner.flush()

        return Stream()


LONG_UNITS = tuple((7 * i + 3) % 50 for i in range(80))  # chunks of 10, 20, 40, then the last 10


def test_vocoder_runs_beside_decoding_in_growing_chunks(tmp_path_factory, lj_wav):
    out = tmp_path_factory.mktemp("scripted") / "long"
    long = load_scripted(make_scripted_bundle(out, HEARD, ANSWER, LONG_UNITS), quant="none", device="cpu", precision="fp32")
    slow = _SlowVocoder(long.vocoder, pause_s=1.0)
    whole = long.vocoder.decode(LONG_UNITS)
    long.vocoder = slow
    events = list(long.respond(audio=lj_wav, options=GREEDY))
    last_units = max(i for i, e in enumerate(events) if isinstance(e, Units))
    # Decoding did not wait for the 1 s chunks: inline, three chunks' audio would come before the last unit.
    assert sum(isinstance(e, Audio) for e in events[:last_units]) <= 1
    n = len(LONG_UNITS)
    first = CHUNK_UNITS
    want = []
    while sum(want) + first <= n:
        want.append(first)
        first = min(2 * first, CHUNK_UNITS * CHUNK_GROWTH)
    assert want == [10, 20, 40] and slow.sizes == [*want, n - sum(want)]
    np.testing.assert_allclose(audio_of(events), whole, atol=1e-5)  # joins stay exact


def test_vocoder_thread_serves_silent_turns_first_and_each_turns_chunks_in_order():
    worker = VocoderThread()
    busy, order = threading.Event(), []
    a, b, c, d = (VoiceLine() for _ in range(4))

    def job(name, samples=1):
        if name == "a1":
            busy.wait(5)
        order.append(name)
        if name == "bad":
            raise ValueError("the vocoder failed")
        return np.zeros(samples, np.float32)

    worker.submit(a, job, "a1")  # the oldest: it runs first, and holds the thread while the others queue
    futures = {}
    for line, name, samples in [(a, "a2", 1), (b, "b1", 0), (a, "a3", 1), (c, "c1", 1), (b, "b2", 1),
                                (a, "bad", 1), (d, "d1", 1), (b, "b3", 1)]:  # fmt: skip
        futures[name] = worker.submit(line, job, name, samples)
    futures["d1"].cancel()  # a stopped turn's chunk never runs
    busy.set()
    assert futures["b3"].result(5) is not None
    for f in futures.values():
        f.cancelled() or f.exception(5)
    # a1 made audio: a is playing. The silent turns' chunks go first, oldest first: b1 (still no
    # audio), c1, b2; then the playing turns' chunks, oldest first (d1 was cancelled).
    assert order == ["a1", "b1", "c1", "b2", "a2", "a3", "bad", "b3"], order
    with pytest.raises(ValueError, match="the vocoder failed"):
        futures["bad"].result(5)
