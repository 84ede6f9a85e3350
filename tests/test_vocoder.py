"""vocoder.py: fairseq-compatible loading, length rules, weight norm, streaming == whole."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.nn.utils import parametrize

from speechgpt_app.vocoder import (
    RELEASED_CONFIG,
    CodeHiFiGAN,
    Vocoder,
    VocoderConfig,
    VocoderError,
    save_vocoder_dir,
)

# Deliberately not the released sizes: every size comes from the config, nothing is assumed.
TINY_CONFIG = {
    "resblock": "1",
    "upsample_rates": [3, 2],
    "upsample_kernel_sizes": [5, 4],
    "upsample_initial_channel": 16,
    "resblock_kernel_sizes": [3, 5],
    "resblock_dilation_sizes": [[1, 2, 3], [1, 3, 5]],
    "num_embeddings": 50,
    "embedding_dim": 12,
    "model_in_dim": 12,
    "dur_predictor_params": {
        "encoder_embed_dim": 12,
        "var_pred_hidden_dim": 10,
        "var_pred_kernel_size": 3,
        "var_pred_dropout": 0.5,
    },
    "sampling_rate": 8000,
    "code_hop_size": 6,
    # keys the released config carries that the network does not use
    "segment_size": 8960,
    "num_mels": 80,
    "dist_config": {"dist_backend": "nccl"},
}


def random_generator(config: dict, seed: int = 0) -> CodeHiFiGAN:
    """A weight-normed CodeHiFiGAN with weights large enough that every stage matters."""
    torch.manual_seed(seed)
    model = CodeHiFiGAN(VocoderConfig.from_dict(config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("original0"):  # weight-norm magnitudes
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.uniform_(-0.1, 0.1)
        # log-durations spread over roughly 1..6 frames so the repeat path is exercised
        model.dur_predictor.proj.weight.mul_(4.0)
        model.dur_predictor.proj.bias.fill_(1.2)
    return model.eval()


@pytest.fixture(scope="module")
def fairseq_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[CodeHiFiGAN, Path, Path]:
    """The tiny vocoder saved exactly like fairseq: torch.save({"generator": sd}) + config.json."""
    out = tmp_path_factory.mktemp("fairseq_vocoder")
    model = random_generator(TINY_CONFIG)
    torch.save({"generator": model.legacy_state_dict()}, out / "g_00000100")
    (out / "config.json").write_text(json.dumps(TINY_CONFIG, indent=1))
    return model, out / "g_00000100", out / "config.json"


@pytest.fixture(scope="module")
def vocoder(fairseq_files: tuple[CodeHiFiGAN, Path, Path]) -> Vocoder:
    _, g_path, config_path = fairseq_files
    return Vocoder.from_checkpoint(g_path, config_path)


def units(n: int, seed: int = 1) -> list[int]:
    return np.random.default_rng(seed).integers(0, TINY_CONFIG["num_embeddings"], n).tolist()


def test_config_round_trip_keeps_extra_fields() -> None:
    cfg = VocoderConfig.from_dict(TINY_CONFIG)
    assert cfg.to_dict() == TINY_CONFIG
    assert cfg.hop == 6 and cfg.dur_predictor_params.var_pred_hidden_dim == 10


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"upsample_kernel_sizes": [4, 4]}, "even difference"),
        ({"code_hop_size": 5}, "code_hop_size"),
        ({"f0": True}, "f0"),
        ({"resblock": "2"}, "resblock type"),
        ({"upsample_rates": "x"}, "wrong type"),
    ],
)
def test_bad_config_is_refused(change: dict, words: str) -> None:
    with pytest.raises(VocoderError, match=words):
        VocoderConfig.from_dict({**TINY_CONFIG, **change})


def test_missing_config_field_is_named() -> None:
    bad = {k: v for k, v in TINY_CONFIG.items() if k != "num_embeddings"}
    with pytest.raises(VocoderError, match="num_embeddings"):
        VocoderConfig.from_dict(bad)


def test_released_architecture_has_fairseq_keys_and_size() -> None:
    sd = CodeHiFiGAN(VocoderConfig.from_dict(RELEASED_CONFIG)).legacy_state_dict()
    assert len(sd) == 302
    assert 13.4e6 < sum(v.numel() for v in sd.values()) < 13.6e6
    for key in ("dict.weight", "dur_predictor.conv1.0.weight", "dur_predictor.ln2.bias", "dur_predictor.proj.weight",
                "conv_pre.weight_g", "ups.4.weight_v", "resblocks.14.convs1.2.weight_g", "resblocks.0.convs2.0.bias",
                "conv_post.weight_v"):
        assert key in sd, key
    assert sd["ups.0.weight_v"].shape == (512, 256, 11)
    assert sd["conv_post.weight_g"].shape == (1, 1, 1)


def test_checkpoint_has_legacy_weight_norm_keys(fairseq_files: tuple[CodeHiFiGAN, Path, Path]) -> None:
    _, g_path, _ = fairseq_files
    sd = torch.load(g_path, weights_only=True)["generator"]
    assert any(k.endswith("weight_g") for k in sd) and any(k.endswith("weight_v") for k in sd)
    assert not any("parametrizations" in k for k in sd)


def test_both_load_paths_match_the_saved_model(fairseq_files: tuple[CodeHiFiGAN, Path, Path], tmp_path: Path) -> None:
    model, g_path, config_path = fairseq_files
    ids = units(40)
    with torch.no_grad():  # the weight-normed original is the reference
        want = model(torch.tensor([ids]), dur_prediction=True).view(-1).numpy()
    from_ckpt = Vocoder.from_checkpoint(g_path, config_path)
    sd = torch.load(g_path, weights_only=True)["generator"]
    save_vocoder_dir(tmp_path / "voc", config_path, sd)
    assert (tmp_path / "voc" / "config.json").read_bytes() == config_path.read_bytes()
    from_dir = Vocoder.from_dir(tmp_path / "voc")
    for voc in (from_ckpt, from_dir):
        got = voc.decode(ids)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.abs(want).max() > 0.05, "random vocoder too quiet for the comparison to mean anything"


def test_weight_norm_is_removed_without_changing_output(fairseq_files: tuple[CodeHiFiGAN, Path, Path], vocoder: Vocoder) -> None:
    model, _, _ = fairseq_files
    assert any(parametrize.is_parametrized(m) for m in model.modules())
    assert not any(parametrize.is_parametrized(m) for m in vocoder.model.modules())
    ids = torch.tensor([units(25, seed=3)])
    with torch.no_grad():
        before = model(ids, dur_prediction=False)
    model_copy = random_generator(TINY_CONFIG)  # same seed, same weights
    model_copy.remove_weight_norm()
    assert not any(parametrize.is_parametrized(m) for m in model_copy.modules())
    with torch.no_grad():
        after = model_copy(ids, dur_prediction=False)
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)
    assert not vocoder.model.training


def test_length_rules_and_range(vocoder: Vocoder) -> None:
    ids = units(33)
    durs = vocoder.durations(ids)
    assert len(durs) == len(ids) and min(durs) >= 1 and len(set(durs)) > 2
    with_dur = vocoder.decode(ids)
    assert with_dur.dtype == np.float32 and with_dur.ndim == 1
    assert len(with_dur) == sum(durs) * vocoder.hop
    without = vocoder.decode(ids, dur_prediction=False)
    assert len(without) == len(ids) * vocoder.hop
    assert np.abs(with_dur).max() <= 1.0
    assert vocoder.sample_rate == 8000 and vocoder.hop == 6
    assert vocoder.decode([]).shape == (0,)


def test_duration_prediction_repeats_units(vocoder: Vocoder) -> None:
    """Predicted durations applied by hand give the same audio as decode(dur_prediction=True)."""
    ids = units(30, seed=5)
    repeated = np.repeat(ids, vocoder.durations(ids)).tolist()
    np.testing.assert_allclose(vocoder.decode(ids), vocoder.decode(repeated, dur_prediction=False), atol=1e-5)


def test_durations_follow_fairseq_rule(vocoder: Vocoder) -> None:
    ids = units(20, seed=8)
    with torch.no_grad():
        log_dur = vocoder.model.dur_predictor(vocoder.model.dict(torch.tensor([ids]))).view(-1)
    expected = [max(1, round(float(np.exp(v)) - 1)) for v in log_dur.tolist()]
    assert vocoder.durations(ids) == expected


def test_bad_unit_ids_are_refused(vocoder: Vocoder) -> None:
    with pytest.raises(VocoderError, match=r"\[0, 50\)"):
        vocoder.decode([1, 50])
    with pytest.raises(VocoderError, match=r"\[0, 50\)"):
        vocoder.decode([-1])
    with pytest.raises(VocoderError, match="integers"):
        vocoder.decode([1.5, 2.0])


def test_shape_mismatch_names_the_key(fairseq_files: tuple[CodeHiFiGAN, Path, Path], tmp_path: Path) -> None:
    _, g_path, _ = fairseq_files
    wrong = {**TINY_CONFIG, "upsample_initial_channel": 32}
    (tmp_path / "config.json").write_text(json.dumps(wrong))
    with pytest.raises(VocoderError, match=r"conv_pre\.weight_v: checkpoint \(16, 12, 7\) vs config \(32, 12, 7\)"):
        Vocoder.from_checkpoint(g_path, tmp_path / "config.json")
    sd = torch.load(g_path, weights_only=True)["generator"]
    del sd["dict.weight"]
    with pytest.raises(VocoderError, match=r"missing dict\.weight"):
        Vocoder.from_state_dict(VocoderConfig.from_dict(TINY_CONFIG), sd)


def run_stream(
    vocoder: Vocoder, ids: list[int], cuts: list[int], dur_prediction: bool, min_frames: int = 1
) -> tuple[np.ndarray, list[int]]:
    """Push ids split at `cuts` (may repeat: empty pushes); return audio and samples out after each push."""
    stream = vocoder.stream(dur_prediction=dur_prediction, min_frames=min_frames)
    pieces, emitted = [], []
    bounds = [0, *sorted(cuts), len(ids)]
    for a, b in zip(bounds, bounds[1:]):
        pieces.append(stream.push(ids[a:b]))
        emitted.append(sum(len(p) for p in pieces))
    pieces.append(stream.flush())
    return np.concatenate(pieces), emitted


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(min_value=1, max_value=60),
    cut_fracs=st.lists(st.floats(min_value=0, max_value=1), max_size=12),
    dur_prediction=st.booleans(),
    seed=st.integers(0, 1000),
    min_frames=st.integers(1, 8),
)
def test_any_chunking_matches_whole(
    vocoder: Vocoder, n: int, cut_fracs: list[float], dur_prediction: bool, seed: int, min_frames: int
) -> None:
    ids = units(n, seed)
    whole = vocoder.decode(ids, dur_prediction=dur_prediction)
    chunked, emitted = run_stream(vocoder, ids, [int(f * n) for f in cut_fracs], dur_prediction, min_frames)
    steps = np.diff([0, *emitted])
    assert all(step == 0 or step >= min_frames * vocoder.hop for step in steps)
    assert chunked.shape == whole.shape
    assert np.abs(chunked - whole).max() < 1e-3


@pytest.mark.parametrize("dur_prediction", [True, False])
def test_one_unit_pushes_emit_early_and_match(vocoder: Vocoder, dur_prediction: bool) -> None:
    ids = units(80, seed=11)
    whole = vocoder.decode(ids, dur_prediction=dur_prediction)
    chunked, emitted = run_stream(vocoder, ids, list(range(1, len(ids))), dur_prediction)
    assert np.abs(chunked - whole).max() < 1e-3
    # audio comes out while units arrive: after push k, everything up to k - lookahead units is out
    durs = vocoder.durations(ids) if dur_prediction else [1] * len(ids)
    lookahead = vocoder.stream(dur_prediction).lookahead
    for k, out in enumerate(emitted, start=1):
        assert out >= sum(durs[: max(0, k - lookahead)]) * vocoder.hop


def test_per_push_work_is_bounded(vocoder: Vocoder, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each push decodes new frames plus a fixed context, never the whole utterance again."""
    sizes: list[int] = []
    generate = vocoder.model.generate

    def spy(x: torch.Tensor) -> torch.Tensor:
        sizes.append(x.shape[-1])
        return generate(x)

    monkeypatch.setattr(vocoder.model, "generate", spy)
    ids = units(300, seed=2)
    stream = vocoder.stream()
    for i in range(0, len(ids), 3):
        stream.push(ids[i : i + 3])
    stream.flush()
    max_new = 3 * max(vocoder.durations(ids))
    assert sum(vocoder.durations(ids)) > 4 * max(sizes)
    assert max(sizes) <= sum(vocoder.model.generator_context()) + max_new


