"""load_model: round trips through synthetic checkpoints, FP8, transformers interop, ties, memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsv32.config import ModelConfig
from dsv32.model.layers import Linear
from dsv32.weights.loader import load_model
from dsv32.weights.synthetic import write_synthetic_checkpoint
from tests.weights.configs import block_aligned_config, small_config
from tests.weights.test_synthetic import read_all, reference_dequant

# kept fp32 in a bf16 model, as DeepSeek's reference keeps them: the router, every norm weight (and the
# indexer's k_norm bias), the indexer's weights_proj, and lm_head (with the MTP head, its copy)
KEPT_FP32 = (
    "mlp.gate.weight", "e_score_correction_bias", "norm.weight", "k_norm.bias", "weights_proj.weight",
    "lm_head.weight", "shared_head.head.weight",
)  # fmt: skip
IDS = torch.tensor([[0, 17, 5, 300, 42, 7, 99, 128, 3, 250, 11, 64]])


def assert_loaded(model, stored: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Every model tensor equals the stored one cast to ``dtype`` (``KEPT_FP32`` tensors: fp32)."""
    assert not model.training
    state = model.state_dict()
    assert set(state) <= set(stored)
    for name, t in state.items():
        want_dtype = torch.float32 if name.endswith(KEPT_FP32) else dtype
        assert t.dtype == want_dtype, name
        assert torch.equal(t, stored[name].to(want_dtype)), name
    assert all(not p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(
    "model_type,q_lora,mtp,shard_bytes,store,load",
    [
        ("deepseek_v32", True, 1, 400_000, torch.bfloat16, torch.float32),
        ("deepseek_v32", True, 0, None, torch.float32, torch.float32),
        ("deepseek_v3", False, 0, 400_000, torch.float32, torch.bfloat16),
        ("deepseek_v3", True, 1, None, torch.bfloat16, torch.bfloat16),
        ("deepseek_v32", True, 1, None, torch.bfloat16, torch.bfloat16),
    ],
)
def test_round_trip(tmp_path: Path, model_type, q_lora, mtp, shard_bytes, store, load) -> None:
    cfg = small_config(model_type, q_lora=q_lora, mtp=mtp)
    kw = {"max_shard_bytes": shard_bytes} if shard_bytes else {}
    d = write_synthetic_checkpoint(cfg, tmp_path, dtype=store, **kw)
    assert (d / "model.safetensors.index.json").exists() == bool(shard_bytes)
    model = load_model(d, dtype=load, progress=False)
    assert model.config == replace(cfg, torch_dtype=str(store).removeprefix("torch."))
    assert_loaded(model, read_all(d), load)
    assert len(model.mtp_layers) == mtp
    logits = model(IDS)
    assert logits.shape == (1, IDS.shape[1], cfg.vocab_size) and logits.isfinite().all()


def test_mtp_copies_shared_unless_different(tmp_path: Path) -> None:
    cfg = small_config()
    d = write_synthetic_checkpoint(cfg, tmp_path, dtype=torch.float32)
    model = load_model(d, dtype=torch.float32, progress=False)
    mtp = model.mtp_layers[0]
    assert mtp.embed_tokens.weight is model.model.embed_tokens.weight  # one copy in memory
    assert mtp.shared_head.head.weight is model.lm_head.weight

    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.3.shared_head.head.weight"] = tensors["lm_head.weight"] * 2
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    model = load_model(d, dtype=torch.float32, progress=False)
    mtp = model.mtp_layers[0]
    assert mtp.embed_tokens.weight is model.model.embed_tokens.weight
    assert mtp.shared_head.head.weight is not model.lm_head.weight
    assert torch.equal(mtp.shared_head.head.weight, tensors["lm_head.weight"] * 2)
    assert torch.equal(model.lm_head.weight, tensors["lm_head.weight"])

    # a checkpoint without the MTP copies still loads (they are copies by definition)
    del tensors["model.layers.3.embed_tokens.weight"], tensors["model.layers.3.shared_head.head.weight"]
    save_file(tensors, d / "model.safetensors")
    model = load_model(d, dtype=torch.float32, progress=False)
    assert model.mtp_layers[0].shared_head.head.weight is model.lm_head.weight


def test_tied_word_embeddings_without_lm_head(tmp_path: Path) -> None:
    cfg = small_config(mtp=0, tie_word_embeddings=True)
    d = write_synthetic_checkpoint(cfg, tmp_path, dtype=torch.float32)
    tensors = load_file(d / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, d / "model.safetensors")
    model = load_model(d, dtype=torch.float32, progress=False)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, tensors["model.embed_tokens.weight"])


def test_transformers_v32_config_ignores_stored_mtp_layer(tmp_path: Path) -> None:
    """A config without num_nextn_predict_layers (transformers' V3.2 config) over a checkpoint that still
    stores the MTP layer: the layer is ignored, as transformers does."""
    d = write_synthetic_checkpoint(small_config(mtp=1), tmp_path, dtype=torch.float32)
    raw = json.loads((d / "config.json").read_text())
    del raw["num_nextn_predict_layers"]
    (d / "config.json").write_text(json.dumps(raw))
    model = load_model(d, dtype=torch.float32, progress=False)
    assert model.mtp_layers == [] and len(model.model.layers) == 3
    assert_loaded(model, read_all(d), torch.float32)


