#!/usr/bin/env bash
# Smoke test of the scale-out path on a GPU machine: scripts/gpu_smoke.py (a random Qwen2.5-0.5B-shaped model,
# 2 rollout steps with DeepSpeed ZeRO-3 and vLLM where installed, throughput printed). A machine without network
# may lack deepspeed/vllm: wheels built elsewhere can travel in .whl/ (docs/scale-out.md) and are installed into
# a scratch folder first. Arguments go to the Python script.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/nft-smoke-site .whl/*.whl
  export PYTHONPATH=/tmp/nft-smoke-site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
exec "$PY" scripts/gpu_smoke.py "$@"
