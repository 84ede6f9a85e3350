"""`chat --mic`: the real chat loop on the shipped SpeechGPT-tiny, with a recorded file standing in for the sound card."""

from __future__ import annotations

import io
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from app_helpers import TINY, known_questions

from speechgpt_app import mic
from speechgpt_app.audio import resample
from speechgpt_app.cli import build_parser

SILENCE_RMS = 1e-3


class FileCard:
    """A sound card whose microphone "hears" a recording and whose speaker keeps what it is given.

    The whole recording is spoken before the card listens to `stop` (a person presses Enter after
    speaking); then it hears digital silence until stopped, at most `max_silence_s`.
    """

    def __init__(self, wav: np.ndarray, rate: int, max_silence_s: float = 5.0, interrupt_on_play: bool = False):
        self.speech = resample(wav.astype(np.float32), rate, mic.RECORD_RATE)
        self.max_silence_s = max_silence_s
        self.interrupt_on_play = interrupt_on_play
        self.played: list[list[np.ndarray]] = [[]]  # chunks, one list per turn (drain starts the next)
        self.recorded: list[np.ndarray] = []
        self.closed = False

    @classmethod
    def from_file(cls, path: Path, **kw) -> FileCard:
        data, rate = sf.read(path, dtype="float32", always_2d=True)
        return cls(data.mean(axis=1), rate, **kw)

    def record(self, stop: threading.Event, on_block: Callable[[np.ndarray], None]) -> tuple[int, np.ndarray]:
        block = int(mic.RECORD_RATE * mic.BLOCK_SECONDS)
        heard = []
        for start in range(0, len(self.speech), block):
            heard.append(self.speech[start : start + block])
            on_block(heard[-1])
        silence = np.zeros(block, np.float32)
        for _ in range(int(self.max_silence_s / mic.BLOCK_SECONDS)):
            if stop.wait(0.01):  # a real card takes time to fill a block; let the Enter key land
                break
            heard.append(silence)
            on_block(silence)
        x = np.concatenate(heard)
        self.recorded.append(x)
        return mic.RECORD_RATE, x

    def play(self, pcm: np.ndarray, sample_rate: int) -> None:
        assert sample_rate == 16_000 and pcm.dtype == np.float32
        self.played[-1].append(pcm)
        if self.interrupt_on_play:
            self.interrupt_on_play = False
            raise KeyboardInterrupt  # the user presses Ctrl-C while the answer plays

    def drain(self) -> None:
        self.played.append([])

    def close(self) -> None:
        self.closed = True


def keyboard(lines: list[str]) -> Callable[[str], str]:
    """The user's keys: each call returns the next line; then end of input."""
    it: Iterator[str] = iter(lines)

    def ask(prompt: str) -> str:
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    return ask


@pytest.fixture(scope="module")
def bundle() -> Path:
    return TINY


@pytest.fixture(scope="module")
def question():
    """A held-out spoken question the model answers right."""
    return known_questions()[0]


def chat(bundle: Path, card: FileCard, lines: list[str], capsys: pytest.CaptureFixture, *flags: str) -> tuple[int, str]:
    args = build_parser(["chat"]).parse_args(["chat", "--mic", "--model", str(bundle), "--seed", "0", *flags])
    status = mic.run_cli(args, card=card, ask=keyboard(lines))
    return status, capsys.readouterr().out


def test_two_spoken_turns_print_play_and_keep_history(bundle: Path, question, capsys) -> None:
    card = FileCard.from_file(question.audio)
    # Enter (start), Enter (stop), twice; then quit.
    status, out = chat(bundle, card, ["", "", "", "", "q"], capsys)
    assert status == 0 and card.closed
    assert out.count("Heard: ") == 2 and out.count("Answer: ") == 2
    first_turn = out.split("Heard: ")[1]  # the second turn reads the first as context: its words may differ
    assert first_turn.startswith(question.text + "\n") and f"Answer: {question.answer}\n" in first_turn
    assert "time to first audio" in out and out.rstrip().endswith("bye")
    # The whole recording was taken each time (Enter came after it, with little or no silence).
    assert len(card.recorded) == 2
    assert all(0 <= len(r) - len(card.speech) < mic.RECORD_RATE for r in card.recorded)
    turns = [chunks for chunks in card.played if chunks]
    assert len(turns) == 2
    for chunks in turns:
        assert len(chunks) > 1  # played piece by piece as it was generated, not once at the end
        assert np.sqrt(np.mean(np.square(np.concatenate(chunks)))) > SILENCE_RMS