# ---- FP8 --------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["deepseek_v32", "deepseek_v3"])
def test_fp8_dequantized(tmp_path: Path, model_type: str) -> None:
    cfg = small_config(model_type)
    d = write_synthetic_checkpoint(cfg, tmp_path, fp8=True, max_shard_bytes=150_000)
    stored = read_all(d)
    model = load_model(d, dtype=torch.float32, progress=False)
    state = model.state_dict()
    n_fp8 = 0
    for name, t in state.items():
        if stored[name].dtype == torch.float8_e4m3fn:
            n_fp8 += 1
            scale = stored[name.replace(".weight", ".weight_scale_inv")]
            assert torch.equal(t, reference_dequant(stored[name], scale)), name
        else:
            assert torch.equal(t, stored[name].float()), name
    assert n_fp8 > 50
    assert not any("scale_inv" in k for k in state)
    bf16 = load_model(d, dtype=torch.bfloat16, progress=False)
    name = "model.layers.1.self_attn.q_b_proj.weight"
    assert bf16.state_dict()[name].dtype == torch.bfloat16
    assert torch.equal(bf16.state_dict()[name], state[name].to(torch.bfloat16))


def test_fp8_kept(tmp_path: Path) -> None:
    cfg = block_aligned_config()
    d = write_synthetic_checkpoint(cfg, tmp_path, fp8=True)
    stored = read_all(d)
    kept = load_model(d, dtype=torch.float32, keep_fp8=True, progress=False)
    state = kept.state_dict()
    for name, t in stored.items():
        if t.dtype == torch.float8_e4m3fn:
            assert state[name].dtype == torch.float8_e4m3fn
            assert torch.equal(state[name].view(torch.uint8), t.view(torch.uint8)), name
            scale = name.replace(".weight", ".weight_scale_inv")
            assert torch.equal(state[scale], stored[scale]), scale
    assert state["model.embed_tokens.weight"].dtype == torch.float32
    assert state["model.layers.0.self_attn.indexer.weights_proj.weight"].dtype == torch.float32
    # same network either way: on-the-fly dequantization equals dequantization at load time
    dense = load_model(d, dtype=torch.float32, progress=False)
    assert torch.equal(kept(IDS), dense(IDS))


def test_fp8_kept_in_a_bf16_model(tmp_path: Path) -> None:
    """``keep_fp8`` in a bf16 model: the FP8 projections stay e4m3, the tensors the reference keeps fp32 stay
    fp32 (bit for bit the stored values), the rest is bf16; the logits are fp32 and equal those of the same
    checkpoint dequantised to bf16 at load time."""
    cfg = block_aligned_config()
    d = write_synthetic_checkpoint(cfg, tmp_path, fp8=True)
    stored = read_all(d)
    kept = load_model(d, dtype=torch.bfloat16, keep_fp8=True, progress=False)
    n_fp8 = n_fp32 = 0
    for name, t in kept.state_dict().items():
        if stored[name].dtype == torch.float8_e4m3fn:
            assert t.dtype == torch.float8_e4m3fn, name
            n_fp8 += 1
        elif name.endswith(KEPT_FP32) or name.endswith("weight_scale_inv"):
            assert t.dtype == torch.float32 and torch.equal(t, stored[name].float()), name
            n_fp32 += 1
        else:
            assert t.dtype == torch.bfloat16, name
    assert n_fp8 > 20 and n_fp32 > 20
    assert kept.mtp_layers[0].shared_head.head.weight is kept.lm_head.weight
    dense = load_model(d, dtype=torch.bfloat16, progress=False)
    with torch.no_grad():
        logits = kept(IDS)
        assert logits.dtype == torch.float32 and torch.equal(logits, dense(IDS))


def test_fp8_kept_partial_edge_blocks(tmp_path: Path) -> None:
    cfg = small_config()  # q_b_proj has 4*48 = 192 rows: one full and one partial 128-row block
    d = write_synthetic_checkpoint(cfg, tmp_path, fp8=True)
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.0.self_attn.q_b_proj.weight_scale_inv"][1] *= 16  # distinct scale per block
    save_file(tensors, d / "model.safetensors")
    kept = load_model(d, dtype=torch.float32, keep_fp8=True, progress=False)
    dense = load_model(d, dtype=torch.float32, progress=False)
    name = "model.layers.0.self_attn.q_b_proj"
    lin = kept.get_submodule(name)
    assert isinstance(lin, Linear) and lin.is_fp8
    assert torch.equal(lin.dense_weight(torch.float32), dense.get_submodule(name).weight)


# ---- transformers interop ---------------------------------------------------------------------


def _hf_classes():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers


