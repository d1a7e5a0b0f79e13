"""Single-sequence raw completion on the model's own latent cache (the engine does batching).

Prefill runs the prompt in the naive MLA form, then each new token is decoded in the absorbed form
against the cache; tokens are drawn by the engine's sampler (greedy at temperature 0, otherwise
temperature + nucleus top_p, reproducible with a seed).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from dsv32.engine.sampler import Sampler, SamplingState
from dsv32.engine.sampling_params import SamplingParams, token_id_list
from dsv32.model.transformer import DeepseekForCausalLM


@torch.inference_mode()
def generate(
    model: DeepseekForCausalLM,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    eos_id: int | None = None,
) -> Iterator[int]:
    """Yield up to ``max_new_tokens`` new token ids, stopping after ``eos_id``. ``prompt_ids``: any sequence of
    integers (a list, a tuple, a 1-D numpy array or tensor)."""
    prompt_ids = token_id_list(prompt_ids)
    if not prompt_ids:
        raise ValueError("prompt must hold at least one token")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    vocab = model.config.vocab_size
    bad = [t for t in prompt_ids if not 0 <= t < vocab]
    if bad:  # (e.g. a model whose vocabulary is smaller than its tokenizer's ids)
        raise ValueError(f"prompt token id {bad[0]} is outside the model's vocabulary [0, {vocab})")
    params = SamplingParams(temperature=temperature, top_p=top_p, seed=seed)  # range errors name the field
    limit = model.config.max_position_embeddings
    total = len(prompt_ids) + max_new_tokens
    if total > limit:
        raise ValueError(
            f"prompt ({len(prompt_ids)}) + max_new_tokens ({max_new_tokens}) exceeds the context {limit}"
        )
    sampler, state = Sampler(), SamplingState.create(params, prompt_ids)
    cache = model.new_cache(1, total)
    ids = torch.tensor([prompt_ids], device=model.device)
    logits = model(ids, 0, cache)[0, -1]
    pos = len(prompt_ids)
    for _ in range(max_new_tokens):
        tok = int(sampler(logits[None].float(), [state]).token_ids[0])
        state.output_ids.append(tok)
        yield tok
        if eos_id is not None and tok == eos_id:
            return
        logits = model(torch.tensor([[tok]], device=model.device), pos, cache)[0, -1]
        pos += 1
