"""checkpoint_layout: the model's own parameter names, and the exact tensors of the 671B release."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from dsv32.config import ModelConfig
from dsv32.model.transformer import DeepseekForCausalLM
from dsv32.weights.layout import checkpoint_layout, scale_name, scale_shape
from tests.weights.configs import small_config


@pytest.mark.parametrize(
    "model_type,q_lora,mtp",
    [
        ("deepseek_v32", True, 1),
        ("deepseek_v32", True, 0),
        ("deepseek_v3", True, 1),
        ("deepseek_v3", False, 1),
        ("deepseek_v3", False, 0),
    ],
)
@pytest.mark.parametrize("fp8", [False, True])
def test_layout_equals_model_state_dict(model_type: str, q_lora: bool, mtp: int, fp8: bool) -> None:
    cfg = small_config(model_type, q_lora=q_lora, mtp=mtp, fp8_block_size=(128, 128) if fp8 else None)
    with torch.device("meta"):
        model = DeepseekForCausalLM(cfg)
    layout = checkpoint_layout(cfg)
    weights = {k: v.shape for k, v in layout.items() if not k.endswith("weight_scale_inv")}
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert set(weights) == set(state)
    assert weights == state
    if fp8:
        for name, spec in layout.items():
            if spec.dtype_kind == "fp8":
                assert layout[scale_name(name)].shape == scale_shape(spec.shape, (128, 128))


def test_layout_v3_without_q_lora_uses_q_proj() -> None:
    layout = checkpoint_layout(small_config("deepseek_v3", q_lora=False))
    assert layout["model.layers.0.self_attn.q_proj.weight"].shape == (4 * 48, 256)
    assert not any("q_a_proj" in k or "q_b_proj" in k or "indexer" in k for k in layout)


def test_layout_dtype_rule() -> None:
    """Spec §7: block projections FP8 except indexer.weights_proj, mlp.gate, eh_proj; embeddings/heads BF16;
    norms, biases, scales FP32."""
    layout = checkpoint_layout(small_config(fp8_block_size=(128, 128)))
    for name, spec in layout.items():
        if name.endswith("weight_scale_inv") or "norm" in name or name.endswith(("bias", "correction_bias")):
            assert spec.dtype_kind == "fp32", name
        elif name.endswith(("weights_proj.weight", "mlp.gate.weight", "eh_proj.weight")):
            assert spec.dtype_kind == "bf16", name
        elif name.endswith(("embed_tokens.weight", "lm_head.weight", "shared_head.head.weight")):
            assert spec.dtype_kind == "bf16", name
        else:
            assert spec.dtype_kind == "fp8", name
            assert scale_name(name) in layout
    # deepseek_v3 (V3/R1 releases) keeps its norms in BF16
    v3 = checkpoint_layout(small_config("deepseek_v3", fp8_block_size=(128, 128)))
    assert v3["model.layers.0.input_layernorm.weight"].dtype_kind == "bf16"
    assert v3["model.layers.1.mlp.gate.e_score_correction_bias"].dtype_kind == "fp32"


def _config_671b_two_layers() -> ModelConfig:
    """The 671B dimensions (ModelConfig defaults) with 2 main layers (0 dense, 1 MoE), 8 experts, MTP."""
    cfg = ModelConfig.from_dict(
        {
            "model_type": "deepseek_v32",
            "num_hidden_layers": 2,
            "first_k_dense_replace": 1,
            "n_routed_experts": 8,
            "n_group": 4,
            "topk_group": 2,
            "num_experts_per_tok": 4,
            "num_nextn_predict_layers": 1,
            "quantization_config": {
                "quant_method": "fp8",
                "fmt": "e4m3",
                "activation_scheme": "dynamic",
                "weight_block_size": [128, 128],
                "scale_fmt": "ue8m0",
            },
        }
    )
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.vocab_size, cfg.intermediate_size) == (
        7168,
        128,
        129280,
        18432,
    )
    return cfg


# (shape, kind, scale shape or None) per name suffix, transcribed from spec §7
SPEC_671B_LAYER = {
    "input_layernorm.weight": ((7168,), "fp32", None),
    "post_attention_layernorm.weight": ((7168,), "fp32", None),
    "self_attn.q_a_proj.weight": ((1536, 7168), "fp8", (12, 56)),
    "self_attn.q_a_layernorm.weight": ((1536,), "fp32", None),
    "self_attn.q_b_proj.weight": ((24576, 1536), "fp8", (192, 12)),
    "self_attn.kv_a_proj_with_mqa.weight": ((576, 7168), "fp8", (5, 56)),
    "self_attn.kv_a_layernorm.weight": ((512,), "fp32", None),
    "self_attn.kv_b_proj.weight": ((32768, 512), "fp8", (256, 4)),
    "self_attn.o_proj.weight": ((7168, 16384), "fp8", (56, 128)),
    "self_attn.indexer.wq_b.weight": ((8192, 1536), "fp8", (64, 12)),
    "self_attn.indexer.wk.weight": ((128, 7168), "fp8", (1, 56)),
    "self_attn.indexer.k_norm.weight": ((128,), "fp32", None),
    "self_attn.indexer.k_norm.bias": ((128,), "fp32", None),
    "self_attn.indexer.weights_proj.weight": ((64, 7168), "bf16", None),
}
SPEC_671B_DENSE = {
    "mlp.gate_proj.weight": ((18432, 7168), "fp8", (144, 56)),
    "mlp.up_proj.weight": ((18432, 7168), "fp8", (144, 56)),
    "mlp.down_proj.weight": ((7168, 18432), "fp8", (56, 144)),
}
SPEC_671B_MOE = {
    "mlp.gate.weight": ((8, 7168), "bf16", None),
    "mlp.gate.e_score_correction_bias": ((8,), "fp32", None),
    **{
        f"mlp.{e}.{p}_proj.weight": ((2048, 7168), "fp8", (16, 56))
        for e in [*(f"experts.{i}" for i in range(8)), "shared_experts"]
        for p in ("gate", "up")
    },
    **{
        f"mlp.{e}.down_proj.weight": ((7168, 2048), "fp8", (56, 16))
        for e in [*(f"experts.{i}" for i in range(8)), "shared_experts"]
    },
}
SPEC_671B_MTP = {
    "embed_tokens.weight": ((129280, 7168), "bf16", None),
    "enorm.weight": ((7168,), "fp32", None),
    "hnorm.weight": ((7168,), "fp32", None),
    "eh_proj.weight": ((7168, 14336), "bf16", None),
    "shared_head.norm.weight": ((7168,), "fp32", None),
    "shared_head.head.weight": ((129280, 7168), "bf16", None),
}


def test_layout_671b_exact() -> None:
    layout = checkpoint_layout(_config_671b_two_layers())
    want = {
        "model.embed_tokens.weight": ((129280, 7168), "bf16", None),
        "model.norm.weight": ((7168,), "fp32", None),
        "lm_head.weight": ((129280, 7168), "bf16", None),
    }
    for i, extra in ((0, SPEC_671B_DENSE), (1, SPEC_671B_MOE), (2, {**SPEC_671B_MOE, **SPEC_671B_MTP})):
        for suffix, spec in {**SPEC_671B_LAYER, **extra}.items():
            want[f"model.layers.{i}.{suffix}"] = spec
    expected = {}
    for name, (shape, kind, scale) in want.items():
        expected[name] = (shape, kind)
        if scale is not None:
            expected[scale_name(name)] = (scale, "fp32")
    got = {name: (spec.shape, spec.dtype_kind) for name, spec in layout.items()}
    assert got == expected
    # first tensor is the embedding (shard 1 of the release), scales follow their weights
    names = list(layout)
    assert names[0] == "model.embed_tokens.weight"
    i = names.index("model.layers.0.self_attn.q_b_proj.weight")
    assert names[i + 1] == "model.layers.0.self_attn.q_b_proj.weight_scale_inv"


def test_layout_671b_full_counts() -> None:
    """The full 61-layer V3.2 release: 92,425 tensors and 685,396,921,376 elements (spec §7); V3 minus
    62 x 7 indexer tensors."""
    fp8 = {"fp8_block_size": (128, 128)}
    v32 = checkpoint_layout(replace(ModelConfig(), **fp8))
    assert len(v32) == 92425
    assert sum(s.numel for s in v32.values()) == 685_396_921_376
    v3 = checkpoint_layout(
        replace(ModelConfig(), model_type="deepseek_v3", index_n_heads=None, index_head_dim=None, **fp8)
    )
    assert len(v3) == 91991 == 92425 - 62 * 7
    assert sum(s.numel for s in v3.values()) == 684_531_386_000
