"""`python -m speechgpt_app chat --mic`: talk to the model through the microphone, hear it answer.

    python -m speechgpt_app chat --mic                  # press Enter to start, Enter to stop
    python -m speechgpt_app chat --mic --auto-stop      # recording stops after a second of silence

Each turn records from the default input device, prints what the model heard and its answer as they
are written, and plays the answer speech while it is still being generated. Earlier turns go back to
the model as context. Ctrl-C during an answer stops that answer; `q` (or Ctrl-D / Ctrl-C) at the
prompt quits. Without a sound card or PortAudio it says so and points to file mode (`ask --audio`).
"""

from __future__ import annotations

import argparse
import math
import queue
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol, TextIO

import numpy as np

from speechgpt_app.cli import add_model_flags, add_sampling_flags, load_pipeline, sampling_options
from speechgpt_app.events import Accumulator, Answer, Audio, End, Heard, Notice
from speechgpt_app.lm_server import ServerError
from speechgpt_app.loaders import MissingWeightsError
from speechgpt_app.model import ModelLoadError
from speechgpt_app.pipeline import Options, Pipeline, Timings
from speechgpt_app.prompt import Turn

EXIT_NO_DEVICE = 2  # no sound card or no PortAudio, or a bad model / option
BLOCK_SECONDS = 0.05  # microphone block: end-of-speech decisions are this fine-grained
RECORD_RATE = 16_000  # Hz asked of the microphone (the units' rate); load_audio resamples anything else

# End of speech (--auto-stop): after some speech, this long below the level ends the recording.
SPEECH_DBFS = -40.0  # dBFS RMS of a block that counts as speech (quiet speech on a laptop mic is ~-35)
END_SILENCE_SECONDS = 1.0
MIN_SPEECH_SECONDS = 0.3  # ignore clicks: this much speech must come first
MAX_RECORD_SECONDS = 20.0  # audio.AudioLimits.max_seconds: the model cannot take more

FILE_MODE_HINT = "to ask about a recorded file instead: python -m speechgpt_app ask --audio question.wav"


class NoAudioDeviceError(RuntimeError):
    """There is no usable microphone or speaker (or no PortAudio library)."""


class SoundCard(Protocol):
    """What the chat loop needs of a sound card; tests stand in a recorded file for it."""

    def record(self, stop: threading.Event, on_block: Callable[[np.ndarray], None]) -> tuple[int, np.ndarray]:
        """Record mono float32 at RECORD_RATE until `stop` is set, passing each block to `on_block`.

        Returns (RECORD_RATE, samples).
        """
        ...

    def play(self, pcm: np.ndarray, sample_rate: int) -> None:
        """Queue a chunk for playback and return at once."""
        ...

    def drain(self) -> None:
        """Wait until everything queued has played."""
        ...

    def close(self) -> None:
        """Release the device."""
        ...


def level_dbfs(block: np.ndarray) -> float:
    """RMS level of float samples in dB relative to full scale (-inf for digital silence)."""
    rms = float(np.sqrt(np.mean(np.square(block, dtype=np.float64)))) if block.size else 0.0
    return 20 * math.log10(rms) if rms > 0 else -math.inf


@dataclass
class EndOfSpeech:
    """Energy-based end-of-speech detection: speech, then `END_SILENCE_SECONDS` below `SPEECH_DBFS`.

    A plain level gate, not a trained voice-activity model: enough to end a recording in a quiet room.
    It also ends a recording that reaches `MAX_RECORD_SECONDS`.
    """

    sample_rate: int
    speech_dbfs: float = SPEECH_DBFS
    end_silence_s: float = END_SILENCE_SECONDS
    min_speech_s: float = MIN_SPEECH_SECONDS
    max_s: float = MAX_RECORD_SECONDS
    _speech_s: float = field(default=0.0, init=False)
    _silence_s: float = field(default=0.0, init=False)
    _total_s: float = field(default=0.0, init=False)

    def feed(self, block: np.ndarray) -> bool:
        """Account for one block; True once the speaker has finished."""
        seconds = len(block) / self.sample_rate
        self._total_s += seconds
        if level_dbfs(block) >= self.speech_dbfs:
            self._speech_s += seconds
            self._silence_s = 0.0
        elif self._speech_s >= self.min_speech_s:
            self._silence_s += seconds
        return self._total_s >= self.max_s or (
            self._speech_s >= self.min_speech_s and self._silence_s >= self.end_silence_s
        )


