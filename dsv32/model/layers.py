"""Basic layers: RMSNorm, a bias-free Linear that can hold FP8 block-quantized weights, SwiGLU MLP.

On CPU a Linear can ``prepack`` its weight into oneDNN's blocked layout: PyTorch's default fp32 matmul
(MKL) reaches ~20 GB/s on a batch-1 matrix-vector product and far less at 4-64 rows on the AMD machines
we measure on, while oneDNN's prepacked kernel streams the weight at memory speed (2-4x faster; see
``dsv32 bench engine``). The plain weight stays in place for the loader, ``dense_weight`` and state_dict.
"""

from __future__ import annotations

import contextlib
import itertools
import weakref
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPE = torch.float8_e4m3fn
_PACKABLE = (torch.float32, torch.bfloat16)


def onednn_linear_available() -> bool:
    """Whether this PyTorch build has oneDNN's prepacked linear (CPU builds with MKLDNN do)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedMatmul:
    """y = x [W_1; W_2; ...]ᵀ with the row-stacked weights of one or more Linears in oneDNN's layout.

    Valid while every source Linear still holds the weight it was packed from (same storage, no in-place
    change since): ``usable`` checks that, so a stale copy is never used. ``cache`` (keyed by the weights'
    data_ptrs) lets Linears that share a weight (the MTP head and lm_head) share one copy.

    A ``torch.compile``d forward calls it as the opaque op ``dsv32::packed_linear`` by its ``handle`` (a
    traced graph cannot take a oneDNN-layout tensor as an input); the op checks freshness when it runs.
    Handles are numbered in creation order, so a process that builds the same model gets the same graph,
    and inductor's on-disk cache serves the compiled step again (``compiled_decode``).
    """

    def __init__(self, linears: list[Linear], cache: dict[tuple[int, ...], torch.Tensor] | None = None):
        self.handle = next(_HANDLES)
        _BY_HANDLE[self.handle] = self
        self.sources = [(lin, lin.weight.data_ptr(), lin.weight._version) for lin in linears]
        self.dtype = linears[0].weight.dtype
        key = tuple(p for _, p, _ in self.sources)
        packed = cache.get(key) if cache is not None else None
        if packed is None:
            w = torch.cat([lin.weight.detach() for lin in linears]) if len(linears) > 1 else linears[0].weight
            packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), None)
            if cache is not None:
                cache[key] = packed
        self.weight = packed
        self.splits = [lin.out_features for lin in linears]

    @staticmethod
    def supports(linears: list[Linear]) -> bool:
        ws = [lin.weight for lin in linears]
        return (
            onednn_linear_available()
            and all(w.device.type == "cpu" and w.dtype in _PACKABLE for w in ws)
            and len({w.dtype for w in ws}) == 1
            and len({lin.in_features for lin in linears}) == 1
        )

    def fresh(self) -> bool:
        for lin, ptr, version in self.sources:  # a plain loop: this runs before every packed matmul
            w = lin.weight
            if w._version != version or w.data_ptr() != ptr:
                return False
        return True

    def usable(self, x: torch.Tensor) -> bool:
        if x.dtype != self.dtype or x.device.type != "cpu":
            return False
        if torch.is_grad_enabled() and any(lin.weight.requires_grad for lin, _, _ in self.sources):
            return False  # autograd needs the plain matmul
        # (the freshness check cannot be traced: a compiled forward's ``packed_linear`` makes it at run time)
        return torch.compiler.is_compiling() or self.fresh()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return torch.ops.dsv32.packed_linear(x, self.handle, sum(self.splits))
        if _RECORDED is not None:
            _RECORDED.append((self, x.detach().clone()))
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, None, "none", [], "")

    def __deepcopy__(self, memo: dict) -> None:
        """A copied model gets no packed copies (a oneDNN-layout tensor cannot be copied, and sharing this one
        would let a compiled forward of the copy reach the original's weights by this handle): its Linears run
        plain matmuls until it is packed again (``prepack_cpu_weights``)."""
        return None

    def plain(self, x: torch.Tensor) -> torch.Tensor:
        """The same product through the sources' current weights (what a stale packed copy falls back to)."""
        return F.linear(x, torch.cat([lin.dense_weight(x.dtype) for lin, _, _ in self.sources]))

    @property
    def weight_bytes(self) -> int:
        return sum(lin.weight.numel() * lin.weight.element_size() for lin, _, _ in self.sources)


_HANDLES = itertools.count()
_BY_HANDLE: weakref.WeakValueDictionary[int, PackedMatmul] = weakref.WeakValueDictionary()


@torch.library.custom_op("dsv32::packed_linear", mutates_args=())
def _packed_linear(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    """``PackedMatmul`` number ``handle`` applied to x (in a compiled graph), or its plain product where its
    sources' weights changed since packing."""
    pm = _BY_HANDLE.get(handle)
    if pm is None:
        raise RuntimeError(f"dsv32::packed_linear: no packed matmul {handle} in this process")
    if not pm.fresh():
        return pm.plain(x)
    return torch.ops.mkldnn._linear_pointwise(x, pm.weight, None, "none", [], "")


@_packed_linear.register_fake
def _(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


_RECORDED: list[tuple[PackedMatmul, torch.Tensor]] | None = None


@contextlib.contextmanager
def recording_packed_matmuls() -> Iterator[list[tuple[PackedMatmul, torch.Tensor]]]:
    """Inside: each packed matmul that runs appends (itself, a copy of its input) to the yielded list, so a
    benchmark can replay a step's matmuls alone (``pm(x)`` for each) and tell them from the rest of the step."""
    global _RECORDED
    before, _RECORDED = _RECORDED, []
    try:
        yield _RECORDED
    finally:
        _RECORDED = before


def keep_packed_matmuls(model: nn.Module, kept: dict[int, PackedMatmul]) -> None:
    """Add to ``kept`` (by handle) every ``PackedMatmul`` the modules of ``model`` hold now. A compiled forward
    calls them by handle, so whoever holds it keeps them alive while it may run: a Linear drops its packed
    copy once its weight changes (the compiled call then takes the plain product, but its handle must
    still resolve)."""
    for m in model.modules():
        for pm in vars(m).values():  # (Linear._packed, MLP._gate_up, MLA._in_proj: any module's)
            if isinstance(pm, PackedMatmul):
                kept[pm.handle] = pm


def packed(linears: list[Linear], cache: dict | None = None) -> PackedMatmul | None:
    """A ``PackedMatmul`` over ``linears`` when this build and their weights allow one, else None."""
    return PackedMatmul(linears, cache) if PackedMatmul.supports(linears) else None


def matmul_split(fused: PackedMatmul | None, linears: list[Linear], x: torch.Tensor) -> list[torch.Tensor]:
    """[lin(x) for lin in linears], in one packed matmul when ``fused`` (over exactly these) is usable."""
    if fused is not None and fused.usable(x):
        return list(fused(x).split(fused.splits, dim=-1))
    return [lin(x) for lin in linears]


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
    """y = w ⊙ x / sqrt(mean(x²) + eps), computed in fp32 with an fp32 weight, then cast to x's dtype.

    As DeepSeek's reference: the loader keeps the weight fp32 in a bf16 model (``FP32_PARAMS``), and the
    weight multiplies the fp32 normalised value (transformers rounds that to bf16 first; the same in fp32).
    """

    FP32_PARAMS = ("weight",)  # kept fp32 by the loader whatever the model dtype

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch's fused kernel on the fp32 values: on the CPU bit-identical to
        # ``w * (x * rsqrt(mean(x²) + eps))`` in fp32 (tested), 3x faster on a 1024-row prefill chunk; on a
        # GPU one kernel where the explicit form is five. (Given bf16 input it would round in another order:
        # hence the cast first.)
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual), the sum taken in fp32: the norm reads the unrounded sum and
        the residual returned is rounded to x's dtype, as DeepSeek's reference fuses the residual add into
        its norm (transformers normalises the rounded sum). In fp32 exactly ``s = x + residual; norm(s)``."""
        # residual first: with x first, inductor's linear+bias fusion pass (freezing) asserts on a matmul
        # weight packed before compiling (torch 2.13); the sum is the same
        s = residual.float() + x  # (x is promoted to fp32 exactly: one kernel fewer than casting it first)
        return self(s).to(x.dtype), s.to(x.dtype)


class Linear(nn.Module):
    """y = x Wᵀ, no bias. Holds either a plain weight or an FP8 e4m3 weight with block scales.

    An FP8 weight (``load_fp8``) is dequantised on the fly for each call: memory stays at one byte
    per weight, at the cost of a dequantisation per forward (an option for memory, not for speed on CPU).
    """

    def __init__(self, in_features: int, out_features: int, fp32: bool = False):
        """``fp32``: the loader keeps the weight fp32 whatever the model dtype (the reference's fp32 lm_head
        and indexer head weights)."""
        super().__init__()
        self.FP32_PARAMS = ("weight",) if fp32 else ()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.register_buffer("weight_scale_inv", None)  # set by load_fp8
        self.fp8_block: tuple[int, int] = (128, 128)
        self._packed: PackedMatmul | None = None  # see ``prepack``

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

    def prepack(self, cache: dict | None = None) -> bool:
        """Keep a oneDNN-layout copy of the weight for CPU matmuls (fp32 / bf16 weights only; FP8 weights
        stay dequantised per call); see ``PackedMatmul``. Returns whether the weight was packed."""
        self._packed = packed([self], cache)
        return self._packed is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is not None:
            if self._packed.usable(x):
                return self._packed(x)
            if not torch.compiler.is_compiling() and not self._packed.fresh():
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
        self._gate_up: PackedMatmul | None = None  # gate_proj and up_proj in one matmul; see ``prepack``

    def prepack(self, cache: dict | None = None) -> list[Linear]:
        """Pack gate_proj and up_proj as one matmul; returns the Linears covered (see ``PackedMatmul``)."""
        self._gate_up = packed([self.gate_proj, self.up_proj], cache)
        return [self.gate_proj, self.up_proj] if self._gate_up is not None else []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = matmul_split(self._gate_up, [self.gate_proj, self.up_proj], x)
        return self.down_proj(swiglu(gate, up))


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) ⊙ up in fp32, cast back (DeepSeek's reference; transformers stays in bf16)."""
    return (F.silu(gate.float()) * up).to(gate.dtype)  # up is promoted to fp32 (exactly) by the product


class LayerNorm(nn.LayerNorm):
    """LayerNorm in fp32 with fp32 weight and bias, cast back (the reference's indexer ``k_norm``)."""

    FP32_PARAMS = ("weight", "bias")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(
            x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps
        ).to(x.dtype)
