"""The embedded default model: a valid V3.2 config, built once, atomically, loadable."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dsv32.config import ModelConfig
from dsv32.weights.default_model import (
    DEFAULT_CONFIG,
    cache_root,
    default_model_id,
    ensure_default_model,
    preset_config,
)
from dsv32.weights.loader import load_model


def test_default_config_is_valid_v32() -> None:
    cfg = ModelConfig.from_dict(DEFAULT_CONFIG.to_hf_dict())  # runs the config validation
    assert cfg == DEFAULT_CONFIG
    assert cfg.model_type == "deepseek_v32" and cfg.vocab_size == 129280
    assert cfg.num_nextn_predict_layers == 1 and cfg.fp8_block_size == (128, 128)
    assert cfg.fp8_scale_fmt == "ue8m0" and cfg.rope.type == "yarn"
    assert cfg.index_head_dim > cfg.qk_rope_head_dim
    assert cfg.max_position_embeddings == cfg.rope.factor * cfg.rope.original_max_position_embeddings


def test_presets() -> None:
    assert preset_config("default") is DEFAULT_CONFIG
    bench = preset_config("bench-small")
    assert (bench.hidden_size, bench.num_hidden_layers, bench.vocab_size) == (1024, 8, 129280)
    assert preset_config("tiny").model_type == "deepseek_v32"
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config("huge")


def test_default_model_directory(default_model_dir: Path, default_cache: Path) -> None:
    assert default_model_dir == default_cache / default_model_id()
    assert default_model_id().startswith("default-")
    names = sorted(p.name for p in default_model_dir.iterdir())
    assert names == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert (
        json.loads((default_model_dir / "config.json").read_text())["quantization_config"]["scale_fmt"]
        == "ue8m0"
    )
    with safe_open(default_model_dir / "model.safetensors", framework="pt") as h:
        assert h.get_slice("model.layers.0.self_attn.q_b_proj.weight").get_dtype() == "F8_E4M3"
    assert not [p for p in default_cache.iterdir() if p.name.startswith(".")], "no temporary leftovers"


def test_default_model_is_built_once(default_model_dir: Path, default_cache: Path) -> None:
    stamp = (default_model_dir / "model.safetensors").stat().st_mtime_ns
    assert ensure_default_model(default_cache) == default_model_dir
    assert (default_model_dir / "model.safetensors").stat().st_mtime_ns == stamp


def test_interrupted_build_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A half-written temporary directory is neither picked up nor in the way; $DSV32_CACHE is the root."""
    monkeypatch.setenv("DSV32_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    stale = tmp_path / f".{default_model_id()}.tmp-{os.getpid()}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    d = ensure_default_model()
    assert d == tmp_path / default_model_id() and (d / "config.json").is_file()
    assert not stale.exists()


def test_default_model_is_deterministic(default_model_dir: Path, tmp_path: Path) -> None:
    again = ensure_default_model(tmp_path)
    assert (again / "model.safetensors").read_bytes() == (
        default_model_dir / "model.safetensors"
    ).read_bytes()


def test_default_model_loads_and_runs(default_model_dir: Path) -> None:
    model = load_model(default_model_dir, dtype=torch.float32, progress=False)
    assert model.config == DEFAULT_CONFIG.__class__.from_file(default_model_dir)
    assert model.config.vocab_size == 129280 and len(model.mtp_layers) == 1
    logits = model(torch.tensor([[0, 100, 20000, 129279]]))
    assert logits.shape == (1, 4, 129280) and logits.isfinite().all()
