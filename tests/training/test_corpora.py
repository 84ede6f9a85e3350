"""Corpora: LibriSpeech/LibriLight directories and Hub parquet datasets read lazily, in order, into the builder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from speechgpt_app.audio import SAMPLE_RATE, load_audio
from training.data.build import (
    PREFETCH_PER_WORKER,
    BuildError,
    _map,
    build_stage1,
    build_stage2,
    read_progress,
)
from training.data.corpora import CorpusError, HubSpec, open_corpus, parse_hub
from training.data.formats import ManifestEntry, read_manifest, write_manifest

COMMIT = "0123456789abcdef0123456789abcdef01234567"
HUB_REPO = "speechgpt-tests/librispeech"
SPLIT = "clean/train.100"


@pytest.fixture(scope="module")
def entries(corpus: Path) -> list[ManifestEntry]:
    """The shared synthesized corpus (8 spoken sentences, 16-bit wav): the audio every layout here holds."""
    return read_manifest(corpus)


def _flac(wav: str, dest: Path) -> Path:
    """The wav as 16-bit flac: lossless, so it decodes to the same samples as the wav."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    sf.write(dest, load_audio(wav), SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return dest


def _uid(i: int) -> tuple[str, str, str]:
    """LibriSpeech-style (speaker, chapter, utterance id) for entry i: two speakers, two chapters each."""
    speaker, chapter = 100 + i // 4, 2000 + i // 2
    return str(speaker), str(chapter), f"{speaker}-{chapter}-{i % 2:04d}"


@pytest.fixture(scope="module")
def librispeech(tmp_path_factory, entries) -> Path:
    root = tmp_path_factory.mktemp("LibriSpeech") / "train-clean-100"
    for i, e in enumerate(entries):
        speaker, chapter, uid = _uid(i)
        folder = root / speaker / chapter
        _flac(e.audio, folder / f"{uid}.flac")
        with (folder / f"{speaker}-{chapter}.trans.txt").open("a") as f:
            f.write(f"{uid} {e.text.upper()}\n")
    return root


@pytest.fixture(scope="module")
def librilight(tmp_path_factory, entries) -> Path:
    root = tmp_path_factory.mktemp("librilight") / "small"
    for i, e in enumerate(entries):
        speaker, book, _ = _uid(i)
        _flac(e.audio, root / speaker / f"book_{book}" / f"{i:03d}.flac")
        (root / speaker / f"book_{book}" / f"{i:03d}.json").write_text("{}")  # LibriLight's metadata: ignored
    return root


def _audio_table(entries: list[ManifestEntry], tmp: Path, text: bool = True) -> pa.Table:
    """Rows in openslr/librispeech_asr's parquet schema: file, audio {bytes, path}, text, speaker_id, chapter_id, id."""
    rows = []
    for i, e in enumerate(entries):
        speaker, chapter, uid = _uid(i)
        data = _flac(e.audio, tmp / f"{uid}.flac").read_bytes()
        rows.append({"file": f"{uid}.flac", "audio": {"bytes": data, "path": f"{uid}.flac"}, "text": e.text,
                     "speaker_id": int(speaker), "chapter_id": int(chapter), "id": uid})  # fmt: skip
    table = pa.Table.from_pylist(rows)
    return table if text else table.drop_columns(["text"])


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, entries) -> Path:
    """A Hugging Face cache holding a snapshot of HUB_REPO: SPLIT in two files (5 + 3 rows, row groups of 2),
    another split that SPLIT must not pick up, and a split without transcripts."""
    hub = tmp_path_factory.mktemp("hf") / "hub"
    repo = hub / f"datasets--{HUB_REPO.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snap = repo / "snapshots" / COMMIT
    tmp = tmp_path_factory.mktemp("flac")
    table = _audio_table(entries, tmp)
    for name, part in (("0000", table.slice(0, 5)), ("0001", table.slice(5))):
        (snap / SPLIT).mkdir(parents=True, exist_ok=True)
        pq.write_table(part, snap / SPLIT / f"{name}.parquet", row_group_size=2)
    (snap / "clean" / "test").mkdir(parents=True)
    pq.write_table(table.slice(0, 1), snap / "clean" / "test" / "0000.parquet")
    (snap / "unlabelled").mkdir()
    pq.write_table(_audio_table(entries[:2], tmp, text=False), snap / "unlabelled" / "0000.parquet")
    (snap / "no-audio").mkdir()
    pq.write_table(pa.table({"text": ["hello"]}), snap / "no-audio" / "0000.parquet")
    return hub


