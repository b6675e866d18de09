#!/usr/bin/env bash
# One device call: install the carried wheels, run the GPU test tier, then the throughput
# benchmark side by side with the HF static baseline for the two anchor shapes.
# Usage (on the GPU machine, repo root): bash benchmarks/gpu_run.sh [steps...]
#   steps: tests, bench-1b, bench-8b (default: all)
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/pip.log" 2>&1 || { cat "$OUT/pip.log"; exit 1; }
steps=${*:-tests bench-1b bench-8b}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
for step in $steps; do
  echo "=== $step $(date -u +%H:%M:%S)"
  case $step in
    tests) PYTHONSAFEPATH=1 timeout 250 python3 -m pytest -q -s -m gpu -p no:cacheprovider tests/runtime tests/kernels tests/server/test_gpu_server.py 2>&1 | grep -v -i warn | tail -60 | tee "$OUT/gpu-tests.log" ;;
    bench-1b) timeout 200 python3 -m fleetserve.runtime.bench.throughput --model llama-3.2-1b --baseline hf --hf-batch-size 128 --output-json "$OUT/bench-1b.json" 2>&1 | grep -v Warning | tee "$OUT/$step.log" | tail -12 ;;
    bench-8b) timeout 300 python3 -m fleetserve.runtime.bench.throughput --model llama-3.1-8b --baseline hf --hf-batch-size 64 --output-json "$OUT/bench-8b.json" 2>&1 | grep -v Warning | tee "$OUT/$step.log" | tail -12 ;;
  esac
done
