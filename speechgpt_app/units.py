"""Speech to discrete units: features -> nearest k-means centre -> dedup -> "<sosp><N>...<eosp>".

A speech directory (`bundle/speech/`) holds everything this module needs:

    speech.json           SpeechConfig: schema_version, sample_rate, n_units, features
    centres.safetensors   "centres": float32 [n_units, dim]
    features/             (hubert only) a transformers HubertModel saved with save_pretrained

Three feature types exist. `hubert` is what the released SpeechGPT uses: the layer-11 hidden states of
mHuBERT base, one utterance at a time, long audio in chunks of 1,600,000 samples. `logmel` is a small,
weight-free extractor (log-mel frames at 50 Hz) for small models trained here. `ctc` is the unit encoder
of SpeechGPT-tiny: a small Transformer over log-mel frames trained with CTC on phonemes; its units are
its greedy CTC output (repeats collapsed, blanks dropped), so it has no centres: the same text spoken by
two voices gives (nearly) the same units. Its weights are `features/encoder.safetensors`.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, Union

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from speechgpt_app.audio import SAMPLE_RATE

SOSP = "<sosp>"
EOSP = "<eosp>"

# 2 added features.normalize (hubert); a version-1 speech.json reads as normalize = false.
SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)
SPEECH_JSON = "speech.json"
CENTRES_FILE = "centres.safetensors"
CENTRES_KEY = "centres"
FEATURES_DIR = "features"  # the HubertModel's save_pretrained directory, inside the speech dir

# The released system: mHuBERT layer 11 (1-based, fairseq's output_layer), chunks of 100 s at 16 kHz,
# raw waveforms. `normalize` (a checkpoint whose task set normalize=True, e.g. HuBERT large): the whole
# utterance is layer-normalised before chunking, as fairseq's feature reader does.
HUBERT_DEFAULTS: dict[str, Any] = {"type": "hubert", "layer": 11, "chunk_samples": 1_600_000, "normalize": False}
# Small models: 80 mel bands up to Nyquist, 64 ms windows, hop 320 samples = 20 ms = 50 frames/s at
# 16 kHz, the same frame rate as HuBERT, so unit rates and the vocoder's hop (320) agree.
LOGMEL_DEFAULTS: dict[str, Any] = {
    "type": "logmel",
    "n_mels": 80,
    "n_fft": 1024,
    "win_length": 1024,
    "hop_length": 320,
    "f_min": 0.0,
    "f_max": 8000.0,
}
# The `ctc` unit encoder: log-mel at 100 Hz (25 ms windows), per-utterance mean/variance normalisation,
# a stride-2 conv to 50 Hz, `layers` Transformer layers of width `width`, a linear head over the
# n_units phoneme units + 1 blank (the last class). `symbols` names the units (documentation only).
CTC_DEFAULTS: dict[str, Any] = {
    "type": "ctc",
    "n_mels": 80,
    "n_fft": 512,
    "win_length": 400,
    "hop_length": 160,
    "width": 144,
    "layers": 4,
    "heads": 4,
    "ffn": 576,
    "symbols": [],
}
_DEFAULTS = {"hubert": HUBERT_DEFAULTS, "logmel": LOGMEL_DEFAULTS, "ctc": CTC_DEFAULTS}
ENCODER_FILE = "encoder.safetensors"  # the ctc encoder's weights, in features/

LOG_FLOOR = 1e-5  # log-mel floor (amplitude): keeps log() finite on digital silence
DISTANCE_BLOCK_ELEMENTS = 1 << 22  # float64 distances per block (32 MiB): bounds peak memory

Wave = Union[np.ndarray, torch.Tensor]


# ---------------------------------------------------------------------------------------------------
# The unit-string format
# ---------------------------------------------------------------------------------------------------

# One token with optional whitespace before it. Unit numbers are canonical (no leading zeros), since
# only "<0>".."<999>" exist in the vocabulary.
_TOKEN = re.compile(r"\s*<(sosp|eosp|0|[1-9][0-9]*)>")


def units_to_text(ids: Iterable[int]) -> str:
    """Write unit ids as the model reads them: "<sosp><661><588><eosp>" (no spaces)."""
    if isinstance(ids, (torch.Tensor, np.ndarray)):
        ids = ids.tolist()
    body = []
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or i < 0:
            raise ValueError(f"unit ids must be non-negative integers, got {i!r}")
        body.append(f"<{int(i)}>")
    return SOSP + "".join(body) + EOSP


def text_to_units(text: str, n_units: int | None = None) -> list[int]:
    """Read a unit string back into ids.

    Whitespace between tokens is tolerated ("<sosp> <661> <588> <eosp>", as old slow tokenizers
    decode added tokens); anything else that is not exactly `<sosp>`, `<N>`..., `<eosp>` raises a
    ValueError saying where it went wrong. With `n_units`, ids must also be below it.
    """
    tokens: list[str] = []
    pos = 0
    while (m := _TOKEN.match(text, pos)) is not None:
        tokens.append(m.group(1))
        pos = m.end()
    if text[pos:].strip():
        raise ValueError(
            f"not a unit string: unexpected {text[pos:pos + 20]!r} at character {pos}; "
            f"expected {SOSP}<N>...{EOSP}"
        )
    if len(tokens) < 2 or tokens[0] != "sosp" or tokens[-1] != "eosp":
        raise ValueError(f"a unit string must start with {SOSP} and end with {EOSP}: {text[:40]!r}")
    body = tokens[1:-1]
    if "sosp" in body or "eosp" in body:
        raise ValueError(f"a unit string holds one {SOSP}...{EOSP} span, found a nested marker: {text[:40]!r}")
    ids = [int(t) for t in body]
    if n_units is not None and any(i >= n_units for i in ids):
        bad = next(i for i in ids if i >= n_units)
        raise ValueError(f"unit <{bad}> is out of range: this model has {n_units} units (0..{n_units - 1})")
    return ids


def dedup(ids: Iterable[int]) -> list[int]:
    """Collapse runs of the same unit: 5 5 5 9 9 5 -> 5 9 5."""
    return [int(k) for k, _ in itertools.groupby(ids)]


# ---------------------------------------------------------------------------------------------------
# speech.json and centres.safetensors
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class SpeechConfig:
    """The contents of `speech/speech.json`.

    `features` is a dict whose "type" is "hubert", "logmel" or "ctc"; keys it leaves out take the values
    in HUBERT_DEFAULTS / LOGMEL_DEFAULTS / CTC_DEFAULTS, unknown keys are an error (usually typos).
    """

    schema_version: int = SCHEMA_VERSION
    sample_rate: int = SAMPLE_RATE
    n_units: int
    features: dict[str, Any] = field(default_factory=lambda: dict(HUBERT_DEFAULTS))

    def __post_init__(self) -> None:
        if self.schema_version not in READABLE_SCHEMA_VERSIONS:
            raise ValueError(
                f"speech.json has schema_version {self.schema_version}; this version of speechgpt_app "
                f"reads schema_version {' and '.join(map(str, READABLE_SCHEMA_VERSIONS))}"
            )
        if self.sample_rate != SAMPLE_RATE:
            # Every input path (audio.load_audio) delivers 16 kHz; a different rate would be misread.
            raise ValueError(f"speech.json sample_rate is {self.sample_rate}; only {SAMPLE_RATE} Hz is supported")
        if not _is_int(self.n_units) or self.n_units < 1:
            raise ValueError(f"n_units must be a positive integer, got {self.n_units!r}")
        object.__setattr__(self, "features", _complete_features(self.features))

    @property
    def feature_type(self) -> str:
        """"hubert", "logmel" or "ctc"."""
        return self.features["type"]

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form written to speech.json."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpeechConfig:
        """Build from parsed speech.json, refusing unknown keys."""
        known = {"schema_version", "sample_rate", "n_units", "features"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"speech.json has unknown keys {unknown}; expected {sorted(known)}")
        if "n_units" not in data or "features" not in data:
            raise ValueError("speech.json must give n_units and features")
        return cls(**data)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _complete_features(features: dict[str, Any]) -> dict[str, Any]:
    """Validate a features dict and fill the keys it leaves out from the type's defaults."""
    if not isinstance(features, dict) or features.get("type") not in _DEFAULTS:
        raise ValueError(f"features must be a dict with type 'hubert', 'logmel' or 'ctc', got {features!r}")
    defaults = _DEFAULTS[features["type"]]
    unknown = sorted(set(features) - set(defaults))
    if unknown:
        raise ValueError(f"unknown {features['type']} feature keys {unknown}; expected {sorted(defaults)}")
    full = {**defaults, **features}
    for key, default in defaults.items():
        value = full[key]
        if key == "type":
            continue
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ValueError(f"features.{key} must be true or false, got {value!r}")
            continue
        if isinstance(default, int) and not (_is_int(value) and value > 0):
            raise ValueError(f"features.{key} must be a positive integer, got {value!r}")
        if isinstance(default, list) and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise ValueError(f"features.{key} must be a list of strings, got {value!r}")
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if isinstance(default, float) and not (is_number and math.isfinite(value) and value >= 0):
            raise ValueError(f"features.{key} must be a non-negative number, got {value!r}")
    return full


