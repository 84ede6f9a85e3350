"""The voice chat app, driven over HTTP with gradio_client: the real app.py on the shipped SpeechGPT-tiny.

One app serves every test in this module (launched in-process on a free loopback port); each test
opens its own client, which is its own browser session with its own conversation. Turns decode
greedily, so a held-out question the model is known to answer (app_helpers.known_questions) must get
the domain's answer here too.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
import pytest
import soundfile as sf
from app_helpers import (
    GREEDY,
    REPO,
    TINY,
    free_port,
    known_questions,
    launched_app,
    load_app_module,
    running_app,
)
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from speechgpt_app.units import text_to_units

CORRECTED = "count one down from eighty one"

# Output positions of /send and /regenerate (ui.build_ui: panels, conversation, state, inputs).
HEARD_OUT, ANSWER_OUT, COUNT_OUT, UNITS_OUT, SPEECH_OUT, TIMINGS_OUT, CHAT_OUT = range(7)
SETTINGS = dict(top_p=0.8, top_k=50, max_new_tokens=320, seed=0, output="Speech + text", **GREEDY)
SILENCE_RMS = 1e-3  # float samples: far below the vocoder's speech, far above decoder noise


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any]]:
    """The real app on SpeechGPT-tiny; yields its URL and its gr.Blocks."""
    with launched_app(TINY, tmp_path_factory.mktemp("hf_home")) as url_and_demo:
        yield url_and_demo


@pytest.fixture(scope="module")
def server(launched: tuple[str, Any]) -> str:
    """The real app's URL."""
    return launched[0]


@pytest.fixture(scope="module")
def question():
    """A held-out spoken question the model answers right (its audio, text and the domain's answer)."""
    return known_questions()[0]


def client(url: str) -> Client:
    # Raw file dicts (with URLs) instead of downloads: the test fetches what it checks itself.
    return Client(url, verbose=False, download_files=False)


def send(c: Client, audio: str | None = None, text: str = "", task: str = "Chat", **settings: Any) -> list:
    """One turn through /send; every streamed update, in order."""
    s = {**SETTINGS, **settings}
    job = c.submit(
        handle_file(audio) if audio else None, text, task,
        s["temperature"], s["top_p"], s["top_k"], s["max_new_tokens"], s["seed"], s["output"],
        api_name="/send",
    )  # fmt: skip
    updates = list(job)
    job.result()  # raises AppError with the page's message if the turn failed
    return updates


def decode(data: bytes) -> np.ndarray:
    """Any audio file's bytes -> float samples in [-1, 1] (all channels, interleaved or not)."""
    with av.open(io.BytesIO(data)) as f:
        frames = [frame.to_ndarray() for frame in f.decode(audio=0)]
    x = np.concatenate([a.reshape(-1) for a in frames])
    if np.issubdtype(x.dtype, np.integer):  # PCM decoders give integers at their own full scale
        return x.astype(np.float32) / float(np.iinfo(x.dtype).max + 1)
    return x.astype(np.float32)


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x.astype(np.float64)))))


def first(updates: list, index: int, pred) -> int:
    """Position of the first update whose output `index` satisfies `pred`."""
    return next(i for i, u in enumerate(updates) if pred(u[index]))


def is_stream(value: Any) -> bool:
    return isinstance(value, dict) and value.get("is_stream") is True


def export(c: Client) -> dict:
    """The session's conversation as the exported JSON."""
    f = c.predict(api_name="/export")
    return json.loads(httpx.get(f["url"]).text)


