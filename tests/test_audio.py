"""audio.py: every supported input becomes mono float32 at 16 kHz; every bad one a typed AudioError."""

from __future__ import annotations

import struct
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

from speechgpt_app.audio import (
    ERROR_KINDS,
    MAX_SECONDS_ENV,
    SAMPLE_RATE,
    AudioError,
    AudioLimits,
    limits_from_env,
    load_audio,
    resample,
)


def tone(freq: float, seconds: float, rate: int, amp: float = 0.3) -> np.ndarray:
    """A float64 sine, the test's known signal."""
    t = np.arange(round(seconds * rate)) / rate
    return amp * np.sin(2 * np.pi * freq * t)


def channels_signal(n_channels: int, seconds: float, rate: int) -> np.ndarray:
    """(n, ch): a different tone per channel, so the average is not any one of them."""
    return np.stack([tone(200 + 110 * c, seconds, rate, amp=0.2) for c in range(n_channels)], axis=1)


def expected_mono(signal: np.ndarray, rate: int) -> np.ndarray:
    """What load_audio should return: the channel average, resampled with soxr, computed independently."""
    mono = signal.mean(axis=1) if signal.ndim == 2 else signal
    return soxr.resample(mono.astype(np.float64), rate, SAMPLE_RATE).astype(np.float32)


def dominant_hz(x: np.ndarray, rate: int = SAMPLE_RATE) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[spectrum.argmax()])


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-y", *args], check=True, timeout=60)


def check_output(x: np.ndarray, seconds: float) -> None:
    assert x.dtype == np.float32 and x.ndim == 1 and x.flags.c_contiguous
    assert np.isfinite(x).all()
    assert abs(len(x) - seconds * SAMPLE_RATE) <= 1


# --- the real recordings ------------------------------------------------------------------------


def test_lj_sample(lj_wav: Path) -> None:
    info = sf.info(lj_wav)
    assert (info.samplerate, info.channels) == (22050, 1)
    x = load_audio(lj_wav)
    check_output(x, info.frames / info.samplerate)
    raw, rate = sf.read(lj_wav, dtype="float64")
    np.testing.assert_allclose(x, expected_mono(raw, rate), atol=1e-5)
    assert max(abs(x.max()), abs(x.min())) < 1.0  # not peak-normalised: the file's own level


def test_jfk_sample_is_the_channel_average(jfk_flac: Path) -> None:
    info = sf.info(jfk_flac)
    assert (info.samplerate, info.channels, info.subtype) == (44100, 2, "PCM_24")
    x = load_audio(jfk_flac)
    check_output(x, info.frames / info.samplerate)
    raw, rate = sf.read(jfk_flac, dtype="float64", always_2d=True)
    np.testing.assert_allclose(x, expected_mono(raw, rate), atol=1e-5)
    # Concatenating channels (the reference's bug) would double the length; one channel alone differs.
    assert not np.allclose(x, expected_mono(raw[:, 0], rate), atol=1e-3)


def test_path_str_and_bytes_agree(jfk_flac: Path) -> None:
    x = load_audio(jfk_flac)
    np.testing.assert_array_equal(load_audio(str(jfk_flac)), x)
    np.testing.assert_array_equal(load_audio(jfk_flac.read_bytes()), x)


# --- files the test writes: soundfile formats ---------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "subtype", "atol"),
    [
        ("WAV", "PCM_U8", 1e-2),
        ("WAV", "PCM_16", 1e-4),
        ("WAV", "PCM_24", 1e-6),
        ("WAV", "PCM_32", 1e-6),
        ("WAV", "FLOAT", 1e-6),
        ("FLAC", "PCM_16", 1e-4),
        ("FLAC", "PCM_24", 1e-6),
    ],
)
@pytest.mark.parametrize(("rate", "n_channels"), [(8000, 1), (44100, 2), (48000, 5), (16000, 8)])
def test_lossless_files(tmp_path: Path, fmt: str, subtype: str, atol: float, rate: int, n_channels: int) -> None:
    signal = channels_signal(n_channels, 0.5, rate)
    path = tmp_path / f"x.{fmt.lower()}"
    sf.write(path, signal, rate, format=fmt, subtype=subtype)
    x = load_audio(path)
    check_output(x, 0.5)
    np.testing.assert_allclose(x, expected_mono(signal, rate), atol=atol)


