"""The browser voice chat: Gradio components wired to `Pipeline.respond` events, nothing else.

One spoken turn fills three live panels in the order the model writes them (Heard, Answer,
Speech units) while the answer speech streams into an autoplaying player. Finished turns go to
the conversation, which is sent back to the model as multi-turn context. Every browser session
keeps its own conversation in a `gr.State`; nothing here parses model output or runs a model.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.metadata
import json
import logging
import secrets
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import soundfile as sf
import torch

from speechgpt_app import __version__
from speechgpt_app.bundle import BundleError
from speechgpt_app.events import Accumulator, Audio, Event, Notice, batched, update_interval
from speechgpt_app.generate import SamplingOptions
from speechgpt_app.loaders import MissingWeightsError, ModelNameError
from speechgpt_app.model import ModelLoadError
from speechgpt_app.pipeline import Options, Pipeline, Timings
from speechgpt_app.prompt import PromptError, Turn, assistant_prefix_for
from speechgpt_app.units import units_to_text

log = logging.getLogger(__name__)

# Choices shown to the user -> the pipeline's option values.
TASKS: dict[str, str] = {"Chat": "chat", "Transcribe only": "transcribe", "Speak this text": "speak"}
OUTPUT_MODES: dict[str, str] = {"Speech + text": "speech+text", "Text only": "text"}

# Streaming audio goes out as int16 at ONE fixed scale: Gradio peak-normalises float arrays per
# chunk, which would make every chunk as loud as the loudest and click at the seams.
INT16_SCALE = 32767

# The settings panel starts from the bundle's defaults; the seed starts fixed so that a turn can be
# repeated exactly (an empty seed box means a fresh random seed, recorded in the export).
DEFAULT_SEED = 0

# Uploads, answer audio and exports are deleted this long after they were written (or when the page
# closes, for the app's own files): Gradio sweeps its cache hourly, ChatApp whenever it writes a file.
RETENTION_SECONDS = 24 * 3600
CACHE_SWEEP_SECONDS = 3600

# How long the answer stream's first chunk may wait for its encoder's first frames (see
# `wait_for_the_first_audio_frames`); a chunk too short to make a frame waits this long once.
FIRST_FRAMES_WAIT_S = 0.5

# Gradio's AAC stream encoder emits its first frame only after about 0.15 s of audio (here: 2,400 samples
# at 16 kHz gave none, 3,200 gave two). A shorter first chunk leaves the page's player an empty first
# playlist, and it asks again a second later (Send -> playable 2.2 s instead of about 0.7): the answer's
# first chunk is sent once it holds at least this much audio.
FIRST_AUDIO_S = 0.2

STOPPED_WAITING = "Stopped before it started: your question was not sent to the model."

OUT_OF_MEMORY = "The GPU ran out of memory. Try a shorter question, fewer new tokens, or clear the conversation."

# The libraries whose versions go into an exported conversation.
EXPORT_LIBRARIES = ("torch", "transformers", "peft", "gradio", "numpy")

CSS = """
#heard textarea, #answer textarea { font-size: 1.05rem; }
#timings { font-family: ui-monospace, monospace; font-size: 0.9rem; }
#model-line { opacity: 0.85; }
"""


@dataclass
class TurnRecord:
    """One finished exchange, as the conversation view and the JSON export show it."""

    task: str
    user_text: str | None  # what the user typed (None for a spoken question)
    user_audio: str | None  # path of the user's recording or upload
    heard: str
    answer: str
    units: list[int]
    answer_audio: str | None  # path of the whole answer's WAV
    reason: str
    problems: list[str]
    notices: list[str]
    timings: dict[str, float | None]
    settings: dict[str, Any]
    context: list[dict[str, str]]  # the earlier turns sent to the model as history
    turn: Turn | None  # what goes back to the model as history next time


@dataclass
class Session:
    """Everything one browser session owns: its conversation, in order."""

    records: list[TurnRecord] = field(default_factory=list)

    def history(self) -> tuple[Turn, ...]:
        """The finished turns to send back to the model as context."""
        return tuple(r.turn for r in self.records if r.turn is not None)


@dataclass
class LiveTurn(Accumulator):
    """The live panels of the turn being generated: the one accumulator, with the turn's timings."""

    timings: Timings = field(default_factory=Timings)

    def apply(self, event: Event) -> np.ndarray | None:
        """Fold one event into the panels; return the int16 audio chunk to stream, if any."""
        self.timings.observe(event)
        self.add(event)
        return to_int16(event.pcm) if isinstance(event, Audio) else None

    def audio_int16(self) -> np.ndarray:
        """All answer audio so far at the one fixed int16 scale."""
        return to_int16(self.audio())


