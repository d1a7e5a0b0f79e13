"""Synthetic checkpoints: random weights in the exact HF layout, written as (sharded) safetensors.

The weights mean nothing; they exist so that loaders, the network and benchmarks can run without the
642 GB release. Values are a deterministic function of ``(seed, tensor name)`` — independent of the
sharding — and are generated and written in bounded row chunks, so writing a checkpoint with the
671B model's tensor shapes needs memory for a few chunks, not for a tensor or a shard.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch

from dsv32.config import ModelConfig
from dsv32.weights.layout import SCALE_SUFFIX, TensorSpec, checkpoint_layout

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
DEFAULT_FP8_BLOCK = (128, 128)
DEFAULT_MAX_SHARD_BYTES = 4 << 30

# elements generated per chunk; fixed so the random stream (and thus every value) never depends on
# anything but the seed, the tensor name and the shape
_CHUNK_ELEMENTS = 1 << 20

_ST_DTYPES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    FP8_DTYPE: "F8_E4M3",
}

# tensors that the released checkpoints store as copies of another tensor (MTP embedding and head)
_COPY_OF = {"embed_tokens.weight": "model.embed_tokens.weight", "shared_head.head.weight": "lm_head.weight"}


def quantize_fp8_blocks(
    w: torch.Tensor, block: tuple[int, int] = DEFAULT_FP8_BLOCK, pow2_scales: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-quantize a 2-D weight to e4m3fn: returns ``(w_fp8, scale_inv)``, ``w ≈ w_fp8 * scale_inv``.

    One fp32 scale per ``block`` (edge blocks are partial); with ``pow2_scales`` (UE8M0, V3.1 onwards)
    the scale is the power of two at or above ``amax / 448``, so every block fits e4m3's range.
    """
    if w.dim() != 2:
        raise ValueError(f"quantize_fp8_blocks needs a 2-D tensor, got shape {tuple(w.shape)}")
    bo, bi = block
    out_f, in_f = w.shape
    so, si = -(-out_f // bo), -(-in_f // bi)
    w32 = w.to(torch.float32)
    if (so * bo, si * bi) != (out_f, in_f):  # zero-pad partial edge blocks for the block maxima
        w32 = torch.nn.functional.pad(w32, (0, si * bi - in_f, 0, so * bo - out_f))
    amax = w32.view(so, bo, si, bi).abs().amax(dim=3).amax(dim=1)  # [so, si]; inner dim first is faster
    scale = (amax / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    if pow2_scales:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    scale = torch.where(amax > 0, scale, torch.ones_like(scale))
    blocks = w32.view(so, bo, si, bi) / scale[:, None, :, None]  # one temporary of the chunk's size
    q = blocks.view(so * bo, si * bi)[:out_f, :in_f].clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def write_synthetic_checkpoint(
    cfg: ModelConfig,
    out_dir: str | Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    fp8: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    std: float = 0.02,
) -> Path:
    """Write ``config.json`` and random weights for ``cfg`` into ``out_dir`` (created if needed).

    ``dtype`` is the storage dtype of the unquantized matrices (BF16 in the releases); norms, biases and
    scales are fp32 as in the V3.2 checkpoint (norms follow ``dtype`` for deepseek_v3). With ``fp8``
    the block projections are stored as e4m3fn + ``weight_scale_inv`` (power-of-two scales) and the
    config gets a ``quantization_config``. Shards hold at most ``max_shard_bytes`` (a larger single
    tensor gets a shard of its own); a checkpoint that fits one shard is a single ``model.safetensors``.
    """
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be > 0, got {max_shard_bytes}")
    block = (cfg.fp8_block_size or DEFAULT_FP8_BLOCK) if fp8 else None
    cfg = replace(
        cfg,
        torch_dtype=str(dtype).removeprefix("torch."),
        fp8_block_size=block,
        fp8_scale_fmt="ue8m0" if fp8 else None,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    layout = checkpoint_layout(cfg)
    stored = {name: _storage_dtype(spec, dtype) for name, spec in layout.items()}
    nbytes = {name: spec.numel * stored[name].itemsize for name, spec in layout.items()}
    # Scales are produced together with their weight, so a weight and its scale share a shard.
    units: list[list[str]] = []
    for name in layout:
        if name.endswith(SCALE_SUFFIX):
            units[-1].append(name)
        else:
            units.append([name])
    shards: list[list[str]] = [[]]
    size = 0
    for unit in units:
        unit_bytes = sum(nbytes[n] for n in unit)
        if shards[-1] and size + unit_bytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].extend(unit)
        size += unit_bytes

    if len(shards) == 1:
        files = ["model.safetensors"]
    else:
        files = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    # remove leftovers of an earlier write so the directory holds exactly one checkpoint
    for old in list(out.glob("*.safetensors")) + [out / "model.safetensors.index.json"]:
        if old.name not in files:
            old.unlink(missing_ok=True)

    for fname, names in zip(files, shards, strict=True):
        _write_shard(out / fname, names, layout, stored, seed=seed, std=std, block=block)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(nbytes.values())},
            "weight_map": {n: f for f, names in zip(files, shards, strict=True) for n in names},
        }
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2) + "\n")
    return out


