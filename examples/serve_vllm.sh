#!/usr/bin/env bash
# Serve a routealign checkpoint with vLLM on a GPU machine. vLLM needs its own environment (it pins its own torch
# and transformers): do not install it into routealign's venv.
#
#   python3 -m venv ~/vllm-env && ~/vllm-env/bin/pip install vllm
#   bash examples/serve_vllm.sh qwen-vsraq-w4a16
#
# Not run in this project's CI (no GPU there); which kernels vLLM picks for W4A16 and NVFP4 MoE layers depends on
# the GPU and the vLLM version.
set -euo pipefail
CHECKPOINT=${1:?usage: serve_vllm.sh CHECKPOINT_DIR [PORT]}
PORT=${2:-8000}
VLLM=${VLLM:-~/vllm-env/bin/vllm}
"$VLLM" serve "$CHECKPOINT" --port "$PORT" --max-model-len 2048 &
PID=$!
trap 'kill $PID' EXIT
for _ in $(seq 120); do curl -sf "http://127.0.0.1:$PORT/v1/models" >/dev/null && break; sleep 2; done
curl -s "http://127.0.0.1:$PORT/v1/completions" -H 'Content-Type: application/json' \
  -d "{\"model\": \"$CHECKPOINT\", \"prompt\": \"The history of the\", \"max_tokens\": 32}"
echo
