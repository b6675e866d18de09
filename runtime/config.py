"""EngineConfig: every engine setting, typed and documented in one place.

The offline `LLM(...)` keyword arguments, the `fleetserve serve` flags and the
operator's engine settings all map onto these fields; nothing else holds a second
list of them. Validation happens here, once, at the edge.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, protected_namespaces=())

    model: str | None = None
    """Hugging Face Hub name (org/name, or org/name:QUANT for a GGUF repo), model directory, .gguf file, or preset name (llama-3.2-1b, llama-3.1-8b, ...); None serves the embedded SmolLM2-135M-Instruct."""
    revision: str | None = None
    """Hub branch, tag or commit of the model (default main)."""
    download_dir: str | None = None
    """Hub cache folder for downloaded models (default: huggingface_hub's cache, $HF_HUB_CACHE); reused offline."""
    gguf_file: str | None = None
    """Which .gguf file of a Hub GGUF repo to load (or add :QUANT to the model name, e.g. org/name:Q4_K_M)."""
    tokenizer: str | None = None
    """Tokenizer directory or tokenizer.json, if it differs from the model's."""
    served_model_name: str | None = None
    """Name the model is served under; defaults to the model argument."""
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    """Weight and activation dtype; auto means bfloat16 on GPU and float32 on CPU."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the model runs; auto picks cuda when available."""
    load_format: Literal["auto", "safetensors", "gguf", "dummy"] = "auto"
    """How weights are read; dummy builds random weights of the model's config (benchmarks)."""
    tensor_parallel_size: int = Field(1, ge=1, le=64)
    """Ranks one model is split over (Megatron-style tensor parallelism): one GPU each on CUDA, gloo processes on CPU; must divide the model's attention heads. Rank 0 runs in the engine process, the others in worker processes."""
    gguf_weights: Literal["auto", "packed", "dequantize"] = "auto"
    """How a GGUF file's quantized matrices are held: packed keeps them quantized in memory (~4.5 bits a weight) and runs the matmuls on torch's int4/int8 CPU kernels (bf16 activations, float32 accumulation; the LM head's top logits recomputed in float32 from the file's values, so greedy picks what float32 math picks except at its own near-ties); dequantize expands them to the model dtype at load (the reference path, ~4x the memory). auto: packed on CPU without tensor parallelism, else dequantize; packed is refused on GPU (no kernels yet) and with tensor_parallel_size > 1."""
    max_model_len: int | None = Field(None, ge=16)
    """Maximum prompt + output length per request; defaults to the model's max_position_embeddings."""
    block_size: int = Field(16, ge=1, le=1024)
    """Tokens per KV cache block."""
    num_kv_blocks: int | None = Field(None, ge=1)
    """Exact number of KV cache blocks; overrides the memory-based sizing."""
    kv_cache_memory: int | None = Field(None, ge=1)
    """Bytes to reserve for the KV cache; by default derived from gpu_memory_utilization (GPU), or on CPU room for 4 sequences of max_model_len tokens, at most 1/8 of the available memory (committed lazily as blocks are used)."""
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0)
    """Fraction of the card's total memory this engine may use for weights, activations and KV
    cache (per engine, as in vLLM: two engines on one card can take 0.45 each); the KV cache never
    takes more than is free at start-up."""
    max_num_seqs: int = Field(256, ge=1)
    """Maximum number of sequences in the running batch."""
    max_num_batched_tokens: int | None = Field(None, ge=1)
    """Token budget per engine step (prefill chunks plus decodes); default 8192 on GPU, 2048 on CPU."""
    enable_prefix_caching: bool = True
    """Reuse KV blocks of identical prompt prefixes across requests."""
    enforce_eager: bool = False
    """Never capture CUDA graphs."""
    cuda_graph_max_tokens: int = Field(2048, ge=0, le=16384)
    """Steps with prefill work (prefill chunks mixed with decodes) of up to this many tokens replay CUDA graphs captured per padded token count (64-token steps to 1024, 128 beyond); larger steps run eagerly; 0 = graphs for pure decode steps only."""
    async_scheduling: bool | None = None
    """Schedule and queue the next step before reading back the previous one (overlaps host and device work); default on for CUDA."""
    attention_backend: Literal["auto", "torch", "cpu", "triton"] = "auto"
    """Kernel implementation: triton on CUDA, cpu (torch's fused SDPA attention and the other torch ops) on CPU, unless forced; torch = the pure references."""
    seed: int = 0
    """Seed for weights of dummy models and for requests that bring no seed of their own."""
    max_logprobs: int = Field(20, ge=0)
    """Largest logprobs / prompt_logprobs a request may ask for."""
    grammar_compile_timeout: float = Field(10.0, gt=0.0)
    """Seconds a structured-output grammar (JSON schema, regex, EBNF) may take to compile before the request is refused."""
    grammar_compile_threads: int = Field(2, ge=1)
    """Threads that compile grammars (off the engine thread)."""
    grammar_cache_size: int = Field(256, ge=1)
    """Compiled grammars kept, keyed by their schema / regex / grammar text (LRU)."""
    max_grammar_bytes: int = Field(256 * 1024, ge=1024)
    """Largest JSON schema / regex / grammar text accepted, in bytes."""
    chat_template: str | None = None
    """Chat template to use instead of the model's: a Jinja file path or the template text itself."""
    generation_config: Literal["auto", "vllm"] = "auto"
    """auto: sampling defaults (temperature, top_p, top_k, repetition_penalty, max_new_tokens) from the model's generation_config.json for requests that omit them; vllm: ignore the model's file and use the neutral defaults."""
    trust_remote_code: bool = False
    """Accepted for vLLM compatibility; remote code is never executed."""

    @model_validator(mode="after")
    def _check(self) -> EngineConfig:
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < self.block_size:
            raise ValueError("max_num_batched_tokens must be at least block_size")
        return self
