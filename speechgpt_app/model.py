"""Loading the language model: a LLaMA with SpeechGPT's vocabulary, optionally quantised, optionally + LoRA.

`load_lm(LMSpec(...))` takes a local directory or a Hub id (the released pair is the full stage-2 model
`fnlp/SpeechGPT-7B-cm` + the stage-3 LoRA `fnlp/SpeechGPT-7B-com`) and returns the model in eval mode,
its tokenizer (see vocab.load_tokenizer: ids match the released slow tokenizer), and a one-line
description. The released `-cm` weights are fp32 `pytorch_model*.bin` pickles (~27 GB); on first use they
are converted once, shard by shard, to bf16 safetensors under `$HF_HOME/speechgpt/converted/`.

Choices:
- precision `auto` = bf16 on CUDA and for large models on CPU (LLaMA was trained in bf16, and the
  released 7B's fp32 weights, 27 GB, do not fit a 24 GB machine); fp32 for small models on CPU, where
  bf16 matrix multiplies are several times slower than fp32 ones and memory is no concern.
- quant `auto` = NF4 on CUDA (a 7B fits in ~4 GB), none on CPU.
- A LoRA adapter on a quantised base is kept apart (a `PeftModel`), not merged: merging needs the base
  dequantised (a full bf16 copy, ~13 GB for 7B, then requantised with new rounding), while an unmerged
  rank-8 LoRA on q/v costs about 1% extra compute. On an unquantised base it is merged when asked.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from speechgpt_app.loaders import hf_home, hub_cache, offline
from speechgpt_app.vocab import VocabularyError, check_vocabulary, count_units, load_tokenizer

log = logging.getLogger(__name__)

Precision = Literal["auto", "bf16", "fp16", "fp32"]
Quant = Literal["auto", "none", "nf4", "int8", "int4"]
QUANT_ENV = "SPEECHGPT_QUANT"  # default quantisation for entry points (see quant_from_env)
# On CPU, `auto` precision picks bf16 only from this size up (memory matters more than speed there).
CPU_BF16_MIN_PARAMS = 1_000_000_000
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
INT4_GROUP_SIZE = 128  # torchao int4 weight-only: one scale per 128 input channels
CONVERTED_SUBDIR = Path("speechgpt") / "converted"  # under $HF_HOME, beside the Hub cache
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_META = ["*.json", "*.model", "*.txt"]  # configs, tokenizer; never the weights of other formats


class ModelLoadError(RuntimeError):
    """The language model cannot be loaded as asked; the message says why and what to do."""


@dataclass(frozen=True)
class LMSpec:
    """What language model to load and how.

    path: local directory or Hub id of the full model (config + weights + usually the tokenizer).
    adapter: local directory or Hub id of a PEFT LoRA adapter, or None.
    precision: dtype of the weights (and of NF4's compute); `auto`: see resolve_precision.
    quant: `auto` (NF4 on CUDA, none on CPU), `none`, `nf4` (bitsandbytes, also on CPU), `int8`
        (bitsandbytes LLM.int8, CUDA only), `int4` (torchao int4 weight-only, CUDA only).
    merge_adapter: merge the LoRA into the weights (only possible without quantisation).
    device: torch device string; None = `cuda:0` when CUDA is available, else `cpu`.
    n_units: the speech model's unit count, checked against the vocabulary; None = take the tokenizer's.
    """

    path: str | Path
    adapter: str | Path | None = None
    precision: Precision = "auto"
    quant: Quant = "auto"
    merge_adapter: bool = True
    device: str | None = None
    n_units: int | None = None

    def __post_init__(self) -> None:
        if self.precision not in get_args(Precision):
            raise ValueError(f"precision must be one of {get_args(Precision)}, got {self.precision!r}")
        if self.quant not in get_args(Quant):
            raise ValueError(f"quant must be one of {get_args(Quant)}, got {self.quant!r}")


@dataclass(frozen=True)
class LoadedLM:
    """A loaded language model, ready for generation (eval mode, no gradients)."""

    model: Any  # LlamaForCausalLM, or peft.PeftModel when the adapter is kept apart
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    quant: str  # resolved: none | nf4 | int8 | int4, or "served" (lm_server: the weights are a server's)
    n_units: int
    description: str
    adapter: str | None = None  # the LoRA's location as given (LMSpec.adapter), None without one
    adapter_merged: bool = False  # True when the LoRA was merged into the weights

    @property
    def numerics(self) -> str:
        """Precision and quantisation in words, e.g. "fp32" or "NF4 (bf16 compute)"."""
        return _describe_numerics(self.quant, self.dtype)


def quant_from_env(default: Quant = "auto") -> Quant:
    """The quantisation named by `$SPEECHGPT_QUANT`, or `default` when unset or empty."""
    value = os.environ.get(QUANT_ENV, "").strip().lower() or default
    if value not in get_args(Quant):
        raise ValueError(f"{QUANT_ENV}={value!r} is not one of {get_args(Quant)}")
    return value  # type: ignore[return-value]


def load_lm(spec: LMSpec) -> LoadedLM:
    """Load tokenizer + LlamaForCausalLM (+ LoRA) as `spec` says; raise `ModelLoadError` if it cannot."""
    device = resolve_device(spec.device)
    quant = resolve_quant(spec.quant, device)
    model_dir = resolve_location(spec.path, "language model")
    adapter_dir = resolve_location(spec.adapter, "LoRA adapter", adapter=True) if spec.adapter else None
    tokenizer = _load_checked_tokenizer(adapter_dir, model_dir, spec.n_units)
    _check_rows(model_dir, len(tokenizer))  # before reading gigabytes of weights
    dtype = DTYPES[resolve_precision(spec.precision, device, model_dir, quant)]
    weights_dir = ensure_safetensors(model_dir, _cache_name(spec.path, model_dir))

    model = _load_weights(weights_dir, dtype, quant, device)
    held = ""
    if adapter_dir is not None:
        model, held = _apply_adapter(model, adapter_dir, spec, quant)
    model.eval()
    model.requires_grad_(False)
    n_units = count_units(tokenizer)
    lora = f" + LoRA {spec.adapter} ({held})" if held else ""
    description = f"{spec.path}{lora}, {_describe_numerics(quant, dtype)}, {device}"
    log.info("loaded %s", description)
    adapter = str(spec.adapter) if adapter_dir is not None else None
    return LoadedLM(model, tokenizer, device, dtype, quant, n_units, description, adapter, held == "merged")


def load_server_lm(spec: LMSpec, url: str) -> LoadedLM:
    """The bundle's language model as served at `url`: its checked tokenizer here, no weights.

    The speech side and the vocoder still run on `spec.device` (default: CUDA when available).
    """
    if spec.adapter is not None:
        raise ModelLoadError(
            "a LoRA adapter kept apart cannot be sent to a server from here: start the server with "
            "`--enable-lora --lora-modules` (or on the merged model) instead"
        )
    device = resolve_device(spec.device)
    model_dir = resolve_location(spec.path, "language model")
    tokenizer = _load_checked_tokenizer(None, model_dir, spec.n_units)
    description = f"{spec.path} served at {url}"
    return LoadedLM(None, tokenizer, device, torch.float32, "served", count_units(tokenizer), description)


def resolve_device(device: str | None) -> torch.device:
    """`None` -> cuda:0 if available else cpu; a CUDA device without CUDA is a `ModelLoadError`."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ModelLoadError(f"unknown device {device!r}: {e}") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(
                f"device {device!r} asks for a CUDA GPU but this machine has none "
                "(or torch was built without CUDA): use device='cpu'"
            )
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def resolve_quant(quant: Quant, device: torch.device) -> str:
    """`auto` -> nf4 on CUDA, none elsewhere; refuse GPU-only schemes off CUDA and missing libraries."""
    if quant == "auto":
        quant = "nf4" if device.type == "cuda" else "none"
    if quant in ("int8", "int4") and device.type != "cuda":
        scheme = "bitsandbytes LLM.int8" if quant == "int8" else "torchao int4 weight-only"
        raise ModelLoadError(
            f"quant={quant!r} ({scheme}) runs only on a CUDA GPU and the device is {device}: "
            "use quant='nf4' (works on CPU) or quant='none'"
        )
    if quant in ("nf4", "int8"):
        _require("bitsandbytes", f"quant={quant!r}", "pip install bitsandbytes==0.50.2")
    if quant == "int4":
        _require("torchao", "quant='int4'", "pip install torchao (a build matching your torch)")
    return quant