def read_speech_config(speech_dir: str | Path) -> SpeechConfig:
    """Read `speech_dir/speech.json`."""
    path = Path(speech_dir) / SPEECH_JSON
    if not path.is_file():
        raise FileNotFoundError(f"no {SPEECH_JSON} in {speech_dir}: not a speech directory")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return SpeechConfig.from_dict(data)


def write_speech_config(speech_dir: str | Path, config: SpeechConfig) -> Path:
    """Write `speech_dir/speech.json` (creating the directory) and return its path."""
    path = Path(speech_dir) / SPEECH_JSON
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")
    return path


def save_centres(speech_dir: str | Path, centres: np.ndarray | torch.Tensor) -> Path:
    """Write k-means centres (float32 [n_units, dim]) to `speech_dir/centres.safetensors`."""
    tensor = torch.as_tensor(np.asarray(centres) if not isinstance(centres, torch.Tensor) else centres)
    _check_centres(tensor)
    path = Path(speech_dir) / CENTRES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({CENTRES_KEY: tensor.detach().to("cpu", torch.float32).contiguous()}, str(path))
    return path


def load_centres(speech_dir: str | Path) -> torch.Tensor:
    """Read `speech_dir/centres.safetensors` -> float32 [n_units, dim]."""
    path = Path(speech_dir) / CENTRES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CENTRES_FILE} in {speech_dir}")
    tensors = load_file(str(path))
    if CENTRES_KEY not in tensors:
        raise ValueError(f"{path} has no {CENTRES_KEY!r} tensor (found {sorted(tensors)})")
    centres = tensors[CENTRES_KEY]
    _check_centres(centres)
    return centres.to(torch.float32)


