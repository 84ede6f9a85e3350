"""loaders.py against a local HTTP server: progress, resume, hashes, disk space, offline, presets."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from lm_fixtures import fake_hub_cache

from speechgpt_app import loaders
from speechgpt_app.loaders import (
    DiskSpaceError,
    HashMismatchError,
    MissingWeightsError,
    ModelNameError,
    ReleasedFile,
    download,
    ensure_released_speech_dir,
    resolve_model,
    sha256_file,
)

PAYLOAD = bytes(range(256)) * 4000  # 1 MB of known bytes


class FileServer:
    """A 127.0.0.1 server in a thread that serves `files`, honours Range, and can cut a transfer short."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.cut_after: dict[str, int] = {}  # path -> bytes sent before dropping the connection (once)
        self.ignore_range = False
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep the test output clean
                pass

            def do_GET(self) -> None:
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                if rng and not server.ignore_range:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                cut = server.cut_after.pop(self.path, None)
                self.wfile.write(body if cut is None else body[:cut])
                if cut is not None:
                    self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def server() -> Iterator[FileServer]:
    s = FileServer()
    yield s
    s.close()


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Downloads allowed, HF_HOME in tmp; returns the speechgpt cache dir."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    return tmp_path / "hf" / "speechgpt"


def test_download_shows_progress_and_records_hash(server: FileServer, online: Path, capsys: pytest.CaptureFixture) -> None:
    server.files["/w.bin"] = PAYLOAD
    dest = download(server.url("/w.bin"), online / "w.bin")
    assert dest.read_bytes() == PAYLOAD and not (online / "w.bin.part").exists()
    err = capsys.readouterr().err
    assert "w.bin" in err and "100%" in err
    book = json.loads((online / "hashes.json").read_text())
    assert book["files"]["w.bin"]["sha256"] == sha256_file(dest)
    assert book["files"]["w.bin"]["url"] == server.url("/w.bin")
    assert "unverified" in book["note"]
    download(server.url("/w.bin"), dest, progress=False)  # already there: no new request
    assert len(server.requests) == 1


