"""units.py: the unit-string format, speech.json, feature extractors, nearest centre, k-means, the tokenizer."""

from __future__ import annotations

import copy
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file
from transformers import HubertConfig, HubertModel

from speechgpt_app import units
from speechgpt_app.audio import SAMPLE_RATE, load_audio
from speechgpt_app.units import (
    EOSP,
    FEATURES_DIR,
    HUBERT_DEFAULTS,
    LOGMEL_DEFAULTS,
    SOSP,
    HubertFeatures,
    LogMelFeatures,
    SpeechConfig,
    SpeechTokenizer,
    dedup,
    kmeans,
    load_centres,
    mel_filterbank,
    nearest_centre,
    read_speech_config,
    save_centres,
    text_to_units,
    units_to_text,
    write_speech_config,
)

# --- the unit-string format ---------------------------------------------------------------------


def test_units_to_text_exact() -> None:
    assert units_to_text([661, 588, 604]) == "<sosp><661><588><604><eosp>"
    assert units_to_text([]) == SOSP + EOSP
    assert units_to_text(np.array([0, 999])) == "<sosp><0><999><eosp>"
    assert units_to_text(torch.tensor([7, 7, 3])) == "<sosp><7><7><3><eosp>"
    for bad in ([-1], [1.5], [True]):
        with pytest.raises(ValueError):
            units_to_text(bad)


@given(st.lists(st.integers(0, 999), max_size=60))
def test_format_round_trip(ids: list[int]) -> None:
    assert text_to_units(units_to_text(ids)) == ids


@given(st.lists(st.integers(0, 999), max_size=30), st.data())
def test_spacing_variants(ids: list[int], data: st.DataObject) -> None:
    # Old slow tokenizers put spaces (or other whitespace) around added tokens.
    tokens = [SOSP, *(f"<{i}>" for i in ids), EOSP]
    gaps = data.draw(st.lists(st.sampled_from(["", " ", "  ", "\n", "\t", " \n "]), min_size=len(tokens) + 1, max_size=len(tokens) + 1))
    text = "".join(g + t for g, t in zip(gaps, tokens)) + gaps[-1]
    assert text_to_units(text) == ids


def test_spaced_example() -> None:
    assert text_to_units("<sosp> <661> <588> <eosp>") == [661, 588]


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "<sosp>",
        "<sosp><1>",
        "<1><eosp>",
        "<eosp><1><sosp>",
        "<sosp><a><eosp>",
        "<sosp><01><eosp>",
        "<sosp><-1><eosp>",
        "<sosp>< 1><eosp>",
        "<sosp><1> x <eosp>",
        "<sosp><1><sosp><2><eosp>",
        "<sosp><1><eosp><eosp>",
        "<sosp><1><eosp> trailing",
        "<sosp><1><2><eosp><sosp><3><eosp>",
    ],
)
def test_malformed_strings(bad: str) -> None:
    with pytest.raises(ValueError):
        text_to_units(bad)


def test_out_of_range_units() -> None:
    assert text_to_units("<sosp><999><eosp>", n_units=1000) == [999]
    with pytest.raises(ValueError, match="1000"):
        text_to_units("<sosp><5><1000><eosp>", n_units=1000)


def test_dedup_example() -> None:
    assert dedup([5, 5, 5, 9, 9, 5]) == [5, 9, 5]
    assert dedup([]) == []


@given(st.lists(st.integers(0, 5), max_size=80))
def test_dedup_properties(ids: list[int]) -> None:
    out = dedup(ids)
    assert all(a != b for a, b in zip(out, out[1:]))
    assert dedup(out) == out
    # Every run of the input is one entry of the output, in order.
    runs = [ids[0]] if ids else []
    for a, b in zip(ids, ids[1:]):
        if a != b:
            runs.append(b)
    assert out == runs


# --- speech.json and centres --------------------------------------------------------------------