def _check_centres(centres: torch.Tensor) -> None:
    if centres.ndim != 2 or centres.shape[0] < 1 or centres.shape[1] < 1:
        raise ValueError(f"centres must be a 2-D [n_units, dim] array, got shape {tuple(centres.shape)}")
    if not centres.is_floating_point() or not torch.isfinite(centres).all():
        raise ValueError("centres must be finite floating-point numbers")


# ---------------------------------------------------------------------------------------------------
# Feature extractors
# ---------------------------------------------------------------------------------------------------


class FeatureExtractor(Protocol):
    """Turns a mono 16 kHz float32 waveform into frames."""

    dim: int  # feature size per frame
    frame_rate: float  # frames per second

    def __call__(self, wav: torch.Tensor) -> torch.Tensor:
        """float32 [N] -> float32 [T, dim]."""
        ...

    def save(self, speech_dir: Path) -> None:
        """Write the extractor's weights, if it has any, into the speech directory."""
        ...


class HubertFeatures:
    """Layer-`layer` outputs of a transformers HubertModel: fairseq's `extract_features(...,
    output_layer=layer)` as fairseq's feature reader calls it (simple_kmeans/dump_hubert_feature.py).

    Why this equals fairseq: both run the conv stack (GroupNorm over the whole time axis in the first
    layer, or a LayerNorm in every layer for extractor_mode=layer_norm), LayerNorm + projection, add the
    weight-normed conv positional embedding, then the transformer layers. A post-LN model (mHuBERT base)
    applies the encoder LayerNorm before the first layer; a pre-LN model (layer_norm_first, HuBERT large
    and xlarge) applies it after the last one, and fairseq, stopping at `output_layer`, never applies it.
    So the output of layer `layer` itself is read (a forward hook), never `last_hidden_state`, which a
    pre-LN model has normalised. Layers past `layer` are dropped for speed. (fairseq may zero-pad the
    frame axis to a multiple of 2 with a key padding mask; masked keys contribute nothing, so the result
    agrees to float rounding.) With `normalize`, the whole utterance is layer-normalised first, before
    any chunking, as the reader does for a task with normalize=True.
    """

    def __init__(
        self,
        model: Any,
        layer: int,
        chunk_samples: int = HUBERT_DEFAULTS["chunk_samples"],
        device: str | torch.device = "cpu",
        normalize: bool = HUBERT_DEFAULTS["normalize"],
    ) -> None:
        config = model.config
        if not (_is_int(layer) and 1 <= layer <= config.num_hidden_layers):
            raise ValueError(f"layer must be in 1..{config.num_hidden_layers}, got {layer!r}")
        if not (_is_int(chunk_samples) and chunk_samples > 0):
            raise ValueError(f"chunk_samples must be a positive integer, got {chunk_samples!r}")
        # Layers past `layer` never influence its output: drop them (and say so in the config, so that
        # save() writes a self-consistent model).
        model.encoder.layers = model.encoder.layers[:layer]
        config.num_hidden_layers = layer
        self.device = torch.device(device)
        self.model = model.to(self.device, torch.float32).eval()
        self.layer = layer
        self.chunk_samples = chunk_samples
        self.normalize = normalize
        self.dim = int(config.hidden_size)
        self.hop = math.prod(config.conv_stride)
        self.frame_rate = SAMPLE_RATE / self.hop
        self.receptive_field = _receptive_field(config.conv_kernel, config.conv_stride)
        # The hook's output is per thread: with the language model on a server, turns (threads) share
        # this extractor, and a hook runs in the thread that called the model.
        self._layer_output = threading.local()
        self.model.encoder.layers[-1].register_forward_hook(self._keep_output)

    def _keep_output(self, module: Any, args: Any, output: Any) -> None:
        self._layer_output.value = output[0] if isinstance(output, tuple) else output

    @classmethod
    def from_pretrained(
        cls,
        features_dir: str | Path,
        layer: int,
        chunk_samples: int = HUBERT_DEFAULTS["chunk_samples"],
        device: str | torch.device = "cpu",
        normalize: bool = HUBERT_DEFAULTS["normalize"],
    ) -> HubertFeatures:
        """Load a HubertModel saved with `save_pretrained` (config.json + model.safetensors)."""
        from transformers import HubertModel

        features_dir = Path(features_dir)
        if not (features_dir / "config.json").is_file():
            raise FileNotFoundError(
                f"no HuBERT model in {features_dir} (expected config.json and model.safetensors "
                "written by save_pretrained; `python -m speechgpt_app convert` builds it)"
            )
        model = HubertModel.from_pretrained(features_dir, dtype=torch.float32)
        return cls(model, layer=layer, chunk_samples=chunk_samples, device=device, normalize=normalize)

    def __call__(self, wav: torch.Tensor) -> torch.Tensor:
        """float32 [N] at 16 kHz -> [T, dim] on the CPU; one utterance, chunk by chunk."""
        if wav.shape[0] < self.receptive_field:
            raise ValueError(
                f"audio of {wav.shape[0]} samples is shorter than one HuBERT frame ({self.receptive_field} samples)"
            )
        outputs = []
        with torch.inference_mode():
            if self.normalize:
                wav = torch.nn.functional.layer_norm(wav.to(torch.float32), wav.shape)
            for chunk in torch.split(wav, self.chunk_samples):
                # A tail shorter than the conv stack's receptive field yields no whole frame.
                if chunk.shape[0] < self.receptive_field:
                    continue
                self._layer_output.value = None
                self.model(chunk[None].to(self.device, torch.float32))
                assert self._layer_output.value is not None  # set by the hook on layer `layer`
                outputs.append(self._layer_output.value[0].cpu())
                self._layer_output.value = None
        return torch.cat(outputs)

    def save(self, speech_dir: Path) -> None:
        """Write the (truncated) model to `speech_dir/features/`."""
        self.model.save_pretrained(Path(speech_dir) / FEATURES_DIR)


