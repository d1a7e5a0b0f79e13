"""Single-sequence raw completion on the model's own latent cache (the engine does batching).

Prefill runs the prompt in the naive MLA form, then each new token is decoded in the absorbed form
against the cache; sampling is greedy at temperature 0, otherwise temperature + nucleus (top_p).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from dsv32.model.transformer import DeepseekForCausalLM


def sample_next(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> int:
    """One token id from logits [vocab]."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


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
    """Yield up to ``max_new_tokens`` new token ids, stopping after ``eos_id``."""
    if not prompt_ids:
        raise ValueError("prompt must hold at least one token")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    limit = model.config.max_position_embeddings
    total = len(prompt_ids) + max_new_tokens
    if total > limit:
        raise ValueError(
            f"prompt ({len(prompt_ids)}) + max_new_tokens ({max_new_tokens}) exceeds the context {limit}"
        )
    generator = None
    if seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(seed)
    cache = model.new_cache(1, total)
    ids = torch.tensor([prompt_ids], device=model.device)
    logits = model(ids, 0, cache)[0, -1]
    pos = len(prompt_ids)
    for _ in range(max_new_tokens):
        tok = sample_next(logits, temperature, top_p, generator)
        yield tok
        if eos_id is not None and tok == eos_id:
            return
        logits = model(torch.tensor([[tok]], device=model.device), pos, cache)[0, -1]
        pos += 1
