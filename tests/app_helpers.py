"""Helpers shared by the app's tests: one scripted bundle per test session, and the real app.py serving it."""

from __future__ import annotations

import importlib.util
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import pytest

from speechgpt_app.scripted import make_scripted_bundle

REPO = Path(__file__).resolve().parents[1]

# What the scripted model says, whatever it is asked.
HEARD = "unless a system is established"
ANSWER = "A review keeps the system honest."
UNITS = [(11 * i + 5) % 50 for i in range(60)]


def scripted_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The scripted bundle, built on first use in this test session and shared after."""
    out = tmp_path_factory.getbasetemp() / "scripted-app-bundle"
    if not (out / "bundle.json").is_file():
        make_scripted_bundle(out, HEARD, ANSWER, UNITS)
    return out


def load_app_module() -> ModuleType:
    """app.py is a script at the repository root, not part of the package: load it from its path."""
    spec = importlib.util.spec_from_file_location("speechgpt_root_app", REPO / "app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_app(model: Path, cache: Path, **create: object) -> Iterator[str]:
    """The real app (app.create_app + app.launch) on `model`, on a free loopback port; yields its URL.

    `cache` stands in for $HF_HOME (the app keeps its cached example answers there); `create` goes
    to app.create_app.
    """
    app = load_app_module()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HOME", str(cache))
        demo = app.create_app(model=str(model), **create)
        port = free_port()
        app.launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
        try:
            yield f"http://127.0.0.1:{port}/"
        finally:
            demo.close()
