"""Logging is configured here, once, by the entry points (CLI, app, training scripts)."""

from __future__ import annotations

import logging
import os

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str | int | None = None) -> None:
    """Configure the root logger once; `SPEECHGPT_LOG` (e.g. DEBUG) overrides the level."""
    level = level or os.environ.get("SPEECHGPT_LOG", "INFO")
    root = logging.getLogger()
    if getattr(setup_logging, "_done", False):
        root.setLevel(level)
        return
    logging.basicConfig(level=level, format=_FORMAT, datefmt="%H:%M:%S")
    # Third-party libraries are chatty at INFO; keep their warnings only.
    for noisy in ("httpx", "urllib3", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    setup_logging._done = True  # type: ignore[attr-defined]
