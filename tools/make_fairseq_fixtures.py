"""Record fairseq's own outputs for tiny random models: the fixtures of tests/test_fairseq_exactness.py.

The test proves that speechgpt_app (which never imports fairseq) reads fairseq's checkpoint files and
computes the same features, units and waveforms as fairseq itself. This script is the fairseq side:
it builds small random models with NON-default sizes (so a converter that assumes mHuBERT-base or the
released vocoder's shapes fails), saves them exactly as fairseq and scikit-learn save theirs, and
records what fairseq computes from them.

It runs in a separate, dev-only venv (fairseq is never a dependency of the app, its tests or CI):

    python3.11 -m venv /tmp/fsenv
    /tmp/fsenv/bin/pip install torch==2.13.0 numpy cython setuptools wheel \
        scikit-learn joblib soundfile soxr safetensors    # torch from the local CPU wheel
    /tmp/fsenv/bin/pip install --no-build-isolation fairseq-fixed==0.12.3.1   # builds in 4-7 min
    /tmp/fsenv/bin/pip uninstall -y torchaudio   # pulled in by fairseq; does not import with CPU torch

    /tmp/fsenv/bin/python tools/make_fairseq_fixtures.py [--out tests/fixtures/fairseq]

(fairseq 0.12.2 does not install on Python 3.11; fairseq-fixed 0.12.3.1 is a fork of fairseq main made to
install on Python 3.11+.) It takes about half a minute on 2 cores and writes, into --out:

    hubert_tiny.pt           fairseq HubertModel checkpoint written by fairseq's Trainer.save_checkpoint:
                             {"cfg" (plain dict), "model", "task_state" (fairseq Dictionary objects),
                             "optimizer_history", "extra_state", ...}; 3 post-LN layers, 96 dims,
                             4 heads, FFN 192, a 5-layer conv stack of 64 channels (total stride 320),
                             conv_pos 16 / 4 groups, group-norm extractor
    hubert_tiny_L2_km50.bin  scikit-learn MiniBatchKMeans (50 clusters) fit on layer-2 features, joblib.dump
    hubert_preln.pt          the same sizes in HuBERT large's recipe: layer-norm conv extractor, pre-LN
                             layers (layer_norm_first), task.normalize=true
    hubert_preln_outputs.safetensors  its features (inputs layer-normalised whole, as fairseq's reader
                             does) and chunked reads
    vocoder/g_00000100       CodeHiFiGAN generator, torch.save({"generator": state_dict}), legacy
                             weight-norm keys; upsample rates 8,5,4,2 (hop 320), 2 resblock kernels
    vocoder/config.json      its fairseq/speech-resynthesis config
    inputs.safetensors       the exact 16 kHz mono float32 waveforms fed to fairseq
    hubert_outputs.safetensors  features at output_layer 2 and 3 (the last), layer 2 read in 20,000-sample
                             slices, units, deduplicated units
    vocoder_outputs.safetensors unit sequences, predicted durations, waveforms with/without dur_prediction
    MANIFEST.json            versions, seeds, settings, and every file's sha256 and what it holds

Everything is seeded; rerunning writes identical files on the same library versions.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import math
import os
import platform
import sys
from pathlib import Path

# fairseq sets the root logger to DEBUG when imported: configure logging first, so its chatter
# (model configs, "loaded checkpoint ...") stays at WARNING.
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

import joblib  # noqa: E402
import numpy as np  # noqa: E402
import sklearn  # noqa: E402
import soundfile as sf  # noqa: E402
import soxr  # noqa: E402
import torch  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402
from sklearn.cluster import MiniBatchKMeans  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO.parent / "shared" / "samples"
DEFAULT_OUT = REPO / "tests" / "fixtures" / "fairseq"
FORCE_FULL_UNPICKLE = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"  # torch's switch back to weights_only=False

SAMPLE_RATE = 16_000  # Hz, what HuBERT reads
SEED = 20_230_511  # one seed for every random choice below (models, perturbation, noise, k-means)

# Real recordings: (fixture name, file), trimmed to TRIM_SECONDS after resampling to keep fixtures small.
REAL_INPUTS = (("lj", "LJ050-0131.wav"), ("jfk", "jfk.flac"))
TRIM_SECONDS = 4.0
NOISE_SAMPLES = 24_321  # not a multiple of 320, and an odd frame count (fairseq pads frames to even)
NOISE_RMS = 0.1
CHIRP_SECONDS = 2.0
CHIRP_HZ = (100.0, 4_000.0)  # linear sweep, start and end frequency
CHIRP_AMPLITUDE = 0.5

# HuBERT: fairseq hydra overrides ("+group=name" picks a registered dataclass). Every size differs from
# mHuBERT base (12 layers, 768 dims, 12 heads, FFN 3072, 7 conv layers of 512, conv_pos 128/16).
HUBERT_LAYERS = 3
UNIT_LAYER = 2  # fairseq output_layer (1-based) the k-means is fit on; < HUBERT_LAYERS on purpose
# The reference reads long audio in slices of 1,600,000 samples; a small slice shows the same seams on
# these short inputs (every slice, the last included, is longer than the conv stack's 345-sample field).
CHUNK_SAMPLES = 20_000
FEATURE_LAYERS = (UNIT_LAYER, HUBERT_LAYERS)  # record an inner layer and the last one
CONV_FEATURE_LAYERS = "[(64,10,5)] + [(64,8,4)] + [(64,4,4)] + [(64,2,2)] * 2"  # strides 5*4*4*2*2 = 320
HUBERT_OVERRIDES = (
    "+task=hubert_pretraining",
    "task.data=tiny_hubert_data",  # never read: the dictionaries are handed to the task directly
    "task.labels=[km]",
    "task.label_rate=50",
    "task.sample_rate=16000",
    "task.normalize=false",  # as mHuBERT: raw waveforms, no per-utterance normalisation
    "+model=hubert",
    f"model.encoder_layers={HUBERT_LAYERS}",
    "model.encoder_embed_dim=96",
    "model.encoder_ffn_embed_dim=192",
    "model.encoder_attention_heads=4",
    f"model.conv_feature_layers='{CONV_FEATURE_LAYERS}'",
    "model.conv_pos=16",
    "model.conv_pos_groups=4",
    "model.extractor_mode=default",
    "model.layer_norm_first=false",
    "model.final_dim=32",
    "+criterion=hubert",
    "criterion.pred_masked_weight=1.0",
    "criterion.pred_nomask_weight=0.0",
    "criterion.loss_weights=[10]",
    "+optimizer=adam",
    "optimizer.adam_betas='(0.9,0.98)'",
    "optimizer.adam_eps=1e-06",
    "optimizer.weight_decay=0.01",
    "+lr_scheduler=polynomial_decay",
    "lr_scheduler.warmup_updates=32000",
    "lr_scheduler.total_num_update=400000",
    "optimization.max_update=400000",
    "optimization.lr=[0.0005]",
    "common.cpu=true",
    f"common.seed={SEED}",
    "distributed_training.distributed_world_size=1",
    "checkpoint.save_dir=checkpoints",
)
# The HuBERT large/xlarge recipe on the same small sizes: a layer-norm conv extractor, pre-LN layers
# (fairseq never applies their final LayerNorm at an output_layer) and a task reading layer-normalised
# waveforms (normalize=true). Recorded after everything else, so the other fixtures do not change.
PRELN_OVERRIDES = tuple(
    {"task.normalize=false": "task.normalize=true", "model.extractor_mode=default": "model.extractor_mode=layer_norm",
     "model.layer_norm_first=false": "model.layer_norm_first=true"}.get(o, o)
    for o in HUBERT_OVERRIDES
)  # fmt: skip
FFN_WEIGHT_SCALE = 6.0  # see widen_encoder
ATTENTION_WEIGHT_SCALE = 3.0

# k-means: scikit-learn MiniBatchKMeans as fairseq's examples/hubert/simple_kmeans/learn_kmeans.py
# sets it up, with a non-default cluster count and fewer restarts (tiny data).
N_UNITS = 50
KMEANS_PARAMS = dict(
    n_clusters=N_UNITS,
    init="k-means++",
    max_iter=100,
    batch_size=10_000,
    compute_labels=False,
    tol=0.0,
    max_no_improvement=100,
    init_size=None,
    n_init=5,
    reassignment_ratio=0.0,
    random_state=SEED,
)
# A frame whose two nearest centres are this close (in squared distance, relative) could flip under
# float rounding in another implementation; the generator refuses such fixtures.
MIN_UNIT_MARGIN = 1e-3

# Vocoder: fairseq's CodeHiFiGAN with sizes unlike the released one (5,4,4,2,2 / 512 ch / 3 kernels).
VOCODER_CONFIG = {
    "resblock": "1",
    "upsample_rates": [8, 5, 4, 2],
    "upsample_kernel_sizes": [16, 11, 8, 4],
    "upsample_initial_channel": 64,
    "resblock_kernel_sizes": [3, 5],
    "resblock_dilation_sizes": [[1, 3, 5], [1, 2, 4]],
    "num_embeddings": N_UNITS,
    "embedding_dim": 32,
    "model_in_dim": 32,
    "dur_predictor_params": {
        "encoder_embed_dim": 32,
        "var_pred_hidden_dim": 32,
        "var_pred_kernel_size": 3,
        "var_pred_dropout": 0.5,
    },
    # Training and mel settings the network ignores, present as in speech-resynthesis configs.
    "segment_size": 8960,
    "code_hop_size": 320,
    "sampling_rate": 16000,
    "num_mels": 80,
    "num_freq": 1025,
    "n_fft": 1024,
    "hop_size": 256,
    "win_size": 1024,
    "fmin": 0,
    "fmax": 8000,
    "fmax_for_loss": None,
    "batch_size": 16,
    "learning_rate": 0.0002,
    "adam_b1": 0.8,
    "adam_b2": 0.99,
    "lr_decay": 0.999,
    "seed": SEED,
    "dur_prediction_weight": 1.0,
    "num_workers": 4,
}
VOCODER_CHECKPOINT = "g_00000100"
# Durations whose exp(log_dur) - 1 lies this close to a rounding boundary (x.5) could round the other
# way under float rounding in another implementation; the generator refuses such fixtures.
MIN_DURATION_MARGIN = 1e-4  # float32 rounding differences are ~1e-6 here
VOCODER_LJ_UNITS = 48  # the first deduplicated LJ units form one vocoder input


# ---------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------


def load_real(path: Path) -> np.ndarray:
    """A recording as 16 kHz mono float32: average the channels, resample with soxr, trim."""
    wav, rate = sf.read(path, dtype="float32", always_2d=True)
    mono = wav.mean(axis=1)
    if rate != SAMPLE_RATE:
        mono = soxr.resample(mono, rate, SAMPLE_RATE)
    return np.ascontiguousarray(mono[: int(TRIM_SECONDS * SAMPLE_RATE)], dtype=np.float32)


def make_inputs(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The waveforms fed to fairseq: both real samples, seeded noise, and a chirp."""
    inputs = {name: load_real(SAMPLES / file) for name, file in REAL_INPUTS}
    inputs["noise"] = (NOISE_RMS * rng.standard_normal(NOISE_SAMPLES)).astype(np.float32)
    t = np.arange(int(CHIRP_SECONDS * SAMPLE_RATE)) / SAMPLE_RATE
    f0, f1 = CHIRP_HZ
    phase = 2 * math.pi * (f0 * t + (f1 - f0) * t**2 / (2 * CHIRP_SECONDS))
    inputs["chirp"] = (CHIRP_AMPLITUDE * np.sin(phase)).astype(np.float32)
    return inputs


