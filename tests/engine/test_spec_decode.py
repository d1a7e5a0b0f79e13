"""Speculative decoding with the MTP layer: the same tokens as decoding one at a time, fewer steps when the
drafts are good, and drafts that equal the full-sequence MTP forward."""

from __future__ import annotations

import pytest
import torch

from dsv32.engine.core import EngineConfig, EngineCore, EngineError
from dsv32.engine.sampling_params import SamplingParams
from dsv32.model.transformer import DeepseekForCausalLM
from tests.engine.test_paged_runner import alone
from tests.model.oracle import randomize_
from tests.model.test_forms import tiny_config


def oracle_mtp_model(vocab_size: int = 300) -> DeepseekForCausalLM:
    """A one-layer model whose next token depends only on the current one (attention outputs zeroed), with
    an MTP layer that repeats the main layer on the next token: its draft is the main model's next
    prediction, so greedy drafts are (all but rounding) always right."""
    torch.manual_seed(0)
    cfg = tiny_config(num_hidden_layers=1, first_k_dense_replace=0, vocab_size=vocab_size)
    m = DeepseekForCausalLM(cfg).eval()
    randomize_(m, seed=4)
    main, mtp = m.model.layers[0], m.mtp_layers[0]
    d = m.config.hidden_size
    with torch.no_grad():
        emb = m.model.embed_tokens.weight
        emb /= emb.pow(2).mean(-1, keepdim=True).sqrt()  # rms 1 rows: enorm(E(t)) == E(t)
        for layer in (main, mtp):
            layer.self_attn.o_proj.weight.zero_()
        mtp.enorm.weight.fill_(1.0)
        mtp.eh_proj.weight.copy_(torch.cat((torch.eye(d), torch.zeros(d, d)), dim=1))  # u = enorm(E(t_{i+1}))
        for name in ("input_layernorm", "post_attention_layernorm", "mlp"):
            getattr(mtp, name).load_state_dict(getattr(main, name).state_dict())
        mtp.shared_head.norm.load_state_dict(m.model.norm.state_dict())
    return m


@pytest.fixture(scope="module")
def oracle():
    return oracle_mtp_model()


def run(core: EngineCore, prompts: dict[str, list[int]], params) -> tuple[dict, dict, int]:
    """Submit all, step to the end: (tokens per request, logprobs per request, steps)."""
    for rid, p in prompts.items():
        core.add_request(rid, p, params(rid) if callable(params) else params)
    toks: dict[str, list[int]] = {rid: [] for rid in prompts}
    lps: dict[str, list] = {rid: [] for rid in prompts}
    steps = 0
    while core.has_work():
        steps += 1
        assert steps < 500, "the engine stopped making progress"
        for o in core.step():
            toks[o.request_id] += o.new_token_ids
            lps[o.request_id] += o.logprobs or []
    core.pool.assert_no_leaks()
    return toks, lps, steps


def engine(model, spec: int, **kw) -> EngineCore:
    cfg = dict(block_size=4, num_blocks=80, max_num_batched_tokens=16, num_speculative_tokens=spec)
    return EngineCore(model, EngineConfig(**(cfg | kw)), eos_id=None)


def prompts(n: int, seed: int) -> dict[str, list[int]]:
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(2, 300, (12,), generator=g).tolist()
    out = {}
    for i in range(n):
        tail = torch.randint(2, 300, (int(torch.randint(1, 20, (1,), generator=g)),), generator=g).tolist()
        out[f"r{i}"] = (prefix if i % 2 else []) + tail  # every other one shares a prefix (cache hits)
    return out


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("which", ["random", "oracle"])
@pytest.mark.parametrize("num_blocks", [80, 12])  # 12 blocks of 4: preemption
def test_greedy_with_drafts_equals_each_request_alone(model, oracle, which, num_blocks, k):
    m = model if which == "random" else oracle
    ps = prompts(6, seed=num_blocks)
    core = engine(m, k, num_blocks=num_blocks)
    got, _, _ = run(core, ps, SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True))
    for rid, p in ps.items():
        assert got[rid] == alone(m, p, 9), rid
    stats = core.stats()
    assert stats["spec_draft_tokens"] > 0
    if which == "oracle":  # the drafts are the model's own next predictions
        assert stats["spec_accepted_tokens"] >= 0.9 * stats["spec_draft_tokens"]
    if num_blocks == 12:
        assert stats["preemptions"] > 0


