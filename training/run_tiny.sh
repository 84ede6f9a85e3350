#!/usr/bin/env bash
# The tiny recipe end to end on CPU (a few minutes on 2 cores): data -> stages 0-3 -> bundle in runs/tiny/bundle.
# Every step resumes or skips what is done; delete runs/tiny to start over. Extra arguments go to every stage
# (e.g. `--threads 4`). Set LAUNCH="accelerate launch --config_file training/accelerate/cpu_2proc.yaml" to
# run stages 1-3 in two processes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
LAUNCH=${LAUNCH:-$PY}
R=training/recipes/tiny
D=runs/tiny/data
mkdir -p "$D"

$PY -m training.data.build synth --texts $R/sentences.txt --out runs/tiny/corpus
[ -f runs/tiny/speech/speech.json ] || $PY -m training.data.build speech --manifest runs/tiny/corpus/manifest.jsonl --n-units 32 --out runs/tiny/speech
$PY -m training.data.build stage1 --manifest runs/tiny/corpus/manifest.jsonl --speech-dir runs/tiny/speech --out $D/stage1.txt
$PY -m training.data.build stage2 --manifest runs/tiny/corpus/manifest.jsonl --speech-dir runs/tiny/speech --out $D/stage2.jsonl
$PY -m training.data.build stage3 --instructions $R/instructions.jsonl --speech-dir runs/tiny/speech --out $D/stage3.jsonl

[ -f runs/tiny/stage0/model/model.safetensors ] || $PY -m training.stage0_base --config $R/stage0.yaml
$LAUNCH -m training.stage1_pretrain --config $R/stage1.yaml "$@"
$LAUNCH -m training.stage2_instruct --config $R/stage2.yaml "$@"
$LAUNCH -m training.stage3_chain --config $R/stage3.yaml "$@"
[ -f runs/tiny/bundle/bundle.json ] || $PY -m training.export --config $R/export.yaml
echo "bundle: runs/tiny/bundle  (try: $PY -m speechgpt_app ask --model runs/tiny/bundle --audio tests/data/samples/jfk.flac)"