class FirstAudioGate:
    """Holds the answer's audio until there is `FIRST_AUDIO_S` of it; after that, chunks pass as they come."""

    def __init__(self, seconds: float = FIRST_AUDIO_S) -> None:
        self.seconds = seconds
        self._held: list[np.ndarray] = []
        self._open = False

    def take(self, chunk: np.ndarray | None, sample_rate: int | None) -> np.ndarray | None:
        """The audio to send now for this `chunk` (None: nothing yet)."""
        if chunk is None or self._open:
            return chunk
        self._held.append(chunk)
        held = np.concatenate(self._held)
        if sample_rate and len(held) >= self.seconds * sample_rate:
            self._open, self._held = True, []
            return held
        return None

    def rest(self) -> np.ndarray | None:
        """What is still held when the answer ends shorter than the gate (then sent as it is)."""
        held, self._held = self._held, []
        return np.concatenate(held) if held else None


def to_int16(pcm: np.ndarray) -> np.ndarray:
    """Float [-1, 1] -> int16 at the one fixed scale (clipped, never normalised per chunk)."""
    return np.clip(np.round(pcm.astype(np.float64) * INT16_SCALE), -INT16_SCALE - 1, INT16_SCALE).astype(
        np.int16
    )


def units_summary(units: Sequence[int]) -> str:
    """The count line above the collapsible unit string."""
    return f"**{len(units)}** speech units" if units else "no speech units yet"


def library_versions() -> dict[str, str]:
    """Versions of this package and the libraries that shape its output."""
    versions = {"speechgpt_app": __version__}
    for name in EXPORT_LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def friendly_error(exc: BaseException) -> gr.Error:
    """Turn any failure of a turn into a plain message for the page."""
    if isinstance(exc, (MissingWeightsError, ModelNameError, ModelLoadError, BundleError)):
        return gr.Error(f"The model is not available: {exc}", title="Model not available")
    if isinstance(exc, ValueError):  # bad input: audio.AudioError, prompt.PromptError, option values
        # A refused input is not a server fault: one log line, nothing of the user's (no audio, text or
        # file name), and no traceback from Gradio.
        log.info("refused an input: %s", getattr(exc, "kind", type(exc).__name__))
        return gr.Error(str(exc), title="Can't answer this", print_exception=False)
    if isinstance(exc, torch.OutOfMemoryError):
        return gr.Error(OUT_OF_MEMORY, title="Out of memory")
    log.exception("turn failed")
    return gr.Error(f"Something went wrong: {exc}", title="Error")


def waiting_in_queue(demo: gr.Blocks, handlers: Sequence[Callable]) -> Callable[[str], bool]:
    """A test of whether a session has a turn (one of `handlers`) waiting in `demo`'s queue, not yet running.

    Gradio has no public API for this, so it reads the queue's events (running ones have left it);
    if Gradio changes their shape it says False, and a Stop pressed while waiting is lost again.
    """

    def waiting(session_id: str) -> bool:
        queues = getattr(getattr(demo, "_queue", None), "event_queue_per_concurrency_id", {})
        return any(
            getattr(event, "session_hash", None) == session_id
            and getattr(getattr(event, "fn", None), "fn", None) in handlers
            for queue in list(queues.values())
            for event in list(getattr(queue, "queue", ()))
        )

    return waiting


def wait_for_the_first_audio_frames(seconds: float = FIRST_FRAMES_WAIT_S) -> None:
    """Let the answer stream's first chunk wait up to `seconds` for its AAC encoder's first frames.

    Gradio encodes streamed audio with one ffmpeg process per answer and waits 0.1 s for the first
    chunk's frames. ffmpeg often takes longer to come up on a busy 2-core machine (50-210 ms measured
    here), and then the page's player gets an empty first playlist and asks again only a target
    duration (1 s) later: the answer started playing 1.3-2.0 s after Send instead of 0.6-0.9 s. The
    wait ends as soon as frames come. `STARTUP_WAIT` is not a documented API: if Gradio drops it, this
    does nothing and the page is only slower.
    """
    from gradio import audio_stream_encoder

    if isinstance(getattr(audio_stream_encoder, "STARTUP_WAIT", None), (int, float)):
        audio_stream_encoder.STARTUP_WAIT = max(audio_stream_encoder.STARTUP_WAIT, seconds)