def test_spoken_turn_streams_in_order_then_history_is_exported(server: str, question) -> None:
    c = client(server)
    updates = send(c, audio=str(question.audio))

    # The chain of modality fills in order: what was heard, then the answer, then speech.
    heard_at = first(updates, HEARD_OUT, bool)
    answer_at = first(updates, ANSWER_OUT, bool)
    audio_at = first(updates, SPEECH_OUT, is_stream)
    assert heard_at < answer_at < audio_at < len(updates) - 1  # audio streams before the turn ends
    final = updates[-1]
    assert final[HEARD_OUT] == question.text
    assert final[ANSWER_OUT] == question.answer
    units = text_to_units(final[UNITS_OUT])
    assert len(units) > 5 and f"**{len(units)}**" in final[COUNT_OUT]
    assert "time to first audio" in final[TIMINGS_OUT] and "–" not in final[TIMINGS_OUT].split("·")[1]

    # The streamed answer speech decodes to real (not silent) audio.
    stream_url = updates[audio_at][SPEECH_OUT]["url"]
    streamed = decode(httpx.get(stream_url.replace("playlist.m3u8", "playlist-file")).content)
    assert len(streamed) > 0 and rms(streamed) > SILENCE_RMS

    # The conversation shows the question audio + transcript and the answer audio + text.
    chat = final[CHAT_OUT]
    assert [m["role"] for m in chat] == ["user", "assistant"]
    user_parts, bot_parts = chat[0]["content"], chat[1]["content"]
    assert user_parts[0]["component"] == "audio" and user_parts[1]["text"] == question.text
    assert bot_parts[0]["component"] == "audio" and bot_parts[1]["text"] == question.answer
    answer_wav = decode(httpx.get(bot_parts[0]["value"]["url"]).content)
    assert rms(answer_wav) > SILENCE_RMS
    # One fixed int16 scale: the stream is as loud as the answer (per-chunk peak normalisation,
    # which Gradio applies to float chunks, would make it louder).
    assert abs(rms(streamed) / rms(answer_wav) - 1) < 0.2

    # A second turn carries the first as context.
    second = send(c, text="and why is that?")
    assert second[-1][ANSWER_OUT] and len(second[-1][CHAT_OUT]) == 4
    doc = export(c)
    assert len(doc["turns"]) == 2
    one, two = doc["turns"]
    assert one["context"] == [] and one["heard"] == question.text and one["answer"] == question.answer
    assert one["units"] == units and one["seed"] == 0 and one["end_reason"] == "eoa"
    assert two["question_text"] == "and why is that?"
    assert len(two["context"]) == 1
    assistant = two["context"][0]["assistant"]
    assert question.answer in assistant and final[UNITS_OUT] in assistant.replace(" ", "")
    assert doc["model"].startswith("speechgpt-tiny") and "/" not in doc["model"]  # paths only in details
    # The export is downloaded from a public page: names and Hub ids only, no local paths.
    assert doc["model_details"]["name"] == "speechgpt-tiny" and doc["model_details"]["lm"] == "speechgpt-tiny/lm"
    assert "bundle" not in doc["model_details"] and not any(str(REPO) in str(v) for v in doc["model_details"].values())
    assert {"torch", "transformers", "gradio", "speechgpt_app"} <= set(doc["versions"])
    assert one["timings"]["time_to_first_audio_ms"] > 0 and one["settings"]["temperature"] == 0.0


def test_int16_at_one_fixed_scale() -> None:
    from speechgpt_app.ui import to_int16

    pcm = np.array([0.0, 0.5, -0.5, 1.0, -1.0, 1.5, -1.5], dtype=np.float32)
    assert to_int16(pcm).tolist() == [0, 16384, -16384, 32767, -32767, 32767, -32768]
    quiet = np.full(4, 0.01, dtype=np.float32)
    assert to_int16(quiet).tolist() == [328] * 4  # a quiet chunk stays quiet


def test_sessions_keep_separate_histories(server: str, question) -> None:
    a, b = client(server), client(server)
    send(a, audio=str(question.audio))
    send(b, text="hello from b")
    send(a, text="second question from a")
    doc_a, doc_b = export(a), export(b)
    assert [t["question_text"] for t in doc_a["turns"]] == [None, "second question from a"]
    assert [t["question_text"] for t in doc_b["turns"]] == ["hello from b"]
    assert doc_b["turns"][0]["context"] == []


def test_a_closed_page_leaves_no_state_behind(launched: tuple[str, Any]) -> None:
    url, demo = launched
    c = client(url)
    send(c, text="what is two plus three", output="Text only")
    session = c.session_hash
    assert session in demo.state_holder.session_data  # Gradio holds the conversation while the page is open
    c.close()
    deadline = time.monotonic() + 30
    while session in demo.state_holder.session_data and time.monotonic() < deadline:
        time.sleep(0.2)
    assert session not in demo.state_holder.session_data  # gone at once, not an hour later