def test_second_turn_gets_the_first_as_context(bundle: Path, question) -> None:
    from speechgpt_app.pipeline import Pipeline

    pipeline = Pipeline.load(str(bundle))
    session = mic.ChatSession(
        pipeline, FileCard.from_file(question.audio), pipeline.default_options, out=io.StringIO(), ask=keyboard([""])
    )
    first = session.turn(session.record())
    assert first.reason == "eoa" and session.history == [first.turn]
    seen = []
    respond = pipeline.respond
    pipeline.respond = lambda **kw: seen.append(kw["history"]) or respond(**kw)  # type: ignore[method-assign]
    session.turn(session.record())
    assert seen == [(first.turn,)]
    assert len(session.history) == 2


def test_auto_stop_ends_the_recording_after_a_second_of_silence(bundle: Path, question, capsys) -> None:
    card = FileCard.from_file(question.audio)
    status, out = chat(bundle, card, ["", "q"], capsys, "--auto-stop")
    assert status == 0
    (recorded,) = card.recorded
    extra_s = (len(recorded) - len(card.speech)) / mic.RECORD_RATE
    assert 0 < extra_s <= mic.END_SILENCE_SECONDS + 2 * mic.BLOCK_SECONDS
    assert f"Answer: {question.answer}" in out


def test_ctrl_c_stops_the_answer_not_the_chat(bundle: Path, question, capsys) -> None:
    card = FileCard.from_file(question.audio, interrupt_on_play=True)
    status, out = chat(bundle, card, ["", "", "q"], capsys)
    assert status == 0
    assert "(stopped)" in out
    assert out.rstrip().endswith("bye")  # back at the prompt, where "q" quit


def test_unusable_recording_is_explained_and_the_loop_goes_on(bundle: Path, capsys) -> None:
    card = FileCard(np.zeros(16_000, np.float32), 16_000)
    status, out = chat(bundle, card, ["", "", "q"], capsys)
    assert status == 0
    assert "Could not use that recording" in out and "silent" in out


@pytest.mark.parametrize(
    "fake_sounddevice",
    [None, "no_default_device"],
    ids=["no-portaudio", "no-device"],
)
def test_no_sound_card_points_to_file_mode(bundle: Path, capsys, monkeypatch, fake_sounddevice) -> None:
    if fake_sounddevice is None:
        monkeypatch.setitem(sys.modules, "sounddevice", None)  # import fails, as without PortAudio
    else:

        class PortAudioError(Exception):
            pass

        def query_devices(kind=None):
            raise PortAudioError("Error querying device -1")

        fake = types.SimpleNamespace(PortAudioError=PortAudioError, query_devices=query_devices)
        monkeypatch.setitem(sys.modules, "sounddevice", fake)
    args = build_parser(["chat"]).parse_args(["chat", "--mic", "--model", str(bundle)])
    assert mic.run_cli(args) == mic.EXIT_NO_DEVICE
    err = capsys.readouterr().err
    assert "cannot talk through the microphone" in err and "ask --audio" in err


