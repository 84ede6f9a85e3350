"""Released fairseq/joblib files -> one speech model directory (`python -m speechgpt_app convert`).

The released mHuBERT checkpoint and k-means quantiser are pickles that name fairseq and
scikit-learn classes. Neither library is a dependency, and a plain `torch.load` / `joblib.load`
would run whatever a pickle says, so both are read with allow-list unpicklers: containers,
numpy arrays, torch tensors and config objects are rebuilt; fairseq/scikit-learn classes become
inert stubs that only keep their state; anything else is refused before it runs.

Output (ARCHITECTURE.md, "A model bundle on disk"):

    speech.json, centres.safetensors, features/ (transformers HubertModel, layers 1..layer),
    vocoder/config.json (as released) + vocoder/model.safetensors (released key names)
"""

from __future__ import annotations

import _compat_pickle
import argparse
import ast
import enum
import importlib
import logging
import operator
import os
import pickle
import re
import shutil
import tempfile
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from speechgpt_app.audio import SAMPLE_RATE
from speechgpt_app.units import HubertFeatures, SpeechConfig, SpeechTokenizer
from speechgpt_app.vocoder import (
    VOCODER_SUBDIR,
    CodeHiFiGAN,
    VocoderConfig,
    read_generator_checkpoint,
    save_vocoder_dir,
)

log = logging.getLogger(__name__)

DEFAULT_LAYER = 11  # fairseq output_layer (1-based) of the released speech units

# fairseq names that have no transformers counterpart and are not needed for features.
_DROPPED_KEYS = re.compile(r"^(final_proj\..*|label_embs_concat)$")
# fairseq -> transformers HubertModel key map (REFERENCE.md section 6); first match wins.
_KEY_MAP: tuple[tuple[str, str], ...] = (
    (r"^feature_extractor\.conv_layers\.(\d+)\.0\.(weight|bias)$", r"feature_extractor.conv_layers.\1.conv.\2"),
    (r"^feature_extractor\.conv_layers\.0\.2\.(weight|bias)$", r"feature_extractor.conv_layers.0.layer_norm.\1"),
    (r"^feature_extractor\.conv_layers\.(\d+)\.2\.1\.(weight|bias)$", r"feature_extractor.conv_layers.\1.layer_norm.\2"),
    (r"^layer_norm\.(weight|bias)$", r"feature_projection.layer_norm.\1"),
    (r"^post_extract_proj\.(weight|bias)$", r"feature_projection.projection.\1"),
    (r"^mask_emb$", "masked_spec_embed"),
    # fairseq applies weight norm with dim=2, as transformers' parametrized pos_conv does.
    (r"^encoder\.pos_conv\.0\.weight_g$", "encoder.pos_conv_embed.conv.parametrizations.weight.original0"),
    (r"^encoder\.pos_conv\.0\.weight_v$", "encoder.pos_conv_embed.conv.parametrizations.weight.original1"),
    (r"^encoder\.pos_conv\.0\.bias$", "encoder.pos_conv_embed.conv.bias"),
    (r"^encoder\.layer_norm\.(weight|bias)$", r"encoder.layer_norm.\1"),
    (r"^encoder\.layers\.(\d+)\.self_attn\.(q|k|v|out)_proj\.(weight|bias)$", r"encoder.layers.\1.attention.\2_proj.\3"),
    (r"^encoder\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)$", r"encoder.layers.\1.layer_norm.\2"),
    (r"^encoder\.layers\.(\d+)\.fc1\.(weight|bias)$", r"encoder.layers.\1.feed_forward.intermediate_dense.\2"),
    (r"^encoder\.layers\.(\d+)\.fc2\.(weight|bias)$", r"encoder.layers.\1.feed_forward.output_dense.\2"),
    (r"^encoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)$", r"encoder.layers.\1.final_layer_norm.\2"),
)


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for something outside the allow-list; nothing it names was run."""


class ConvertError(ValueError):
    """A released file that does not have the expected content."""


# ---------------------------------------------------------------------------------------------------
# Allow-list unpickling
# ---------------------------------------------------------------------------------------------------


class Stub:
    """Inert stand-in for a fairseq or scikit-learn class: keeps constructor args and state, runs nothing."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Stub:
        obj = object.__new__(cls)
        obj.__dict__["_stub_args"] = args
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        # state is a __dict__, or (dict, slots) for classes with __slots__, or anything for custom states
        if isinstance(state, tuple) and len(state) == 2 and all(s is None or isinstance(s, dict) for s in state):
            for part in state:
                self.__dict__.update(part or {})
        elif isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_stub_state"] = state

    def __reduce__(self) -> Any:
        raise TypeError(f"{type(self).__qualname__} is a read-only stub and cannot be pickled again")

    def __repr__(self) -> str:
        return f"<stub {type(self).__module__}.{type(self).__qualname__}>"