def test_regenerate_from_corrected_transcript_replaces_the_turn(server: str, question) -> None:
    c = client(server)
    send(c, audio=str(question.audio))
    s = SETTINGS
    job = c.submit(
        CORRECTED, s["temperature"], s["top_p"], s["top_k"], s["max_new_tokens"], s["seed"], s["output"],
        api_name="/regenerate",
    )  # fmt: skip
    final = list(job)[-1]
    job.result()
    assert final[HEARD_OUT] == CORRECTED  # the forced prefix is what the model "heard" now
    assert final[ANSWER_OUT]  # (the small model answers from the units more than from the forced words)
    (turn,) = export(c)["turns"]  # replaced, not appended
    assert turn["heard"] == CORRECTED
    assert turn["settings"]["assistant_prefix"] == CORRECTED + "; [ta] "
    assert turn["question_audio"] == question.audio.name


def test_stop_ends_the_turn_early(server: str, question) -> None:
    c = client(server)
    whole = text_to_units(send(c, audio=str(question.audio))[-1][UNITS_OUT])
    c.predict(api_name="/clear")
    s = SETTINGS
    job = c.submit(
        handle_file(str(question.audio)), "", "Chat",
        s["temperature"], s["top_p"], s["top_k"], s["max_new_tokens"], s["seed"], s["output"],
        api_name="/send",
    )  # fmt: skip
    for update in job:
        if update[HEARD_OUT]:  # the turn is generating: stop it
            c.predict(api_name="/stop")
            break
    job.result()
    (turn,) = export(c)["turns"]
    assert turn["end_reason"] == "cancelled"
    assert len(turn["units"]) < len(whole)


def submit(c: Client, audio: str | None = None, text: str = "") -> Any:
    """Start one chat turn through /send without waiting for it."""
    s = SETTINGS
    return c.submit(
        handle_file(audio) if audio else None, text, "Chat",
        s["temperature"], s["top_p"], s["top_k"], s["max_new_tokens"], s["seed"], s["output"],
        api_name="/send",
    )  # fmt: skip


def test_stop_reaches_a_turn_waiting_behind_another_session(server: str, lj_wav: Path) -> None:
    import time

    from gradio_client.utils import Status

    a, b = client(server), client(server)
    running = submit(a, audio=str(lj_wav))
    next(iter(running))  # a's turn holds the only worker
    waiting = submit(b, text="queued question")
    deadline = time.monotonic() + 10
    while waiting.status().code != Status.IN_QUEUE:
        assert time.monotonic() < deadline and not waiting.done(), "b's turn never waited in the queue"
        time.sleep(0.02)
    b.predict(api_name="/stop")
    with pytest.raises(AppError, match="Stopped before it started"):
        waiting.result()
    running.result()
    assert export(a)["turns"][0]["end_reason"] == "eoa"  # the other session's turn is untouched
    with pytest.raises(AppError, match="nothing to export"):
        export(b)  # the stopped turn never ran
    b.predict(api_name="/stop")  # a Stop with nothing running or waiting is not kept for later
    assert send(b, text="now answer")[-1][ANSWER_OUT]


def test_clear_mid_answer_leaves_the_conversation_empty(server: str, lj_wav: Path) -> None:
    c = client(server)
    send(c, text="an earlier question")
    job = submit(c, audio=str(lj_wav))
    for update in job:
        if update[ANSWER_OUT]:  # the answer is being written: clear everything
            c.predict(api_name="/clear")
            break
    job.result()
    assert job.outputs()[-1][CHAT_OUT] == []  # the stopped turn does not bring the history back
    with pytest.raises(AppError, match="nothing to export"):
        export(c)


