"""speechgpt_app computes what fairseq computes, from fairseq's own files (fairseq is not imported here).

tests/fixtures/fairseq/ holds tiny random models saved by fairseq and scikit-learn, the waveforms fed to
them and fairseq's outputs, all written by tools/make_fairseq_fixtures.py in a separate venv. The model
sizes differ from mHuBERT base and the released vocoder on purpose, so a converter that assumes those
shapes, or maps a key to the wrong place, fails here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from speechgpt_app import convert
from speechgpt_app.units import HubertFeatures, SpeechConfig, SpeechTokenizer, dedup
from speechgpt_app.vocoder import VOCODER_SUBDIR, Vocoder

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "fairseq"
MANIFEST = json.loads((FIXTURES / "MANIFEST.json").read_text(encoding="utf-8"))
HUBERT_CKPT = FIXTURES / "hubert_tiny.pt"
VOCODER_DIR = FIXTURES / "vocoder"
VOCODER_CKPT = VOCODER_DIR / MANIFEST["vocoder"]["checkpoint"]
UNIT_LAYER = MANIFEST["hubert"]["unit_layer"]
FEATURE_LAYERS = MANIFEST["hubert"]["feature_layers"]
KMEANS_BIN = FIXTURES / f"hubert_tiny_L{UNIT_LAYER}_km{MANIFEST['kmeans']['params']['n_clusters']}.bin"
INPUT_NAMES = sorted(MANIFEST["hubert"]["frames"])
SEQUENCES = sorted(MANIFEST["vocoder"]["sequences"])

MAX_ABS_ERROR = 1e-4  # float32 features and waveforms, against fairseq's float32 run on the same CPU


@pytest.fixture(scope="module")
def inputs() -> dict[str, np.ndarray]:
    """The exact float32 16 kHz waveforms fairseq was given."""
    return load_file(FIXTURES / "inputs.safetensors")


@pytest.fixture(scope="module")
def hubert_out() -> dict[str, np.ndarray]:
    """fairseq's features, units and deduplicated units."""
    return load_file(FIXTURES / "hubert_outputs.safetensors")


@pytest.fixture(scope="module")
def vocoder_out() -> dict[str, np.ndarray]:
    """fairseq's durations and waveforms."""
    return load_file(FIXTURES / "vocoder_outputs.safetensors")


@pytest.fixture(scope="module")
def fairseq_hubert() -> tuple[dict, dict[str, torch.Tensor]]:
    """(cfg, state dict) read from the fairseq checkpoint by our allow-list unpickler."""
    return convert.load_fairseq_checkpoint(HUBERT_CKPT)


def hubert_features(fairseq_hubert: tuple[dict, dict[str, torch.Tensor]], layer: int) -> HubertFeatures:
    """A transformers HubertModel converted from the fairseq checkpoint, read at `layer` (1-based)."""
    return HubertFeatures(convert.hubert_model_from_fairseq(*fairseq_hubert), layer=layer)


@pytest.fixture(scope="module")
def tokenizer(fairseq_hubert: tuple[dict, dict[str, torch.Tensor]]) -> SpeechTokenizer:
    """SpeechTokenizer from the converted HuBERT and the scikit-learn k-means centres."""
    centres = convert.load_kmeans_centres(KMEANS_BIN)
    config = SpeechConfig(n_units=centres.shape[0], features={"type": "hubert", "layer": UNIT_LAYER})
    return SpeechTokenizer(config, hubert_features(fairseq_hubert, UNIT_LAYER), centres)


@pytest.fixture(scope="module")
def vocoder() -> Vocoder:
    """Our CodeHiFiGAN loaded from fairseq's own g_ file and config.json."""
    return Vocoder.from_checkpoint(VOCODER_CKPT, VOCODER_DIR / "config.json")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_manifest_lists_every_fixture_with_its_sha256() -> None:
    on_disk = {p.relative_to(FIXTURES).as_posix() for p in FIXTURES.rglob("*") if p.is_file()}
    assert on_disk - {"MANIFEST.json"} == set(MANIFEST["files"])
    for name, entry in MANIFEST["files"].items():
        assert _sha256(FIXTURES / name) == entry["sha256"], f"{name} changed since the manifest was written"
        assert (FIXTURES / name).stat().st_size == entry["bytes"]


