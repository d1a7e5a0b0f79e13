"""The oneDNN-prepacked CPU matmuls: same results as the plain matmul, shared for tied weights, dropped
when a weight changes, never used for FP8 weights; fused gate+up and MLA input projections."""

from __future__ import annotations

import copy

import pytest
import torch

from dsv32.model.layers import (
    FP8_DTYPE,
    MLP,
    Linear,
    PackedMatmul,
    keep_packed_matmuls,
    onednn_linear_available,
)
from dsv32.model.transformer import DeepseekForCausalLM
from tests.model.oracle import randomize_
from tests.model.test_forms import tiny_config

pytestmark = pytest.mark.skipif(not onednn_linear_available(), reason="this PyTorch build has no oneDNN")


def _linear(out_f: int = 96, in_f: int = 80, seed: int = 0) -> Linear:
    lin = Linear(in_f, out_f)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed)))
    return lin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepacked_linear_matches_plain_matmul(dtype):
    lin = _linear().to(dtype)
    x = torch.randn(3, 7, 80, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.inference_mode():
        plain = lin(x)
        assert lin.prepack()
        packed = lin(x)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(packed, plain, rtol=tol, atol=tol * plain.abs().max().item())
    assert packed.shape == (3, 7, 96) and packed.dtype == dtype


def test_packed_rows_do_not_depend_on_the_batch():
    """A row's result is the same alone or among 63 others (what makes batched greedy decoding exact)."""
    lin = _linear(512, 256)
    lin.prepack()
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        assert torch.equal(lin(x)[5:6], lin(x[5:6]))


def test_in_place_weight_change_drops_the_packed_copy():
    lin = _linear()
    lin.prepack()
    x = torch.randn(2, 80)
    with torch.no_grad():
        lin.weight.mul_(2.0)
    with torch.inference_mode():
        y = lin(x)
    assert lin._packed is None
    torch.testing.assert_close(y, x @ lin.weight.T)


def test_fp8_weights_are_not_packed():
    lin = Linear(256, 128)
    w = (torch.randn(128, 256) * 0.1).to(FP8_DTYPE)
    lin.load_fp8(w, torch.ones(1, 2))
    assert not lin.prepack()


def test_model_prepack_shares_tied_weights_and_keeps_logits():
    torch.manual_seed(0)
    model = DeepseekForCausalLM(tiny_config()).eval()
    randomize_(model, seed=4)
    plain = copy.deepcopy(model)
    packed_bytes = model.prepack_cpu_weights()
    # the MTP head is lm_head (tied): one packed copy; weights_proj is read densely, not packed
    mtp_head = model.mtp_layers[0].shared_head.head
    assert mtp_head._packed.weight is model.lm_head._packed.weight
    assert model.model.layers[0].self_attn.indexer.weights_proj._packed is None
    dense = sum(
        m.weight.numel() * 4
        for n, m in model.named_modules()
        if isinstance(m, Linear) and not n.endswith("weights_proj") and m is not mtp_head
    )
    assert packed_bytes == dense
    ids = torch.randint(0, 300, (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        torch.testing.assert_close(model(ids), plain(ids), rtol=1e-5, atol=1e-5)


def test_a_copy_of_a_packed_model_gets_no_packed_copies_until_packed_again():
    """A oneDNN-layout tensor cannot be copied, and a compiled forward finds a packed matmul by its handle: a
    deep copy of a packed model runs plain matmuls (same logits) and, packed again, gets handles of its own."""
    torch.manual_seed(0)
    model = DeepseekForCausalLM(tiny_config()).eval()
    randomize_(model, seed=4)
    model.prepack_cpu_weights()
    twin = copy.deepcopy(model)
    assert packed_matmuls(model) and not packed_matmuls(twin)
    ids = torch.randint(0, 300, (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        torch.testing.assert_close(twin(ids), model(ids), rtol=1e-5, atol=1e-5)
    twin.prepack_cpu_weights()
    assert not {pm.handle for pm in packed_matmuls(twin)} & {pm.handle for pm in packed_matmuls(model)}


def packed_matmuls(model: torch.nn.Module) -> list[PackedMatmul]:
    kept: dict[int, PackedMatmul] = {}
    keep_packed_matmuls(model, kept)
    return list(kept.values())


def test_fused_gate_up_matches_and_falls_back_when_a_weight_changes():
    mlp = MLP(64, 96)  # Linear weights start uninitialised (torch.empty): fill them
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    x = torch.randn(5, 64, generator=g)
    with torch.inference_mode():
        plain = mlp(x)
    covered = mlp.prepack()  # down_proj is packed on its own (by the model's loop, or here)
    assert set(map(id, covered)) == {id(mlp.gate_proj), id(mlp.up_proj)}
    assert mlp.down_proj.prepack()
    assert mlp._gate_up is not None and mlp._gate_up.weight.shape == (192, 64)
    with torch.inference_mode():
        torch.testing.assert_close(mlp(x), plain, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        mlp.up_proj.weight.zero_()  # silu(gate) * 0 = 0: a stale fused copy would not give zeros
    with torch.inference_mode():
        assert not mlp._gate_up.usable(x)
        assert torch.equal(mlp(x), torch.zeros(5, 64))


@pytest.mark.slow
def test_a_plain_torch_compile_of_a_packed_model_runs_the_plain_matmuls():
    """Outside the engine's compiled step (which freezes the weights), torch.compile of a prepacked model
    traces the plain matmuls and the MoE's expert loop eagerly: it runs, and equals the eager model."""
    torch.manual_seed(0)
    model = DeepseekForCausalLM(tiny_config(num_hidden_layers=2)).eval()
    randomize_(model, seed=1)
    model.prepack_cpu_weights()
    ids = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        want = model(ids)
        got = torch.compile(model)(ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_recorded_packed_matmuls_replay_to_the_same_outputs():
    from dsv32.model.layers import recording_packed_matmuls

    mlp = MLP(80, 48)
    randomize_(mlp, seed=4)
    x = torch.randn(2, 80, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        assert mlp.prepack(None) and mlp.down_proj.prepack()
        plain = mlp(x)
        with recording_packed_matmuls() as rec:
            assert torch.equal(mlp(x), plain)
        mlp(x)  # outside: not recorded
        assert len(rec) == 2  # gate+up (fused), down
        assert torch.equal(rec[0][1], x) and rec[0][0].weight_bytes == 2 * 48 * 80 * 4
        gate, up = rec[0][0](rec[0][1]).split([48, 48], dim=-1)
        assert torch.equal(rec[1][0](torch.nn.functional.silu(gate) * up), plain)