def test_regenerate_refuses_markers_and_typed_questions(server: str, question) -> None:
    s = SETTINGS

    def regenerate(c: Client, corrected: str) -> None:
        c.predict(
            corrected, s["temperature"], s["top_p"], s["top_k"], s["max_new_tokens"], s["seed"], s["output"],
            api_name="/regenerate",
        )  # fmt: skip

    c = client(server)
    send(c, audio=str(question.audio))
    for corrected in ("fixed <eoa>", "fixed; [ta] an answer I wrote", "say <sosp><1><eosp>", "[Human]: hi <eoh>"):
        with pytest.raises(AppError, match="Check the corrected transcript"):
            regenerate(c, corrected)
    (turn,) = export(c)["turns"]  # the answer that was there is kept as it was
    assert turn["heard"] == question.text and turn["answer"] == question.answer and turn["end_reason"] == "eoa"

    typed = client(server)
    send(typed, text="a typed question")
    with pytest.raises(AppError, match="typed, not spoken"):
        regenerate(typed, "a corrected question")
    assert export(typed)["turns"][0]["question_text"] == "a typed question"


def test_other_tasks_text_only_output_and_clear(server: str, question) -> None:
    c = client(server)
    text_only = send(c, audio=str(question.audio), output="Text only")
    assert text_only[-1][ANSWER_OUT] == question.answer
    assert not any(is_stream(u[SPEECH_OUT]) for u in text_only)
    transcribed = send(c, audio=str(question.audio), task="Transcribe only")
    assert transcribed[-1][HEARD_OUT] and transcribed[-1][ANSWER_OUT] == ""
    spoken = send(c, text=question.answer, task="Speak this text")
    assert len(text_to_units(spoken[-1][UNITS_OUT])) > 5 and any(is_stream(u[SPEECH_OUT]) for u in spoken)
    assert [t["task"] for t in export(c)["turns"]] == ["chat", "transcribe", "speak"]
    c.predict(api_name="/clear")  # Clear empties this session's conversation
    with pytest.raises(AppError, match="nothing to export"):
        export(c)


def test_bad_input_is_a_plain_error_and_the_app_keeps_serving(server: str, tmp_path: Path) -> None:
    c = client(server)
    with pytest.raises(AppError, match="Record or upload a question"):
        send(c)
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("this is not audio")
    with pytest.raises(AppError, match=r"(?i)read|audio|decode"):
        send(c, audio=str(not_audio))
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(16000 * 2, dtype=np.int16), 16000)
    with pytest.raises(AppError, match=r"(?i)silen"):
        send(c, audio=str(silent))
    too_long = tmp_path / "long.wav"
    sf.write(too_long, (0.1 * np.random.default_rng(0).standard_normal(16000 * 25)).astype(np.float32), 16000)
    with pytest.raises(AppError, match=r"(?i)long"):
        send(c, audio=str(too_long))
    with pytest.raises(AppError, match="speak task answers in speech"):
        send(c, text="say this", task="Speak this text", output="Text only")
    with pytest.raises(AppError, match="Transcribe only works on a recording"):
        send(c, text="transcribe this", task="Transcribe only")
    with pytest.raises(AppError, match="Speak this text needs typed text"):
        send(c, audio=str(silent), task="Speak this text")  # refused before the audio is read
    q = known_questions()[1]
    assert send(c, audio=str(q.audio))[-1][ANSWER_OUT] == q.answer


def test_default_model_is_the_shipped_speechgpt_tiny_with_its_domain_notice(monkeypatch) -> None:
    from speechgpt_app.loaders import DEFAULT_MODEL

    monkeypatch.delenv("SPEECHGPT_MODEL", raising=False)
    app = load_app_module()
    pipeline, why = app.load_pipeline(None, None)
    assert why is None and pipeline.bundle_dir == DEFAULT_MODEL and "domain" in pipeline.warning
    assert pipeline.default_options.sampling.temperature == 0.0  # greedy, as it was evaluated
    demo = app.create_app()
    texts = [c.get("props", {}).get("value") for c in demo.config["components"]]
    assert any(isinstance(t, str) and "speechgpt-tiny" in t for t in texts)
    assert any(isinstance(t, str) and pipeline.warning in t for t in texts)
    assert not any(isinstance(t, str) and "scripted" in t for t in texts)


