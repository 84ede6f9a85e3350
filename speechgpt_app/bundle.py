"""The model bundle on disk: one directory with everything a spoken turn needs.

```
bundle/
  bundle.json   this module's file: name, unit count, prompt style, where the parts live, provenance
  speech/       speech tokenizer + unit vocoder (units.py, vocoder.py)
  lm/           tokenizer + LlamaForCausalLM (or {"hub": id} in bundle.json)
  adapter/      optional PEFT LoRA adapter (or {"hub": id}, or absent)
```

The released 7B system, the models trained here and the tests' scripted model all share this
shape; `read_bundle` is the one place that checks it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Union

BUNDLE_FILE = "bundle.json"
SCHEMA_VERSION = 1
PROMPT_STYLES: tuple[str, ...] = ("released", "explicit")
DEFAULT_CONTEXT_LENGTH = 2048  # positions of LLaMA-1 7B

# Sampling settings a bundle may override (names and types of generate.SamplingOptions' fields).
GENERATION_KEYS: dict[str, type | tuple[type, ...]] = {
    "do_sample": bool,
    "temperature": (int, float),
    "top_p": (int, float),
    "top_k": int,
    "max_new_tokens": int,
    "min_new_tokens": int,
}

Location = Union[str, dict[str, str]]
"""A part's place: a directory relative to the bundle, or `{"hub": "owner/name"}`."""


class BundleError(ValueError):
    """The bundle directory or its bundle.json is missing, malformed, or inconsistent."""


@dataclass(frozen=True)
class BundleInfo:
    """The contents of bundle.json (see the module docstring for the layout)."""

    name: str
    n_units: int
    sample_rate: int = 16_000  # Hz of the vocoder's output
    prompt_style: Literal["released", "explicit"] = "released"
    speech: str = "speech"
    lm: Location = "lm"
    adapter: Location | None = None
    context_length: int = DEFAULT_CONTEXT_LENGTH  # tokens: prompt + answer must fit
    generation: dict[str, Any] = field(default_factory=dict)  # overrides of the sampling defaults
    provenance: dict[str, Any] = field(default_factory=dict)  # recipe, data, steps, seed, versions...
    description: str = ""
    notice: str = ""  # a plain line front ends show beside the model's name (what it cannot do)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        _validate(self)


def _validate(info: BundleInfo) -> None:
    """Raise BundleError naming the first field that is wrong."""
    if info.schema_version != SCHEMA_VERSION:
        raise BundleError(
            f"bundle schema_version {info.schema_version!r} is not supported (this code reads {SCHEMA_VERSION})"
        )
    if not isinstance(info.name, str) or not info.name:
        raise BundleError("bundle 'name' must be a non-empty string")
    for key in ("n_units", "sample_rate", "context_length"):
        value = getattr(info, key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise BundleError(f"bundle '{key}' must be a positive integer, got {value!r}")
    if info.prompt_style not in PROMPT_STYLES:
        raise BundleError(f"bundle 'prompt_style' must be one of {PROMPT_STYLES}, got {info.prompt_style!r}")
    if not isinstance(info.speech, str) or not info.speech:
        raise BundleError("bundle 'speech' must be a directory relative to the bundle")
    _check_location("lm", info.lm)
    if info.adapter is not None:
        _check_location("adapter", info.adapter)
    if not isinstance(info.generation, dict):
        raise BundleError("bundle 'generation' must be an object")
    for key, value in info.generation.items():
        if key not in GENERATION_KEYS:
            raise BundleError(f"bundle 'generation' has unknown setting {key!r}; known: {sorted(GENERATION_KEYS)}")
        expected = GENERATION_KEYS[key]
        # bool is an int subclass: reject True as a number and 1 as a flag.
        if not isinstance(value, expected) or isinstance(value, bool) != (expected is bool):
            raise BundleError(f"bundle 'generation.{key}' has the wrong type: {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise BundleError(f"bundle 'generation.{key}' must be finite, got {value!r}")
    if not isinstance(info.provenance, dict):
        raise BundleError("bundle 'provenance' must be an object")
    for key in ("description", "notice"):
        if not isinstance(getattr(info, key), str):
            raise BundleError(f"bundle '{key}' must be a string")


def _check_location(key: str, value: object) -> None:
    if isinstance(value, str) and value:
        if Path(value).is_absolute() or ".." in Path(value).parts:
            # A bundle must stay movable (and a downloaded one must not point outside itself).
            raise BundleError(f"bundle '{key}' must be a path inside the bundle, got {value!r}")
        return
    if isinstance(value, dict) and set(value) == {"hub"} and isinstance(value["hub"], str) and value["hub"]:
        return
    raise BundleError(f"bundle '{key}' must be a relative directory or {{\"hub\": \"owner/name\"}}, got {value!r}")


def locate(root: str | Path, location: Location) -> str:
    """Where a part lives: an absolute directory inside `root`, or the Hub id as given."""
    if isinstance(location, dict):
        return location["hub"]
    return str(Path(root) / location)


def read_bundle(path: str | Path) -> BundleInfo:
    """Read and check `path/bundle.json` (or the file itself): schema, fields, parts on disk, unit count.

    Raises BundleError with a plain message for anything missing or inconsistent.
    """
    path = Path(path)
    file = path if path.name == BUNDLE_FILE else path / BUNDLE_FILE
    root = file.parent
    if not root.is_dir():
        raise BundleError(f"model bundle not found: {root} is not a directory")
    if not file.is_file():
        raise BundleError(f"{root} is not a model bundle: it has no {BUNDLE_FILE}")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise BundleError(f"{file} must hold a JSON object")
    if "schema_version" not in raw:
        raise BundleError(f"{file} has no 'schema_version'")
    if raw["schema_version"] != SCHEMA_VERSION:
        raise BundleError(
            f"{file}: schema_version {raw['schema_version']!r} is not supported (this code reads {SCHEMA_VERSION})"
        )
    known = {f.name for f in fields(BundleInfo)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise BundleError(f"{file} has unknown fields {unknown}")
    missing = sorted(k for k in ("name", "n_units") if k not in raw)
    if missing:
        raise BundleError(f"{file} is missing required fields {missing}")
    try:
        info = BundleInfo(**raw)
    except BundleError as e:
        raise BundleError(f"{file}: {e}") from e
    _check_parts(root, info)
    return info


def _check_parts(root: Path, info: BundleInfo) -> None:
    """Every local part exists, and the speech model's unit count matches bundle.json."""
    parts = {"speech": info.speech, "lm": info.lm, "adapter": info.adapter}
    for key, location in parts.items():
        if isinstance(location, str) and not (root / location).is_dir():
            raise BundleError(f"bundle {root}: its '{key}' directory {location!r} is missing")
    try:
        speech_units = _speech_n_units(root / info.speech)
    except (OSError, ValueError) as e:
        raise BundleError(f"bundle {root}: its speech model is unreadable: {e}") from e
    if speech_units != info.n_units:
        raise BundleError(
            f"bundle {root}: bundle.json says n_units={info.n_units} but its speech model has {speech_units} units"
        )


def _speech_n_units(speech_dir: Path) -> int:
    from speechgpt_app.units import read_speech_config  # units.py owns speech.json

    return read_speech_config(speech_dir).n_units


def write_bundle(path: str | Path, info: BundleInfo) -> Path:
    """Write `path/bundle.json` (creating `path`); returns the file's path. Parts are not checked here."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    file = root / BUNDLE_FILE
    file.write_text(json.dumps(asdict(info), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return file
