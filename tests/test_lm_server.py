"""The language model on a real vLLM server (scripts/vllm.sh, .venv-vllm), started on loopback for
these tests: the same token ids as the model in this process, the same streaming order, stop aborts
the server's request, and a dead or wrong server is a plain message."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import torch
from app_helpers import EVAL_SUBSET, REPO, TINY, free_port

from speechgpt_app import cli
from speechgpt_app.evaluate import greedy_options
from speechgpt_app.events import Answer, Audio, End, Heard
from speechgpt_app.lm_server import ServerError, wait_until_up
from speechgpt_app.pipeline import Pipeline

START_TIMEOUT_S = 600  # a cold CPU server compiles its model first
NEAR_TIE = 1e-3  # top-2 log-probability gap below which a flipped greedy token is not a fault
N_QUESTIONS = 20


@pytest.fixture(scope="module")
def server_url(tmp_path_factory) -> str:
    """vLLM serving the shipped SpeechGPT-tiny's language model (fp32, greedy-exact) on a free port."""
    port = free_port()
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    env = {**os.environ, "VLLM_PORT": str(port), "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_DTYPE": "float32"}
    with log.open("w") as out:
        proc = subprocess.Popen(["bash", "scripts/vllm.sh", "serve", str(TINY / "lm")], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_until_up(url, START_TIMEOUT_S, alive=lambda: proc.poll() is None)
        except ServerError as e:
            pytest.fail(f"{e}: {log.read_text()[-3000:]}")
        yield url
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)


@pytest.fixture(scope="module")
def local() -> Pipeline:
    return Pipeline.load(TINY, precision="fp32")


@pytest.fixture(scope="module")
def served(server_url) -> Pipeline:
    pipeline = Pipeline.load(TINY, lm_url=server_url)
    pipeline.check_server()
    return pipeline


def _questions(n: int) -> list[Path]:
    rows = [json.loads(line) for line in (EVAL_SUBSET / "ci-subset.jsonl").read_text().splitlines() if line]
    return [EVAL_SUBSET / r["audio"] for r in rows[:n]]


def _answer_ids(pipeline: Pipeline, audio: Path) -> tuple[list[int], str, str, tuple]:
    """(answer ids, heard, answer text, prompt ids) of one greedy spoken turn."""
    options = greedy_options(pipeline, 320)
    request = pipeline.prepare(audio=audio, options=options)
    events = list(pipeline._run(request, None, time.perf_counter()))
    end = events[-1]
    assert isinstance(end, End) and end.reason == "eoa", end
    text = end.turn.assistant
    ids = pipeline.lm.tokenizer.encode(text, add_special_tokens=False)
    heard = "".join(e.text for e in events if isinstance(e, Heard))
    answer = "".join(e.text for e in events if isinstance(e, Answer))
    return ids, heard, answer, request.prompt_ids


def _gap(local: Pipeline, prompt_ids, answer_ids: list[int], at: int) -> float:
    """The top-2 log-probability gap of the local model at answer position `at`."""
    ids = torch.tensor([list(prompt_ids) + answer_ids[:at]])
    with torch.no_grad():
        logp = local.lm.model(input_ids=ids).logits[0, -1].float().log_softmax(-1)
    top = torch.topk(logp, 2).values
    return float(top[0] - top[1])


def test_served_answers_are_the_local_ones_token_for_token(local, served):
    """Greedy, fp32 on both sides, one request at a time: the same answer ids for 20 spoken questions
    (a flipped near-tie is printed, and its transcript and answer text must still agree)."""
    for audio in _questions(N_QUESTIONS):
        mine, heard, answer, prompt_ids = _answer_ids(local, audio)
        theirs, s_heard, s_answer, s_prompt = _answer_ids(served, audio)
        assert s_prompt == prompt_ids
        if theirs == mine:
            continue
        at = next(i for i, (a, b) in enumerate(zip(mine, theirs, strict=False)) if a != b)
        gap = _gap(local, prompt_ids, mine, at)
        print(f"{audio.name}: token {at} differs (top-2 gap {gap:.2e}): {heard!r} / {answer!r}")
        assert gap < NEAR_TIE, f"{audio.name}: token {at} differs with a top-2 gap of {gap}"
        assert (s_heard, s_answer) == (heard, answer)


def test_served_turn_streams_heard_then_answer_then_audio(served):
    events = list(served.respond(audio=_questions(1)[0], options=greedy_options(served, 320)))
    kinds = [type(e) for e in events]
    assert kinds[-1] is End and events[-1].reason == "eoa"
    first = {k: kinds.index(k) for k in (Heard, Answer, Audio)}
    assert first[Heard] < first[Answer] < first[Audio]
    assert sum(e.pcm.size for e in events if isinstance(e, Audio)) > 0