def _require(module: str, what: str, how: str) -> None:
    try:
        importlib.import_module(module)
    except ImportError as e:
        raise ModelLoadError(f"{what} needs the {module} package, which is not installed: {how}") from e


def resolve_location(location: str | Path, what: str, adapter: bool = False) -> Path:
    """A local directory as is; a Hub id from the Hugging Face cache, downloading unless offline."""
    path = Path(location).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelLoadError(f"the {what} path {str(location)!r} is a file; expected a directory")
    if isinstance(location, Path) or not _HUB_ID.match(str(location)):
        raise ModelLoadError(f"the {what} directory {str(location)!r} does not exist")
    return _snapshot(str(location), what, adapter)


def _snapshot(repo_id: str, what: str, adapter: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
    )

    no_network = offline()
    weights = ["adapter_model.*"] if adapter else ["*.safetensors", "*.safetensors.index.json"]

    def fetch(patterns: list[str]) -> Path:
        return Path(
            snapshot_download(
                repo_id, allow_patterns=_HUB_META + patterns, local_files_only=no_network, cache_dir=hub_cache()
            )
        )

    try:
        path = fetch(weights)
        if not adapter and not any(path.glob("*.safetensors")):
            # The released -cm ships only fp32 pickles: fetch them (they are converted once, later).
            path = fetch(["pytorch_model*.bin", "pytorch_model.bin.index.json"])
    except IncompleteSnapshotError as e:
        raise ModelLoadError(
            f"the cached copy of the {what} {repo_id!r} is incomplete (an interrupted download?): "
            f"run `hf download {repo_id}` again while online"
        ) from e
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        why = "HF_HUB_OFFLINE=1 forbids downloading it" if no_network else f"the Hub could not be reached ({e})"
        raise ModelLoadError(
            f"the {what} {repo_id!r} is not a local directory and is not in the Hugging Face cache "
            f"({hub_cache()}), and {why}. Download it once with `hf download {repo_id}` (online), "
            "or point to a local directory"
        ) from e
    except (HfHubHTTPError, OSError) as e:
        raise ModelLoadError(f"could not download the {what} {repo_id!r} from the Hugging Face Hub: {e}") from e
    return path


