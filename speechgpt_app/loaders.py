"""Every released file SpeechGPT needs: where it comes from, where it goes, and how it is checked.

Plain URLs (mHuBERT, k-means, unit vocoder) download with urllib into `$HF_HOME/speechgpt/`
(default `~/.cache/huggingface/speechgpt/`): with a progress bar, resuming an interrupted
transfer from its `.part` file (HTTP Range), after checking free disk space. No hashes are
published for these files, so each file's sha256 is recorded in `hashes.json` beside it the
first time it is seen (trust on first use: the hash is NOT verified against anything) and a
later mismatch is refused. The language model and adapter stay on the Hugging Face Hub; the
preset bundle refers to them by id and model.py fetches them (snapshot_download) into the HF cache.

`HF_HUB_OFFLINE=1` forbids every download; a missing file then raises MissingWeightsError
whose message names the file, its URL and the exact path to put it by hand.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from speechgpt_app import __version__
from speechgpt_app.bundle import BUNDLE_FILE, BundleInfo, read_bundle, write_bundle
from speechgpt_app.convert import DEFAULT_LAYER, ConvertError, UnsafePickleError, write_speech_dir
from speechgpt_app.units import SPEECH_JSON
from speechgpt_app.vocoder import VocoderError

log = logging.getLogger(__name__)

CACHE_SUBDIR = "speechgpt"  # under $HF_HOME, beside the Hub cache
HASHES_FILE = "hashes.json"
CHUNK_BYTES = 1 << 20  # read/write block while downloading and hashing
TIMEOUT_S = 60.0  # per socket operation, not for the whole transfer
FREE_SPACE_MARGIN_BYTES = 64 << 20  # leave room for the conversion's small files and the OS
_FAIR = "https://dl.fbaipublicfiles.com"
_VOCODER = f"{_FAIR}/fairseq/speech_to_speech/vocoder/code_hifigan/mhubert_vp_en_es_fr_it3_400k_layer11_km1000_lj"


@dataclass(frozen=True)
class ReleasedFile:
    """One released file: its URL, the name it gets in the cache, and what it is."""

    url: str
    filename: str
    what: str


RELEASED: dict[str, ReleasedFile] = {
    "mhubert": ReleasedFile(
        f"{_FAIR}/hubert/mhubert_base_vp_en_es_fr_it3.pt",
        "mhubert_base_vp_en_es_fr_it3.pt",
        "mHuBERT base speech encoder (fairseq checkpoint)",
    ),
    "kmeans": ReleasedFile(
        f"{_FAIR}/hubert/mhubert_base_vp_en_es_fr_it3_L11_km1000.bin",
        "mhubert_base_vp_en_es_fr_it3_L11_km1000.bin",
        "k-means quantiser, 1000 units on layer 11 (joblib/scikit-learn pickle)",
    ),
    "vocoder": ReleasedFile(
        f"{_VOCODER}/g_00500000",
        "g_00500000",
        "unit HiFi-GAN vocoder weights, LJ Speech voice (CC-BY-NC)",
    ),
    "vocoder_config": ReleasedFile(
        f"{_VOCODER}/config.json",
        "vocoder_config.json",
        "unit HiFi-GAN vocoder config.json",
    ),
}

HUB_MODELS: dict[str, str] = {
    "ma": "fnlp/SpeechGPT-7B-ma",  # stage 1: modality-adaptation pretraining
    "cm": "fnlp/SpeechGPT-7B-cm",  # stage 2: cross-modal instruction finetuning (full model)
    "com": "fnlp/SpeechGPT-7B-com",  # stage 3: chain-of-modality LoRA adapter on top of -cm
}


@dataclass(frozen=True)
class ReleasedSpec:
    """A preset assembled from released parts: Hub ids for the LM and adapter, plus the speech dir."""

    name: str
    lm: str
    adapter: str | None
    n_units: int
    description: str

    @property
    def bundle_dir(self) -> Path:
        """Where the preset's bundle.json and converted speech directory live."""
        return cache_dir() / self.name

    @property
    def speech_dir(self) -> Path:
        """The converted speech directory (speech.json, features/, centres, vocoder/)."""
        return self.bundle_dir / "speech"


PRESETS: dict[str, ReleasedSpec] = {
    "speechgpt-7b": ReleasedSpec(
        name="speechgpt-7b",
        lm=HUB_MODELS["cm"],
        adapter=HUB_MODELS["com"],
        n_units=1000,
        description="SpeechGPT-7B as released: -cm LLaMA + -com LoRA, mHuBERT L11 km1000 units, LJ unit vocoder",
    ),
}