class SoundDeviceCard:
    """The default microphone and speaker through sounddevice (PortAudio)."""

    def __init__(self, sd) -> None:
        self.sd = sd
        self._queue: queue.Queue[tuple[np.ndarray, int] | None] = queue.Queue()
        self._player = threading.Thread(target=self._play_loop, name="speechgpt-player", daemon=True)
        self._player.start()

    @classmethod
    def open(cls) -> SoundDeviceCard:
        """The default devices, or NoAudioDeviceError saying what is missing."""
        try:
            import sounddevice as sd
        except (OSError, ImportError) as e:  # sounddevice raises OSError when the PortAudio library is missing
            raise NoAudioDeviceError(
                f"no PortAudio ({e}); on Debian: apt install libportaudio2, then pip install sounddevice"
            ) from e
        for kind in ("input", "output"):
            try:
                sd.query_devices(kind=kind)
            except (sd.PortAudioError, ValueError) as e:
                raise NoAudioDeviceError(f"no default {kind} audio device ({e})") from e
        return cls(sd)

    def record(self, stop: threading.Event, on_block: Callable[[np.ndarray], None]) -> tuple[int, np.ndarray]:
        """Record the default input until `stop` is set, handing each block to `on_block` as it comes."""
        blocks: list[np.ndarray] = []

        def callback(indata, frames, time, status) -> None:  # PortAudio's thread
            block = indata[:, 0].copy()
            blocks.append(block)
            on_block(block)

        with self.sd.InputStream(
            samplerate=RECORD_RATE, channels=1, dtype="float32",
            blocksize=int(RECORD_RATE * BLOCK_SECONDS), callback=callback,
        ):  # fmt: skip
            stop.wait()
        return RECORD_RATE, np.concatenate(blocks) if blocks else np.zeros(0, np.float32)

    def play(self, pcm: np.ndarray, sample_rate: int) -> None:
        """Queue a chunk for playback (played in order by the player thread); returns at once."""
        self._queue.put((pcm, sample_rate))

    def drain(self) -> None:
        """Wait until every queued chunk has played."""
        self._queue.join()

    def close(self) -> None:
        """Stop the player thread (after what is queued)."""
        self._queue.put(None)
        self._player.join(timeout=5)

    def _play_loop(self) -> None:
        # One output stream per sample rate; blocking writes pace playback in this thread only,
        # so generation never waits for the speaker.
        stream, rate = None, None
        while (item := self._queue.get()) is not None:
            pcm, sample_rate = item
            try:
                if stream is None or rate != sample_rate:
                    if stream is not None:
                        stream.close()
                    stream = self.sd.OutputStream(samplerate=sample_rate, channels=1, dtype="float32")
                    stream.start()
                    rate = sample_rate
                stream.write(np.ascontiguousarray(pcm, dtype=np.float32).reshape(-1, 1))
            except self.sd.PortAudioError as e:
                print(f"\n(playback failed: {e})", file=sys.stderr)
            finally:
                self._queue.task_done()
        if stream is not None:
            stream.close()
        self._queue.task_done()


