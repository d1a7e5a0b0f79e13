"""Load a Hugging Face DeepSeek-V3 / V3.2 directory (config.json + safetensors) into DeepseekForCausalLM.

The model is built on the meta device and materialised once, in its final dtypes. Shard headers are
checked with safetensors' ``safe_open``; tensor bytes are then read shard by shard with positioned
reads straight into the parameters (or through small row-chunk buffers when a dtype changes or FP8
blocks are dequantized). Nothing is memory-mapped, so peak memory is the model plus a few chunks, not
the model plus a shard. Every problem with the directory raises ``CheckpointError`` (``ConfigError`` for
config.json) with a one-line message that names the file or tensor.
"""

from __future__ import annotations

import json
import logging
import math
import re
import struct
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm import tqdm

from dsv32.config import ModelConfig, read_config_json
from dsv32.heap import release_freed_heap
from dsv32.model.layers import FP8_DTYPE, Linear, dequantize_fp8_blocks
from dsv32.model.transformer import DeepseekForCausalLM
from dsv32.weights.layout import SCALE_SUFFIX, scale_name

INDEX_FILE = "model.safetensors.index.json"
ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
}
log = logging.getLogger(__name__)
_MAX_NAMED = 3  # names listed in an error message before "(+N more)"
_CHUNK_BYTES = 64 << 20  # conversions and dequantization work in row chunks of about this size


class CheckpointError(ValueError):
    """A model directory whose files do not match its config; the message names the file or tensor."""


@dataclass(frozen=True)
class StoredTensor:
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype string, e.g. "BF16", "F8_E4M3"
    offset: int  # absolute byte offset of the data in ``file``
    nbytes: int


