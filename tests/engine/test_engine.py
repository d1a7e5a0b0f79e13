"""EngineCore, AsyncEngine and the offline LLM API end to end on a tiny random model."""

from __future__ import annotations

import asyncio

import pytest
import torch

from dsv32.chat.tokenizer import load_tokenizer
from dsv32.engine.async_engine import AsyncEngine, QueueFullError
from dsv32.engine.core import EngineConfig, EngineCore, EngineError
from dsv32.engine.sampling_params import SamplingParams
from tests.engine.test_paged_runner import alone


def run_all(core: EngineCore) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    while core.has_work():
        for o in core.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
    return out


def test_greedy_engine_matches_alone_and_reports_cache_hits(model):
    core = EngineCore(
        model, EngineConfig(block_size=4, num_blocks=80, max_num_batched_tokens=16), eos_id=None
    )
    g = torch.Generator().manual_seed(5)
    prefix = torch.randint(2, 300, (24,), generator=g).tolist()
    prompts = {"a": prefix + [5, 6], "b": torch.randint(2, 300, (7,), generator=g).tolist()}
    for rid, p in prompts.items():
        core.add_request(rid, p, SamplingParams(temperature=0.0, max_tokens=6))
    got = run_all(core)
    for rid, p in prompts.items():
        assert got[rid] == alone(model, p, 6)
    # a later request sharing the 24-token prefix computes only the rest
    core.add_request("c", prefix + [9], SamplingParams(temperature=0.0, max_tokens=3))
    outs = []
    while core.has_work():
        outs += core.step()
    assert outs[-1].cached_tokens == 24 and outs[-1].prompt_tokens == 25
    core.pool.assert_no_leaks()


def test_stop_token_and_max_tokens(model):
    core = EngineCore(model, EngineConfig(block_size=4, num_blocks=40), eos_id=None)
    prompt = [3, 4, 5, 6]
    first = alone(model, prompt, 3)
    core.add_request("s", prompt, SamplingParams(temperature=0.0, max_tokens=10, stop_token_ids=[first[1]]))
    outs = []
    while core.has_work():
        outs += core.step()
    assert [o.new_token_ids[0] for o in outs] == first[:2] and outs[-1].finish_reason == "stop"
    core.add_request("m", prompt, SamplingParams(temperature=0.0, max_tokens=2))
    outs = [o for o in run_steps(core)]
    assert len(outs) == 2 and outs[-1].finish_reason == "length"
    core.pool.assert_no_leaks()


def run_steps(core):
    while core.has_work():
        yield from core.step()


def test_bad_requests_are_errors_not_crashes(model):
    core = EngineCore(model, EngineConfig(block_size=4, num_blocks=8, max_model_len=64), eos_id=None)
    with pytest.raises(EngineError, match="at least one token"):
        core.add_request("x", [], SamplingParams())
    with pytest.raises(EngineError, match="outside the vocabulary"):
        core.add_request("x", [5, 300], SamplingParams())
    for not_an_id in (5.0, "5", True):  # (a float passed the range check and then failed the whole step)
        with pytest.raises(EngineError, match="must be integers"):
            core.add_request("x", [5, not_an_id], SamplingParams())
    with pytest.raises(EngineError, match=r"max_tokens \(40\)"):
        core.add_request("x", [5] * 10, SamplingParams(max_tokens=40))  # cache holds 32 tokens
    with pytest.raises(EngineError, match=r"samples\(\)"):  # n samples are n requests (LLM, the API)
        core.add_request("x", [5], SamplingParams(n=2))
    with pytest.raises(EngineError, match="priority scheduling policy"):  # (this engine schedules fcfs)
        core.add_request("x", [5], SamplingParams(priority=1))
    core.add_request("x", [5], SamplingParams(max_tokens=2))
    with pytest.raises(EngineError, match="already in use"):
        core.add_request("x", [5], SamplingParams())
    assert core.abort("x") and not core.abort("x")
    core.pool.assert_no_leaks()


