"""bf16 follows the precision of DeepSeek's reference inference code (architecture.md §2-§4): fp32 norm
weights and norms, SwiGLU and rotations in fp32, fp32 logits from an fp32 copy of lm_head. Each piece is
checked against its formula written out here in fp32, and a bf16 load of a checkpoint is checked end to end.
In fp32 all of this is the plain computation (the parity tests against transformers are unchanged)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from dsv32.model.layers import MLP, LayerNorm
from dsv32.model.rope import apply_rope_half, apply_rope_interleaved
from dsv32.weights.loader import load_model
from dsv32.weights.synthetic import write_synthetic_checkpoint
from tests.weights.configs import small_config

BF16 = torch.bfloat16


def _randn(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def test_swiglu_runs_in_fp32_then_casts_back():
    mlp = MLP(64, 96)
    with torch.no_grad():
        for i, lin in enumerate((mlp.gate_proj, mlp.up_proj, mlp.down_proj)):
            lin.weight.copy_(_randn(*lin.weight.shape, seed=i, scale=0.3))
    mlp = mlp.to(BF16)
    x = _randn(5, 64, seed=9).to(BF16)
    gate, up = F.linear(x, mlp.gate_proj.weight), F.linear(x, mlp.up_proj.weight)
    want = F.linear((F.silu(gate.float()) * up.float()).to(BF16), mlp.down_proj.weight)
    with torch.no_grad():
        got = mlp(x)
    assert got.dtype == BF16 and torch.equal(got, want)
    bf16_product = F.linear(F.silu(gate) * up, mlp.down_proj.weight)  # transformers' order
    assert not torch.equal(got, bf16_product)  # the check can tell the two apart


def test_rotations_run_in_fp32_then_cast_back():
    x = _randn(3, 4, 16, seed=1, scale=4.0).to(BF16)
    angles = torch.arange(3.0)[:, None, None] * torch.linspace(0.1, 2.0, 8)
    cos, sin = angles.cos(), angles.sin()
    xf = x.float()
    x1, x2 = xf[..., 0::2], xf[..., 1::2]
    inter = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2).to(BF16)
    assert torch.equal(apply_rope_interleaved(x, cos, sin), inter)
    h1, h2 = xf[..., :8], xf[..., 8:]
    half = torch.cat((h1 * cos - h2 * sin, h2 * cos + h1 * sin), dim=-1).to(BF16)
    assert torch.equal(apply_rope_half(x, cos, sin), half)


def test_indexer_layer_norm_runs_in_fp32_with_fp32_weights():
    norm = LayerNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + _randn(64, seed=2, scale=0.1))
        norm.bias.copy_(_randn(64, seed=3, scale=0.1))
    x = _randn(7, 64, seed=4, scale=3.0).to(BF16)
    want = F.layer_norm(x.float(), (64,), norm.weight, norm.bias, 1e-6).to(BF16)
    assert torch.equal(norm(x), want)


def test_a_bf16_load_keeps_the_reference_fp32_tensors_and_gives_fp32_logits(tmp_path: Path):
    cfg = small_config("deepseek_v32", mtp=1)
    d = write_synthetic_checkpoint(cfg, tmp_path, dtype=BF16)
    model = load_model(d, dtype=BF16, progress=False)
    layer = model.model.layers[1]
    fp32 = [
        model.lm_head.weight, model.mtp_layers[0].shared_head.head.weight, model.model.norm.weight,
        layer.input_layernorm.weight, layer.self_attn.kv_a_layernorm.weight, layer.mlp.gate.weight,
        layer.self_attn.indexer.k_norm.weight, layer.self_attn.indexer.k_norm.bias,
        layer.self_attn.indexer.weights_proj.weight,
    ]  # fmt: skip
    assert all(t.dtype == torch.float32 for t in fp32)
    assert model.model.embed_tokens.weight.dtype == BF16 and layer.self_attn.o_proj.weight.dtype == BF16
    assert model.mtp_layers[0].shared_head.head.weight is model.lm_head.weight  # still one copy
    ids = torch.tensor([[3, 17, 5, 300, 42, 7, 99, 128]])
    with torch.no_grad():
        hidden = model.hidden_states(ids)
        logits = model(ids)
    assert hidden.dtype == BF16 and logits.dtype == torch.float32
    assert torch.equal(logits, F.linear(hidden.float(), model.lm_head.weight))
    # not bf16 values cast up: the head's fp32 output keeps its low bits
    assert (logits.to(BF16).float() != logits).float().mean() > 0.9