def _storage_dtype(spec: TensorSpec, dtype: torch.dtype) -> torch.dtype:
    if spec.dtype_kind == "fp8":
        return FP8_DTYPE
    if spec.dtype_kind == "fp32":
        return torch.float32
    return dtype


def _write_shard(
    path: Path,
    names: list[str],
    layout: dict[str, TensorSpec],
    stored: dict[str, torch.dtype],
    *,
    seed: int,
    std: float,
    block: tuple[int, int] | None,
) -> None:
    """Stream one safetensors file: header first (sizes are known), then each tensor chunk by chunk."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        n = layout[name].numel * stored[name].itemsize
        header[name] = {
            "dtype": _ST_DTYPES[stored[name]],
            "shape": list(layout[name].shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # data starts 8-byte aligned
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        pending_scale: torch.Tensor | None = None
        for name in names:
            spec = layout[name]
            if name.endswith(SCALE_SUFFIX):
                assert pending_scale is not None and tuple(pending_scale.shape) == spec.shape
                _write_bytes(f, pending_scale)
                pending_scale = None
                continue
            if spec.dtype_kind == "fp8":
                assert block is not None
                scales = []
                for chunk in _random_chunks(name, spec, seed=seed, std=std, row_multiple=block[0]):
                    q, s = quantize_fp8_blocks(chunk, block)
                    _write_bytes(f, q)
                    scales.append(s)
                pending_scale = torch.cat(scales)
            else:
                for chunk in _random_chunks(name, spec, seed=seed, std=std):
                    _write_bytes(f, chunk.to(stored[name]))
        assert pending_scale is None
    tmp.replace(path)


def _write_bytes(f, t: torch.Tensor) -> None:
    f.write(t.contiguous().view(torch.uint8).numpy().data)


def _tensor_seed(seed: int, key: str) -> int:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _random_chunks(
    name: str, spec: TensorSpec, *, seed: int, std: float, row_multiple: int = 1
) -> Iterator[torch.Tensor]:
    """The fp32 values of one tensor, in row chunks of bounded size (a multiple of ``row_multiple``)."""
    suffix = name.split(".", 3)[-1] if name.startswith("model.layers.") else name
    key = _COPY_OF.get(suffix, name)  # MTP embed/head repeat the main ones, as in the releases
    gen = torch.Generator().manual_seed(_tensor_seed(seed, key))
    shape = spec.shape
    if name.endswith("norm.weight"):  # RMSNorm / LayerNorm gains: around 1, not exactly 1
        yield 1.0 + 0.1 * torch.randn(shape, generator=gen)
        return
    if name.endswith(("k_norm.bias", "e_score_correction_bias")):
        yield 0.1 * torch.randn(shape, generator=gen)
        return
    rows, cols = shape
    step = max(1, _CHUNK_ELEMENTS // cols)
    step = max(row_multiple, step - step % row_multiple)
    for r0 in range(0, rows, step):
        yield torch.randn(min(step, rows - r0), cols, generator=gen) * std
