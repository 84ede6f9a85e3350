"""The unit-spectrogram vocoder: lengths, streaming, the directory format, bad units."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from speechgpt_app.spectral_vocoder import (
    SpectralConfig,
    SpectralVocoder,
    SpectralVocoderError,
    UnitSpectrogramNet,
)
from speechgpt_app.vocoder import Vocoder, load_vocoder

N_UNITS = 12


@pytest.fixture(scope="module")
def vocoder() -> SpectralVocoder:
    torch.manual_seed(0)
    net = UnitSpectrogramNet(SpectralConfig(num_embeddings=N_UNITS, channels=32, gl_iters=4))
    with torch.no_grad():
        net.duration[-1].bias.fill_(1.2)  # ~3 frames per unit
    return SpectralVocoder(net)


def _ids(n: int, seed: int = 1) -> list[int]:
    return np.random.default_rng(seed).integers(0, N_UNITS, n).tolist()


def test_decode_length_follows_the_durations(vocoder: SpectralVocoder) -> None:
    ids = _ids(30)
    wav = vocoder.decode(ids)
    assert wav.dtype == np.float32 and len(wav) == sum(vocoder.durations(ids)) * vocoder.hop
    assert np.isfinite(wav).all() and np.abs(wav).max() <= 1.0


def test_stream_gives_as_much_audio_as_whole_decoding_and_starts_early(vocoder: SpectralVocoder) -> None:
    ids = _ids(80)
    stream = vocoder.stream()
    parts = [stream.push(ids[i : i + 10]) for i in range(0, len(ids), 10)]
    parts.append(stream.flush())
    assert sum(map(len, parts)) == len(vocoder.decode(ids))
    assert sum(len(p) for p in parts[:-1]) > 0  # audio before the end
    with pytest.raises(SpectralVocoderError):
        stream.push([1])


def test_settled_spectrogram_frames_equal_whole_decoding(vocoder: SpectralVocoder) -> None:
    """What the stream releases depends only on units within the declared radius."""
    ids = _ids(60)
    cfg = vocoder.config
    whole = vocoder.log_magnitude(ids)
    prefix = ids[:40]
    durs = vocoder.durations(prefix)
    settled = len(prefix) - cfg.duration_radius
    stop = (sum(durs[:settled]) - cfg.frame_radius) * cfg.sub
    assert stop > 0
    torch.testing.assert_close(vocoder.log_magnitude(prefix)[:stop], whole[:stop], rtol=1e-5, atol=1e-5)


def test_directory_round_trip_and_dispatch(vocoder: SpectralVocoder, tmp_path: Path) -> None:
    vocoder.save(tmp_path / "vocoder")
    loaded = load_vocoder(tmp_path / "vocoder")
    assert isinstance(loaded, SpectralVocoder) and loaded.n_units == N_UNITS
    ids = _ids(20)
    assert loaded.durations(ids) == vocoder.durations(ids)
    # float16 storage: the same spectrogram to float16 precision
    torch.testing.assert_close(loaded.log_magnitude(ids), vocoder.log_magnitude(ids), rtol=0, atol=0.05)


def test_hifigan_directories_still_load_as_hifigan(tmp_path: Path) -> None:
    from speechgpt_app.vocoder import CodeHiFiGAN, VocoderConfig, save_vocoder_dir
    from training.export import TINY_VOCODER

    config = {**TINY_VOCODER, "num_embeddings": 7}
    save_vocoder_dir(tmp_path, config, CodeHiFiGAN(VocoderConfig.from_dict(config)).legacy_state_dict())
    assert isinstance(load_vocoder(tmp_path), Vocoder)


def test_out_of_range_units_are_refused(vocoder: SpectralVocoder) -> None:
    with pytest.raises(SpectralVocoderError, match="out of range"):
        vocoder.decode([0, N_UNITS])