def test_a_missing_default_model_still_serves_the_page_and_says_why(tmp_path: Path, monkeypatch) -> None:
    from speechgpt_app import loaders

    monkeypatch.delenv("SPEECHGPT_MODEL", raising=False)
    monkeypatch.setattr(loaders, "DEFAULT_MODEL", tmp_path / "speechgpt-tiny")
    app = load_app_module()
    pipeline, why = app.load_pipeline(None, None)
    assert pipeline is None and "the default model is missing" in why and "training.mini.rebuild" in why
    demo = app.create_app()  # the page is built all the same
    texts = [c.get("props", {}).get("value") for c in demo.config["components"]]
    assert any(isinstance(t, str) and "the default model is missing" in t for t in texts)


def test_the_page_and_its_config_route_show_no_local_paths(server: str, tmp_path_factory) -> None:
    """A public Space must not tell anyone where its files are: /config holds the model's name only."""
    config = httpx.get(server + "config", timeout=30).text
    assert "speechgpt-tiny" in config
    for secret in (str(TINY), str(REPO)):
        assert secret not in config, secret


def test_missing_model_is_said_on_every_turn(tmp_path: Path) -> None:
    with running_app(tmp_path / "no-such-bundle", tmp_path / "hf") as url:
        with pytest.raises(AppError, match="model is not available"):
            send(client(url), text="hello?")