def load_model(
    path: str | Path,
    dtype: torch.dtype | str = torch.bfloat16,
    device: str | torch.device = "cpu",
    keep_fp8: bool = False,
    progress: bool = True,
) -> DeepseekForCausalLM:
    """Read ``path`` (an HF model directory) into a ``DeepseekForCausalLM`` in eval mode without grads.
    ``dtype``: a floating torch dtype or its name, as vLLM takes it ("bfloat16", "auto", ...: ``resolve_dtype``).

    FP8 block-quantized weights are dequantized to ``dtype``, or with ``keep_fp8`` kept as e4m3 + block
    scales (``Linear.load_fp8``). Unquantized tensors are cast to ``dtype``, except those DeepSeek's reference
    keeps fp32 (the modules' ``FP32_PARAMS``: norm weights, the MoE router's weight and correction bias, the
    indexer's ``k_norm`` and ``weights_proj``, lm_head and the MTP head that shares it). The MTP layers'
    embedding and head stay shared with the main ones unless the checkpoint's copies differ from them; MTP
    layers of which the checkpoint holds nothing (transformers' ``save_pretrained`` drops them) are left out
    of the model.
    """
    root = Path(path)
    if not root.exists():
        raise CheckpointError(f"model directory {root} does not exist")
    if not root.is_dir():
        raise CheckpointError(f"{root} is not a directory (expected an HF model directory)")
    cfg = ModelConfig.from_file(root)
    dtype = resolve_dtype(dtype, root)
    if not isinstance(keep_fp8, bool):
        raise CheckpointError(f"keep_fp8 must be True or False, got {keep_fp8!r}")
    stored = read_checkpoint_index(root)
    cfg = _without_absent_mtp_layers(cfg, stored)
    block = cfg.fp8_block_size or (128, 128)

    with torch.device("meta"):
        model = DeepseekForCausalLM(cfg)
    copies = model.mtp_copies()  # {MTP tensor: main tensor it repeats}
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    plan = _validate(root, cfg, expected, stored, block, optional=set(copies))
    quantized_copies = sorted(set(copies) & plan.fp8 & set(plan.load))
    if quantized_copies:  # (compared and copied byte for byte below: an FP8 copy's scale would be lost)
        raise CheckpointError(
            f"{quantized_copies[0]} (the MTP layer's copy of the embedding or head) is stored in FP8; only "
            "unquantized copies are supported (the released checkpoints store them in BF16)"
        )

    if plan.tie_lm_head:
        model.lm_head.weight = model.model.embed_tokens.weight
        model.tie_mtp_copies()
    if keep_fp8:
        for name in plan.fp8:
            module = model.get_submodule(name.rpartition(".")[0])
            if isinstance(module, Linear):
                module.load_fp8(
                    torch.empty(expected[name], dtype=FP8_DTYPE, device="meta"),
                    torch.empty(stored[scale_name(name)].shape, dtype=torch.float32, device="meta"),
                    block,
                )
    _materialize(model, device, dtype)

    params = model.state_dict(keep_vars=True)
    by_file: dict[Path, list[str]] = {}
    for name in plan.load:
        if name not in copies:
            by_file.setdefault(stored[name].file, []).append(name)
    files = sorted(by_file)
    bar = tqdm(files, desc="Loading checkpoint shards", unit="shard", disable=not progress, file=sys.stderr)
    with torch.no_grad():
        for file in bar:
            with _open_data(file) as fh:
                for name in by_file[file]:
                    dst, st = params[name], stored[name]
                    if name not in plan.fp8:
                        _read_into(fh, st, dst)
                        continue
                    scale = read_tensor(stored[scale_name(name)])
                    if not (torch.isfinite(scale).all() and (scale >= 0).all()):
                        raise CheckpointError(
                            f"{scale_name(name)} in {st.file}: block scales must be finite and >= 0"
                        )
                    if dst.dtype == FP8_DTYPE:  # keep_fp8
                        _read_into(fh, st, dst)
                        params[scale_name(name)].copy_(scale)
                        _check_no_fp8_nan(name, st, dst)
                    else:
                        _dequantize_into(name, fh, st, scale, block, dst)
        # MTP copies last, once the main embedding and head are in: share unless the stored copy differs
        for name in plan.load:
            if name in copies:
                with _open_data(stored[name].file) as fh:
                    if not _stored_equals(fh, stored[name], params[copies[name]]):
                        model.untie_mtp_copy(name)
                        _read_into(fh, stored[name], model.get_parameter(name))
    model.eval()
    model.requires_grad_(False)
    release_freed_heap()  # the conversion temporaries of the shards
    return model


_DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}  # fmt: skip


def resolve_dtype(dtype: torch.dtype | str, root: Path) -> torch.dtype:
    """The floating dtype to load into: a torch dtype or its name as vLLM takes it ("bfloat16", "float32",
    "float16", their short forms, "auto": the checkpoint's ``torch_dtype``, bfloat16 when it names none or
    an FP8 one)."""
    if dtype == "auto":
        stored = read_config_json(root / "config.json")
        stored = stored.get("torch_dtype") or stored.get("dtype")
        return _DTYPE_NAMES.get(stored, torch.bfloat16) if isinstance(stored, str) else torch.bfloat16
    if isinstance(dtype, str):
        if dtype not in _DTYPE_NAMES:
            raise CheckpointError(f"dtype {dtype!r}: expected one of {', '.join(_DTYPE_NAMES)} or auto")
        return _DTYPE_NAMES[dtype]
    if not isinstance(dtype, torch.dtype) or dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise CheckpointError(f"dtype {dtype!r}: the model runs in float32, bfloat16 or float16")
    return dtype


