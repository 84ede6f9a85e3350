"""Any upload -> mono 16 kHz float32, or one clear AudioError.

Sources: a path, raw bytes, a numpy array with its rate, or Gradio's `(rate, array)` tuple. Files are
decoded with soundfile (libsndfile: wav, flac, ogg vorbis/opus, mp3, aiff, ...) and, for what
libsndfile cannot open (webm/opus from browser recorders, m4a/aac from iOS Safari, ...), with PyAV.

Samples are never peak-normalised: integer PCM is scaled by its type's full scale and floats are kept
as they are, because the mHuBERT features were trained on unnormalised audio (`normalize: false`).
Channels are averaged (the reference concatenated them, which doubles the length); any rate is
resampled with soxr.
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import soundfile as sf
import soxr

log = logging.getLogger(__name__)
SAMPLE_RATE = 16_000  # Hz, what mHuBERT and every unit model here expect
MAX_CHANNELS = 8
MAX_SECONDS_ENV = "SPEECHGPT_MAX_SECONDS"
SUPPORTED = "wav, flac, ogg, mp3, webm/opus or m4a/aac"
# A file that decodes to less than its header says by more than this (seconds, and fraction of the
# stated length) was cut short. Codec priming/padding and mp3 length estimates differ by far less.
TRUNCATED_SECONDS = 0.5
TRUNCATED_FRACTION = 0.1
_WAV_PCM_TAGS = (0x0001, 0x0003, 0xFFFE)  # integer PCM, IEEE float, WAVE_FORMAT_EXTENSIBLE

ERROR_KINDS = ("empty", "too_short", "too_long", "silent", "unreadable", "non_finite")

# Signed integer PCM -> [-1, 1): divide by the type's full scale (2^(bits-1)).
_FULL_SCALE = {np.dtype(np.int8): 2.0**7, np.dtype(np.int16): 2.0**15, np.dtype(np.int32): 2.0**31, np.dtype(np.int64): 2.0**63}

Source = Union[str, os.PathLike, bytes, bytearray, memoryview, np.ndarray, tuple]


class AudioError(ValueError):
    """The one error for bad audio input. `kind` is one of ERROR_KINDS; the message is for the user."""

    def __init__(self, kind: str, message: str) -> None:
        if kind not in ERROR_KINDS:
            raise ValueError(f"unknown AudioError kind {kind!r}")
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class AudioLimits:
    """What a usable recording looks like.

    max_seconds: the 7B model's 2,048-position context holds about 20 s of speech units.
    silence_dbfs: RMS level (dB relative to a full-scale square wave) below which a recording is
    treated as silent; -60 dBFS is far below quiet speech through a laptop microphone.
    """

    min_seconds: float = 0.2
    max_seconds: float = 20.0
    silence_dbfs: float = -60.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.min_seconds) and math.isfinite(self.max_seconds)):
            raise ValueError("AudioLimits seconds must be finite")
        if not 0 <= self.min_seconds < self.max_seconds:
            raise ValueError(f"need 0 <= min_seconds < max_seconds, got {self.min_seconds}, {self.max_seconds}")


def limits_from_env(env: Mapping[str, str] | None = None, base: AudioLimits = AudioLimits()) -> AudioLimits:
    """`base` with max_seconds taken from SPEECHGPT_MAX_SECONDS when that is set (entry points use this)."""
    env = os.environ if env is None else env
    raw = env.get(MAX_SECONDS_ENV, "").strip()
    if not raw:
        return base
    try:
        seconds = float(raw)
    except ValueError:
        raise ValueError(f"{MAX_SECONDS_ENV}={raw!r} is not a number of seconds") from None
    if not (math.isfinite(seconds) and seconds > base.min_seconds):
        raise ValueError(f"{MAX_SECONDS_ENV}={raw!r} must be a number of seconds above {base.min_seconds}")
    return AudioLimits(min_seconds=base.min_seconds, max_seconds=seconds, silence_dbfs=base.silence_dbfs)


def load_audio(source: Source, sample_rate: int | None = None, limits: AudioLimits = AudioLimits()) -> np.ndarray:
    """Read any supported input as mono float32 at 16 kHz, validated against `limits`.

    source:
      - a path (str / Path) or raw `bytes` of an audio file: wav, flac, ogg, mp3, webm/opus,
        m4a/aac, ...; int16/int24/int32/float; any rate; 1-8 channels. Over-long files are
        refused from their header, before any decoding.
      - a numpy array with `sample_rate`: shape (n,), (n, ch) or (ch, n) with ch <= 8. A 2-D
        array is (n, ch) when its last axis has <= 8 entries (soundfile's and Gradio's layout),
        otherwise (ch, n) when its first axis has <= 8; anything else is refused.
      - Gradio's `(rate, array)` tuple (int16/int32/float array, same layouts).
    Raises AudioError (kind: empty, too_short, too_long, silent, unreadable, non_finite).
    """
    if isinstance(source, tuple):
        if sample_rate is not None:
            raise TypeError("a (rate, array) tuple carries its own rate; do not pass sample_rate")
        if len(source) != 2:
            raise AudioError("unreadable", "Expected Gradio's (sample_rate, array) pair.")
        rate, array = source
        return _finish(*_from_array(np.asarray(array), rate, limits), limits)
    if isinstance(source, np.ndarray):
        if sample_rate is None:
            raise TypeError("load_audio(array) needs sample_rate=")
        return _finish(*_from_array(source, sample_rate, limits), limits)
    if sample_rate is not None:
        raise TypeError("files carry their own sample rate; sample_rate= is only for arrays")
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise AudioError("empty", "The uploaded file is empty (0 bytes).")
        return _finish(*_decode(lambda: io.BytesIO(data), "the upload", limits), limits)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise AudioError("unreadable", f"No such audio file: {path}")
        if path.stat().st_size == 0:
            raise AudioError("empty", f"The file {path.name} is empty (0 bytes).")
        return _finish(*_decode(lambda: path, path.name, limits), limits)
    raise TypeError(f"load_audio takes a path, bytes, an array or a (rate, array) tuple, not {type(source).__name__}")


def resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Resample a mono float32 signal with soxr (high quality); returns x itself when the rates match."""
    for name, rate in (("sr_in", sr_in), ("sr_out", sr_out)):
        if not _is_rate(rate):
            raise ValueError(f"{name} must be a positive integer sample rate, got {rate!r}")
    if sr_in == sr_out:
        return x
    return soxr.resample(np.ascontiguousarray(x, dtype=np.float32), int(sr_in), int(sr_out), quality="HQ")