@pytest.fixture
def offline_hub(monkeypatch, hub_cache) -> Path:
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub_cache


def _same_audio(a: str | bytes, b: str) -> bool:
    return np.array_equal(load_audio(a), load_audio(b))


def test_librispeech_directory_gives_transcribed_pairs_in_a_stable_order(librispeech, entries) -> None:
    corpus = open_corpus(str(librispeech))
    assert (corpus.kind, len(corpus), corpus.missing_text) == ("librispeech", 8, None)
    utts = list(corpus)
    assert [u.key for u in utts] == [_uid(i)[2] for i in range(8)]
    assert [u.text for u in utts] == [e.text.upper() for e in entries]  # kept as written
    assert all(_same_audio(u.audio, e.audio) for u, e in zip(utts, entries))
    for start in (0, 3, 8):
        assert list(corpus.iter_from(start)) == utts[start:]


def test_librilight_directory_gives_unlabelled_audio(librilight, entries) -> None:
    corpus = open_corpus(str(librilight))
    assert (corpus.kind, len(corpus)) == ("librilight", 8)
    assert "no transcripts" in corpus.missing_text
    utts = list(corpus)
    assert [u.key for u in utts][:2] == ["100/book_2000/000", "100/book_2000/001"]
    assert all(u.text is None and _same_audio(u.audio, e.audio) for u, e in zip(utts, entries))
    assert list(corpus.iter_from(5)) == utts[5:]


def test_stage1_from_librilight_equals_stage1_from_the_manifest(tmp_path, librilight, corpus, speech_dir) -> None:
    from_dir, from_manifest = tmp_path / "dir.txt", tmp_path / "manifest.txt"
    build_stage1(str(librilight), str(speech_dir), str(from_dir), workers=2)
    build_stage1(str(corpus), str(speech_dir), str(from_manifest), workers=0)
    assert from_dir.read_text().count("\n") == 8
    assert from_dir.read_bytes() == from_manifest.read_bytes()


def test_stage2_refuses_a_librilight_directory(tmp_path, librilight, speech_dir) -> None:
    with pytest.raises(BuildError, match="stage 2 needs .*transcript.*LibriLight-layout"):
        build_stage2(str(librilight), str(speech_dir), str(tmp_path / "o.jsonl"), workers=0, seed=0)


def test_a_directory_with_neither_layout_is_refused(tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CorpusError, match="neither LibriSpeech transcripts .* nor LibriLight audio"):
        open_corpus(str(tmp_path))


@pytest.mark.parametrize(
    "source, spec",
    [
        ("hf://openslr/librispeech_asr/clean/train.100", HubSpec("openslr/librispeech_asr", None, "clean/train.100/*.parquet")),
        ("hf://datasets/openslr/librispeech_asr/clean/train.100/", HubSpec("openslr/librispeech_asr", None, "clean/train.100/*.parquet")),
        ("hf://openslr/librispeech_asr@refs%2Fconvert%2Fparquet/all/train.clean.100",
         HubSpec("openslr/librispeech_asr", "refs/convert/parquet", "all/train.clean.100/*.parquet")),
        ("hf://org/name/data/train.clean.100-*.parquet", HubSpec("org/name", None, "data/train.clean.100-*.parquet")),
        ("hf://org/name", HubSpec("org/name", None, "*.parquet")),
    ],
)  # fmt: skip
def test_parse_hub(source: str, spec: HubSpec) -> None:
    assert parse_hub(source) == spec


def test_parse_hub_refuses_a_bare_name() -> None:
    with pytest.raises(CorpusError, match="not a Hub dataset; expected hf://ORG/NAME"):
        parse_hub("hf://librispeech")


