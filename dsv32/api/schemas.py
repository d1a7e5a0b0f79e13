"""Request bodies of the OpenAI/DeepSeek routes, with the types, ranges and defaults of api.md.

Unknown top-level keys are accepted and ignored (OpenAI SDK ``extra_body`` passes through). Messages are
validated by the chat encoder, which names the offending field.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from dsv32.engine.sampling_params import MAX_N


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    include_usage: bool = False


class Thinking(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["enabled", "disabled"]


class Reasoning(BaseModel):
    """OpenRouter-style ``reasoning``: ``enabled`` switches thinking; ``exclude`` hides the reasoning."""

    model_config = ConfigDict(extra="allow", strict=True)
    enabled: bool | None = None
    effort: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    exclude: bool = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["text", "json_object", "json_schema"] = "text"


class SamplingFields(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="allow", strict=True)
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)
    # vLLM's extension: each prompt token's logprob (and rank) with this many alternatives; not streamed
    prompt_logprobs: int | None = Field(default=None, ge=0, le=20)
    min_p: float | None = Field(default=None, ge=0, le=1)
    top_a: float | None = Field(default=None, ge=0, le=1)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, gt=0, le=2)
    seed: int | None = None
    logit_bias: dict[str, float] | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=None, ge=1, le=MAX_N)  # samples per prompt (choices)
    ignore_eos: bool | None = None  # vLLM extension: keep generating past EOS (benchmarks)
    # vLLM's structured outputs (``dsv32.api.structured.vllm_guided``): the older fields and the newer object;
    # ``structured_outputs: true`` is OpenRouter's flag beside response_format
    guided_json: dict[str, Any] | bool | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: bool | dict[str, Any] | None = None
    stop_token_ids: list[int] | None = None  # vLLM extension: also stop on these tokens
    min_tokens: int | None = Field(default=None, ge=0)  # vLLM extension: no stop before this many tokens
    return_token_ids: bool | None = None  # vLLM extension: the prompt's and each choice's token ids too
    priority: int | None = None  # vLLM extension: lower first, with serve --scheduling-policy priority
    # vLLM extensions: the matched stop string kept at the end of the text; only these tokens sampled; words
    # never written; only the prompt's last k tokens (-1: as many as the context holds)
    include_stop_str_in_output: bool | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)
    user: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[dict[str, Any]] = Field(min_length=1)
    # OpenAI's newer name for max_tokens, which newer OpenAI clients send (vLLM takes it too); wins when both
    # are given. DeepSeek does not document it: ignoring it would let a reply run to the mode's default.
    max_completion_tokens: int | None = Field(default=None, ge=1)
    thinking: Thinking | None = None
    reasoning: Reasoning | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = Field(default=None, max_length=128)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # vLLM's way to switch DeepSeek's thinking mode: {"thinking": true} ("enable_thinking" is taken too)
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionRequest(SamplingFields):
    # one prompt (text or token ids), or OpenAI's batch: a list of texts or of id lists (choice i answers
    # prompt i). The third branch's name is left out of validation errors ("a string or a list of token ids")
    prompt: str | list[int] | list[str | list[int]]
    # 0 only with echo: the prompt alone, scored with ``logprobs`` (how evaluation harnesses read prompt logprobs)
    max_tokens: int | None = Field(default=None, ge=0)
    suffix: str | None = None
    echo: bool | None = False
    logprobs: int | None = Field(default=None, ge=0, le=20)

    @field_validator("prompt", mode="before")
    @classmethod
    def _token_id_lists(cls, v: Any) -> Any:
        """A batch of token-id lists with a non-integer id: name that id (pydantic's union error would name an
        item of another branch: "prompt[0]: should be a valid integer" for [["a"]])."""
        if isinstance(v, list):
            for i, ids in enumerate(v):
                for k, t in enumerate(ids if isinstance(ids, list) else ()):
                    if type(t) is not int:
                        got = json.dumps(t)[:40]
                        raise PydanticCustomError(
                            "int_type", f"prompt[{i}][{k}] should be a token id, got {got}"
                        )
        return v