# ---------------------------------------------------------------------------------------------------


def _is_rate(rate: Any) -> bool:
    return isinstance(rate, (int, np.integer)) and not isinstance(rate, bool) and rate > 0


def _check_duration(frames: int, rate: int, limits: AudioLimits) -> None:
    seconds = frames / rate
    if seconds > limits.max_seconds:
        raise _too_long(f"The recording is {seconds:.1f} s long; the limit is {limits.max_seconds:g} s.")


def _too_long(first_sentence: str) -> AudioError:
    return AudioError("too_long", f"{first_sentence} Trim it or raise {MAX_SECONDS_ENV}.")


def _check_channels(channels: int) -> None:
    if not 1 <= channels <= MAX_CHANNELS:
        raise AudioError("unreadable", f"The audio has {channels} channels; 1 to {MAX_CHANNELS} are supported.")


def _from_array(array: np.ndarray, rate: Any, limits: AudioLimits) -> tuple[np.ndarray, int]:
    """(samples as given, rate) -> (mono float32, rate), checking layout, type and length."""
    if not _is_rate(rate):
        raise AudioError("unreadable", f"The sample rate must be a positive integer, got {rate!r}.")
    if array.size == 0:
        raise AudioError("empty", "The recording is empty (no audio samples).")
    if array.ndim == 2:
        if array.shape[1] <= MAX_CHANNELS:
            pass  # (n, ch)
        elif array.shape[0] <= MAX_CHANNELS:
            array = array.T  # (ch, n) -> (n, ch)
        else:
            raise AudioError(
                "unreadable",
                f"Cannot tell samples from channels in an array of shape {array.shape}; "
                f"expected (n,), (n, ch) or (ch, n) with at most {MAX_CHANNELS} channels.",
            )
    elif array.ndim != 1:
        raise AudioError("unreadable", f"Expected a 1-D or 2-D array of samples, got shape {array.shape}.")
    _check_duration(array.shape[0], int(rate), limits)
    return _downmix(_to_float(array)), int(rate)


