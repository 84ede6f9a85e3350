"""Hugging Face ZeroGPU support that costs nothing anywhere else.

On a ZeroGPU Space (`SPACES_ZERO_GPU=true`), a GPU is attached only while a function decorated
with `spaces.GPU` runs, and the `spaces` package must be imported before anything initialises
CUDA: `app.py` imports this module first for that reason. Everywhere else `gpu(...)` returns the
function unchanged and `spaces` is not imported at all.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

ZERO_GPU_ENV = "SPACES_ZERO_GPU"  # set to "true" by Hugging Face on ZeroGPU hardware
DEFAULT_GPU_SECONDS = 120  # GPU time asked for one turn; ZeroGPU queues longer requests behind shorter ones

F = TypeVar("F", bound=Callable)


def on_zero_gpu(env: dict[str, str] | None = None) -> bool:
    """Whether this process runs on ZeroGPU hardware."""
    value = (os.environ if env is None else env).get(ZERO_GPU_ENV, "")
    return value.strip().lower() in {"1", "true", "yes"}


ON_ZERO_GPU = on_zero_gpu()
if ON_ZERO_GPU:
    import spaces  # noqa: F401  # must come before CUDA is touched; patches torch for ZeroGPU


def gpu(duration: int = DEFAULT_GPU_SECONDS) -> Callable[[F], F]:
    """`spaces.GPU(duration=...)` on ZeroGPU; elsewhere a decorator that returns the function as is."""

    def wrap(fn: F) -> F:
        if not ON_ZERO_GPU:
            return fn
        import spaces

        return spaces.GPU(duration=duration)(fn)

    return wrap