def _metric(url: str, name: str) -> float:
    """A vLLM Prometheus metric from /metrics, summed over its labels."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    found = re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)
    assert found, f"no {name} in /metrics"
    return sum(float(v) for v in found)


def _generated_by(url: str, run) -> float:
    """Tokens the server generated while `run()` ran, counted once it has no running request."""
    before = _metric(url, "vllm:generation_tokens_total")
    run()
    deadline = time.monotonic() + 10
    while _metric(url, "vllm:num_requests_running") > 0:
        assert time.monotonic() < deadline, "the server still runs the request"
        time.sleep(0.2)
    return _metric(url, "vllm:generation_tokens_total") - before


UNSTOPPABLE = 600  # tokens a request must generate when nothing aborts it (min = max on the server)


def _stopped_at_heard(served: Pipeline, how: str) -> None:
    """One spoken turn that the server cannot end early by itself, stopped at the first word heard."""
    options = greedy_options(served, UNSTOPPABLE)
    options = replace(options, sampling=replace(options.sampling, min_new_tokens=UNSTOPPABLE))
    cancel = threading.Event()
    events = served.respond(audio=_questions(1)[0], options=options, cancel=cancel)
    for event in events:
        if isinstance(event, Heard):
            if how == "close":  # the page went away
                events.close()
                return
            cancel.set()
    assert event.reason == "cancelled"


@pytest.mark.parametrize("how", ["stop", "close"])
def test_stop_and_page_close_abort_the_request_on_the_server(served, server_url, how):
    """Stopped at the first word heard, the server generates far fewer tokens than the request's
    minimum (so the request was aborted there, not left to finish), and no request is left running.
    The minimum keeps this from racing the server: a short answer may be whole before the client
    reads its first word on a busy machine."""
    stopped = _generated_by(server_url, lambda: _stopped_at_heard(served, how))
    assert stopped < UNSTOPPABLE / 2, stopped


def test_a_dead_server_is_a_plain_message_and_the_turn_ends(capsys):
    url = f"http://127.0.0.1:{free_port()}"
    pipeline = Pipeline.load(TINY, lm_url=url)
    with pytest.raises(ServerError, match="does not answer"):
        pipeline.check_server()
    events = list(pipeline.respond(text="What is two plus three?"))
    assert [type(e) for e in events] == [End] and events[0].reason == "error"
    assert "does not answer" in events[0].problems[0] and "Traceback" not in events[0].problems[0]
    assert cli.main(["ask", "--lm-url", url, "--text", "What is two plus three?", "--out", "/dev/null"]) != 0
    err = capsys.readouterr().err
    assert f"the language model server at {url} does not answer" in err and "Traceback" not in err


class _OtherModel(BaseHTTPRequestHandler):
    """A server that answers like vLLM but serves another vocabulary."""

    def do_GET(self) -> None:
        self._send({"data": [{"id": "other-7b", "max_model_len": 4096}]})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self._send({"prompt": "something else entirely"})

    def _send(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


def test_a_server_of_another_model_is_refused_by_name():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _OtherModel)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        pipeline = Pipeline.load(TINY, lm_url=url)
        with pytest.raises(ServerError, match="serves 'other-7b', whose vocabulary is not this bundle's"):
            pipeline.check_server()
        events = list(pipeline.respond(text="What is two plus three?"))
        assert events[-1].reason == "error" and "other-7b" in events[-1].problems[0]
    finally:
        httpd.shutdown()


def test_the_app_turns_work_once_the_server_is_up(served, server_url):
    """A pipeline whose server was gone refuses turns, and answers once it is back (no restart)."""
    pipeline = Pipeline.load(TINY, lm_url=server_url)
    pipeline.server.url = f"http://127.0.0.1:{free_port()}"  # the server is not there yet
    assert list(pipeline.respond(text="What is two plus three?"))[-1].reason == "error"
    pipeline.server.url = server_url  # now it is
    end = list(pipeline.respond(text="What is two plus three?", options=greedy_options(pipeline, 320)))[-1]
    assert end.reason == "eoa" and end.turn is not None


class _Switching(_OtherModel):
    """A server whose list of models the test changes; it detokenizes with the bundle's tokenizer."""

    models: list[str] = []
    tokenizer = None

    def do_GET(self) -> None:
        self._send({"data": [{"id": m, "max_model_len": 1024} for m in self.models]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self._send({"prompt": self.tokenizer.decode(body["tokens"])})


def test_a_failed_check_of_any_kind_makes_the_next_turn_check_again(monkeypatch):
    monkeypatch.setenv("SPEECHGPT_LM_NAME", "tiny")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Switching)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        pipeline = Pipeline.load(TINY, lm_url=f"http://127.0.0.1:{httpd.server_address[1]}")
        server = pipeline.server
        _Switching.tokenizer, _Switching.models = server.tokenizer, ["tiny"]
        assert server.check().name == "tiny" and server.ready() is server.served
        for models, refusal in ((["other-7b"], "does not serve 'tiny'"), ([], "serves no model")):
            _Switching.models = models
            with pytest.raises(ServerError, match=refusal):
                server.check()
            assert server.served is None  # the next turn asks again instead of trusting the old answer
            with pytest.raises(ServerError, match=refusal):
                server.ready()
    finally:
        httpd.shutdown()
