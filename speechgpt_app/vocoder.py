"""Units -> speech: fairseq's unit HiFi-GAN ("CodeHiFiGAN") with its duration predictor.

The math and the module/parameter names are fairseq's (`fairseq/models/text_to_speech/
codehifigan.py`, `hifigan.py`, `VariancePredictor` in `fastspeech2.py`), so the released
`g_00500000` state dict (`{"generator": sd}`, legacy weight-norm `weight_g`/`weight_v` keys)
loads with `strict=True`. Weight norm is removed after loading, as fairseq's
`CodeHiFiGANVocoder` does.

Streaming (`Vocoder.stream()`) decodes overlapping windows and keeps only the audio whose
whole receptive field has been seen, so any chunking gives the same samples as one
`decode()` of the utterance (up to float rounding).
"""

from __future__ import annotations

import bisect
import json
import math
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from speechgpt_app import spectral_vocoder

CONFIG_FILE = "config.json"  # fairseq's vocoder config, kept byte-for-byte as released
WEIGHTS_FILE = "model.safetensors"  # the generator state dict with the released key names
VOCODER_SUBDIR = "vocoder"  # where a speech directory keeps its vocoder
LRELU_SLOPE = 0.1  # leaky ReLU slope inside the generator (fairseq's LRELU_SLOPE)
POST_LRELU_SLOPE = 0.01  # fairseq calls F.leaky_relu(x) with the default slope before conv_post
EDGE_KERNEL = 7  # conv_pre and conv_post kernel size (fixed in fairseq, padding 3)

# The released unit HiFi-GAN's network settings (REFERENCE.md section 5): ~13.5 M parameters, 1000
# units, hop 5*4*4*2*2 = 320 samples at 16 kHz. For building one at the released size (tests, benchmarks).
RELEASED_CONFIG: dict[str, Any] = {
    "resblock": "1",
    "upsample_rates": [5, 4, 4, 2, 2],
    "upsample_kernel_sizes": [11, 8, 8, 4, 4],
    "upsample_initial_channel": 512,
    "resblock_kernel_sizes": [3, 7, 11],
    "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
    "num_embeddings": 1000,
    "embedding_dim": 128,
    "model_in_dim": 128,
    "dur_predictor_params": {
        "encoder_embed_dim": 128,
        "var_pred_hidden_dim": 128,
        "var_pred_kernel_size": 3,
        "var_pred_dropout": 0.5,
    },
    "sampling_rate": 16000,
    "code_hop_size": 320,
}

# Fields this module reads from config.json; every other key is kept untouched in `extra`.
_KNOWN_FIELDS = (
    "upsample_rates",
    "upsample_kernel_sizes",
    "upsample_initial_channel",
    "resblock_kernel_sizes",
    "resblock_dilation_sizes",
    "num_embeddings",
    "embedding_dim",
    "model_in_dim",
    "dur_predictor_params",
    "sampling_rate",
    "code_hop_size",
    "resblock",
)


class VocoderError(ValueError):
    """A vocoder config, checkpoint or input that cannot be used, with the reason."""


@dataclass(frozen=True)
class DurationPredictorParams:
    """fairseq's `dur_predictor_params` (the VariancePredictor's arguments)."""

    encoder_embed_dim: int
    var_pred_hidden_dim: int
    var_pred_kernel_size: int
    var_pred_dropout: float