def test_fixture_models_are_not_the_released_shapes(fairseq_hubert) -> None:
    """Guards the point of the fixtures: sizes a converter could not get right by assuming mHuBERT base."""
    cfg, _ = fairseq_hubert
    model_cfg = cfg["model"]
    assert model_cfg["encoder_layers"] == 3 and model_cfg["encoder_embed_dim"] == 96
    assert model_cfg["conv_pos"] == 16 and model_cfg["conv_pos_groups"] == 4
    assert UNIT_LAYER < model_cfg["encoder_layers"] == max(FEATURE_LAYERS)
    config = json.loads((VOCODER_DIR / "config.json").read_text(encoding="utf-8"))
    assert config["upsample_rates"] != [5, 4, 4, 2, 2] and np.prod(config["upsample_rates"]) == 320


def test_hubert_checkpoint_needs_the_allow_list_unpickler() -> None:
    """The fixture is a real fairseq checkpoint (fairseq classes inside), not a plain tensor dict."""
    import pickle

    with pytest.raises(pickle.UnpicklingError, match="fairseq"):
        torch.load(HUBERT_CKPT, map_location="cpu", weights_only=True)
    cfg, sd = convert.load_fairseq_checkpoint(HUBERT_CKPT)
    assert isinstance(cfg, dict) and all(isinstance(v, torch.Tensor) for v in sd.values())


def test_kmeans_centres_are_read_from_the_sklearn_pickle(tokenizer: SpeechTokenizer) -> None:
    centres = convert.load_kmeans_centres(KMEANS_BIN)
    assert centres.dtype == np.float32
    assert centres.shape == (MANIFEST["kmeans"]["params"]["n_clusters"], 96)
    assert tokenizer.n_units == centres.shape[0]


@pytest.mark.parametrize("layer", FEATURE_LAYERS)
@pytest.mark.parametrize("name", INPUT_NAMES)
def test_features_match_fairseq(fairseq_hubert, inputs, hubert_out, name: str, layer: int) -> None:
    ours = hubert_features(fairseq_hubert, layer)(torch.from_numpy(inputs[name])).numpy()
    theirs = hubert_out[f"{name}.layer{layer}"]
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() < MAX_ABS_ERROR


@pytest.mark.parametrize("name", INPUT_NAMES)
def test_chunked_features_match_fairseq(fairseq_hubert, inputs, hubert_out, name: str) -> None:
    """Long audio is read in slices, each through the model on its own, as the reference reader does."""
    chunk = MANIFEST["hubert"]["chunk_samples"]
    assert len(inputs[name]) > chunk  # otherwise this would not test the seams
    features = HubertFeatures(convert.hubert_model_from_fairseq(*fairseq_hubert), UNIT_LAYER, chunk_samples=chunk)
    ours = features(torch.from_numpy(inputs[name])).numpy()
    theirs = hubert_out[f"{name}.layer{UNIT_LAYER}.chunked"]
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() < MAX_ABS_ERROR
    # Slicing really changes the result, so the comparison above is about the seams.
    assert np.abs(theirs - hubert_out[f"{name}.layer{UNIT_LAYER}"][: len(theirs)]).max() > 100 * MAX_ABS_ERROR


@pytest.mark.parametrize("name", INPUT_NAMES)
def test_units_match_fairseq(tokenizer: SpeechTokenizer, inputs, hubert_out, name: str) -> None:
    frames = tokenizer.encode_frames(inputs[name])
    assert frames == hubert_out[f"{name}.units"].tolist()
    assert tokenizer.encode(inputs[name]) == hubert_out[f"{name}.dedup"].tolist() == dedup(frames)


def test_written_speech_dir_reproduces_fairseq(tmp_path: Path, inputs, hubert_out, vocoder_out) -> None:
    """The whole conversion path: fairseq/sklearn files -> speech dir -> from_dir -> fairseq's outputs."""
    speech_dir = convert.write_speech_dir(
        tmp_path / "speech", HUBERT_CKPT, KMEANS_BIN, VOCODER_CKPT, VOCODER_DIR / "config.json", layer=UNIT_LAYER
    )
    tokenizer = SpeechTokenizer.from_dir(speech_dir)
    for name in INPUT_NAMES:
        assert tokenizer.encode_frames(inputs[name]) == hubert_out[f"{name}.units"].tolist(), name
    vocoder = Vocoder.from_dir(speech_dir / VOCODER_SUBDIR)
    for name in SEQUENCES:
        ours = vocoder.decode(vocoder_out[f"{name}.units"], dur_prediction=True)
        assert ours.shape == vocoder_out[f"{name}.wav_dur"].shape, name
        assert np.abs(ours - vocoder_out[f"{name}.wav_dur"]).max() < MAX_ABS_ERROR, name


@pytest.mark.parametrize("name", SEQUENCES)
def test_durations_match_fairseq(vocoder: Vocoder, vocoder_out, name: str) -> None:
    assert vocoder.durations(vocoder_out[f"{name}.units"]) == vocoder_out[f"{name}.durations"].tolist()


