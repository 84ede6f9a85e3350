"""SpeechGPT voice chat: `python app.py`, also the Hugging Face Spaces entry point.

Environment:
  SPEECHGPT_MODEL       a bundle directory or preset (`speechgpt-7b`); default: SpeechGPT-tiny, the
                        small model trained by training/mini and shipped in assets/speechgpt-tiny
  SPEECHGPT_QUANT       none, nf4, int8 or auto (default: auto, NF4 on CUDA)
  GRADIO_SERVER_NAME    address to listen on (default 127.0.0.1)
  GRADIO_SERVER_PORT    port (default 7860)
"""

# isort: off
from speechgpt_app import spaces_compat  # first: on ZeroGPU `spaces` must load before CUDA is touched

# isort: on
import hashlib
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import gradio as gr
import torch

from speechgpt_app import __version__, memory
from speechgpt_app.audio import MAX_UPLOAD_BYTES
from speechgpt_app.lm_server import ServerError, lm_url_from_env
from speechgpt_app.loaders import read_examples
from speechgpt_app.logs import setup_logging
from speechgpt_app.pipeline import MODEL_ENV, Pipeline
from speechgpt_app.ui import CSS, build_ui

log = logging.getLogger("speechgpt_app.app")

CONCURRENCY_LIMIT = 1  # turns run one at a time: one model, one device
# With the language model on a server (SPEECHGPT_LM_URL), turns run side by side: the server batches.
SERVER_CONCURRENCY = 20
CONCURRENCY_ENV = "SPEECHGPT_CONCURRENCY"
QUEUE_SIZE = 16  # turns waiting beyond this are refused, and the user is told the queue is full
# Uploads larger than this are refused by Gradio before they reach the disk. 20 s of 8-channel 96 kHz
# float audio is 61 MB; anything far beyond the audio cap (SPEECHGPT_MAX_SECONDS) is not a question.
MAX_UPLOAD = MAX_UPLOAD_BYTES
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860


def examples_cache_root() -> Path:
    """Where cached example answers go: under the system's temp folder, one of the two places Gradio
    serves files from (the working directory is the other). Never `$HF_HOME` or `assets/`: Gradio
    refuses to serve files from there, and widening its allowed paths would expose the model files."""
    return Path(tempfile.gettempdir()) / "speechgpt" / "cached_examples"


def load_pipeline(model: str | None, quant: str | None) -> tuple[Pipeline | None, str | None]:
    """The pipeline for `model` (default: `$SPEECHGPT_MODEL`, else the shipped SpeechGPT-tiny), or why not."""
    model = model or os.environ.get(MODEL_ENV, "").strip() or None
    try:
        pipeline = Pipeline.load(model, quant=quant, lm_url=lm_url_from_env())
    except Exception as exc:  # the page still opens and tells every user why it cannot answer
        log.exception("could not load model %s", model or "SpeechGPT-tiny")
        return None, f"{model or 'SpeechGPT-tiny (the default model)'}: {exc}"
    if pipeline.server is not None:
        # Turns run side by side, one thread each: one intra-op thread apiece, or twenty turns' torch
        # thread pools fight over the cores (measured: first audio 25% later under 20 turns at once).
        torch.set_num_threads(1)
    try:
        pipeline.check_server()
    except ServerError as exc:  # turns say so until the server answers; then they run, no restart
        log.warning("%s; turns are refused until it answers", exc)
    return pipeline, None


def concurrency_for(pipeline: Pipeline | None) -> int:
    """Turns at once: one with the model in this process; with a server, `$SPEECHGPT_CONCURRENCY` (20)."""
    if pipeline is None or pipeline.server is None:
        return CONCURRENCY_LIMIT
    value = os.environ.get(CONCURRENCY_ENV, "").strip()
    return int(value) if value else SERVER_CONCURRENCY


@contextmanager
def examples_cache_for(pipeline: Pipeline | None) -> Iterator[None]:
    """Cache example answers per model: Gradio's default folder (.gradio/cached_examples/<n>) would
    serve one model's cached answers for another. Gradio reads the folder when the page is built."""
    if pipeline is None:
        yield
        return
    bundle = Path(pipeline.bundle_dir).resolve()
    stamp = (bundle / "bundle.json").stat().st_mtime_ns
    key = hashlib.sha256(f"{__version__}|{bundle}|{stamp}".encode()).hexdigest()[:12]
    before = os.environ.get("GRADIO_EXAMPLES_CACHE")
    os.environ["GRADIO_EXAMPLES_CACHE"] = str(examples_cache_root() / key)
    try:
        yield
    finally:
        if before is None:
            del os.environ["GRADIO_EXAMPLES_CACHE"]
        else:
            os.environ["GRADIO_EXAMPLES_CACHE"] = before


def create_app(model: str | None = None, quant: str | None = None, queue_size: int = QUEUE_SIZE) -> gr.Blocks:
    """The whole app: pipeline, page and queue, ready to launch."""
    memory.limit_arenas()  # a long-running server: its resident memory stays flat (memory.py)
    pipeline, unavailable = load_pipeline(model, quant)
    with examples_cache_for(pipeline):
        demo = build_ui(
            pipeline,
            label=pipeline.warning if pipeline is not None else None,
            unavailable=unavailable,
            examples=[e.audio for e in read_examples()],
            gpu=spaces_compat.gpu(),
        )
    concurrency = concurrency_for(pipeline)
    return demo.queue(default_concurrency_limit=concurrency, max_size=max(queue_size, concurrency))


def launch(demo: gr.Blocks, **overrides) -> None:
    """Serve the app where the environment says (overrides win: tests pick a free port)."""
    options = {
        "server_name": os.environ.get("GRADIO_SERVER_NAME", DEFAULT_HOST),
        "server_port": int(os.environ.get("GRADIO_SERVER_PORT", DEFAULT_PORT)),
        "theme": gr.themes.Soft(),
        "css": CSS,
        "max_file_size": MAX_UPLOAD,
        **overrides,
    }
    demo.launch(**options)


if __name__ == "__main__":
    setup_logging()
    launch(create_app())