def test_integer_pcm_uses_full_scale(tmp_path: Path) -> None:
    # Half of full scale in int16 and int32 reads as 0.5: scaled by the type, not by the peak.
    for subtype, value in (("PCM_16", 2**14), ("PCM_32", 2**30)):
        dtype = np.int16 if subtype == "PCM_16" else np.int32
        samples = np.full(SAMPLE_RATE // 2, value, dtype=dtype)
        samples[::2] *= -1
        sf.write(tmp_path / "half.wav", samples, SAMPLE_RATE, subtype=subtype)
        x = load_audio(tmp_path / "half.wav")
        np.testing.assert_array_equal(np.abs(x), np.float32(0.5))


# --- files the test writes: ffmpeg codecs (lossy; libsndfile for ogg/mp3, PyAV for webm/m4a) ----


@pytest.mark.parametrize(
    ("ext", "codec"),
    [
        ("ogg", ["-c:a", "libvorbis"]),
        ("opus", ["-c:a", "libopus"]),
        ("mp3", ["-c:a", "libmp3lame"]),
        ("webm", ["-c:a", "libopus"]),  # browser MediaRecorder
        ("m4a", ["-c:a", "aac"]),  # iOS Safari
    ],
)
def test_compressed_files(tmp_path: Path, ext: str, codec: list[str]) -> None:
    rate, seconds = 48000, 1.0
    src = tmp_path / "src.wav"
    sf.write(src, np.stack([tone(440, seconds, rate), tone(440, seconds, rate)], axis=1), rate, subtype="PCM_16")
    out = tmp_path / f"x.{ext}"
    ffmpeg("-i", str(src), *codec, str(out))
    for x in (load_audio(out), load_audio(out.read_bytes())):
        assert x.dtype == np.float32 and x.ndim == 1 and np.isfinite(x).all()
        # Codec priming/padding may add or drop a few ms; the content must be the same tone and level.
        assert abs(len(x) / SAMPLE_RATE - seconds) < 0.06
        assert abs(dominant_hz(x) - 440) < 5
        assert abs(rms(x) - 0.3 / np.sqrt(2)) < 0.03


# --- arrays and Gradio tuples -------------------------------------------------------------------


def test_array_layouts_agree() -> None:
    signal = channels_signal(3, 0.5, 24000).astype(np.float32)
    want = expected_mono(signal, 24000)
    for array in (signal, signal.T, np.asfortranarray(signal)):
        np.testing.assert_allclose(load_audio(array, sample_rate=24000), want, atol=1e-6)
    mono = signal[:, 0]
    np.testing.assert_allclose(load_audio(mono, sample_rate=24000), expected_mono(mono, 24000), atol=1e-6)


def test_gradio_tuples() -> None:
    signal = channels_signal(2, 0.5, 48000)
    as_int16 = np.round(signal * 32767).astype(np.int16)
    x = load_audio((48000, as_int16))
    np.testing.assert_allclose(x, expected_mono(as_int16 / 32768.0, 48000), atol=1e-6)
    as_int32 = (signal[:, 0] * 2**31).astype(np.int32)
    np.testing.assert_allclose(load_audio((48000, as_int32)), expected_mono(signal[:, 0], 48000), atol=1e-6)
    # 8-bit PCM is unsigned around 128.
    as_uint8 = np.round(signal[:, 0] * 127 + 128).astype(np.uint8)
    np.testing.assert_allclose(
        load_audio((48000, as_uint8)), expected_mono((as_uint8 - 128.0) / 128.0, 48000), atol=1e-6
    )
    # Already 16 kHz float: passed through unchanged (no resampling, no normalisation).
    f32 = tone(300, 0.5, SAMPLE_RATE).astype(np.float32)
    np.testing.assert_array_equal(load_audio((SAMPLE_RATE, f32)), f32)


def test_downmix_is_the_average() -> None:
    x = tone(300, 0.5, SAMPLE_RATE).astype(np.float32)
    left_only = np.stack([x, np.zeros_like(x)], axis=1)
    np.testing.assert_allclose(load_audio(left_only, sample_rate=SAMPLE_RATE), x / 2, atol=1e-7)
    with pytest.raises(AudioError) as err:
        load_audio(np.stack([x, -x], axis=1), sample_rate=SAMPLE_RATE)
    assert err.value.kind == "silent"


def test_resample() -> None:
    x = tone(1000, 1.0, 44100).astype(np.float32)
    y = resample(x, 44100, SAMPLE_RATE)
    assert y.dtype == np.float32 and abs(len(y) - SAMPLE_RATE) <= 1
    assert abs(dominant_hz(y) - 1000) < 2
    assert resample(x, 44100, 44100) is x
    with pytest.raises(ValueError):
        resample(x, 0, SAMPLE_RATE)


# --- bad input ----------------------------------------------------------------------------------


def expect_error(kind: str, *args: object, **kwargs: object) -> AudioError:
    with pytest.raises(AudioError) as err:
        load_audio(*args, **kwargs)
    assert err.value.kind == kind, str(err.value)
    assert isinstance(err.value, ValueError) and str(err.value)
    return err.value


def test_empty_inputs(tmp_path: Path) -> None:
    (tmp_path / "empty.wav").write_bytes(b"")
    expect_error("empty", tmp_path / "empty.wav")
    expect_error("empty", b"")
    expect_error("empty", np.zeros(0, np.float32), sample_rate=SAMPLE_RATE)
    expect_error("empty", (SAMPLE_RATE, np.zeros((0, 2), np.int16)))
    sf.write(tmp_path / "no_frames.wav", np.zeros((0, 1)), SAMPLE_RATE)
    expect_error("empty", tmp_path / "no_frames.wav")


def test_too_short() -> None:
    err = expect_error("too_short", tone(440, 0.1, SAMPLE_RATE).astype(np.float32), sample_rate=SAMPLE_RATE)
    assert "0.10 s" in str(err) and "0.2 s" in str(err)


def test_silence_threshold() -> None:
    expect_error("silent", np.zeros(SAMPLE_RATE, np.int16), sample_rate=SAMPLE_RATE)
    noise = np.random.default_rng(0).standard_normal(SAMPLE_RATE)
    quiet = (noise * 10 ** (-70 / 20)).astype(np.float32)  # -70 dBFS RMS
    err = expect_error("silent", quiet, sample_rate=SAMPLE_RATE)
    assert "-60 dBFS" in str(err)
    audible = (noise * 10 ** (-50 / 20)).astype(np.float32)  # -50 dBFS: quiet but kept
    assert load_audio(audible, sample_rate=SAMPLE_RATE).shape == (SAMPLE_RATE,)
    # The threshold is configurable.
    expect_error("silent", audible, sample_rate=SAMPLE_RATE, limits=AudioLimits(silence_dbfs=-40.0))


def test_non_finite(tmp_path: Path) -> None:
    x = tone(440, 0.5, SAMPLE_RATE).astype(np.float32)
    x[100] = np.nan
    expect_error("non_finite", x, sample_rate=SAMPLE_RATE)
    expect_error("non_finite", (SAMPLE_RATE, x))
    x[100] = np.inf
    sf.write(tmp_path / "inf.wav", x, SAMPLE_RATE, subtype="FLOAT")
    expect_error("non_finite", tmp_path / "inf.wav")


def test_unreadable(tmp_path: Path) -> None:
    garbage = b"this is not audio, just some text pretending to be a file. " * 50
    expect_error("unreadable", garbage)
    (tmp_path / "fake.wav").write_bytes(garbage)
    expect_error("unreadable", tmp_path / "fake.wav")
    expect_error("unreadable", np.random.default_rng(1).bytes(4096))
    expect_error("unreadable", tmp_path / "missing.wav")
    # Arrays whose layout cannot be told apart, or with more than 8 channels.
    expect_error("unreadable", np.zeros((100, 100), np.float32), sample_rate=SAMPLE_RATE)
    expect_error("unreadable", np.zeros((2, 3, 4), np.float32), sample_rate=SAMPLE_RATE)
    sf.write(tmp_path / "ten.wav", np.zeros((1600, 10)), SAMPLE_RATE)
    assert "10 channels" in str(expect_error("unreadable", tmp_path / "ten.wav"))
    expect_error("unreadable", np.zeros(SAMPLE_RATE, np.complex64), sample_rate=SAMPLE_RATE)


def test_truncated_files(tmp_path: Path) -> None:
    signal = tone(440, 1.0, 44100)
    sf.write(tmp_path / "x.flac", signal, 44100, subtype="PCM_24")
    sf.write(tmp_path / "x.wav", signal, 44100, subtype="PCM_16")
    flac, wav = (tmp_path / "x.flac").read_bytes(), (tmp_path / "x.wav").read_bytes()
    assert "truncated" in str(expect_error("unreadable", flac[: len(flac) // 2]))
    expect_error("unreadable", flac[:100])
    expect_error("unreadable", wav[:30])  # cut inside the header


@pytest.mark.parametrize(("ext", "codec"), [("mp3", ["-c:a", "libmp3lame"]), ("webm", ["-c:a", "libopus"])])
def test_truncated_compressed_files_are_refused_not_cut(tmp_path: Path, ext: str, codec: list[str]) -> None:
    # Their decoders stop quietly at the cut: without the check, 1 s of a 6 s question was answered.
    path = tmp_path / f"x.{ext}"
    ffmpeg("-f", "lavfi", "-i", "sine=f=440:r=16000", "-t", "6", *codec, str(path))
    data = path.read_bytes()
    assert abs(len(load_audio(data)) / SAMPLE_RATE - 6) < 0.1  # the whole file is fine
    err = expect_error("unreadable", data[: len(data) // 4])
    assert "truncated" in str(err) and "6.0 s" in str(err)


def test_truncated_wav_is_refused_not_cut(tmp_path: Path) -> None:
    # libsndfile trims a cut wav to what the file holds; the data chunk still states the whole length.
    sf.write(tmp_path / "x.wav", tone(440, 6.0, 22050), 22050, subtype="PCM_16")
    data = (tmp_path / "x.wav").read_bytes()
    err = expect_error("unreadable", data[: len(data) // 4])
    assert "truncated" in str(err) and "6.0 s" in str(err)
    # A header that promises ten minutes (26 MB, under the upload cap), followed by one second of
    # sound: truncated, not "1 s of speech".
    long = bytearray(data[:44])
    long[40:44] = (2 * 22050 * 600).to_bytes(4, "little")
    assert "600.0 s" in str(expect_error("unreadable", bytes(long) + data[44 : 44 + 2 * 22050]))


@pytest.mark.parametrize("stated", [0xFFFFFFFF, 0xFFFFFFF0, 0x7FFFFFF0, 2**31, 0x7FFF0000, 200 * 1024 * 1024])
def test_streaming_wav_placeholder_sizes_mean_length_unknown(tmp_path: Path, stated: int) -> None:
    """Writers that stream to a pipe (arecord to stdout caps at 2^31; others write 0x7FFFFFF0 or
    0xFFFFFFFF) cannot know the length: a stated size of 0x7FFF0000 or more, or more than the upload
    cap, is a placeholder, and the file is decoded as it is (a 1.5 s recording stays 1.5 s)."""
    sf.write(tmp_path / "x.wav", tone(440, 1.5, 16000), 16000, subtype="PCM_16")
    streamed = bytearray((tmp_path / "x.wav").read_bytes())
    streamed[40:44] = stated.to_bytes(4, "little")
    assert abs(len(load_audio(bytes(streamed))) / SAMPLE_RATE - 1.5) < 0.01


def test_zero_channel_wav_is_refused_in_plain_words() -> None:
    header = bytearray(44)
    header[0:4], header[8:16] = b"RIFF", b"WAVEfmt "
    header[16:20] = (16).to_bytes(4, "little")
    header[20:22], header[22:24] = (1).to_bytes(2, "little"), (0).to_bytes(2, "little")  # PCM, 0 channels
    header[24:28] = (16000).to_bytes(4, "little")
    header[34:36] = (16).to_bytes(2, "little")
    header[36:40], header[40:44] = b"data", (3200).to_bytes(4, "little")
    err = expect_error("unreadable", bytes(header) + bytes(3200))
    assert str(err) == "The audio has 0 channels; 1 to 8 are supported."


def test_damaged_flac_message_has_no_library_words(tmp_path: Path) -> None:
    sf.write(tmp_path / "x.flac", tone(440, 3.0, 16000), 16000)
    data = bytearray((tmp_path / "x.flac").read_bytes())
    data[len(data) // 2 :] = bytes(len(data) - len(data) // 2)  # the second half zeroed
    err = expect_error("unreadable", bytes(data))
    assert str(err) == "Could not decode the upload: it looks damaged or truncated.", str(err)


def test_mp3_without_a_length_frame_is_decoded_not_guessed(tmp_path: Path) -> None:
    # VBR mp3 without a Xing/Info frame: libsndfile guesses its length from the first (quiet, low
    # bitrate) frame, several times too long; the file is 8 s and must not be refused as over 20 s.
    signal = np.concatenate([np.zeros(2 * SAMPLE_RATE), tone(440, 6.0, SAMPLE_RATE)])
    sf.write(tmp_path / "x.wav", signal, SAMPLE_RATE, subtype="PCM_16")
    path = tmp_path / "x.mp3"
    ffmpeg("-i", str(tmp_path / "x.wav"), "-c:a", "libmp3lame", "-q:a", "0", "-write_xing", "0", str(path))
    assert sf.info(path).frames / SAMPLE_RATE > 20  # the guess this test is about
    x = load_audio(path)
    assert abs(len(x) / SAMPLE_RATE - 8) < 0.2 and abs(dominant_hz(x[3 * SAMPLE_RATE :]) - 440) < 5
    # Without a stated length, an over-long one is still refused, once decoding passes the limit.
    assert "longer than the limit of 5 s" in str(expect_error("too_long", path, limits=AudioLimits(max_seconds=5)))


def test_long_file_rejected_from_its_header(tmp_path: Path) -> None:
    # An honest one-hour 16-bit wav: header + 115 MB of zeros, written as a sparse file (costs nothing).
    path = tmp_path / "hour.wav"
    sf.write(path, np.zeros(SAMPLE_RATE), SAMPLE_RATE, subtype="PCM_16")
    header = path.read_bytes()[:44]
    frames = 3600 * SAMPLE_RATE
    riff = bytearray(header)
    riff[4:8] = (36 + 2 * frames).to_bytes(4, "little")
    riff[40:44] = (2 * frames).to_bytes(4, "little")
    with open(path, "wb") as f:
        f.write(riff)
        f.truncate(44 + 2 * frames)
    assert sf.info(path).frames == frames
    start = time.perf_counter()
    err = expect_error("too_long", path)
    assert time.perf_counter() - start < 0.5
    assert "3600.0 s" in str(err) and "20 s" in str(err) and MAX_SECONDS_ENV in str(err)


def test_long_webm_rejected_from_its_header(tmp_path: Path) -> None:
    # One hour of opus in webm (the browser recorder's format), made by stream-copying 10 s 360 times.
    ten = tmp_path / "ten.webm"
    ffmpeg("-f", "lavfi", "-i", "anullsrc=r=48000:cl=mono", "-t", "10", "-c:a", "libopus", "-b:a", "6k", str(ten))
    (tmp_path / "list.txt").write_text(f"file '{ten}'\n" * 360)
    hour = tmp_path / "hour.webm"
    ffmpeg("-f", "concat", "-safe", "0", "-i", str(tmp_path / "list.txt"), "-c", "copy", str(hour))
    start = time.perf_counter()
    err = expect_error("too_long", hour)
    assert time.perf_counter() - start < 0.5
    assert "3600" in str(err) or "3602" in str(err) or "3603" in str(err)


def test_long_webm_without_an_honest_header_stops_at_the_limit(tmp_path: Path) -> None:
    # Browser recordings may not state a duration; here the header claims 1 s for 30 s of audio.
    # Decoding must stop once the limit is passed instead of decoding everything.
    path = tmp_path / "thirty.webm"
    ffmpeg("-f", "lavfi", "-i", "sine=f=440:r=48000", "-t", "30", "-c:a", "libopus", str(path))
    data = path.read_bytes()
    at = data.find(b"\x44\x89\x88")  # Matroska Duration element: id 0x4489, 8-byte float (ms)
    assert at > 0 and struct.unpack(">d", data[at + 3 : at + 11])[0] == pytest.approx(30_000, abs=50)
    lying = data[: at + 3] + struct.pack(">d", 1000.0) + data[at + 11 :]
    err = expect_error("too_long", lying)
    assert "longer than the limit of 20 s" in str(err) and MAX_SECONDS_ENV in str(err)
    # Under the limit, the same file decodes in full (the header's 1 s is not trusted as the length).
    assert abs(len(load_audio(lying, limits=AudioLimits(max_seconds=40))) / SAMPLE_RATE - 30) < 0.1


def test_too_long_arrays_and_limits(tmp_path: Path) -> None:
    long = tone(440, 21.0, 8000).astype(np.float32)
    err = expect_error("too_long", long, sample_rate=8000)
    assert "21.0 s" in str(err) and "the limit is 20 s" in str(err)
    assert len(load_audio(long, sample_rate=8000, limits=AudioLimits(max_seconds=30))) == 21 * SAMPLE_RATE
    sf.write(tmp_path / "three.ogg", tone(440, 3.0, 16000), 16000)
    expect_error("too_long", tmp_path / "three.ogg", limits=AudioLimits(max_seconds=2.5))


def test_limits_from_env() -> None:
    assert limits_from_env({}) == AudioLimits()
    assert limits_from_env({MAX_SECONDS_ENV: "45"}).max_seconds == 45.0
    base = AudioLimits(min_seconds=0.5, silence_dbfs=-50.0)
    assert limits_from_env({MAX_SECONDS_ENV: "30"}, base) == AudioLimits(0.5, 30.0, -50.0)
    for bad in ("twenty", "0", "-5", "nan", "inf"):
        with pytest.raises(ValueError, match=MAX_SECONDS_ENV):
            limits_from_env({MAX_SECONDS_ENV: bad})
    with pytest.raises(ValueError):
        AudioLimits(min_seconds=5, max_seconds=1)


def test_api_misuse_is_a_type_error(lj_wav: Path) -> None:
    with pytest.raises(TypeError):
        load_audio(np.zeros(SAMPLE_RATE, np.float32))  # no sample_rate
    with pytest.raises(TypeError):
        load_audio(lj_wav, sample_rate=SAMPLE_RATE)
    with pytest.raises(TypeError):
        load_audio(12345)  # type: ignore[arg-type]
    assert set(ERROR_KINDS) == {"empty", "too_short", "too_long", "silent", "unreadable", "non_finite"}
    with pytest.raises(ValueError):
        AudioError("nope", "x")