# ---------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def perturb(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Move every parameter away from its initial value.

    Norm layers start at weight 1 / bias 0 and biases at 0: a converter that dropped or swapped them
    would go unnoticed. Each parameter gets Gaussian noise of 20 % of its own spread (0.1 where it has
    none).
    """
    for _, p in sorted(module.named_parameters()):
        spread = float(p.std()) if p.numel() > 1 else 0.0
        scale = 0.2 * spread if spread > 1e-6 else 0.1
        p.add_(torch.randn(p.shape, generator=gen) * scale)


@torch.no_grad()
def widen_encoder(model) -> None:
    """Scale the transformer layers' weights from fairseq's BERT init (std 0.02) towards a trained model's.

    At init the FFN pre-activations have std ~0.2, where exact GELU and its tanh approximation differ
    by 1.5e-5 at the output: less than the test's tolerance, so a wrong GELU would pass. Scaled, they
    differ by ~1e-3, and the attention logits are no longer almost uniform.
    """
    for layer in model.encoder.layers:
        for linear in (layer.fc1, layer.fc2):
            linear.weight.mul_(FFN_WEIGHT_SCALE)
        attn = layer.self_attn
        for linear in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj):
            linear.weight.mul_(ATTENTION_WEIGHT_SCALE)


def hubert_cfg(overrides: tuple[str, ...] = HUBERT_OVERRIDES):
    """fairseq's full training config, composed by hydra exactly as fairseq-hydra-train does."""
    from fairseq.dataclass.initialize import add_defaults, hydra_init
    from fairseq.dataclass.utils import omegaconf_no_object_check
    from hydra import compose, initialize
    from omegaconf import OmegaConf

    # The primary config is FairseqConfig from hydra's ConfigStore (hydra_init puts it there, and
    # register_task/register_model add the groups); fairseq's own config.yaml is hydra-1.0 style.
    hydra_init("config")
    with initialize(version_base=None, config_path=None):
        cfg = compose("config", overrides=list(overrides))
    add_defaults(cfg)
    with omegaconf_no_object_check():
        cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    OmegaConf.set_struct(cfg, True)
    return cfg


