"""RoPE: the eager complex-multiply forms give exactly the definitions (pairs rotated in fp32, cast back), on
views with gaps as the model passes them, and a compiled caller (which traces the explicit form) agrees."""

from __future__ import annotations

import pytest
import torch

from dsv32.model.rope import apply_rope_half, apply_rope_interleaved


def _interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    x1, x2 = xf[..., 0::2], xf[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2).to(x.dtype)


def _half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :h], xf[..., h:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def _cases(dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    ang = torch.randn(7, 16, generator=g) * 30  # positions up to ~100 radians: every quadrant
    cos, sin = ang.cos(), ang.sin()
    # a per-head rope slice of a projection (the MLA query: nope|rope per head), a shared key [B, T, d_r]
    q = torch.randn(2, 7, 4, 96, generator=g).to(dtype)[..., 64:]
    k = torch.randn(2, 7, 288, generator=g).to(dtype)[..., 256:]
    return [(q, cos[:, None], sin[:, None]), (k, cos, sin)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("form", ["interleaved", "half"])
def test_rope_equals_its_definition_bit_for_bit(dtype, form):
    fn, ref = (apply_rope_interleaved, _interleaved) if form == "interleaved" else (apply_rope_half, _half)
    for x, cos, sin in _cases(dtype):
        out = fn(x, cos, sin)
        assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
        assert torch.equal(out, ref(x, cos, sin))


@pytest.mark.parametrize("form", ["interleaved", "half"])
def test_compiled_rope_agrees_with_eager(form):
    fn = apply_rope_interleaved if form == "interleaved" else apply_rope_half
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")  # traces the explicit form
    for x, cos, sin in _cases(torch.float32):
        torch.testing.assert_close(compiled(x, cos, sin), fn(x, cos, sin), rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("form", ["interleaved", "half"])
def test_rope_on_cuda_matches_its_definition(form):
    fn, ref = (apply_rope_interleaved, _interleaved) if form == "interleaved" else (apply_rope_half, _half)
    for dtype in (torch.float32, torch.bfloat16):
        for x, cos, sin in _cases(dtype):
            x, cos, sin = x.cuda(), cos.cuda(), sin.cuda()
            # (a fused multiply-add may round the last fp32 bit differently; bf16 then agrees but for rare ties)
            torch.testing.assert_close(
                fn(x, cos, sin).float(), ref(x, cos, sin).float(), rtol=1e-2, atol=1e-5
            )
