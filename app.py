"""SpeechGPT voice chat: `python app.py` (also the Hugging Face Spaces entry point).

Placeholder until the pipeline and UI land: it serves a page that says which model it would run.
"""

from __future__ import annotations

import os

import gradio as gr

from speechgpt_app.logs import setup_logging

MODEL = os.environ.get("SPEECHGPT_MODEL", "none yet (the pipeline is being built)")


def build() -> gr.Blocks:
    """The page: for now, only the model line."""
    with gr.Blocks(title="SpeechGPT") as demo:
        gr.Markdown(f"# SpeechGPT\n\nModel: **{MODEL}**")
    return demo


if __name__ == "__main__":
    setup_logging()
    build().launch(server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