def _to_float(array: np.ndarray) -> np.ndarray:
    """Integer PCM scaled by its full scale; floats kept as they are (never normalised)."""
    if array.dtype in _FULL_SCALE:
        return (array.astype(np.float64) / _FULL_SCALE[array.dtype]).astype(np.float32)
    if array.dtype == np.uint8:  # 8-bit PCM is unsigned, centred on 128
        return (array.astype(np.float32) - 128.0) / 128.0
    if array.dtype.kind == "f":
        return array.astype(np.float32)  # non-finite samples are refused in _finish
    raise AudioError("unreadable", f"Unsupported sample type {array.dtype}; use integer PCM or floats.")


def _downmix(x: np.ndarray) -> np.ndarray:
    """Average the channels of (n, ch) -> (n,); mono passes through."""
    if x.ndim == 1:
        return x
    _check_channels(x.shape[1])
    return x.mean(axis=1, dtype=np.float32) if x.shape[1] > 1 else x[:, 0]


def _finish(mono: np.ndarray, rate: int, limits: AudioLimits) -> np.ndarray:
    """Resample to 16 kHz and check what only the samples can tell: length and level."""
    if mono.size == 0:
        raise AudioError("empty", "The recording is empty (no audio samples).")
    if not np.isfinite(mono).all():
        raise AudioError("non_finite", "The audio contains NaN or infinite samples, so it cannot be used.")
    out = np.ascontiguousarray(resample(mono, rate, SAMPLE_RATE), dtype=np.float32)
    seconds = out.shape[0] / SAMPLE_RATE
    if seconds < limits.min_seconds:
        raise AudioError(
            "too_short", f"The recording is {seconds:.2f} s long; at least {limits.min_seconds:g} s is needed."
        )
    rms = float(np.sqrt(np.mean(np.square(out, dtype=np.float64))))
    level = 20 * math.log10(rms) if rms > 0 else -math.inf
    if level < limits.silence_dbfs:
        raise AudioError(
            "silent",
            f"The recording is silent (level {level:.0f} dBFS, below the {limits.silence_dbfs:g} dBFS "
            "threshold). Check that the microphone is on and not muted.",
        )
    return out


EMPTY_FILE_BYTES = 4096  # a file that states no samples but is larger than this lost them (damage)
WAV_PLACEHOLDER_BYTES = 0x7FFF0000  # stated wav data sizes from here up mean "unknown" (streaming writers)
MAX_UPLOAD_BYTES = 100 * 1024 * 1024  # the app's upload cap; no real upload states more