def _hf_expected(hf_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """transformers' state dict in checkpoint names (per-expert tensors unfused)."""
    out = {}
    inter = cfg.moe_intermediate_size
    for k, v in hf_state.items():
        if k.endswith("mlp.experts.gate_up_proj"):
            p = k[: -len("gate_up_proj")]
            for e in range(v.shape[0]):
                out[f"{p}{e}.gate_proj.weight"] = v[e, :inter]
                out[f"{p}{e}.up_proj.weight"] = v[e, inter:]
        elif k.endswith("mlp.experts.down_proj"):
            p = k[: -len("down_proj")]
            for e in range(v.shape[0]):
                out[f"{p}{e}.down_proj.weight"] = v[e]
        else:
            out[k] = v
    return out


@pytest.mark.parametrize("model_type", ["deepseek_v32", "deepseek_v3"])
def test_transformers_loads_our_checkpoint(tmp_path: Path, model_type: str) -> None:
    """Our synthetic layout is the real HF layout: no missing or unexpected keys (the MTP layer aside,
    which transformers drops), and transformers reads the same values."""
    transformers = _hf_classes()
    cls = (
        transformers.DeepseekV32ForCausalLM
        if model_type == "deepseek_v32"
        else transformers.DeepseekV3ForCausalLM
    )
    cfg = small_config(model_type)
    d = write_synthetic_checkpoint(cfg, tmp_path, dtype=torch.float32)
    hf, info = cls.from_pretrained(d, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert all(k.startswith(f"model.layers.{cfg.num_hidden_layers}.") for k in info["unexpected_keys"])
    rope = hf.config.rope_parameters
    assert (rope["rope_type"], rope["factor"], rope["mscale"], rope["mscale_all_dim"]) == (
        "yarn",
        40.0,
        1.0,
        1.0,
    )
    stored = read_all(d)
    hf_state = _hf_expected(hf.state_dict(), cfg)
    assert set(hf_state) == {k for k in stored if not k.startswith("model.layers.3.")}
    for k, v in hf_state.items():
        assert torch.equal(v, stored[k]), k


@pytest.mark.parametrize("model_type,q_lora,tie", [("deepseek_v32", 96, False), ("deepseek_v3", None, True)])
def test_we_load_transformers_save_pretrained(tmp_path: Path, model_type: str, q_lora, tie: bool) -> None:
    """transformers 5 save_pretrained output (rope_parameters, per-expert names, no MTP layer)."""
    transformers = _hf_classes()
    kw = dict(
        vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=64,
        num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
        q_lora_rank=q_lora, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
        max_position_embeddings=5120, tie_word_embeddings=tie,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                         "original_max_position_embeddings": 128, "beta_fast": 32.0, "beta_slow": 1.0,
                         "mscale": 1.0, "mscale_all_dim": 1.0},
    )  # fmt: skip
    if model_type == "deepseek_v32":
        hf_cfg = transformers.DeepseekV32Config(index_n_heads=4, index_head_dim=64, index_topk=8, **kw)
        hf = transformers.DeepseekV32ForCausalLM(hf_cfg)
    else:
        hf = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**kw))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in list(hf.parameters()) + list(hf.buffers()):
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * 0.05 + (1.0 if t.dim() == 1 else 0.0))
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype=torch.float32, progress=False)
    assert model.config.num_nextn_predict_layers == 0
    expected = _hf_expected(hf.state_dict(), model.config)
    state = model.state_dict()
    assert set(state) == set(expected)
    for k, v in state.items():
        assert torch.equal(v, expected[k]), k
    if tie:
        assert model.lm_head.weight is model.model.embed_tokens.weight


# ---- memory -----------------------------------------------------------------------------------

_LOAD_RSS_SCRIPT = """
import sys, torch
from dsv32.weights.loader import load_model
from tests.peak_rss import peak_rss_kb
base = peak_rss_kb()
model = load_model(sys.argv[1], dtype=torch.bfloat16, progress=False)
size = sum(t.numel() * t.element_size() for t in {id(t): t for t in model.state_dict(keep_vars=True).values()}.values())
print(size >> 20, (peak_rss_kb() - base) >> 10)
"""


def test_load_peak_memory_is_model_plus_chunks(tmp_path: Path) -> None:
    """Peak RSS grows by about the model's size, not twice it (no whole-shard or whole-tensor copies)."""
    cfg = small_config(vocab_size=129280, hidden_size=1024, num_hidden_layers=1, mtp=1)
    write_synthetic_checkpoint(cfg, tmp_path, dtype=torch.bfloat16, max_shard_bytes=1 << 30)
    res = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_LOAD_RSS_SCRIPT), str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    model_mb, grew_mb = map(int, res.stdout.split())
    assert model_mb > 500
    # measured: model + ~100 MB (chunks, allocator); a loader holding a second copy would need 2x
    assert grew_mb < 1.3 * model_mb + 50, f"model {model_mb} MB, peak RSS grew {grew_mb} MB"