def state_dropper(demo: gr.Blocks) -> Callable[[str], None]:
    """A function that drops a session's state from `demo` (its gr.State and Gradio's per-session copy
    of the page's components).

    Gradio keeps a closed session's state for an hour, and the session's entry until 10,000 sessions
    have come after it: about a megabyte per session, so a busy app's memory climbs for hours. Its
    `state_holder` is not a documented API: if Gradio changes its shape this does nothing, and memory
    is bounded by Gradio's own limits again.
    """

    def drop(session_id: str) -> None:
        holder = getattr(demo, "state_holder", None)
        sessions, used = getattr(holder, "session_data", None), getattr(holder, "time_last_used", None)
        if not isinstance(sessions, dict) or not isinstance(used, dict):
            return
        with getattr(holder, "lock", threading.Lock()):
            sessions.pop(session_id, None)
            used.pop(session_id, None)

    return drop


def _session_id(request: gr.Request | None) -> str:
    """The browser session's id ("" outside a session, e.g. while caching examples)."""
    return (request.session_hash if request is not None else None) or ""


class ChatApp:
    """The handlers behind the page, bound to one loaded pipeline (or to the reason it failed)."""

    def __init__(self, pipeline: Pipeline | None, unavailable: str | None, files_dir: Path) -> None:
        self.pipeline = pipeline
        self.unavailable = unavailable
        self.files_dir = files_dir
        # Stop must reach a turn running in another request, so cancel flags live here, per session.
        self._cancels: dict[str, threading.Event] = {}
        # A turn waiting in the queue (behind another session's) has no cancel flag yet: Stop marks
        # its session, and the turn refuses to start. `queued_turns` says which sessions have one.
        self._stopped_waiting: set[str] = set()
        self._cleared_at: dict[str, float] = {}
        self.queued_turns: Callable[[str], bool] = lambda session_id: False
        self.drop_state: Callable[[str], None] = lambda session_id: None  # state_dropper(demo)
        self._lock = threading.Lock()

    # ---- inputs ------------------------------------------------------------------------------

    def options(
        self,
        task: str,
        temperature: float,
        top_p: float,
        top_k: float,
        max_new_tokens: float,
        seed: float | None,
        output_mode: str,
        assistant_prefix: str | None = None,
    ) -> Options:
        """The settings panel as pipeline options (Options checks the values).

        An empty seed gets a fresh random one here, so that the export can say which seed ran.
        """
        if task not in TASKS:
            raise gr.Error(f"Unknown task {task!r}; choose one of {', '.join(TASKS)}.")
        if output_mode not in OUTPUT_MODES:
            raise gr.Error(f"Unknown output mode {output_mode!r}; choose one of {', '.join(OUTPUT_MODES)}.")
        try:
            sampling = SamplingOptions(
                temperature=float(temperature),
                top_p=float(top_p),
                top_k=int(top_k),
                max_new_tokens=int(max_new_tokens),
                seed=secrets.randbelow(2**31) if seed is None else int(seed),
            )
            return Options(
                sampling,
                task=TASKS[task],  # type: ignore[arg-type]  # a key of TASKS, checked above
                output=OUTPUT_MODES[output_mode],  # type: ignore[arg-type]
                assistant_prefix=assistant_prefix,
            )
        except ValueError as exc:
            raise gr.Error(f"Check the settings: {exc}", title="Settings") from exc

    def _cancel_flag(self, session_id: str) -> threading.Event:
        with self._lock:
            flag = threading.Event()
            self._cancels[session_id] = flag
            return flag

    def _release_flag(self, session_id: str, flag: threading.Event) -> None:
        with self._lock:
            if self._cancels.get(session_id) is flag:
                del self._cancels[session_id]

    def dequeued(self, request: gr.Request | None) -> bool:
        """A turn leaves the queue: whether Stop (or Clear) was pressed while it waited."""
        session_id = _session_id(request)
        with self._lock:
            stopped = session_id in self._stopped_waiting
            self._stopped_waiting.discard(session_id)
        return stopped

    def clear(self, request: gr.Request) -> None:
        """Clear button: stop the session's turns, and note when, so a stopped turn does not bring the
        conversation back when it ends."""
        with self._lock:
            self._cleared_at[_session_id(request)] = time.monotonic()
        self.stop(request)

    def cleared_since(self, session_id: str, since: float) -> bool:
        """Whether the session pressed Clear after `since` (time.monotonic())."""
        with self._lock:
            return self._cleared_at.get(session_id, -1.0) > since

    def stop(self, request: gr.Request) -> None:
        """Stop button: end this session's running turn (it keeps what it has so far) and its waiting one."""
        session_id = _session_id(request)
        with self._lock:
            flag = self._cancels.get(session_id)
            if self.queued_turns(session_id):
                self._stopped_waiting.add(session_id)
        if flag is not None:
            flag.set()

    # ---- one turn ----------------------------------------------------------------------------

    def run_turn(
        self,
        request: gr.Request | None,
        *,
        audio: str | None,
        text: str | None,
        history: tuple[Turn, ...],
        options: Options,
    ) -> Iterator[tuple[LiveTurn, np.ndarray | None]]:
        """Drive `respond` and yield the live panels after each batch of events (events.batched: the
        turn runs at its own pace in its own thread; the page gets at most about 20 text updates a
        second, fewer while many turns run, events.update_interval), with the batch's new audio."""
        if self.pipeline is None:
            raise gr.Error(f"The model is not available: {self.unavailable}", title="Model not available")
        session_id = _session_id(request)
        cancel = self._cancel_flag(session_id)
        live, gate = LiveTurn(), FirstAudioGate()
        try:
            turn = self.pipeline.respond(audio=audio, text=text, history=history, options=options, cancel=cancel)
            for batch in batched(turn, update_interval(len(self._cancels))):
                chunks = [c for c in map(live.apply, batch) if c is not None]
                for event in batch:
                    if isinstance(event, Notice):
                        gr.Warning(event.message)
                yield live, gate.take(np.concatenate(chunks) if chunks else None, live.sample_rate)
            rest = gate.rest()
            if rest is not None:
                yield live, rest
        except gr.Error:
            raise
        except Exception as exc:
            raise friendly_error(exc) from exc
        finally:
            # A closed page stops its turn too: otherwise the model would keep the GPU busy.
            cancel.set()
            self._release_flag(session_id, cancel)
        end = live.end
        if end is not None and end.reason == "error":
            # The pipeline ends a turn that failed mid-generation with End("error", (message,)).
            message = "; ".join(end.problems)
            if "OutOfMemoryError" in message:
                raise gr.Error(OUT_OF_MEMORY, title="Out of memory")
            raise gr.Error(f"The answer failed: {message}", title="Error")
        if end is not None and end.problems:
            gr.Warning("The model's output had problems: " + "; ".join(end.problems))

    def record(
        self,
        live: LiveTurn,
        session_id: str,
        *,
        audio: str | None,
        text: str | None,
        history: tuple[Turn, ...],
        options: Options,
    ) -> TurnRecord:
        """Keep a finished turn: write its answer audio and describe it for the history and export."""
        answer_audio = None
        if live.chunks and live.sample_rate:
            answer_audio = str(self._new_file(session_id, "answer", ".wav"))
            sf.write(answer_audio, live.audio_int16(), live.sample_rate, subtype="PCM_16")
        end = live.end
        return TurnRecord(
            task=options.task,
            user_text=text,
            user_audio=audio,
            heard=live.heard.strip(),
            answer=live.answer.strip(),
            units=list(live.units),
            answer_audio=answer_audio,
            reason=end.reason if end else "error",
            problems=list(end.problems) if end else ["the turn ended without an End event"],
            notices=[n.message for n in live.notices],
            timings=live.timings.as_dict(),
            settings=flat_settings(options),
            context=[dataclasses.asdict(t) for t in history],
            turn=end.turn if end else None,
        )

    def _new_file(self, session_id: str, stem: str, suffix: str) -> Path:
        """A fresh file in the session's own directory (removed when the session ends, or once it is
        older than RETENTION_SECONDS)."""
        with self._lock:  # one sweep at a time, and never between another's mkdir and its file
            self.sweep()
            folder = self.files_dir / (session_id or "no-session")
            folder.mkdir(exist_ok=True)
            with tempfile.NamedTemporaryFile(prefix=f"{stem}-", suffix=suffix, dir=folder, delete=False) as f:
                return Path(f.name)

    def sweep(self, now: float | None = None) -> None:
        """Delete the app's files older than RETENTION_SECONDS, and session folders left empty."""
        cutoff = (time.time() if now is None else now) - RETENTION_SECONDS
        for folder in [f for f in self.files_dir.iterdir() if f.is_dir()]:
            for file in folder.iterdir():
                if file.stat().st_mtime < cutoff:
                    file.unlink(missing_ok=True)
            if not any(folder.iterdir()):
                folder.rmdir()

    def forget(self, request: gr.Request) -> None:
        """A closed page: drop its answer audio, its exports and its state (the conversation), at once."""
        if request.session_hash:
            with self._lock:  # not while another session's write sweeps the folders
                shutil.rmtree(self.files_dir / request.session_hash, ignore_errors=True)
                self._stopped_waiting.discard(request.session_hash)
                self._cleared_at.pop(request.session_hash, None)
            self.drop_state(request.session_hash)

    # ---- export ------------------------------------------------------------------------------

    def export(
        self, session: Session, session_id: str, description: str, details: dict[str, Any] | None = None
    ) -> str:
        """Write the conversation as JSON (the model's `details` beside its one-line `description`)."""
        if not session.records:
            raise gr.Error("There is nothing to export yet: the conversation is empty.")
        doc = {
            "format": "speechgpt-conversation/1",
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": description,
            "model_details": details or {},
            "versions": library_versions(),
            "turns": [export_record(r) for r in session.records],
        }
        path = self._new_file(session_id, "conversation", ".json")
        path.write_text(json.dumps(doc, indent=2, ensure_ascii=False), encoding="utf-8")
        return str(path)


