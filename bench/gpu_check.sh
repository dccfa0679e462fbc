#!/usr/bin/env bash
# GPU check: the NPS searches on MiniLM (cuda) and the throughput benchmark at 1 B parameters,
# printed as tables. Needs a CUDA machine; finishes in under 8 minutes on one H100/H200.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || { python3 -m venv .venv && .venv/bin/pip install -q -e '.[dev]'; }
export HF_HUB_OFFLINE=1
timeout 300 .venv/bin/python -m bench.gpu_check --generations 20
timeout 180 .venv/bin/python -m bench throughput --params 1e9 --repeat 1 --skip-zipnn --out bench/results/gpu
cat bench/results/gpu/throughput.md
