"""Our model against transformers (the oracle): logits, each layer, the latent cache, DSA selection."""

from __future__ import annotations

import pytest
import torch

from tests.model.oracle import assert_logits_close, load_ours, make_hf

CASES = {
    "v32-qlora-yarn-grouped": ("v32", {}),
    "v32-single-group": ("v32", dict(n_group=1, topk_group=1)),
    "v3-qlora-yarn": ("v3", {}),
    "v3-no-qlora": ("v3", dict(q_lora_rank=None)),
    "v3-plain-rope": ("v3", dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for name, (kind, over) in CASES.items():
        d = tmp_path_factory.mktemp(name)
        out[name] = (make_hf(kind, d, **over), load_ours(d))
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_logits_and_every_layer_match(models, name):
    hf, ours = models[name]
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True)
        layer_out = []
        hooks = [
            # a block returns (its MLP output, the residual stream): the hidden state after it is their sum
            layer.register_forward_hook(lambda m, i, o: layer_out.append(o[0] + o[1]))
            for layer in ours.model.layers
        ]
        logits = ours(ids)
        for h in hooks:
            h.remove()
    assert logits.shape == (2, 40, 512)
    assert_logits_close(logits, ref.logits)
    # hidden_states[0] is the embedding, [i+1] the output of layer i (the last one after model.norm)
    for i, h in enumerate(layer_out[:-1]):
        torch.testing.assert_close(h, ref.hidden_states[i + 1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["v32-qlora-yarn-grouped", "v3-qlora-yarn"])
def test_latent_cache_matches_oracle_cache(models, name):
    from transformers import DynamicCache

    hf, ours = models[name]
    cfg = ours.config
    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        hf_cache = DynamicCache(config=hf.config)
        hf(ids, cache=hf_cache, use_cache=True)
        cache = ours.new_cache(1, 24)
        ours(ids, 0, cache)
    # transformers stores k_pe de-interleaved (evens then odds); ours keeps DeepSeek's interleaved layout
    d = cfg.qk_rope_head_dim
    deinterleave = torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])
    for i in range(cfg.num_hidden_layers):
        layer = hf_cache.layers[i]
        torch.testing.assert_close(cache[i].c_kv, layer.keys[:, 0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache[i].k_pe[..., deinterleave], layer.values[:, 0], rtol=1e-5, atol=1e-5)
        if cfg.has_indexer:
            torch.testing.assert_close(cache[i].k_index, layer.indexer_keys, rtol=1e-5, atol=1e-5)


def test_sparse_selection_is_really_active(models):
    """Past index_topk the DSA model must differ from the same weights with dense attention."""
    hf, ours = models["v32-qlora-yarn-grouped"]
    ids = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(3))
    topk = ours.config.index_topk
    with torch.no_grad():
        sparse = ours(ids)
        for layer in ours.model.layers:
            layer.self_attn.indexer.topk = 10**6
        try:
            dense = ours(ids)
        finally:
            for layer in ours.model.layers:
                layer.self_attn.indexer.topk = topk
    torch.testing.assert_close(sparse[:, :topk], dense[:, :topk], rtol=1e-5, atol=1e-5)
    assert (sparse[:, topk:] - dense[:, topk:]).abs().max() > 1e-2


def _capture_topk(hf, ours):
    """Forward hooks recording the selected key indices of layer 0 in both models."""
    got = {"hf": [], "ours": []}
    h1 = hf.model.layers[0].self_attn.indexer.register_forward_hook(lambda m, i, o: got["hf"].append(o))
    h2 = ours.model.layers[0].self_attn.indexer.register_forward_hook(lambda m, i, o: got["ours"].append(o))
    return got, (h1, h2)


@pytest.fixture(scope="module")
def long_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("long")
    hf = make_hf("v32", d, seed=5, index_topk=64, num_hidden_layers=2)
    return hf, load_ours(d)


