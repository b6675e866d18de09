"""xgrammar vs llguidance on the embedded SmolLM2 tokenizer (49152 tokens): compile time and
per-token mask time while walking a valid instance of each schema token by token (one CPU
thread). The numbers in docs/server.md came from this script; llguidance is not a fleetserve
dependency (`pip install llguidance` to rerun it)."""

import json
import statistics
import time

import torch

from fleetserve.runtime.loader.gguf_loader import GGUFFile
from fleetserve.runtime.loader.loader import embedded_model_path
from fleetserve.runtime.tokenizer import Tokenizer

torch.set_num_threads(1)
SCHEMAS = {
    "2 properties": (
        {
            "type": "object",
            "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
            "required": ["name", "age"],
        },
        {"name": "Alice Smith", "age": 31},
    ),
    "6 properties, nested": (
        {
            "type": "object",
            "properties": {
                "id": {"type": "integer"},
                "title": {"type": "string", "maxLength": 40},
                "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
                "status": {"enum": ["open", "closed", "pending"]},
                "owner": {
                    "type": "object",
                    "properties": {"name": {"type": "string"}, "email": {"type": "string"}},
                    "required": ["name", "email"],
                },
                "score": {"type": "number"},
            },
            "required": ["id", "title", "tags", "status", "owner", "score"],
        },
        {
            "id": 7,
            "title": "Fix the login page",
            "tags": ["web", "auth"],
            "status": "open",
            "owner": {"name": "Bob", "email": "bob@example.com"},
            "score": 3.5,
        },
    ),
    "any JSON object": (None, {"a": [1, 2, {"b": "hello world"}], "c": None}),
}


def main():
    tok = Tokenizer.from_gguf_metadata(GGUFFile(embedded_model_path()).meta)
    V = tok.vocab_size
    eos = sorted(tok.eos_token_ids)
    rows = []

    import xgrammar as xgr

    vocab = [""] * V
    for t, i in tok.backend.get_vocab(with_added_tokens=True).items():
        vocab[i] = t
    meta = xgr.TokenizerInfo._detect_metadata_from_hf(tok.backend.to_str())
    info = xgr.TokenizerInfo(vocab, meta["vocab_type"], vocab_size=V, stop_token_ids=eos)
    comp = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    for name, (schema, inst) in SCHEMAS.items():
        t0 = time.perf_counter()
        cg = comp.compile_json_schema(json.dumps(schema)) if schema else comp.compile_builtin_json_grammar()
        tc = time.perf_counter() - t0
        m, bm, times = xgr.GrammarMatcher(cg), xgr.allocate_token_bitmask(1, V), []
        for t in tok.encode(json.dumps(inst), add_special_tokens=False):
            t1 = time.perf_counter()
            m.fill_next_token_bitmask(bm)
            times.append(time.perf_counter() - t1)
            assert m.accept_token(t)
        rows.append(("xgrammar", name, tc, times))

    try:
        import llguidance as llg
        import llguidance.torch as lgt
    except ImportError:
        llg = None
    if llg is not None:
        lt = llg.LLTokenizer(tok.backend.to_str(), n_vocab=V, eos_token=eos)
        for name, (schema, inst) in SCHEMAS.items():
            t0 = time.perf_counter()
            m = llg.LLMatcher(lt, llg.LLMatcher.grammar_from_json_schema(schema or {"type": "object"}))
            tc = time.perf_counter() - t0
            bm, times = lgt.allocate_token_bitmask(1, V), []
            for t in tok.encode(json.dumps(inst), add_special_tokens=False):
                t1 = time.perf_counter()
                lgt.fill_next_token_bitmask(m, bm, 0)
                times.append(time.perf_counter() - t1)
                assert m.consume_token(t), m.get_error()
            rows.append(("llguidance", name, tc, times))
    for engine, name, tc, times in rows:
        print(
            json.dumps(
                {
                    "engine": engine,
                    "schema": name,
                    "compile_ms": round(tc * 1e3, 2),
                    "mask_us_mean": round(statistics.mean(times) * 1e6, 1),
                    "mask_us_max": round(max(times) * 1e6, 1),
                    "tokens": len(times),
                }
            )
        )


if __name__ == "__main__":
    main()