def save_hubert(path: Path, gen: torch.Generator, overrides: tuple[str, ...] = HUBERT_OVERRIDES) -> None:
    """Build a tiny random HubertModel and save it through fairseq's Trainer.save_checkpoint."""
    from fairseq import tasks
    from fairseq.data import Dictionary
    from fairseq.trainer import Trainer

    cfg = hubert_cfg(overrides)
    task = tasks.setup_task(cfg.task)
    # What HubertPretrainingTask.load_dictionaries would read from dict.km.txt: the k-means labels.
    dictionary = Dictionary()
    for unit in range(N_UNITS):
        dictionary.add_symbol(str(unit), n=1000 + unit)
    task.load_state_dict({"dictionaries": [dictionary]})
    model = task.build_model(cfg.model)
    perturb(model, gen)
    widen_encoder(model)
    criterion = task.build_criterion(cfg.criterion)
    trainer = Trainer(cfg, task, model, criterion)
    path.parent.mkdir(parents=True, exist_ok=True)
    trainer.consolidate_optimizer()  # as fairseq.checkpoint_utils.save_checkpoint does before saving
    # The wall-clock training time would make every run's bytes differ; this run trained for 0 s.
    trainer.save_checkpoint(str(path), {"previous_training_time": 0.0})


def load_hubert(path: Path):
    """Load the checkpoint back the way fairseq's dump_hubert_feature.py does."""
    from fairseq import checkpoint_utils

    # fairseq calls torch.load without weights_only, which torch >= 2.6 turns into weights_only=True;
    # the checkpoint holds fairseq Dictionary objects. This script wrote the file a moment ago, so a
    # full unpickle is safe here (the app never does this: it uses convert's allow-list unpickler).
    previous = os.environ.get(FORCE_FULL_UNPICKLE)
    os.environ[FORCE_FULL_UNPICKLE] = "1"
    try:
        (model,), _, _ = checkpoint_utils.load_model_ensemble_and_task([str(path)])
    finally:
        if previous is None:
            del os.environ[FORCE_FULL_UNPICKLE]
        else:
            os.environ[FORCE_FULL_UNPICKLE] = previous
    return model.eval()