def _decode(open_source: Any, name: str, limits: AudioLimits) -> tuple[np.ndarray, int]:
    """Decode a file (path or bytes) with soundfile, or with PyAV when libsndfile cannot open it.

    `open_source()` returns a fresh path or file object for each attempt.
    """
    try:
        info = sf.info(open_source())
    except (sf.LibsndfileError, RuntimeError, TypeError):
        return _decode_pyav(open_source(), name, limits)
    if info.frames == 0 and info.format == "WAV":
        # A streaming writer's data size of 0 ("length unknown"): libsndfile reads nothing, FFmpeg
        # reads to the end of the file.
        return _decode_pyav(open_source(), name, limits)
    if info.frames == 0:
        if _size(open_source()) > EMPTY_FILE_BYTES:  # an ogg cut before its last page states no length
            raise AudioError("unreadable", f"Could not decode {name}: it looks damaged or truncated.")
        raise AudioError("empty", f"There are no audio samples in {name}.")
    _check_channels(info.channels)
    # An mp3 without a Xing/Info/VBRI frame does not state its length: libsndfile guesses it from the
    # first frame's bitrate (38 s for an 8 s VBR file that starts quietly), so it is neither refused
    # as too long nor checked for truncation by that guess; decoding stops past the limit instead.
    stated = info.frames if info.format != "MP3" or _mp3_states_its_length(open_source()) else None
    if stated is not None:
        _check_duration(stated, info.samplerate, limits)  # from the header, before decoding
    cap = int(limits.max_seconds * info.samplerate) + 1
    try:
        # float32 reads scale integer PCM by its full scale (16/24/32-bit alike).
        frames = -1 if stated is not None else cap + 1  # -1: all of it
        data, rate = sf.read(open_source(), frames=frames, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as e:
        # libsndfile knows the format, so this is damage (often a truncated upload), not a gap
        # that another decoder should paper over.
        log.info("libsndfile could not decode an upload: %s", e)  # the library's words stay in the log
        raise AudioError("unreadable", f"Could not decode {name}: it looks damaged or truncated.") from e
    if stated is None and data.shape[0] > cap:
        raise _too_long(f"The recording is longer than the limit of {limits.max_seconds:g} s.")
    if info.format == "WAV":
        # libsndfile trims a cut wav's length to what the file holds; its data chunk still says more.
        stated = _wav_data_frames(open_source()) or stated
    _check_complete(data.shape[0], int(rate), None if stated is None else stated / info.samplerate, name)
    return _downmix(data), int(rate)


def _wav_header_channels(source: Any) -> int | None:
    """The channel count a RIFF/WAVE file's fmt chunk states (None: not a wav, or no fmt chunk).
    A file object is left at its start, for the decoder that reads it next."""
    try:
        fmt = _wav_chunk(source, b"fmt ")
        body = _read_at(source, fmt[0] + 8, 4) if fmt is not None else b""
    finally:
        if hasattr(source, "seek"):
            source.seek(0)
    return int.from_bytes(body[2:4], "little") if len(body) == 4 else None


def _wav_chunk(source: Any, name: bytes) -> tuple[int, int] | None:
    """(offset, stated size) of a wav's first chunk called `name`, or None."""
    head = _read_at(source, 0, 12)
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    offset = 12
    for _ in range(64):  # the data chunk comes after a few others (fmt, fact, LIST, ...)
        header = _read_at(source, offset, 8)
        if len(header) < 8:
            break
        size = int.from_bytes(header[4:8], "little")
        if header[:4] == name:
            return offset, size
        offset += 8 + size + (size & 1)  # chunks are padded to an even size
    return None


def _wav_data_frames(source: Any) -> int | None:
    """The frames a PCM or float wav's data chunk says it holds (None: not said, or another encoding).

    Writers that stream to a pipe cannot know the length and write a placeholder: 0, 0xFFFFFFFF,
    0x7FFFFFF0, or arecord's 2^31 cap. A stated size of WAV_PLACEHOLDER_BYTES or more, or more than the
    upload cap, is such a placeholder ("length unknown": decode what is there); a smaller stated size
    that the file does not hold is a cut upload.
    """
    fmt, data = _wav_chunk(source, b"fmt "), _wav_chunk(source, b"data")
    if fmt is None or data is None:
        return None
    body = _read_at(source, fmt[0] + 8, 14)  # format tag (2 bytes) ... block align at byte 12
    if len(body) < 14 or int.from_bytes(body[:2], "little") not in _WAV_PCM_TAGS:
        return None
    block_align, size = int.from_bytes(body[12:14], "little"), data[1]
    placeholder = size == 0 or size >= WAV_PLACEHOLDER_BYTES or size > MAX_UPLOAD_BYTES
    return size // block_align if block_align and not placeholder else None


def _mp3_states_its_length(source: Any) -> bool:
    """Whether an mp3 (path or file object) has a Xing, Info or VBRI frame, which gives its exact length.

    The frame is the first audio frame, after any ID3v2 tag (10 bytes + a 28-bit "syncsafe" size).
    """
    head = _read_at(source, 0, 10)
    start = 0
    if head[:3] == b"ID3" and len(head) == 10:
        start = 10 + sum((b & 0x7F) << (7 * (3 - i)) for i, b in enumerate(head[6:10]))
    first_frame = _read_at(source, start, 4096)  # a Layer III frame is at most 2881 bytes
    return any(tag in first_frame for tag in (b"Xing", b"Info", b"VBRI"))


def _size(source: Any) -> int:
    """Bytes in a path or a seekable file object."""
    if isinstance(source, (str, os.PathLike)):
        return os.path.getsize(source)
    return source.seek(0, os.SEEK_END)


def _read_at(source: Any, offset: int, size: int) -> bytes:
    """`size` bytes from `offset` of a path or a seekable file object."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            f.seek(offset)
            return f.read(size)
    source.seek(offset)
    return source.read(size)


def _check_complete(frames: int, rate: int, stated_seconds: float | None, name: str) -> None:
    """Refuse a file that decodes to much less than its header states (some decoders stop quietly at
    the cut of a truncated mp3 or webm): answering its first part would silently change the question."""
    if stated_seconds is None:
        return
    decoded = frames / rate
    if stated_seconds - decoded > max(TRUNCATED_SECONDS, TRUNCATED_FRACTION * stated_seconds):
        raise AudioError(
            "unreadable",
            f"Could not decode all of {name}: its header says {stated_seconds:.1f} s, but only {decoded:.1f} s "
            "could be decoded. It looks truncated; upload the whole file again.",
        )


def _decode_pyav(file: Any, name: str, limits: AudioLimits) -> tuple[np.ndarray, int]:
    """Decode the first audio stream with PyAV (FFmpeg) as float, then downmix by averaging."""
    import av

    channels = _wav_header_channels(file)
    if channels is not None:
        _check_channels(channels)  # FFmpeg would fail on 0 channels with its own words
    try:
        container = av.open(file, mode="r")
    except (av.FFmpegError, OSError, ValueError) as e:
        raise AudioError(
            "unreadable", f"Could not read {name} as audio: it is damaged, cut short, or not one of {SUPPORTED}."
        ) from e
    with container:
        if not container.streams.audio:
            raise AudioError("unreadable", f"There is no audio track in {name}.")
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate or stream.rate
        if not rate:
            raise AudioError("unreadable", f"The sample rate of {name} is unknown.")
        if stream.codec_context.channels:  # 0 when the header does not say; frames are checked later
            _check_channels(stream.codec_context.channels)
        seconds = _container_seconds(container, stream)
        if seconds is not None:
            _check_duration(round(seconds * rate), rate, limits)
        # Browser recordings (webm) often carry no duration: stop decoding as soon as the limit is
        # passed, so an over-long upload still costs at most `max_seconds` of decoding.
        cap = int(limits.max_seconds * rate) + 1
        # Convert every frame to planar float at its own layout and rate: FFmpeg's own downmix
        # is not a plain average, and resampling is soxr's job.
        resampler = None
        chunks: list[np.ndarray] = []
        total = 0
        try:
            for frame in container.decode(stream):
                if resampler is None:
                    resampler = av.AudioResampler(format="fltp", layout=frame.layout, rate=frame.sample_rate)
                    rate = frame.sample_rate
                for converted in resampler.resample(frame):
                    planes = converted.to_ndarray()  # (channels, samples)
                    chunks.append(planes.T)
                    total += planes.shape[1]
                if total > cap:
                    raise _too_long(f"The recording is longer than the limit of {limits.max_seconds:g} s.")
        except av.FFmpegError as e:
            log.info("FFmpeg could not decode an upload: %s", e)
            raise AudioError("unreadable", f"Could not decode {name}: it looks damaged or truncated.") from e
    if total == 0:
        raise AudioError("empty", f"There are no audio samples in {name}.")
    _check_complete(total, int(rate), seconds, name)
    return _downmix(np.concatenate(chunks).astype(np.float32, copy=False)), int(rate)


def _container_seconds(container: Any, stream: Any) -> float | None:
    """Duration from the container or stream header, or None when it does not say."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # AV_TIME_BASE: microseconds
    return None
