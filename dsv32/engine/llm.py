"""The offline Python API, in the shape vLLM users know::

    llm = dsv32.LLM()                                    # the embedded default model (random weights)
    outs = llm.generate(["Hello"], dsv32.SamplingParams(max_tokens=16))
    outs = llm.generate(prompt_token_ids=[[0, 123, 456]], sampling_params=params)
    outs[0].text, outs[0].token_ids                     # (or vLLM's outs[0].outputs[0].text)
    outs = llm.generate(["Hello"], dsv32.SamplingParams(n=4, temperature=1.0, seed=0))
    [o.text for o in outs[0].outputs]                    # 4 samples; their prompt computed once
    outs = llm.chat([{"role": "user", "content": "Hi"}], params, thinking=True)
    outs[0].message["reasoning_content"], outs[0].message["content"], outs[0].message["tool_calls"]

All prompts go through the same engine (continuous batching, prefix cache) in one call.
"""

from __future__ import annotations

import numbers
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from dsv32.engine.core import EngineConfig, EngineCore
from dsv32.engine.outputs import OutputProcessor
from dsv32.engine.sampling_params import SamplingParams
from dsv32.engine.speculative import num_speculative_tokens


@dataclass
class CompletionOutput:
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[dict] | None = None
    finish_reason: str | None = None
    num_cached_tokens: int = 0
    # with ``SamplingParams(prompt_logprobs=k)``: per prompt token {"logprob", "top": [(id, logprob), ...]}, None
    # for the first
    prompt_logprobs: list[dict | None] | None = None
    # ``LLM.chat`` only: the reply parsed as the API parses it (role, reasoning_content, content, tool_calls)
    message: dict[str, Any] | None = None
    index: int = 0  # which of the prompt's ``n`` samples this is
    prompt: str | None = None  # the prompt's text, when it was given as text
    request_id: str = ""
    stop_reason: str | int | None = None  # as vLLM: the stop string, or stop token id, that ended it
    _more: list[CompletionOutput] = field(default_factory=list, repr=False)  # samples 1 .. n-1

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def cumulative_logprob(self) -> float | None:
        """The sum of the generated tokens' logprobs (with ``SamplingParams(logprobs=True)``), as vLLM's."""
        return None if self.logprobs is None else sum(lp["logprob"] for lp in self.logprobs)

    @property
    def outputs(self) -> list[CompletionOutput]:
        """The prompt's ``SamplingParams.n`` samples, this one (sample 0) first: vLLM's ``RequestOutput.outputs``
        (``outs[0].outputs[0].text`` reads as in vLLM)."""
        return [self, *self._more]