def flat_settings(options: Options) -> dict[str, Any]:
    """A turn's settings as the export writes them: the sampling settings beside the others, one level."""
    settings = dataclasses.asdict(options)
    return {**settings.pop("sampling"), **settings}


def export_record(r: TurnRecord) -> dict[str, Any]:
    """One turn of the exported JSON (audio by file name: the files are downloaded separately)."""
    return {
        "task": r.task,
        "question_text": r.user_text,
        "question_audio": Path(r.user_audio).name if r.user_audio else None,
        "heard": r.heard,
        "answer": r.answer,
        "units": r.units,
        "answer_audio": Path(r.answer_audio).name if r.answer_audio else None,
        "end_reason": r.reason,
        "problems": r.problems,
        "notices": r.notices,
        "timings": r.timings,
        "settings": r.settings,
        "seed": r.settings.get("seed"),
        "context": r.context,
    }


def chat_messages(records: Sequence[TurnRecord]) -> list[dict[str, Any]]:
    """The conversation view: the user's audio and text, then the assistant's audio and text."""
    messages: list[dict[str, Any]] = []
    for r in records:
        user: list[Any] = []
        if r.user_audio:
            user.append(gr.Audio(r.user_audio, buttons=["download"]))
        user.append(r.user_text or r.heard or "(not understood)")  # what was typed, else what was heard
        messages.append({"role": "user", "content": user})
        assistant: list[Any] = []
        if r.answer_audio:
            assistant.append(gr.Audio(r.answer_audio, buttons=["download"]))
        reply = r.answer or ("(transcribed)" if r.task == "transcribe" else "")
        if r.reason == "cancelled":
            reply += " (stopped)"
        assistant.append(reply.strip() or "(no text answer)")
        messages.append({"role": "assistant", "content": assistant})
    return messages


