"""Small configs for checkpoint tests (spec §9 shapes: every feature, tiny sizes)."""

from __future__ import annotations

from dataclasses import replace

from dsv32.config import ModelConfig, RopeConfig

YARN = RopeConfig(
    theta=10000.0,
    type="yarn",
    factor=40.0,
    original_max_position_embeddings=128,
    beta_fast=32.0,
    beta_slow=1.0,
    mscale=1.0,
    mscale_all_dim=1.0,
)


def small_config(model_type: str = "deepseek_v32", *, q_lora: bool = True, mtp: int = 1, **kw) -> ModelConfig:
    """Layer 0 dense, layers 1..2 MoE (16 experts top-4 in 4 groups), MLA with q LoRA, indexer for v32."""
    cfg = ModelConfig(
        model_type=model_type,
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=64,
        num_hidden_layers=3,
        num_nextn_predict_layers=mtp,
        first_k_dense_replace=1,
        num_attention_heads=4,
        q_lora_rank=96 if q_lora else None,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=16,
        n_shared_experts=1,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        max_position_embeddings=5120,
        rope=YARN,
        index_n_heads=4,
        index_head_dim=64,
        index_topk=8,
        torch_dtype="float32",
    )
    if model_type == "deepseek_v3":
        cfg = replace(cfg, index_n_heads=None, index_head_dim=None, index_topk=None)
    return replace(cfg, **kw)


def block_aligned_config(model_type: str = "deepseek_v32") -> ModelConfig:
    """Every FP8 projection dimension is <= 128 or a multiple of 128 (no ambiguous partial blocks)."""
    return small_config(
        model_type,
        qk_nope_head_dim=32,
        qk_rope_head_dim=32,
        v_head_dim=32,
        q_lora_rank=128,
        index_head_dim=64,
    )