@torch.no_grad()
def hubert_features(model, wav: np.ndarray, layer: int) -> np.ndarray:
    """fairseq's extract_features(output_layer=layer) of one utterance, no padding mask -> [T, D]."""
    source = torch.from_numpy(wav)[None]
    feats, _ = model.extract_features(source=source, padding_mask=None, mask=False, output_layer=layer)
    return feats[0].numpy().astype(np.float32)


def task_normalised(wav: np.ndarray) -> np.ndarray:
    """What HubertFeatureReader.get_feats feeds the model when the task set normalize=True: the whole
    utterance layer-normalised (F.layer_norm over its full length) before any slicing."""
    x = torch.from_numpy(wav).float()
    return torch.nn.functional.layer_norm(x, x.shape).numpy()


@torch.no_grad()
def hubert_features_chunked(model, wav: np.ndarray, layer: int, max_chunk: int) -> np.ndarray:
    """As fairseq's HubertFeatureReader.get_feats (examples/hubert/simple_kmeans): each max_chunk slice
    of the waveform goes through the model on its own and the frames are concatenated."""
    source = torch.from_numpy(wav)[None]
    chunks = []
    for start in range(0, source.size(1), max_chunk):
        feats, _ = model.extract_features(
            source=source[:, start : start + max_chunk], padding_mask=None, mask=False, output_layer=layer
        )
        chunks.append(feats[0])
    return torch.cat(chunks).numpy().astype(np.float32)


