#!/usr/bin/env bash
# Set up (if needed) and start the voice chat on http://127.0.0.1:7860.
# SPEECHGPT_MODEL picks the model (default: the small model shipped in assets/),
# GRADIO_SERVER_NAME / GRADIO_SERVER_PORT pick where to listen.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export GRADIO_ANALYTICS_ENABLED=${GRADIO_ANALYTICS_ENABLED:-False}
exec .venv/bin/python app.py "$@"