def _panels(live: LiveTurn, chunk: np.ndarray | None) -> tuple[Any, ...]:
    """The live panels' values: Heard, Answer, unit count, unit string, audio chunk, timings."""
    speech: Any = (live.sample_rate, chunk) if chunk is not None else gr.skip()
    return (
        live.heard.strip(),
        live.answer.strip(),
        units_summary(live.units),
        units_to_text(live.units) if live.units else "",
        speech,
        live.timings.summary(),
    )


def _blank_panels(player: Any) -> tuple[Any, ...]:
    """The live panels emptied (`player`: the answer player's value or update)."""
    return ("", "", units_summary([]), "", player, "")


class Handlers:
    """What each button and input does: `ChatApp`'s turns, checked and laid out for the page's outputs.

    `send`, `send_if_auto`, `regenerate` and `example_turn` run the model, so they come wrapped in
    `on_gpu` (the `spaces.GPU` decorator on ZeroGPU).
    """

    def __init__(self, app: ChatApp, defaults: Options, description: str, details: dict, on_gpu: Callable) -> None:
        self.app, self.defaults, self.description, self.details = app, defaults, description, details
        self.send = on_gpu(self._send)
        self.regenerate = on_gpu(self._regenerate)
        self.example_turn = on_gpu(self._example_turn)

    def _run_and_record(
        self,
        request: gr.Request | None,
        *,
        audio: str | None,
        text: str | None,
        history: tuple[Turn, ...],
        options: Options,
        keep: list[TurnRecord],
    ) -> Iterator[tuple[Any, ...]]:
        app = self.app
        # Clear the panels first so a new turn never shows the last one's text. The player is
        # cleared by a property update: a plain None would open an empty audio stream.
        started = time.monotonic()
        cleared = gr.update(value=None)
        yield (*_blank_panels(cleared), gr.skip(), gr.skip(), gr.skip(), gr.skip())
        live = LiveTurn()
        for live, chunk in app.run_turn(request, audio=audio, text=text, history=history, options=options):
            yield (*_panels(live, chunk), gr.skip(), gr.skip(), gr.skip(), gr.skip())
        if app.cleared_since(_session_id(request), started):
            # Clear was pressed mid-answer: the conversation it emptied stays empty.
            yield (*_blank_panels(gr.skip()), [], Session(), gr.skip(), gr.skip())
            return
        rec = app.record(live, _session_id(request), audio=audio, text=text, history=history, options=options)
        new = Session(records=[*keep, rec])
        # The question is now in the conversation: empty the inputs for the next one.
        yield (*_panels(live, None), chat_messages(new.records), new, None, "")

    def _send(
        self,
        audio: str | None,
        text: str | None,
        task: str,
        temperature: float,
        top_p: float,
        top_k: float,
        max_new_tokens: float,
        seed: float | None,
        output_mode: str,
        session: Session,
        request: gr.Request,
    ) -> Iterator[tuple[Any, ...]]:
        if self.app.dequeued(request):
            raise gr.Error(STOPPED_WAITING, title="Stopped")
        text = text if text and text.strip() else None
        _check_question(audio, text, task)
        options = self.app.options(task, temperature, top_p, top_k, max_new_tokens, seed, output_mode)
        yield from self._run_and_record(
            request, audio=audio, text=text,
            history=session.history(), options=options, keep=session.records,
        )  # fmt: skip

    def send_if_auto(
        self,
        auto: bool,
        audio: str | None,
        text: str | None,
        task: str,
        temperature: float,
        top_p: float,
        top_k: float,
        max_new_tokens: float,
        seed: float | None,
        output_mode: str,
        session: Session,
        request: gr.Request,
    ) -> Iterator[tuple[Any, ...]]:
        """End of speech is the user stopping the recording; sending then is optional."""
        if not auto or audio is None:
            self.app.dequeued(request)  # nothing to send: a Stop meant for this event is spent
            yield tuple(gr.skip() for _ in range(10))
            return
        yield from self.send(
            audio, text, task, temperature, top_p, top_k, max_new_tokens, seed, output_mode, session, request
        )

    def _regenerate(
        self,
        corrected: str,
        temperature: float,
        top_p: float,
        top_k: float,
        max_new_tokens: float,
        seed: float | None,
        output_mode: str,
        session: Session,
        request: gr.Request,
    ) -> Iterator[tuple[Any, ...]]:
        if self.app.dequeued(request):
            raise gr.Error(STOPPED_WAITING, title="Stopped")
        last, prefix = _regeneration(session, corrected)
        keep = session.records[:-1]
        # The corrected transcript is forced as the start of the answer; the question's units stay.
        options = self.app.options(
            "Chat", temperature, top_p, top_k, max_new_tokens, seed, output_mode, assistant_prefix=prefix
        )
        yield from self._run_and_record(
            request, audio=last.user_audio, text=last.user_text,
            history=Session(records=keep).history(), options=options, keep=keep,
        )  # fmt: skip

    def _example_turn(self, audio: str) -> tuple[Any, ...]:
        # Cached once, then shown whole: no streaming (Gradio caches a function's final value).
        updates = self.app.run_turn(None, audio=audio, text=None, history=(), options=self.defaults)
        live = collections.deque(updates, maxlen=1)[0][0]  # the same LiveTurn, after the last event
        heard_text, answer_text, count, unit_string, _, timing = _panels(live, None)
        speech = (live.sample_rate, live.audio_int16()) if live.chunks else None
        return heard_text, answer_text, count, unit_string, speech, timing

    def clear(self, request: gr.Request) -> tuple[Any, ...]:
        """Empty this session's panels, conversation and inputs (stopping its turn)."""
        self.app.clear(request)
        return (*_blank_panels(None), [], Session(), None, "", gr.File(None, visible=False))

    def export(self, session: Session, request: gr.Request) -> str:
        """This session's conversation as a JSON file."""
        return self.app.export(session, _session_id(request), self.description, self.details)


