"""A checkpoint with the exact tensor names, shapes and dtypes of the 671B V3.2 release loads and runs.

Layer 0 is dense (intermediate 18432), layer 1 is MoE (experts reduced to 8 so it fits in RAM), layer 2 is
the MTP module; every projection is FP8 e4m3 with 128x128 block scales, as in the release. Loaded with
FP8 kept in memory (``keep_fp8``), bf16 elsewhere and fp32 where the reference keeps fp32 (lm_head, 3.7 GB of
it: ~1.9 GB more than a bf16 head), in a fresh process whose peak RSS must stay < 9.5 GB.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dsv32.config import ModelConfig
from tests.test_config import DEEPSEEK_STYLE

RUNNER = r"""
import json, sys, torch, dsv32
m = dsv32.load_model(sys.argv[1], dtype=torch.bfloat16, keep_fp8=True, progress=False)
ids = torch.tensor([[0, 3, 100, 2000, 50000]])
with torch.inference_mode():
    cache = m.new_cache(1, 8)
    logits = m(ids, 0, cache)
    step = m(logits[:, -1:].argmax(-1), 5, cache)
    h = m.hidden_states(ids)
    mtp = m.mtp_logits(h[:, :-1], ids[:, 1:])
fp8 = sum(1 for p in m.parameters() if p.dtype == torch.float8_e4m3fn)
# a kept-FP8 weight with partial edge blocks (576 rows = 4.5 blocks) dequantises like the release says
from safetensors import safe_open
name = "model.layers.0.self_attn.kv_a_proj_with_mqa"
shard = json.load(open(sys.argv[1] + "/model.safetensors.index.json"))["weight_map"][name + ".weight"]
with safe_open(sys.argv[1] + "/" + shard, "pt") as f:
    w, s = f.get_tensor(name + ".weight").float(), f.get_tensor(name + ".weight_scale_inv")
ref = w * s.repeat_interleave(128, 0)[: w.shape[0]].repeat_interleave(128, 1)[:, : w.shape[1]]
edge_ok = bool(torch.equal(m.get_submodule(name).dense_weight(torch.float32), ref))
from tests.peak_rss import peak_rss_kb
out = dict(edge_ok=edge_ok, maxrss_gb=peak_rss_kb() / 2**20, fp8_params=fp8,
           logits=list(logits.shape), step=list(step.shape), mtp=list(mtp.shape),
           finite=bool(logits.isfinite().all() and step.isfinite().all() and mtp.isfinite().all()))
print(json.dumps(out))
"""


def release_like_config() -> ModelConfig:
    """The 671B V3.2 config.json (DeepSeek's spelling, FP8 ue8m0), cut to 2 layers + MTP and 8 experts."""
    raw = {**DEEPSEEK_STYLE, "num_hidden_layers": 2, "first_k_dense_replace": 1, "num_nextn_predict_layers": 1,
           "n_routed_experts": 8, "n_group": 4, "topk_group": 2, "num_experts_per_tok": 4}  # fmt: skip
    return ModelConfig.from_dict(raw)


@pytest.mark.slow
def test_release_layout_fp8_checkpoint_loads_and_runs_in_bounded_memory(tmp_path):
    import torch

    from dsv32.weights.layout import checkpoint_layout
    from dsv32.weights.synthetic import write_synthetic_checkpoint

    cfg = release_like_config()
    layout = checkpoint_layout(cfg)
    # spot checks against the release's tensor table (architecture spec §7)
    assert layout["model.layers.0.self_attn.q_b_proj.weight"].shape == (24576, 1536)
    assert layout["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape == (5, 56)
    assert layout["model.layers.1.self_attn.indexer.wk.weight_scale_inv"].shape == (1, 56)
    assert layout["model.layers.2.eh_proj.weight"].shape == (7168, 14336)
    # 1 GiB shards: a loader reading one shard at a time maps at most one shard (+ one tensor) of file
    write_synthetic_checkpoint(cfg, tmp_path, seed=0, dtype=torch.bfloat16, fp8=True, max_shard_bytes=1 << 30)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(layout)

    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print("release-layout run:", out)
    assert out["finite"] and out["edge_ok"]
    assert out["logits"] == [1, 5, 129280] and out["step"] == [1, 1, 129280] and out["mtp"] == [1, 4, 129280]
    assert out["fp8_params"] > 20
    assert out["maxrss_gb"] < 9.5, f"peak RSS {out['maxrss_gb']:.2f} GB"
    shutil.rmtree(tmp_path)  # 8.8 GB: freed now, not when pytest prunes its old runs
