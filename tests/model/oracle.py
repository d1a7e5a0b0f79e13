"""Helpers to build random tiny transformers models (the oracle) and load them through our loader."""

from __future__ import annotations

from pathlib import Path

import torch

YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 40.0,
    "original_max_position_embeddings": 128,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}


def tiny_kwargs(**overrides) -> dict:
    kw = dict(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=64,
        num_hidden_layers=3,
        first_k_dense_replace=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=96,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=16,
        n_shared_experts=1,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        max_position_embeddings=5120,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        rope_parameters=dict(YARN),
    )
    kw.update(overrides)
    return kw


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights everywhere, incl. norm weights, k_norm bias and the router bias (zeros/ones hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(0.05 * torch.randn(b.shape, generator=g))


def make_hf(kind: str, out_dir: Path, seed: int = 0, **overrides):
    """Build, randomize and save_pretrained a transformers model; returns it in eval mode."""
    from transformers import (
        DeepseekV3Config,
        DeepseekV3ForCausalLM,
        DeepseekV32Config,
        DeepseekV32ForCausalLM,
    )

    torch.manual_seed(seed)
    if kind == "v32":
        kw = tiny_kwargs(index_n_heads=16, index_head_dim=32, index_topk=8)
        kw.update(overrides)
        model = DeepseekV32ForCausalLM(DeepseekV32Config(**kw))
    elif kind == "v3":
        kw = tiny_kwargs(num_nextn_predict_layers=0)
        kw.update(overrides)
        model = DeepseekV3ForCausalLM(DeepseekV3Config(**kw))
    else:
        raise ValueError(kind)
    model = model.float().eval()
    randomize_(model, seed)
    model.save_pretrained(out_dir)
    return model


def load_ours(path: Path, **kw):
    import dsv32

    return dsv32.load_model(path, dtype=torch.float32, progress=False, **kw)


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4) -> float:
    """max |diff| <= rel * max |ref| (the issue's 'relative to logit scale'); returns the max diff."""
    diff = (ours - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert diff <= rel * scale, f"max |diff| {diff:.3g} exceeds {rel} x logit scale {scale:.3g}"
    return diff