def _receptive_field(kernels: Sequence[int], strides: Sequence[int]) -> int:
    """Input samples one output frame of a conv stack sees (400 for HuBERT's 7 layers)."""
    field_ = 1
    for kernel, stride in zip(reversed(kernels), reversed(strides)):
        field_ = (field_ - 1) * stride + kernel
    return field_


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float, f_max: float) -> torch.Tensor:
    """Slaney-style mel filters (librosa's default: Slaney mel scale, area-normalised), [n_mels, n_fft//2+1]."""

    def hz_to_mel(hz: np.ndarray) -> np.ndarray:
        # Linear below 1 kHz (200/3 Hz per mel), logarithmic above.
        linear = hz / (200.0 / 3)
        log = 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) / (np.log(6.4) / 27.0)
        return np.where(hz >= 1000.0, log, linear)

    def mel_to_hz(mel: np.ndarray) -> np.ndarray:
        linear = mel * (200.0 / 3)
        log = 1000.0 * np.exp((np.log(6.4) / 27.0) * (mel - 15.0))
        return np.where(mel >= 15.0, log, linear)

    fft_hz = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(np.array(f_min)), hz_to_mel(np.array(f_max)), n_mels + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (fft_hz[None] - lower) / (centre - lower)
    falling = (upper - fft_hz[None]) / (upper - centre)
    weights = np.maximum(0.0, np.minimum(rising, falling)) * (2.0 / (upper - lower))
    return torch.from_numpy(weights.astype(np.float32))


