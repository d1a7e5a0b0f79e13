"""Rotary position embedding with YaRN, in the two layouts DeepSeek uses.

* MLA (q_pe, k_pe): **interleaved** pairs (x[2i], x[2i+1]) — the layout the checkpoint weights are
  trained for. We keep the interleaved layout in the output (DeepSeek reference); transformers emits the
  same rotation de-interleaved (evens then odds). Dot products are identical, only a cached k_pe differs
  by that fixed permutation.
* DSA indexer: **non-interleaved** (rotate-half) pairs (x[i], x[i + d/2]) — DeepSeek's fix of
  2025-11 ("rope in indexer is not interleaved").

YaRN (factor s, original length L0, beta_fast/slow): frequency i keeps its original value below the
correction range, is divided by s above it, and ramps linearly in between. cos/sin carry YaRN's
attention factor mscale(s, mscale)/mscale(s, mscale_all_dim) (1.0 for the DeepSeek checkpoints); the
softmax m² correction lives in ``ModelConfig.softmax_scale``.
"""

from __future__ import annotations

import math

import torch

from dsv32.config import ModelConfig, yarn_mscale


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [d_r/2] (fp32) and the cos/sin attention factor."""
    dim, base, r = cfg.qk_rope_head_dim, cfg.rope.theta, cfg.rope
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if r.type != "yarn":
        return inv_freq, 1.0

    def correction_dim(rotations: float) -> float:
        return (
            dim
            * math.log(r.original_max_position_embeddings / (rotations * 2 * math.pi))
            / (2 * math.log(base))
        )

    low = max(math.floor(correction_dim(r.beta_fast)), 0)
    high = min(math.ceil(correction_dim(r.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    inv_freq = inv_freq / r.factor * ramp + inv_freq * (1 - ramp)
    if r.mscale and r.mscale_all_dim:
        attention_factor = yarn_mscale(r.factor, r.mscale) / yarn_mscale(r.factor, r.mscale_all_dim)
    else:  # transformers' YaRN default when mscale_all_dim is absent
        attention_factor = yarn_mscale(r.factor)
    return inv_freq, attention_factor


class RotaryEmbedding:
    """Computes cos/sin for absolute positions; no buffers, and the frequencies are made on first use
    (on the CPU, whatever the default device), so the model can be built on 'meta'."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self._inv_freq: dict[torch.device, torch.Tensor] = {}
        self.attention_factor = rope_inv_freq(cfg)[1]

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq:
            with torch.device("cpu"):
                inv_freq, _ = rope_inv_freq(self.cfg)
            self._inv_freq[device] = inv_freq.to(device)
        return self._inv_freq[device]

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [...] (int) -> cos, sin [..., d_r/2] in fp32 (rotations are applied in fp32)."""
        angles = positions.to(torch.float32)[..., None] * self.inv_freq(positions.device)
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor


# Both rotations run in fp32 and cast back, as DeepSeek's reference does (transformers rotates in bf16).


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) by angle i. x [..., T, (heads,) d]; cos/sin broadcastable [..., d/2]."""
    xf = x.float()
    if not torch.compiler.is_compiling():
        # as the reference: each pair a complex number times e^{iθ}. Four kernels where the form below is nine
        # (what bounds a small model's decode step on a GPU); inductor fuses the form below into one instead
        pairs = torch.view_as_complex(xf.unflatten(-1, (-1, 2)).contiguous())
        return torch.view_as_real(pairs * torch.complex(cos, sin)).flatten(-2).to(x.dtype)
    x1, x2 = xf[..., 0::2], xf[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.flatten(-2).to(x.dtype)


def apply_rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + d/2]) by angle i (NeoX / rotate-half layout)."""
    half = x.shape[-1] // 2
    xf = x.float()
    if not torch.compiler.is_compiling():  # as ``apply_rope_interleaved``: five kernels instead of nine
        pairs = torch.view_as_complex(xf.unflatten(-1, (2, half)).transpose(-1, -2).contiguous())
        out = torch.view_as_real(pairs * torch.complex(cos, sin)).transpose(-1, -2)  # [..., 2, d/2]
        return out.to(x.dtype, memory_format=torch.contiguous_format).flatten(-2)
    x1, x2 = xf[..., :half], xf[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