def read_checkpoint_index(root: str | Path) -> dict[str, StoredTensor]:
    """Name -> where and how each tensor of the directory's safetensors files is stored (headers only).

    Uses ``model.safetensors.index.json`` when present (every shard it names must exist), else every
    ``*.safetensors`` file in the directory. Each file is checked with ``safe_open`` first, so truncated
    or corrupt files are reported here.
    """
    root = Path(root)
    index = root / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted({root / str(v) for v in weight_map.values()})
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {_one_line(e)}") from None
        for file in files:
            if not file.is_file():
                raise CheckpointError(f"{index.name} names shard {file.name}, which is missing from {root}")
    else:
        files = sorted(root.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"no *.safetensors files in {root}")
    out: dict[str, StoredTensor] = {}
    for file in files:
        for name, st in _read_header(file).items():
            if name in out:
                raise CheckpointError(f"tensor {name} is stored twice: in {out[name].file} and {file}")
            out[name] = st
    return out


def read_tensor(st: StoredTensor) -> torch.Tensor:
    """One stored tensor, read whole into a new CPU tensor of its stored dtype."""
    t = torch.empty(st.shape, dtype=ST_DTYPES[st.dtype])
    with _open_data(st.file) as fh:
        _read_into(fh, st, t)
    return t


# ---- validation -------------------------------------------------------------------------------


@dataclass
class _Plan:
    load: list[str]  # model tensors to read from the checkpoint (all but absent optional ones)
    fp8: set[str]  # of those, the ones stored as float8 + weight_scale_inv
    tie_lm_head: bool  # lm_head.weight absent and tie_word_embeddings: share the embedding


