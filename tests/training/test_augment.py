"""Augmentation: a changed but still speech-length, same-level, finite signal, fixed by its seed."""

from __future__ import annotations

import random

import numpy as np

from training.data import augment


def test_augment_changes_the_signal_within_its_ranges() -> None:
    t = np.arange(32000) / 16000
    wav = (0.5 * np.sin(2 * np.pi * 220 * t) * (t < 1.5)).astype(np.float32)
    impulse = np.exp(-np.arange(1600) / 200).astype(np.float32)
    opts = augment.AugmentOptions(reverb_prob=1.0, noise_prob=1.0)
    out = augment.augment(wav, random.Random(3), [impulse], opts)
    again = augment.augment(wav, random.Random(3), [impulse], opts)
    assert np.array_equal(out, again)  # the seed decides everything
    assert out.dtype == np.float32 and np.isfinite(out).all()
    assert 2.0 / opts.tempo[1] - 0.05 <= len(out) / 16000 <= 2.0 / opts.tempo[0] + 0.05
    assert abs(np.abs(out).max() - 0.5) < 1e-3  # the original peak level
    assert not np.allclose(out[: len(wav)], wav[: len(out)], atol=1e-2)
