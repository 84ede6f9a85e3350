"""The bad-input corpus (tests/bad_inputs.py) through the pipeline API and through the running app.

Every case must end as its table says: refused with its named kind and plain words (no library
internals), or processed. After every case the app still answers a held-out question of
SpeechGPT-tiny's domain with the domain's answer.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from app_helpers import GREEDY, TINY, known_questions, running_app
from bad_inputs import INTERNALS, Case, cases
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from speechgpt_app.audio import SAMPLE_RATE, AudioError, load_audio
from speechgpt_app.generate import SamplingOptions
from speechgpt_app.pipeline import Options, Pipeline

QUESTION = known_questions()[0]
SPEECH, _RATE = sf.read(QUESTION.audio, dtype="float32")
SECONDS = len(SPEECH) / SAMPLE_RATE
CASES = cases(SECONDS)
LOSSY_SLACK_S = 0.1  # encoder delay and padding of mp3/aac/opus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad-inputs")
    return {case.name: case.build(folder, SPEECH) for case in CASES}


def clean(message: str) -> None:
    leaked = [word for word in INTERNALS if word in message]
    assert not leaked, f"{message!r} shows {leaked}"


def test_the_corpus_is_large_and_says_what_becomes_of_each() -> None:
    assert len(CASES) >= 40 and len({c.name for c in CASES}) == len(CASES)
    assert sum(c.expect.kind is None for c in CASES) >= 15 and sum(c.expect.kind is not None for c in CASES) >= 20


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_audio_stage(case: Case, corpus: dict[str, Path]) -> None:
    path = corpus[case.name]
    if case.expect.kind is not None:
        with pytest.raises(AudioError) as err:
            load_audio(str(path))
        assert err.value.kind == case.expect.kind and case.expect.words in str(err.value), str(err.value)
        clean(str(err.value))
        return
    x = load_audio(str(path))
    assert x.dtype == np.float32 and x.ndim == 1  # 16 kHz mono
    assert abs(len(x) / SAMPLE_RATE - case.expect.seconds) < LOSSY_SLACK_S


@pytest.fixture(scope="module")
def pipeline() -> Pipeline:
    return Pipeline.load(str(TINY))


def test_every_case_through_the_pipeline_api(pipeline: Pipeline, corpus: dict[str, Path]) -> None:
    options = Options(SamplingOptions(**GREEDY), output="text")
    for case in CASES:
        if case.expect.kind is not None:
            with pytest.raises(AudioError) as err:
                pipeline.respond(audio=str(corpus[case.name]), options=options)
            assert err.value.kind == case.expect.kind, case.name
            continue
        end = list(pipeline.respond(audio=str(corpus[case.name]), options=options))[-1]
        assert end.reason in ("eoa", "eos", "max_tokens") and end.turn is not None, case.name
    answered = list(pipeline.respond(audio=str(QUESTION.audio), options=options))[-1]
    assert answered.turn.heard == QUESTION.text


def test_every_case_through_the_running_app(corpus: dict[str, Path], tmp_path_factory) -> None:
    settings = dict(top_p=0.8, top_k=50, max_new_tokens=320, seed=0, **GREEDY)

    def send(c: Client, audio: Path, output: str = "Text only") -> list:
        job = c.submit(
            handle_file(str(audio)), "", "Chat", settings["temperature"], settings["top_p"], settings["top_k"],
            settings["max_new_tokens"], settings["seed"], output, api_name="/send",
        )  # fmt: skip
        updates = list(job)
        job.result()
        return updates

    with running_app(TINY, tmp_path_factory.mktemp("hf")) as url:
        c = Client(url, verbose=False, download_files=False)
        for case in CASES:
            path = corpus[case.name]
            if case.expect.upload_refused:
                with path.open("rb") as f:
                    response = httpx.post(f"{url}gradio_api/upload", files={"files": (path.name, f)}, timeout=60)
                assert response.status_code == 413, case.name
            elif case.expect.kind is not None:
                with pytest.raises(AppError) as err:
                    send(c, path)
                assert case.expect.words in str(err.value), (case.name, str(err.value))
                clean(str(err.value))
            else:
                assert send(c, path)[-1][0], case.name  # processed: the model heard something
            # Whatever came before, a normal question (in a cleared conversation: the history would
            # change a small model's answer) still gets the domain's answer.
            c.predict(api_name="/clear")
            final = send(c, QUESTION.audio)[-1]
            assert (final[0], final[1]) == (QUESTION.text, QUESTION.answer), case.name