def fit_kmeans(path: Path, features: list[np.ndarray]) -> MiniBatchKMeans:
    """Fit MiniBatchKMeans on all layer-UNIT_LAYER frames and joblib.dump it (fairseq's recipe)."""
    km = MiniBatchKMeans(**KMEANS_PARAMS).fit(np.concatenate(features))
    joblib.dump(km, path)
    return km


def unit_margin(features: np.ndarray, centres: np.ndarray) -> float:
    """Smallest relative gap between the nearest and second-nearest centre over all frames (float64)."""
    d = ((features.astype(np.float64)[:, None, :] - centres.astype(np.float64)[None]) ** 2).sum(-1)
    d.sort(axis=1)
    return float(((d[:, 1] - d[:, 0]) / np.maximum(d[:, 1], 1e-12)).min())


def dedup(units: np.ndarray) -> np.ndarray:
    """Collapse runs of the same unit."""
    return np.array([k for k, _ in itertools.groupby(units.tolist())], dtype=np.int64)


def save_vocoder(folder: Path, gen: torch.Generator) -> Path:
    """Build a tiny random CodeHiFiGAN generator and save it as speech-resynthesis does."""
    from fairseq.models.text_to_speech.codehifigan import CodeGenerator

    model = CodeGenerator(VOCODER_CONFIG)
    perturb(model, gen)
    with torch.no_grad():
        # Centre the predicted log-durations on log(1 + 1) so that durations of 1 to ~8 frames occur.
        model.dur_predictor.proj.bias.fill_(math.log(2.0))
        # The random generator's output is tiny (std ~0.02); scale the last conv so the waveform
        # varies over tanh's curved range and a mistake anywhere upstream shows.
        model.conv_post.weight_g.mul_(15.0)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(VOCODER_CONFIG, indent=4) + "\n", encoding="utf-8")
    path = folder / VOCODER_CHECKPOINT
    torch.save({"generator": model.state_dict()}, path)
    return path


def load_vocoder(path: Path):
    """fairseq's CodeHiFiGANVocoder: loads {"generator": sd}, eval(), removes weight norm."""
    from fairseq.models.text_to_speech.vocoder import CodeHiFiGANVocoder

    return CodeHiFiGANVocoder(str(path), VOCODER_CONFIG)


@torch.no_grad()
def vocode(vocoder, units: np.ndarray) -> dict[str, np.ndarray]:
    """Durations and waveforms fairseq computes for one unit sequence."""
    code = torch.from_numpy(units)[None]
    generator = vocoder.model
    x = generator.dict(code)  # [1, T, C]
    log_dur = generator.dur_predictor(x)
    raw = torch.exp(log_dur) - 1
    durations = torch.clamp(torch.round(raw).long(), min=1)[0]
    # Distance to the nearest rounding boundary (k + 0.5). Boundaries below 1.5 do not matter: the clamp
    # turns both 0 and 1 into 1.
    margin = (raw - raw.floor() - 0.5).abs()[raw > 1.0]
    return {
        "units": units,
        "durations": durations.numpy().astype(np.int64),
        "wav_dur": vocoder({"code": code.clone()}, dur_prediction=True).numpy().astype(np.float32),
        "wav_nodur": vocoder({"code": code.clone()}, dur_prediction=False).numpy().astype(np.float32),
        "margin": np.array(float(margin.min()) if margin.numel() else 0.5),
    }