def _check_question(audio: str | None, text: str | None, task: str) -> None:
    """Refuse, in the page's words, a question the task cannot take (the pipeline says "speech units")."""
    if audio is None and text is None:
        raise gr.Error("Record or upload a question, or type one, then press Send.", title="No question")
    if audio is not None and text is not None:
        raise gr.Error("Give either a recording or typed text, not both: clear one of them.")
    if task == "Transcribe only" and audio is None:
        raise gr.Error("Transcribe only works on a recording: record or upload one.", title="No recording")
    if task == "Speak this text" and text is None:
        raise gr.Error("Speak this text needs typed text: type what it should say.", title="No text")


def _regeneration(session: Session, corrected: str) -> tuple[TurnRecord, str]:
    """The turn to answer again and its forced prefix, or a plain refusal."""
    if not session.records:
        raise gr.Error("There is no answer to regenerate yet: send a question first.")
    last = session.records[-1]
    if last.task != "chat":
        raise gr.Error("Only a chat answer can be regenerated from a corrected transcript.")
    if last.user_audio is None:
        # A typed question has no transcript to correct: the heard box is not what was asked.
        raise gr.Error("The last question was typed, not spoken: edit it and send it again instead.")
    corrected = (corrected or "").strip()
    if not corrected:
        raise gr.Error("The transcript is empty: type what you said, then regenerate.")
    try:
        # Checked by prompt.py: markers such as `[ta]` or `<eoa>` would be forced into the answer.
        return last, assistant_prefix_for(last.task, corrected)  # type: ignore[arg-type]  # "chat"
    except PromptError as exc:
        raise gr.Error(f"Check the corrected transcript: {exc}.", title="Can't regenerate") from exc


