"""The typed seams of runtime/protocols.py are satisfied by the real classes (and the test stand-ins).

Protocols are structural: the check below compares member names at run time; `mypy` checks
the same assignments statically (`_static_check` is never called)."""

from __future__ import annotations

import dataclasses

from fleetserve.runtime import protocols
from fleetserve.runtime.config import EngineConfig
from fleetserve.runtime.engine import EngineStats, LLMEngine


def _static_check(engine: LLMEngine, stats: EngineStats, config: EngineConfig) -> None:
    e: protocols.EngineCore = engine
    s: protocols.StatsSnapshot = stats
    c: protocols.LoadSettings = config
    del e, s, c


def _members(proto: type) -> set[str]:
    return {n for n in vars(proto) if not n.startswith("_")}


def test_engine_satisfies_engine_core():
    assert _members(protocols.EngineCore) <= set(dir(LLMEngine)) | {
        "tokenizer",
        "model_name",
        "max_model_len",
        "limits",
    }
    # the four attributes are set in LLMEngine.__init__ (its body is _start, so that a failed start stops the workers)
    src = LLMEngine.__init__.__code__.co_names + LLMEngine._start.__code__.co_names
    assert {"tokenizer", "model_name", "max_model_len", "limits"} <= set(src)


def test_stats_and_config_satisfy_their_protocols():
    assert _members(protocols.StatsSnapshot) == {f.name for f in dataclasses.fields(EngineStats)}
    assert _members(protocols.LoadSettings) <= set(EngineConfig.model_fields)


def test_core_clients_satisfy_core_client():
    from fleetserve.runtime.core_client import ProcessCoreClient, ThreadCoreClient
    from fleetserve.runtime.engine_core import EngineInfo

    # info / tokenizer / stats are set in __init__ (ProcessCoreClient fills them in wait_ready)
    members = _members(protocols.CoreClient) - {"info", "tokenizer", "stats"}
    for cls in (ThreadCoreClient, ProcessCoreClient):
        assert members <= set(dir(cls)), cls
        assert {"info", "tokenizer", "stats"} <= set(cls.__init__.__code__.co_names), cls
    assert _members(protocols.CoreInfo) <= {f.name for f in dataclasses.fields(EngineInfo)}
    # the core loop turns detokenization off: the engine must have the switch
    assert "detokenize" in protocols.EngineCore.__annotations__
    assert "detokenize" in LLMEngine._start.__code__.co_names