def test_speech_config_defaults_and_round_trip(tmp_path: Path) -> None:
    cfg = SpeechConfig(n_units=1000, features={"type": "hubert"})
    assert cfg.features == HUBERT_DEFAULTS and cfg.sample_rate == SAMPLE_RATE and cfg.schema_version == 2
    write_speech_config(tmp_path, cfg)
    assert json.loads((tmp_path / "speech.json").read_text()) == {
        "schema_version": 2,
        "sample_rate": 16000,
        "n_units": 1000,
        "features": {"type": "hubert", "layer": 11, "chunk_samples": 1_600_000, "normalize": False},
    }
    assert read_speech_config(tmp_path) == cfg


def test_speech_json_version_1_still_loads(tmp_path: Path) -> None:
    # Version 1 (before features.normalize) is what every speech directory written before it holds.
    old = {"schema_version": 1, "sample_rate": 16000, "n_units": 30,
           "features": {"type": "hubert", "layer": 3, "chunk_samples": 1_600_000}}  # fmt: skip
    (tmp_path / "speech.json").write_text(json.dumps(old))
    cfg = read_speech_config(tmp_path)
    assert cfg.schema_version == 1 and cfg.features["normalize"] is False and cfg.features["layer"] == 3
    (tmp_path / "speech.json").write_text(json.dumps({**old, "schema_version": 3}))
    with pytest.raises(ValueError, match="schema_version 3"):
        read_speech_config(tmp_path)
    logmel = SpeechConfig(n_units=64, features={"type": "logmel", "n_mels": 40})
    assert logmel.features == {**LOGMEL_DEFAULTS, "n_mels": 40}
    write_speech_config(tmp_path / "b", logmel)
    assert read_speech_config(tmp_path / "b") == logmel


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_units": 0, "features": {"type": "logmel"}},
        {"n_units": 10, "features": {"type": "mfcc"}},
        {"n_units": 10, "features": {"type": "hubert", "layers": 11}},
        {"n_units": 10, "features": {"type": "hubert", "layer": 0}},
        {"n_units": 10, "features": {"type": "logmel", "hop_length": 320.5}},
        {"n_units": 10, "features": {"type": "logmel", "f_max": "8k"}},
        {"n_units": 10, "features": {"type": "logmel", "f_min": True}},
        {"n_units": 10, "features": {"type": "hubert", "normalize": 1}},
        {"n_units": 10, "features": {"type": "logmel"}, "sample_rate": 22050},
        {"n_units": 10, "features": {"type": "logmel"}, "schema_version": 3},
    ],
)
def test_speech_config_rejects(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SpeechConfig(**kwargs)


def test_read_speech_config_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_speech_config(tmp_path)
    (tmp_path / "speech.json").write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        read_speech_config(tmp_path)
    (tmp_path / "speech.json").write_text(json.dumps({"n_units": 5, "features": {"type": "logmel"}, "extra": 1}))
    with pytest.raises(ValueError, match="extra"):
        read_speech_config(tmp_path)


def test_centres_round_trip(tmp_path: Path) -> None:
    centres = np.random.default_rng(0).standard_normal((7, 5)).astype(np.float32)
    save_centres(tmp_path, centres)
    stored = load_file(str(tmp_path / "centres.safetensors"))
    assert list(stored) == ["centres"] and stored["centres"].dtype == torch.float32
    np.testing.assert_array_equal(load_centres(tmp_path).numpy(), centres)
    for bad in (np.zeros(5, np.float32), np.full((2, 2), np.nan, np.float32)):
        with pytest.raises(ValueError):
            save_centres(tmp_path, bad)


# --- nearest centre -----------------------------------------------------------------------------


def brute_force(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Reference: exact squared distances in float64, first minimum wins."""
    d = ((x.astype(np.float64)[:, None, :] - c.astype(np.float64)[None]) ** 2).sum(-1)
    return d.argmin(1)


def test_nearest_centre_matches_brute_force(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 16)).astype(np.float32)
    c = rng.standard_normal((37, 16)).astype(np.float32)
    want = brute_force(x, c)
    np.testing.assert_array_equal(nearest_centre(torch.from_numpy(x), torch.from_numpy(c)).numpy(), want)
    # Many small blocks give the same answer as one.
    monkeypatch.setattr(units, "DISTANCE_BLOCK_ELEMENTS", 37 * 7)
    np.testing.assert_array_equal(nearest_centre(torch.from_numpy(x), torch.from_numpy(c)).numpy(), want)


def test_nearest_centre_is_exact_where_the_expansion_is_not() -> None:
    # Far from the origin, |x|^2 - 2x.c + |c|^2 in float32 loses the small differences that matter.
    rng = np.random.default_rng(1)
    offset = np.full(64, 300.0)
    c = (offset + rng.standard_normal((50, 64)) * 0.05).astype(np.float32)
    x = (offset + rng.standard_normal((400, 64)) * 0.05).astype(np.float32)
    want = brute_force(x, c)
    got = nearest_centre(torch.from_numpy(x), torch.from_numpy(c)).numpy()
    np.testing.assert_array_equal(got, want)
    xt, ct = torch.from_numpy(x), torch.from_numpy(c)
    expansion = ((xt**2).sum(1, keepdim=True) - 2 * xt @ ct.T + (ct**2).sum(1)).argmin(1).numpy()
    assert (expansion != want).any()  # the data really is hard for the shortcut


def test_nearest_centre_near_ties() -> None:
    # Points a hair's breadth off the midpoint of two centres: only a careful distance gets these right.
    rng = np.random.default_rng(2)
    c = rng.standard_normal((100, 768)).astype(np.float32)
    pairs = rng.integers(0, 100, size=(500, 2))
    x = ((c[pairs[:, 0]] + c[pairs[:, 1]]) / 2 + 1e-4 * rng.standard_normal((500, 768))).astype(np.float32)
    got = nearest_centre(torch.from_numpy(x), torch.from_numpy(c)).numpy()
    np.testing.assert_array_equal(got, brute_force(x, c))


def test_nearest_centre_ties_go_to_the_lowest_index() -> None:
    c = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0]])
    assert nearest_centre(torch.zeros(3, 2), c).tolist() == [0, 0, 0]
    assert nearest_centre(torch.tensor([[2.0, 0.0]]), c).tolist() == [0]


# --- k-means ------------------------------------------------------------------------------------


def blobs(seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    rng = np.random.default_rng(seed)
    means = rng.uniform(-10, 10, size=(5, 8))
    points = np.concatenate([m + 0.1 * rng.standard_normal((60, 8)) for m in means])
    return torch.from_numpy(rng.permutation(points).astype(np.float32)), means


def test_kmeans_recovers_separable_blobs() -> None:
    x, means = blobs()
    for seed in (0, 1, 2):
        centres = kmeans(x, 5, iters=30, seed=seed)
        assert centres.shape == (5, 8) and centres.dtype == torch.float32
        d = np.sqrt(((centres.numpy()[:, None] - means[None]) ** 2).sum(-1))
        assert sorted(d.argmin(1).tolist()) == [0, 1, 2, 3, 4]  # one centre per blob
        assert d.min(1).max() < 0.1


def test_kmeans_is_seeded() -> None:
    x, _ = blobs(3)
    torch.testing.assert_close(kmeans(x, 7, iters=10, seed=5), kmeans(x, 7, iters=10, seed=5), rtol=0, atol=0)


def test_kmeans_edge_cases() -> None:
    dup = torch.cat([torch.zeros(10, 3), torch.ones(2, 3)])
    centres = kmeans(dup, 3, iters=5, seed=0)
    assert centres.shape == (3, 3) and torch.isfinite(centres).all()
    with pytest.raises(ValueError):
        kmeans(torch.zeros(2, 3), 3)
    with pytest.raises(ValueError):
        kmeans(torch.full((4, 3), float("nan")), 2)


# --- log-mel ------------------------------------------------------------------------------------


def test_logmel_frames_and_rate() -> None:
    ex = LogMelFeatures()
    assert ex.dim == 80 and ex.frame_rate == 50.0
    for n in (320, 1000, 5 * SAMPLE_RATE, 5 * SAMPLE_RATE + 319, 12345):
        wav = torch.from_numpy(np.random.default_rng(n).standard_normal(n).astype(np.float32) * 0.1)
        out = ex(wav)
        assert out.shape == (n // 320, 80) and out.dtype == torch.float32
    assert ex(torch.zeros(5 * SAMPLE_RATE)).shape[0] == 250
    with pytest.raises(ValueError):
        ex(torch.zeros(100))


def test_logmel_is_deterministic_and_floored(lj_wav: Path) -> None:
    wav = torch.from_numpy(load_audio(lj_wav))
    a, b = LogMelFeatures()(wav), LogMelFeatures()(wav)
    assert torch.equal(a, b) and torch.isfinite(a).all()
    silent = LogMelFeatures()(torch.zeros(SAMPLE_RATE))
    torch.testing.assert_close(silent, torch.full_like(silent, float(np.log(units.LOG_FLOOR))))


def test_logmel_tone_lands_in_its_band() -> None:
    filters = mel_filterbank(SAMPLE_RATE, 1024, 80, 0.0, 8000.0)
    assert filters.shape == (80, 513) and (filters >= 0).all()
    hz = np.linspace(0, 8000, 513)
    peaks = hz[filters.argmax(1).numpy()]
    assert np.all(np.diff(peaks) >= 0)  # bands rise with the mel index
    t = torch.arange(SAMPLE_RATE) / SAMPLE_RATE
    for freq in (300.0, 1000.0, 4000.0):
        frames = LogMelFeatures()(0.3 * torch.sin(2 * torch.pi * freq * t))
        band = int(frames.mean(0).argmax())
        assert abs(peaks[band] - freq) < 0.1 * freq


# --- HuBERT -------------------------------------------------------------------------------------


def tiny_hubert(layers: int = 4, seed: int = 0, pre_ln: bool = False) -> HubertModel:
    """A random HuBERT with non-default small sizes (hop 320, receptive field 400 as the base): post-LN
    with a group-norm extractor (mHuBERT base), or pre-LN with layer-norm convs (HuBERT large)."""
    config = HubertConfig(
        hidden_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=80,
        conv_dim=(24,) * 7,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        feat_extract_norm="layer" if pre_ln else "group",
        do_stable_layer_norm=pre_ln,
    )
    torch.manual_seed(seed)
    return HubertModel(config).eval()


def full_hidden_states(model: HubertModel, wav: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.inference_mode():
        return model(wav[None], output_hidden_states=True).hidden_states


def hubert_frames(n: int) -> int:
    return (n - 400) // 320 + 1


@pytest.fixture(scope="module")
def hubert_speech_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    speech = tmp_path_factory.mktemp("bundle") / "speech"
    tiny_hubert().save_pretrained(speech / FEATURES_DIR)
    write_speech_config(speech, SpeechConfig(n_units=30, features={"type": "hubert", "layer": 3}))
    save_centres(speech, torch.randn(30, 48, generator=torch.Generator().manual_seed(0)))
    return speech


@pytest.mark.parametrize("layer", [1, 3, 4])
def test_truncation_equals_hidden_states(lj_wav: Path, layer: int) -> None:
    model = tiny_hubert()
    wav = torch.from_numpy(load_audio(lj_wav))
    want = full_hidden_states(model, wav)[layer][0]
    features = HubertFeatures(copy.deepcopy(model), layer=layer)
    assert len(features.model.encoder.layers) == layer
    got = features(wav)
    assert got.shape == (hubert_frames(len(wav)), 48)
    assert torch.equal(got, want)
    if layer < 4:  # a different layer really is different
        assert not torch.allclose(got, full_hidden_states(model, wav)[layer + 1][0])


def test_chunking(lj_wav: Path) -> None:
    model = tiny_hubert()
    wav = torch.from_numpy(load_audio(lj_wav))[: 3 * 16000 + 100]  # 3 chunks of 1 s, then a 100-sample tail
    features = HubertFeatures(copy.deepcopy(model), layer=2, chunk_samples=16000)
    got = features(wav)
    pieces = [full_hidden_states(model, wav[i : i + 16000])[2][0] for i in range(0, 3 * 16000, 16000)]
    assert torch.equal(got, torch.cat(pieces))  # the tail is shorter than one frame: dropped
    assert got.shape[0] == 3 * hubert_frames(16000)
    whole = HubertFeatures(copy.deepcopy(model), layer=2)(wav)
    assert whole.shape[0] == hubert_frames(len(wav)) and whole.shape != got.shape


def test_threads_share_one_extractor(lj_wav: Path) -> None:
    # With the language model on a server, turns run in threads over one extractor.
    model = tiny_hubert()
    features = HubertFeatures(copy.deepcopy(model), layer=2)
    wav = torch.from_numpy(load_audio(lj_wav))[:48000]
    clips = [wav[i * 4000 : i * 4000 + 16000] for i in range(6)]
    want = [features(c) for c in clips]
    with ThreadPoolExecutor(max_workers=6) as pool:
        for _ in range(3):
            got = list(pool.map(features, clips))
            assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def test_pre_ln_reads_the_layer_output_not_the_final_norm(lj_wav: Path) -> None:
    # fairseq stops at output_layer and never applies a pre-LN encoder's final LayerNorm (the fixtures
    # in test_fairseq_exactness prove it against fairseq); transformers' last_hidden_state applies it.
    model = tiny_hubert(pre_ln=True)
    wav = torch.from_numpy(load_audio(lj_wav))[:32000]
    with torch.inference_mode():
        normed = model(wav[None]).last_hidden_state[0]
    got = HubertFeatures(copy.deepcopy(model), layer=4)(wav)
    assert not torch.allclose(got, normed, atol=1e-3)
    assert torch.allclose(model.encoder.layer_norm(got), normed, atol=1e-5)
    inner = HubertFeatures(copy.deepcopy(model), layer=2)(wav)
    assert torch.allclose(inner, full_hidden_states(model, wav)[2][0], atol=1e-6)


def test_normalize_is_over_the_whole_utterance_before_chunking(lj_wav: Path) -> None:
    # A layer-norm extractor (HuBERT large) sees the waveform's scale; a group-norm one normalises it away.
    model = tiny_hubert(pre_ln=True)
    wav = torch.from_numpy(load_audio(lj_wav))[:48000] * 0.3 + 0.01
    got = HubertFeatures(copy.deepcopy(model), layer=2, chunk_samples=16000, normalize=True)(wav)
    normed = (wav - wav.mean()) / torch.sqrt(wav.var(unbiased=False) + 1e-5)
    want = HubertFeatures(copy.deepcopy(model), layer=2, chunk_samples=16000)(normed)
    assert torch.allclose(got, want, atol=1e-5)
    per_chunk = torch.cat([(c - c.mean()) / torch.sqrt(c.var(unbiased=False) + 1e-5) for c in wav.split(16000)])
    assert not torch.allclose(got, HubertFeatures(copy.deepcopy(model), layer=2, chunk_samples=16000)(per_chunk), atol=1e-3)
    raw = HubertFeatures(copy.deepcopy(model), layer=2, chunk_samples=16000)(wav)
    assert not torch.allclose(got, raw, atol=1e-3)


def test_hubert_rejects_what_it_cannot_run() -> None:
    with pytest.raises(ValueError, match="layer"):
        HubertFeatures(tiny_hubert(), layer=5)
    with pytest.raises(ValueError, match="shorter"):
        HubertFeatures(tiny_hubert(), layer=2)(torch.zeros(399))


def test_tokenizer_from_dir(hubert_speech_dir: Path, lj_wav: Path, jfk_flac: Path) -> None:
    tok = SpeechTokenizer.from_dir(hubert_speech_dir)
    assert tok.n_units == 30 and tok.sample_rate == SAMPLE_RATE
    assert isinstance(tok.extractor, HubertFeatures) and tok.extractor.layer == 3
    for path in (lj_wav, jfk_flac):
        wav = load_audio(path)
        frames = tok.encode_frames(wav)
        assert len(frames) == hubert_frames(len(wav))
        assert all(0 <= u < 30 for u in frames)
        torch.testing.assert_close(
            torch.tensor(frames), nearest_centre(tok.features(wav), tok.centres), rtol=0, atol=0
        )
        ids = tok.encode(wav)
        assert ids == dedup(frames) and len(set(ids)) > 1
        assert text_to_units(tok.encode_text(wav), n_units=30) == ids


def test_tokenizer_save_round_trip(hubert_speech_dir: Path, lj_wav: Path, tmp_path: Path) -> None:
    wav = load_audio(lj_wav)
    tok = SpeechTokenizer.from_dir(hubert_speech_dir)
    tok.save(tmp_path / "copy")
    assert {p.name for p in (tmp_path / "copy").iterdir()} == {"speech.json", "centres.safetensors", FEATURES_DIR}
    again = SpeechTokenizer.from_dir(tmp_path / "copy")
    assert again.config == tok.config
    assert torch.equal(again.features(wav), tok.features(wav))
    assert again.encode_frames(wav) == tok.encode_frames(wav)


def test_logmel_tokenizer_end_to_end(lj_wav: Path, jfk_flac: Path, tmp_path: Path) -> None:
    ex = LogMelFeatures()
    wavs = [load_audio(p) for p in (lj_wav, jfk_flac)]
    centres = kmeans(torch.cat([ex(torch.from_numpy(w)) for w in wavs]), 16, iters=10, seed=0)
    tok = SpeechTokenizer(SpeechConfig(n_units=16, features={"type": "logmel"}), ex, centres)
    tok.save(tmp_path)
    assert not (tmp_path / FEATURES_DIR).exists()
    again = SpeechTokenizer.from_dir(tmp_path)
    for wav in wavs:
        frames = again.encode_frames(wav)
        assert frames == tok.encode_frames(wav) and len(frames) == len(wav) // 320
        assert len(set(frames)) > 4  # real speech visits many units


def test_tokenizer_rejects_bad_input(hubert_speech_dir: Path) -> None:
    tok = SpeechTokenizer.from_dir(hubert_speech_dir)
    for bad in (np.zeros((2, 8000), np.float32), np.zeros(8000, np.int16), np.full(8000, np.nan, np.float32)):
        with pytest.raises(ValueError):
            tok.encode(bad)
    with pytest.raises(ValueError, match="shape"):
        SpeechTokenizer(tok.config, tok.extractor, torch.zeros(30, 47))
    with pytest.raises(FileNotFoundError):
        SpeechTokenizer.from_dir(hubert_speech_dir.parent)


@pytest.mark.gpu
def test_hubert_on_cuda_matches_cpu(hubert_speech_dir: Path, lj_wav: Path) -> None:
    wav = load_audio(lj_wav)
    on_cpu = SpeechTokenizer.from_dir(hubert_speech_dir)
    on_gpu = SpeechTokenizer.from_dir(hubert_speech_dir, device="cuda")
    assert next(on_gpu.extractor.model.parameters()).device.type == "cuda"
    features = on_gpu.features(wav)
    assert features.device.type == "cpu"
    # cuDNN may run the convolutions in TF32 (PyTorch's default), hence the loose tolerance.
    torch.testing.assert_close(features, on_cpu.features(wav), atol=1e-2, rtol=1e-2)


def test_ctc_speech_directory_round_trip_and_greedy_units(tmp_path: Path) -> None:
    """The `ctc` type: no centres; units are the greedy CTC output (repeats collapsed, blanks dropped)."""
    from speechgpt_app.units import CTCUnitEncoder, SpeechConfig, SpeechTokenizer, read_speech_config

    torch.manual_seed(0)
    symbols = ["a", "b", "c", "d", "e"]
    enc = CTCUnitEncoder.build({"width": 32, "layers": 1, "heads": 2, "ffn": 64, "symbols": symbols}, len(symbols))
    config = SpeechConfig(n_units=5, features={"type": "ctc", "width": 32, "layers": 1, "heads": 2, "ffn": 64, "symbols": symbols})
    SpeechTokenizer(config, enc, None).save(tmp_path)
    assert not (tmp_path / "centres.safetensors").exists()
    assert read_speech_config(tmp_path).features["symbols"] == symbols
    loaded = SpeechTokenizer.from_dir(tmp_path)
    wav = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1
    frames = loaded.encode_frames(wav)
    assert len(frames) == 50 and set(frames) <= set(range(6))  # 50 Hz, blank = 5
    expected = [k for i, k in enumerate(frames) if k != 5 and (i == 0 or frames[i - 1] != k)]
    assert loaded.encode(wav) == expected
    with pytest.raises(ValueError, match="no centres"):
        SpeechTokenizer(config, enc, np.zeros((5, 6), dtype=np.float32))


def test_long_edge_silences_are_cut_short_ones_kept() -> None:
    rng = np.random.default_rng(0)
    speech = torch.from_numpy(rng.normal(0, 0.1, SAMPLE_RATE).astype(np.float32))  # 1 s of "speech"
    quiet = torch.zeros(int(0.3 * SAMPLE_RATE))
    padded = torch.cat([torch.zeros(2 * SAMPLE_RATE), speech, torch.zeros(3 * SAMPLE_RATE)])
    trimmed = units.trim_edge_silence(padded)
    assert len(trimmed) == len(speech) + 2 * int(units.EDGE_SILENCE_KEEP_S * SAMPLE_RATE)
    assert torch.equal(trimmed[int(units.EDGE_SILENCE_KEEP_S * SAMPLE_RATE) :][: len(speech)], speech)
    short = torch.cat([quiet, speech, quiet])  # edges as the training recordings have them
    assert torch.equal(units.trim_edge_silence(short), short)
    assert len(units.trim_edge_silence(torch.zeros(50))) == 50  # shorter than a frame: as it is


def test_the_shipped_encoder_hears_a_question_alike_with_seconds_of_silence_around_it() -> None:
    from speechgpt_app.evaluate import edit_distance
    from speechgpt_app.loaders import default_model

    speech = SpeechTokenizer.from_dir(Path(default_model()) / "speech")
    silence = np.zeros(SAMPLE_RATE, np.float32)  # 1 s: what ends an auto-stopped recording

    def untrimmed(wav: np.ndarray) -> list[int]:
        return [k for k in dedup(speech.encode_frames(wav)) if k != speech.n_units]

    trimmed_edits = untrimmed_edits = 0
    for path in sorted((Path(__file__).parent / "data" / "eval-subset" / "audio").glob("*.flac"))[:8]:
        question = load_audio(str(path))
        alone = speech.encode(question)
        assert alone == untrimmed(question)  # edges as in training: nothing is cut
        for padded in (np.concatenate([question, silence]), np.concatenate([silence, silence, question, silence])):
            trimmed_edits += edit_distance(speech.encode(padded), alone)
            untrimmed_edits += edit_distance(untrimmed(padded), alone)
    assert trimmed_edits * 3 < untrimmed_edits  # measured: 13 against 103 unit edits over 16 recordings
