"""One spoken turn, streamed: `Pipeline.respond` joins every stage and yields typed events.

```
audio -> load_audio -> SpeechTokenizer.encode -> user_message -> build_prompt -> stream_tokens
      -> ChainParser (Heard / Answer / Units) -> VocoderStream (Audio) -> End(reason, problems, turn)
```

Every event carries `t_ms`, the milliseconds since `respond` was called with the whole input. Input
problems (unreadable audio, an empty text, a prompt that cannot fit) raise from `respond` itself,
before any event; problems with the model's output end the stream with `End(reason, problems)`; an
exception during generation ends it with `End("error", (message,))` and is logged.

With the language model in this process, a Pipeline runs one generation at a time (a lock held while
a turn's events are being produced); concurrent callers wait their turn. Close or exhaust the iterator
to release it. With the language model on a server (`lm_url`, lm_server.py), turns run side by side:
the server batches them.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from speechgpt_app import memory
from speechgpt_app.audio import limits_from_env, load_audio
from speechgpt_app.bundle import BundleError, BundleInfo, locate, read_bundle
from speechgpt_app.events import Answer, Audio, End, Event, Heard, Notice, Units
from speechgpt_app.generate import (
    GenerationStats,
    LogitsHook,
    SamplingOptions,
    encode_continuation,
    prefix_cache,
    stream_tokens,
)
from speechgpt_app.lm_server import LMServer, ServerError
from speechgpt_app.loaders import default_model, resolve_model
from speechgpt_app.model import LMSpec, load_lm, load_server_lm, quant_from_env
from speechgpt_app.parser import ChainParser
from speechgpt_app.prompt import (
    EOA,
    OUTPUT_MODES,
    SOSP,
    TASKS,
    UNITS_SEPARATOR,
    UNITS_TAG,
    OutputMode,
    PromptError,
    Task,
    Turn,
    build_prompt,
    user_message,
)
from speechgpt_app.units import SpeechTokenizer, units_to_text
from speechgpt_app.vocoder import load_vocoder

log = logging.getLogger(__name__)

MODEL_ENV = "SPEECHGPT_MODEL"  # default model for entry points: a bundle directory or a preset name
CHUNK_UNITS = 10  # units in the first vocoder chunk (~0.2-0.6 s of speech): the first audio comes early
CHUNK_GROWTH = 4  # later chunks double, up to this many times the first: fewer, larger vocoder calls
SPEECH_CONTINUATION = UNITS_SEPARATOR + SOSP  # forced when a speech answer stops after its text
TEXT_MODE_STOPS = (EOA, UNITS_TAG, SOSP)  # a text-only answer ends where the speech part would begin


def model_from_env() -> str:
    """The model named by `$SPEECHGPT_MODEL`, else the shipped SpeechGPT-tiny (loaders.default_model)."""
    return os.environ.get(MODEL_ENV, "").strip() or str(default_model())


@dataclass(frozen=True)
class Options:
    """How to answer one turn.

    `sampling`: how each next token is picked (the released inference settings by default).
    `task`: chat (answer the question), transcribe (write what was said), speak (say the text).
    `output`: "speech+text" (a chat answer is forced to go on to speech if the model stops after its
    text) or "text" (generation stops where the speech part would begin; no audio).
    `assistant_prefix`: forced start of the answer (e.g. a corrected transcript + "; [ta] "); it is
    streamed and parsed like generated text.
    """

    sampling: SamplingOptions = SamplingOptions()
    chunk_units: int = CHUNK_UNITS
    task: Task = "chat"
    output: OutputMode = "speech+text"
    assistant_prefix: str | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; expected one of {', '.join(TASKS)}")
        if self.output not in OUTPUT_MODES:
            raise ValueError(f"unknown output mode {self.output!r}; expected one of {', '.join(OUTPUT_MODES)}")
        if self.task == "speak" and self.output == "text":
            raise ValueError("the speak task answers in speech; use output 'speech+text'")
        if self.chunk_units < 1:
            raise ValueError(f"chunk_units must be at least 1, got {self.chunk_units}")
        if self.assistant_prefix is not None and not self.assistant_prefix.strip():
            raise ValueError("assistant_prefix is empty; give None for no prefix")


@dataclass
class Timings:
    """The timing figures every consumer reports, folded from a turn's events (`observe` each one).

    time to transcript: `t_ms` of the first Heard; time to first audio: of the first Audio;
    tokens/s: sampled tokens per second of decoding (from `End.stats`); real-time factor: wall time
    to the last Audio event / seconds of audio produced (below 1 is faster than real time); unit
    extraction and prefill: from `End.stats` too (`units_ms`, `prefill_s`).
    """

    time_to_transcript_ms: float | None = None
    time_to_answer_ms: float | None = None
    time_to_first_audio_ms: float | None = None
    last_audio_ms: float | None = None
    audio_seconds: float = 0.0
    total_ms: float | None = None
    tokens_per_second: float | None = None
    stats: dict[str, float] = field(default_factory=dict)

    def observe(self, event: Event) -> None:
        """Account for one event."""
        if isinstance(event, Heard) and self.time_to_transcript_ms is None:
            self.time_to_transcript_ms = event.t_ms
        elif isinstance(event, Answer) and self.time_to_answer_ms is None:
            self.time_to_answer_ms = event.t_ms
        elif isinstance(event, Audio) and len(event.pcm):
            if self.time_to_first_audio_ms is None:
                self.time_to_first_audio_ms = event.t_ms
            self.last_audio_ms = event.t_ms
            self.audio_seconds += len(event.pcm) / event.sample_rate
        elif isinstance(event, End):
            self.total_ms = event.t_ms
            self.stats = dict(event.stats)
            self.tokens_per_second = event.stats.get("tokens_per_s")

    @property
    def real_time_factor(self) -> float | None:
        """Wall time to the last audio / duration of the audio; None without audio."""
        if self.last_audio_ms is None or self.audio_seconds <= 0:
            return None
        return self.last_audio_ms / 1000 / self.audio_seconds

    def summary(self) -> str:
        """The one-line plain-text summary every front end shows ("–" for a figure the turn lacks)."""
        return (
            f"time to transcript {_seconds(self.time_to_transcript_ms)} · "
            f"time to first audio {_seconds(self.time_to_first_audio_ms)} · "
            f"{_figure(self.tokens_per_second, '.1f')} tokens/s · "
            f"real-time factor {_figure(self.real_time_factor, '.2f')}"
        )

    def as_dict(self) -> dict[str, float | None]:
        """Every figure, JSON-ready."""
        return {
            "time_to_transcript_ms": self.time_to_transcript_ms,
            "time_to_answer_ms": self.time_to_answer_ms,
            "time_to_first_audio_ms": self.time_to_first_audio_ms,
            "last_audio_ms": self.last_audio_ms,
            "audio_seconds": self.audio_seconds,
            "total_ms": self.total_ms,
            "tokens_per_second": self.tokens_per_second,
            "real_time_factor": self.real_time_factor,
            "units_ms": self.stats.get("units_ms"),
            "prefill_ms": self.stats["prefill_s"] * 1000 if "prefill_s" in self.stats else None,
            "prompt_tokens": self.stats.get("prompt_tokens"),
            "cached_tokens": self.stats.get("cached_tokens"),  # of the prompt, reused from an earlier turn
        }


def _seconds(ms: float | None) -> str:
    """Milliseconds as "0.67 s", or "–" when there is no figure."""
    return "–" if ms is None else f"{ms / 1000:.2f} s"


def _figure(x: float | None, fmt: str) -> str:
    """A number in `fmt`, or "–" when there is no figure."""
    return "–" if x is None else format(x, fmt)


@dataclass(frozen=True)
class Request:
    """A checked turn, ready to generate: the user message and the whole prompt as the model reads it."""

    user: str
    prompt: str
    prompt_ids: tuple[int, ...]
    notices: tuple[Notice, ...]
    options: Options
    units_ms: float | None = None  # turning the spoken question into units (None: a typed question)


def _bundle_options(bundle_dir: Path, info: BundleInfo) -> Options:
    """The default options: the released settings, with the bundle's `generation` overrides."""
    try:
        return Options(sampling=SamplingOptions(**info.generation))
    except ValueError as e:
        raise BundleError(f"bundle {bundle_dir}: its generation settings are invalid: {e}") from e


