"""Bad model directories: each gives a one-line CheckpointError / ConfigError naming the file or tensor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsv32.config import ConfigError
from dsv32.weights.loader import CheckpointError, load_model
from dsv32.weights.synthetic import write_synthetic_checkpoint
from tests.weights.configs import small_config


def load_error(path: Path, kind: type[Exception] = CheckpointError) -> str:
    with pytest.raises(kind) as exc:
        load_model(path, dtype=torch.float32, progress=False)
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return write_synthetic_checkpoint(small_config(), tmp_path / "ckpt", dtype=torch.float32)


@pytest.fixture
def sharded(tmp_path: Path) -> Path:
    return write_synthetic_checkpoint(
        small_config(), tmp_path / "sharded", dtype=torch.float32, max_shard_bytes=500_000
    )


def edit(d: Path, fn) -> dict[str, torch.Tensor]:
    tensors = load_file(d / "model.safetensors")
    fn(tensors)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    return tensors


def test_dtype_names_as_vllm_takes_them(ckpt: Path) -> None:
    """A dtype may be named as vLLM names it ("bfloat16", "float32", "auto": the config's ``torch_dtype``); a
    dtype the model cannot run in, or a keep_fp8 that is not a bool, is an error before anything loads (they
    loaded and failed at the first forward)."""
    assert load_model(ckpt, dtype="float32", progress=False).model.embed_tokens.weight.dtype == torch.float32
    assert load_model(ckpt, dtype="bf16", progress=False).model.embed_tokens.weight.dtype == torch.bfloat16
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "torch_dtype": "float32"}))
    assert load_model(ckpt, dtype="auto", progress=False).model.embed_tokens.weight.dtype == torch.float32
    for bad, words in (
        (torch.int8, "float32, bfloat16 or float16"),
        ("int8", "expected one of"),
        ("fp8", "auto"),
    ):
        with pytest.raises(CheckpointError, match=words):
            load_model(ckpt, dtype=bad, progress=False)
    with pytest.raises(CheckpointError, match="keep_fp8 must be True or False"):
        load_model(ckpt, dtype=torch.float32, keep_fp8="yes", progress=False)


def test_generate_checks_its_arguments(ckpt: Path) -> None:
    """``dsv32.generate.generate``: ids as any integer sequence; a bad max_new_tokens or id is a ValueError
    naming it (they failed inside torch)."""
    import numpy as np

    from dsv32.generate import generate

    model = load_model(ckpt, dtype=torch.float32, progress=False)
    want = list(generate(model, [0, 5, 6], 3))
    assert (
        list(generate(model, np.array([0, 5, 6]), 3))
        == list(generate(model, torch.tensor([0, 5, 6]), 3))
        == want
    )
    for ids, n, words in (([0, 5], 0, "max_new_tokens"), ([0, 5], 2.0, "max_new_tokens"), ([0, 5], None, "max_new_tokens"),
                          ([0, 5.0], 2, "must be integers")):  # fmt: skip
        with pytest.raises(ValueError, match=words):
            list(generate(model, ids, n))


def test_errors_are_value_errors() -> None:
    assert issubclass(CheckpointError, ValueError) and issubclass(ConfigError, ValueError)


def test_missing_directory(tmp_path: Path) -> None:
    assert "does not exist" in load_error(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    assert "not a directory" in load_error(tmp_path / "file")


def test_no_config(tmp_path: Path) -> None:
    assert "config.json" in load_error(tmp_path, ConfigError)


def test_unknown_model_type(ckpt: Path) -> None:
    raw = json.loads((ckpt / "config.json").read_text())
    raw["model_type"] = "llama"
    (ckpt / "config.json").write_text(json.dumps(raw))
    assert "llama" in load_error(ckpt, ConfigError)


def test_no_safetensors(ckpt: Path) -> None:
    (ckpt / "model.safetensors").unlink()
    assert "no *.safetensors files" in load_error(ckpt)


def test_index_names_missing_shard(sharded: Path) -> None:
    victim = sorted(sharded.glob("model-*.safetensors"))[1]
    victim.unlink()
    msg = load_error(sharded)
    assert victim.name in msg and "model.safetensors.index.json" in msg


def test_bad_index(sharded: Path) -> None:
    (sharded / "model.safetensors.index.json").write_text("{not json")
    assert "model.safetensors.index.json" in load_error(sharded)
    (sharded / "model.safetensors.index.json").write_bytes(b'{"weight_map": "\xff"}')  # invalid UTF-8
    assert "model.safetensors.index.json is not a valid safetensors index" in load_error(sharded)


def test_truncated_file(ckpt: Path) -> None:
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    assert str(f) in load_error(ckpt)


def test_corrupt_header(ckpt: Path) -> None:
    f = ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"\x00garbage that is not JSON at all"
    f.write_bytes(bytes(data))
    assert str(f) in load_error(ckpt)
    f.write_bytes(b"\xff" * 16)  # header length far beyond the file
    assert str(f) in load_error(ckpt)


def test_missing_tensor(ckpt: Path) -> None:
    edit(ckpt, lambda t: t.pop("model.layers.1.mlp.experts.7.up_proj.weight"))
    msg = load_error(ckpt)
    assert "missing 1 tensor:" in msg and "model.layers.1.mlp.experts.7.up_proj.weight" in msg


def test_many_missing_tensors_are_counted(ckpt: Path) -> None:
    def drop(t: dict) -> None:
        for k in [k for k in t if k.startswith("model.layers.2.mlp.experts.")]:
            del t[k]

    edit(ckpt, drop)
    msg = load_error(ckpt)
    assert "missing 48 tensors:" in msg and "(+45 more)" in msg
    assert msg.count("model.layers.2.mlp.experts.") == 3


def test_unexpected_tensor(ckpt: Path) -> None:
    edit(ckpt, lambda t: t.update({"model.layers.0.self_attn.rotary.inv_freq": torch.ones(8)}))
    msg = load_error(ckpt)
    assert "1 unexpected tensor:" in msg and "model.layers.0.self_attn.rotary.inv_freq" in msg


def test_shape_mismatch_names_tensor_and_both_shapes(ckpt: Path) -> None:
    name = "model.layers.0.self_attn.kv_b_proj.weight"
    edit(ckpt, lambda t: t.update({name: torch.zeros(256, 32)}))
    msg = load_error(ckpt)
    assert name in msg and "[256, 32]" in msg and "[256, 64]" in msg


def test_shape_mismatch_from_wrong_config(ckpt: Path) -> None:
    raw = json.loads((ckpt / "config.json").read_text())
    raw["kv_lora_rank"] = 32
    (ckpt / "config.json").write_text(json.dumps(raw))
    msg = load_error(ckpt)
    assert "model.layers.0.self_attn.kv_a_proj_with_mqa.weight" in msg and "[48, 256]" in msg
    assert "[80, 256]" in msg and "(+11 more problems)" in msg


def test_fp8_weight_without_scale(tmp_path: Path) -> None:
    d = write_synthetic_checkpoint(small_config(), tmp_path, fp8=True)
    name = "model.layers.0.mlp.down_proj.weight"
    edit(d, lambda t: t.pop(name + "_scale_inv"))
    msg = load_error(d)
    assert name in msg and "weight_scale_inv" in msg


def test_fp8_scale_wrong_shape(tmp_path: Path) -> None:
    d = write_synthetic_checkpoint(small_config(), tmp_path, fp8=True)
    name = "model.layers.0.mlp.down_proj.weight_scale_inv"
    edit(d, lambda t: t.update({name: torch.ones(4, 4)}))
    msg = load_error(d)
    assert name in msg and "[4, 4]" in msg and "[2, 4]" in msg


def test_scale_without_fp8_weight_is_unexpected(ckpt: Path) -> None:
    name = "model.layers.0.mlp.down_proj.weight_scale_inv"
    edit(ckpt, lambda t: t.update({name: torch.ones(2, 4)}))
    assert name in load_error(ckpt)


def test_partial_mtp_layer_is_missing_not_ignored(ckpt: Path) -> None:
    edit(ckpt, lambda t: t.pop("model.layers.3.eh_proj.weight"))
    assert "model.layers.3.eh_proj.weight" in load_error(ckpt)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_fp8_scales_that_are_not_finite_and_non_negative_are_refused(tmp_path: Path, bad: float) -> None:
    """(Before, a NaN or inf scale loaded, and every logit came out NaN.)"""
    d = write_synthetic_checkpoint(small_config(), tmp_path, fp8=True)
    name = "model.layers.0.mlp.down_proj.weight_scale_inv"
    edit(d, lambda t: t[name].view(-1).__setitem__(0, bad))
    msg = load_error(d)
    assert name in msg and "finite and >= 0" in msg


@pytest.mark.parametrize("keep_fp8", [False, True])
def test_nan_fp8_weights_are_refused(tmp_path: Path, keep_fp8: bool) -> None:
    d = write_synthetic_checkpoint(small_config(), tmp_path, fp8=True)
    name = "model.layers.0.mlp.down_proj.weight"
    edit(d, lambda t: t[name].view(torch.uint8).view(-1).__setitem__(3, 0x7F))  # an e4m3fn NaN
    with pytest.raises(CheckpointError, match="NaN among the FP8 weights") as exc:
        load_model(d, dtype=torch.float32, progress=False, keep_fp8=keep_fp8)
    assert name in str(exc.value)


def test_an_fp8_copy_of_the_head_in_the_mtp_layer_is_refused(tmp_path: Path) -> None:
    """The MTP layer's copy of the head stored in FP8 used to load without its scale (raw e4m3 values)."""
    d = write_synthetic_checkpoint(small_config(num_nextn_predict_layers=1), tmp_path, fp8=True)
    tensors = load_file(d / "model.safetensors")
    head = next(k for k in tensors if k.endswith("shared_head.head.weight"))
    w = tensors[head].float()
    tensors[head] = w.to(torch.float8_e4m3fn)
    tensors[head + "_scale_inv"] = torch.ones(-(-w.shape[0] // 128), -(-w.shape[1] // 128))
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    msg = load_error(d)
    assert head in msg and "stored in FP8" in msg