def _load_checked_tokenizer(adapter_dir: Path | None, model_dir: Path, n_units: int | None):
    """The tokenizer shipped with the adapter if any (the released -com has one), else the model's."""
    candidates = [d for d in (adapter_dir, model_dir) if d is not None]
    source = next((d for d in candidates if any((d / f).is_file() for f in TOKENIZER_FILES)), None)
    if source is None:
        raise ModelLoadError(f"no tokenizer ({' or '.join(TOKENIZER_FILES)}) in {model_dir}")
    try:
        tokenizer = load_tokenizer(source)
        check_vocabulary(tokenizer, n_units if n_units is not None else max(count_units(tokenizer), 1))
    except VocabularyError as e:
        raise ModelLoadError(f"the tokenizer in {source} does not fit: {e}") from e
    return tokenizer


def resolve_precision(precision: Precision, device: torch.device, model_dir: Path, quant: str = "none") -> str:
    """`auto` -> bf16 on CUDA, with quantisation (NF4 computes in bf16), or for models of
    CPU_BF16_MIN_PARAMS and more on CPU; fp32 for small unquantised models on CPU."""
    if precision != "auto":
        return precision
    if device.type == "cuda" or quant != "none":
        return "bf16"
    return "bf16" if _estimate_params(model_dir) >= CPU_BF16_MIN_PARAMS else "fp32"


def _estimate_params(model_dir: Path) -> int:
    """Parameter count of a Llama from its config.json (embeddings, attention, MLP), without the weights."""
    cfg = json.loads((model_dir / "config.json").read_text())
    hidden, layers = cfg.get("hidden_size", 0), cfg.get("num_hidden_layers", 0)
    per_layer = 4 * hidden * hidden + 3 * hidden * cfg.get("intermediate_size", 4 * hidden)
    return 2 * cfg.get("vocab_size", 0) * hidden + layers * per_layer


def _check_rows(model_dir: Path, n_tokens: int) -> None:
    config = model_dir / "config.json"
    if not config.is_file():
        raise ModelLoadError(f"no config.json in {model_dir}: not a transformers model directory")
    rows = json.loads(config.read_text()).get("vocab_size", 0)
    if rows < n_tokens:
        raise ModelLoadError(
            f"the tokenizer has {n_tokens} tokens but the model's embeddings only {rows} rows: "
            "tokenizer and weights do not belong together"
        )


def _cache_name(location: str | Path, model_dir: Path) -> str:
    if not Path(location).expanduser().is_dir():  # a Hub id: fnlp/SpeechGPT-7B-cm -> fnlp--SpeechGPT-7B-cm
        return str(location).replace("/", "--")
    digest = hashlib.sha1(str(model_dir.resolve()).encode()).hexdigest()[:10]
    return f"{model_dir.name}-{digest}"


def converted_dir(name: str) -> Path:
    """Where the bf16 safetensors conversion of model `name` lives (`$HF_HOME/speechgpt/converted/`)."""
    return hf_home() / CONVERTED_SUBDIR / f"{name}--bf16"