def test_interrupted_download_resumes_with_range(server: FileServer, online: Path) -> None:
    server.files["/w.bin"] = PAYLOAD
    server.cut_after["/w.bin"] = 300_000
    with pytest.raises(MissingWeightsError, match="resume"):
        download(server.url("/w.bin"), online / "w.bin", progress=False)
    part = online / "w.bin.part"
    assert part.stat().st_size == 300_000 and not (online / "w.bin").exists()
    dest = download(server.url("/w.bin"), online / "w.bin", progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests[-1] == ("/w.bin", "bytes=300000-")


def test_server_ignoring_range_restarts_cleanly(server: FileServer, online: Path) -> None:
    server.files["/w.bin"] = PAYLOAD
    online.mkdir(parents=True)
    (online / "w.bin.part").write_bytes(b"stale bytes")
    server.ignore_range = True
    assert download(server.url("/w.bin"), online / "w.bin", progress=False).read_bytes() == PAYLOAD


def test_complete_part_file_is_finished_without_refetching(server: FileServer, online: Path) -> None:
    server.files["/w.bin"] = PAYLOAD
    online.mkdir(parents=True)
    (online / "w.bin.part").write_bytes(PAYLOAD)
    assert download(server.url("/w.bin"), online / "w.bin", progress=False).read_bytes() == PAYLOAD


def test_later_hash_mismatch_is_refused(server: FileServer, online: Path) -> None:
    server.files["/w.bin"] = PAYLOAD
    dest = download(server.url("/w.bin"), online / "w.bin", progress=False)
    dest.write_bytes(PAYLOAD[:-1] + b"X")  # the file changed on disk
    with pytest.raises(HashMismatchError, match="recorded in .*hashes.json"):
        download(server.url("/w.bin"), dest, progress=False)
    assert dest.exists(), "a user's file is never deleted"
    dest.unlink()
    server.files["/w.bin"] = b"something else"  # the server now sends different bytes
    with pytest.raises(HashMismatchError, match=str(dest)):
        download(server.url("/w.bin"), dest, progress=False)
    assert not dest.exists()


def test_disk_space_is_checked_first(server: FileServer, online: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server.files["/w.bin"] = PAYLOAD
    real = shutil.disk_usage

    def tiny_disk(path: str | Path) -> object:
        return real(path)._replace(free=10_000_000)  # 10 MB: less than 1 MB + the margin

    monkeypatch.setattr(loaders.shutil, "disk_usage", tiny_disk)
    with pytest.raises(DiskSpaceError, match=r"needs 1\.0 MB .* only 10\.0 MB are free"):
        download(server.url("/w.bin"), online / "w.bin", progress=False)
    assert not (online / "w.bin").exists() and not (online / "w.bin.part").exists()


def test_offline_error_names_file_url_and_path(server: FileServer, online: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    url = server.url("/w.bin")
    with pytest.raises(MissingWeightsError) as info:
        download(url, online / "w.bin", what="test weights (w.bin)")
    msg = str(info.value)
    assert "test weights (w.bin)" in msg and url in msg and str(online / "w.bin") in msg and "HF_HUB_OFFLINE" in msg
    assert server.requests == []


def test_http_error_is_a_missing_weights_error(server: FileServer, online: Path) -> None:
    with pytest.raises(MissingWeightsError, match="HTTP 404"):
        download(server.url("/nothing"), online / "nothing", progress=False)


def test_released_table_and_cache_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert loaders.RELEASED["mhubert"].url == "https://dl.fbaipublicfiles.com/hubert/mhubert_base_vp_en_es_fr_it3.pt"
    assert loaders.RELEASED["kmeans"].url.endswith("/hubert/mhubert_base_vp_en_es_fr_it3_L11_km1000.bin")
    assert loaders.RELEASED["vocoder"].url.endswith(
        "/code_hifigan/mhubert_vp_en_es_fr_it3_400k_layer11_km1000_lj/g_00500000")
    assert loaders.RELEASED["vocoder_config"].url.endswith("_lj/config.json")
    spec = loaders.PRESETS["speechgpt-7b"]
    assert (spec.lm, spec.adapter) == ("fnlp/SpeechGPT-7B-cm", "fnlp/SpeechGPT-7B-com")
    assert loaders.HUB_MODELS["ma"] == "fnlp/SpeechGPT-7B-ma"
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert loaders.cache_dir() == tmp_path / "speechgpt"
    monkeypatch.delenv("HF_HOME")
    assert loaders.cache_dir().parts[-2:] == ("huggingface", "speechgpt")


def test_released_speech_dir_downloads_then_converts_once(server: FileServer, online: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    for key, spec in loaders.RELEASED.items():
        server.files[f"/{key}"] = key.encode() * 1000
        monkeypatch.setitem(loaders.RELEASED, key, ReleasedFile(server.url(f"/{key}"), spec.filename, spec.what))
    calls = []

    def fake_convert(out: Path, **files: Path) -> Path:  # the conversion itself is tested in test_convert.py
        calls.append(files)
        out.mkdir(parents=True)
        (out / "speech.json").write_text("{}")
        return out

    monkeypatch.setattr("speechgpt_app.loaders.write_speech_dir", fake_convert)
    out = ensure_released_speech_dir(progress=False)
    assert out == online / "speechgpt-7b" / "speech"
    assert calls[0]["hubert_pt"].read_bytes() == b"mhubert" * 1000
    assert calls[0]["vocoder_config_json"] == online / "vocoder_config.json"
    n = len(server.requests)
    assert ensure_released_speech_dir(progress=False) == out
    assert len(calls) == 1 and len(server.requests) == n


def test_resolve_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from speechgpt_app.bundle import read_bundle
    from speechgpt_app.units import SpeechConfig, write_speech_config

    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / "bundle.json").write_text("{}")
    assert resolve_model(str(bundle)) == bundle
    with pytest.raises(ModelNameError, match="no bundle.json"):
        resolve_model(tmp_path)
    with pytest.raises(ModelNameError, match=r"speechgpt-7b"):
        resolve_model("gpt-5")

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingWeightsError, match="mhubert_base_vp_en_es_fr_it3.pt"):
        resolve_model("speechgpt-7b")
    # once the speech directory is converted and the Hub repos are cached, the preset is a bundle
    # pointing at the Hub
    write_speech_config(loaders.PRESETS["speechgpt-7b"].speech_dir, SpeechConfig(n_units=1000))
    _cache_hub_file(tmp_path / "hf" / "hub", "fnlp/SpeechGPT-7B-cm", "config.json")
    _cache_hub_file(tmp_path / "hf" / "hub", "fnlp/SpeechGPT-7B-com", "adapter_config.json")
    path = resolve_model("speechgpt-7b")
    info = read_bundle(path)
    assert path == tmp_path / "hf" / "speechgpt" / "speechgpt-7b"
    assert info.lm == {"hub": "fnlp/SpeechGPT-7B-cm"} and info.adapter == {"hub": "fnlp/SpeechGPT-7B-com"}
    assert info.n_units == 1000 and info.prompt_style == "released"
    assert info.context_length == 2048 and not info.generation  # LLaMA-1 7B; the released sampling settings


def _cache_hub_file(hub: Path, repo_id: str, filename: str) -> None:
    """A Hub repo holding only `filename`, in the Hub cache (what the preset's offline check looks for)."""
    files = hub.parent / "snapshot-files" / repo_id.replace("/", "--")
    files.mkdir(parents=True)
    (files / filename).write_text("{}")
    fake_hub_cache(hub, repo_id, files)


@pytest.fixture
def offline_empty(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """HF_HUB_OFFLINE=1 and an empty HF_HOME in tmp; returns HF_HOME."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf"


def _assert_names_every_part(message: str, home: Path, hub_ids: tuple[str, ...]) -> None:
    for f in loaders.RELEASED.values():
        assert f"download {f.url} to {home / 'speechgpt' / f.filename}" in message
    for repo_id in hub_ids:
        assert f"hf download {repo_id}" in message
    assert message.count("\n  - ") == len(loaders.RELEASED) + len(hub_ids)


def test_offline_preset_lists_every_missing_part_at_once(offline_empty: Path) -> None:
    with pytest.raises(MissingWeightsError) as err:
        resolve_model("speechgpt-7b")
    _assert_names_every_part(str(err.value), offline_empty, ("fnlp/SpeechGPT-7B-cm", "fnlp/SpeechGPT-7B-com"))
    assert not (offline_empty / "speechgpt" / "speechgpt-7b" / "bundle.json").exists()

    # parts already there are not listed: the fairseq files, then the LM
    for f in loaders.RELEASED.values():
        (offline_empty / "speechgpt").mkdir(parents=True, exist_ok=True)
        (offline_empty / "speechgpt" / f.filename).write_bytes(b"x")
    _cache_hub_file(offline_empty / "hub", "fnlp/SpeechGPT-7B-cm", "config.json")
    with pytest.raises(MissingWeightsError) as err:
        resolve_model("speechgpt-7b")
    assert "fnlp/SpeechGPT-7B-cm" not in str(err.value) and "dl.fbaipublicfiles.com" not in str(err.value)
    assert "hf download fnlp/SpeechGPT-7B-com" in str(err.value)


def test_offline_preset_fails_fast_from_pipeline_and_ask(offline_empty: Path, capsys: pytest.CaptureFixture) -> None:
    import time

    from speechgpt_app.cli import main
    from speechgpt_app.pipeline import Pipeline

    hub_ids = ("fnlp/SpeechGPT-7B-cm", "fnlp/SpeechGPT-7B-com")
    start = time.perf_counter()
    with pytest.raises(MissingWeightsError) as err:
        Pipeline.load("speechgpt-7b")
    _assert_names_every_part(str(err.value), offline_empty, hub_ids)
    assert main(["ask", "--model", "speechgpt-7b", "--text", "hi"]) == 2
    message = capsys.readouterr().err
    assert message.startswith("error: ")
    _assert_names_every_part(message, offline_empty, hub_ids)
    assert time.perf_counter() - start < 30  # nothing is loaded or converted before the refusal
