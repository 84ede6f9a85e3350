"""convert.py: allow-list unpicklers, fairseq HuBERT -> transformers, the speech directory, the CLI."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import types
from pathlib import Path

import joblib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from speechgpt_app import cli
from speechgpt_app.convert import (
    ConvertError,
    Stub,
    UnsafePickleError,
    hubert_config_from_fairseq,
    hubert_model_from_fairseq,
    hubert_state_dict_from_fairseq,
    load_fairseq_checkpoint,
    load_kmeans_centres,
    parse_conv_layers,
    safe_torch_load,
    task_normalize,
    write_speech_dir,
)
from speechgpt_app.vocoder import CodeHiFiGAN, Vocoder, VocoderConfig

# A tiny mHuBERT look-alike: every size differs from the base model's.
HUBERT_MODEL_CFG = {
    "_name": "hubert",
    "extractor_mode": "default",
    "conv_feature_layers": "[(32,10,5)] + [(32,3,2)] * 3 + [(32,2,2)]",
    "conv_bias": False,
    "encoder_layers": 12,
    "encoder_embed_dim": 24,
    "encoder_ffn_embed_dim": 40,
    "encoder_attention_heads": 4,
    "activation_fn": "gelu",
    "layer_norm_first": False,
    "conv_pos": 8,
    "conv_pos_groups": 4,
    "dropout": 0.1,
    "attention_dropout": 0.1,
    "activation_dropout": 0.0,
    "dropout_input": 0.1,
    "encoder_layerdrop": 0.05,
}
N_UNITS = 20
VOCODER_CFG = {
    "resblock": "1",
    "upsample_rates": [4, 2],
    "upsample_kernel_sizes": [8, 4],
    "upsample_initial_channel": 8,
    "resblock_kernel_sizes": [3],
    "resblock_dilation_sizes": [[1, 3, 5]],
    "num_embeddings": N_UNITS,
    "embedding_dim": 6,
    "model_in_dim": 6,
    "dur_predictor_params": {"encoder_embed_dim": 6, "var_pred_hidden_dim": 6, "var_pred_kernel_size": 3,
                             "var_pred_dropout": 0.5},
    "sampling_rate": 16000,
    "code_hop_size": 8,
    "num_mels": 80,
}


def fake_modules(monkeypatch: pytest.MonkeyPatch, dotted: str, **classes: type) -> None:
    """Register `dotted` (and its parents) in sys.modules holding `classes`; undone by monkeypatch."""
    parts = dotted.split(".")
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    for cls_name, cls in classes.items():
        cls.__module__, cls.__qualname__ = dotted, cls_name
        setattr(sys.modules[dotted], cls_name, cls)


class Dictionary:
    """Stands in for fairseq.data.dictionary.Dictionary when the checkpoint is written."""

    def __init__(self, symbols: list[str]) -> None:
        self.symbols = symbols
        self.indices = {s: i for i, s in enumerate(symbols)}


class MiniBatchKMeans:
    """Stands in for sklearn.cluster._kmeans.MiniBatchKMeans when the .bin is written."""

    def __init__(self, centres: np.ndarray) -> None:
        self.n_clusters = len(centres)
        self.cluster_centers_ = centres
        self.counts_ = np.arange(len(centres), dtype=np.float64)
        self.random_state = 0


class Evil:
    """Unpickling this runs a shell command (what the allow-list must prevent)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def fairseq_hubert_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under fairseq's HuBERT key names and shapes (written out by hand)."""
    g = torch.Generator().manual_seed(seed)
    m = HUBERT_MODEL_CFG
    d, ffn, k, groups = m["encoder_embed_dim"], m["encoder_ffn_embed_dim"], m["conv_pos"], m["conv_pos_groups"]
    shapes: dict[str, tuple[int, ...]] = {}
    c_in = 1
    for i, (c, kw, _) in enumerate(parse_conv_layers(m["conv_feature_layers"])):
        shapes[f"feature_extractor.conv_layers.{i}.0.weight"] = (c, c_in, kw)
        c_in = c
    shapes |= {
        "feature_extractor.conv_layers.0.2.weight": (c_in,),
        "feature_extractor.conv_layers.0.2.bias": (c_in,),
        "layer_norm.weight": (c_in,),
        "layer_norm.bias": (c_in,),
        "post_extract_proj.weight": (d, c_in),
        "post_extract_proj.bias": (d,),
        "mask_emb": (d,),
        "encoder.pos_conv.0.weight_g": (1, 1, k),
        "encoder.pos_conv.0.weight_v": (d, d // groups, k),
        "encoder.pos_conv.0.bias": (d,),
        "encoder.layer_norm.weight": (d,),
        "encoder.layer_norm.bias": (d,),
        "final_proj.weight": (7, d),
        "final_proj.bias": (7,),
        "label_embs_concat": (30, 7),
    }
    for i in range(m["encoder_layers"]):
        p = f"encoder.layers.{i}."
        for proj in ("q", "k", "v", "out"):
            shapes[f"{p}self_attn.{proj}_proj.weight"] = (d, d)
            shapes[f"{p}self_attn.{proj}_proj.bias"] = (d,)
        for ln in ("self_attn_layer_norm", "final_layer_norm"):
            shapes[f"{p}{ln}.weight"] = (d,)
            shapes[f"{p}{ln}.bias"] = (d,)
        shapes |= {f"{p}fc1.weight": (ffn, d), f"{p}fc1.bias": (ffn,), f"{p}fc2.weight": (d, ffn), f"{p}fc2.bias": (d,)}
    sd = {name: torch.randn(shape, generator=g) * 0.2 for name, shape in shapes.items()}
    for name in sd:  # norm gains near 1, as in a trained model, so the features keep their spread
        if name.endswith(("layer_norm.weight", "conv_layers.0.2.weight")):
            sd[name] += 1.0
    return sd


def save_fairseq_hubert(path: Path, monkeypatch: pytest.MonkeyPatch, omegaconf_cfg: bool = False) -> dict:
    """A fairseq-style checkpoint (cfg, model, task_state with a fairseq Dictionary), made without fairseq."""
    cfg = {"model": dict(HUBERT_MODEL_CFG), "task": {"_name": "hubert_pretraining", "normalize": False}}
    if omegaconf_cfg:
        from omegaconf import OmegaConf

        cfg = OmegaConf.create(cfg)
    sd = fairseq_hubert_state_dict()
    with monkeypatch.context() as m:  # the fake fairseq module exists only while saving
        fake_modules(m, "fairseq.data.dictionary", Dictionary=Dictionary)
        ckpt = {"cfg": cfg, "model": sd, "task_state": {"dictionaries": [Dictionary(["<s>", "a", "b"])]},
                "optimizer_history": [{"num_updates": 400000}]}
        torch.save(ckpt, path)
    return sd


def save_fake_kmeans(path: Path, centres: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as m:
        fake_modules(m, "sklearn.cluster._kmeans", MiniBatchKMeans=MiniBatchKMeans)
        joblib.dump(MiniBatchKMeans(centres), path)


def save_fairseq_vocoder(dir_: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    sd = CodeHiFiGAN(VocoderConfig.from_dict(VOCODER_CFG)).legacy_state_dict()
    torch.save({"generator": sd}, dir_ / "g_00500000")
    (dir_ / "config.json").write_text(json.dumps(VOCODER_CFG, indent=4))
    return dir_ / "g_00500000", dir_ / "config.json"


@pytest.fixture
def released(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """The four released files in fairseq's formats, tiny."""
    src = tmp_path / "released"
    src.mkdir()
    save_fairseq_hubert(src / "mhubert.pt", monkeypatch)
    centres = np.random.default_rng(0).standard_normal((N_UNITS, HUBERT_MODEL_CFG["encoder_embed_dim"])).astype(np.float32)
    save_fake_kmeans(src / "km.bin", centres, monkeypatch)
    g, c = save_fairseq_vocoder(src)
    return {"hubert": src / "mhubert.pt", "kmeans": src / "km.bin", "vocoder": g, "vocoder_config": c}


# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("omegaconf_cfg", [False, True])
def test_fairseq_checkpoint_loads_without_fairseq(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, omegaconf_cfg: bool) -> None:
    sd = save_fairseq_hubert(tmp_path / "h.pt", monkeypatch, omegaconf_cfg)
    assert "fairseq" not in sys.modules
    cfg, got = load_fairseq_checkpoint(tmp_path / "h.pt")
    assert type(cfg) is dict and type(cfg["model"]) is dict
    assert cfg["model"]["conv_feature_layers"] == HUBERT_MODEL_CFG["conv_feature_layers"]
    assert got.keys() == sd.keys()
    assert all(torch.equal(got[k], sd[k]) for k in sd)
    # the fairseq Dictionary became an inert stub that kept its state
    d = safe_torch_load(tmp_path / "h.pt")["task_state"]["dictionaries"][0]
    assert isinstance(d, Stub) and type(d).__module__ == "fairseq.data.dictionary"
    assert d.symbols == ["<s>", "a", "b"] and d.indices["b"] == 2
    with pytest.raises(TypeError, match="stub"):
        pickle.dumps(d)


def test_malicious_torch_pickle_is_refused_before_running(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"model": {}, "cfg": {}, "x": Evil(marker)}, tmp_path / "evil.pt")
    with pytest.raises(UnsafePickleError, match=r"(posix|nt)\.system"):
        load_fairseq_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


@pytest.mark.parametrize("payload", [(eval, ("1+1",)), (getattr, (0, "real")), (exec, ("x = 1",)), (__import__, ("os",))])
def test_other_gadgets_are_refused(tmp_path: Path, payload: tuple) -> None:
    class Gadget:
        def __reduce__(self) -> tuple:
            return payload

    torch.save({"model": {}, "g": Gadget()}, tmp_path / "g.pt")
    with pytest.raises(UnsafePickleError, match="builtins"):
        safe_torch_load(tmp_path / "g.pt")


def test_kmeans_centres_read_back_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    centres = np.random.default_rng(1).standard_normal((13, 7)).astype(np.float32)
    save_fake_kmeans(tmp_path / "km.bin", centres, monkeypatch)
    assert "sklearn" not in sys.modules
    got = load_kmeans_centres(tmp_path / "km.bin")
    assert got.dtype == np.float32 and np.array_equal(got, centres)
    # compressed joblib files read the same way
    with monkeypatch.context() as m:
        fake_modules(m, "sklearn.cluster._kmeans", MiniBatchKMeans=MiniBatchKMeans)
        joblib.dump(MiniBatchKMeans(centres.astype(np.float64)), tmp_path / "kmz.bin", compress=3)
    assert np.array_equal(load_kmeans_centres(tmp_path / "kmz.bin"), centres)


def test_malicious_kmeans_is_refused_before_running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "pwned"
    joblib.dump({"cluster_centers_": Evil(marker)}, tmp_path / "evil.bin")
    with pytest.raises(UnsafePickleError, match=r"(posix|nt)\.system"):
        load_kmeans_centres(tmp_path / "evil.bin")
    assert not marker.exists()
    joblib.dump(np.array([Evil(marker)], dtype=object), tmp_path / "obj.bin")
    with pytest.raises(UnsafePickleError, match="object-dtype"):
        load_kmeans_centres(tmp_path / "obj.bin")
    assert not marker.exists()


def test_kmeans_without_centres_is_a_clear_error(tmp_path: Path) -> None:
    joblib.dump({"a": 1}, tmp_path / "x.bin")
    with pytest.raises(ConvertError, match="cluster_centers_"):
        load_kmeans_centres(tmp_path / "x.bin")


def test_conv_layer_spec_is_parsed_without_eval() -> None:
    assert parse_conv_layers("[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2") == (
        [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2
    )
    with pytest.raises(ConvertError):
        parse_conv_layers("__import__('os').system('true')")


def test_hubert_config_follows_the_cfg() -> None:
    config = hubert_config_from_fairseq({"model": HUBERT_MODEL_CFG})
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.intermediate_size) == (24, 12, 4, 40)
    assert config.conv_dim == [32] * 5 and config.conv_kernel == [10, 3, 3, 3, 2] and config.conv_stride == [5, 2, 2, 2, 2]
    assert config.feat_extract_norm == "group" and not config.do_stable_layer_norm and not config.conv_bias
    assert (config.num_conv_pos_embeddings, config.num_conv_pos_embedding_groups) == (8, 4)
    layer_norm = hubert_config_from_fairseq({"model": {**HUBERT_MODEL_CFG, "extractor_mode": "layer_norm", "layer_norm_first": True}})
    assert layer_norm.feat_extract_norm == "layer" and layer_norm.do_stable_layer_norm
    with pytest.raises(ConvertError, match="encoder_layers"):
        hubert_config_from_fairseq({"model": {k: v for k, v in HUBERT_MODEL_CFG.items() if k != "encoder_layers"}})


@pytest.mark.parametrize(
    ("setting", "value"), [("layer_type", "conformer"), ("pos_conv_depth", 5), ("conv_pos_batch_norm", True)]
)
def test_unimplemented_settings_are_refused_by_name(setting: str, value: object) -> None:
    with pytest.raises(ConvertError, match=f"model.{setting}="):
        hubert_config_from_fairseq({"model": {**HUBERT_MODEL_CFG, setting: value}})


def test_task_normalize_and_rate() -> None:
    assert task_normalize({"task": {"normalize": True}}) is True
    assert task_normalize({"task": {"normalize": False}}) is False and task_normalize({}) is False
    with pytest.raises(ConvertError, match="sample_rate=8000"):
        task_normalize({"task": {"sample_rate": 8000}})


def test_hubert_weights_load_strictly_and_keep_fairseq_math() -> None:
    sd = fairseq_hubert_state_dict(seed=4)
    model = hubert_model_from_fairseq({"model": HUBERT_MODEL_CFG}, sd)
    msd = model.state_dict()
    assert torch.equal(msd["encoder.layers.3.attention.q_proj.weight"], sd["encoder.layers.3.self_attn.q_proj.weight"])
    assert torch.equal(msd["feature_extractor.conv_layers.0.layer_norm.bias"], sd["feature_extractor.conv_layers.0.2.bias"])
    # fairseq's weight norm on pos_conv is over dim 2: w = g * v / ||v|| with the norm over dims 0 and 1
    g, v = sd["encoder.pos_conv.0.weight_g"], sd["encoder.pos_conv.0.weight_v"]
    want = g * v / v.norm(dim=(0, 1), keepdim=True)
    torch.testing.assert_close(model.encoder.pos_conv_embed.conv.weight, want)
    # the conv front end computes fairseq's first layer: conv -> GroupNorm(dim groups) -> GELU
    wav = torch.randn(1, 1, 4000)
    x = F.conv1d(wav, sd["feature_extractor.conv_layers.0.0.weight"], stride=5)
    x = F.gelu(F.group_norm(x, 32, sd["feature_extractor.conv_layers.0.2.weight"], sd["feature_extractor.conv_layers.0.2.bias"]))
    with torch.no_grad():
        got = model.feature_extractor.conv_layers[0](wav)
    torch.testing.assert_close(got, x)


def test_unknown_or_missing_keys_are_errors() -> None:
    sd = fairseq_hubert_state_dict()
    with pytest.raises(ConvertError, match="encoder.mystery"):
        hubert_state_dict_from_fairseq({**sd, "encoder.mystery": torch.zeros(1)})
    del sd["encoder.layers.2.fc1.bias"]
    with pytest.raises(ConvertError, match="intermediate_dense.bias"):
        hubert_model_from_fairseq({"model": HUBERT_MODEL_CFG}, sd)


def test_write_speech_dir_round_trip(released: dict[str, Path], tmp_path: Path, lj_wav: Path) -> None:
    from speechgpt_app.audio import load_audio
    from speechgpt_app.units import SpeechTokenizer, read_speech_config

    out = write_speech_dir(tmp_path / "speech", released["hubert"], released["kmeans"], released["vocoder"],
                           released["vocoder_config"], layer=11)
    assert read_speech_config(out).n_units == N_UNITS and read_speech_config(out).features["layer"] == 11
    assert (out / "vocoder" / "config.json").read_bytes() == released["vocoder_config"].read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".speech")], "temporary directory left behind"

    wav = load_audio(lj_wav)
    tok = SpeechTokenizer.from_dir(out)
    cfg, sd = load_fairseq_checkpoint(released["hubert"])
    with torch.no_grad():
        want = hubert_model_from_fairseq(cfg, sd)(torch.from_numpy(wav)[None], output_hidden_states=True).hidden_states[11][0]
    torch.testing.assert_close(tok.features(wav), want, atol=1e-4, rtol=1e-4)
    ids = tok.encode(wav)
    nearest = torch.cdist(want, torch.from_numpy(load_kmeans_centres(released["kmeans"]))).argmin(dim=1).tolist()
    assert ids == [u for i, u in enumerate(nearest) if i == 0 or u != nearest[i - 1]]
    assert len(set(ids)) > 1

    voc = Vocoder.from_dir(out / "vocoder")
    reference = Vocoder.from_checkpoint(released["vocoder"], released["vocoder_config"])
    np.testing.assert_array_equal(voc.decode(ids), reference.decode(ids))

    with pytest.raises(FileExistsError, match="--force"):
        write_speech_dir(out, released["hubert"], released["kmeans"], released["vocoder"], released["vocoder_config"])


def test_mismatched_parts_leave_nothing_behind(released: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_fake_kmeans(tmp_path / "km7.bin", np.zeros((7, 24), np.float32), monkeypatch)
    with pytest.raises(ConvertError, match="vocoder knows 20 units but k-means has 7"):
        write_speech_dir(tmp_path / "speech", released["hubert"], tmp_path / "km7.bin", released["vocoder"],
                         released["vocoder_config"])
    assert not (tmp_path / "speech").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".speech")]