def test_flushed_stream_refuses_more(vocoder: Vocoder) -> None:
    stream = vocoder.stream()
    stream.push(units(5))
    stream.flush()
    with pytest.raises(VocoderError, match="flushed"):
        stream.push([1])


def test_no_duration_predictor(tmp_path: Path) -> None:
    cfg = {k: v for k, v in TINY_CONFIG.items() if k != "dur_predictor_params"}
    voc = Vocoder.from_state_dict(VocoderConfig.from_dict(cfg), CodeHiFiGAN(VocoderConfig.from_dict(cfg)).legacy_state_dict())
    assert len(voc.decode([1, 2, 3], dur_prediction=False)) == 3 * voc.hop
    with pytest.raises(VocoderError, match="no duration predictor"):
        voc.decode([1, 2, 3])
    with pytest.raises(VocoderError, match="no duration predictor"):
        voc.stream()


def test_generator_context_is_exact(vocoder: Vocoder) -> None:
    """Changing input frame f changes output frames f - right .. f + left and nothing else."""
    left, right = vocoder.model.generator_context()
    n, f, hop = 80, 40, vocoder.hop
    x = vocoder.model.embed(torch.tensor([units(n, seed=9)]))
    y = x.clone()
    y[:, :, f] += 1.0
    with torch.no_grad():
        diff = (vocoder.model.generate(x) - vocoder.model.generate(y)).abs().view(n, hop).amax(dim=1)
    changed = torch.nonzero(diff).view(-1).tolist()
    assert changed[0] == f - right and changed[-1] == f + left


def test_bad_min_frames_is_refused(vocoder: Vocoder) -> None:
    with pytest.raises(VocoderError, match="min_frames"):
        vocoder.stream(min_frames=0)
