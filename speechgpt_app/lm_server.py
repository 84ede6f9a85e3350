"""The language model behind a vLLM server (its OpenAI-compatible `/v1/completions`), as a token source.

The app keeps the tokenizer, the speech side and the vocoder; the server runs the language model with
continuous batching. A request sends the prompt as token ids and asks for the answer's ids back
(`return_token_ids`), so our detokeniser, stop detection, parser and vocoder see exactly what they see
with the model in this process (`generate.LocalTokens`). Text forced into the answer (speech mode's
`; [ua] <sosp>`, an edited transcript) ends the open request and starts a follow-up with the longer
prompt; vLLM's prefix cache makes that cheap. Closing a request's connection aborts it on the server.

    SPEECHGPT_LM_URL=http://127.0.0.1:8000 python app.py     # or `ask --lm-url ...`
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import httpx

from speechgpt_app.generate import SamplingOptions
from speechgpt_app.vocab import STAGE1_SPECIAL, STAGE2_TOKENS

log = logging.getLogger(__name__)

LM_URL_ENV = "SPEECHGPT_LM_URL"
LM_NAME_ENV = "SPEECHGPT_LM_NAME"  # which served model to ask (a LoRA's name); unset: the first one listed
CONNECT_TIMEOUT_S = 5.0  # seconds to reach the server
READ_TIMEOUT_S = 120.0  # seconds between two streamed chunks (a busy CPU server can be slow)
# Text whose ids the server's tokenizer must read back exactly as ours: every added token and marker.
_PROBE_TEXT = " ".join([*STAGE1_SPECIAL, *STAGE2_TOKENS, "[tq] [ta] [ua] <eoa> what is two plus three"])


class ServerError(RuntimeError):
    """The language model server is missing, unreachable or serves another model; the message says which."""


def lm_url_from_env() -> str | None:
    """`$SPEECHGPT_LM_URL`, or None when unset or empty."""
    return os.environ.get(LM_URL_ENV, "").strip() or None


def wait_until_up(url: str, timeout_s: float, alive: Callable[[], bool] = lambda: True) -> None:
    """Wait for a just-started server at `url` to list its models (a cold CPU server compiles first);
    ServerError when `alive()` turns false (its process exited) or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        if not alive():
            raise ServerError(f"the language model server for {url} exited while starting")
        try:
            if httpx.get(f"{url.rstrip('/')}/v1/models", timeout=CONNECT_TIMEOUT_S).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise ServerError(f"the language model server at {url} did not start within {timeout_s:.0f} s")
        time.sleep(1.0)


@dataclass(frozen=True)
class ServedModel:
    """What the server at `url` serves, once checked against the bundle's tokenizer."""

    url: str
    name: str  # the served model name, sent with every request
    max_model_len: int


class LMServer:
    """A vLLM server's address and HTTP connections; `open` starts one answer's token stream."""

    def __init__(self, url: str, tokenizer, n_units: int, timeout_s: float = READ_TIMEOUT_S) -> None:
        if not url.startswith(("http://", "https://")):
            raise ServerError(f"the language model server address must start with http:// or https://, got {url!r}")
        self.url = url.rstrip("/")
        self.tokenizer = tokenizer
        self.n_units = n_units
        self.client = httpx.Client(timeout=httpx.Timeout(timeout_s, connect=CONNECT_TIMEOUT_S))
        self.name = os.environ.get(LM_NAME_ENV, "").strip() or None
        self.served: ServedModel | None = None  # set by check()

    def check(self) -> ServedModel:
        """Ask the server what it serves and whether its vocabulary is the bundle's; raise ServerError if not."""
        self.served = None  # until this check passes: a failed check of any kind makes ready() ask again
        try:
            models = self.client.get(f"{self.url}/v1/models", timeout=CONNECT_TIMEOUT_S).raise_for_status().json()
            data = models.get("data") or []
            if not data:
                raise ServerError(f"the language model server at {self.url} serves no model")
            listed = {m["id"]: m for m in data}
            name = self.name or data[0]["id"]
            if name not in listed:
                raise ServerError(f"the language model server at {self.url} does not serve {name!r} (it serves {', '.join(listed)})")
            max_len = int(listed[name].get("max_model_len") or data[0].get("max_model_len") or 0)
            # Prompts go as ids and answers come back as ids: what must agree is what each id means.
            probe = self.tokenizer.encode(_PROBE_TEXT + " " + self._unit_text(), add_special_tokens=False)
            body = {"model": name, "tokens": probe}
            theirs = self.client.post(f"{self.url}/detokenize", json=body, timeout=CONNECT_TIMEOUT_S)
            theirs = theirs.raise_for_status().json().get("prompt")
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
            raise ServerError(f"the language model server at {self.url} does not answer ({type(e).__name__}: {e})") from e
        if theirs != self.tokenizer.decode(probe):
            raise ServerError(
                f"the language model server at {self.url} serves {name!r}, whose vocabulary is not this "
                f"bundle's ({self.n_units} units and SpeechGPT's markers): start it with the bundle's model"
            )
        self.served = ServedModel(self.url, name, max_len)
        return self.served

    def ready(self) -> ServedModel:
        """The checked model, checking again if the last check failed (the server may be back)."""
        return self.served if self.served is not None else self.check()

    def open(self, prompt_ids: Sequence[int], options: SamplingOptions, limit: int) -> ServerTokens:
        """A token source for one answer of at most `limit` tokens (generate.SourceFactory)."""
        return ServerTokens(self, prompt_ids, options, limit)

    def _unit_text(self) -> str:
        return "".join(f"<{i}>" for i in range(self.n_units))

    def close(self) -> None:
        """Close the HTTP connections."""
        self.client.close()


