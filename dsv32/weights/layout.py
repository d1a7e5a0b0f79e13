"""The tensor layout of a DeepSeek-V3 / V3.2 Hugging Face checkpoint, derived from a ModelConfig.

Names, shapes and stored dtypes follow the released checkpoints (architecture spec §6-§8): with FP8
block quantization every 2-D projection inside the blocks is ``float8_e4m3fn`` with an fp32
``weight_scale_inv`` of shape ``[ceil(out/bo), ceil(in/bi)]``, except the indexer's ``weights_proj``,
the router ``mlp.gate`` and the MTP ``eh_proj`` (BF16); embeddings and heads are BF16; norms, the
indexer ``k_norm`` and the router's ``e_score_correction_bias`` are FP32 (V3/R1 keep norms in BF16).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from dsv32.config import ModelConfig

DtypeKind = Literal["fp8", "bf16", "fp32"]
"""How a tensor is stored: ``fp8`` (e4m3fn), ``bf16`` (the checkpoint's main dtype), ``fp32``."""

SCALE_SUFFIX = "weight_scale_inv"


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype_kind: DtypeKind

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def scale_name(weight_name: str) -> str:
    """``...proj.weight`` -> ``...proj.weight_scale_inv``."""
    if not weight_name.endswith(".weight"):
        raise ValueError(f"not a weight name: {weight_name}")
    return weight_name[: -len("weight")] + SCALE_SUFFIX


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """Shape of the block-scale grid of a 2-D weight: ``[ceil(out/bo), ceil(in/bi)]``."""
    out_f, in_f = shape
    return (-(-out_f // block[0]), -(-in_f // block[1]))


def mtp_layer_indices(cfg: ModelConfig) -> range:
    """Layer indices of the MTP modules (stored after the main layers, e.g. layer 61 of the 671B model)."""
    return range(cfg.num_hidden_layers, cfg.num_hidden_layers + cfg.num_nextn_predict_layers)


def checkpoint_layout(cfg: ModelConfig) -> dict[str, TensorSpec]:
    """Every tensor of the HF checkpoint for ``cfg``, in checkpoint order (scales right after weights)."""
    out: dict[str, TensorSpec] = {}
    block = cfg.fp8_block_size
    norm_kind: DtypeKind = "fp32" if cfg.model_type == "deepseek_v32" else "bf16"
    h = cfg.hidden_size

    def proj(name: str, out_f: int, in_f: int) -> None:
        """A projection inside a block: FP8 (+ scale) when the checkpoint is block-quantized."""
        if block is None:
            out[name] = TensorSpec((out_f, in_f), "bf16")
        else:
            out[name] = TensorSpec((out_f, in_f), "fp8")
            out[scale_name(name)] = TensorSpec(scale_shape((out_f, in_f), block), "fp32")

    def plain(name: str, shape: tuple[int, ...], kind: DtypeKind) -> None:
        out[name] = TensorSpec(shape, kind)

    def mlp(prefix: str, inter: int) -> None:
        proj(f"{prefix}.gate_proj.weight", inter, h)
        proj(f"{prefix}.up_proj.weight", inter, h)
        proj(f"{prefix}.down_proj.weight", h, inter)

    def block_tensors(i: int) -> None:
        p = f"model.layers.{i}."
        plain(p + "input_layernorm.weight", (h,), norm_kind)
        a = p + "self_attn."
        n_heads = cfg.num_attention_heads
        if cfg.q_lora_rank is None:
            proj(a + "q_proj.weight", n_heads * cfg.qk_head_dim, h)
        else:
            proj(a + "q_a_proj.weight", cfg.q_lora_rank, h)
            plain(a + "q_a_layernorm.weight", (cfg.q_lora_rank,), norm_kind)
            proj(a + "q_b_proj.weight", n_heads * cfg.qk_head_dim, cfg.q_lora_rank)
        proj(a + "kv_a_proj_with_mqa.weight", cfg.kv_lora_rank + cfg.qk_rope_head_dim, h)
        plain(a + "kv_a_layernorm.weight", (cfg.kv_lora_rank,), norm_kind)
        proj(a + "kv_b_proj.weight", n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)
        proj(a + "o_proj.weight", h, n_heads * cfg.v_head_dim)
        if cfg.has_indexer:
            assert cfg.index_n_heads is not None and cfg.index_head_dim is not None
            assert cfg.q_lora_rank is not None
            ix = a + "indexer."
            proj(ix + "wq_b.weight", cfg.index_n_heads * cfg.index_head_dim, cfg.q_lora_rank)
            proj(ix + "wk.weight", cfg.index_head_dim, h)
            plain(ix + "k_norm.weight", (cfg.index_head_dim,), "fp32")
            plain(ix + "k_norm.bias", (cfg.index_head_dim,), "fp32")
            plain(ix + "weights_proj.weight", (cfg.index_n_heads, h), "bf16")
        plain(p + "post_attention_layernorm.weight", (h,), norm_kind)
        if cfg.is_moe_layer(i):
            plain(p + "mlp.gate.weight", (cfg.n_routed_experts, h), "bf16")
            plain(p + "mlp.gate.e_score_correction_bias", (cfg.n_routed_experts,), "fp32")
            for e in range(cfg.n_routed_experts):
                mlp(f"{p}mlp.experts.{e}", cfg.moe_intermediate_size)
            if cfg.n_shared_experts > 0:
                mlp(p + "mlp.shared_experts", cfg.moe_intermediate_size * cfg.n_shared_experts)
        else:
            mlp(p + "mlp", cfg.intermediate_size)

    plain("model.embed_tokens.weight", (cfg.vocab_size, h), "bf16")
    for i in range(cfg.num_hidden_layers):
        block_tensors(i)
    for i in mtp_layer_indices(cfg):
        p = f"model.layers.{i}."
        plain(p + "embed_tokens.weight", (cfg.vocab_size, h), "bf16")
        plain(p + "enorm.weight", (h,), norm_kind)
        plain(p + "hnorm.weight", (h,), norm_kind)
        plain(p + "eh_proj.weight", (h, 2 * h), "bf16")
        block_tensors(i)
        plain(p + "shared_head.norm.weight", (h,), norm_kind)
        plain(p + "shared_head.head.weight", (cfg.vocab_size, h), "bf16")
    plain("model.norm.weight", (h,), norm_kind)
    plain("lm_head.weight", (cfg.vocab_size, h), "bf16")
    return out