def ensure_safetensors(model_dir: Path, name: str) -> Path:
    """`model_dir` if it holds safetensors; else its fp32 `.bin` converted once to bf16 safetensors."""
    if any(model_dir.glob("*.safetensors")):
        return model_dir
    if not any(model_dir.glob("pytorch_model*.bin")):
        raise ModelLoadError(f"no model weights (*.safetensors or pytorch_model*.bin) in {model_dir}")
    dest = converted_dir(name)
    if (dest / "model.safetensors.index.json").is_file():
        return dest
    return convert_bin_to_bf16_safetensors(model_dir, dest)


def convert_bin_to_bf16_safetensors(src: Path, dest: Path) -> Path:
    """Rewrite `pytorch_model*.bin` shards as bf16 safetensors shards in `dest`, one shard at a time.

    Each pickle is memory-mapped (torch.load(mmap=True)), so only the bf16 copy of one shard is ever in
    memory. The result is written to a temporary sibling and renamed, so an interrupted conversion is
    never mistaken for a finished one. Other files (config, tokenizer) are copied; config says bf16.
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    index = src / "pytorch_model.bin.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        shards = ["pytorch_model.bin"]
    tmp = dest.with_name(f"{dest.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weight_map: dict[str, str] = {}
    total = 0
    progress = tqdm(
        total=sum((src / shard).stat().st_size for shard in shards),
        desc=f"converting {src.name} to bf16 safetensors (once)",
        unit="B",
        unit_scale=True,
    )
    for i, shard in enumerate(shards):
        out = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous() for k, v in _mmap_load(src / shard).items()}
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(out, tmp / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(out, name))
        total += sum(t.numel() * t.element_size() for t in out.values())
        del out  # before the next shard: one shard's bf16 copy in memory at a time
        progress.update((src / shard).stat().st_size)
    progress.close()
    index_out = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index_out, indent=2))
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith("pytorch_model"):
            shutil.copy2(f, tmp / f.name)
    config = tmp / "config.json"
    if config.is_file():
        cfg = json.loads(config.read_text())
        cfg["torch_dtype"] = "bfloat16"
        cfg.pop("dtype", None)
        config.write_text(json.dumps(cfg, indent=2))
    if dest.exists():  # another process finished first: keep its result
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, dest)
    log.info("converted %s -> %s", src, dest)
    return dest


def _mmap_load(path: Path) -> dict[str, torch.Tensor]:
    """A pickled state dict, memory-mapped when its format allows (zip files: torch >= 1.6)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # the pre-1.6 tar format cannot be mapped; it is read into memory
        return torch.load(path, map_location="cpu", weights_only=True)


def quantization_config(quant: str, dtype: torch.dtype):
    """The one quantisation setting of each kind, for inference and for training's frozen QLoRA base:
    NF4 with double quantisation (QLoRA's), computing in `dtype`; int8; torchao int4 weight-only."""
    from transformers import BitsAndBytesConfig, TorchAoConfig

    if quant == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True,
        )
    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quant == "int4":
        from torchao.quantization import Int4WeightOnlyConfig

        return TorchAoConfig(Int4WeightOnlyConfig(group_size=INT4_GROUP_SIZE))
    return None


def _load_weights(weights_dir: Path, dtype: torch.dtype, quant: str, device: torch.device):
    from transformers import LlamaForCausalLM

    try:
        return LlamaForCausalLM.from_pretrained(
            weights_dir,
            dtype=dtype,
            device_map={"": str(device)},  # straight onto the device, shard by shard
            quantization_config=quantization_config(quant, dtype),
        )
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load the language model weights from {weights_dir}: {e}") from e


def _apply_adapter(model, adapter_dir: Path, spec: LMSpec, quant: str) -> tuple[Any, str]:
    """The model with its LoRA, and how the LoRA is held: "merged" or "kept apart" (with why)."""
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(model, adapter_dir)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load the LoRA adapter from {adapter_dir}: {e}") from e
    if not spec.merge_adapter:
        return model, "kept apart"
    if quant != "none":
        return model, "kept apart: a quantised base cannot be merged"
    return model.merge_and_unload(), "merged"


def _describe_numerics(quant: str, dtype: torch.dtype) -> str:
    """The weights' numerics in words: the dtype, and the quantisation when there is one."""
    if quant == "served":
        return "served by vLLM"
    name = {v: k for k, v in DTYPES.items()}[dtype]
    return {
        "none": name,
        "nf4": f"NF4 ({name} compute)",
        "int8": f"int8 LLM.int8 ({name})",
        "int4": f"int4 weight-only ({name})",
    }[quant]
