"""Models by Hub name, fetched with the real huggingface_hub client from a stand-in Hub on loopback HTTP:
only the needed files, revisions, GGUF file choice, 404 / gated 401 / 403, no network, the cache reused
offline, repos without usable weights; and the same through `LLM(model=...)` and `fleetserve serve` flags."""

from __future__ import annotations

import json
import socket

import pytest
import torch

from fleetserve.runtime.config import EngineConfig
from fleetserve.runtime.loader import ModelLoadError, load_model
from fleetserve.runtime.loader.hub import choose_files, parse_repo_id

from .hub_stand_in import StandInHub, dir_files
from .test_loader import IDS, hf_logits, prefill_logits, tiny_hf_model, write_gguf

TOKEN = "hf_stand_in_token"


def _hf_dir(tmp_path_factory, seed: int, name: str, tokenizer_json: bytes) -> tuple[dict, object]:
    d = tmp_path_factory.mktemp(name)
    hf = tiny_hf_model(seed=seed)
    hf.save_pretrained(d)
    (d / "tokenizer.json").write_bytes(tokenizer_json)
    (d / "generation_config.json").write_text(
        json.dumps(
            {"eos_token_id": 2, "temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.1}
        )
    )
    files = dir_files(d)
    # Files a full repo carries that the loader never reads: these must not be downloaded.
    files.update(
        {
            "pytorch_model.bin": b"pickle" * 100,
            "original/consolidated.00.pth": b"pickle",
            "README.md": b"# tiny",
            "onnx/model.onnx": b"onnx",
        }
    )
    return files, hf


@pytest.fixture(scope="module")
def hub(tmp_path_factory, smollm2_tokenizer):
    tok_dir = tmp_path_factory.mktemp("tok")
    smollm2_tokenizer.backend.save(str(tok_dir / "tokenizer.json"))
    tok_json = (tok_dir / "tokenizer.json").read_bytes()
    main, hf_main = _hf_dir(tmp_path_factory, 0, "main", tok_json)
    v2, hf_v2 = _hf_dir(tmp_path_factory, 1, "v2", tok_json)
    gg = tmp_path_factory.mktemp("gguf")
    write_gguf(gg / "tiny.gguf", hf_main)
    write_gguf(gg / "tiny-v2.gguf", hf_v2)
    gguf_bytes, gguf_v2 = (gg / "tiny.gguf").read_bytes(), (gg / "tiny-v2.gguf").read_bytes()
    with StandInHub() as h:
        h.add("org/tiny", main, revisions={"v2": v2})
        h.add("org/gated", main, gated_token=TOKEN)
        h.add("org/tiny-GGUF", {"tiny-Q4_K_M.gguf": gguf_v2, "tiny-Q8_0.gguf": gguf_bytes, "README.md": b"x"})
        sharded = tmp_path_factory.mktemp("sharded")
        hf_main.save_pretrained(sharded, max_shard_size="40KB")
        h.add("org/sharded", {**dir_files(sharded), "extra.safetensors": b"not in the index"})
        h.add("org/pickles", {"config.json": main["config.json"], "pytorch_model.bin": b"x"})
        h.add("org/empty", {"README.md": b"x"})
        h.hf = {"main": hf_main, "v2": hf_v2}
        yield h


@pytest.fixture
def env(monkeypatch, hub, tmp_path):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    for name in ("HF_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "hub-cache"


def _cfg(model, cache, **kw):
    return EngineConfig(model=model, download_dir=str(cache), device="cpu", dtype="float32", **kw)


def _closed_port_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connections are refused, as with no network
    return f"http://127.0.0.1:{port}"


def test_repo_id_parsing():
    assert parse_repo_id("meta-llama/Llama-3.1-8B-Instruct") == ("meta-llama/Llama-3.1-8B-Instruct", None)
    assert parse_repo_id("bartowski/Qwen2.5-7B-Instruct-GGUF:Q4_K_M") == (
        "bartowski/Qwen2.5-7B-Instruct-GGUF",
        "Q4_K_M",
    )
    for local in ("/models/x", "./a/b", "a/b/c", "llama-3.2-1b", "model.gguf", "~/x/y"):
        assert parse_repo_id(local) is None, local


def test_file_choice_prefers_safetensors_and_skips_the_rest():
    files = [
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "consolidated.safetensors",
        "pytorch_model.bin",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "original/consolidated.00.pth",
        "x.gguf",
    ]
    got = choose_files("o/n", files).files
    assert set(got) == {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    }
    assert (
        choose_files("o/n", ["config.json", "consolidated.safetensors"]).files[-1]
        == "consolidated.safetensors"
    )
    # A quant tag or gguf_file picks the GGUF route even where safetensors exist; tags match whole words.
    both = files + ["m-Q4_K_M.gguf", "m-IQ4_K_M.gguf"]
    assert choose_files("o/n", both, tag="q4_k_m").files == ["m-Q4_K_M.gguf"]
    assert choose_files("o/n", both, gguf_file="x.gguf").gguf == "x.gguf"
    with pytest.raises(ModelLoadError, match="split GGUF"):
        choose_files("o/n", ["m-Q4_K_M-00001-of-00002.gguf", "m-Q4_K_M-00002-of-00002.gguf"], tag="Q4_K_M")


def test_download_fetches_only_needed_files_and_loads(hub, env, capfd):
    loaded = load_model(_cfg("org/tiny", env))
    assert hub.fetched("org/tiny") == {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
    }
    torch.testing.assert_close(
        prefill_logits(loaded.model, IDS), hf_logits(hub.hf["main"], IDS), atol=2e-5, rtol=1e-4
    )
    assert loaded.model_name == "org/tiny" and loaded.tokenizer is not None
    assert loaded.generation_defaults == {
        "temperature": 0.6,
        "top_p": 0.9,
        "top_k": 20,
        "repetition_penalty": 1.1,
    }
    assert (env / "models--org--tiny" / "refs" / "main").is_file()  # the huggingface_hub cache layout
    assert "Fetching 4 files" in capfd.readouterr().err  # the progress bar


def test_revision_branch_and_commit(hub, env):
    loaded = load_model(_cfg("org/tiny", env, revision="v2"))
    torch.testing.assert_close(
        prefill_logits(loaded.model, IDS), hf_logits(hub.hf["v2"], IDS), atol=2e-5, rtol=1e-4
    )
    sha = hub.repos["org/tiny"].sha("v2")
    loaded = load_model(_cfg("org/tiny", env, revision=sha))
    torch.testing.assert_close(
        prefill_logits(loaded.model, IDS), hf_logits(hub.hf["v2"], IDS), atol=2e-5, rtol=1e-4
    )
    with pytest.raises(ModelLoadError, match="org/tiny has no revision 'v9'"):
        load_model(_cfg("org/tiny", env, revision="v9"))


def test_missing_repo_is_a_clear_404(hub, env):
    with pytest.raises(
        ModelLoadError, match=r"model 'org/nope' not found on http://127.0.0.1:\d+ \(404\).*HF_TOKEN"
    ):
        load_model(_cfg("org/nope", env))


def test_gated_repo_401_403_and_token(hub, env, monkeypatch):
    with pytest.raises(ModelLoadError, match=r"org/gated is a gated repository \(401\): set HF_TOKEN"):
        load_model(_cfg("org/gated", env))
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(ModelLoadError, match=r"gated repository \(403\): HF_TOKEN is set but has no access"):
        load_model(_cfg("org/gated", env))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert load_model(_cfg("org/gated", env)).model_name == "org/gated"


def test_cache_reused_offline_and_without_network(hub, env, monkeypatch):
    load_model(_cfg("org/tiny", env))
    before_downloads, before_requests = dict(hub.downloads), len(hub.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load_model(_cfg("org/tiny", env))
    torch.testing.assert_close(
        prefill_logits(loaded.model, IDS), hf_logits(hub.hf["main"], IDS), atol=2e-5, rtol=1e-4
    )
    assert len(hub.requests) == before_requests  # HF_HUB_OFFLINE: not one request
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", _closed_port_url())  # the Hub is unreachable
    assert load_model(_cfg("org/tiny", env)).tokenizer is not None
    assert hub.downloads == before_downloads
    with pytest.raises(ModelLoadError, match=r"org/tiny@v2 is not in the model cache .* cannot be reached"):
        load_model(_cfg("org/tiny", env, revision="v2"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        ModelLoadError, match="org/gated@main is not in the model cache .*HF_HUB_OFFLINE is set"
    ):
        load_model(_cfg("org/gated", env))


def test_gguf_repo_file_choice(hub, env):
    with pytest.raises(ModelLoadError, match=r"holds 2 GGUF files .*--gguf-file.*org/tiny-GGUF:Q4_K_M"):
        load_model(_cfg("org/tiny-GGUF", env))
    loaded = load_model(_cfg("org/tiny-GGUF:Q8_0", env))
    assert hub.fetched("org/tiny-GGUF") == {"tiny-Q8_0.gguf"}
    torch.testing.assert_close(
        prefill_logits(loaded.model, IDS), hf_logits(hub.hf["main"], IDS), atol=2e-5, rtol=1e-4
    )
    loaded = load_model(_cfg("org/tiny-GGUF", env, gguf_file="tiny-Q4_K_M.gguf"))
    torch.testing.assert_close(
        prefill_logits(loaded.model, IDS), hf_logits(hub.hf["v2"], IDS), atol=2e-5, rtol=1e-4
    )
    assert hub.fetched("org/tiny-GGUF") == {"tiny-Q8_0.gguf", "tiny-Q4_K_M.gguf"}
    with pytest.raises(
        ModelLoadError, match="no GGUF file for quantization 'Q2_K'; it has: tiny-Q4_K_M.gguf"
    ):
        load_model(_cfg("org/tiny-GGUF:Q2_K", env))
    with pytest.raises(ModelLoadError, match="has no .gguf files"):
        load_model(_cfg("org/tiny", env, gguf_file="x.gguf"))


def test_repos_without_usable_weights(hub, env):
    with pytest.raises(ModelLoadError, match=r"org/pickles has no usable weights: only PyTorch pickle files"):
        load_model(_cfg("org/pickles", env))
    with pytest.raises(ModelLoadError, match=r"org/empty has no usable weights"):
        load_model(_cfg("org/empty", env))


def test_llm_and_serve_flags_take_hub_names(hub, env):
    from fleetserve.runtime import LLM, SamplingParams
    from fleetserve.runtime.cli import build_parser

    ns = build_parser().parse_args(
        ["serve", "org/tiny", "--revision", "v2", "--download-dir", str(env), "--gguf-file", "f.gguf"]
    )
    assert (ns.model_tag, ns.revision, ns.download_dir, ns.gguf_file) == (
        "org/tiny",
        "v2",
        str(env),
        "f.gguf",
    )
    llm = LLM(model="org/tiny", revision="v2", download_dir=str(env), device="cpu", num_kv_blocks=16)
    out = llm.generate([IDS], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    ref = (
        hub.hf["v2"].generate(torch.tensor([IDS]), max_new_tokens=4, do_sample=False)[0, len(IDS) :].tolist()
    )
    assert out[0].outputs[0].token_ids == ref


def test_sharded_repo_fetches_the_shards_its_index_names(hub, env):
    loaded = load_model(_cfg("org/sharded", env))
    shards = {f for f in hub.repos["org/sharded"].revisions["main"] if f.startswith("model-")}
    assert len(shards) > 1 and hub.fetched("org/sharded") == {
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
        *shards,
    }
    torch.testing.assert_close(
        prefill_logits(loaded.model, IDS), hf_logits(hub.hf["main"], IDS), atol=2e-5, rtol=1e-4
    )


def test_fleetserve_serve_by_hub_name(hub, env):
    """`fleetserve serve org/name --revision ...` as a user types it: downloads, then serves under that name."""
    import os
    import re
    import subprocess
    import sys
    import threading
    import urllib.request

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fleetserve.runtime.cli",
            "serve",
            "org/tiny",
            "--revision",
            "v2",
            "--download-dir",
            str(env),
            "--port",
            "0",
            "--device",
            "cpu",
            "--num-kv-blocks",
            "16",
            "--max-model-len",
            "64",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=dict(os.environ),
    )
    lines, url, ready = [], {}, threading.Event()

    def drain():
        for raw in proc.stderr:
            lines.append(raw.decode(errors="replace"))
            m = re.search(r"serving org/tiny on (http://127\.0\.0\.1:\d+)", lines[-1])
            if m:
                url["u"] = m.group(1)
                ready.set()
        ready.set()

    threading.Thread(target=drain, daemon=True).start()
    try:
        ready.wait(240)
        assert "u" in url, "".join(lines[-30:])
        with urllib.request.urlopen(url["u"] + "/v1/models", timeout=30) as r:
            assert [m["id"] for m in json.loads(r.read())["data"]] == ["org/tiny"]
    finally:
        proc.kill()
        proc.wait(30)
    log = "".join(lines)
    assert "fetching org/tiny@v2 from http://127.0.0.1" in log and "Fetching 4 files" in log
    assert (env / "models--org--tiny" / "refs" / "v2").is_file()