@dataclass
class Page:
    """The page's components that the handlers read and write."""

    session: Any
    inputs_column: Any
    audio_in: Any
    text_in: Any
    task: Any
    send_btn: Any
    stop_btn: Any
    clear_btn: Any
    auto_send: Any
    heard: Any
    regen_btn: Any
    answer: Any
    units_count: Any
    units_text: Any
    speech: Any
    timings: Any
    chatbot: Any
    export_btn: Any
    export_file: Any
    settings: list[Any]  # temperature, top-p, top-k, max new tokens, seed, output mode

    @property
    def panels(self) -> list[Any]:
        """The live panels, in `_panels`' order."""
        return [self.heard, self.answer, self.units_count, self.units_text, self.speech, self.timings]

    @property
    def turn_outputs(self) -> list[Any]:
        """What a turn updates: the panels, the conversation, the session and the inputs."""
        return [*self.panels, self.chatbot, self.session, self.audio_in, self.text_in]


def _layout(model_md: str, defaults: Options, max_tokens: int, model_info: str, info_lines: int) -> Page:
    """The components, inside the open gr.Blocks: inputs left, live panels right, then the
    conversation and the settings."""
    session = gr.State(Session())
    gr.Markdown("# SpeechGPT voice chat\nAsk by voice or text; it answers in text and speech.")
    gr.Markdown(model_md, elem_id="model-line")
    with gr.Row():
        with gr.Column(scale=2, min_width=320) as inputs_column:
            audio_in = gr.Audio(
                sources=["microphone", "upload"], type="filepath", label="Your question (speak or upload)",
                elem_id="audio-in",
            )  # fmt: skip
            text_in = gr.Textbox(label="…or type it", lines=2, elem_id="text-in")
            task = gr.Radio(list(TASKS), value="Chat", label="Task", elem_id="task")
            with gr.Row():
                send_btn = gr.Button("Send", variant="primary", elem_id="send")
                stop_btn = gr.Button("Stop", variant="stop", elem_id="stop")
                clear_btn = gr.Button("Clear", elem_id="clear")
            auto_send = gr.Checkbox(True, label="Send when I stop recording", elem_id="auto-send")
        with gr.Column(scale=3, min_width=360):
            heard = gr.Textbox(
                label="Heard (edit it, then regenerate, if the model misheard)", lines=2,
                interactive=True, elem_id="heard",
            )  # fmt: skip
            regen_btn = gr.Button("Regenerate answer from this transcript", size="sm", elem_id="regen")
            answer = gr.Textbox(label="Answer", lines=3, interactive=False, elem_id="answer")
            units_count = gr.Markdown(units_summary([]), elem_id="units-count")
            with gr.Accordion("Speech units (the answer as the model wrote it)", open=False):
                units_text = gr.Textbox(show_label=False, lines=3, max_lines=8, interactive=False, elem_id="units-text")
            speech = gr.Audio(
                label="Answer speech", streaming=True, autoplay=True, interactive=False,
                buttons=["download"], elem_id="speech",
            )  # fmt: skip
            timings = gr.Markdown("", elem_id="timings")
    chatbot = gr.Chatbot(label="Conversation", height=380, elem_id="conversation")
    with gr.Row():
        export_btn = gr.Button("Export conversation (JSON)", size="sm", elem_id="export")
        export_file = gr.File(label="Conversation JSON", interactive=False, visible=False, elem_id="export-file")
    with gr.Accordion("Settings", open=False):
        with gr.Row():
            temperature = gr.Slider(0.0, 2.0, defaults.sampling.temperature, step=0.05, label="Temperature")
            top_p = gr.Slider(0.05, 1.0, defaults.sampling.top_p, step=0.05, label="Top-p")
            top_k = gr.Slider(0, 200, defaults.sampling.top_k, step=1, label="Top-k (0: off)")
        with gr.Row():
            max_new = gr.Slider(16, max_tokens, min(defaults.sampling.max_new_tokens, max_tokens), step=1, label="Max new tokens")
            seed = gr.Number(DEFAULT_SEED, precision=0, label="Seed (empty: random)")
            output_mode = gr.Radio(list(OUTPUT_MODES), value="Speech + text", label="Output")
        gr.Textbox(model_info, label="Model", lines=info_lines, interactive=False, elem_id="model-info")
    return Page(
        session, inputs_column, audio_in, text_in, task, send_btn, stop_btn, clear_btn, auto_send, heard,
        regen_btn, answer, units_count, units_text, speech, timings, chatbot, export_btn, export_file,
        [temperature, top_p, top_k, max_new, seed, output_mode],
    )  # fmt: skip


