"""Shared fixtures for the training tests: a tiny synthesized corpus, its speech tokenizer, and
isolation of the process-wide state a training run touches (torch threads, RNGs, Accelerate)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "training" / "recipes" / "tiny"
N_UNITS = 32  # the tiny recipe's speech units


@pytest.fixture(autouse=True)
def _restore_process_state():
    """Training sets torch's thread count, seeds every RNG and builds Accelerate's singleton state:
    put all of it back so no other test sees a change."""
    threads = torch.get_num_threads()
    torch_rng, np_rng, py_rng = torch.get_rng_state(), np.random.get_state(), random.getstate()
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    torch.set_num_threads(threads)
    torch.set_rng_state(torch_rng)
    np.random.set_state(np_rng)
    random.setstate(py_rng)


@pytest.fixture(scope="session")
def sentences(tmp_path_factory) -> Path:
    """The first 8 sentences of the tiny recipe's text (the project's own data)."""
    path = tmp_path_factory.mktemp("text") / "sentences.txt"
    path.write_text("\n".join((TINY / "sentences.txt").read_text().splitlines()[:8]) + "\n")
    return path


@pytest.fixture(scope="session")
def corpus(tmp_path_factory, sentences: Path) -> Path:
    """8 sentences spoken by seeded espeak-ng/flite voices: the manifest path."""
    from training.data.build import build_synth_corpus

    out = tmp_path_factory.mktemp("corpus")
    return build_synth_corpus(str(sentences), str(out), workers=2, seed=0, backends=("espeak-ng", "flite"))


@pytest.fixture(scope="session")
def speech_dir(tmp_path_factory, corpus: Path) -> Path:
    """A logmel speech tokenizer with N_UNITS centres fitted (units.kmeans) on the corpus."""
    from training.data.build import fit_speech_dir

    return fit_speech_dir(str(corpus), str(tmp_path_factory.mktemp("speech")), N_UNITS, seed=0)