_STUBS: dict[tuple[str, str], type] = {}


def _stub_class(module: str, name: str) -> type:
    key = (module, name)
    if key not in _STUBS:
        _STUBS[key] = type(name, (Stub,), {"__module__": module, "__qualname__": name})
    return _STUBS[key]


_BUILTINS = frozenset(
    {"dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "str", "bytes", "bytearray",
     "bool", "slice", "object", "range"}
)
_ALLOWED: frozenset[tuple[str, str]] = frozenset(
    {
        ("collections", "OrderedDict"),
        ("collections", "defaultdict"),
        ("copyreg", "_reconstructor"),  # protocol 0/1 objects: rebuilds only allow-listed classes
        ("argparse", "Namespace"),
        ("torch._utils", "_rebuild_tensor"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_tensor_v3"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch._utils", "_rebuild_parameter_with_state"),
        ("torch", "Size"),
        ("torch", "device"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.random._pickle", "__randomstate_ctor"),
        ("numpy.random._pickle", "__bit_generator_ctor"),
        ("numpy.random._pickle", "__generator_ctor"),
        ("operator", "getitem"),  # typing generics in omegaconf metadata, e.g. Dict[str, Any]
    }
)
_OMEGACONF_MODULES = frozenset({"omegaconf.dictconfig", "omegaconf.listconfig", "omegaconf.base", "omegaconf.nodes"})
_TYPING_NAMES = frozenset({"Any", "Optional", "Union", "List", "Dict", "Tuple", "Set", "Callable", "Type"})


def _normalise(module: str, name: str) -> tuple[str, str]:
    """Python 2 names (protocol < 3) and numpy 1's `numpy.core` map to today's modules."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    if module == "numpy.core" or module.startswith("numpy.core."):
        module = "numpy._core" + module[len("numpy.core") :]
    return module, name


def _allowed_global(module: str, name: str, stub_prefixes: tuple[str, ...]) -> Any:
    """The object a pickle may name, or UnsafePickleError; nothing is imported for refused names."""
    if module.split(".")[0] in stub_prefixes:
        return _stub_class(module, name)
    if module == "builtins" and name in _BUILTINS:
        return getattr(__import__("builtins"), name)
    if module == "typing" and name in _TYPING_NAMES:
        return getattr(typing, name)
    if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    if module == "numpy" and isinstance(getattr(np, name, None), type) and issubclass(getattr(np, name), np.generic):
        return getattr(np, name)  # numpy scalar types (np.float32, ...)
    if module == "numpy.dtypes" and name.endswith("DType"):
        import numpy.dtypes

        return getattr(numpy.dtypes, name)
    if module in _OMEGACONF_MODULES:
        obj = getattr(importlib.import_module(module), name, None)
        if isinstance(obj, type) and obj.__module__.startswith("omegaconf"):
            return obj
    if (module, name) in _ALLOWED:
        return getattr(importlib.import_module(module), name)
    raise UnsafePickleError(
        f"refusing to unpickle {module}.{name}: it is not on the allow-list of plain data, "
        "tensors, arrays and config classes"
    )


class _FairseqUnpickler(pickle.Unpickler):
    """For torch.load of fairseq checkpoints: fairseq.* -> stubs, everything else allow-listed."""

    def find_class(self, module: str, name: str) -> Any:
        module, name = _normalise(module, name)
        return _allowed_global(module, name, stub_prefixes=("fairseq",))


def _safe_load(file: Any, **kwargs: Any) -> Any:
    return _FairseqUnpickler(file, **kwargs).load()


# torch.load takes a module-like object with Unpickler and load.
_fairseq_pickle = types.ModuleType("speechgpt_app_fairseq_pickle")
_fairseq_pickle.Unpickler = _FairseqUnpickler  # type: ignore[attr-defined]
_fairseq_pickle.load = _safe_load  # type: ignore[attr-defined]


def safe_torch_load(path: str | Path) -> Any:
    """torch.load with the allow-list unpickler (fairseq classes become stubs), tensors on CPU."""
    return torch.load(path, map_location="cpu", pickle_module=_fairseq_pickle, weights_only=False)


def _plain(value: Any) -> Any:
    """Config values as plain Python: containers recursively; enum stubs (fairseq ChoiceEnum) -> their value."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, argparse.Namespace):
        return _plain(vars(value))
    if isinstance(value, Stub) and len(value._stub_args) == 1 and set(value.__dict__) == {"_stub_args"}:
        return _plain(value._stub_args[0])
    if isinstance(value, enum.Enum):
        return value.value
    return value


def _config_to_dict(cfg: Any) -> dict[str, Any]:
    """An omegaconf DictConfig, argparse Namespace or dict -> plain dict."""
    if type(cfg).__module__.startswith("omegaconf"):  # only then is omegaconf needed
        from omegaconf import OmegaConf

        try:
            cfg = OmegaConf.to_container(cfg, resolve=True)
        except Exception as e:  # an interpolation that points nowhere: keep the text, say so
            log.warning("fairseq cfg has unresolvable interpolations (%s); keeping them unresolved", e)
            cfg = OmegaConf.to_container(cfg, resolve=False)
    return _plain(cfg)


def load_fairseq_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a fairseq checkpoint (e.g. mHuBERT `.pt`) -> (cfg as a plain dict, model state dict).

    Older checkpoints keep their settings in `args` (argparse.Namespace) instead of `cfg`; those
    become {"model": vars(args), "task": vars(args)}, which is how fairseq itself reads them.
    """
    ckpt = safe_torch_load(path)
    if not isinstance(ckpt, Mapping) or "model" not in ckpt:
        raise ConvertError(f"{path} is not a fairseq checkpoint (no 'model' state dict)")
    if ckpt.get("cfg") is not None:
        cfg = _config_to_dict(ckpt["cfg"])
    elif ckpt.get("args") is not None:
        args = _config_to_dict(ckpt["args"])
        cfg = {"model": args, "task": args}
    else:
        raise ConvertError(f"{path} has neither 'cfg' nor 'args': cannot tell its architecture")
    sd = ckpt["model"]
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConvertError(f"{path}: model entries that are not tensors: {bad[:5]}")
    return cfg, dict(sd)


class _KMeansUnpickler:
    """Built lazily: a subclass of joblib's NumpyUnpickler (joblib is imported only when needed)."""

    _cls: type | None = None

    @classmethod
    def get(cls) -> type:
        if cls._cls is None:
            from joblib.numpy_pickle import NumpyArrayWrapper, NumpyUnpickler

            class Unpickler(NumpyUnpickler):
                """joblib's NumpyUnpickler with an allow-list: numpy, joblib's array wrapper, sklearn stubs."""

                dispatch = NumpyUnpickler.dispatch.copy()

                def find_class(self, module: str, name: str) -> Any:
                    module, name = _normalise(module, name)
                    # joblib vendored in old scikit-learn writes its wrapper under sklearn.externals
                    if name == "NumpyArrayWrapper" and module in (
                        "joblib.numpy_pickle",
                        "sklearn.externals.joblib.numpy_pickle",
                    ):
                        return NumpyArrayWrapper
                    return _allowed_global(module, name, stub_prefixes=("sklearn",))

                def load_build(self) -> None:
                    # An object-dtype array would be read with plain pickle.load, outside this allow-list.
                    obj, state = self.stack[-2], self.stack[-1]
                    if isinstance(obj, NumpyArrayWrapper) and isinstance(state, dict):
                        if np.dtype(state.get("dtype", np.float32)).hasobject:
                            raise UnsafePickleError("refusing an object-dtype array inside a joblib pickle")
                    NumpyUnpickler.load_build(self)

                dispatch[pickle.BUILD[0]] = load_build

            cls._cls = Unpickler
        return cls._cls


def load_kmeans_centres(path: str | Path) -> np.ndarray:
    """The `cluster_centers_` of a joblib-pickled scikit-learn k-means, as float32 [n_units, dim]."""
    from joblib.numpy_pickle import _validate_fileobject_and_memmap

    path = str(path)
    with open(path, "rb") as f, _validate_fileobject_and_memmap(f, path, None) as (fobj, _):
        if isinstance(fobj, str):
            raise ConvertError(f"{path} uses joblib's pre-0.10 multi-file format, which is not supported")
        obj = _KMeansUnpickler.get()(path, fobj, ensure_native_byte_order=True).load()
    centres = getattr(obj, "cluster_centers_", None) if isinstance(obj, Stub) else None
    if not isinstance(centres, np.ndarray):
        raise ConvertError(f"{path} does not hold a fitted k-means model with cluster_centers_ (got {obj!r})")
    if centres.ndim != 2 or not np.issubdtype(centres.dtype, np.floating) or not np.isfinite(centres).all():
        raise ConvertError(f"{path}: cluster_centers_ must be a finite 2-D float array, got {centres.dtype} {centres.shape}")
    return centres.astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# fairseq HuBERT -> transformers HubertModel
# ---------------------------------------------------------------------------------------------------


def parse_conv_layers(spec: str) -> list[tuple[int, int, int]]:
    """fairseq's `conv_feature_layers` string, e.g. "[(512,10,5)] + [(512,3,2)] * 4", evaluated
    without eval(): only list/tuple literals of ints, `+` and `*` are understood."""

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [ev(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            op = operator.add if isinstance(node.op, ast.Add) else operator.mul
            return op(ev(node.left), ev(node.right))
        raise ConvertError(f"conv_feature_layers: cannot read {ast.dump(node)[:60]} in {spec!r}")

    try:
        layers = ev(ast.parse(spec, mode="eval"))
    except SyntaxError as e:
        raise ConvertError(f"conv_feature_layers is not a list expression: {spec!r}") from e
    if not isinstance(layers, list) or not all(
        isinstance(t, tuple) and len(t) == 3 and all(isinstance(x, int) and x > 0 for x in t) for t in layers
    ):
        raise ConvertError(f"conv_feature_layers must be a list of (dim, kernel, stride), got {spec!r}")
    return layers


# fairseq model settings this converter does not implement, with the value it does (the default): a
# checkpoint that sets another value is refused by name rather than converted into something else.
_UNIMPLEMENTED: dict[str, Any] = {
    "pos_conv_depth": 1,  # data2vec/wav2vec2-style stacked positional convs
    "conv_pos_batch_norm": False,
    "layer_type": "transformer",  # conformer encoders
}


def _refuse_unimplemented(m: Mapping[str, Any]) -> None:
    for key in _UNIMPLEMENTED:
        if key in m and m[key] is not None and m[key] != _UNIMPLEMENTED[key]:
            raise ConvertError(
                f"fairseq setting model.{key}={m[key]!r} is not supported (only {_UNIMPLEMENTED[key]!r})"
            )


def task_normalize(cfg: Mapping[str, Any]) -> bool:
    """fairseq's task.normalize: whether the model reads layer-normalised waveforms (HuBERT large).
    A task that reads another sample rate than 16 kHz is refused."""
    task = cfg.get("task") if isinstance(cfg, Mapping) else None
    task = task if isinstance(task, Mapping) else {}
    rate = task.get("sample_rate", SAMPLE_RATE)
    if rate is not None and int(rate) != SAMPLE_RATE:
        raise ConvertError(f"fairseq task.sample_rate={rate} is not supported (only {SAMPLE_RATE})")
    normalize = task.get("normalize", False)
    if not isinstance(normalize, bool):
        raise ConvertError(f"fairseq task.normalize must be true or false, got {normalize!r}")
    return normalize


def hubert_config_from_fairseq(cfg: Mapping[str, Any]) -> Any:
    """transformers.HubertConfig with the architecture in fairseq's cfg["model"] (no base sizes assumed)."""
    from transformers import HubertConfig

    m = cfg.get("model") if isinstance(cfg, Mapping) else None
    if not isinstance(m, Mapping):
        raise ConvertError("fairseq cfg has no 'model' section")
    required = ("conv_feature_layers", "encoder_layers", "encoder_embed_dim", "encoder_ffn_embed_dim",
                "encoder_attention_heads")
    missing = [k for k in required if k not in m]
    if missing:
        raise ConvertError(f"fairseq cfg['model'] lacks {missing}")
    modes = {"default": "group", "layer_norm": "layer"}
    mode = m.get("extractor_mode", "default")
    if mode not in modes:
        raise ConvertError(f"extractor_mode {mode!r} is not one of {sorted(modes)}")
    _refuse_unimplemented(m)
    conv = parse_conv_layers(m["conv_feature_layers"])
    return HubertConfig(
        hidden_size=int(m["encoder_embed_dim"]),
        num_hidden_layers=int(m["encoder_layers"]),
        num_attention_heads=int(m["encoder_attention_heads"]),
        intermediate_size=int(m["encoder_ffn_embed_dim"]),
        hidden_act=m.get("activation_fn", "gelu"),
        hidden_dropout=float(m.get("dropout", 0.1)),
        attention_dropout=float(m.get("attention_dropout", 0.1)),
        activation_dropout=float(m.get("activation_dropout", 0.0)),
        feat_proj_dropout=float(m.get("dropout_input", 0.0)),
        layerdrop=float(m.get("encoder_layerdrop", 0.0)),
        feat_proj_layer_norm=True,  # fairseq's HubertModel always normalises the conv features
        feat_extract_norm=modes[mode],
        feat_extract_activation="gelu",  # fairseq's ConvFeatureExtractionModel uses nn.GELU
        conv_dim=[c[0] for c in conv],
        conv_kernel=[c[1] for c in conv],
        conv_stride=[c[2] for c in conv],
        conv_bias=bool(m.get("conv_bias", False)),
        num_conv_pos_embeddings=int(m.get("conv_pos", 128)),
        num_conv_pos_embedding_groups=int(m.get("conv_pos_groups", 16)),
        do_stable_layer_norm=bool(m.get("layer_norm_first", False)),
    )


def hubert_state_dict_from_fairseq(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fairseq HuBERT state dict -> transformers HubertModel names; unknown keys are an error."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in sd.items():
        if _DROPPED_KEYS.match(key):
            continue
        for pattern, target in _KEY_MAP:
            if re.match(pattern, key):
                out[re.sub(pattern, target, key)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ConvertError(f"fairseq HuBERT keys with no transformers counterpart: {unknown[:8]}")
    return out


def hubert_model_from_fairseq(cfg: Mapping[str, Any], sd: Mapping[str, torch.Tensor]) -> Any:
    """A transformers HubertModel (eval, float32) holding the fairseq weights, loaded strictly."""
    from transformers import HubertModel

    config = hubert_config_from_fairseq(cfg)
    weights = hubert_state_dict_from_fairseq(sd)
    if "feature_projection.projection.weight" not in weights:
        # fairseq skips post_extract_proj when the conv output already has the model width;
        # transformers always has the projection, so give it the identity.
        dim = config.conv_dim[-1]
        if dim != config.hidden_size:
            raise ConvertError("fairseq checkpoint lacks post_extract_proj but its widths differ")
        weights["feature_projection.projection.weight"] = torch.eye(dim)
        weights["feature_projection.projection.bias"] = torch.zeros(dim)
    model = HubertModel(config)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise ConvertError(f"fairseq HuBERT weights do not fit the architecture in its cfg: {e}") from e
    return model.to(torch.float32).eval()


# ---------------------------------------------------------------------------------------------------
# Speech directory
# ---------------------------------------------------------------------------------------------------


def write_speech_dir(
    out: str | Path,
    hubert_pt: str | Path,
    kmeans_bin: str | Path,
    vocoder_pt: str | Path,
    vocoder_config_json: str | Path,
    layer: int = DEFAULT_LAYER,
    overwrite: bool = False,
) -> Path:
    """Convert the released files into the speech directory `out` (written whole, then renamed into place)."""

    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another --out or pass --force to replace it")
    cfg, sd = load_fairseq_checkpoint(hubert_pt)
    model = hubert_model_from_fairseq(cfg, sd)
    n_layers = model.config.num_hidden_layers
    if not (isinstance(layer, int) and 1 <= layer <= n_layers):
        raise ConvertError(f"--layer {layer} is out of range: this HuBERT has layers 1 to {n_layers}")
    normalize = task_normalize(cfg)
    features = HubertFeatures(model, layer=layer, normalize=normalize)
    centres = load_kmeans_centres(kmeans_bin)
    if centres.shape[1] != features.dim:
        raise ConvertError(f"k-means centres have dim {centres.shape[1]} but HuBERT features have dim {features.dim}")
    voc_cfg = VocoderConfig.from_json(vocoder_config_json)
    voc_sd = read_generator_checkpoint(vocoder_pt)
    CodeHiFiGAN(voc_cfg).check_state_dict(voc_sd)
    if voc_cfg.num_embeddings != centres.shape[0]:
        raise ConvertError(f"the vocoder knows {voc_cfg.num_embeddings} units but k-means has {centres.shape[0]}")
    tokenizer = SpeechTokenizer(
        SpeechConfig(n_units=centres.shape[0], features={"type": "hubert", "layer": layer, "normalize": normalize}),
        features,
        centres,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tokenizer.save(tmp)
        save_vocoder_dir(tmp / VOCODER_SUBDIR, vocoder_config_json, voc_sd)
        if overwrite and out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote speech directory %s", out)
    return out