def test_seeded_sampling_is_reproducible_in_any_batch(model):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=8)

    def run(others: int) -> list[int]:
        core = EngineCore(model, EngineConfig(block_size=4, num_blocks=80), eos_id=None)
        core.add_request("seeded", [7, 8, 9], params)
        for i in range(others):
            core.add_request(f"o{i}", [10 + i, 11], SamplingParams(temperature=1.0, max_tokens=8))
        return run_all(core)["seeded"]

    assert run(0) == run(3)


def test_async_engine_streams_aborts_and_frees_blocks(model):
    core = EngineCore(model, EngineConfig(block_size=4, num_blocks=60), eos_id=None)
    engine = AsyncEngine(core, load_tokenizer(), max_waiting=64)

    async def idle_and_no_leaks():
        """Wait (up to a second) for the engine thread to take the abort; then every block is free."""
        for _ in range(100):
            if not core.has_work():
                break
            await asyncio.sleep(0.01)
        assert not core.has_work()
        core.pool.assert_no_leaks()

    async def main():
        async def collect(prompt, n):
            toks, text = [], ""
            async for out in engine.generate(prompt, SamplingParams(temperature=0.0, max_tokens=n)):
                toks += out.new_token_ids
                text += out.text
                last = out
            return toks, text, last

        results = await asyncio.gather(*(collect([20 + i, 30, 40], 5) for i in range(4)))
        for i, (toks, _, last) in enumerate(results):
            assert toks == alone(model, [20 + i, 30, 40], 5)
            assert last.finished and last.finish_reason == "length" and last.usage.completion_tokens == 5

        # leaving the stream early aborts the request and frees its blocks
        agen = engine.generate([50, 51], SamplingParams(temperature=0.0, max_tokens=40))
        await agen.__anext__()
        await agen.aclose()
        await idle_and_no_leaks()

        # closing a stream that another task is waiting on (the API's merged streams of n samples) ends
        # that task's iteration instead of leaving it waiting forever
        stream = await engine.submit([60, 61], SamplingParams(temperature=0.0, max_tokens=200))
        waiting = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0)
        await stream.aclose()
        try:
            await asyncio.wait_for(waiting, 10)
        except StopAsyncIteration:
            pass  # (or the output that came first)
        await idle_and_no_leaks()

        with pytest.raises(EngineError, match="outside the vocabulary"):
            async for _ in engine.generate([999], SamplingParams()):
                pass

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()


def test_async_engine_queue_limit(model):
    core = EngineCore(model, EngineConfig(block_size=4, num_blocks=60), eos_id=None)
    engine = AsyncEngine(core, load_tokenizer(), max_waiting=0)

    async def main():
        with pytest.raises(QueueFullError):
            async for _ in engine.generate([5, 6], SamplingParams()):
                pass

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()


def test_2k_token_prefix_is_served_from_the_cache(model):
    core = EngineCore(
        model, EngineConfig(block_size=16, num_blocks=400, max_num_batched_tokens=4096), eos_id=None
    )
    g = torch.Generator().manual_seed(9)
    prefix = torch.randint(2, 300, (2048,), generator=g).tolist()
    core.add_request("first", prefix + [11, 12, 13], SamplingParams(temperature=0.0, max_tokens=2))
    first = list(run_steps(core))
    assert first[-1].cached_tokens == 0
    computed: list[int] = []  # tokens run through the model per step
    hook = model.model.embed_tokens.register_forward_hook(lambda m, i, o: computed.append(i[0].numel()))
    try:
        core.add_request("second", prefix + [21, 22], SamplingParams(temperature=0.0, max_tokens=2))
        second = list(run_steps(core))
    finally:
        hook.remove()
    assert second[-1].cached_tokens == 2048 and second[-1].prompt_tokens == 2050
    assert computed == [2, 1]  # only the 2 new prompt tokens, then one decode step
    assert second[0].new_token_ids == alone(model, prefix + [21, 22], 1)
    core.pool.assert_no_leaks()