class ServerTokens:
    """One answer's tokens from the server (generate.TokenSource): a streamed request, reopened with
    the longer prompt whenever the answer goes on with ids the stream did not give."""

    def __init__(self, server: LMServer, prompt_ids: Sequence[int], options: SamplingOptions, limit: int) -> None:
        self.server = server
        self.options = options
        self.limit = limit
        self.ids = list(prompt_ids)  # prompt + answer so far
        self.n_prompt = len(prompt_ids)
        self.eos_id = server.tokenizer.eos_token_id
        self.requests = 0  # requests opened for this answer (forcing opens a follow-up)
        self._response: httpx.Response | None = None
        self._chunks: Iterator[dict] | None = None
        self._ahead: deque[int] = deque()  # ids streamed but not yet handed out
        self._given: int | None = None  # the id next_token handed out, expected back in feed
        self._ended = False  # the open request finished at the model's end of sequence

    def feed(self, ids: Sequence[int]) -> None:
        """The answer goes on with `ids`; anything but the token just given ends the open request."""
        ids = list(ids)
        if ids and ids != [self._given]:
            self._abort()
        self._given = None
        self.ids += ids

    def crop(self, n_answer: int) -> None:
        """Cut the answer back; the next token comes from a new request."""
        self._abort()
        del self.ids[self.n_prompt + n_answer :]

    def next_token(self, answer_ids: Sequence[int]) -> int:
        """The next streamed id (a request is opened when none is), or EOS when the model ended."""
        if self._chunks is None and not self._ended:
            self._request(len(answer_ids))
        while not self._ahead and not self._ended:
            self._read_chunk()
        if self._ahead:
            self._given = self._ahead.popleft()
            return self._given
        self._ended = False  # the caller may force text after the EOS: that opens a new request
        self._close_response()
        return self.eos_id

    def close(self) -> None:
        """End the open request, if any (closing its connection aborts it on the server)."""
        self._abort()

    def _request(self, n_answer: int) -> None:
        served = self.server.ready()
        o = self.options
        body = {
            "model": served.name,
            "prompt": self.ids,
            "max_tokens": max(1, self.limit - n_answer),
            "min_tokens": max(0, o.min_new_tokens - n_answer),
            "temperature": 0.0 if o.greedy else o.temperature,
            "top_p": 1.0 if o.greedy else o.top_p,
            "top_k": -1 if o.greedy or o.top_k == 0 else o.top_k,
            "stream": True,
            "return_token_ids": True,
            "add_special_tokens": False,  # the prompt ids already start with <s>
            "skip_special_tokens": True,
        }
        if o.seed is not None and not o.greedy:
            body["seed"] = (o.seed + self.requests) % 2**63  # a follow-up request gets its own stream of draws
        self.requests += 1
        try:
            request = self.server.client.build_request("POST", f"{served.url}/v1/completions", json=body)
            self._response = self.server.client.send(request, stream=True)
            if self._response.status_code != 200:
                detail = self._response.read().decode("utf-8", "replace")[:300]
                raise ServerError(f"the language model server refused the request ({self._response.status_code}): {detail}")
            self._chunks = _events(self._response.iter_lines())
        except httpx.HTTPError as e:
            self._abort()
            self.server.served = None  # check again before the next turn
            raise ServerError(f"the language model server at {served.url} stopped answering ({type(e).__name__}: {e})") from e

    def _read_chunk(self) -> None:
        try:
            event = next(self._chunks)  # type: ignore[arg-type]
        except StopIteration:
            self._ended = True
            return
        except httpx.HTTPError as e:
            self._abort()
            self.server.served = None
            raise ServerError(f"the language model server stopped answering ({type(e).__name__}: {e})") from e
        if "error" in event:
            raise ServerError(f"the language model server failed: {event['error']}")
        for choice in event.get("choices", []):
            self._ahead.extend(choice.get("token_ids") or [])
            if choice.get("finish_reason") is not None:
                self._ended = True

    def _close_response(self) -> None:
        if self._response is not None:
            self._response.close()
        self._response, self._chunks = None, None

    def _abort(self) -> None:
        self._close_response()
        self._ahead.clear()
        self._ended = False


def _events(lines: Iterator[str]) -> Iterator[dict]:
    """Server-sent events of a streamed completion, as dicts, up to `data: [DONE]`."""
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)