def test_out_of_memory_mid_answer_is_told_plainly_and_the_app_recovers(tmp_path_factory) -> None:
    import torch

    from speechgpt_app import llama_step
    from speechgpt_app.pipeline import Pipeline
    from speechgpt_app.ui import build_ui

    pipeline = Pipeline.load(str(TINY))
    demo = build_ui(pipeline).queue()
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        c = client(f"http://127.0.0.1:{port}/")
        model = pipeline.lm.model

        def out_of_memory(*args, **kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        # The GPU fills up in the middle of a turn, whichever forward runs it (llama_step's lean one here).
        lean = llama_step.for_model(model)
        for runner in (model, lean):
            runner.forward = out_of_memory
        with pytest.raises(AppError, match="GPU ran out of memory"):
            send(c, text="hello?")
        for runner in (model, lean):
            del runner.forward  # memory is back
        q = known_questions()[0]
        assert send(c, audio=str(q.audio))[-1][ANSWER_OUT] == q.answer
    finally:
        demo.close()


def test_a_full_queue_is_told_to_the_user(tmp_path_factory) -> None:
    from gradio_client.utils import QueueError, Status

    with running_app(TINY, tmp_path_factory.mktemp("hf"), queue_size=1) as url:
        clients = [client(url) for _ in range(3)]  # one runs, one waits, one finds the queue full
        s = SETTINGS
        def send(c):
            return c.submit(None, "hi", "Chat", s["temperature"], s["top_p"], s["top_k"], s["max_new_tokens"],
                            s["seed"], s["output"], api_name="/send")  # fmt: skip

        # The first turn must be running (out of the queue) before the others come, or two wait.
        jobs = [send(clients[0])]
        deadline = time.monotonic() + 60
        while jobs[0].status().code not in (Status.PROCESSING, Status.ITERATING, Status.FINISHED):
            assert time.monotonic() < deadline, "the first turn never started"
            time.sleep(0.02)
        jobs += [send(c) for c in clients[1:]]
        outcomes = []
        for job in jobs:
            try:
                job.result()
                outcomes.append("answered")
            except QueueError as e:
                outcomes.append(str(e))
        # The two later requests race to the server: which one is refused is not fixed.
        assert outcomes[0] == "answered" and outcomes.count("answered") == 2
        assert any("Queue is full" in o for o in outcomes)


def test_spaces_gpu_wrapper_is_a_no_op_off_zero_gpu(monkeypatch) -> None:
    import spaces

    from speechgpt_app import spaces_compat

    def answer() -> int:
        return 42

    assert not spaces_compat.on_zero_gpu({}) and spaces_compat.on_zero_gpu({"SPACES_ZERO_GPU": "true"})
    monkeypatch.setattr(spaces_compat, "ON_ZERO_GPU", False)
    assert spaces_compat.gpu()(answer) is answer
    asked = []

    def fake_gpu(duration):
        asked.append(duration)
        return lambda fn: fn

    monkeypatch.setattr(spaces_compat, "ON_ZERO_GPU", True)
    monkeypatch.setattr(spaces, "GPU", fake_gpu)
    assert spaces_compat.gpu(duration=30)(answer)() == 42 and asked == [30]


def test_oversized_uploads_are_refused_before_they_reach_the_disk(server: str, tmp_path: Path) -> None:
    app = load_app_module()
    limit = app.MAX_UPLOAD  # bytes (audio.MAX_UPLOAD_BYTES)
    big = tmp_path / "huge.wav"
    with big.open("wb") as f:
        f.truncate(limit + 1024)  # sparse: costs no disk here
    with big.open("rb") as f:
        response = httpx.post(f"{server}gradio_api/upload", files={"files": ("huge.wav", f)}, timeout=60)
    assert response.status_code == 413
    small = tmp_path / "small.wav"
    small.write_bytes(b"RIFF")
    with small.open("rb") as f:
        assert httpx.post(f"{server}gradio_api/upload", files={"files": ("small.wav", f)}, timeout=60).is_success


def test_a_refused_upload_logs_one_line_and_no_traceback(server: str, tmp_path: Path, capfd, caplog) -> None:
    bad = tmp_path / "my-private-name.wav"
    bad.write_bytes(b"not audio at all" * 100)
    c = Client(server, verbose=False)
    with caplog.at_level("INFO"), pytest.raises(AppError, match="Could not read"):
        send(c, audio=str(bad))
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
    assert "my-private-name" not in out + err + caplog.text
    assert any("refused an input" in r.getMessage() for r in caplog.records)


def test_the_first_answer_chunk_waits_for_a_slow_encoder(tmp_path: Path, monkeypatch) -> None:
    """An ffmpeg that takes 0.3 s to come up: Gradio's own 0.1 s gives the page an empty first
    playlist (its player then waits a second); after `wait_for_the_first_audio_frames` the first
    chunk carries frames."""
    from gradio import audio_stream_encoder as enc

    from speechgpt_app import ui

    slow = tmp_path / "ffmpeg"
    slow.write_text(f'#!/bin/sh\nsleep 0.3\nexec {shutil.which("ffmpeg")} "$@"\n')
    slow.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setattr(enc, "STARTUP_WAIT", 0.1)
    pcm = (np.sin(np.arange(4800) / 5) * 8000).astype(np.int16).tobytes()  # 0.3 s, about 5 frames

    def first_frames() -> int:
        encoder = enc.AacStreamEncoder(16000, 1)
        try:
            encoder.feed(pcm)
            return len(encoder.take())
        finally:
            encoder.close()

    assert first_frames() == 0  # the case this fixes
    ui.wait_for_the_first_audio_frames(2.0)  # an ffmpeg from a cold disk may take longer than the default
    assert first_frames() > 0



def test_the_first_audio_sent_is_long_enough_for_a_first_aac_frame() -> None:
    """Short first chunks are held until 0.2 s is there, then everything passes unchanged and in order;
    the first chunk sent makes frames in Gradio's own encoder (2,400 samples at 16 kHz made none)."""
    from gradio import audio_stream_encoder as enc

    from speechgpt_app import ui

    rng = np.random.default_rng(0)
    chunks = [(rng.normal(0, 3000, 800)).astype(np.int16) for _ in range(8)]
    gate = ui.FirstAudioGate()
    sent = [gate.take(c, 16000) for c in chunks]
    assert sent[:3] == [None, None, None] and len(sent[3]) == 3200 == ui.FIRST_AUDIO_S * 16000
    assert all(s is c for s, c in zip(sent[4:], chunks[4:])) and gate.rest() is None
    assert np.array_equal(np.concatenate([s for s in sent if s is not None]), np.concatenate(chunks))
    assert gate.take(None, 16000) is None
    short = ui.FirstAudioGate()  # an answer shorter than the gate is sent whole at its end
    assert short.take(chunks[0], 16000) is None and np.array_equal(short.rest(), chunks[0])
    for first, frames_expected in ((sent[3], True), (np.concatenate(chunks[:3]), False)):
        encoder = enc.AacStreamEncoder(16000, 1)
        try:
            encoder.feed(first.tobytes())
            assert bool(encoder.take(timeout=2.0 if frames_expected else 0.5)) == frames_expected
        finally:
            encoder.close()