# ---------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------


def sha256(path: Path) -> str:
    """Hex sha256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> None:
    """Build the models, record fairseq's outputs, write the fixtures and MANIFEST.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="fixture directory (default: %(default)s)")
    out: Path = parser.parse_args(argv).out
    out.mkdir(parents=True, exist_ok=True)

    import fairseq

    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    rng = np.random.default_rng(SEED)
    gen = torch.Generator().manual_seed(SEED)

    inputs = make_inputs(rng)
    save_file(inputs, str(out / "inputs.safetensors"))

    # HuBERT -> features -> k-means -> units.
    hubert_path = out / "hubert_tiny.pt"
    save_hubert(hubert_path, gen)
    hubert = load_hubert(hubert_path)
    features = {
        (name, layer): hubert_features(hubert, wav, layer) for name, wav in inputs.items() for layer in FEATURE_LAYERS
    }
    km_path = out / f"hubert_tiny_L{UNIT_LAYER}_km{N_UNITS}.bin"
    km = fit_kmeans(km_path, [features[name, UNIT_LAYER] for name in inputs])
    hubert_out: dict[str, np.ndarray] = {}
    margins = {}
    for name in inputs:
        for layer in FEATURE_LAYERS:
            hubert_out[f"{name}.layer{layer}"] = features[name, layer]
        hubert_out[f"{name}.layer{UNIT_LAYER}.chunked"] = hubert_features_chunked(
            hubert, inputs[name], UNIT_LAYER, CHUNK_SAMPLES
        )
        frames = features[name, UNIT_LAYER]
        units = km.predict(frames).astype(np.int64)
        exact = ((frames[:, None, :].astype(np.float64) - km.cluster_centers_[None]) ** 2).sum(-1).argmin(1)
        if not np.array_equal(units, exact):
            sys.exit(f"{name}: scikit-learn's predict disagrees with the exact nearest centre")
        margins[name] = unit_margin(frames, km.cluster_centers_)
        if margins[name] < MIN_UNIT_MARGIN:
            sys.exit(f"{name}: a frame is within {margins[name]:.2e} of a k-means tie; change SEED")
        hubert_out[f"{name}.units"] = units
        hubert_out[f"{name}.dedup"] = dedup(units)
    save_file(hubert_out, str(out / "hubert_outputs.safetensors"))

    # Vocoder on real units (from LJ), seeded random units, a short sequence with a repeat, one unit.
    vocoder_path = save_vocoder(out / "vocoder", gen)
    vocoder = load_vocoder(vocoder_path)
    sequences = {
        "lj": hubert_out["lj.dedup"][:VOCODER_LJ_UNITS],
        "random": rng.integers(0, N_UNITS, 30).astype(np.int64),
        "short": np.array([7, 7, 3], dtype=np.int64),
        "single": np.array([N_UNITS - 1], dtype=np.int64),
    }
    vocoder_out: dict[str, np.ndarray] = {}
    vocoder_info = {}
    for name, units in sequences.items():
        rec = vocode(vocoder, units)
        if float(rec["margin"]) < MIN_DURATION_MARGIN:
            sys.exit(f"{name}: a predicted duration is within {float(rec['margin']):.2e} of a rounding boundary")
        vocoder_info[name] = {
            "n_units": len(units),
            "frames_with_durations": int(rec["durations"].sum()),
            "min_duration_rounding_margin": round(float(rec["margin"]), 6),
            "wav_dur_rms": round(float(np.sqrt(np.mean(rec["wav_dur"] ** 2))), 6),
        }
        for key in ("units", "durations", "wav_dur", "wav_nodur"):
            vocoder_out[f"{name}.{key}"] = rec[key]
    save_file(vocoder_out, str(out / "vocoder_outputs.safetensors"))

    # HuBERT large's recipe, small: features of the normalised waveform (units follow from features:
    # a k-means fit on another model's features sits too close to ties here to record them).
    preln_path = out / "hubert_preln.pt"
    save_hubert(preln_path, gen, PRELN_OVERRIDES)
    preln = load_hubert(preln_path)
    preln_out: dict[str, np.ndarray] = {}
    for name, wav in inputs.items():
        normed = task_normalised(wav)
        for layer in FEATURE_LAYERS:
            preln_out[f"{name}.layer{layer}"] = hubert_features(preln, normed, layer)
        preln_out[f"{name}.layer{UNIT_LAYER}.chunked"] = hubert_features_chunked(preln, normed, UNIT_LAYER, CHUNK_SAMPLES)
    save_file(preln_out, str(out / "hubert_preln_outputs.safetensors"))

    holds = {
        "inputs.safetensors": "float32 16 kHz mono waveforms fed to fairseq, keys "
        + ", ".join(inputs)
        + f"; lj/jfk: soundfile + channel mean + soxr.resample (HQ), first {TRIM_SECONDS} s",
        hubert_path.name: "fairseq HubertModel checkpoint saved by fairseq.trainer.Trainer.save_checkpoint "
        "(cfg as a plain dict, model, task_state with fairseq Dictionary objects, optimizer_history, ...)",
        km_path.name: f"sklearn MiniBatchKMeans ({N_UNITS} clusters) fit on output_layer={UNIT_LAYER} "
        "features of all inputs, saved with joblib.dump",
        "hubert_outputs.safetensors": "<input>.layer<L>: float32 [T, D] fairseq extract_features("
        f"output_layer=L) for L in {list(FEATURE_LAYERS)}; <input>.layer{UNIT_LAYER}.chunked: the same, "
        f"read in slices of {CHUNK_SAMPLES} samples as HubertFeatureReader does; <input>.units: int64 [T] "
        f"km.predict of layer {UNIT_LAYER}; <input>.dedup: int64 runs collapsed",
        preln_path.name: "the same kind of checkpoint, HuBERT large's recipe on the small sizes: "
        "extractor_mode=layer_norm, layer_norm_first=true, task.normalize=true",
        "hubert_preln_outputs.safetensors": "as hubert_outputs.safetensors for hubert_preln.pt, every input "
        "layer-normalised over its whole length first (HubertFeatureReader with normalize=True)",
        f"vocoder/{VOCODER_CHECKPOINT}": 'fairseq CodeGenerator state dict, torch.save({"generator": sd}), '
        "legacy weight-norm keys (weight_g / weight_v)",
        "vocoder/config.json": "the vocoder's config (fairseq/speech-resynthesis fields)",
        "vocoder_outputs.safetensors": "<seq>.units int64 [T]; <seq>.durations int64 [T] (fairseq duration "
        "predictor: clamp(round(exp(log_dur) - 1), 1)); <seq>.wav_dur / <seq>.wav_nodur: float32 "
        "CodeHiFiGANVocoder output with dur_prediction=True / False",
    }
    manifest = {
        "generator": "tools/make_fairseq_fixtures.py",
        "versions": {
            "python": platform.python_version(),
            "fairseq": fairseq.__version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "scikit-learn": sklearn.__version__,
            "joblib": joblib.__version__,
            "soxr": soxr.__version__,
            "soundfile": sf.__version__,
        },
        "seeds": {"everything": SEED},
        "hubert": {
            "overrides": list(HUBERT_OVERRIDES),
            "preln_overrides": list(PRELN_OVERRIDES),
            "feature_layers": list(FEATURE_LAYERS),
            "unit_layer": UNIT_LAYER,
            "chunk_samples": CHUNK_SAMPLES,
            "frames": {name: int(features[name, UNIT_LAYER].shape[0]) for name in inputs},
            "input_samples": {name: int(wav.shape[0]) for name, wav in inputs.items()},
        },
        "kmeans": {
            "params": dict(KMEANS_PARAMS),
            "min_relative_margin": {k: round(v, 6) for k, v in margins.items()},
        },
        "vocoder": {"checkpoint": VOCODER_CHECKPOINT, "sequences": vocoder_info},
        "files": {
            name: {"sha256": sha256(out / name), "bytes": (out / name).stat().st_size, "holds": text}
            for name, text in sorted(holds.items())
        },
    }
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    total = sum(f["bytes"] for f in manifest["files"].values())
    print(f"wrote {len(holds)} fixtures ({total / 1e6:.2f} MB) and MANIFEST.json to {out}")


if __name__ == "__main__":
    main()
