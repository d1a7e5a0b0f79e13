"""The engine's paths on a bf16 model loaded as real checkpoints are (``load_model``: norms, router, indexer
head weights and lm_head fp32, the reference's precision; tests/model/test_precision.py checks the pieces).

The paged runner, the fixed-shape step (what CUDA graphs capture; eager here) with the grouped-matmul experts,
the same with oneDNN-prepacked weights (the fp32 lm_head packed in fp32), and the compiled CPU decode step
give fp32 logits from the fp32 head, equal to each other but for the fp32 rounding of the head's matmul
(kernels differ by row count and packing), and as close to the plain forward as bf16 allows.
"""

from __future__ import annotations

import pytest
import torch

from dsv32.engine.cuda_graphs import DecodeGraphs
from dsv32.engine.paged_cache import PagedKVCache
from dsv32.engine.runner import ModelRunner
from dsv32.weights.loader import load_model
from dsv32.weights.synthetic import write_synthetic_checkpoint
from tests.engine.test_cuda_graphs import forward_without_host_sync, stacked
from tests.engine.test_paged_runner import alone, drive
from tests.model.test_forms import tiny_config

BF16 = torch.bfloat16
# Every expert routed and index_topk past every context: no discrete choice between the engine's bf16 rounding
# and the full forward's, so their logits differ by rounding alone (worst 1.1e-2 to 1.3e-2 of the logit scale
# measured on 3 seeds, 1.3e-2 to 1.8e-2 with transformers' precision)
SMOOTH = dict(index_topk=64, n_routed_experts=2, num_experts_per_tok=2, n_group=1, topk_group=1)


def bf16_model(tmp_path, **over):
    cfg = tiny_config(**over)
    d = write_synthetic_checkpoint(cfg, tmp_path, seed=0, dtype=BF16, std=0.05)
    return load_model(d, dtype=BF16, progress=False)


def paged_cache(model, num_blocks=40, block_size=4):
    cfg = model.config
    return PagedKVCache(cfg, num_blocks, block_size, cfg.num_hidden_layers, dtype=model.dtype)


def step_logits(model, prompts, monkeypatch, graphs=False, check_logits=False):
    """Each step's logits through ``drive`` (plain runner, or the fixed-shape step for decode-only steps);
    also the worst relative difference from the full forward when ``check_logits``."""
    got = []
    real = ModelRunner.execute
    cache = paged_cache(model)
    fixed = DecodeGraphs(model, cache, 8, 256, capture=False) if graphs else None
    with monkeypatch.context() as mp:
        mp.setattr(ModelRunner, "execute", lambda self, chunks: got.append(real(self, chunks)) or got[-1])
        reqs, pool, worst, _ = drive(
            model, prompts, n_new=8, num_blocks=40, block_size=4, budget=9, check_logits=check_logits,
            cache=cache, graphs=fixed,
        )  # fmt: skip
    pool.assert_no_leaks()
    if graphs:
        assert fixed.steps, "no decode step took the fixed-shape path"
    return got, [r.output_ids for r in reqs], worst


def assert_fp32_logits(steps: list[torch.Tensor]) -> None:
    rows = torch.cat([s for s in steps if s.numel()])
    assert rows.dtype == torch.float32
    # from the fp32 head: not bf16 values cast up (those would all survive a round trip through bf16)
    assert (rows.to(BF16).float() == rows).float().mean() < 0.05


def test_engine_paths_agree_on_a_bf16_model(tmp_path, monkeypatch):
    """Past index_topk (12) and with top-2 routing: every step's logits of the fixed-shape step (grouped
    experts) and of the prepacked weights equal the plain runner's to fp32 rounding; same tokens."""
    model = bf16_model(tmp_path, index_topk=12)
    assert model.lm_head.weight.dtype == torch.float32 and model.dtype == BF16
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (20, 7, 26)]
    plain, out, _ = step_logits(model, prompts, monkeypatch)
    assert_fp32_logits(plain)
    m = stacked(model, BF16)
    fixed, out_fixed, _ = step_logits(m, prompts, monkeypatch, graphs=True)
    m.prepack_cpu_weights()
    assert m.lm_head._packed is not None and m.lm_head._packed.dtype == torch.float32
    packed, out_packed, _ = step_logits(m, prompts, monkeypatch, graphs=True)
    assert out_fixed == out and out_packed == out
    for a, b, c in zip(plain, fixed, packed, strict=True):
        if a.numel():
            scale = a.abs().max()
            assert (b - a).abs().max() <= 1e-6 * scale and (c - a).abs().max() <= 1e-6 * scale


def test_paged_logits_follow_the_full_forward_in_bf16(tmp_path, monkeypatch):
    model = bf16_model(tmp_path, **SMOOTH)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (20, 7, 26)]
    steps, out, worst = step_logits(
        stacked(model, BF16), prompts, monkeypatch, graphs=True, check_logits=True
    )
    assert_fp32_logits(steps)
    assert worst < 2.5e-2


def test_the_bf16_fixed_shape_step_needs_no_host_sync(tmp_path, monkeypatch):
    """The reference's precision adds casts only: still nothing a CUDA graph would break on."""
    m = stacked(bf16_model(tmp_path, index_topk=12), BF16)
    logits = forward_without_host_sync(DecodeGraphs(m, paged_cache(m), 8, 256, capture=False), monkeypatch)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


@pytest.mark.slow
def test_compiled_decode_steps_follow_the_full_forward_in_bf16(tmp_path):
    """The compiled CPU decode step (~20 s to compile) on the bf16 model: fp32 logits as close to the full
    forward as the eager step (worst 1.0e-2 measured either way), greedy tokens equal running alone."""
    from dsv32.engine.compiled_decode import CompiledDecode

    model = bf16_model(tmp_path, **SMOOTH)
    model.prepack_cpu_weights()
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(2, 300, (n,), generator=g).tolist() for n in (5, 20)]
    cache = paged_cache(model, 24)
    compiled = CompiledDecode(model, cache, max_context=256)
    steps = []
    real = compiled.execute
    compiled.execute = lambda chunks: steps.append(real(chunks)) or steps[-1]
    reqs, pool, worst, _ = drive(
        model, prompts, n_new=10, num_blocks=24, block_size=4, budget=8, max_seqs=1, check_logits=True,
        cache=cache, graphs=compiled,
    )  # fmt: skip
    assert compiled._forms_compiled and len(steps) >= 10, "nothing compiled"
    assert_fp32_logits(steps)
    assert worst < 2.5e-2
    for r, p in zip(reqs, prompts, strict=True):
        assert r.output_ids == alone(model, p, 10)
    pool.assert_no_leaks()