def test_end_of_speech_detector() -> None:
    rate = mic.RECORD_RATE
    block = int(rate * mic.BLOCK_SECONDS)
    rng = np.random.default_rng(0)
    speech = (0.1 * rng.standard_normal(block)).astype(np.float32)  # about -20 dBFS
    quiet = np.zeros(block, np.float32)

    def blocks_until_done(seq: list[np.ndarray]) -> int | None:
        d = mic.EndOfSpeech(rate)
        return next((i for i, b in enumerate(seq) if d.feed(b)), None)

    n_silence = round(mic.END_SILENCE_SECONDS / mic.BLOCK_SECONDS)
    # Speech then silence: done on exactly the block that completes a second of silence.
    assert blocks_until_done([speech] * 10 + [quiet] * 40) == 10 + n_silence - 1
    # Silence alone, or a click shorter than MIN_SPEECH_SECONDS, never ends a recording early.
    assert blocks_until_done([quiet] * 100) is None
    assert blocks_until_done([speech] + [quiet] * 100) is None
    # Speech resumes: the silence count starts over.
    seq = [speech] * 10 + [quiet] * (n_silence - 2) + [speech] * 2 + [quiet] * 40
    assert blocks_until_done(seq) == 10 + (n_silence - 2) + 2 + n_silence - 1
    # The length limit ends any recording.
    assert blocks_until_done([speech] * 500) == round(mic.MAX_RECORD_SECONDS / mic.BLOCK_SECONDS) - 1
    assert mic.level_dbfs(quiet) == -np.inf and -25 < mic.level_dbfs(speech) < -15


class FakeSoundDevice:
    """Stands in for the `sounddevice` module: an input stream that "hears" a recording block by
    block from PortAudio's own thread, and output streams that keep what is written."""

    class PortAudioError(Exception):
        pass

    def __init__(self, speech: np.ndarray) -> None:
        self.speech = speech
        self.written: list[tuple[int, np.ndarray]] = []

    def query_devices(self, kind=None):
        return {"name": f"fake {kind}"}

    def InputStream(self, samplerate, channels, dtype, blocksize, callback):  # noqa: N802  # sounddevice's name
        fake = self

        class Stream:
            def __enter__(self):
                self.running = True

                def feed():
                    for start in range(0, len(fake.speech), blocksize):
                        if not self.running:
                            return
                        callback(fake.speech[start : start + blocksize].reshape(-1, 1), blocksize, None, None)
                        time.sleep(blocksize / samplerate / 20)  # a card delivers in time (here 20x faster)

                self.thread = threading.Thread(target=feed)
                self.thread.start()
                return self

            def __exit__(self, *exc):
                self.running = False
                self.thread.join()

        assert (samplerate, channels, dtype) == (mic.RECORD_RATE, 1, "float32")
        return Stream()

    def OutputStream(self, samplerate, channels, dtype):  # noqa: N802
        fake = self

        class Stream:
            def start(self):
                pass

            def write(self, data):
                assert data.shape[1] == channels == 1
                fake.written.append((samplerate, data[:, 0].copy()))

            def close(self):
                pass

        return Stream()


def test_sounddevice_card_records_blocks_and_plays_in_order(monkeypatch, lj_wav: Path) -> None:
    speech = FileCard.from_file(lj_wav).speech
    fake = FakeSoundDevice(speech)
    monkeypatch.setitem(sys.modules, "sounddevice", fake)
    card = mic.SoundDeviceCard.open()
    stop = threading.Event()
    blocks: list[np.ndarray] = []

    def on_block(block: np.ndarray) -> None:  # stop after one second, as Enter would
        blocks.append(block)
        if sum(map(len, blocks)) >= mic.RECORD_RATE:
            stop.set()

    rate, recorded = card.record(stop, on_block)
    assert rate == mic.RECORD_RATE
    assert mic.RECORD_RATE <= len(recorded) < len(speech)
    np.testing.assert_array_equal(recorded, speech[: len(recorded)])
    chunks = [speech[:8000], speech[8000:16000], speech[16000:20000]]
    for chunk in chunks:
        card.play(chunk, 16_000)
    card.drain()  # returns once everything queued was written
    assert [r for r, _ in fake.written] == [16_000] * 3
    np.testing.assert_array_equal(np.concatenate([x for _, x in fake.written]), speech[:20000])
    card.close()
