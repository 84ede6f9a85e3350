"""The unit vocoder of small models: units -> durations -> log spectrogram -> Griffin-Lim waveform.

Coarse units such as phonemes carry no timing or prosody, so the network models them itself, with
context over neighbouring units (as the unit HiFi-GAN does): a convolutional unit encoder, a duration
predictor (frames of 20 ms per unit), a convolutional frame decoder, and a head that writes four
5 ms frames of log magnitude per 20 ms frame. Griffin-Lim (the fast variant, with momentum) turns
the magnitudes into a waveform. Trained on one output voice by `training/mini/train_vocoder.py`.

A vocoder directory holds `config.json` (`"model_type": "unit_spectrogram"`, the fields of
`SpectralConfig`) and `model.safetensors`. `vocoder.load_vocoder` picks this class or the unit
HiFi-GAN from the config; both offer `n_units`, `sample_rate`, `durations`, `decode` and `stream`.

Streaming: the network's outputs for a frame depend only on units within a fixed radius, so the
stream recomputes the spectrogram of everything pushed so far (a few milliseconds) and releases the
frames no later unit can change; each released span is phase-reconstructed with `GL_CONTEXT` frames
of already-released spectrogram before it and joined with a short crossfade. The spectrogram equals
whole decoding exactly; the waveform differs only in Griffin-Lim's phase near the joins.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

MODEL_TYPE = "unit_spectrogram"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
LOG_FLOOR = 1e-5  # log-magnitude floor
GL_CONTEXT = 24  # 5 ms frames of earlier spectrogram each streamed span is reconstructed with
CROSSFADE = 80  # samples (5 ms) of linear crossfade at a streamed join


class SpectralVocoderError(ValueError):
    """A unit-spectrogram vocoder directory or input that cannot be used."""


@dataclass(frozen=True)
class SpectralConfig:
    """`config.json` of a unit-spectrogram vocoder. Frame sizes are in samples at `sampling_rate`."""

    num_embeddings: int
    model_type: str = MODEL_TYPE
    sampling_rate: int = 16_000
    unit_hop: int = 320  # one unit frame = 20 ms (the unit encoder's 50 Hz)
    n_fft: int = 512
    hop_length: int = 80  # 5 ms: unit_hop / hop_length spectrogram frames per unit frame
    channels: int = 256
    kernel: int = 5
    encoder_layers: int = 3
    decoder_dilations: tuple[int, ...] = (1, 2, 4, 1)
    gl_iters: int = 32
    gl_momentum: float = 0.99

    def __post_init__(self) -> None:
        if self.model_type != MODEL_TYPE:
            raise SpectralVocoderError(f"model_type must be {MODEL_TYPE!r}, got {self.model_type!r}")
        if self.unit_hop % self.hop_length:
            raise SpectralVocoderError("unit_hop must be a multiple of hop_length")
        object.__setattr__(self, "decoder_dilations", tuple(self.decoder_dilations))

    @property
    def sub(self) -> int:
        """Spectrogram frames per unit frame."""
        return self.unit_hop // self.hop_length

    @property
    def bins(self) -> int:
        return self.n_fft // 2 + 1

    @property
    def duration_radius(self) -> int:
        """Units on each side that a unit's duration depends on (encoder + predictor)."""
        return self.encoder_layers * (self.kernel // 2) + 1

    @property
    def frame_radius(self) -> int:
        """Unit frames on each side that a decoded frame depends on."""
        return sum(d * (self.kernel // 2) for d in self.decoder_dilations)

    @classmethod
    def from_json(cls, path: str | Path) -> SpectralConfig:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpectralVocoderError(f"{path}: unknown keys {unknown}")
        return cls(**data)

    def to_dict(self) -> dict:
        return {**asdict(self), "decoder_dilations": list(self.decoder_dilations)}


class _ConvBlock(nn.Module):
    """Residual: conv -> GELU -> LayerNorm over channels."""

    def __init__(self, channels: int, kernel: int, dilation: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, kernel, padding=dilation * (kernel // 2), dilation=dilation)
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.gelu(self.conv(x))
        return self.norm((x + y).transpose(1, 2)).transpose(1, 2)


class UnitSpectrogramNet(nn.Module):
    """units [B, U] -> (log durations [B, U], and given durations, log magnitudes [B, frames * sub, bins])."""

    def __init__(self, cfg: SpectralConfig) -> None:
        super().__init__()
        c = cfg.channels
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.num_embeddings, c)
        self.encoder = nn.Sequential(*(_ConvBlock(c, cfg.kernel) for _ in range(cfg.encoder_layers)))
        self.duration = nn.Sequential(nn.Conv1d(c, c, 3, padding=1), nn.GELU(), nn.Conv1d(c, 1, 1))
        self.position = nn.Linear(3, c)
        self.decoder = nn.Sequential(*(_ConvBlock(c, cfg.kernel, d) for d in cfg.decoder_dilations))
        self.head = nn.Conv1d(c, cfg.sub * cfg.bins, 1)

    def encode(self, units: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(encoded units [B, C, U], predicted log frame counts [B, U])."""
        h = self.encoder(self.embed(units).transpose(1, 2))
        return h, self.duration(h)[:, 0]

    def spectrogram(self, h: torch.Tensor, durations: torch.Tensor) -> torch.Tensor:
        """Encoded units of one utterance [1, C, U] + integer durations [U] -> log magnitude [1, F*sub, bins]."""
        frames = torch.repeat_interleave(h[0], durations, dim=1)  # [C, F]
        starts = torch.repeat_interleave(torch.cumsum(durations, 0) - durations, durations)
        index = torch.arange(frames.shape[1], device=h.device) - starts
        length = torch.repeat_interleave(durations, durations).to(h.dtype)
        pos = torch.stack([index / length, (index + 1) / length, torch.log(length)], dim=1)  # [F, 3]
        x = frames[None] + self.position(pos).T[None]
        y = self.head(self.decoder(x))  # [1, sub*bins, F]
        b, _, f = y.shape
        return y.view(b, self.cfg.sub, self.cfg.bins, f).permute(0, 3, 1, 2).reshape(b, f * self.cfg.sub, self.cfg.bins)


def frame_counts(log_durations: torch.Tensor) -> torch.Tensor:
    """Predicted log frame counts -> integer frames, at least 1 per unit."""
    return torch.clamp(torch.round(torch.exp(log_durations)), min=1).long()


class SpectralVocoder:
    """A loaded unit-spectrogram vocoder: units in, float32 waveform out."""

    def __init__(self, net: UnitSpectrogramNet, device: str | torch.device = "cpu") -> None:
        self.net = net.eval().to(device)
        self.config = net.cfg
        self.device = torch.device(device)
        self.window = torch.hann_window(self.config.n_fft, device=self.device)

    @classmethod
    def from_dir(cls, vocoder_dir: str | Path, device: str | torch.device = "cpu") -> SpectralVocoder:
        """Load `config.json` + `model.safetensors`."""
        vocoder_dir = Path(vocoder_dir)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (vocoder_dir / name).is_file():
                raise SpectralVocoderError(f"vocoder directory {vocoder_dir} lacks {name}")
        net = UnitSpectrogramNet(SpectralConfig.from_json(vocoder_dir / CONFIG_FILE))
        net.load_state_dict({k: v.float() for k, v in load_file(str(vocoder_dir / WEIGHTS_FILE)).items()})
        return cls(net, device)

    def save(self, out_dir: str | Path) -> Path:
        """Write `config.json` + `model.safetensors` (float16: half the size, computed in float32)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / CONFIG_FILE).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n", encoding="utf-8")
        weights = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in self.net.state_dict().items()}
        save_file(weights, str(out_dir / WEIGHTS_FILE))
        return out_dir

    @property
    def sample_rate(self) -> int:
        return self.config.sampling_rate

    @property
    def hop(self) -> int:
        """Output samples per unit frame."""
        return self.config.unit_hop

    @property
    def n_units(self) -> int:
        return self.config.num_embeddings

    def _ids(self, ids: Iterable[int]) -> list[int]:
        out = [int(i) for i in ids]
        bad = [i for i in out if not 0 <= i < self.n_units]
        if bad:
            raise SpectralVocoderError(f"unit <{bad[0]}> is out of range: this vocoder knows {self.n_units} units")
        return out

    @torch.inference_mode()
    def _encode(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        h, logd = self.net.encode(torch.tensor([ids], device=self.device))
        return h, frame_counts(logd[0])

    @torch.inference_mode()
    def durations(self, ids: Iterable[int]) -> list[int]:
        """Unit frames (20 ms) the duration predictor gives each unit (at least 1)."""
        ids = self._ids(ids)
        return self._encode(ids)[1].tolist() if ids else []

    @torch.inference_mode()
    def log_magnitude(self, ids: list[int]) -> torch.Tensor:
        """The predicted log magnitude [frames, bins] (5 ms frames) of a whole utterance."""
        h, durs = self._encode(ids)
        return self.net.spectrogram(h, durs)[0]

    def griffin_lim(self, log_mag: torch.Tensor, init_phase: torch.Tensor | None = None) -> torch.Tensor:
        """Fast Griffin-Lim: log magnitude [frames, bins] -> waveform of frames * hop_length samples."""
        cfg = self.config
        mag = torch.exp(log_mag).T  # [bins, frames]
        length = mag.shape[1] * cfg.hop_length
        angles = torch.exp(2j * torch.pi * torch.rand(mag.shape, generator=torch.Generator().manual_seed(0))).to(
            self.device
        ) if init_phase is None else init_phase
        prev = torch.zeros_like(mag, dtype=torch.complex64)
        stft = dict(n_fft=cfg.n_fft, hop_length=cfg.hop_length, window=self.window, center=True)
        for _ in range(cfg.gl_iters):
            wav = torch.istft(mag * angles, length=length, **stft)
            rebuilt = torch.stft(wav, return_complex=True, **stft)[:, : mag.shape[1]]
            angles = rebuilt - cfg.gl_momentum / (1 + cfg.gl_momentum) * prev
            prev = rebuilt
            angles = angles / angles.abs().clamp(min=1e-8)
        return torch.istft(mag * angles, length=length, **stft)

    @torch.inference_mode()
    def decode(self, ids: Iterable[int], dur_prediction: bool = True) -> np.ndarray:
        """Units -> float32 waveform in [-1, 1]; sum(durations) * unit_hop samples."""
        if not dur_prediction:
            raise SpectralVocoderError("the unit-spectrogram vocoder always predicts durations")
        ids = self._ids(ids)
        if not ids:
            return np.zeros(0, dtype=np.float32)
        return self.griffin_lim(self.log_magnitude(ids)).clamp(-1, 1).cpu().numpy()

    def stream(self, dur_prediction: bool = True, min_frames: int = 1) -> SpectralStream:
        """A chunked decoder: push units as they come, get the audio that is final."""
        if not dur_prediction:
            raise SpectralVocoderError("the unit-spectrogram vocoder always predicts durations")
        return SpectralStream(self, min_frames)


class SpectralStream:
    """Streaming decoding; `push` returns the audio no later unit can change (see the module doc)."""

    def __init__(self, vocoder: SpectralVocoder, min_frames: int = 1) -> None:
        if isinstance(min_frames, bool) or not isinstance(min_frames, int) or min_frames < 1:
            raise SpectralVocoderError(f"min_frames must be a positive integer, got {min_frames!r}")
        self._voc = vocoder
        self._min = min_frames * vocoder.config.sub
        self._ids: list[int] = []
        self._emitted = 0  # 5 ms frames released
        self._tail = np.zeros(0, dtype=np.float32)  # crossfade samples held back from the last chunk
        self._closed = False

    @property
    def lookahead(self) -> int:
        """Units beyond the released audio the decoder may need (worst case, one frame per unit)."""
        cfg = self._voc.config
        return cfg.duration_radius + cfg.frame_radius

    def push(self, ids: Iterable[int]) -> np.ndarray:
        """Add units; return the audio that is now final (possibly empty)."""
        if self._closed:
            raise SpectralVocoderError("this stream was flushed; start a new one")
        self._ids.extend(self._voc._ids(ids))
        return self._advance(final=False)

    def flush(self) -> np.ndarray:
        """The end of the utterance: the rest of the audio; the stream closes."""
        if self._closed:
            raise SpectralVocoderError("this stream was already flushed")
        out = self._advance(final=True)
        self._closed = True
        return np.concatenate([out, self._tail])

    @torch.inference_mode()
    def _advance(self, final: bool) -> np.ndarray:
        cfg = self._voc.config
        if not self._ids:
            return np.zeros(0, dtype=np.float32)
        h, durs = self._voc._encode(self._ids)
        settled_units = len(self._ids) if final else len(self._ids) - cfg.duration_radius
        if settled_units <= 0:
            return np.zeros(0, dtype=np.float32)
        ends = torch.cumsum(durs, 0)
        stop = int(ends[settled_units - 1]) * cfg.sub
        if not final:
            stop -= cfg.frame_radius * cfg.sub
        if stop <= self._emitted or (not final and stop - self._emitted < self._min):
            return np.zeros(0, dtype=np.float32)
        log_mag = self._voc.net.spectrogram(h, durs)[0]
        start = max(0, self._emitted - GL_CONTEXT)
        wav = self._voc.griffin_lim(log_mag[start:stop]).clamp(-1, 1).cpu().numpy()
        hop = cfg.hop_length
        new = wav[(self._emitted - start) * hop :]
        if len(self._tail):
            n = len(self._tail)
            overlap = wav[(self._emitted - start) * hop - n : (self._emitted - start) * hop] if self._emitted > start else None
            if overlap is not None and len(overlap) == n:
                fade = np.linspace(0.0, 1.0, n, dtype=np.float32)
                new = np.concatenate([self._tail * (1 - fade) + overlap * fade, new])
            else:
                new = np.concatenate([self._tail, new])
        self._emitted = stop
        keep = min(CROSSFADE, len(new)) if not final else 0
        self._tail, out = new[len(new) - keep :], new[: len(new) - keep]
        return out.astype(np.float32)