def test_long_context_prefill_and_decode_match_oracle_past_index_topk(long_models):
    """topk 64, 300 tokens: prefill and token-by-token decode match the oracle at EVERY position.

    A public port once collapsed exactly past index_topk: its selection mishandled the causal mask and
    evicted the first tokens. Positions 64..299 are where such a bug shows; each is checked here.
    """
    hf, ours = long_models
    T, topk = 300, 64
    ids = torch.randint(0, 512, (1, T), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        got, hooks = _capture_topk(hf, ours)
        ref = hf(ids).logits
        full = ours(ids)
        n_prefill_calls = len(got["ours"])  # the prefill runs its queries in chunks of QUERY_CHUNK_ROWS
        cache = ours.new_cache(1, T)
        steps = [ours(ids[:, :1], 0, cache)]
        for t in range(1, T):
            steps.append(ours(ids[:, t : t + 1], t, cache))
        for h in hooks:
            h.remove()
    inc = torch.cat(steps, dim=1)
    scale = ref.abs().max().item()
    per_pos_full = (full - ref).abs().amax(dim=(0, 2))
    per_pos_inc = (inc - ref).abs().amax(dim=(0, 2))
    assert per_pos_full.max() <= 1e-4 * scale, f"prefill worst position {int(per_pos_full.argmax())}"
    assert per_pos_inc.max() <= 1e-4 * scale, f"decode worst position {int(per_pos_inc.argmax())}"

    # The indexer picks the same key sets: oracle prefill vs our prefill vs our decode steps.
    hf_idx = got["hf"][0][0]  # [T, 64]
    our_idx = torch.cat([idx for idx, _ in got["ours"][:n_prefill_calls]], dim=1)  # prefill: [1, T, 64]
    assert our_idx.shape == (1, T, topk)
    decode_sel = got["ours"][n_prefill_calls:]  # one per decode step that had more than 64 keys
    assert len(decode_sel) == T - topk
    for t in range(topk, T):
        want = set(hf_idx[t].tolist())
        assert set(our_idx[0, t].tolist()) == want, f"prefill selection differs at {t}"
        step_idx, step_valid = decode_sel[t - topk]
        assert step_valid.all()
        assert set(step_idx[0, 0].tolist()) == want, f"decode selection differs at {t}"
        # the first token is never evicted merely for being first: if the oracle keeps it, so do we
    assert any(0 in set(hf_idx[t].tolist()) for t in range(topk, T))


def test_chunked_prefill_equals_full(long_models):
    _, ours = long_models
    T = 200
    ids = torch.randint(0, 512, (2, T), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full = ours(ids)
        cache = ours.new_cache(2, T)
        chunks = [ours(ids[:, s : s + 37], s, cache) for s in range(0, T, 37)]
    torch.testing.assert_close(torch.cat(chunks, 1), full, rtol=1e-4, atol=1e-4)


def test_index_score_ties_are_the_only_difference_from_the_oracle(tmp_path, monkeypatch):
    """With one index head about half the keys score exactly 0, so the top-k cut falls among tied keys.
    We take tied keys earliest first (``select_topk_visible``); transformers takes whichever
    ``torch.topk`` returns. Given the same tie rule, the oracle's logits equal ours at every position."""
    from dsv32.model.indexer import select_topk_visible

    hf = make_hf("v32", tmp_path, seed=5, index_topk=64, num_hidden_layers=2, index_n_heads=1)
    ours = load_ours(tmp_path)
    ids = torch.randint(0, 512, (1, 300), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        got = ours(ids)
        plain = hf(ids).logits
        topk, busy = torch.Tensor.topk, [False]

        class _Top:
            def __init__(self, indices):
                self.indices = indices

        def earliest_first(self, k, dim=-1, *args, **kwargs):  # only the indexer's [B, T, S] selection
            if busy[0] or k != 64 or self.dim() != 3:
                return topk(self, k, dim, *args, **kwargs)
            busy[0] = True
            try:
                return _Top(select_topk_visible(self, self > float("-inf"), k)[0])
            finally:
                busy[0] = False

        monkeypatch.setattr(torch.Tensor, "topk", earliest_first)
        same_rule = hf(ids).logits
    # the case exercises ties: with torch.topk's own choice the oracle differs (if a torch release ever
    # picks tied keys earliest first too, this line fails and the case needs a new seed, not a fix)
    assert (plain - got).abs().max() > 1e-2
    assert_logits_close(got, same_rule)
