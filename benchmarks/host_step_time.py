"""Host time per engine step at a large decode batch, on the CPU, with a tiny model.

The model is so small (1 layer, hidden 64, vocab 512) that the forward pass and the
sampler take little time; what is left is the host work of a step: scheduling,
building the step's input and sampling tensors, the scheduler update, stop checks
and output assembly. Forward, compute_logits and the sampler are timed separately
and subtracted ("host" = step - forward - sampler). Times are the CPU time of the
engine thread (time.thread_time, torch limited to that one thread), which is far
less disturbed by other processes on a shared machine than wall time.

    OMP_NUM_THREADS=1 python benchmarks/host_step_time.py --batch 256 --steps 200

On the GPU machine, `--device cuda --model llama-3.2-1b` times the same stages of the real
preset (dummy weights, CUDA graphs, async scheduling): there the forward pass and the sampler
only queue work, so every stage's thread time is host time, the number the decode step is
bound by. The stages (schedule, prepare_inputs, sampling tensors, scheduler update with the
stop checks, output processing, readback) show where a host regression sits.

Results of runs are kept in benchmarks/results/ (see its README).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

from fleetserve.runtime.config import EngineConfig
from fleetserve.runtime.engine import LLMEngine
from fleetserve.runtime.sampler import SamplingTensors
from fleetserve.runtime.sampling_params import SamplingParams

TINY = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "vocab_size": 512,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}


class _Timer:
    """Wraps a callable and sums the thread CPU time spent in it."""

    def __init__(self, fn):
        self.fn, self.total = fn, 0.0

    def __call__(self, *a, **kw):
        t0 = time.thread_time()
        try:
            return self.fn(*a, **kw)
        finally:
            self.total += time.thread_time() - t0


def run(
    batch: int, steps: int, prompt_len: int, sampling: str, device: str = "cpu", model: str = "tiny"
) -> dict:
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(TINY, f)
        cuda = device == "cuda"
        engine = LLMEngine(
            EngineConfig(
                model=d if model == "tiny" else model,
                load_format="dummy",
                device=device,
                dtype="bfloat16" if cuda else "float32",
                max_num_seqs=batch,
                max_num_batched_tokens=max(2048, batch * prompt_len),
                num_kv_blocks=None if cuda else batch * (prompt_len + steps + 40) // 16 + 64,
                max_model_len=prompt_len + steps + 32,
                async_scheduling=cuda,
            )
        )
    model, runner = engine.runner.model, engine.runner
    fwd = _Timer(model.forward)
    logits = _Timer(model.compute_logits)
    sampler = _Timer(runner.sampler.__call__)
    model.forward, model.compute_logits = fwd, logits  # instance attributes shadow the methods
    runner.sampler = sampler
    # The runner's named host stages (absent in older versions of the runner).
    stages = {}
    if hasattr(runner, "plan_step"):  # prepare_inputs = plan_step (host arrays) + stage_inputs
        stages["prepare_inputs"] = runner.plan_step = _Timer(runner.plan_step)
    elif hasattr(runner, "prepare_inputs"):
        stages["prepare_inputs"] = runner.prepare_inputs = _Timer(runner.prepare_inputs)
    sched = engine.scheduler
    stages["schedule"] = sched.schedule = _Timer(sched.schedule)
    stages["update_and_stop"] = sched.update = _Timer(sched.update)
    stages["collect"] = runner.collect = _Timer(runner.collect)
    stages["process"] = engine._process = _Timer(engine._process)
    build = _Timer(SamplingTensors.build)
    SamplingTensors.build = build  # type: ignore[method-assign]
    stages["sampling_tensors_build"] = build
    if sampling == "greedy":
        params = [
            SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True) for _ in range(batch)
        ]
    else:  # a mix that exercises every SamplingTensors stage but penalties
        params = [
            SamplingParams(
                temperature=0.8,
                top_p=0.9,
                top_k=50,
                seed=i,
                max_tokens=steps + 8,
                ignore_eos=True,
                logit_bias={5: 1.0},
                min_tokens=4,
            )
            for i in range(batch)
        ]
    g = torch.Generator().manual_seed(0)
    for i, p in enumerate(params):
        engine.add_request(f"r{i}", torch.randint(3, 512, (prompt_len,), generator=g).tolist(), p)
    for _ in range(3):  # prefill + warm-up decode steps
        engine.step()
    times, device = [], []
    per_stage: dict[str, list[float]] = {k: [] for k in stages}
    try:
        for _ in range(steps):
            f0, l0, s0 = fwd.total, logits.total, sampler.total
            before = {k: t.total for k, t in stages.items()}
            t0 = time.thread_time()
            outs = engine.step()
            times.append(time.thread_time() - t0)
            device.append(fwd.total - f0 + logits.total - l0 + sampler.total - s0)
            for k, t in stages.items():
                per_stage[k].append(t.total - before[k])
            # (pipelined on CUDA: the first measured step may report the last prefill's outputs too)
            assert len(outs) >= batch or device == "cuda", "every request must decode in every measured step"
    finally:
        SamplingTensors.build = build.fn  # type: ignore[method-assign]
    host = [t - d for t, d in zip(times, device)]
    return {
        "batch": batch,
        "steps": steps,
        "sampling": sampling,
        **{f"{k}_ms_median": 1e3 * statistics.median(v) for k, v in per_stage.items()},
        "step_ms_median": 1e3 * statistics.median(times),
        "forward_and_sampler_ms_median": 1e3 * statistics.median(device),
        "host_ms_median": 1e3 * statistics.median(host),
        "host_ms_p90": 1e3 * sorted(host)[int(0.9 * len(host))],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--sampling", choices=["greedy", "random", "both"], default="both")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--model", default="tiny", help="tiny (the CPU default) or a preset, e.g. llama-3.2-1b")
    ap.add_argument("--output-json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    modes = ["greedy", "random"] if args.sampling == "both" else [args.sampling]
    results = [run(args.batch, args.steps, args.prompt_len, m, args.device, args.model) for m in modes]
    for r in results:
        print(
            f"batch {r['batch']} {r['sampling']:>6}: step {r['step_ms_median']:.2f} ms, forward+sampler "
            f"{r['forward_and_sampler_ms_median']:.2f} ms, host {r['host_ms_median']:.2f} ms "
            f"(p90 {r['host_ms_p90']:.2f})"
            + "".join(
                f", {k.removesuffix('_ms_median')} {v:.2f} ms"
                for k, v in r.items()
                if k.endswith("_ms_median")
                and k.split("_ms")[0]
                in ("schedule", "prepare_inputs", "sampling_tensors_build", "update_and_stop", "process")
            )
        )
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