def _validate(
    root: Path,
    cfg: ModelConfig,
    expected: dict[str, tuple[int, ...]],
    stored: dict[str, StoredTensor],
    block: tuple[int, int],
    optional: set[str],
) -> _Plan:
    """Match the checkpoint against the model; raise one CheckpointError describing what is wrong.

    ``optional`` tensors (the MTP copies of the embedding and head) may be absent.
    """
    ignored = _ignored_mtp_tensors(cfg, stored)
    tie = cfg.tie_word_embeddings and "lm_head.weight" not in stored
    if tie:
        optional = optional | {"lm_head.weight"}
    missing = [k for k in expected if k not in stored and k not in optional]
    unexpected, fp8, problems = [], set(), []
    order = {name: i for i, name in enumerate(expected)}  # report problems in model order
    for name in sorted(stored, key=lambda n: (order.get(n, len(order)), n)):
        st = stored[name]
        if name in ignored:
            continue
        if name.endswith(SCALE_SUFFIX):
            weight = name[: -len(SCALE_SUFFIX)] + "weight"
            w = stored.get(weight)
            if weight not in expected or w is None or w.dtype != "F8_E4M3":
                unexpected.append(name)
            continue
        if name not in expected:
            unexpected.append(name)
            continue
        want = expected[name]
        if st.shape != want:
            problems.append(
                f"{name} has shape {list(st.shape)} in the checkpoint, the model expects {list(want)}"
            )
            continue
        if st.dtype not in ST_DTYPES:
            problems.append(f"{name} has unsupported dtype {st.dtype}")
        elif st.dtype == "F8_E4M3":
            sname = scale_name(name)
            want_s = tuple(-(-n // b) for n, b in zip(want, block, strict=False))
            if len(want) != 2:
                problems.append(f"{name} is float8 but not a matrix (shape {list(want)})")
            elif sname not in stored:
                problems.append(f"{name} is float8 but the checkpoint has no {sname}")
            elif stored[sname].shape != want_s:
                problems.append(
                    f"{sname} has shape {list(stored[sname].shape)} in the checkpoint, "
                    f"expected {list(want_s)} for {block[0]}x{block[1]} blocks"
                )
            elif stored[sname].dtype not in ST_DTYPES or stored[sname].dtype == "F8_E4M3":
                problems.append(f"{sname} has unsupported dtype {stored[sname].dtype}")
            else:
                fp8.add(name)
    where = f"checkpoint {root}"
    if missing:
        raise CheckpointError(f"{where} is missing {_count(missing, 'tensor')}: {_names(missing)}")
    if unexpected:
        raise CheckpointError(f"{where} has {_count(unexpected, 'unexpected tensor')}: {_names(unexpected)}")
    if problems:
        more = f" (+{len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise CheckpointError(f"{where}: {problems[0]}{more}")
    return _Plan([k for k in expected if k in stored], fp8, tie)


def _without_absent_mtp_layers(cfg: ModelConfig, stored: dict[str, StoredTensor]) -> ModelConfig:
    """The config minus MTP layers of which the checkpoint holds no tensor at all: transformers'
    ``save_pretrained`` drops the MTP layer while its V3 config keeps ``num_nextn_predict_layers: 1``."""
    for j in range(cfg.num_nextn_predict_layers):
        prefix = f"model.layers.{cfg.num_hidden_layers + j}."
        if not any(name.startswith(prefix) for name in stored):
            log.info("checkpoint has no MTP layer %d: loading without it", cfg.num_hidden_layers + j)
            return replace(cfg, num_nextn_predict_layers=j)
    return cfg


def _ignored_mtp_tensors(cfg: ModelConfig, stored: dict[str, StoredTensor]) -> set[str]:
    """MTP layers a config does not ask for (transformers' V3.2 config has no num_nextn_predict_layers,
    while the release still stores layer 61): ignored, as transformers does."""
    first_extra = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    if f"model.layers.{first_extra}.eh_proj.weight" not in stored:
        return set()
    pat = re.compile(r"model\.layers\.(\d+)\.")
    out = set()
    for name in stored:
        m = pat.match(name)
        if m and int(m.group(1)) >= first_extra:
            out.add(name)
    return out


# ---- reading ----------------------------------------------------------------------------------


def _read_header(file: Path) -> dict[str, StoredTensor]:
    """Tensor locations in one safetensors file. safe_open validates the file (offsets, size) first."""
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            names = set(f.keys())
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {file}: {_one_line(e)}") from None
    with open(file, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    out = {}
    for name in sorted(names, key=lambda k: header[k]["data_offsets"][0]):
        h = header[name]
        begin, end = h["data_offsets"]
        out[name] = StoredTensor(file, tuple(h["shape"]), h["dtype"], 8 + n + begin, end - begin)
    return out


class _open_data:
    """An unbuffered file handle whose OSErrors become CheckpointErrors naming the file."""

    def __init__(self, file: Path):
        self.file = file

    def __enter__(self) -> BinaryIO:
        try:
            self.fh = open(self.file, "rb", buffering=0)
        except OSError as e:
            raise CheckpointError(f"cannot read {self.file}: {_one_line(e)}") from None
        return self.fh

    def __exit__(self, *exc) -> None:
        self.fh.close()


def _read_bytes(fh: BinaryIO, st: StoredTensor, offset: int, out: torch.Tensor) -> None:
    """Fill the contiguous CPU tensor ``out`` with stored bytes starting ``offset`` bytes into ``st``."""
    buf = memoryview(out.view(torch.uint8).numpy()).cast("B")
    fh.seek(st.offset + offset)
    pos = 0
    while pos < len(buf):
        n = fh.readinto(buf[pos:])
        if not n:
            raise CheckpointError(f"cannot read {st.file}: file ends inside the data of a tensor")
        pos += n


def _row_chunks(shape: tuple[int, ...], itemsize: int, multiple: int = 1) -> list[tuple[int, int]]:
    rows = shape[0] if shape else 1
    row_bytes = max(1, math.prod(shape[1:]) * itemsize)
    step = max(multiple, (_CHUNK_BYTES // row_bytes) // multiple * multiple)
    return [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]


def _read_into(fh: BinaryIO, st: StoredTensor, dst: torch.Tensor) -> None:
    """dst <- stored tensor, converting its dtype; bytes go straight into ``dst`` when nothing changes."""
    src_dtype = ST_DTYPES[st.dtype]
    if dst.dtype == src_dtype and dst.device.type == "cpu" and dst.is_contiguous():
        _read_bytes(fh, st, 0, dst.reshape(-1))
        return
    flat = dst.reshape(dst.shape[0], -1) if dst.dim() > 1 else dst.reshape(-1, 1)
    row_bytes = flat.shape[1] * src_dtype.itemsize
    for r0, r1 in _row_chunks(tuple(flat.shape), src_dtype.itemsize):
        tmp = torch.empty(r1 - r0, flat.shape[1], dtype=src_dtype)
        _read_bytes(fh, st, r0 * row_bytes, tmp)
        flat[r0:r1].copy_(tmp)


def _check_no_fp8_nan(name: str, st: StoredTensor, w: torch.Tensor) -> None:
    """CheckpointError if the e4m3fn tensor ``w`` (``name``'s data, or a chunk of it) holds a NaN."""
    if ((w.view(torch.uint8) & 0x7F) == 0x7F).any():  # e4m3fn's only NaN encodings
        raise CheckpointError(f"{name} in {st.file}: NaN among the FP8 weights")


def _dequantize_into(
    name: str,
    fh: BinaryIO,
    st: StoredTensor,
    scale: torch.Tensor,
    block: tuple[int, int],
    dst: torch.Tensor,
) -> None:
    """dst = W_fp8 * scale per (bo x bi) block; row chunks of whole blocks keep temporaries small (each chunk
    checked for NaN while it is at hand)."""
    bo = block[0]
    out_f, in_f = dst.shape
    for r0, r1 in _row_chunks((out_f, in_f), 4, multiple=bo):
        w = torch.empty(r1 - r0, in_f, dtype=FP8_DTYPE)
        _read_bytes(fh, st, r0 * in_f, w)
        _check_no_fp8_nan(name, st, w)
        dst[r0:r1].copy_(dequantize_fp8_blocks(w, scale[r0 // bo : -(-r1 // bo)], dst.dtype, block))


def _stored_equals(fh: BinaryIO, st: StoredTensor, t: torch.Tensor) -> bool:
    """Whether the stored tensor, cast to ``t``'s dtype, equals ``t`` (read in row chunks)."""
    src_dtype = ST_DTYPES[st.dtype]
    if st.shape != tuple(t.shape):
        return False
    row_bytes = math.prod(st.shape[1:]) * src_dtype.itemsize
    for r0, r1 in _row_chunks(st.shape, src_dtype.itemsize):
        tmp = torch.empty((r1 - r0, *st.shape[1:]), dtype=src_dtype)
        _read_bytes(fh, st, r0 * row_bytes, tmp)
        if not torch.equal(tmp.to(device=t.device, dtype=t.dtype), t[r0:r1]):
            return False
    return True


def _materialize(model: nn.Module, device: str | torch.device, dtype: torch.dtype) -> None:
    """Allocate every meta parameter and buffer on ``device`` in its final dtype, keeping shared tensors
    shared (``to_empty`` would untie them)."""
    new: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(meta tensor) -> (meta tensor, new tensor)
    for module in model.modules():
        own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for key, t in own:
            if id(t) not in new:
                if t.dtype == FP8_DTYPE or key == "weight_scale_inv":
                    want = t.dtype
                elif key in getattr(module, "FP32_PARAMS", ()):  # norms, router, heads: fp32 as the reference
                    want = torch.float32
                else:
                    want = dtype
                fresh = torch.empty(t.shape, dtype=want, device=device)
                if isinstance(t, nn.Parameter):
                    fresh = nn.Parameter(fresh, requires_grad=False)
                new[id(t)] = (t, fresh)
            setattr(module, key, new[id(t)][1])


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_NAMED])
    return shown + (f" (+{len(names) - _MAX_NAMED} more)" if len(names) > _MAX_NAMED else "")


def _count(items: list[str], what: str) -> str:
    return f"{len(items)} {what}{'s' if len(items) != 1 else ''}"


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