@pytest.mark.parametrize(("k", "steps"), [(1, 11), (3, 6)])
def test_good_drafts_divide_the_steps(oracle, k, steps):
    p = {"a": [5, 6, 7]}
    plain, _, plain_steps = run(engine(oracle, 0), p, SamplingParams(temperature=0.0, max_tokens=21))
    core = engine(oracle, k)
    spec, _, spec_steps = run(core, p, SamplingParams(temperature=0.0, max_tokens=21))
    assert spec == plain and len(spec["a"]) == 21
    # prefill + first token, then 1 + k tokens a step: 1 + 20 / (1 + k) steps instead of 21
    assert plain_steps == 21 and spec_steps == steps
    stats = core.stats()
    assert stats["spec_accepted_tokens"] == stats["spec_draft_tokens"] == 20 - (steps - 1)
    # every drafted step (all but the prefill's) had all k drafts accepted
    assert stats["spec_drafts"] == steps - 1 and stats["spec_accepted_per_pos"] == [steps - 1] * k


def test_seeded_sampling_and_logprobs_are_those_of_plain_decoding(oracle):
    ps = prompts(4, seed=3)

    def params(rid: str) -> SamplingParams:
        return SamplingParams(
            temperature=0.7, top_p=0.95, top_k=40, repetition_penalty=1.1, frequency_penalty=0.2,
            seed=int(rid[1:]), max_tokens=12, logprobs=True, top_logprobs=2,
        )  # fmt: skip

    plain, plain_lp, _ = run(engine(oracle, 0), ps, params)
    core = engine(oracle, 1)
    spec, spec_lp, _ = run(core, ps, params)
    assert spec == plain
    assert core.stats()["spec_accepted_tokens"] > 0  # some steps verified two tokens
    for rid in ps:
        assert len(spec_lp[rid]) == 12
        for a, b in zip(spec_lp[rid], plain_lp[rid], strict=True):
            assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-4)
            assert [t for t, _ in a["top"]] == [t for t, _ in b["top"]]


def test_max_tokens_and_stop_tokens_end_a_step_that_had_a_draft(oracle):
    prompt = [9, 8, 7]
    greedy = alone(oracle, prompt, 7)
    toks, _, _ = run(engine(oracle, 1), {"m": prompt}, SamplingParams(temperature=0.0, max_tokens=7))
    assert toks["m"] == greedy  # odd: the last step has no room for a draft and a token after it
    stop = SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=[greedy[3]])
    core = engine(oracle, 1)
    core.add_request("s", prompt, stop)
    outs = []
    while core.has_work():
        outs += core.step()
    assert sum((o.new_token_ids for o in outs), []) == greedy[: greedy.index(greedy[3]) + 1]
    assert outs[-1].finished and outs[-1].finish_reason == "stop"
    core.pool.assert_no_leaks()


def test_speculative_decoding_needs_an_mtp_layer(model):
    no_mtp = DeepseekForCausalLM(tiny_config(num_nextn_predict_layers=0))
    with pytest.raises(EngineError, match="MTP layer"):
        EngineCore(no_mtp, EngineConfig(num_blocks=8, num_speculative_tokens=1))
    with pytest.raises(EngineError, match=r"in \[0, 4\]"):
        EngineCore(model, EngineConfig(num_blocks=8, num_speculative_tokens=5))


def test_constrained_requests_draft_within_their_grammar():
    from dsv32.chat.tokenizer import load_tokenizer

    tokenizer = load_tokenizer()
    m = oracle_mtp_model(vocab_size=tokenizer.vocab_size)
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40},
              "n": {"type": "integer"}}, "required": ["name", "n"]}  # fmt: skip
    params = SamplingParams(temperature=0.0, max_tokens=24, guided={"json_schema": schema})
    outs = []
    for spec in (0, 1):
        core = engine(m, spec, num_blocks=64)
        core.attach_tokenizer(tokenizer)
        toks, _, _ = run(core, {"j": [11, 12, 13]}, params)
        outs.append(toks["j"])
    assert outs[1] == outs[0]
    # the grammar masks the MTP layer's logits as it masks the model's: the oracle's drafts stay right
    stats = core.stats()
    assert stats["spec_accepted_tokens"] >= 0.8 * stats["spec_draft_tokens"] > 0


def test_drafts_see_the_requests_penalties_and_logit_bias(oracle):
    params = SamplingParams(
        temperature=0.0, max_tokens=30, repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.2,
        logit_bias={7: 2.0, 8: -100.0},
    )  # fmt: skip
    ps = prompts(3, seed=5)
    plain, _, _ = run(engine(oracle, 0), ps, params)
    core = engine(oracle, 1)
    spec, _, _ = run(core, ps, params)
    assert spec == plain
    stats = core.stats()
    assert stats["spec_accepted_tokens"] >= 0.95 * stats["spec_draft_tokens"] > 0  # 74 % with raw drafts


def chained_reference(model, ids: list[int], k: int) -> list[int]:
    """k drafts after ``ids`` from full-sequence forwards: the MTP layer over every position with the main
    model's hidden state and the next token, then fed its own output and its draft, one position further
    each time."""
    mtp = model.mtp_layers[0]
    t = torch.tensor([ids])
    drafts = []
    with torch.no_grad():
        hidden, nxt = model.hidden_states(t[:, :-1]), t[:, 1:]
        for _ in range(k):
            v = mtp.draft_hidden(hidden, nxt, model.contiguous_context(hidden.shape[1]))
            drafts.append(int(mtp.draft_logits(v[:, -1]).argmax()))
            hidden = torch.cat((hidden, v[:, -1:]), dim=1)
            nxt = torch.cat((nxt, torch.tensor([[drafts[-1]]])), dim=1)
    return drafts


