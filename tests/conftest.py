"""Shared test setup: offline, quiet, CPU-friendly; the `gpu` marker is the only allowed skip."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "tests" / "data" / "samples"  # copies of the two real recordings, with their README


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `gpu` tests only when CUDA is absent; nothing else may skip."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    """The real human recordings kept in the repository (tests/data/samples, provenance in its README)."""
    assert SAMPLES.is_dir(), f"expected the samples at {SAMPLES}"
    return SAMPLES


@pytest.fixture(scope="session")
def lj_wav(samples_dir: Path) -> Path:
    """LJ050-0131.wav: 22.05 kHz mono 16-bit, 7.66 s."""
    return samples_dir / "LJ050-0131.wav"


@pytest.fixture(scope="session")
def jfk_flac(samples_dir: Path) -> Path:
    """jfk.flac: 44.1 kHz stereo 24-bit, 11.0 s."""
    return samples_dir / "jfk.flac"
