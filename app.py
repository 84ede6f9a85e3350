"""SpeechGPT voice chat: `python app.py`, also the Hugging Face Spaces entry point.

Environment:
  SPEECHGPT_MODEL       a bundle directory or preset (`speechgpt-7b`); default: the scripted test
                        model, built once and cached (labelled on the page: it is not a trained model)
  SPEECHGPT_QUANT       none, nf4, int8 or auto (default: auto, NF4 on CUDA)
  GRADIO_SERVER_NAME    address to listen on (default 127.0.0.1)
  GRADIO_SERVER_PORT    port (default 7860)
"""

# isort: off
from speechgpt_app import spaces_compat  # first: on ZeroGPU `spaces` must load before CUDA is touched

# isort: on
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import gradio as gr

from speechgpt_app import __version__
from speechgpt_app.loaders import cache_dir
from speechgpt_app.logs import setup_logging
from speechgpt_app.pipeline import MODEL_ENV, Pipeline
from speechgpt_app.scripted import make_scripted_bundle
from speechgpt_app.ui import CSS, build_ui

log = logging.getLogger("speechgpt_app.app")

EXAMPLES_DIR = Path(__file__).resolve().parent / "assets" / "examples"
CONCURRENCY_LIMIT = 1  # turns run one at a time: one model, one device
QUEUE_SIZE = 16  # turns waiting beyond this are refused, and the user is told the queue is full
# Uploads larger than this are refused by Gradio before they reach the disk. 20 s of 8-channel 96 kHz
# float audio is 61 MB; anything far beyond the audio cap (SPEECHGPT_MAX_SECONDS) is not a question.
MAX_UPLOAD = "100mb"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860

# The default model's fixed answer. It says what it is, so nobody mistakes it for a trained model.
DEFAULT_SCRIPT = {
    "heard": "what are you",
    "answer": "I am the scripted test model, not a trained model; every answer is fixed in advance.",
    "units": [(7 * i + 3) % 50 for i in range(120)],
}


def cache_root() -> Path:
    """The project's cache (`$HF_HOME/speechgpt`), or a temporary directory if that is read-only."""
    root = cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=root)
        probe.close()
    except OSError:
        root = Path(tempfile.gettempdir()) / "speechgpt"
        root.mkdir(parents=True, exist_ok=True)
    return root


def default_model() -> Path:
    """The scripted test bundle, built on first use and reused after (keyed by version and script)."""
    key = hashlib.sha256(json.dumps([__version__, DEFAULT_SCRIPT], sort_keys=True).encode()).hexdigest()[:12]
    out = cache_root() / f"scripted-default-{key}"
    if not out.is_dir():
        log.info("building the scripted test model in %s (once)", out)
        # Build beside the target and rename, so an interrupted build never looks finished.
        work = Path(tempfile.mkdtemp(prefix=".building-", dir=out.parent))
        try:
            make_scripted_bundle(work / "bundle", **DEFAULT_SCRIPT)
            os.replace(work / "bundle", out)
        except OSError:
            if not out.is_dir():  # another process finished first
                raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return out


def load_pipeline(model: str | None, quant: str | None) -> tuple[Pipeline | None, str | None]:
    """The pipeline for `model` (default: `$SPEECHGPT_MODEL`, else the scripted test model), or why not."""
    model = model or os.environ.get(MODEL_ENV, "").strip() or None
    try:
        # Building the default scripted model can fail too (disk, a broken install): still serve the page.
        return Pipeline.load(model or default_model(), quant=quant), None
    except Exception as exc:  # the page still opens and tells every user why it cannot answer
        log.exception("could not load model %s", model or "the scripted test model")
        return None, f"{model or 'the scripted test model'}: {exc}"


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
    os.environ["GRADIO_EXAMPLES_CACHE"] = str(cache_root() / "cached_examples" / key)
    try:
        yield
    finally:
        if before is None:
            del os.environ["GRADIO_EXAMPLES_CACHE"]
        else:
            os.environ["GRADIO_EXAMPLES_CACHE"] = before


def create_app(model: str | None = None, quant: str | None = None, queue_size: int = QUEUE_SIZE) -> gr.Blocks:
    """The whole app: pipeline, page and queue, ready to launch."""
    pipeline, unavailable = load_pipeline(model, quant)
    with examples_cache_for(pipeline):
        demo = build_ui(
            pipeline,
            label=pipeline.warning if pipeline is not None else None,
            unavailable=unavailable,
            examples=sorted(EXAMPLES_DIR.glob("*.wav")),
            gpu=spaces_compat.gpu(),
        )
    return demo.queue(default_concurrency_limit=CONCURRENCY_LIMIT, max_size=queue_size)


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