class MissingWeightsError(RuntimeError):
    """A released file is not on disk and cannot be downloaded now (offline, network, disk)."""

    def __init__(self, what: str, url: str, path: Path, reason: str) -> None:
        self.url, self.path = url, Path(path)
        super().__init__(f"{what} is not available: {reason}. To provide it by hand, download {url} to {self.path}")


class PresetUnavailableError(MissingWeightsError):
    """Offline, a preset misses several parts at once: each is listed with where to get it."""

    def __init__(self, name: str, missing: list[str]) -> None:
        self.missing = list(missing)
        RuntimeError.__init__(
            self,
            f"the {name!r} model cannot be assembled: HF_HUB_OFFLINE is set, so nothing can be downloaded, "
            f"and {len(missing)} part(s) are missing:\n" + "\n".join(f"  - {m}" for m in missing)
            + "\nProvide them (or unset HF_HUB_OFFLINE to download them) and run again.",
        )


class DiskSpaceError(MissingWeightsError):
    """Not enough free disk space for a download."""


class HashMismatchError(MissingWeightsError):
    """A file's sha256 differs from the one recorded when it was first downloaded."""


class ModelNameError(ValueError):
    """A model name that is neither a bundle directory nor a known preset."""


def hf_home() -> Path:
    """`$HF_HOME` (default `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`, as
    huggingface_hub's), read at call time: huggingface_hub fixes its constants when first
    imported, and launchers and tests set or unset the variables later."""
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(os.path.expandvars(os.environ.get("HF_HOME") or default)).expanduser()


def cache_dir() -> Path:
    """`$HF_HOME/speechgpt`: the released fairseq files, conversions, presets."""
    return hf_home() / CACHE_SUBDIR


def hub_cache() -> Path:
    """The Hub cache: `$HF_HUB_CACHE`, else `$HF_HOME/hub`."""
    explicit = os.environ.get("HF_HUB_CACHE")
    return Path(explicit).expanduser() if explicit else hf_home() / "hub"


def offline() -> bool:
    """`HF_HUB_OFFLINE` as set now (a true value: 1/on/yes/true), else huggingface_hub's own setting."""
    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    if flag:
        return flag in {"1", "ON", "YES", "TRUE"}
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK_BYTES):
            h.update(block)
    return h.hexdigest()


class _HashBook:
    """`hashes.json` in one directory: sha256 per file name, recorded on first sight (unverified)."""

    NOTE = (
        "sha256 of each file, recorded the first time it was downloaded or found here (trust on first use). "
        "No hashes are published for these files, so they are unverified; they only catch later changes."
    )

    def __init__(self, directory: Path) -> None:
        self.path = directory / HASHES_FILE

    def _read(self) -> dict:
        if not self.path.is_file():
            return {"note": self.NOTE, "files": {}}
        return json.loads(self.path.read_text(encoding="utf-8"))

    def recorded(self, name: str) -> str | None:
        return self._read()["files"].get(name, {}).get("sha256")

    def record(self, name: str, digest: str, url: str, size: int) -> None:
        book = self._read()
        book["files"][name] = {
            "sha256": digest,
            "bytes": size,
            "url": url,
            "recorded": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(book, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)
        log.warning("recorded sha256 %s for %s (unverified: no hashes are published)", digest, name)

    def check(self, file: Path, url: str, what: str) -> None:
        """Record the hash of a file seen for the first time; refuse one that changed since."""
        digest = sha256_file(file)
        want = self.recorded(file.name)
        if want is None:
            self.record(file.name, digest, url, file.stat().st_size)
        elif digest != want:
            raise HashMismatchError(
                what,
                url,
                file,
                f"its sha256 {digest} differs from {want} recorded in {self.path} when it was first "
                "downloaded; if you replaced it on purpose, delete its entry there",
            )


def _check_space(directory: Path, needed: int, what: str, url: str, dest: Path) -> None:
    free = shutil.disk_usage(directory).free
    if free < needed + FREE_SPACE_MARGIN_BYTES:
        raise DiskSpaceError(
            what,
            url,
            dest,
            f"it needs {needed / 1e6:.1f} MB (+{FREE_SPACE_MARGIN_BYTES / 1e6:.0f} MB margin) but only "
            f"{free / 1e6:.1f} MB are free in {directory}",
        )


def _total_from_content_range(value: str | None) -> int | None:
    """The full size from a `Content-Range: bytes a-b/total` header, if given."""
    m = re.fullmatch(r"bytes\s+(?:\d+-\d+|\*)/(\d+)", (value or "").strip())
    return int(m.group(1)) if m else None


def download(url: str, dest: str | Path, what: str | None = None, progress: bool = True) -> Path:
    """Fetch `url` to `dest` unless it is already there; resume a `.part` file; check the hash.

    Raises MissingWeightsError (offline, network failure, incomplete transfer), DiskSpaceError,
    or HashMismatchError; the message always says where to put the file by hand.
    """
    from tqdm.auto import tqdm

    dest = Path(dest)
    what = what or dest.name
    book = _HashBook(dest.parent)
    if dest.is_file():
        book.check(dest, url, what)
        return dest
    if offline():
        raise MissingWeightsError(what, url, dest, "HF_HUB_OFFLINE is set, so it cannot be downloaded")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": f"speechgpt_app/{__version__}"}
    if have:
        headers["Range"] = f"bytes={have}-"
    total: int | None = None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S) as resp:
            if have and resp.status != 206:
                log.info("server ignored the resume request for %s; starting over", dest.name)
                have = 0
            length = resp.headers.get("Content-Length")
            remaining = int(length) if length is not None else None
            total = _total_from_content_range(resp.headers.get("Content-Range")) if have else remaining
            _check_space(dest.parent, remaining or 0, what, url, dest)
            with (
                open(part, "ab" if have else "wb") as f,
                tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=dest.name, disable=not progress) as bar,
            ):
                while block := resp.read(CHUNK_BYTES):
                    f.write(block)
                    bar.update(len(block))
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to send: the .part file is already complete
            total = _total_from_content_range(e.headers.get("Content-Range"))
        else:
            raise MissingWeightsError(what, url, dest, f"the server answered HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        raise MissingWeightsError(
            what, url, dest, f"the download failed ({e}); run again to resume from {part.name}"
        ) from e
    size = part.stat().st_size if part.is_file() else 0
    if total is not None and size != total:
        raise MissingWeightsError(
            what, url, dest, f"the download stopped at {size} of {total} bytes; run again to resume"
        )
    try:
        book.check(part.rename(dest), url, what)
    except HashMismatchError:
        dest.unlink()  # the fresh copy is the suspect one; the record stays as first seen
        raise
    return dest