class LogMelFeatures:
    """Log-mel frames in pure torch: |STFT| (Hann window) -> Slaney mel filters -> log(max(x, 1e-5)).

    Frame t is centred on sample 320 t + 160 (the middle of its hop), the signal is zero-padded by
    (n_fft - hop) / 2 on each side, and there are exactly floor(N / hop_length) frames: 5 s at 16 kHz
    -> 250 frames, like HuBERT's 50 Hz.
    """

    def __init__(
        self,
        n_mels: int = LOGMEL_DEFAULTS["n_mels"],
        n_fft: int = LOGMEL_DEFAULTS["n_fft"],
        win_length: int = LOGMEL_DEFAULTS["win_length"],
        hop_length: int = LOGMEL_DEFAULTS["hop_length"],
        f_min: float = LOGMEL_DEFAULTS["f_min"],
        f_max: float = LOGMEL_DEFAULTS["f_max"],
        sample_rate: int = SAMPLE_RATE,
    ) -> None:
        if not (hop_length <= n_fft and win_length <= n_fft):
            raise ValueError(f"need hop_length <= n_fft and win_length <= n_fft, got {hop_length}, {win_length}, {n_fft}")
        if not (0.0 <= f_min < f_max <= sample_rate / 2):
            raise ValueError(f"need 0 <= f_min < f_max <= {sample_rate / 2} Hz, got {f_min}, {f_max}")
        self.n_fft, self.win_length, self.hop = n_fft, win_length, hop_length
        self.dim = n_mels
        self.frame_rate = sample_rate / hop_length
        self.window = torch.hann_window(win_length, periodic=True)
        self.filters = mel_filterbank(sample_rate, n_fft, n_mels, f_min, f_max)

    def __call__(self, wav: torch.Tensor) -> torch.Tensor:
        """float32 [N] -> [floor(N / hop), n_mels]."""
        if wav.shape[0] < self.hop:
            raise ValueError(f"audio of {wav.shape[0]} samples is shorter than one frame ({self.hop} samples)")
        left = (self.n_fft - self.hop) // 2
        right = self.n_fft - self.hop - left  # so that frames = floor(N / hop) exactly
        padded = torch.nn.functional.pad(wav.to(torch.float32), (left, right))
        with torch.inference_mode():
            spec = torch.stft(
                padded,
                self.n_fft,
                hop_length=self.hop,
                win_length=self.win_length,
                window=self.window,
                center=False,
                return_complex=True,
            ).abs()
            mel = self.filters @ spec
            return torch.log(torch.clamp(mel, min=LOG_FLOOR)).T.contiguous()

    def save(self, speech_dir: Path) -> None:
        """Nothing to write: a log-mel extractor has no weights (its settings live in speech.json)."""