def test_hub_dataset_is_read_from_the_offline_cache_in_order(offline_hub, entries) -> None:
    corpus = open_corpus(f"hf://{HUB_REPO}/{SPLIT}")
    assert (corpus.kind, len(corpus), corpus.missing_text) == ("hub", 8, None)  # clean/test is not in the split
    utts = list(corpus)
    assert [u.key for u in utts] == [f"{HUB_REPO}/{SPLIT}/0000.parquet#{r}" for r in range(5)] + [
        f"{HUB_REPO}/{SPLIT}/0001.parquet#{r}" for r in range(3)
    ]
    assert [u.text for u in utts] == [e.text for e in entries]
    assert all(isinstance(u.audio, bytes) and _same_audio(u.audio, e.audio) for u, e in zip(utts, entries))
    for start in range(9):  # skips whole files, whole row groups and rows within a group
        assert list(corpus.iter_from(start)) == utts[start:]


def test_stage2_from_the_hub_equals_stage2_from_the_manifest_and_resumes(tmp_path, offline_hub, corpus, speech_dir) -> None:
    source = f"hf://{HUB_REPO}/{SPLIT}"
    from_hub, from_manifest = tmp_path / "hub.jsonl", tmp_path / "manifest.jsonl"
    build_stage2(source, str(speech_dir), str(from_hub), workers=2, seed=7)
    build_stage2(str(corpus), str(speech_dir), str(from_manifest), workers=0, seed=7)
    assert from_hub.read_bytes() == from_manifest.read_bytes()
    assert len(from_hub.read_text().splitlines()) == 8

    # Cut the output back to 6 items, as a kill would leave it; the rebuild reads the Hub corpus from item 6.
    whole = from_hub.read_bytes()
    keep = sum(len(line) for line in whole.splitlines(keepends=True)[:6])
    Path(str(from_hub) + ".progress").write_text(json.dumps({"items": 6, "bytes": keep}))
    from_hub.write_bytes(whole[:keep] + b'{"prefix": "torn')
    build_stage2(source, str(speech_dir), str(from_hub), workers=0, seed=7)
    assert from_hub.read_bytes() == whole and read_progress(from_hub).items == 8


def test_hub_dataset_not_cached_while_offline_is_explained(monkeypatch, tmp_path, speech_dir) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BuildError) as err:
        build_stage2("hf://speechgpt-tests/no-such-dataset/clean/train.100", str(speech_dir), str(tmp_path / "o.jsonl"),
                     workers=0, seed=0)  # fmt: skip
    message = str(err.value)
    assert "'speechgpt-tests/no-such-dataset'" in message and "HF_HUB_OFFLINE=1" in message
    assert "hf download speechgpt-tests/no-such-dataset --repo-type dataset --include 'clean/train.100/*.parquet'" in message
    assert "LibriSpeech directory" in message and "JSONL manifest" in message


def test_hub_dataset_errors(offline_hub, tmp_path, speech_dir) -> None:
    with pytest.raises(CorpusError, match=f"no parquet files of the dataset '{HUB_REPO}' match 'other/\\*.parquet'"):
        open_corpus(f"hf://{HUB_REPO}/other")
    with pytest.raises(CorpusError, match="has no 'audio' column \\(its columns: text\\)"):
        open_corpus(f"hf://{HUB_REPO}/no-audio")
    unlabelled = open_corpus(f"hf://{HUB_REPO}/unlabelled")
    assert len(unlabelled) == 2 and all(u.text is None for u in unlabelled)
    with pytest.raises(BuildError, match="stage 2 needs .*no 'text' column"):
        build_stage2(f"hf://{HUB_REPO}/unlabelled", str(speech_dir), str(tmp_path / "o.jsonl"), workers=0, seed=0)


def test_manifest_is_still_a_corpus(tmp_path, entries) -> None:
    path = tmp_path / "m.jsonl"
    write_manifest(path, [entries[0], ManifestEntry(entries[1].audio)])
    corpus = open_corpus(str(path))
    assert (corpus.kind, len(corpus), corpus.missing_text) == ("manifest", 2, "line 2 has no transcript ('text')")
    assert [(u.key, u.audio, u.text) for u in corpus] == [("m.jsonl:1", entries[0].audio, entries[0].text),
                                                          ("m.jsonl:2", entries[1].audio, None)]  # fmt: skip


def test_the_process_pool_reads_only_a_few_items_ahead() -> None:
    """A corpus is consumed as the pool works through it, not submitted (and so read) whole up front."""
    read = []

    def items():
        for i in range(100):
            read.append(i)
            yield i

    results = _map(abs, items(), None, workers=2)
    assert next(results) == 0
    assert len(read) <= 2 * PREFETCH_PER_WORKER + 1
    assert list(results) == list(range(1, 100))