def test_stop_string_across_token_boundaries(model):
    from dsv32.engine.outputs import OutputProcessor

    tok = load_tokenizer()

    def run(params):
        core = EngineCore(model, EngineConfig(block_size=4, num_blocks=60), eos_id=None)
        proc = OutputProcessor(tok)
        core.add_request("r", [40, 50, 60], params)
        proc.add("r", params)
        outs = []
        while core.has_work():
            outs += proc.process(core, core.step())
        return outs

    free = run(SamplingParams(temperature=0.0, max_tokens=12))
    text = "".join(o.text for o in free)
    pieces = [tok.decode([t.new_token_ids[0]]) for t in free]
    # a stop string that starts inside token 3 and ends inside token 5
    start = len("".join(pieces[:3])) - 1
    stop = text[start : start + len(pieces[3]) + 2]
    assert len(stop) >= 3
    outs = run(SamplingParams(temperature=0.0, max_tokens=12, stop=[stop]))
    assert "".join(o.text for o in outs) == text[: text.index(stop)]
    assert outs[-1].finish_reason == "stop" and outs[-1].stop_sequence == stop


def test_stop_strings_armed_by_a_token_see_only_the_text_after_it(model):
    """``stop_strings_after``: the API arms stop strings with ``</think>`` so they apply to the content, not
    the reasoning. The output processor gets the tokens of a thinking reply (the real tokenizer's), two a
    step as speculative decoding brings them: a stop string in the reasoning does not stop; one in the
    content does, even when it starts in the step that brings ``</think>``."""
    from dsv32.engine.core import TokenOutput
    from dsv32.engine.outputs import OutputProcessor

    tok = load_tokenizer()
    think_end = tok.token_id("</think>")
    ids = tok.encode("Step one: add. Done.</think>Done. The sum is 42. Done.", allow_special=True)
    core = EngineCore(model, EngineConfig(block_size=4, num_blocks=8), eos_id=None)

    def run(params):
        proc = OutputProcessor(tok)
        proc.add("r", params)
        outs = []
        for i in range(0, len(ids), 2):
            last = i + 2 >= len(ids)
            step = TokenOutput("r", ids[i : i + 2], None, last, "length" if last else None, 5, i + 2, 0)
            outs += proc.process(core, [step])
            if outs[-1].finished:
                break
        return "".join(o.text for o in outs), outs[-1]

    text, end = run(SamplingParams(stop=["Done."], stop_strings_after=think_end))
    assert text == "Step one: add. Done.</think>" and end.finish_reason == "stop"
    assert end.usage.completion_tokens == ids.index(think_end) + 3  # through the "Done" "." that matched
    text, end = run(SamplingParams(stop=["add.", "42"], stop_strings_after=think_end))
    assert text == "Step one: add. Done.</think>Done. The sum is " and end.stop_sequence == "42"
    text, end = run(SamplingParams(stop=["add."], stop_strings_after=think_end))
    assert text == tok.decode(ids) and end.finish_reason == "length"
    text, end = run(SamplingParams(stop=["add."]))  # unarmed: the whole text
    assert text == "Step one: " and end.stop_sequence == "add."
    # a stray </think> in the content (the chat parser drops it) hides no stop string from the matcher
    # (it used to: "The sum" + </think> + " is" never matched "sum is")
    ids[:] = tok.encode("Step one.</think>The sum</think> is 42. Done.", allow_special=True)
    skip = ("</think>",)
    text, end = run(SamplingParams(stop=["sum is"], stop_strings_after=think_end, stop_skip=skip))
    assert text == "Step one.</think>The " and end.stop_sequence == "sum is"
    text, end = run(SamplingParams(stop=["sum is"], stop_skip=skip))  # chat mode: not armed
    assert text == "Step one.The " and end.stop_sequence == "sum is"