class LLM:
    def __init__(
        self,
        model: str | Path | None = None,
        dtype: torch.dtype | str = torch.float32,
        device: str = "cpu",
        keep_fp8: bool = False,
        engine_config: EngineConfig | None = None,
        chat_format: str | None = None,
        speculative_config: dict | str | None = None,
        max_model_len: int | None = None,
        seed: int | None = None,
    ):
        """``chat_format`` ("v3.2", "v3.1", "v3") overrides the format ``chat`` renders in (default: the one
        the checkpoint's config and chat template name). ``speculative_config`` (vLLM's spelling,
        ``{"method": "mtp", "num_speculative_tokens": 1}``) turns on speculative decoding with the MTP layer.
        As in vLLM, ``max_model_len`` caps the context, and ``seed`` makes requests without a seed of their own
        reproducible (each gets the next seed of a generator started from it)."""
        from dsv32.chat.family import check_family, family_for_model_dir
        from dsv32.chat.tokenizer import load_tokenizer
        from dsv32.weights.default_model import model_dir_or_default
        from dsv32.weights.loader import load_model

        if engine_config is not None and not isinstance(engine_config, EngineConfig):
            raise ValueError(f"engine_config: an EngineConfig, got {type(engine_config).__name__}")
        if speculative_config is not None:  # checked before the weights load
            engine_config = replace(
                engine_config or EngineConfig(),
                num_speculative_tokens=num_speculative_tokens(speculative_config),
            )
        if chat_format is not None:  # checked before the weights load
            check_family(chat_format)
        if max_model_len is not None:
            engine_config = replace(engine_config or EngineConfig(), max_model_len=max_model_len)
        if seed is not None and not (isinstance(seed, int) and not isinstance(seed, bool)):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self._seeds = random.Random(seed) if seed is not None else None
        model_dir = model_dir_or_default(model)
        self.model = load_model(model_dir, dtype=dtype, device=device, keep_fp8=keep_fp8, progress=False)
        self.chat_format = family_for_model_dir(model_dir, override=chat_format)
        self.tokenizer = load_tokenizer(model_dir)
        self.engine = EngineCore(self.model, engine_config, eos_id=self.tokenizer.eos_id)
        self.engine.attach_tokenizer(self.tokenizer)

    def generate(
        self,
        prompts: str | list[str] | None = None,
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        *,
        prompt_token_ids: list[list[int]] | None = None,
        priority: list[int] | None = None,
    ) -> list[CompletionOutput]:
        """One output per prompt, in order (with ``n`` > 1 its samples in ``.outputs``, the output itself the
        first). Strings get BOS prepended; ids are used as given. ``priority`` (one per prompt, as vLLM) needs
        an engine with ``scheduling_policy="priority"``."""
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("give either prompts or prompt_token_ids")
        if prompts is not None:
            if isinstance(prompts, str):
                prompts = [prompts]
            bad = [p for p in prompts if not isinstance(p, str)]
            if bad:
                raise ValueError(f"prompts are strings (token ids go in prompt_token_ids), got {bad[0]!r}")
            prompt_token_ids = [self.tokenizer.encode(p, add_bos=True) for p in prompts]
        else:
            prompt_token_ids = _id_lists(prompt_token_ids)
        n = len(prompt_token_ids)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * n
        elif isinstance(sampling_params, (list, tuple)) and all(
            isinstance(p, SamplingParams) for p in sampling_params
        ):
            params = list(sampling_params)
        else:
            raise ValueError("sampling_params: a SamplingParams or a list of them (one per prompt)")
        if len(params) != n:
            raise ValueError(f"{len(params)} sampling_params for {n} prompts")
        if self._seeds is not None:  # (vLLM's LLM(seed=...): unseeded requests reproducible run to run)
            params = [
                p if p.seed is not None else replace(p, seed=self._seeds.getrandbits(63)) for p in params
            ]
        if priority is not None:  # (vLLM's argument; needs EngineConfig(scheduling_policy="priority"))
            if len(priority) != n:
                raise ValueError(f"{len(priority)} priorities for {n} prompts")
            params = [replace(p, priority=q) for p, q in zip(params, priority, strict=True)]
        processor = OutputProcessor(self.tokenizer)
        texts = prompts if prompts is not None else [None] * n
        results = [
            CompletionOutput(list(ids), prompt=t) for ids, t in zip(prompt_token_ids, texts, strict=True)
        ]
        samples: dict[str, CompletionOutput] = {}  # by engine request id: each prompt's n samples
        stop_ids_of: dict[str, set[int]] = {}  # (vLLM's stop_reason names a stop token id, not EOS)
        try:
            for i, (ids, p) in enumerate(zip(prompt_token_ids, params, strict=True)):
                for j, sp in enumerate(p.samples()):  # (their shared prompt is computed once)
                    res = results[i] if j == 0 else CompletionOutput(list(ids), index=j, prompt=texts[i])
                    if j:
                        results[i]._more.append(res)
                    rid = res.request_id = f"llm-{id(results)}-{i}-{j}"
                    stop_ids_of[rid] = set(sp.stop_token_ids or ())
                    self.engine.add_request(rid, list(ids), sp)
                    processor.add(rid, sp)
                    samples[rid] = res
            while self.engine.has_work():
                for out in processor.process(self.engine, self.engine.step()):
                    res = samples[out.request_id]
                    res.token_ids.extend(out.new_token_ids)
                    res.text += out.text
                    if out.logprobs is not None:
                        res.logprobs = (res.logprobs or []) + out.logprobs
                    if out.prompt_logprobs is not None:
                        res.prompt_logprobs = out.prompt_logprobs
                    res.num_cached_tokens = out.usage.cached_tokens
                    if out.finished:
                        res.finish_reason = out.finish_reason
                        stop_ids = stop_ids_of[out.request_id]
                        last = res.token_ids[-1] if res.token_ids else None
                        if out.finish_reason == "stop":
                            res.stop_reason = out.stop_sequence or (last if last in stop_ids else None)
        finally:  # an error (or Ctrl-C) must not leave blocks behind
            for rid in samples:
                self.engine.abort(rid)
        return results

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        *,
        tools: list[dict[str, Any]] | None = None,
        thinking: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[CompletionOutput]:
        """vLLM's ``LLM.chat``: one conversation (OpenAI-style messages) or a list of them, each rendered in the
        model's chat format as the server renders it, generated together through ``generate``. Each output's
        ``message`` is its reply parsed as the API parses it: ``reasoning_content`` (thinking mode), ``content``
        and ``tool_calls`` (DSML calls of ``tools``, OpenAI-style). ``thinking`` may also come as vLLM's
        ``chat_template_kwargs={"thinking": True}``. Bad messages or tools raise ``ChatFormatError``."""
        from dsv32.chat import encode_prompt, parse_completion

        kwargs = dict(chat_template_kwargs or {})
        thinking = bool(kwargs.pop("thinking", thinking))
        if kwargs:
            raise ValueError(f"chat_template_kwargs: only 'thinking' is known, got {sorted(kwargs)}")
        if not isinstance(messages, (list, tuple)):
            raise ValueError(
                f"messages: a list of message dicts (one conversation) or a list of such lists, got "
                f"{type(messages).__name__}"
            )
        conversations = [messages] if not messages or isinstance(messages[0], dict) else messages
        ids = [
            encode_prompt(
                conv, tools=tools, thinking=thinking, family=self.chat_format, tokenizer=self.tokenizer
            )
            for conv in conversations
        ]
        outputs = self.generate(prompt_token_ids=ids, sampling_params=sampling_params)
        for out in (sample for o in outputs for sample in o.outputs):
            parsed = parse_completion(out.text, tools=tools, thinking=thinking, family=self.chat_format)
            parsed.pop("problems", None)  # for a server's logs, not a reply
            out.message = parsed
        return outputs


def _id_lists(prompt_token_ids) -> list[list[int]]:
    """``prompt_token_ids`` as lists: several prompts (lists, tuples, 1-D arrays or tensors of ids) or, as vLLM
    takes it, one flat list of ids."""
    if hasattr(prompt_token_ids, "tolist"):  # a numpy array or a tensor: 1-D one prompt, 2-D several
        prompt_token_ids = prompt_token_ids.tolist()
    if not isinstance(prompt_token_ids, (list, tuple)):
        raise ValueError(f"prompt_token_ids: lists of token ids, got {type(prompt_token_ids).__name__}")
    if prompt_token_ids and all(isinstance(t, numbers.Number) for t in prompt_token_ids):
        prompt_token_ids = [prompt_token_ids]  # (one whose ids are not all integers: the engine says so)
    out = []
    for ids in prompt_token_ids:
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        if not isinstance(ids, (list, tuple)):
            raise ValueError(f"prompt_token_ids: each prompt is a list of token ids, got {ids!r}")
        out.append(list(ids))
    return out
