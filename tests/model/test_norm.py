"""RMSNorm: the fused fp32 CPU path gives exactly the explicit definition; in bf16 the reference's order
(fp32 weight times the fp32 normalised value, then cast back)."""

from __future__ import annotations

import pytest
import torch

from dsv32.model.layers import RMSNorm


def _explicit(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm.eps)
    return (norm.weight.float() * x32).to(x.dtype)


@pytest.mark.parametrize("rows", [1, 16, 1024])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_equals_its_definition_bit_for_bit(rows, dtype):
    g = torch.Generator().manual_seed(rows)
    norm = RMSNorm(1024, eps=1e-6)  # fp32 weight, as the loader keeps it in a bf16 model
    with torch.no_grad():
        norm.weight.copy_(torch.randn(1024, generator=g))
    x = (torch.randn(rows, 1024, generator=g) * 3).to(dtype)
    with torch.inference_mode():
        assert torch.equal(norm(x), _explicit(norm, x))
