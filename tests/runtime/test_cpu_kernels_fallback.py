"""Without the C kernels (no compiler at install, a CPU without AVX-512, or FLEETSERVE_CPU_KERNELS=torch)
the CPU engine runs torch's int4 kernel, SDPA and fused RMSNorm: the embedded model still answers, with
the same greedy tokens on the README's prompts. Run in a child interpreter, since the library is looked
up once per process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

CHILD = r"""
import json
from fleetserve.kernels import cpu_attention, cpu_int4
from fleetserve.runtime import LLM, SamplingParams
llm = LLM(max_model_len=512, num_kv_blocks=64)
prompts = ["The capital of France is", "The capital of Germany is", "2 + 2 ="]
outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
print(json.dumps({"int4": cpu_int4.available(), "attention": cpu_attention.available(),
                  "tokens": [o.outputs[0].token_ids for o in outs], "text": outs[0].outputs[0].text}))
"""


def _run(env_value: str | None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("FLEETSERVE_CPU_KERNELS", None)
    if env_value is not None:
        env["FLEETSERVE_CPU_KERNELS"] = env_value
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_torch_fallback_answers_with_the_same_greedy_tokens():
    torch_path = _run("torch")
    assert not torch_path["int4"] and not torch_path["attention"]
    assert "Paris" in torch_path["text"]
    default = _run(None)
    if not default["int4"]:
        return  # no C kernels here: both runs took torch's path (checked above)
    # the kernels' roundings differ (bf16 x and results vs two int8 parts and float32): equal greedy tokens
    # on these prompts, where the float32 path's top-2 gaps are wide
    assert default["tokens"] == torch_path["tokens"]
