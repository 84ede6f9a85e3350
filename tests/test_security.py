"""Safe by construction: each property checked on the code or on the running app.

- user text is never read as a file path; uploads come only from Gradio's temp folder, under a size cap;
- `torch.load` only with `weights_only=True`, except the converter's allow-list unpickler;
- `trust_remote_code` is never turned on;
- the app binds to 127.0.0.1 unless told otherwise; Gradio is pinned at 6.16 or later;
- the running app's file routes refuse /etc/passwd and the model's files;
- the app's files are deleted after the stated retention time (said in the README).
"""

from __future__ import annotations

import ast
import os
import re
import time
from pathlib import Path

import httpx
import pytest
from app_helpers import GREEDY, REPO, TINY, load_app_module, running_app

from speechgpt_app.generate import SamplingOptions
from speechgpt_app.pipeline import Options, Pipeline

SOURCES = sorted([*REPO.glob("speechgpt_app/*.py"), *REPO.glob("training/**/*.py"), REPO / "app.py"])


def calls(name: str) -> list[tuple[Path, ast.Call]]:
    """Every call of `…name(...)` in the package, the training code and app.py."""
    found = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                fn = node.func
                if (isinstance(fn, ast.Attribute) and fn.attr == name) or (isinstance(fn, ast.Name) and fn.id == name):
                    found.append((path, node))
    return found


def keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def test_torch_load_only_with_weights_only_except_the_allow_list_unpickler() -> None:
    loads = calls("load")
    torch_loads = [(p, c) for p, c in loads if isinstance(c.func, ast.Attribute) and ast.unparse(c.func) == "torch.load"]
    assert torch_loads, "expected torch.load calls to check"
    for path, call in torch_loads:
        weights_only = keyword(call, "weights_only")
        if path.name == "convert.py" and ast.unparse(keyword(call, "pickle_module") or ast.Constant(None)) == "_fairseq_pickle":
            continue  # fairseq checkpoints: the allow-list unpickler (convert._fairseq_pickle), tested in test_convert
        assert isinstance(weights_only, ast.Constant) and weights_only.value is True, f"{path}:{call.lineno}"


def test_trust_remote_code_is_never_on() -> None:
    for path in SOURCES:
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"trust_remote_code\s*=\s*(True|1|[a-z_]+)", text), path


def test_user_text_is_never_read_as_a_file_path(tmp_path: Path) -> None:
    secret = tmp_path / "secret.wav"
    secret.write_bytes(b"not for the model")
    pipeline = Pipeline.load(str(TINY))
    for text in (str(secret), "/etc/passwd", "file:///etc/passwd", "../../etc/passwd"):
        request = pipeline.prepare(text=text, options=Options(SamplingOptions(**GREEDY), output="text"))
        assert text in request.user and "not for the model" not in request.prompt  # the words, not the file


def test_the_app_binds_to_loopback_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    app = load_app_module()
    seen: dict = {}

    class Demo:
        def launch(self, **options):
            seen.update(options)

    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    app.launch(Demo())
    assert seen["server_name"] == "127.0.0.1" and seen["max_file_size"] == app.MAX_UPLOAD
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")  # a Space says so
    app.launch(Demo())
    assert seen["server_name"] == "0.0.0.0"


def test_gradio_is_pinned_past_the_path_traversal_advisories() -> None:
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==([0-9.]+)", (REPO / "requirements.txt").read_text(), re.M))
    assert tuple(int(v) for v in pins["gradio"].split(".")[:2]) >= (6, 16)


def test_file_routes_refuse_system_and_model_files(tmp_path_factory: pytest.TempPathFactory) -> None:
    weights = next(TINY.rglob("*.safetensors"))
    with running_app(TINY, tmp_path_factory.mktemp("hf")) as url:
        for target in ("/etc/passwd", str(weights), str(REPO / "app.py"), "../../../../etc/passwd",
                       "%2Fetc%2Fpasswd", str(TINY / "bundle.json")):  # fmt: skip
            response = httpx.get(f"{url}gradio_api/file={target}", timeout=30)
            assert response.status_code in (403, 404), (target, response.status_code)
            assert "root:" not in response.text and b"safetensors" not in response.content[:64]
        # A client may not hand the app a server path as its upload either (the raw API: gradio_client
        # would upload its own local copy of the file instead).
        forged = {"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}, "orig_name": "passwd.wav"}
        args = [forged, "", "Chat", 0.0, 0.8, 50, 64, 0, "Text only"]
        event = httpx.post(f"{url}gradio_api/call/send", json={"data": args}, timeout=30).json()["event_id"]
        stream = httpx.get(f"{url}gradio_api/call/send/{event}", timeout=60).text
        assert "event: error" in stream and "root:" not in stream
        assert "Could not read passwd" not in stream  # refused before the audio stage opened it

def test_app_files_are_deleted_after_the_stated_retention(tmp_path: Path) -> None:
    from speechgpt_app.ui import CACHE_SWEEP_SECONDS, RETENTION_SECONDS, ChatApp, build_ui

    app = ChatApp(None, "no model", tmp_path)
    old = app._new_file("session-a", "answer", ".wav")
    two_days_ago = time.time() - 2 * 86400
    os.utime(old, (two_days_ago, two_days_ago))
    fresh = app._new_file("session-b", "answer", ".wav")  # writing a file sweeps the old ones
    assert not old.exists() and not old.parent.exists() and fresh.exists()
    demo = build_ui(None, unavailable="no model")
    assert demo.delete_cache == (CACHE_SWEEP_SECONDS, RETENTION_SECONDS)  # Gradio's uploads, the same time
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert f"{RETENTION_SECONDS // 3600} hours" in readme