class Pipeline:
    """A loaded bundle (speech tokenizer, language model, vocoder) that answers turns."""

    def __init__(self, bundle_dir: Path, info: BundleInfo, speech, lm, vocoder, server: LMServer | None = None) -> None:
        self.bundle_dir = bundle_dir
        self.info = info
        self.speech = speech
        self.lm = lm
        self.vocoder = vocoder
        # task -> a hook that rewrites each next token's logits (generate.LogitsHook), or None: the
        # seam through which a test forces the answer it needs. Unset, the model alone decides.
        self.logits_hook: Callable[[Task], LogitsHook | None] | None = None
        self.default_options = _bundle_options(bundle_dir, info)
        self.limits = limits_from_env()  # input length limits; SPEECHGPT_MAX_SECONDS raises the 20 s cap
        self.server = server  # the language model's server, or None when it runs here
        self._lock: AbstractContextManager = threading.Lock() if server is None else nullcontext()
        # The vocoder's own thread, one for the pipeline's life (with a local model, one turn at a time).
        self.vocoder_thread = VocoderThread()

    @classmethod
    def load(
        cls,
        model: str | Path | None = None,
        quant: str | None = None,
        device: str | None = None,
        precision: str | None = None,
        merge_adapter: bool = True,
        lm_url: str | None = None,
    ) -> Pipeline:
        """Load a bundle directory or preset (default `$SPEECHGPT_MODEL`).

        `lm_url`: the address of a vLLM server running the bundle's language model; only its tokenizer
        is loaded here (the server is asked at each turn, `check_server` asks now).

        `quant` defaults to `$SPEECHGPT_QUANT` or "auto" (NF4 on CUDA, none on CPU); `precision` to
        "auto" (model.resolve_precision); `device` to CUDA when available. Raises loaders.ModelNameError,
        loaders.MissingWeightsError, bundle.BundleError or model.ModelLoadError with plain messages.
        """
        bundle_dir = resolve_model(model if model is not None else model_from_env())
        info = read_bundle(bundle_dir)
        _bundle_options(bundle_dir, info)  # refuse bad settings before loading gigabytes
        speech_dir = bundle_dir / info.speech
        lm_location = locate(bundle_dir, info.lm)
        spec = LMSpec(
            path=lm_location,
            adapter=locate(bundle_dir, info.adapter) if info.adapter is not None else None,
            precision=precision or "auto",
            quant=quant or quant_from_env(),
            merge_adapter=merge_adapter,
            device=device,
            n_units=info.n_units,  # = speech.json's (read_bundle); load_lm checks the vocabulary against it
        )
        server = None
        if lm_url is None:
            lm = load_lm(spec)
        else:
            lm = load_server_lm(spec, lm_url)
            server = LMServer(lm_url, lm.tokenizer, lm.n_units)
        speech = SpeechTokenizer.from_dir(speech_dir, device=lm.device)  # HuBERT beside the LM
        vocoder = load_vocoder(speech_dir / "vocoder", device=lm.device)
        if vocoder.n_units != speech.n_units:
            raise BundleError(
                f"bundle {bundle_dir}: the vocoder reads {vocoder.n_units} units but the speech tokenizer "
                f"writes {speech.n_units}"
            )
        if vocoder.sample_rate != info.sample_rate:
            raise BundleError(
                f"bundle {bundle_dir}: bundle.json says sample_rate {info.sample_rate} but the vocoder "
                f"writes {vocoder.sample_rate} Hz"
            )
        return cls(bundle_dir, info, speech, lm, vocoder, server)

    def check_server(self) -> None:
        """With a language model server: ask it now (lm_server.ServerError when it is not there or
        serves another model). Without one: nothing to check."""
        if self.server is not None:
            self.server.check()

    # --- what it is -------------------------------------------------------------------------------

    @property
    def description(self) -> str:
        """One short line: bundle name (Hub LM, LoRA merged or apart), numerics, device.

        E.g. "speechgpt-tiny, fp32, cpu". Local paths are left to `details`.
        """
        parts = [self.info.lm["hub"]] if isinstance(self.info.lm, dict) else []
        if self.lm.adapter is not None:
            parts.append("LoRA merged" if self.lm.adapter_merged else "LoRA kept apart")
        name = f"{self.info.name} ({' + '.join(parts)})" if parts else self.info.name
        return f"{name}, {self.lm.numerics}, {self.lm.device}"

    @property
    def warning(self) -> str | None:
        """The plain line a front end must show with the model line (bundle.json's `notice`), or None."""
        return self.info.notice or None

    @property
    def details(self) -> dict[str, str | bool | None]:
        """Everything `description` shortens, with full locations: for exports and a settings panel."""
        return {
            "name": self.info.name,
            "bundle": str(self.bundle_dir),
            "lm": locate(self.bundle_dir, self.info.lm),
            "adapter": self.lm.adapter,
            "adapter_merged": self.lm.adapter_merged if self.lm.adapter is not None else None,
            "numerics": self.lm.numerics,
            "device": str(self.lm.device),
            "loaded": self.lm.description,
            "about": self.info.description or None,
        }

    @property
    def public_details(self) -> dict[str, str | bool | None]:
        """`details` without anything local: what a page (and its public `/config`) may show.

        Hub ids are kept; a part inside the bundle is named by the bundle's name, never by its path.
        """
        def public(location) -> str | None:
            if location is None:
                return None
            return location["hub"] if isinstance(location, dict) else f"{self.info.name}/{location}"

        return {
            "name": self.info.name,
            "lm": public(self.info.lm),
            "adapter": public(self.info.adapter),
            "adapter_merged": self.lm.adapter_merged if self.lm.adapter is not None else None,
            "numerics": self.lm.numerics,
            "device": str(self.lm.device),
            "about": self.info.description or None,
        }

    @property
    def n_units(self) -> int:
        """Size of the speech unit vocabulary."""
        return self.speech.n_units

    @property
    def sample_rate(self) -> int:
        """Sample rate of the answer audio (Hz)."""
        return self.vocoder.sample_rate

    @property
    def context_length(self) -> int:
        """Tokens of prompt + answer the language model can hold."""
        return self.info.context_length

    def count_tokens(self, text: str) -> int:
        """Tokens of a prompt text as the model reads it (BOS included)."""
        return len(self.lm.tokenizer.encode(text))

    # --- one turn ---------------------------------------------------------------------------------

    def clear_prefix_cache(self) -> None:
        """Forget the key/value caches kept for next turns (generate.PrefixCache): the next turn
        prefills its whole prompt. A server keeps its own prefix cache."""
        store = prefix_cache(self.lm.model) if self.server is None else None
        if store is not None:
            store.clear()

    def respond(
        self,
        audio=None,
        text: str | None = None,
        history: Sequence[Turn] = (),
        options: Options | None = None,
        cancel: threading.Event | None = None,
    ) -> Iterator[Event]:
        """Answer one turn; returns an iterator of events ending with exactly one `End`.

        `audio`: anything audio.load_audio reads (path, bytes, array, Gradio's (rate, array)).
        `text`: a typed question (chat) or the text to speak (speak). `history`: earlier turns
        (each End.turn), oldest first. `options`: None = the bundle's defaults. `cancel`: set it to
        end the turn early (End reason "cancelled").
        Raises audio.AudioError, prompt.PromptError or ValueError for bad input, here, before any event.
        """
        started = time.perf_counter()
        request = self.prepare(audio, text, history, options)
        return self._run(request, cancel, started)

    def prepare(
        self, audio=None, text: str | None = None, history: Sequence[Turn] = (), options: Options | None = None
    ) -> Request:
        """Read the input and build the prompt (what `respond` does first); every input error is raised here.

        History that does not fit the context (less the room kept for the answer: `max_new_tokens`, at
        most half the context) is shortened by prompt.build_prompt, which says so in `notices`.
        """
        options = options or self.default_options
        if audio is None and text is None:
            raise PromptError("give a spoken question (audio) or a text")
        if audio is not None and text is not None:
            raise PromptError("give either audio or text, not both")
        units, units_ms = None, None
        if audio is not None:
            wav = load_audio(audio, limits=self.limits)
            started = time.perf_counter()
            units = units_to_text(self.speech.encode(wav))
            units_ms = (time.perf_counter() - started) * 1000
        user = user_message(options.task, options.output, units=units, text=text, style=self.info.prompt_style)
        reserve = min(options.sampling.max_new_tokens, self.context_length // 2)
        plan = build_prompt(user, history, self.count_tokens, self.context_length - reserve)
        prompt_ids = tuple(self.lm.tokenizer.encode(plan.text))
        if options.assistant_prefix is not None:
            forced = len(encode_continuation(self.lm.tokenizer, options.assistant_prefix))
            if forced >= options.sampling.max_new_tokens:
                raise PromptError(
                    f"the assistant prefix takes {forced} tokens, leaving no room in max_new_tokens="
                    f"{options.sampling.max_new_tokens}"
                )
        return Request(user, plan.text, prompt_ids, plan.notices, options, units_ms)

    def _run(self, request: Request, cancel: threading.Event | None, started: float) -> Iterator[Event]:
        def stamp(event: Event) -> Event:
            return replace(event, t_ms=(time.perf_counter() - started) * 1000)

        with self._lock:
            if self.server is not None:
                try:
                    self.server.ready()
                except ServerError as e:  # not up yet, or gone: this turn cannot run, the next may
                    yield stamp(End("error", (str(e),)))
                    return
            for notice in request.notices:
                yield stamp(notice)
            turn = _TurnState(request, self)
            try:
                for event in turn.events(cancel):
                    yield stamp(event)
            except ServerError as e:  # the server went away mid-answer: a plain line, no traceback
                log.warning("%s", e)
                yield stamp(End("error", (str(e),), stats=turn.stats_dict()))
            except Exception as e:  # the model, the vocoder, a device: end the turn, keep the app alive
                log.exception("generation failed")
                yield stamp(End("error", (f"generation failed: {type(e).__name__}: {e}",), stats=turn.stats_dict()))
            finally:  # however the turn ended (a reader that stopped reading too), its vocoder thread ends
                if turn.speaker is not None:
                    turn.speaker.stop()
                memory.release_freed()  # the turn's buffers go back to the system, not to a thread's arena


@dataclass(eq=False)
class VoiceLine:
    """One turn's place in the vocoder's thread: its chunks, in order, and whether it has audio yet."""

    jobs: deque = field(default_factory=deque)  # (order, future, fn, args) not yet run
    started: bool = False  # a chunk of this turn has made audio


class VocoderThread:
    """The vocoder's one thread, shared by the turns that run at once (with a language model server).

    Each turn's chunks run in the order given (the streaming vocoder is stateful). Between turns, the
    next chunk is the oldest of a turn whose audio has not started (its listener hears nothing yet);
    only when no such turn waits, the oldest of the turns already playing (whose listeners have audio
    in hand). So a new answer's first audio does not wait behind the rest of the others."""

    def __init__(self) -> None:
        self._waiting: list[VoiceLine] = []  # turns with chunks to run
        self._order = itertools.count()
        self._changed = threading.Condition()
        threading.Thread(target=self._run, name="vocoder", daemon=True).start()

    def submit(self, line: VoiceLine, fn: Callable[..., np.ndarray], *args: Any) -> Future:
        """Run `fn(*args)` (audio out) in the vocoder's thread, after `line`'s earlier chunks."""
        future: Future = Future()
        with self._changed:
            line.jobs.append((next(self._order), future, fn, args))
            if line not in self._waiting:
                self._waiting.append(line)
            self._changed.notify()
        return future

    def _next(self) -> tuple[VoiceLine, Future, Callable[..., np.ndarray], tuple]:
        with self._changed:
            self._changed.wait_for(lambda: self._waiting)
            silent = [line for line in self._waiting if not line.started]
            line = min(silent or self._waiting, key=lambda w: w.jobs[0][0])
            _, future, fn, args = line.jobs.popleft()
            if not line.jobs:
                self._waiting.remove(line)
            return line, future, fn, args

    def _run(self) -> None:
        while True:
            line, future, fn, args = self._next()
            if not future.set_running_or_notify_cancel():  # the turn stopped before this chunk
                continue
            try:
                pcm = fn(*args)
            except BaseException as e:  # handed to the turn that asked
                future.set_exception(e)
                continue
            line.started = line.started or len(pcm) > 0
            future.set_result(pcm)


class _Speaker:
    """The answer's units in, its audio out, with the vocoder in its own thread (its own CUDA stream
    on a GPU), so that decoding never waits for it.

    Chunks go to the vocoder in order, one at a time: the first after `chunk_units` units (the first
    audio comes early), each next one twice as large up to CHUNK_GROWTH times that (fewer, larger calls
    keep the real-time factor low). Finished audio is handed out as it is ready; `finish` waits for the
    rest. The streaming vocoder's joins are exact, so the audio equals decoding all units at once."""

    def __init__(self, pipeline: Pipeline, chunk_units: int) -> None:
        self.vocoder = pipeline.vocoder.stream()
        self.sample_rate = pipeline.sample_rate
        self.next_chunk = chunk_units
        self.max_chunk = chunk_units * CHUNK_GROWTH
        self.pending: list[int] = []
        self.worker = pipeline.vocoder_thread
        self.queued: deque[Future] = deque()
        self.line = VoiceLine()
        device = getattr(pipeline.vocoder, "device", None)
        self.cuda_stream = torch.cuda.Stream(device) if device is not None and device.type == "cuda" else None

    def feed(self, ids: Sequence[int]) -> Iterator[Audio]:
        """Take units; hand a full chunk to the vocoder; yield whatever audio is ready."""
        self.pending.extend(ids)
        if len(self.pending) >= self.next_chunk:
            self._submit(self.vocoder.push, self.pending)
            self.pending = []
            self.next_chunk = min(2 * self.next_chunk, self.max_chunk)
        yield from self._ready(wait=False)

    def finish(self) -> Iterator[Audio]:
        """The rest of the audio: the pending units and the vocoder's held-back tail."""
        if self.pending:
            self._submit(self.vocoder.push, self.pending)
            self.pending = []
        self._submit(self.vocoder.flush)
        yield from self._ready(wait=True)

    def stop(self) -> None:
        """However the turn ended: drop the vocoder work not yet started (a chunk being made finishes
        before the next turn's, in the one thread)."""
        for future in self.queued:
            future.cancel()
        self.queued.clear()

    def _submit(self, fn: Callable[..., np.ndarray], *args: Any) -> None:
        self.queued.append(self.worker.submit(self.line, self._on_stream, fn, *args))

    def _on_stream(self, fn: Callable[..., np.ndarray], *args: Any) -> np.ndarray:
        if self.cuda_stream is None:
            return fn(*args)
        with torch.cuda.stream(self.cuda_stream):
            return fn(*args)  # numpy out: the copy to the CPU waits for this stream only

    def _ready(self, wait: bool) -> Iterator[Audio]:
        while self.queued and (wait or self.queued[0].done()):
            pcm = self.queued.popleft().result()
            if len(pcm):
                yield Audio(pcm.astype(np.float32, copy=False), self.sample_rate)


class _TurnState:
    """The streaming part of one turn: tokens -> parser -> speaker, and the history entry at the end."""

    def __init__(self, request: Request, pipeline: Pipeline) -> None:
        self.request = request
        self.options = request.options
        self.pipeline = pipeline
        self.parser = ChainParser(pipeline.n_units)
        self.text = ""  # the answer as streamed (stop strings excluded)
        self.heard = ""
        self.stats: GenerationStats | None = None
        self.speech = self.options.output == "speech+text"
        self.speaker = _Speaker(pipeline, self.options.chunk_units) if self.speech else None
        self.forced_speech = False

    def stats_dict(self) -> dict[str, float]:
        """The generation statistics for `End.stats` ({} before generation finished)."""
        if self.stats is None:
            return {}
        units = {} if self.request.units_ms is None else {"units_ms": self.request.units_ms}
        return {**asdict(self.stats), "tokens_per_s": self.stats.tokens_per_s, **units}

    def events(self, cancel: threading.Event | None) -> Iterator[Event]:
        pipeline, options = self.pipeline, self.options
        tokenizer = pipeline.lm.tokenizer
        hook = pipeline.logits_hook(options.task) if pipeline.logits_hook is not None else None
        steps = stream_tokens(
            pipeline.lm.model,
            tokenizer,
            self.request.prompt_ids,
            options.sampling,
            prefix=options.assistant_prefix or "",
            stop_strings=(EOA,) if self.speech else TEXT_MODE_STOPS,
            on_stop=self._on_stop if self.speech and options.task == "chat" else None,
            logits_hook=hook,
            cancel=cancel,
            context_length=pipeline.context_length,
            source=pipeline.server.open if pipeline.server is not None else None,
        )
        reason = "error"
        for step in steps:
            if step.text:
                self.text += step.text
                for event in self.parser.feed(step.text):
                    yield from self._handle(event)
            if step.finish is not None:
                reason, self.stats = step.finish, step.stats
        for event in self.parser.finish(reason):
            if isinstance(event, End):
                if self.speaker is not None and reason == "cancelled":
                    self.speaker.stop()  # stop means stop: no more vocoder work
                elif self.speaker is not None:
                    yield from self.speaker.finish()
                yield replace(event, turn=self._turn(reason), stats=self.stats_dict())
            else:
                yield from self._handle(event)

    def _on_stop(self, reason: str, text: str) -> str | None:
        """Speech mode: a chat answer that ends after its text answer goes on to speak it (once)."""
        if self.forced_speech:
            return None
        probe = ChainParser(self.pipeline.n_units)
        probe.feed(text)
        if probe.state != "answer":
            return None
        self.forced_speech = True
        return SPEECH_CONTINUATION

    def _handle(self, event: Event) -> Iterator[Event]:
        yield event
        if isinstance(event, Heard):
            self.heard += event.text
        elif isinstance(event, Units) and self.speaker is not None:
            yield from self.speaker.feed(event.ids)

    def _turn(self, reason: str) -> Turn | None:
        """The exchange for the history: only a finished answer (eoa or eos) is kept."""
        if reason not in ("eoa", "eos") or not self.text.strip():
            return None
        answer = self.text.rstrip()
        if not self.speech:  # cut where the speech part began: drop the "; " separator too
            answer = answer.removesuffix(";").rstrip()
        try:
            return Turn(self.request.user, answer + EOA, self.heard.strip() or None)
        except PromptError:  # nothing a history could hold
            return None
