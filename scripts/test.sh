#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite: lint, then pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
bash scripts/vllm.sh setup  # tests/test_lm_server.py starts a real vLLM server from .venv-vllm
export GRADIO_ANALYTICS_ENABLED=False HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python -m ruff check .
exec .venv/bin/python -m pytest "$@"
