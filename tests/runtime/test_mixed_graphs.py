"""Mixed-step CUDA graphs: the padding they run on, checked on the CPU.

A mixed graph replays a step with prefill work padded to a fixed token count and to every
sequence slot (model_runner's docstring). CUDA graphs themselves need a GPU (the GPU tier's
greedy tests replay them); here each "graph" is the eager forward over the same static,
padded buffers, with the Triton kernels in the interpreter, so the padding rules (slot -1
tokens of no sequence, empty sequences past the step's own, stale rows left from earlier
steps) are checked against transformers token for token.
"""

from __future__ import annotations

import pytest
import torch

from fleetserve.runtime import LLM, SamplingParams
from fleetserve.runtime.model_runner import ModelRunner, mixed_graph_sizes
from fleetserve.runtime.utils import cdiv

from .test_engine import CONFIGS, build_hf, hf_greedy

transformers = pytest.importorskip("transformers")

PROMPTS = [list(range(40, 61)), [5, 17, 33, 2, 9], [101], [7, 7, 8, 200, 11, 3, 19, 42, 60, 61, 62]]
NEW = 6


def test_mixed_graph_sizes():
    assert mixed_graph_sizes(0) == []
    assert mixed_graph_sizes(2048)[:3] == [64, 128, 192]
    sizes = mixed_graph_sizes(2048)
    assert sizes[15] == 1024 and sizes[16] == 1152 and sizes[-1] == 2048
    assert all(b > a for a, b in zip(sizes, sizes[1:]))
    assert mixed_graph_sizes(100) == [64, 100]  # the budget itself is always a size
    assert mixed_graph_sizes(1100)[-1] == 1100


class _EagerReplay:
    """Stands in for a captured CUDA graph: replay() runs the eager forward over the runner's
    static mixed buffers at this padded token count and writes the graph's output tensor."""

    def __init__(self, runner: ModelRunner, tokens: int, out: torch.Tensor):
        self.runner, self.tokens, self.out = runner, tokens, out
        self.replays = 0

    def replay(self) -> None:
        with torch.inference_mode():
            self.out.copy_(self.runner.model(*self.runner._mixed_args(self.tokens)))
        self.replays += 1


def _install_mixed_graphs(runner: ModelRunner, sizes: list[int], seqs: int, max_model_len: int):
    runner._graph_max_seq_len = max_model_len
    runner._mixed_static = runner._graph_buffers(sizes[-1], seqs, cdiv(max_model_len, runner.block_size))
    # stale junk in every static row: padding must never read or write through it
    runner._mixed_static["input_ids"].random_(3, 200)
    runner._mixed_static["positions"].random_(0, 50)
    runner._mixed_static["block_tables"].random_(0, runner.num_blocks)
    runner._mixed_seqs = seqs
    runner._mixed_sizes = sizes
    hidden = runner.model_config.hidden_size
    graphs = {}
    for t in sizes:
        out = torch.full((t, hidden), float("nan"))
        graphs[t] = (_EagerReplay(runner, t, out), out)
    runner._mixed_graphs = graphs
    return graphs


@pytest.mark.parametrize("budget", [None, 16], ids=["whole-prompts", "chunked-prefill"])
def test_padded_mixed_steps_match_transformers(tmp_path, budget):
    model = build_hf("llama", CONFIGS["llama-gqa4-d32-tied"][1], tmp_path)
    refs = [hf_greedy(model, p, NEW) for p in PROMPTS]
    kw = dict(dtype="float32", device="cpu", block_size=4, num_kv_blocks=96, attention_backend="triton")
    if budget:
        kw["max_num_batched_tokens"] = budget
    llm = LLM(model=str(tmp_path), **kw)
    eng = llm.engine
    graphs = _install_mixed_graphs(eng.runner, [8, 24, 40], seqs=6, max_model_len=eng.max_model_len)
    params = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)
    # batched: the first steps carry prompts together with earlier sequences' decodes
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    assert [o.outputs[0].token_ids for o in outs] == refs
    # fewer sequences than the last steps: rows and slots of those steps are stale now
    outs = llm.generate([{"prompt_token_ids": PROMPTS[3]}, {"prompt_token_ids": PROMPTS[0][:9]}], params)
    assert outs[0].outputs[0].token_ids == refs[3]
    assert outs[1].outputs[0].token_ids == hf_greedy(model, PROMPTS[0][:9], NEW)
    assert sum(g.replays for g, _ in graphs.values()) > 0
    assert eng.scheduler.kv.num_free_blocks == eng.num_kv_blocks


def test_steps_larger_than_the_graphs_run_eagerly(tmp_path):
    build_hf("llama", CONFIGS["llama-gqa4-d32-tied"][1], tmp_path)
    llm = LLM(model=str(tmp_path), dtype="float32", device="cpu", block_size=4, num_kv_blocks=96)
    runner = llm.engine.runner
    _install_mixed_graphs(runner, [8, 16], seqs=2, max_model_len=llm.engine.max_model_len)
    assert runner._mixed_graph_size(batch=2, num_tokens=9, max_query_len=5) == 16
    assert runner._mixed_graph_size(batch=2, num_tokens=17, max_query_len=5) is None  # too many tokens
    assert runner._mixed_graph_size(batch=3, num_tokens=9, max_query_len=5) is None  # too many sequences
    assert runner._mixed_graph_size(batch=2, num_tokens=2, max_query_len=1) is None  # a decode graph's step