@pytest.mark.slow
def test_default_model_engine_equals_its_own_forward_past_index_topk():
    """The model `dsv32 serve` runs (4 index heads, index_topk 64: index scores tie at exactly 0 often):
    five requests of 33-260 tokens, chunked prefill and batched decodes, give the greedy tokens of the
    plain forward (before ties were broken by position, 3 of these 5 parted, one at its first token)."""
    import dsv32
    from dsv32.weights.default_model import ensure_default_model

    model = dsv32.load_model(ensure_default_model(), dtype=torch.float32, progress=False)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 128000, (n,), generator=g).tolist() for n in (70, 150, 260, 33, 199)]
    core = EngineCore(
        model,
        EngineConfig(num_blocks=256, block_size=16, max_num_seqs=8, max_num_batched_tokens=96),
        eos_id=None,
    )
    for i, p in enumerate(prompts):
        core.add_request(str(i), p, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    outs: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while core.has_work():
        for o in core.step():
            outs[o.request_id] += o.new_token_ids
    for i, p in enumerate(prompts):
        assert outs[str(i)] == alone(model, p, 12), f"request {i} ({len(p)} tokens)"
    core.pool.assert_no_leaks()


def test_identical_prompts_arriving_together_compute_their_prefix_once(model):
    """Four requests with one 38-token prompt (n samples of it, or a burst with one system prompt) and one
    other, added together: the prompt runs through the model once plus each later copy's last partial block,
    the copies report the shared blocks as cached, greedy copies equal running alone, seeded ones their own
    seed's output, and nothing leaks."""
    core = EngineCore(
        model, EngineConfig(block_size=4, num_blocks=80, max_num_batched_tokens=64), eos_id=None
    )
    g = torch.Generator().manual_seed(3)
    shared = torch.randint(2, 300, (38,), generator=g).tolist()
    other = torch.randint(2, 300, (5,), generator=g).tolist()
    computed: list[int] = []  # tokens run through the model per step
    hook = model.model.embed_tokens.register_forward_hook(lambda m, i, o: computed.append(i[0].numel()))
    greedy = SamplingParams(temperature=0.0, max_tokens=4)
    seeded = [SamplingParams(temperature=1.0, seed=s, max_tokens=4) for s in (1, 2)]
    try:
        for rid, p, sp in [("g0", shared, greedy), ("g1", shared, greedy), ("s1", shared, seeded[0]),
                           ("s2", shared, seeded[1]), ("o", other, greedy)]:  # fmt: skip
            core.add_request(rid, list(p), sp)
        outs = list(run_steps(core))
    finally:
        hook.remove()
    toks: dict[str, list[int]] = {}
    cached = {}
    for o in outs:
        toks.setdefault(o.request_id, []).extend(o.new_token_ids)
        cached[o.request_id] = o.cached_tokens
    assert toks["g0"] == toks["g1"] == alone(model, shared, 4) and toks["o"] == alone(model, other, 4)
    assert cached == {"g0": 0, "g1": 36, "s1": 36, "s2": 36, "o": 0}
    # prompts: 38 + 3 x 2 + 5 tokens; then 4 decodes... less the last token of each of the five
    assert sum(computed) == 38 + 3 * 2 + 5 + 5 * 3
    for rid, sp in (("s1", seeded[0]), ("s2", seeded[1])):  # a seed's draws do not depend on the batch
        solo = EngineCore(model, EngineConfig(block_size=4, num_blocks=40), eos_id=None)
        solo.add_request(rid, list(shared), sp)
        assert [t for o in run_steps(solo) for t in o.new_token_ids] == toks[rid]
    core.pool.assert_no_leaks()


def _alone_banned(model, prompt: list[int], n: int, banned: list[int], until: int) -> list[int]:
    """Greedy from the plain forward, ``banned`` tokens impossible for the first ``until`` outputs."""
    ids = list(prompt)
    with torch.no_grad():
        for k in range(n):
            logits = model(torch.tensor([ids]))[0, -1]
            if k < until:
                logits[banned] = float("-inf")
            ids.append(int(logits.argmax()))
    return ids[len(prompt) :]


def test_min_tokens_holds_back_stop_tokens_and_stop_strings(model):
    """vLLM's ``min_tokens``: until that many tokens are out a stop token cannot be sampled (the output is
    greedy with it banned) and stop strings do not match; after that both stop as usual."""
    from dsv32.engine.outputs import OutputProcessor

    tok = load_tokenizer()

    def run(params, prompt):
        core = EngineCore(model, EngineConfig(block_size=4, num_blocks=60), eos_id=None)
        proc = OutputProcessor(tok)
        core.add_request("r", prompt, params)
        proc.add("r", params)
        outs = []
        while core.has_work():
            outs += proc.process(core, core.step())
        core.pool.assert_no_leaks()
        return outs

    prompt = [3, 4, 5, 6]
    first = alone(model, prompt, 3)
    stop_ids = [first[1]]  # without min_tokens the request stops at its second token
    for min_tokens in (0, 3):
        outs = run(
            SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=stop_ids, min_tokens=min_tokens),
            prompt,
        )
        got = [t for o in outs for t in o.new_token_ids]
        ref = _alone_banned(model, prompt, 12, stop_ids, min_tokens)
        end = next((i + 1 for i, t in enumerate(ref) if t in stop_ids and i >= min_tokens), 12)
        assert got == ref[:end] and len(got) > min_tokens, (min_tokens, got, ref)
        assert outs[-1].finish_reason == ("stop" if end < 12 else "length")
    assert len(run(SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=stop_ids), prompt)) == 2
    # a stop string that the first token's text completes: matched at once, or only in the text after the
    # first min_tokens tokens
    free = run(SamplingParams(temperature=0.0, max_tokens=10), [40, 50, 60])
    pieces = [o.text for o in free]
    stop = pieces[0].strip() or pieces[0]
    assert (
        stop and run(SamplingParams(temperature=0.0, max_tokens=10, stop=[stop]), [40, 50, 60])[-1].text == ""
    )
    outs = run(SamplingParams(temperature=0.0, max_tokens=10, stop=[stop], min_tokens=2), [40, 50, 60])
    text, rest = "".join(o.text for o in outs), "".join(pieces[2:])
    expected = "".join(pieces[:2]) + (rest[: rest.index(stop)] if stop in rest else rest)
    assert text == expected and outs[-1].finish_reason == ("stop" if stop in rest else "length")