def fetch_released(key: str, progress: bool = True) -> Path:
    """The local path of RELEASED[key], downloading it into the cache if needed."""
    if key not in RELEASED:
        raise KeyError(f"unknown released file {key!r}; known: {sorted(RELEASED)}")
    spec = RELEASED[key]
    return download(spec.url, cache_dir() / spec.filename, what=f"{spec.what} ({spec.filename})", progress=progress)


def ensure_released_speech_dir(progress: bool = True) -> Path:
    """The converted released speech directory; downloads and converts once, then reuses it."""
    out = PRESETS["speechgpt-7b"].speech_dir
    if (out / SPEECH_JSON).is_file():
        return out
    files = {key: fetch_released(key, progress) for key in RELEASED}
    log.info("converting the released speech files into %s (once)", out)
    write_speech_dir(
        out,
        hubert_pt=files["mhubert"],
        kmeans_bin=files["kmeans"],
        vocoder_pt=files["vocoder"],
        vocoder_config_json=files["vocoder_config"],
    )
    return out


def _hub_cached(repo_id: str, filename: str) -> bool:
    """Whether `filename` of Hub repo `repo_id` is in the Hub cache (model.py checks the rest)."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, filename, cache_dir=hub_cache()), str)


def missing_offline(spec: ReleasedSpec) -> list[str]:
    """Every part of a preset that is neither on disk nor in the Hub cache, each with how to get it.

    Offline, the parts would otherwise fail one at a time (mHuBERT first, the LM only after the
    speech files are converted); listing them all at once saves a user several round trips.
    """
    missing = []
    if not (spec.speech_dir / SPEECH_JSON).is_file():
        for f in RELEASED.values():
            dest = cache_dir() / f.filename
            if not dest.is_file():
                missing.append(f"{f.what}: download {f.url} to {dest}")
    hub = [("language model", spec.lm, "config.json")]
    if spec.adapter:
        hub.append(("LoRA adapter", spec.adapter, "adapter_config.json"))
    for what, repo_id, marker in hub:
        if not _hub_cached(repo_id, marker):
            missing.append(
                f"{what} {repo_id} (Hugging Face Hub, not in the cache {hub_cache()}): "
                f"run `hf download {repo_id}` while online"
            )
    return missing


def _ensure_preset(spec: ReleasedSpec) -> Path:
    """Write the preset's bundle.json beside its converted speech directory."""

    if offline() and (missing := missing_offline(spec)):
        raise PresetUnavailableError(spec.name, missing)
    ensure_released_speech_dir()
    if not (spec.bundle_dir / BUNDLE_FILE).is_file():
        info = BundleInfo(
            name=spec.name,
            n_units=spec.n_units,
            prompt_style="released",
            speech="speech",
            lm={"hub": spec.lm},
            adapter={"hub": spec.adapter} if spec.adapter else None,
            description=spec.description,
            provenance={"released_files": {k: f.url for k, f in RELEASED.items()}},
        )
        write_bundle(spec.bundle_dir, info)
    read_bundle(spec.bundle_dir)  # fail here, not mid-turn, if it is inconsistent
    return spec.bundle_dir