@dataclass
class ChatSession:
    """The conversation so far and how to answer; `turn()` runs one exchange."""

    pipeline: Pipeline
    card: SoundCard
    options: Options
    auto_stop: bool = False
    out: TextIO = field(default_factory=lambda: sys.stdout)  # looked up when the session starts
    ask: Callable[[str], str] = input
    history: list[Turn] = field(default_factory=list)

    def record(self) -> tuple[int, np.ndarray]:
        """One recording: until Enter, or until end of speech with auto-stop."""
        stop = threading.Event()
        detector = EndOfSpeech(RECORD_RATE)
        on_block = (lambda b: detector.feed(b) and stop.set()) if self.auto_stop else (lambda b: None)
        result: list[tuple[int, np.ndarray]] = []
        recorder = threading.Thread(target=lambda: result.append(self.card.record(stop, on_block)), daemon=True)
        recorder.start()
        if self.auto_stop:
            self._say("Recording… (stops after a second of silence)")
            while recorder.is_alive() and not stop.wait(0.1):
                pass
        else:
            try:
                self.ask("Recording… press Enter to stop. ")
            except EOFError:  # input ended: that ends the recording too
                pass
            finally:
                stop.set()
        stop.set()
        recorder.join()
        return result[0]

    def turn(self, audio: tuple[int, np.ndarray]) -> End:
        """Answer one recording: print the text as it comes, play the speech as it comes."""
        cancel = threading.Event()
        timings, turn = Timings(), Accumulator()
        section = None
        events = self.pipeline.respond(audio=audio, history=tuple(self.history), options=self.options, cancel=cancel)
        try:
            for event in events:
                timings.observe(event)
                turn.add(event)
                if isinstance(event, (Heard, Answer)):
                    label = "Heard" if isinstance(event, Heard) else "Answer"
                    if label != section:
                        self.out.write(f"\n{label}: ")
                        section = label
                    self.out.write(event.text)
                    self.out.flush()
                elif isinstance(event, Audio):
                    self.card.play(event.pcm, event.sample_rate)
                elif isinstance(event, Notice):
                    self._say(f"note: {event.message}")
        except KeyboardInterrupt:
            # Ctrl-C stops this answer, not the chat. The interrupt may have closed the event
            # iterator; if it did not, the cancel flag ends the turn at the next token.
            # An answer that had already finished generating (its last audio still playing) keeps
            # its text and history, but the user stopped it: say so, and play nothing more.
            cancel.set()
            for event in events:
                turn.add(event)
            done = turn.end or End("cancelled")
            turn.end = replace(done, reason="cancelled")
        end = turn.end or End("error", ("the turn produced no events",))
        self.card.drain()
        self._say("")
        if end.reason == "cancelled":
            self._say("(stopped)")
        for problem in end.problems:
            self._say(f"problem: {problem}")
        if end.turn is not None:
            self.history.append(end.turn)
        self._say(f"[{timings.summary()}]")
        return end

    def loop(self) -> int:
        """Record, answer, repeat until the user quits; returns the exit status."""
        self._say(f"Model: {self.pipeline.description}")
        if self.pipeline.warning:
            self._say(f"Note: {self.pipeline.warning}")
        while True:
            try:
                line = self.ask("\nPress Enter and speak (q + Enter to quit): ")
            except (EOFError, KeyboardInterrupt):
                break
            if line.strip().lower() in {"q", "quit", "exit"}:
                break
            audio = self.record()
            try:
                self.turn(audio)
            # Bad input (audio.AudioError: too short, silent, too long; prompt.PromptError) is a
            # ValueError raised before any event: say so and let the user try again.
            except ValueError as e:
                self._say(f"Could not use that recording: {e}")
        self._say("bye")
        return 0

    def _say(self, text: str) -> None:
        print(text, file=self.out, flush=True)


def configure_parser(p: argparse.ArgumentParser) -> None:
    """Add the `chat` arguments."""
    p.add_argument("--mic", action="store_true", help="talk through the default microphone and speaker")
    p.add_argument("--auto-stop", action="store_true", help="stop recording after a second of silence")
    add_model_flags(p)
    add_sampling_flags(p)


def run_cli(args: argparse.Namespace, card: SoundCard | None = None, ask: Callable[[str], str] = input) -> int:
    """Run the chat loop; `card` replaces the sound card and `ask` the keyboard (tests)."""

    if not args.mic:
        print(f"error: chat needs --mic (the only chat mode so far); {FILE_MODE_HINT}", file=sys.stderr)
        return EXIT_NO_DEVICE
    try:
        card = card or SoundDeviceCard.open()
    except NoAudioDeviceError as e:
        print(f"error: cannot talk through the microphone: {e}.\n{FILE_MODE_HINT}", file=sys.stderr)
        return EXIT_NO_DEVICE
    try:
        pipeline = load_pipeline(args)
        options = sampling_options(args, pipeline.default_options)
    except (ValueError, OSError, MissingWeightsError, ModelLoadError, ServerError) as e:
        card.close()
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NO_DEVICE
    try:
        return ChatSession(pipeline, card, options, auto_stop=args.auto_stop, ask=ask).loop()
    finally:
        card.close()