@pytest.mark.parametrize(("k", "budget"), [(1, 5), (3, 7)])
def test_each_draft_equals_the_full_sequence_chain(model, k, budget):
    """The MTP layer's paged cache holds every position (chunked prefill, prefix hits, rejected drafts
    rewritten): each draft equals the MTP layer over the whole sequence; with 3 drafts a step, the second and
    third come from the MTP layer on its own output, with its cache entries written ahead (and rewritten
    when those positions are computed), and equal that chain over the whole sequence."""
    core = engine(model, k, max_num_batched_tokens=budget)
    g = torch.Generator().manual_seed(11 + k)
    shared = torch.randint(2, 300, (16,), generator=g).tolist()
    checked = 0
    # b hits a's cached blocks but the last one (b's token after it differs: see the next test)
    for rid, prompt in (("a", shared + [3, 4]), ("b", shared + [5, 8, 9])):
        core.add_request(rid, prompt, SamplingParams(temperature=0.0, max_tokens=14))
        while core.has_work():
            core.step()
            live = core.live.get(rid)
            if live is None or not live.request.draft_ids:
                continue
            drafts = live.request.draft_ids
            assert drafts == chained_reference(model, live.request.all_ids, len(drafts))
            checked += len(drafts) == k
    assert checked >= 10 and core.stats()["prefix_cache_hit_rate"] > 0
    core.pool.assert_no_leaks()


def mtp_entries(core: EngineCore, rid: str) -> torch.Tensor:
    """The MTP layer's cached latents at the request's computed positions."""
    req = core.live[rid].request
    bs = core.cache.block_size
    slots = torch.tensor([req.block_table[p // bs] * bs + p % bs for p in range(req.num_computed)])
    return core.cache.gather_latent(len(core.cache.c_kv) - 1, slots)[0]


def test_a_prefix_hit_never_reuses_an_mtp_entry_computed_with_another_next_token(model):
    """The MTP layer's entry at a block's last position is computed with the token after the block, so with
    drafts on, a block's prefix-cache identity covers that token too: b shares a's first 16 tokens but not
    the 17th, and hits a's blocks but the last; its MTP entries equal those of b alone."""
    shared = list(range(20, 36))
    params = SamplingParams(temperature=0.0, max_tokens=8)
    core = engine(model, 1)
    run(core, {"a": shared + [3, 4]}, params)
    b = shared + [5, 8, 9]
    core.add_request("b", b, params)
    while core.live["b"].request.num_computed < len(b):
        core.step()
    alone = engine(model, 1)
    alone.add_request("b", b, params)
    while alone.live["b"].request.num_computed < len(b):
        alone.step()
    torch.testing.assert_close(mtp_entries(core, "b"), mtp_entries(alone, "b"), rtol=1e-5, atol=1e-5)
    assert core.live["b"].request.num_cached_prompt == 12  # blocks 0-2 (block 3 is followed by 3 in a)
    # the same prompt again hits every block that has a known next token
    core.add_request("c", b, params)
    core.step()
    assert core.live["c"].request.num_cached_prompt == 16


def test_drafted_rows_logits_equal_the_full_forward(model):
    """Every verified row's logits (the known token's and each draft's) equal the plain full-sequence forward
    over the tokens up to that row, drafts included, past index_topk too (the DSA path)."""
    core = engine(model, 2, max_num_batched_tokens=64)
    real = core.runner.execute
    seen = []

    def execute(chunks):
        logits = real(chunks)
        # rows of the chunks that sample: the last known token's, then one per draft
        ctx = [(c.request.token_ids(0, c.start + c.num_tokens), list(c.draft)) for c in chunks if c.samples]
        seen.append((ctx, logits.clone()))
        return logits

    core.runner.execute = execute
    g = torch.Generator().manual_seed(21)
    ps = {f"r{i}": torch.randint(2, 300, (n,), generator=g).tolist() for i, n in enumerate((5, 14, 20))}
    run(core, ps, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    drafted = 0
    worst = 0.0
    for ctx, logits in seen:
        row = 0
        for known, draft in ctx:
            for j in range(len(draft) + 1):
                ids = torch.tensor([known + draft[:j]])
                with torch.no_grad():
                    want = model(ids)[0, -1].float()
                worst = max(worst, (logits[row] - want).abs().max().item())
                row += 1
            drafted += len(draft)
    assert drafted > 20 and worst < 1e-4, (drafted, worst)
    assert max(len(k) for ctx, _ in seen for k, _ in ctx) > 12  # contexts past index_topk
