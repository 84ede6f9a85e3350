"""Speech corpora for the builder: a JSONL manifest, a LibriSpeech/LibriLight directory, or a Hub dataset.

    open_corpus("runs/tiny/corpus/manifest.jsonl")             # FORMATS.md manifest
    open_corpus("/data/LibriSpeech/train-clean-100")            # <spk>/<chapter>/<spk>-<chapter>.trans.txt + .flac
    open_corpus("/data/librilight/small")                       # <spk>/<book>/*.flac, no transcripts
    open_corpus("hf://openslr/librispeech_asr/clean/train.100")  # parquet files of a Hub dataset

A corpus is read lazily, in one fixed order, from any position (`iter_from`), and every utterance
carries a stable key: the builder resumes by position and names skipped items by key. Only the
list of files (never the audio) is held in memory.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path
from urllib.parse import unquote

from training.data.formats import DataFormatError, iter_manifest

HUB_SCHEME = "hf://"
PARQUET_BATCH_ROWS = 16  # rows decoded from parquet at a time: LibriSpeech rows hold ~0.3 MB of flac each
LIBRISPEECH_URL = "https://www.openslr.org/12"
LIBRILIGHT_URL = "https://github.com/facebookresearch/libri-light"
FORMS = (
    "a corpus is a JSONL manifest ({\"audio\": path, \"text\": transcript} per line), a LibriSpeech directory "
    f"(<speaker>/<chapter>/<speaker>-<chapter>.trans.txt beside the .flac files, {LIBRISPEECH_URL}), a LibriLight "
    f"directory (<speaker>/<book>/*.flac, {LIBRILIGHT_URL}), or a Hub dataset hf://ORG/NAME[@REVISION][/FOLDER-OR-GLOB] "
    "(e.g. hf://openslr/librispeech_asr/clean/train.100)"
)

# hf://[datasets/]ORG/NAME[@REVISION][/PATH]; the revision may be URL-encoded (refs%2Fconvert%2Fparquet)
_HUB = re.compile(r"^hf://(?:datasets/)?(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[^/]+))?(?:/(?P<path>.*))?$")


class CorpusError(RuntimeError):
    """A corpus that cannot be found or read; the message says what is needed and where to get it."""


@dataclass(frozen=True)
class Utterance:
    """One recording: its stable key, the audio (a file path, or an encoded file's bytes), its transcript."""

    key: str
    audio: str | bytes
    text: str | None = None


@dataclass(frozen=True)
class Corpus:
    """A sized, ordered, lazily read collection of utterances."""

    source: str  # as given on the command line
    kind: str  # "manifest", "librispeech", "librilight" or "hub"
    size: int
    missing_text: str | None  # why some utterance has no transcript; None when all have one
    read: Callable[[int], Iterator[Utterance]]  # the utterances from position `start` on

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[Utterance]:
        return self.read(0)

    def iter_from(self, start: int) -> Iterator[Utterance]:
        """The utterances from position `start` on (what a resumed build has left)."""
        return self.read(start)


def open_corpus(source: str) -> Corpus:
    """A manifest file, a LibriSpeech/LibriLight directory (decided by what it holds), or hf://ORG/NAME/..."""
    if source.startswith(HUB_SCHEME):
        return _hub_corpus(source)
    path = Path(source).expanduser()
    if path.is_dir():
        return _directory_corpus(source, path)
    if path.is_file():
        return _manifest_corpus(source, path)
    raise CorpusError(f"the manifest or corpus directory {source} does not exist; {FORMS}")


# ---------------------------------------------------------------------------------------------------
# Manifests and local directories
# ---------------------------------------------------------------------------------------------------


def _manifest_corpus(source: str, path: Path) -> Corpus:
    size, missing = 0, None
    for n, entry in iter_manifest(path):  # one pass over the text lines: checks them, counts them
        size += 1
        if missing is None and not entry.text:
            missing = f"line {n} has no transcript ('text')"
    return Corpus(source, "manifest", size, missing, partial(_read_manifest, path))


def _read_manifest(path: Path, start: int) -> Iterator[Utterance]:
    for n, entry in islice(iter_manifest(path), start, None):
        yield Utterance(f"{path.name}:{n}", entry.audio, entry.text)


def _directory_corpus(source: str, path: Path) -> Corpus:
    transcripts = sorted(path.rglob("*.trans.txt"))
    if transcripts:
        size = sum(1 for _ in _transcript_lines(transcripts))
        return Corpus(source, "librispeech", size, None, partial(_read_librispeech, transcripts))
    flacs = sorted(path.rglob("*.flac"))
    if flacs:
        missing = "a LibriLight-layout directory (*.flac without *.trans.txt) holds no transcripts"
        return Corpus(source, "librilight", len(flacs), missing, partial(_read_librilight, path, flacs))
    raise CorpusError(
        f"{source} holds neither LibriSpeech transcripts (<speaker>/<chapter>/<speaker>-<chapter>.trans.txt) "
        f"nor LibriLight audio (<speaker>/<book>/*.flac); {FORMS}"
    )


def _transcript_lines(transcripts: list[Path]) -> Iterator[tuple[Path, str, str]]:
    """(folder, utterance id, transcript) per line of LibriSpeech's `<id> <TRANSCRIPT>` files."""
    for trans in transcripts:
        with trans.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                uid, _, text = line.strip().partition(" ")
                if not text.strip():
                    raise DataFormatError(f"{trans}:{n}: expected '<utterance id> <transcript>'")
                yield trans.parent, uid, text.strip()


def _read_librispeech(transcripts: list[Path], start: int) -> Iterator[Utterance]:
    # The transcript is kept as written (LibriSpeech's upper case): nothing a corpus says is changed.
    for folder, uid, text in islice(_transcript_lines(transcripts), start, None):
        yield Utterance(uid, str(folder / f"{uid}.flac"), text)


def _read_librilight(root: Path, flacs: list[Path], start: int) -> Iterator[Utterance]:
    for flac in flacs[start:]:
        yield Utterance(flac.relative_to(root).with_suffix("").as_posix(), str(flac))


# ---------------------------------------------------------------------------------------------------
# Hugging Face Hub datasets (parquet files with an `audio` {bytes, path} column and a `text` column)
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HubSpec:
    """What hf://ORG/NAME[@REVISION][/FOLDER-OR-GLOB] names: a dataset repo and the parquet files to read."""

    repo_id: str
    revision: str | None
    pattern: str  # an allow_patterns glob over the repo's paths

    def download_command(self) -> str:
        """The `hf download` line that puts these files in the cache."""
        rev = f" --revision {self.revision}" if self.revision else ""
        return f"hf download {self.repo_id} --repo-type dataset --include '{self.pattern}'{rev}"


def parse_hub(source: str) -> HubSpec:
    """hf://ORG/NAME[@REVISION][/PATH]: PATH is a folder (its *.parquet files, at any depth) or a glob;
    none reads every parquet file. `hf://datasets/ORG/NAME/...` (HfFileSystem's form) is accepted too."""
    m = _HUB.match(source)
    if not m:
        raise CorpusError(f"{source!r} is not a Hub dataset; expected hf://ORG/NAME[@REVISION][/FOLDER-OR-GLOB]")
    path = (m["path"] or "").strip("/")
    if not path:
        pattern = "*.parquet"
    elif any(c in path for c in "*?["):
        pattern = path
    else:
        pattern = f"{path}/*.parquet"
    return HubSpec(m["repo"], unquote(m["rev"]) if m["rev"] else None, pattern)


def _hub_corpus(source: str) -> Corpus:
    import pyarrow.parquet as pq

    spec = parse_hub(source)
    root = _hub_snapshot(spec)
    files = sorted(
        p for p in root.rglob("*.parquet") if fnmatch.fnmatch(p.relative_to(root).as_posix(), spec.pattern)
    )
    if not files:
        raise CorpusError(f"no parquet files of the dataset {spec.repo_id!r} match {spec.pattern!r} (in {root}); {FORMS}")
    size, missing = 0, None
    for f in files:
        meta = pq.ParquetFile(f).metadata
        names = meta.schema.to_arrow_schema().names
        if "audio" not in names:
            raise CorpusError(f"{f} has no 'audio' column (its columns: {', '.join(names)})")
        if missing is None and "text" not in names:
            missing = f"{f.relative_to(root)} has no 'text' column"
        size += meta.num_rows
    return Corpus(source, "hub", size, missing, partial(_read_parquet, spec.repo_id, root, files))


def _hub_snapshot(spec: HubSpec) -> Path:
    """The cached snapshot holding the spec's files, downloaded unless HF_HUB_OFFLINE is set."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from speechgpt_app.loaders import hub_cache, offline

    no_network = offline()
    local = f"or pass a local LibriSpeech/LibriLight directory or a JSONL manifest instead ({FORMS})"
    try:
        return Path(
            snapshot_download(
                spec.repo_id,
                repo_type="dataset",
                revision=spec.revision,
                allow_patterns=[spec.pattern],
                local_files_only=no_network,
                cache_dir=hub_cache(),
            )
        )
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, IncompleteSnapshotError) as e:
        why = "HF_HUB_OFFLINE=1 forbids downloading it" if no_network else f"the Hub could not be reached ({e})"
        raise CorpusError(
            f"the dataset {spec.repo_id!r} ({spec.pattern}) is not (completely) in the Hugging Face cache "
            f"({hub_cache()}), and {why}. Download it once with `{spec.download_command()}` (online), {local}"
        ) from e
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise CorpusError(f"the Hub has no dataset {spec.repo_id!r} (revision {spec.revision or 'main'}): {e}; {local}") from e
    except (HfHubHTTPError, OSError) as e:
        raise CorpusError(f"could not download the dataset {spec.repo_id!r} from the Hugging Face Hub: {e}; {local}") from e


def _read_parquet(repo_id: str, root: Path, files: list[Path], start: int) -> Iterator[Utterance]:
    """Rows from position `start` on; whole files and row groups before it are skipped from metadata."""
    import pyarrow.parquet as pq

    for f in files:
        pf = pq.ParquetFile(f)
        if start >= pf.metadata.num_rows:
            start -= pf.metadata.num_rows
            continue
        row, groups = 0, []
        for g in range(pf.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if groups or start < n:
                groups.append(g)
            else:
                start, row = start - n, row + n
        has_text = "text" in pf.schema_arrow.names
        name = f.relative_to(root).as_posix()
        for batch in pf.iter_batches(PARQUET_BATCH_ROWS, row_groups=groups, columns=["audio"] + ["text"] * has_text):
            audio = batch.column("audio").to_pylist()
            texts = batch.column("text").to_pylist() if has_text else [None] * len(audio)
            for value, text in zip(audio, texts):
                if start:  # rows of the first kept group that a resumed build already has
                    start, row = start - 1, row + 1
                    continue
                data = value.get("bytes") if isinstance(value, dict) else value
                yield Utterance(f"{repo_id}/{name}#{row}", data or b"", text)  # no bytes: load_audio says "empty"
                row += 1