# The default model: SpeechGPT-tiny, trained by training/mini/rebuild.py and shipped in the repository.
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "assets" / "speechgpt-tiny"
EXAMPLES_DIR = DEFAULT_MODEL.parent / "examples"  # the page's example recordings, listed in examples.jsonl
EXAMPLES_FILE = "examples.jsonl"  # {"audio": file name, "text": what is said, "answer": ...} per line, in page order


@dataclass(frozen=True)
class Example:
    """A bundled example recording, what it says, and the default model's answer ("" for none)."""

    audio: Path
    text: str
    answer: str = ""


def read_examples(folder: Path = EXAMPLES_DIR) -> list[Example]:
    """The example recordings of `folder`'s examples.jsonl, in the order the page offers them."""
    lines = (folder / EXAMPLES_FILE).read_text(encoding="utf-8").splitlines()
    rows = map(json.loads, filter(str.strip, lines))
    return [Example(folder / row["audio"], row["text"], row.get("answer", "")) for row in rows]


def default_model() -> Path:
    """The shipped SpeechGPT-tiny bundle (offline, CPU), or a plain error naming how to rebuild it."""
    if not (DEFAULT_MODEL / BUNDLE_FILE).is_file():
        raise ModelNameError(
            f"the default model is missing ({DEFAULT_MODEL}); rebuild it with "
            "`python -m training.mini.rebuild --install` or name a model with --model / SPEECHGPT_MODEL"
        )
    return DEFAULT_MODEL


def resolve_model(name: str | Path) -> Path:
    """A bundle directory for `name`: a local directory holding bundle.json, or a preset.

    The preset `speechgpt-7b` is assembled in the cache: bundle.json pointing at the Hub ids of
    the LM and adapter, and the converted released speech directory.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / BUNDLE_FILE).is_file():
            return path
        raise ModelNameError(f"{path} is a directory but not a model bundle: it has no {BUNDLE_FILE}")
    if str(name) in PRESETS:
        return _ensure_preset(PRESETS[str(name)])
    raise ModelNameError(
        f"unknown model {str(name)!r}: give a bundle directory (one holding {BUNDLE_FILE}) "
        f"or a preset name ({', '.join(sorted(PRESETS))})"
    )


# ---------------------------------------------------------------------------------------------------
# CLI: `python -m speechgpt_app convert` (local files, or the released ones downloaded once)
# ---------------------------------------------------------------------------------------------------

_FILE_ARGS = ("hubert", "kmeans", "vocoder", "vocoder_config")


def configure_parser(p: argparse.ArgumentParser) -> None:
    """Arguments of `python -m speechgpt_app convert`."""
    p.description = (
        "Convert the released mHuBERT, k-means and unit-vocoder files into a speech directory. "
        "With no file arguments, download the released files and convert them into the cache once."
    )
    p.add_argument("--hubert", type=Path, help="mHuBERT fairseq checkpoint (.pt)")
    p.add_argument("--kmeans", type=Path, help="k-means quantiser (joblib .bin)")
    p.add_argument("--vocoder", type=Path, help="unit HiFi-GAN checkpoint (g_00500000)")
    p.add_argument("--vocoder-config", type=Path, help="the vocoder's config.json")
    p.add_argument("--out", type=Path, help="speech directory to write (required with file arguments)")
    p.add_argument("--layer", type=int, default=DEFAULT_LAYER, help="HuBERT layer of the units (default 11)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")


def run_cli(args: argparse.Namespace) -> int:
    """Run the convert command; errors are printed plainly and give exit status 1."""
    given = [a for a in _FILE_ARGS if getattr(args, a) is not None]
    try:
        if not given:
            if args.out is not None or args.layer != DEFAULT_LAYER:
                raise ConvertError("--out and --layer need the four file arguments; without them the "
                                   "released files are converted into the cache")
            out = ensure_released_speech_dir()
        elif len(given) < len(_FILE_ARGS) or args.out is None:
            lacking = [f"--{a.replace('_', '-')}" for a in (*_FILE_ARGS, "out") if getattr(args, a) is None]
            raise ConvertError(f"converting local files needs {', '.join(lacking)} as well")
        else:
            out = write_speech_dir(
                args.out, args.hubert, args.kmeans, args.vocoder, args.vocoder_config, args.layer, args.force
            )
    except (ConvertError, UnsafePickleError, VocoderError, MissingWeightsError, FileExistsError, FileNotFoundError) as e:
        print(f"convert: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0
