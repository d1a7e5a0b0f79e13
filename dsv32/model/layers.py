"""Basic layers: RMSNorm, a bias-free Linear that can hold FP8 block-quantized weights, SwiGLU MLP.

On CPU a Linear can ``prepack`` its weight into oneDNN's blocked layout: PyTorch's default fp32 matmul
(MKL) reaches ~20 GB/s on a batch-1 matrix-vector product and far less at 4-64 rows on the AMD machines
we measure on, while oneDNN's prepacked kernel streams the weight at memory speed (2-4x faster; see
``dsv32 bench engine``). The plain weight stays in place for the loader, ``dense_weight`` and state_dict.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPE = torch.float8_e4m3fn
_PACKABLE = (torch.float32, torch.bfloat16)


def onednn_linear_available() -> bool:
    """Whether this PyTorch build has oneDNN's prepacked linear (CPU builds with MKLDNN do)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def dequantize_fp8_blocks(
    weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype, block: tuple[int, int] = (128, 128)
) -> torch.Tensor:
    """W[i, j] = float(Wq[i, j]) * S[i // bo, j // bi] with S of shape [ceil(out/bo), ceil(in/bi)].

    ``weight_scale_inv`` is the multiplier despite its name (DeepSeek's convention). The block size must
    be given: it cannot be derived from the shapes when the last block is partial (576 rows / 5 scales).
    Works in row chunks, so the only large allocation is the result.
    """
    out_f, in_f = weight.shape
    bo, bi = block
    out = torch.empty(out_f, in_f, dtype=dtype, device=weight.device)
    rows = max(1, (1 << 22) // max(in_f, 1) // bo) * bo  # ~4M elements per chunk, whole row blocks
    for r0 in range(0, out_f, rows):
        r1 = min(out_f, r0 + rows)
        s = scale_inv[r0 // bo : -(-r1 // bo)].to(torch.float32)
        s = s.repeat_interleave(bo, dim=0)[: r1 - r0].repeat_interleave(bi, dim=1)[:, :in_f]
        out[r0:r1] = weight[r0:r1].to(torch.float32) * s
    return out


class RMSNorm(nn.Module):
    """y = w ⊙ x / sqrt(mean(x²) + eps), normalised in fp32.

    Like transformers (the oracle), the normalised value is cast back to the input dtype before the
    weight multiply; DeepSeek's reference multiplies in fp32 — identical in fp32, a rounding apart in bf16.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Linear(nn.Module):
    """y = x Wᵀ, no bias. Holds either a plain weight or an FP8 e4m3 weight with block scales.

    An FP8 weight (``load_fp8``) is dequantised on the fly for each call: memory stays at one byte
    per weight, at the cost of a dequantisation per forward (an option for memory, not for speed on CPU).
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.register_buffer("weight_scale_inv", None)  # set by load_fp8
        self.fp8_block: tuple[int, int] = (128, 128)
        # (oneDNN-layout weight, data_ptr and version of the weight it was packed from); see ``prepack``
        self._packed: tuple[torch.Tensor, int, int] | None = None

    @property
    def is_fp8(self) -> bool:
        return self.weight.dtype == FP8_DTYPE

    def load_fp8(
        self, weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128)
    ) -> None:
        """Keep an FP8 block-quantized weight as is (``weight`` e4m3 + ``weight_scale_inv`` per block)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"fp8 weight shape {tuple(weight.shape)} != expected {(self.out_features, self.in_features)}"
            )
        want = (-(-self.out_features // block[0]), -(-self.in_features // block[1]))
        if tuple(scale_inv.shape) != want:
            raise ValueError(
                f"fp8 scale shape {tuple(scale_inv.shape)} != expected {want} for {block} blocks"
            )
        self.weight = nn.Parameter(weight.to(FP8_DTYPE), requires_grad=False)
        self.weight_scale_inv = scale_inv.to(torch.float32)
        self.fp8_block = block

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        if self.is_fp8:
            return dequantize_fp8_blocks(self.weight, self.weight_scale_inv, dtype, self.fp8_block)
        return self.weight if self.weight.dtype == dtype else self.weight.to(dtype)

    def prepack(self, cache: dict[int, torch.Tensor] | None = None) -> bool:
        """Keep a oneDNN-layout copy of the weight for CPU matmuls (fp32 / bf16 weights only; FP8 weights
        stay dequantised per call). Linears sharing one weight (the MTP head) share the copy via
        ``cache`` (keyed by data_ptr). The copy is dropped if the weight changes in place afterwards.
        Returns whether the weight was packed."""
        w = self.weight
        if w.device.type != "cpu" or w.dtype not in _PACKABLE or not onednn_linear_available():
            return False
        key = w.data_ptr()
        packed = cache.get(key) if cache is not None else None
        if packed is None:
            packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), None)
            if cache is not None:
                cache[key] = packed
        self._packed = (packed, key, w._version)
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self._packed
        if p is not None and x.dtype == self.weight.dtype and x.device.type == "cpu":
            if (
                p[1] == self.weight.data_ptr()
                and p[2] == self.weight._version
                and not (torch.is_grad_enabled() and self.weight.requires_grad)
            ):
                return torch.ops.mkldnn._linear_pointwise(x, p[0], None, "none", [], "")
            if p[1] != self.weight.data_ptr() or p[2] != self.weight._version:
                self._packed = None  # the weight changed since packing: back to the plain matmul
        return F.linear(x, self.dense_weight(x.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, fp8={self.is_fp8}"


class MLP(nn.Module):
    """SwiGLU feed-forward: down( silu(gate x) ⊙ up x ). Dense layers, routed and shared experts."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.gate_proj = Linear(dim, inter_dim)
        self.up_proj = Linear(dim, inter_dim)
        self.down_proj = Linear(inter_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
