"""CPU microbenchmark: host time per engine step for N streams, old in-process path vs the engine-core split.

Every stream is one completion at a given point of its generation (prompt 512, 128 tokens generated
so far by default) that gets one new token per step, as in a decode step of a full batch. Measured
with the real code where it exists (LLMEngine._make_output / _make_delta_output on real Sequences,
IncrementalDetokenizer with the embedded SmolLM2 tokenizer, EngineCore._wire, pickle,
OutputProcessor, the protocol models and sse.event); the two routes' per-chunk work (slicing /
building a CompletionChunk and encoding it) is restated here from routes.py at 3e1707c (old) and now.

- old (3e1707c): in the engine thread, under the server's GIL: detokenize, cumulative
  RequestOutput (copies every token list and the text), `_snapshot` (copies them again); on
  the event loop: diff against what was sent, build and encode the SSE chunk.
- new: in the core process: delta RequestOutput (new tokens only), `_wire` to plain tuples,
  pickle.dumps; in the HTTP process: pickle.loads, OutputProcessor (detokenize, deltas),
  build and encode the SSE chunk.

    python benchmarks/online_host_bench.py --streams 256 --steps 50 [--stop] [--repeats 3] [--out result.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pickle
import platform
import queue
import time

from fleetserve.runtime.detokenizer import IncrementalDetokenizer
from fleetserve.runtime.engine import LLMEngine, _RequestState
from fleetserve.runtime.engine_core import PICKLE_PROTOCOL, EngineCore
from fleetserve.runtime.output_processor import OutputKind, OutputProcessor
from fleetserve.runtime.outputs import RequestMetrics, RequestOutput
from fleetserve.runtime.request import SeqStatus, Sequence
from fleetserve.runtime.sampling_params import SamplingParams
from fleetserve.runtime.server import sse
from fleetserve.runtime.server.protocol import CompletionChoice, CompletionChunk

_TEXT = (
    "the of and to in is was for on that with as by at from his her it an were are which this be or had not "
    "but have one their they you all new more has after who first would been two time other about also its "
    "most some into than only over such many can these then them may any where both between each while when "
    "used three could well year part made city people did work state world house long under water school "
)


def load_tokenizer():
    from fleetserve.runtime.loader import embedded_model_path
    from fleetserve.runtime.loader.gguf_loader import GGUFFile
    from fleetserve.runtime.tokenizer import Tokenizer

    f = GGUFFile(embedded_model_path())
    return Tokenizer.from_gguf_metadata(f.meta)


def _old_snapshot(out: RequestOutput) -> RequestOutput:  # async_engine._snapshot at 3e1707c
    comps = [
        dataclasses.replace(
            c, token_ids=list(c.token_ids), logprobs=None if c.logprobs is None else list(c.logprobs)
        )
        for c in out.outputs
    ]
    return dataclasses.replace(
        out,
        outputs=comps,
        new_token_counts=list(out.new_token_counts),
        prompt_logprobs=None if out.prompt_logprobs is None else list(out.prompt_logprobs),
    )


def _chunk(rid: str, c, text: str) -> bytes:
    ch = CompletionChunk(
        id=rid,
        created=0,
        model="m",
        choices=[
            CompletionChoice(
                index=c.index,
                text=text,
                logprobs=None,
                finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
            )
        ],
    )
    return sse.event(ch, exclude={"usage"})


class Streams:
    def __init__(self, tok, n: int, prompt_len: int, generated: int, params: SamplingParams, delta: bool):
        ids = tok.encode(_TEXT * (1 + (prompt_len + generated + n) * 2 // len(_TEXT.split())))
        self.tok, self.n = tok, n
        self.future = []  # per stream: tokens it will sample
        self.states = []
        for i in range(n):
            stream = ids[i : i + prompt_len + generated + 1000]
            prompt = stream[:prompt_len]
            seq = Sequence(i, f"r{i}", 0, prompt, params, 0, prompt_len + 4096, 0.0)
            seq.status = SeqStatus.RUNNING
            st = _RequestState(
                request_id=f"r{i}",
                prompt=None,
                prompt_token_ids=prompt,
                params=params,
                seqs=[seq],
                detoks=[] if delta else [IncrementalDetokenizer(tok, prompt, params)],
                metrics=RequestMetrics(arrival_time=0.0),
                logprobs=[None],
                cumulative_logprob=[None],
                delta=delta,
                num_sent=[0],
            )
            for t in stream[prompt_len : prompt_len + generated]:
                seq.token_ids.append(t)
                if st.detoks:
                    st.detoks[0].update([t])
            if delta:
                st.num_sent[0] = generated
            self.states.append(st)
            self.future.append(iter(stream[prompt_len + generated :]))

    def sample(self):
        for st, fut in zip(self.states, self.future):
            st.seqs[0].token_ids.append(next(fut))


def bench_old(tok, args, params) -> dict:
    s = Streams(tok, args.streams, args.prompt_len, args.generated, params, delta=False)
    sent_text = {st.request_id: len(st.detoks[0].get_next_output_text(False, delta=False)) for st in s.states}
    sent_tok = {st.request_id: args.generated for st in s.states}
    t_engine = t_loop = 0.0
    nbytes = 0
    for _ in range(args.steps):
        s.sample()
        t0 = time.perf_counter()
        outs = []
        for st in s.states:  # engine._process + _make_output + AsyncLLM._snapshot, in the engine thread
            st.detoks[0].update([st.seqs[0].token_ids[-1]])
            outs.append(_old_snapshot(LLMEngine._make_output(None, st)))
        t1 = time.perf_counter()
        for out in outs:  # routes._stream_completions.emit at 3e1707c, on the event loop
            c = out.outputs[0]
            key = out.request_id
            delta = c.text[sent_text[key] :]
            new_ids = c.token_ids[sent_tok[key] :]
            if not (delta or new_ids):
                continue
            sent_text[key], sent_tok[key] = len(c.text), len(c.token_ids)
            nbytes += len(_chunk(key, c, delta))
        t2 = time.perf_counter()
        t_engine += t1 - t0
        t_loop += t2 - t1
    n = args.steps
    return {
        "engine_thread_ms_per_step": 1e3 * t_engine / n,
        "event_loop_ms_per_step": 1e3 * t_loop / n,
        "gil_ms_per_step": 1e3 * (t_engine + t_loop) / n,
        "sse_bytes_per_step": nbytes / n,
    }


def bench_new(tok, args, params) -> dict:
    s = Streams(tok, args.streams, args.prompt_len, args.generated, params, delta=True)
    core = EngineCore(type("E", (), {})(), queue.Queue(), lambda b: None)
    proc = OutputProcessor(tok, abort_core=lambda rid: None)
    for st in s.states:
        proc.add(st.request_id, None, st.prompt_token_ids, params, OutputKind.DELTA, 0.0)
        core._metrics_sent.add(st.request_id)
        r = proc.requests[st.request_id]
        ids = st.seqs[0].output_token_ids  # bring the HTTP side to the same point of the generation
        r.comps[0].detok.update(ids)
        r.comps[0].token_ids.extend(ids)
        r.comps[0].detok.get_next_output_text(False, delta=True)
        r.comps[0].num_sent = len(ids)
    t_core = t_dumps = t_loads = t_proc = t_sse = 0.0
    wire = nbytes = 0
    for _ in range(args.steps):
        s.sample()
        t0 = time.perf_counter()
        outs = [LLMEngine._make_delta_output(None, st) for st in s.states]  # engine, in the core process
        batch = (time.time(), {"num_running": len(outs)}, 0, core._wire(outs), [])
        t1 = time.perf_counter()
        data = pickle.dumps(("batch", batch), protocol=PICKLE_PROTOCOL)
        t2 = time.perf_counter()
        msg = pickle.loads(data)  # HTTP process from here on
        t3 = time.perf_counter()
        deliver, _ = proc.process(msg[1][3], msg[1][0])
        t4 = time.perf_counter()
        for rid, out in deliver:  # routes._stream_completions.emit now
            for c in out.outputs:
                if not (c.text or c.token_ids):
                    continue
                nbytes += len(_chunk(rid, c, c.text))
        t5 = time.perf_counter()
        wire += len(data)
        t_core += t1 - t0
        t_dumps += t2 - t1
        t_loads += t3 - t2
        t_proc += t4 - t3
        t_sse += t5 - t4
    n = args.steps
    return {
        "core_delta_and_wire_ms_per_step": 1e3 * t_core / n,
        "core_pickle_dumps_ms_per_step": 1e3 * t_dumps / n,
        "http_pickle_loads_ms_per_step": 1e3 * t_loads / n,
        "http_output_processor_ms_per_step": 1e3 * t_proc / n,
        "http_sse_ms_per_step": 1e3 * t_sse / n,
        "http_process_ms_per_step": 1e3 * (t_loads + t_proc + t_sse) / n,
        "core_process_ms_per_step": 1e3 * (t_core + t_dumps) / n,
        "wire_bytes_per_step": wire / n,
        "sse_bytes_per_step": nbytes / n,
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument(
        "--generated", type=int, default=128, help="Tokens each stream generated before the timed steps."
    )
    p.add_argument("--steps", type=int, default=50)
    p.add_argument(
        "--stop", action="store_true", help="Requests carry stop strings (token-by-token stop checks)."
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="Runs of each path; every figure is the minimum over them (the dev machine is shared).",
    )
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    tok = load_tokenizer()
    params = SamplingParams(
        temperature=0.0, max_tokens=4096, ignore_eos=True, stop=["\n\nQuestion:", "###"] if args.stop else []
    )
    bench_old(tok, args, params)  # warm caches

    def best(fn) -> dict:
        runs = [fn(tok, args, params) for _ in range(max(1, args.repeats))]
        return {k: min(r[k] for r in runs) for k in runs[0]}

    res = {
        "streams": args.streams,
        "prompt_len": args.prompt_len,
        "generated": args.generated,
        "steps": args.steps,
        "repeats": args.repeats,
        "stop_strings": args.stop,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "old": best(bench_old),
        "new": best(bench_new),
    }
    print(json.dumps(res, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()