def _wire(page: Page, h: Handlers, app: ChatApp, examples: Sequence[Path]) -> None:
    """Connect the components to the handlers, inside the open gr.Blocks."""
    if examples:
        with page.inputs_column:  # under the inputs; built here because it needs the output panels
            gr.Examples(
                examples=[[str(p)] for p in examples], inputs=[page.audio_in], outputs=page.panels,
                fn=h.example_turn, cache_examples=True, cache_mode="lazy", label="Example recordings (answers cached)",
            )  # fmt: skip
    send_inputs = [page.audio_in, page.text_in, page.task, *page.settings, page.session]
    outputs = page.turn_outputs
    page.send_btn.click(h.send, send_inputs, outputs, api_name="send")
    page.text_in.submit(h.send, send_inputs, outputs, api_visibility="private")
    page.audio_in.stop_recording(h.send_if_auto, [page.auto_send, *send_inputs], outputs, api_visibility="private")
    page.regen_btn.click(h.regenerate, [page.heard, *page.settings, page.session], outputs, api_name="regenerate")
    # Stop and Clear skip the queue: they must act while a turn holds the only worker.
    page.stop_btn.click(app.stop, None, None, queue=False, api_name="stop")
    page.clear_btn.click(h.clear, None, [*outputs, page.export_file], queue=False, api_name="clear")
    # The file box stays hidden until it has something in it (a second step keeps the API's
    # /export returning a plain file).
    page.export_btn.click(h.export, [page.session], [page.export_file], api_name="export").success(
        lambda: gr.File(visible=True), None, page.export_file, api_visibility="private"
    )


def build_ui(
    pipeline: Pipeline | None,
    *,
    label: str | None = None,
    unavailable: str | None = None,
    examples: Sequence[Path] = (),
    gpu: Callable[[Callable], Callable] | None = None,
) -> gr.Blocks:
    """The voice chat page for `pipeline`.

    `label` is a plain line shown under the model line (the bundle's notice: what the model cannot
    do); `unavailable` explains why there is no pipeline (every turn then says so); `examples` are
    bundled recordings offered as cached examples; `gpu` wraps the handlers that run the model
    (the `spaces.GPU` decorator on ZeroGPU, nothing elsewhere).
    """
    app = ChatApp(pipeline, unavailable, Path(tempfile.mkdtemp(prefix="speechgpt-ui-")))
    # The app's own folder goes with it (or with the process): a restarted app leaves nothing behind.
    weakref.finalize(app, shutil.rmtree, app.files_dir, True)
    description = pipeline.description if pipeline is not None else f"not available: {unavailable}"
    details = pipeline.public_details if pipeline is not None else {}  # no local paths on a public page
    defaults = pipeline.default_options if pipeline is not None else Options()
    max_tokens = pipeline.context_length if pipeline is not None else defaults.sampling.max_new_tokens
    handlers = Handlers(app, defaults, description, details, gpu or (lambda fn: fn))
    model_md = f"**Model:** {description}" + (f"  \n⚠️ **{label}**" if label else "")
    model_info = "\n".join(f"{key}: {value}" for key, value in details.items()) or description
    # Gradio's own copies of uploads and answers: hourly, drop those older than the retention time.
    with gr.Blocks(title="SpeechGPT voice chat", delete_cache=(CACHE_SWEEP_SECONDS, RETENTION_SECONDS)) as demo:
        page = _layout(model_md, defaults, max_tokens, model_info, max(1, len(details)))
        _wire(page, handlers, app, examples)
        demo.unload(app.forget)
    app.queued_turns = waiting_in_queue(demo, (handlers.send, handlers.send_if_auto, handlers.regenerate))
    app.drop_state = state_dropper(demo)
    wait_for_the_first_audio_frames()
    return demo