@dataclass(frozen=True)
class VocoderConfig:
    """The fields of fairseq's unit HiFi-GAN `config.json` that define the network.

    Keys the network does not use (training settings, mel settings, ...) are kept in `extra`
    so `to_dict()` gives back everything that was read.
    """

    upsample_rates: tuple[int, ...]
    upsample_kernel_sizes: tuple[int, ...]
    upsample_initial_channel: int
    resblock_kernel_sizes: tuple[int, ...]
    resblock_dilation_sizes: tuple[tuple[int, ...], ...]
    num_embeddings: int
    embedding_dim: int
    model_in_dim: int
    sampling_rate: int
    code_hop_size: int
    dur_predictor_params: DurationPredictorParams | None = None
    resblock: str = "1"
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        self._validate()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> VocoderConfig:
        """Build from a parsed fairseq config; unknown keys go to `extra` unchanged."""
        missing = [k for k in _KNOWN_FIELDS if k not in d and k not in ("dur_predictor_params", "resblock")]
        if missing:
            raise VocoderError(f"vocoder config lacks the field(s) {', '.join(missing)}")
        dp = d.get("dur_predictor_params")
        try:
            return cls(
                upsample_rates=tuple(int(u) for u in d["upsample_rates"]),
                upsample_kernel_sizes=tuple(int(k) for k in d["upsample_kernel_sizes"]),
                upsample_initial_channel=int(d["upsample_initial_channel"]),
                resblock_kernel_sizes=tuple(int(k) for k in d["resblock_kernel_sizes"]),
                resblock_dilation_sizes=tuple(tuple(int(x) for x in ds) for ds in d["resblock_dilation_sizes"]),
                num_embeddings=int(d["num_embeddings"]),
                embedding_dim=int(d["embedding_dim"]),
                model_in_dim=int(d["model_in_dim"]),
                sampling_rate=int(d["sampling_rate"]),
                code_hop_size=int(d["code_hop_size"]),
                dur_predictor_params=DurationPredictorParams(**dp) if dp else None,
                resblock=str(d.get("resblock", "1")),
                extra={k: v for k, v in d.items() if k not in _KNOWN_FIELDS},
            )
        except VocoderError:
            raise
        except (TypeError, ValueError) as e:
            raise VocoderError(f"vocoder config has a field of the wrong type: {e}") from e

    @classmethod
    def from_json(cls, path: str | Path) -> VocoderConfig:
        """Read fairseq's `config.json`."""
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict[str, Any]:
        """The config as fairseq's JSON fields (plus the untouched extra keys)."""
        d: dict[str, Any] = dict(self.extra)
        d.update(
            upsample_rates=list(self.upsample_rates),
            upsample_kernel_sizes=list(self.upsample_kernel_sizes),
            upsample_initial_channel=self.upsample_initial_channel,
            resblock_kernel_sizes=list(self.resblock_kernel_sizes),
            resblock_dilation_sizes=[list(ds) for ds in self.resblock_dilation_sizes],
            num_embeddings=self.num_embeddings,
            embedding_dim=self.embedding_dim,
            model_in_dim=self.model_in_dim,
            sampling_rate=self.sampling_rate,
            code_hop_size=self.code_hop_size,
            resblock=self.resblock,
        )
        if self.dur_predictor_params is not None:
            d["dur_predictor_params"] = dict(vars(self.dur_predictor_params))
        return d

    @property
    def hop(self) -> int:
        """Output samples per unit frame: the product of the upsample rates."""
        return math.prod(self.upsample_rates)

    def _validate(self) -> None:
        # Everything below is a setting fairseq would accept but that breaks the length rules
        # this module promises (T frames -> T * hop samples), or a feature we do not implement.
        if self.resblock != "1":
            raise VocoderError(f"resblock type {self.resblock!r} is not supported (fairseq's CodeHiFiGAN uses '1')")
        if len(self.upsample_rates) != len(self.upsample_kernel_sizes) or not self.upsample_rates:
            raise VocoderError("upsample_rates and upsample_kernel_sizes must be non-empty and of equal length")
        for u, k in zip(self.upsample_rates, self.upsample_kernel_sizes):
            if u < 1 or k < u or (k - u) % 2:
                raise VocoderError(
                    f"upsample rate {u} with kernel {k}: need kernel >= rate and an even difference, "
                    "otherwise the output is not exactly rate x input long"
                )
        if len(self.resblock_kernel_sizes) != len(self.resblock_dilation_sizes):
            raise VocoderError("resblock_kernel_sizes and resblock_dilation_sizes must have equal length")
        if any(k % 2 == 0 for k in self.resblock_kernel_sizes):
            raise VocoderError(f"resblock kernel sizes must be odd, got {list(self.resblock_kernel_sizes)}")
        if any(len(ds) != 3 for ds in self.resblock_dilation_sizes):
            raise VocoderError("each resblock (type '1') takes exactly three dilations")
        if self.upsample_initial_channel % (2 ** len(self.upsample_rates)):
            raise VocoderError("upsample_initial_channel must halve evenly at every upsampling stage")
        if self.model_in_dim != self.embedding_dim:
            raise VocoderError(
                f"model_in_dim {self.model_in_dim} != embedding_dim {self.embedding_dim}: vocoders "
                "conditioned on f0 or speakers are not supported"
            )
        if self.extra.get("f0") or self.extra.get("multispkr") or self.extra.get("embedder_params"):
            raise VocoderError("vocoders conditioned on f0 or speakers are not supported")
        if self.code_hop_size != self.hop:
            raise VocoderError(
                f"code_hop_size {self.code_hop_size} != product of upsample_rates {self.hop}"
            )
        dp = self.dur_predictor_params
        if dp is not None:
            if dp.encoder_embed_dim != self.embedding_dim:
                raise VocoderError("dur_predictor_params.encoder_embed_dim must equal embedding_dim")
            if dp.var_pred_kernel_size != 3:
                # fairseq pads the predictor's second conv by exactly 1, so only kernel 3 keeps
                # one duration per unit.
                raise VocoderError("dur_predictor_params.var_pred_kernel_size must be 3 (as in fairseq)")