class _ConvPosition(torch.nn.Module):
    """Relative position by a depthwise convolution over time (as wav2vec 2.0), so any length works."""

    def __init__(self, width: int, kernel: int = 31) -> None:
        super().__init__()
        self.conv = torch.nn.Conv1d(width, width, kernel, padding=kernel // 2, groups=width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.nn.functional.gelu(self.conv(x.transpose(1, 2))).transpose(1, 2)


class CTCEncoderNet(torch.nn.Module):
    """Normalised log-mel [B, T, n_mels] at 100 Hz -> logits [B, ceil(T / 2), n_units + 1] at 50 Hz."""

    def __init__(self, n_mels: int, n_units: int, width: int, layers: int, heads: int, ffn: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.subsample = torch.nn.Sequential(
            torch.nn.Conv1d(n_mels, width, 5, stride=2, padding=2), torch.nn.GELU(),
            torch.nn.Conv1d(width, width, 3, padding=1), torch.nn.GELU(),
        )  # fmt: skip
        self.position = _ConvPosition(width)
        layer = torch.nn.TransformerEncoderLayer(width, heads, ffn, dropout, activation="gelu", batch_first=True, norm_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, n_units + 1)

    def forward(self, mel: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`padding_mask` [B, T_out] is True on padded output frames (training batches only)."""
        x = self.subsample(mel.transpose(1, 2)).transpose(1, 2)
        x = self.encoder(self.position(x), src_key_padding_mask=padding_mask)
        return self.head(self.norm(x))


# The `ctc` encoder normalises each utterance by its own mean and variance, so a long silence at an edge
# (a microphone left running, the second of silence that ends an auto-stopped recording) shifts every
# frame and changes what is heard ("what day comes after friday" + 1 s of silence was heard as "what month
# comes after february"). Its training recordings' edge silences are at most 0.36 s (200 measured, 40 dB
# below the loudest 10 ms): `encode` cuts longer ones to this.
EDGE_SILENCE_KEEP_S = 0.4
EDGE_SILENCE_DB = 40.0  # a 10-ms frame this far below the loudest one is silence


def trim_edge_silence(wav: torch.Tensor, keep_s: float = EDGE_SILENCE_KEEP_S, below_db: float = EDGE_SILENCE_DB) -> torch.Tensor:
    """`wav` (16 kHz) with leading and trailing silence cut to at most `keep_s` seconds each."""
    hop = SAMPLE_RATE // 100
    n = len(wav) // hop
    if n == 0:
        return wav
    level = 10 * torch.log10(wav[: n * hop].reshape(n, hop).pow(2).mean(1) + 1e-12)
    loud = torch.nonzero(level > level.max() - below_db).flatten()
    keep = int(keep_s * SAMPLE_RATE)
    return wav[max(0, int(loud[0]) * hop - keep) : min(len(wav), (int(loud[-1]) + 1) * hop + keep)]


def normalise_frames(mel: torch.Tensor) -> torch.Tensor:
    """Per-utterance mean and variance normalisation over time: removes a fixed channel and level."""
    return (mel - mel.mean(0, keepdim=True)) / (mel.std(0, keepdim=True) + 1e-5)


class CTCUnitEncoder:
    """The `ctc` feature type: waveform -> CTC logits [T, n_units + 1] (the blank is the last class).

    `SpeechTokenizer` turns the logits into units by greedy CTC decoding (best class per frame, repeats collapsed, blanks dropped).
    """

    def __init__(self, net: CTCEncoderNet, features: dict[str, Any], n_units: int) -> None:
        self.net = net.eval()
        self.n_units = n_units
        self.blank = n_units
        self.dim = n_units + 1
        self.mel = LogMelFeatures(*(features[k] for k in ("n_mels", "n_fft", "win_length", "hop_length")))
        self.frame_rate = self.mel.frame_rate / 2
        self.features = features

    @classmethod
    def build(cls, features: dict[str, Any], n_units: int, dropout: float = 0.0) -> CTCUnitEncoder:
        """A freshly initialised encoder (training starts here)."""
        f = {**CTC_DEFAULTS, **features}
        net = CTCEncoderNet(f["n_mels"], n_units, f["width"], f["layers"], f["heads"], f["ffn"], dropout)
        return cls(net, f, n_units)

    @classmethod
    def from_dir(cls, speech_dir: str | Path, config: SpeechConfig) -> CTCUnitEncoder:
        """Load `features/encoder.safetensors` for the settings in speech.json."""
        path = Path(speech_dir) / FEATURES_DIR / ENCODER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no unit encoder weights {path}")
        enc = cls.build(config.features, config.n_units)
        enc.net.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
        return enc

    def frames(self, wav: torch.Tensor) -> torch.Tensor:
        """The normalised log-mel frames the network reads: [T, n_mels] at 100 Hz."""
        return normalise_frames(self.mel(wav))

    def __call__(self, wav: torch.Tensor) -> torch.Tensor:
        """float32 [N] -> logits [T, n_units + 1] at 50 Hz."""
        with torch.inference_mode():
            return self.net(self.frames(wav)[None])[0]

    def save(self, speech_dir: Path) -> None:
        """Write the weights to `speech_dir/features/encoder.safetensors` (float16, computed in float32)."""
        out = Path(speech_dir) / FEATURES_DIR
        out.mkdir(parents=True, exist_ok=True)
        weights = {k: v.detach().to(torch.float16).contiguous() for k, v in self.net.state_dict().items()}
        save_file(weights, str(out / ENCODER_FILE))



def extractor_from_config(
    config: SpeechConfig, speech_dir: str | Path, device: str | torch.device = "cpu"
) -> FeatureExtractor:
    """Build the feature extractor speech.json describes (HuBERT runs on `device`; log-mel on the CPU)."""
    params = {k: v for k, v in config.features.items() if k != "type"}
    if config.feature_type == "hubert":
        return HubertFeatures.from_pretrained(Path(speech_dir) / FEATURES_DIR, device=device, **params)
    if config.feature_type == "ctc":
        return CTCUnitEncoder.from_dir(speech_dir, config)
    return LogMelFeatures(sample_rate=config.sample_rate, **params)


# ---------------------------------------------------------------------------------------------------
# Quantisation
# ---------------------------------------------------------------------------------------------------


def nearest_centre(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centre (squared Euclidean) for each row of x: [T, D], [K, D] -> long [T].

    Ranks centres by |c|^2 - 2 x.c (|x|^2 is the same for every centre of a row) computed in
    float64, in blocks of frames. In float32 this shortcut cancels badly far from the origin and can
    pick the wrong centre of two nearly equidistant ones; in float64 its error (~1e-16 |x||c|) is far
    below float32's own precision, so it agrees with the exact sum((x - c)^2) wherever the float32
    inputs can tell the centres apart (the tests check it against a float64 brute force), while
    running ~10x faster than materialising x - c. Ties go to the lowest index (as numpy's argmin).
    """
    if x.ndim != 2 or centres.ndim != 2 or x.shape[1] != centres.shape[1]:
        raise ValueError(f"shape mismatch: frames {tuple(x.shape)} vs centres {tuple(centres.shape)}")
    with torch.no_grad():  # not inference_mode: k-means edits the result in place
        c64 = centres.to(torch.float64)
        c_sq = c64.square().sum(1)
        block = max(1, DISTANCE_BLOCK_ELEMENTS // c64.shape[0])
        out = torch.empty(x.shape[0], dtype=torch.long)
        for start in range(0, x.shape[0], block):
            xb = x[start : start + block].to(torch.float64)
            out[start : start + block] = (c_sq - 2 * xb @ c64.T).argmin(1)
    return out


def kmeans(features: torch.Tensor, k: int, iters: int = 50, seed: int = 0) -> torch.Tensor:
    """Seeded k-means (k-means++ init, Lloyd iterations) -> float32 centres [k, D].

    An empty cluster is re-seeded with the point farthest from its centre, so k centres always come
    back. Stops early when assignments stop changing.
    """
    x = torch.as_tensor(features).to(torch.float32)
    if x.ndim != 2 or not (_is_int(k) and 1 <= k <= x.shape[0]):
        raise ValueError(f"need [N, D] features with N >= k >= 1, got shape {tuple(x.shape)} and k={k!r}")
    if not torch.isfinite(x).all():
        raise ValueError("features must be finite")
    gen = torch.Generator().manual_seed(seed)
    centres = _kmeans_plus_plus(x, k, gen)
    assign = None
    for _ in range(iters):
        new_assign = nearest_centre(x, centres)
        if assign is not None and torch.equal(new_assign, assign):
            break
        assign = new_assign
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        centres = sums / counts.clamp(min=1)[:, None].to(torch.float32)
        for empty in torch.nonzero(counts == 0).flatten().tolist():
            dist = (x - centres[assign]).square().sum(1)
            far = int(dist.argmax())
            centres[empty] = x[far]
            assign[far] = empty
    return centres


def _kmeans_plus_plus(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++: each next centre drawn with probability proportional to squared distance."""
    first = int(torch.randint(x.shape[0], (1,), generator=gen))
    centres = [x[first]]
    d2 = (x - x[first]).square().sum(1)
    for _ in range(1, k):
        total = d2.sum()
        if total > 0:
            idx = int(torch.multinomial(d2 / total, 1, generator=gen))
        else:  # every point sits on a centre already (duplicates): any point will do
            idx = int(torch.randint(x.shape[0], (1,), generator=gen))
        centres.append(x[idx])
        d2 = torch.minimum(d2, (x - x[idx]).square().sum(1))
    return torch.stack(centres)


# ---------------------------------------------------------------------------------------------------
# The tokenizer
# ---------------------------------------------------------------------------------------------------


class SpeechTokenizer:
    """Waveform (float32, mono, 16 kHz, as audio.load_audio returns) -> speech units."""

    def __init__(self, config: SpeechConfig, extractor: FeatureExtractor, centres: np.ndarray | torch.Tensor | None) -> None:
        if config.feature_type == "ctc":
            # Units are the encoder's greedy CTC output: no centres.
            if centres is not None:
                raise ValueError("a ctc speech tokenizer has no centres")
        else:
            centres = torch.as_tensor(centres).to(torch.float32)
            _check_centres(centres)
            if tuple(centres.shape) != (config.n_units, extractor.dim):
                raise ValueError(
                    f"centres have shape {tuple(centres.shape)}, expected (n_units={config.n_units}, "
                    f"feature dim={extractor.dim})"
                )
        self.config = config
        self.extractor = extractor
        self.centres = centres

    @classmethod
    def from_dir(cls, speech_dir: str | Path, device: str | torch.device = "cpu") -> SpeechTokenizer:
        """Load speech.json, the centres and the feature extractor from a speech directory.

        `device` is where a HuBERT extractor runs; features come back to the CPU, where the nearest
        centre is found (a few milliseconds per second of speech).
        """
        config = read_speech_config(speech_dir)
        centres = None if config.feature_type == "ctc" else load_centres(speech_dir)
        return cls(config, extractor_from_config(config, speech_dir, device), centres)

    def save(self, speech_dir: str | Path) -> None:
        """Write speech.json, centres.safetensors and the extractor's weights (if any)."""
        speech_dir = Path(speech_dir)
        write_speech_config(speech_dir, self.config)
        if self.centres is not None:
            save_centres(speech_dir, self.centres)
        self.extractor.save(speech_dir)

    @property
    def n_units(self) -> int:
        """Number of distinct units (k-means centres)."""
        return self.config.n_units

    @property
    def sample_rate(self) -> int:
        """The rate the waveform must have (16 kHz)."""
        return self.config.sample_rate

    def features(self, wav: Wave) -> torch.Tensor:
        """Feature frames [T, dim] of one utterance."""
        return self.extractor(_as_wave_tensor(wav))

    def encode_frames(self, wav: Wave) -> list[int]:
        """One unit per feature frame (not deduplicated); for `ctc`, the best class per frame, the blank
        (= n_units) included."""
        if self.centres is None:
            return self.features(wav).argmax(-1).tolist()
        return nearest_centre(self.features(wav), self.centres).tolist()

    def encode(self, wav: Wave) -> list[int]:
        """Deduplicated units, the form the language model reads (for `ctc`: greedy CTC, no blanks, long
        edge silences cut first: `trim_edge_silence`)."""
        if self.centres is None:
            frames = self.encode_frames(trim_edge_silence(_as_wave_tensor(wav)))
            return [k for k in dedup(frames) if k != self.n_units]
        return dedup(self.encode_frames(wav))

    def encode_text(self, wav: Wave) -> str:
        """The unit string "<sosp><N>...<eosp>" of a waveform."""
        return units_to_text(self.encode(wav))


def _as_wave_tensor(wav: Wave) -> torch.Tensor:
    """A 1-D float32 tensor view of a waveform, refusing what is not one."""
    tensor = torch.from_numpy(np.ascontiguousarray(wav)) if isinstance(wav, np.ndarray) else wav
    if not isinstance(tensor, torch.Tensor) or tensor.ndim != 1 or not tensor.is_floating_point():
        raise ValueError("expected a mono float waveform (1-D float array); use audio.load_audio to read files")
    if not torch.isfinite(tensor).all():
        raise ValueError("the waveform holds NaN or infinite samples")
    return tensor.to(torch.float32)
