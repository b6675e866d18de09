#!/usr/bin/env bash
# Online sweep (issue #15): serve a preset with dummy weights, load it with `fleetserve bench serve`
# (400 requests 512 -> 256 tokens, Poisson arrivals, EOS ignored) at several request rates, once with
# the engine core in its own process and once with the engine in a thread of the server; JSON to $OUT.
#
# Usage (GPU machine, repo root, carried wheels in .whl/ as for gpu_run.sh):
#   MODES=process bash benchmarks/online_sweep.sh      # one device call (< 10 min for the 8B)
#   MODES=thread  bash benchmarks/online_sweep.sh      # the second call
#   MODES=vllm VLLM_MODEL_DIR=DIR bash benchmarks/online_sweep.sh   # vLLM's api_server, same workload
#     (vLLM installed under /tmp/vllm-site by ../shared/bench/vllm_peer; DIR holds config.json and a
#     tokenizer, see that README; its server gets the same max_model_len and step token budget)
# Settings (environment): MODEL (llama-3.1-8b), RATES ("16 40 80 inf"; inf = all at once: saturation),
#   NUM_PROMPTS (400), INPUT_LEN (512), OUTPUT_LEN (256), MAX_MODEL_LEN (1024), BUDGET (8192, the
#   step token budget), WARMUPS (32 requests before each server's first rate), SERVE_ARGS (extra
#   `fleetserve serve` flags), TOKENIZER (a tokenizer dir / tokenizer.json for the preset, optional;
#   without one the benchmark sends token ids and the server detokenizes nothing).
# Files: $OUT/online-<model>-<mode>-<rate>.json (bench serve results, vLLM's keys), server-<mode>.log,
#   summary-<mode>.txt, orphans-<mode>.txt (engine-core processes left after the server exited: must be empty).
#   PY (python3), SKIP_INSTALL=1 (use the current environment as is: CPU smoke runs with
#   MODEL=embedded, the SmolLM2 GGUF with dummy weights).
set -uo pipefail
OUT=${OUT:-/tmp/out}
PY=${PY:-python3}
mkdir -p "$OUT"
if [ -z "${SKIP_INSTALL:-}" ]; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
  fi
  $PY -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/pip.log" 2>&1 || { cat "$OUT/pip.log"; exit 1; }
fi
export PYTHONUNBUFFERED=1
MODEL=${MODEL:-llama-3.1-8b}
RATES=${RATES:-16 40 80 inf}
MODES=${MODES:-process thread}
NUM_PROMPTS=${NUM_PROMPTS:-400}
INPUT_LEN=${INPUT_LEN:-512}
OUTPUT_LEN=${OUTPUT_LEN:-256}
MAX_MODEL_LEN=${MAX_MODEL_LEN:-1024}
BUDGET=${BUDGET:-8192}
WARMUPS=${WARMUPS:-32}
PORT=${PORT:-8123}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
$PY -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)" > "$OUT/versions.txt" 2>&1
date -u +%FT%TZ >> "$OUT/versions.txt"
git rev-parse HEAD >> "$OUT/versions.txt" 2>/dev/null

for mode in $MODES; do
  case $mode in
    process) flag=--engine-process ;;
    thread) flag=--no-engine-process ;;
    vllm) flag= ;;
    *) echo "unknown mode $mode"; exit 2 ;;
  esac
  tok=()
  [ -n "${TOKENIZER:-}" ] && tok=(--tokenizer "$TOKENIZER")
  model_arg=("$MODEL")
  [ "$MODEL" = embedded ] && model_arg=()
  echo "=== $mode: starting server $(date -u +%H:%M:%S)"
  if [ "$mode" = vllm ]; then
    [ -n "${VLLM_MODEL_DIR:-}" ] || { echo "MODES=vllm needs VLLM_MODEL_DIR"; exit 2; }
    PYTHONPATH=/tmp/vllm-site VLLM_USE_FLASHINFER_SAMPLER=0 python3 -m vllm.entrypoints.openai.api_server \
      --model "$VLLM_MODEL_DIR" --load-format dummy --max-model-len "$MAX_MODEL_LEN" \
      --max-num-batched-tokens "$BUDGET" --host 127.0.0.1 --port "$PORT" ${VLLM_ARGS:-} >"$OUT/server-$mode.log" 2>&1 &
  else
    $PY -m fleetserve.runtime.cli serve "${model_arg[@]}" --load-format dummy --max-model-len "$MAX_MODEL_LEN" \
      --max-num-batched-tokens "$BUDGET" --host 127.0.0.1 --port "$PORT" --disable-log-requests $flag \
      "${tok[@]}" ${SERVE_ARGS:-} >"$OUT/server-$mode.log" 2>&1 &
  fi
  server=$!
  up=0
  for _ in $(seq 1 600); do
    if curl -sf "http://127.0.0.1:$PORT/health" >/dev/null 2>&1; then up=1; break; fi
    if ! kill -0 "$server" 2>/dev/null; then break; fi
    sleep 1
  done
  if [ $up != 1 ]; then
    echo "server ($mode) did not come up"; tail -30 "$OUT/server-$mode.log"; kill -9 "$server" 2>/dev/null; exit 1
  fi
  echo "=== $mode: up $(date -u +%H:%M:%S)"
  common=(--base-url "http://127.0.0.1:$PORT" --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" --ignore-eos --seed 0)
  if [ "$WARMUPS" -gt 0 ]; then
    $PY -m fleetserve.runtime.cli bench serve "${common[@]}" --num-prompts "$WARMUPS" --request-rate inf \
      >"$OUT/warmup-$mode.log" 2>&1
  fi
  for rate in $RATES; do
    echo "=== $mode: rate $rate $(date -u +%H:%M:%S)"
    $PY -m fleetserve.runtime.cli bench serve "${common[@]}" --num-prompts "$NUM_PROMPTS" --request-rate "$rate" \
      --result-file "$OUT/online-$MODEL-$mode-$rate.json" 2>&1 | tail -22
    curl -s "http://127.0.0.1:$PORT/metrics" > "$OUT/metrics-$mode-$rate.txt"
  done
  core=$(grep -o "own process (pid [0-9]*)" "$OUT/server-$mode.log" | grep -o "[0-9]*" | head -1)
  kill -TERM "$server"
  wait "$server"
  echo "server ($mode) exit code $?" | tee -a "$OUT/summary-$mode.txt"
  : > "$OUT/orphans-$mode.txt"
  if [ -n "$core" ] && kill -0 "$core" 2>/dev/null; then
    ps -o pid,stat,cmd -p "$core" >> "$OUT/orphans-$mode.txt"
  fi
  $PY - "$OUT" "$MODEL" "$mode" $RATES <<'EOF' | tee -a "$OUT/summary-$mode.txt"
import json, os, sys
out, model, mode, rates = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
print(f"{model} ({mode}) | rate | done | out tok/s | TTFT p50 / p99 ms | TPOT mean ms | ITL p99 ms | E2E mean s")
for r in rates:
    p = os.path.join(out, f"online-{model}-{mode}-{r}.json")
    if not os.path.exists(p):
        print(f"| {r} | missing |"); continue
    s = json.load(open(p))
    print(f"| {r} | {s['completed']}/{s['num_prompts']} | {s['output_throughput']:.0f} | {s['median_ttft_ms']:.0f} / "
          f"{s['p99_ttft_ms']:.0f} | {s['mean_tpot_ms']:.1f} | {s['p99_itl_ms']:.0f} | {s['mean_e2el_ms'] / 1000:.2f}")
EOF
done
