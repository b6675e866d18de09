"""LLM.close() releases the engine's tensors at once (weights, KV cache, the runner's buffers):
the CPU stand-in for the GPU tier's leak checks, where an engine kept alive by a reference or a
reference cycle left the next test's engine a KV cache of 0 blocks."""

from __future__ import annotations

import gc
import weakref

import pytest

from fleetserve.runtime import LLM, SamplingParams

TINY = dict(
    num_layers=2,
    hidden_size=64,
    intermediate_size=128,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    vocab_size=512,
)


@pytest.fixture
def tiny_preset(monkeypatch):
    from fleetserve.runtime.models import PRESETS

    name = "llama-3.2-1b-tiny-close"
    monkeypatch.setitem(PRESETS, name, PRESETS["llama-3.2-1b"].with_(**TINY, name=name))
    return name


def _llm(name):
    return LLM(model=name, load_format="dummy", device="cpu", dtype="float32", num_kv_blocks=64, block_size=4)


def _refs(llm):
    runner = llm.engine.runner
    tensors = list(runner.model.parameters()) + list(runner.kv_caches)
    assert len(tensors) > len(runner.kv_caches) > 0
    return [weakref.ref(t) for t in tensors]


def test_close_frees_weights_and_kv_cache_without_the_garbage_collector(tiny_preset):
    llm = _llm(tiny_preset)
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4
    refs = _refs(llm)
    gc.disable()  # close() must drop the tensors itself, not leave them to a collection of cycles
    try:
        llm.close()
        alive = sum(r() is not None for r in refs)
    finally:
        gc.enable()
    assert alive == 0, f"{alive} of {len(refs)} weight / KV tensors outlived close()"
    llm.close()  # twice: a no-op
    with pytest.raises(RuntimeError, match="closed"):
        llm.generate([[1, 2]], SamplingParams(max_tokens=1))


def test_context_manager_closes_even_with_unfinished_requests(tiny_preset):
    with _llm(tiny_preset) as llm:
        llm.engine.add_request("left", [1, 2, 3], SamplingParams(max_tokens=50))
        llm.engine.step()
        refs = _refs(llm)
    assert llm.engine.closed and not llm.engine.has_unfinished_requests()
    assert all(r() is None for r in refs)


def test_dropped_engine_is_collected_not_kept_by_globals(tiny_preset):
    """Without close(): once the last reference is gone a gc pass frees it (nothing global holds it)."""
    llm = _llm(tiny_preset)
    llm.generate([[5, 6, 7]], SamplingParams(temperature=0.7, seed=1, max_tokens=3))
    refs, engine = _refs(llm), weakref.ref(llm.engine)
    del llm
    gc.collect()
    assert engine() is None and all(r() is None for r in refs)


def test_async_llm_shutdown_closes_the_engine_it_created(tiny_preset):
    """AsyncLLM.from_config owns its engine: shutdown() stops the loop and frees the tensors; an
    engine handed in by the caller stays the caller's (left open)."""
    import asyncio

    from fleetserve.runtime.async_engine import AsyncLLM
    from fleetserve.runtime.config import EngineConfig
    from fleetserve.runtime.engine import LLMEngine

    cfg = EngineConfig(
        model=tiny_preset, load_format="dummy", device="cpu", dtype="float32", num_kv_blocks=64, block_size=4
    )

    async def main():
        owned = await asyncio.to_thread(AsyncLLM.from_config, cfg)
        owned.start()
        refs = _refs(owned)
        await asyncio.to_thread(owned.shutdown)
        assert owned.engine.closed and all(r() is None for r in refs)
        engine = LLMEngine(cfg)
        lent = AsyncLLM(engine)
        lent.start()
        await asyncio.to_thread(lent.shutdown)
        assert not engine.closed
        engine.close()

    asyncio.run(main())
