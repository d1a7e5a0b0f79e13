"""RMSNorm (torch's fused kernel on the fp32 values) gives exactly the explicit definition on the CPU, in fp32
and in bf16 (the reference's order: fp32 weight times the fp32 normalised value, then cast back); the fused
residual add and SwiGLU are exact too."""

from __future__ import annotations

import pytest
import torch

from dsv32.model.layers import RMSNorm


def _explicit(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm.eps)
    return (norm.weight.float() * x32).to(x.dtype)


def _random_norm(g: torch.Generator) -> RMSNorm:
    norm = RMSNorm(1024, eps=1e-6)  # fp32 weight, as the loader keeps it in a bf16 model
    with torch.no_grad():
        norm.weight.copy_(torch.randn(1024, generator=g))
    return norm


@pytest.mark.parametrize("rows", [1, 16, 1024])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_equals_its_definition_bit_for_bit(rows, dtype):
    g = torch.Generator().manual_seed(rows)
    norm = _random_norm(g)
    x = (torch.randn(rows, 1024, generator=g) * 3).to(dtype)
    with torch.inference_mode():
        assert torch.equal(norm(x), _explicit(norm, x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_and_norm_is_the_norm_of_the_fp32_sum(dtype):
    g = torch.Generator().manual_seed(7)
    norm = _random_norm(g)
    x, residual = ((torch.randn(5, 1024, generator=g) * 3).to(dtype) for _ in range(2))
    with torch.inference_mode():
        out, new_residual = norm.add_and_norm(x, residual)
        s = residual.float() + x.float()
        assert torch.equal(out, _explicit(norm, s).to(dtype))
        assert torch.equal(new_residual, s.to(dtype))


def test_swiglu_is_computed_in_fp32():
    from dsv32.model.layers import swiglu

    g = torch.Generator().manual_seed(3)
    gate, up = (torch.randn(4, 256, generator=g).bfloat16() for _ in range(2))
    want = (torch.nn.functional.silu(gate.float()) * up.float()).bfloat16()
    assert torch.equal(swiglu(gate, up), want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_on_cuda_matches_its_definition(dtype):
    g = torch.Generator().manual_seed(1)
    norm = _random_norm(g)
    norm = norm.cuda()
    x = (torch.randn(16, 1024, generator=g) * 3).to(dtype).cuda()
    with torch.inference_mode():
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(norm(x).float(), _explicit(norm, x).float(), **tol)
