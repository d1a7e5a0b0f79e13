"""The MoE's routed-expert forms: the eager loop, and the gathered form a compiled one-token step traces."""

from __future__ import annotations

import pytest
import torch

from dsv32.model.moe import MoE, register_for_compile
from dsv32.model.transformer import DeepseekForCausalLM
from tests.model.oracle import randomize_
from tests.model.test_forms import tiny_config


def _model(seed: int = 3) -> DeepseekForCausalLM:
    torch.manual_seed(seed)
    model = DeepseekForCausalLM(tiny_config()).eval()
    randomize_(model, seed=seed)
    return model


def test_gathered_experts_equal_the_loop():
    """``_experts_gathered`` (each pair's x·Wᵀ as a reduction over its expert's gathered rows) gives the
    loop's outputs for the pairs in expert order, to float rounding (it sums in another order)."""
    model = _model()
    moe = next(m for m in model.modules() if isinstance(m, MoE))
    moe.stack_experts(grouped=False)
    x = torch.randn(3, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        idx, _ = moe.gate(x)
        flat = idx.flatten()
        order = flat.argsort()
        xs = x.index_select(0, order // idx.shape[1])
        looped = moe._experts_looped(xs, flat)
        gathered = moe._experts_gathered(xs, flat[order])
    assert len(set(flat.tolist())) > 1  # several experts, so the order of the pairs matters
    torch.testing.assert_close(gathered, looped, rtol=1e-5, atol=1e-6)


def test_registering_the_gathered_form_leaves_eager_forwards_and_packed_weights_as_they_were():
    """Stacking for a compiled step's gathered experts moves the expert weights into stacks (views, no
    second copy) and packs the experts again from them: an eager forward still runs the packed loop and
    gives bit-identical outputs (no grouped matmuls), and no packed copy is left stale."""
    model = _model()
    model.prepack_cpu_weights()
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    ids = torch.randint(2, 300, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids)
    register_for_compile(model, gathered=True)
    for moe in moes:
        assert moe._compiled_experts == "gathered" and not moe._grouped
        assert moe.experts[1].gate_proj.weight.data_ptr() == moe._w13[1].data_ptr()
        for e in moe.experts:
            assert e._gate_up is not None and e._gate_up.fresh()
            assert e.down_proj._packed is not None and e.down_proj._packed.fresh()
    with torch.no_grad():
        assert torch.equal(model(ids), before)


def test_fp8_experts_keep_the_opaque_loop():
    model = _model()
    moe = next(m for m in model.modules() if isinstance(m, MoE))
    lin = moe.experts[0].down_proj
    lin.load_fp8(lin.weight.detach(), torch.ones(-(-lin.out_features // 128), -(-lin.in_features // 128)))
    register_for_compile(model, gathered=True)
    assert moe._compiled_experts == "looped" and moe._w13 is None
    with pytest.raises(ValueError, match="FP8"):
        moe.stack_experts()