@pytest.mark.parametrize("dur_prediction", [True, False], ids=["dur", "nodur"])
@pytest.mark.parametrize("name", SEQUENCES)
def test_waveforms_match_fairseq(vocoder: Vocoder, vocoder_out, name: str, dur_prediction: bool) -> None:
    ours = vocoder.decode(vocoder_out[f"{name}.units"], dur_prediction=dur_prediction)
    theirs = vocoder_out[f"{name}.wav_dur" if dur_prediction else f"{name}.wav_nodur"]
    assert ours.dtype == np.float32 and ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() < MAX_ABS_ERROR


@pytest.mark.parametrize("step", [1, 7])
def test_streamed_waveform_matches_fairseq(vocoder: Vocoder, vocoder_out, step: int) -> None:
    units = vocoder_out["random.units"].tolist()
    stream = vocoder.stream()
    pieces = [stream.push(units[i : i + step]) for i in range(0, len(units), step)] + [stream.flush()]
    ours = np.concatenate(pieces)
    theirs = vocoder_out["random.wav_dur"]
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() < MAX_ABS_ERROR


# --- HuBERT large's recipe: layer-norm extractor, pre-LN layers, normalised waveforms -------------

PRELN_CKPT = FIXTURES / "hubert_preln.pt"


@pytest.fixture(scope="module")
def preln_out() -> dict[str, np.ndarray]:
    """fairseq's features of the pre-LN checkpoint, read from normalised waveforms."""
    return load_file(FIXTURES / "hubert_preln_outputs.safetensors")


@pytest.fixture(scope="module")
def preln_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pre-LN checkpoint converted, with the same k-means and vocoder."""
    out = tmp_path_factory.mktemp("preln") / "speech"
    return convert.write_speech_dir(
        out, PRELN_CKPT, KMEANS_BIN, VOCODER_CKPT, VOCODER_DIR / "config.json", layer=UNIT_LAYER
    )


def test_preln_fixture_is_hubert_large_recipe() -> None:
    cfg, _ = convert.load_fairseq_checkpoint(PRELN_CKPT)
    assert cfg["model"]["layer_norm_first"] is True and cfg["model"]["extractor_mode"] == "layer_norm"
    assert cfg["task"]["normalize"] is True


@pytest.mark.parametrize("layer", FEATURE_LAYERS)
@pytest.mark.parametrize("name", INPUT_NAMES)
def test_preln_features_match_fairseq(inputs, preln_out, name: str, layer: int) -> None:
    cfg, sd = convert.load_fairseq_checkpoint(PRELN_CKPT)
    features = HubertFeatures(convert.hubert_model_from_fairseq(cfg, sd), layer, normalize=True)
    ours = features(torch.from_numpy(inputs[name])).numpy()
    theirs = preln_out[f"{name}.layer{layer}"]
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() < MAX_ABS_ERROR


def test_preln_speech_dir_reproduces_fairseq(preln_dir: Path, inputs, preln_out) -> None:
    """normalize=true travels through speech.json; the converted directory's features and sliced reads
    agree with fairseq's (units are the nearest centres of these features)."""
    assert json.loads((preln_dir / "speech.json").read_text())["features"]["normalize"] is True
    tokenizer = SpeechTokenizer.from_dir(preln_dir)
    for name in INPUT_NAMES:
        ours = tokenizer.extractor(torch.from_numpy(inputs[name])).numpy()
        assert np.abs(ours - preln_out[f"{name}.layer{UNIT_LAYER}"]).max() < MAX_ABS_ERROR, name
    cfg, sd = convert.load_fairseq_checkpoint(PRELN_CKPT)
    chunk = MANIFEST["hubert"]["chunk_samples"]
    chunked = HubertFeatures(convert.hubert_model_from_fairseq(cfg, sd), UNIT_LAYER, chunk, normalize=True)
    for name in INPUT_NAMES:
        ours = chunked(torch.from_numpy(inputs[name])).numpy()
        assert np.abs(ours - preln_out[f"{name}.layer{UNIT_LAYER}.chunked"]).max() < MAX_ABS_ERROR, name


def test_preln_without_normalize_is_far_from_fairseq(inputs, preln_out) -> None:
    """The failure this guards against: normalize=true ignored gives other features, not rounding."""
    cfg, sd = convert.load_fairseq_checkpoint(PRELN_CKPT)
    raw = HubertFeatures(convert.hubert_model_from_fairseq(cfg, sd), UNIT_LAYER)
    ours = raw(torch.from_numpy(inputs["lj"])).numpy()
    assert np.abs(ours - preln_out[f"lj.layer{UNIT_LAYER}"]).max() > 100 * MAX_ABS_ERROR
