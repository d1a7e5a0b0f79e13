"""The offline Python API, in the shape vLLM users know::

    llm = dsv32.LLM()                                    # the embedded default model (random weights)
    outs = llm.generate(["Hello"], dsv32.SamplingParams(max_tokens=16))
    outs = llm.generate(prompt_token_ids=[[0, 123, 456]], sampling_params=params)
    outs[0].text, outs[0].token_ids

All prompts go through the same engine (continuous batching, prefix cache) in one call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from dsv32.engine.core import EngineConfig, EngineCore
from dsv32.engine.outputs import OutputProcessor
from dsv32.engine.sampling_params import SamplingParams


@dataclass
class CompletionOutput:
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[dict] | None = None
    finish_reason: str | None = None
    num_cached_tokens: int = 0


class LLM:
    def __init__(
        self,
        model: str | Path | None = None,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        keep_fp8: bool = False,
        engine_config: EngineConfig | None = None,
    ):
        from dsv32.chat.tokenizer import load_tokenizer
        from dsv32.weights.default_model import model_dir_or_default
        from dsv32.weights.loader import load_model

        model_dir = model_dir_or_default(model)
        self.model = load_model(model_dir, dtype=dtype, device=device, keep_fp8=keep_fp8, progress=False)
        self.tokenizer = load_tokenizer(model_dir)
        self.engine = EngineCore(self.model, engine_config, eos_id=self.tokenizer.eos_id)
        self.engine.attach_tokenizer(self.tokenizer)

    def generate(
        self,
        prompts: str | list[str] | None = None,
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        *,
        prompt_token_ids: list[list[int]] | None = None,
    ) -> list[CompletionOutput]:
        """One output per prompt, in order. Strings get BOS prepended; ids are used as given."""
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("give either prompts or prompt_token_ids")
        if prompts is not None:
            if isinstance(prompts, str):
                prompts = [prompts]
            prompt_token_ids = [self.tokenizer.encode(p, add_bos=True) for p in prompts]
        n = len(prompt_token_ids)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * n
        if len(params) != n:
            raise ValueError(f"{len(params)} sampling_params for {n} prompts")
        processor = OutputProcessor(self.tokenizer)
        results = [CompletionOutput(list(ids)) for ids in prompt_token_ids]
        try:
            for i, (ids, p) in enumerate(zip(prompt_token_ids, params, strict=True)):
                self.engine.add_request(f"llm-{id(results)}-{i}", list(ids), p)
                processor.add(f"llm-{id(results)}-{i}", p)
            while self.engine.has_work():
                for out in processor.process(self.engine, self.engine.step()):
                    res = results[int(out.request_id.rsplit("-", 1)[1])]
                    res.token_ids.extend(out.new_token_ids)
                    res.text += out.text
                    if out.logprobs is not None:
                        res.logprobs = (res.logprobs or []) + out.logprobs
                    res.num_cached_tokens = out.usage.cached_tokens
                    if out.finished:
                        res.finish_reason = out.finish_reason
        finally:  # an error (or Ctrl-C) must not leave blocks behind
            for i in range(n):
                self.engine.abort(f"llm-{id(results)}-{i}")
        return results
