"""LLM: the offline batch API, shaped like vLLM's so that users can switch.

    llm = LLM(model=..., dtype=...)
    outputs = llm.generate(prompts, SamplingParams(...))   # RequestOutputs in input order
    outputs = llm.chat(messages, SamplingParams(...))       # chat template of the model

It owns one LLMEngine and runs its loop until every submitted request finished.
`llm.close()` (or `with LLM(...) as llm:`) releases the engine's device memory (weights,
KV cache, CUDA graphs) at once, so that another engine can be built in the same process.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from .config import EngineConfig
from .engine import LLMEngine, PromptInput
from .outputs import RequestOutput
from .sampling_params import SamplingParams

if TYPE_CHECKING:
    from .tokenizer import Tokenizer


class LLM:
    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        """Keyword arguments are EngineConfig fields (dtype, device, max_model_len, block_size,
        num_kv_blocks, max_num_seqs, max_num_batched_tokens, enable_prefix_caching, load_format, seed,
        tensor_parallel_size, ...)."""
        self.config = EngineConfig(model=model, **kwargs)
        self.engine = LLMEngine.from_config(self.config)
        self._counter = itertools.count()

    def shutdown(self) -> None:
        """Stop the engine's tensor-parallel workers (also done by close() and when the LLM is garbage
        collected); the engine keeps its device memory until close()."""
        self.engine.shutdown()

    def close(self) -> None:
        """Release the model, the KV cache and the CUDA graphs now (see LLMEngine.close); this
        LLM cannot generate afterwards. Closing twice is a no-op."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get_tokenizer(self) -> Tokenizer | None:
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's defaults (generation_config.json, or the embedded model's card;
        none with generation_config="vllm"): what generate/chat use when given no sampling params."""
        return SamplingParams(**self.engine.generation_defaults)

    def generate(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [cast(PromptInput, prompts)]
        prompts = list(cast(Sequence[PromptInput], prompts))
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        params = (
            [sampling_params] * len(prompts)
            if isinstance(sampling_params, SamplingParams)
            else list(sampling_params)
        )
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        order: dict[str, int] = {}
        try:
            for i, (prompt, p) in enumerate(zip(prompts, params)):
                rid = f"offline-{next(self._counter)}"
                self.engine.add_request(rid, prompt, p, final_only=True)
                order[rid] = i
        except Exception:
            self.engine.abort_request(list(order))
            while self.engine.has_unfinished_requests():  # drain the abort outputs
                self.engine.step()
            raise
        return self._run(order, use_tqdm)

    def _run(self, order: dict[str, int], use_tqdm: bool) -> list[RequestOutput]:
        results: list[RequestOutput | None] = [None] * len(order)
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(order), desc="Processed prompts")
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished and out.request_id in order:
                    results[order[out.request_id]] = out
                    if bar:
                        bar.update(1)
        if bar:
            bar.close()
        done = [r for r in results if r is not None]
        assert len(done) == len(results)  # the loop ran until every request had finished
        return done

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | None = None,
        add_generation_prompt: bool = True,
        use_tqdm: bool = False,
        continue_final_message: bool = False,
        chat_template: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """messages: one conversation (list of {"role", "content"}) or a list of them.
        continue_final_message continues the last message (add_generation_prompt is then off);
        chat_template overrides the model's; chat_template_kwargs reach the template as variables."""
        convs = (
            [messages]
            if messages and isinstance(messages[0], dict)
            else cast(list[list[dict[str, Any]]], list(messages))
        )
        tok = self.engine.tokenizer
        if tok is None:
            raise ValueError("chat() needs a tokenizer: this engine was loaded without one")
        prompts: list[PromptInput] = []
        for conv in convs:
            text = tok.apply_chat_template(
                conv,
                add_generation_prompt=add_generation_prompt and not continue_final_message,
                tokenize=False,
                chat_template=chat_template,
                continue_final_message=continue_final_message,
                **(chat_template_kwargs or {}),
            )
            ids = tok.encode(text, add_special_tokens=False)
            prompts.append({"prompt": text, "prompt_token_ids": ids})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)