def test_rows_past_the_tokenizers_ids_are_never_sampled_nor_accepted():
    """A checkpoint pads its vocabulary (129,280 rows against the tokenizer's 128,815 ids): with the
    tokenizer attached, the padding rows' ids are never sampled, even where their logits are the largest,
    and are refused in prompts, logit_bias and stop_token_ids: every id emitted can be sent back."""
    from dsv32.model.transformer import DeepseekForCausalLM
    from tests.model.oracle import randomize_
    from tests.model.test_forms import tiny_config

    tok = load_tokenizer()
    torch.manual_seed(0)
    m = DeepseekForCausalLM(tiny_config(vocab_size=tok.vocab_size + 64)).eval()
    randomize_(m, seed=3)
    with torch.no_grad():
        m.lm_head.weight[tok.vocab_size :] *= 100  # the padding rows would win every argmax
    core = EngineCore(m, EngineConfig(block_size=4, num_blocks=32, max_model_len=64), eos_id=None)
    core.add_request("before", [5, 6, 7], SamplingParams(max_tokens=4, temperature=0.0))
    assert all(t >= tok.vocab_size for t in run_all(core)["before"])  # no tokenizer: every row is an id
    core.attach_tokenizer(tok)
    core.add_request("greedy", [5, 6, 7], SamplingParams(max_tokens=8, temperature=0.0))
    core.add_request(
        "sampled",
        [5, 6, 7],
        SamplingParams(max_tokens=8, temperature=1.0, seed=1, logprobs=True, top_logprobs=5),
    )
    out, tops = {}, []
    for o in run_steps(core):
        out.setdefault(o.request_id, []).extend(o.new_token_ids)
        tops += [t for lp in o.logprobs or [] for t, _ in lp["top"]]
    assert all(t < tok.vocab_size for ids in out.values() for t in ids) and len(out["sampled"]) == 8
    assert len(tops) == 40 and max(tops) < tok.vocab_size  # nor offered among the top logprobs
    pad = tok.vocab_size
    for bad in ([5, pad], None):
        params = SamplingParams(logit_bias={pad: 100.0}) if bad is None else SamplingParams()
        with pytest.raises((EngineError, ValueError), match=str(pad)):
            core.add_request("x", bad or [5], params)
    with pytest.raises((EngineError, ValueError), match=str(pad)):
        core.add_request("x", [5], SamplingParams(stop_token_ids=[pad]))
    core.pool.assert_no_leaks()