def test_cli_converts_local_files(released: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["convert", "--hubert", str(released["hubert"]), "--kmeans", str(released["kmeans"]),
            "--vocoder", str(released["vocoder"]), "--vocoder-config", str(released["vocoder_config"])]
    assert cli.main([*args, "--out", str(tmp_path / "s")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "s")
    assert (tmp_path / "s" / "speech.json").is_file()
    assert cli.main(args) == 1
    assert "--out" in capsys.readouterr().err
    # A layer the checkpoint does not have (the default 11 on a smaller model): one plain line, status 1.
    assert cli.main([*args, "--out", str(tmp_path / "t"), "--layer", "40"]) == 1
    err = capsys.readouterr().err
    assert "--layer 40 is out of range" in err and "Traceback" not in err and not (tmp_path / "t").exists()


def test_cli_without_files_uses_the_cache(released: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture) -> None:
    from speechgpt_app import loaders

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli.main(["convert"]) == 1
    err = capsys.readouterr().err
    cache = tmp_path / "hf" / "speechgpt"
    assert loaders.RELEASED["mhubert"].url in err and str(cache / "mhubert_base_vp_en_es_fr_it3.pt") in err

    # files put by hand where the message says: converted once, then reused
    cache.mkdir(parents=True)
    for key, src in released.items():
        key = "mhubert" if key == "hubert" else key
        (cache / loaders.RELEASED[key].filename).write_bytes(src.read_bytes())
    assert cli.main(["convert"]) == 0
    speech = Path(capsys.readouterr().out.strip())
    assert speech == loaders.PRESETS["speechgpt-7b"].speech_dir and (speech / "speech.json").is_file()
    from speechgpt_app.units import read_speech_config

    assert read_speech_config(speech).features["layer"] == 11  # the released units: fairseq output_layer=11
    hashes = json.loads((cache / "hashes.json").read_text())
    assert set(hashes["files"]) == {f.filename for f in loaders.RELEASED.values()}

    def no_second_conversion(*a: object, **k: object) -> None:
        raise AssertionError("converted twice")

    monkeypatch.setattr("speechgpt_app.loaders.write_speech_dir", no_second_conversion)
    assert cli.main(["convert"]) == 0
    assert Path(capsys.readouterr().out.strip()) == speech


def test_configure_parser_lists_the_file_options() -> None:
    from speechgpt_app.loaders import configure_parser  # the convert command (it may download)

    p = argparse.ArgumentParser()
    configure_parser(p)
    ns = p.parse_args(["--hubert", "a", "--vocoder-config", "b"])
    assert ns.hubert == Path("a") and ns.vocoder_config == Path("b") and ns.layer == 11