def _padding(kernel: int, dilation: int = 1) -> int:
    """'Same' padding of an odd kernel with dilation."""
    return (kernel * dilation - dilation) // 2


class ResBlock(nn.Module):
    """HiFi-GAN ResBlock1: three (dilated conv, conv) pairs with leaky ReLUs and residuals."""

    def __init__(self, channels: int, kernel_size: int, dilation: tuple[int, ...]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(
            weight_norm(nn.Conv1d(channels, channels, kernel_size, 1, dilation=d, padding=_padding(kernel_size, d)))
            for d in dilation
        )
        self.convs2 = nn.ModuleList(
            weight_norm(nn.Conv1d(channels, channels, kernel_size, 1, dilation=1, padding=_padding(kernel_size)))
            for _ in dilation
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c1, c2 in zip(self.convs1, self.convs2):
            xt = c2(F.leaky_relu(c1(F.leaky_relu(x, LRELU_SLOPE)), LRELU_SLOPE))
            x = xt + x
        return x


class VariancePredictor(nn.Module):
    """fairseq's FastSpeech2 VariancePredictor: log-duration of each unit (B x T x C -> B x T)."""

    def __init__(self, p: DurationPredictorParams) -> None:
        super().__init__()
        k = p.var_pred_kernel_size
        self.conv1 = nn.Sequential(
            nn.Conv1d(p.encoder_embed_dim, p.var_pred_hidden_dim, kernel_size=k, padding=(k - 1) // 2), nn.ReLU()
        )
        self.ln1 = nn.LayerNorm(p.var_pred_hidden_dim)
        # fairseq's FairseqDropout is inactive at inference; nn.Dropout in eval mode is too.
        self.dropout_module = nn.Dropout(p.var_pred_dropout)
        self.conv2 = nn.Sequential(
            nn.Conv1d(p.var_pred_hidden_dim, p.var_pred_hidden_dim, kernel_size=k, padding=1), nn.ReLU()
        )
        self.ln2 = nn.LayerNorm(p.var_pred_hidden_dim)
        self.proj = nn.Linear(p.var_pred_hidden_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x.transpose(1, 2)).transpose(1, 2)
        x = self.dropout_module(self.ln1(x))
        x = self.conv2(x.transpose(1, 2)).transpose(1, 2)
        x = self.dropout_module(self.ln2(x))
        return self.proj(x).squeeze(dim=2)

    @property
    def radius(self) -> int:
        """Units of context each side that one log-duration depends on (two convs)."""
        return sum((conv[0].kernel_size[0] - 1) // 2 for conv in (self.conv1, self.conv2))


class CodeHiFiGAN(nn.Module):
    """fairseq's CodeGenerator: unit embedding, optional duration predictor, HiFi-GAN generator.

    Built with weight norm (so the released legacy `weight_g`/`weight_v` keys load); call
    `remove_weight_norm()` after loading, as fairseq does.
    """

    def __init__(self, cfg: VocoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_kernels = len(cfg.resblock_kernel_sizes)
        self.num_upsamples = len(cfg.upsample_rates)
        ch0 = cfg.upsample_initial_channel
        pad = _padding(EDGE_KERNEL)
        self.conv_pre = weight_norm(nn.Conv1d(cfg.model_in_dim, ch0, EDGE_KERNEL, 1, padding=pad))
        self.ups = nn.ModuleList(
            weight_norm(nn.ConvTranspose1d(ch0 // 2**i, ch0 // 2 ** (i + 1), k, u, padding=(k - u) // 2))
            for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes))
        )
        self.resblocks = nn.ModuleList(
            ResBlock(ch0 // 2 ** (i + 1), k, d)
            for i in range(self.num_upsamples)
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes)
        )
        self.conv_post = weight_norm(nn.Conv1d(ch0 // 2**self.num_upsamples, 1, EDGE_KERNEL, 1, padding=pad))
        self.dict = nn.Embedding(cfg.num_embeddings, cfg.embedding_dim)
        self.dur_predictor = VariancePredictor(cfg.dur_predictor_params) if cfg.dur_predictor_params else None

    def embed(self, code: torch.Tensor) -> torch.Tensor:
        """Unit ids (1 x T) -> embeddings (1 x C x T)."""
        return self.dict(code).transpose(1, 2)

    def durations(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings (1 x C x T) -> frames per unit (1 x T, long), at least 1 each."""
        if self.dur_predictor is None:
            raise VocoderError("this vocoder has no duration predictor (config lacks dur_predictor_params)")
        log_dur = self.dur_predictor(x.transpose(1, 2))
        return torch.clamp(torch.round(torch.exp(log_dur) - 1).long(), min=1)

    def generate(self, x: torch.Tensor) -> torch.Tensor:
        """Frame features (1 x C x T) -> waveform (1 x 1 x T*hop) in [-1, 1]."""
        x = self.conv_pre(x)
        for i in range(self.num_upsamples):
            x = self.ups[i](F.leaky_relu(x, LRELU_SLOPE))
            blocks = self.resblocks[i * self.num_kernels : (i + 1) * self.num_kernels]
            xs = blocks[0](x)
            for block in blocks[1:]:
                xs = xs + block(x)
            x = xs / self.num_kernels
        x = self.conv_post(F.leaky_relu(x, POST_LRELU_SLOPE))
        return torch.tanh(x)

    def forward(self, code: torch.Tensor, dur_prediction: bool = False) -> torch.Tensor:
        """Unit ids (1 x T) -> waveform (1 x 1 x samples), as fairseq's CodeGenerator."""
        x = self.embed(code)
        if dur_prediction:
            x = torch.repeat_interleave(x, self.durations(x).view(-1), dim=2)
        return self.generate(x)

    def generator_context(self) -> tuple[int, int]:
        """Frames of context (left, right) that one output frame depends on, exactly.

        Walks the generator backwards from the samples of output frame 0: conv_post widens the
        interval by its padding; per stage, the widest ResBlock widens it by the sum of its
        convolutions' reaches, and the transposed conv maps output samples [a, b] to the inputs
        n with 0 <= t + padding - n * rate < kernel for some t in [a, b]; conv_pre widens it last.
        """
        edge = _padding(EDGE_KERNEL)
        lo, hi = -edge, self.cfg.hop - 1 + edge
        for u, k in reversed(list(zip(self.cfg.upsample_rates, self.cfg.upsample_kernel_sizes))):
            reach = max(
                sum(_padding(rk, d) + _padding(rk) for d in ds)
                for rk, ds in zip(self.cfg.resblock_kernel_sizes, self.cfg.resblock_dilation_sizes)
            )
            pad = (k - u) // 2
            lo = math.ceil((lo - reach + pad - k + 1) / u)
            hi = math.floor((hi + reach + pad) / u)
        return -(lo - edge), hi + edge

    def legacy_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict with fairseq's legacy weight-norm names (`weight_g`, `weight_v`)."""
        out = {}
        for key, value in self.state_dict().items():
            key = key.replace("parametrizations.weight.original0", "weight_g")
            key = key.replace("parametrizations.weight.original1", "weight_v")
            out[key] = value
        return out

    def check_state_dict(self, sd: Mapping[str, torch.Tensor]) -> None:
        """Raise VocoderError naming every missing, unexpected or mis-shaped key."""
        want = {k: tuple(v.shape) for k, v in self.legacy_state_dict().items()}
        got = {k: tuple(v.shape) for k, v in sd.items()}
        problems = [f"missing {k} {want[k]}" for k in want if k not in got]
        problems += [f"unexpected {k} {got[k]}" for k in got if k not in want]
        problems += [f"{k}: checkpoint {got[k]} vs config {want[k]}" for k in want if k in got and got[k] != want[k]]
        if problems:
            shown = "; ".join(problems[:8]) + (f"; ... ({len(problems)} in all)" if len(problems) > 8 else "")
            raise VocoderError(f"vocoder checkpoint does not match its config.json: {shown}")

    def remove_weight_norm(self) -> None:
        """Fold weight norm into plain weights (the output does not change)."""
        for m in self.modules():
            if parametrize.is_parametrized(m, "weight"):
                parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)


def read_generator_checkpoint(g_path: str | Path) -> dict[str, torch.Tensor]:
    """The generator state dict of fairseq's vocoder checkpoint (`{"generator": sd}`, plain tensors)."""
    ckpt = torch.load(g_path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("generator"), dict):
        raise VocoderError(f"{g_path} is not a fairseq vocoder checkpoint (no 'generator' state dict)")
    return ckpt["generator"]


def _as_ids(ids: Iterable[int] | np.ndarray | torch.Tensor, n_units: int) -> list[int]:
    """Validate unit ids (integers in [0, n_units)) and return them as a list."""
    if isinstance(ids, torch.Tensor):
        arr = ids.detach().cpu().numpy()
    else:
        arr = ids if isinstance(ids, np.ndarray) else np.asarray(list(ids))
    if arr.size == 0:
        return []
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise VocoderError(f"unit ids must be a flat sequence of integers, got dtype {arr.dtype} shape {arr.shape}")
    bad = arr[(arr < 0) | (arr >= n_units)]
    if bad.size:
        raise VocoderError(f"unit ids must be in [0, {n_units}); got {bad[:5].tolist()}")
    return arr.tolist()


class Vocoder:
    """A loaded unit vocoder: units in, float32 waveform out (`sample_rate`, `hop` samples per frame)."""

    def __init__(self, model: CodeHiFiGAN, device: str | torch.device = "cpu") -> None:
        self.model = model.eval().to(device)
        self.device = torch.device(device)
        self.config = model.cfg

    @classmethod
    def from_state_dict(
        cls, config: VocoderConfig, sd: Mapping[str, torch.Tensor], device: str | torch.device = "cpu"
    ) -> Vocoder:
        """Build from a config and a fairseq generator state dict (legacy weight-norm keys)."""
        model = CodeHiFiGAN(config)
        model.check_state_dict(sd)
        model.load_state_dict(dict(sd), strict=True)
        model.remove_weight_norm()
        return cls(model, device)

    @classmethod
    def from_dir(cls, vocoder_dir: str | Path, device: str | torch.device = "cpu") -> Vocoder:
        """Load `config.json` + `model.safetensors` (the released key names) from a directory."""
        from safetensors.torch import load_file

        vocoder_dir = Path(vocoder_dir)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (vocoder_dir / name).is_file():
                raise VocoderError(f"vocoder directory {vocoder_dir} lacks {name}")
        return cls.from_state_dict(
            VocoderConfig.from_json(vocoder_dir / CONFIG_FILE), load_file(vocoder_dir / WEIGHTS_FILE), device
        )

    @classmethod
    def from_checkpoint(
        cls, g_path: str | Path, config_path: str | Path, device: str | torch.device = "cpu"
    ) -> Vocoder:
        """Load fairseq's own files: `g_00500000` (`{"generator": sd}`) and `config.json`."""
        return cls.from_state_dict(VocoderConfig.from_json(config_path), read_generator_checkpoint(g_path), device)

    @property
    def sample_rate(self) -> int:
        """Output sample rate in Hz."""
        return self.config.sampling_rate

    @property
    def hop(self) -> int:
        """Output samples per unit frame."""
        return self.config.hop

    @property
    def n_units(self) -> int:
        """Size of the unit vocabulary."""
        return self.config.num_embeddings

    def _tensor(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor([ids], dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def durations(self, ids: Iterable[int]) -> list[int]:
        """Frames the duration predictor gives each unit (at least 1)."""
        ids = _as_ids(ids, self.n_units)
        if not ids:
            return []
        return self.model.durations(self.model.embed(self._tensor(ids))).view(-1).tolist()

    @torch.inference_mode()
    def decode(self, ids: Iterable[int], dur_prediction: bool = True) -> np.ndarray:
        """Units -> float32 waveform in [-1, 1] (not peak-normalised).

        Length: sum(durations(ids)) * hop with duration prediction, len(ids) * hop without.
        """
        ids = _as_ids(ids, self.n_units)
        if not ids:
            return np.zeros(0, dtype=np.float32)
        wav = self.model(self._tensor(ids), dur_prediction=dur_prediction)
        return wav.view(-1).float().cpu().numpy()

    def stream(self, dur_prediction: bool = True, min_frames: int = 1) -> VocoderStream:
        """A chunked decoder whose concatenated output equals `decode()` of all pushed units.

        `min_frames`: hold audio back until at least this many frames are final. Each decode
        recomputes (left + right) context frames (42 for the released vocoder), so small chunks
        cost more in total: about (min_frames + 42) / min_frames times a whole decode.
        """
        return VocoderStream(self, dur_prediction, min_frames)


class VocoderStream:
    """Decode units as they arrive; `push` returns the audio that no later unit can change.

    Durations of unit i are final once units up to i + (predictor radius) are known; the audio
    of a frame is final once frames up to (generator radius) beyond it are known. Each push
    decodes only the new frames plus that context, so its cost does not grow with the utterance.
    """

    def __init__(self, vocoder: Vocoder, dur_prediction: bool = True, min_frames: int = 1) -> None:
        model = vocoder.model
        if dur_prediction and model.dur_predictor is None:
            raise VocoderError("this vocoder has no duration predictor (config lacks dur_predictor_params)")
        if isinstance(min_frames, bool) or not isinstance(min_frames, int) or min_frames < 1:
            raise VocoderError(f"min_frames must be a positive integer, got {min_frames!r}")
        self._voc = vocoder
        self._dur_radius = model.dur_predictor.radius if dur_prediction else 0
        self._left, self._right = model.generator_context()
        self._min_frames = min_frames
        self._ids: list[int] = []
        self._ends: list[int] = []  # cumulative frame end of each unit whose duration is final
        self._emitted = 0  # frames already returned
        self._closed = False

    @property
    def lookahead(self) -> int:
        """Units beyond the emitted audio the decoder may need to see (worst case, 1 frame per unit)."""
        return self._right + self._dur_radius

    def push(self, ids: Iterable[int]) -> np.ndarray:
        """Add units; return the audio that is now final (possibly empty)."""
        if self._closed:
            raise VocoderError("this stream was flushed; start a new one with Vocoder.stream()")
        self._ids.extend(_as_ids(ids, self._voc.n_units))
        return self._advance(final=False)

    def flush(self) -> np.ndarray:
        """The end of the utterance: return the rest of the audio and close the stream."""
        if self._closed:
            raise VocoderError("this stream was already flushed")
        out = self._advance(final=True)
        self._closed = True
        return out

    @torch.inference_mode()
    def _advance(self, final: bool) -> np.ndarray:
        self._settle_durations(final)
        known = self._ends[-1] if self._ends else 0
        stop = known if final else known - self._right
        if stop <= self._emitted or (not final and stop - self._emitted < self._min_frames):
            return np.zeros(0, dtype=np.float32)
        start = max(0, self._emitted - self._left)
        wav = self._voc.model.generate(self._frames(start, known)).view(-1)
        hop = self._voc.hop
        out = wav[(self._emitted - start) * hop : (stop - start) * hop]
        self._emitted = stop
        return out.float().cpu().numpy()

    def _settle_durations(self, final: bool) -> None:
        """Fix the durations of every unit whose predictor context is complete."""
        first, n = len(self._ends), len(self._ids)
        last = n if final else n - self._dur_radius
        if last <= first:
            return
        if self._dur_radius == 0:
            durs = [1] * (last - first)
        else:
            lo = max(0, first - self._dur_radius)
            model = self._voc.model
            window = model.embed(self._voc._tensor(self._ids[lo : min(n, last + self._dur_radius)]))
            durs = model.durations(window).view(-1)[first - lo : last - lo].tolist()
        total = self._ends[-1] if self._ends else 0
        for d in durs:
            total += d
            self._ends.append(total)

    def _frames(self, start: int, stop: int) -> torch.Tensor:
        """Embedded frames [start, stop) of the utterance (1 x C x frames)."""
        first = bisect.bisect_right(self._ends, start)
        last = bisect.bisect_right(self._ends, stop - 1)
        begin = self._ends[first - 1] if first else 0
        lengths = [self._ends[i] - (self._ends[i - 1] if i else 0) for i in range(first, last + 1)]
        model = self._voc.model
        x = model.embed(self._voc._tensor(self._ids[first : last + 1]))
        x = torch.repeat_interleave(x, torch.tensor(lengths, device=x.device), dim=2)
        return x[:, :, start - begin : stop - begin]


def load_vocoder(vocoder_dir: str | Path, device: str | torch.device = "cpu"):
    """The vocoder a directory holds: the unit HiFi-GAN (fairseq's config.json) or, when config.json says
    `"model_type": "unit_spectrogram"`, the small models' `spectral_vocoder.SpectralVocoder`. Both give
    `n_units`, `sample_rate`, `hop`, `durations`, `decode` and `stream`."""
    config = Path(vocoder_dir) / CONFIG_FILE
    if config.is_file():
        try:
            kind = json.loads(config.read_text(encoding="utf-8")).get("model_type")
        except (json.JSONDecodeError, AttributeError) as e:
            raise VocoderError(f"{config} is not a JSON object: {e}") from e
        if kind == spectral_vocoder.MODEL_TYPE:
            return spectral_vocoder.SpectralVocoder.from_dir(vocoder_dir, device)
    return Vocoder.from_dir(vocoder_dir, device)


def save_vocoder_dir(out_dir: str | Path, config: str | Path | Mapping[str, Any], generator_sd: Mapping[str, torch.Tensor]) -> Path:
    """Write a vocoder directory: `config.json` (a given file is copied byte for byte) and
    `model.safetensors` holding the generator state dict under its released key names."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(config, Mapping):
        VocoderConfig.from_dict(config)  # refuse a config we could not load back
        (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    else:
        VocoderConfig.from_json(config)
        shutil.copyfile(config, out_dir / CONFIG_FILE)
    save_file({k: v.detach().contiguous().cpu() for k, v in generator_sd.items()}, str(out_dir / WEIGHTS_FILE))
    return out_dir
