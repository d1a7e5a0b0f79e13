"""The offline API (``dsv32.LLM``): strings and token ids through one engine, one output per prompt."""

from __future__ import annotations

import pytest
import torch

import dsv32
from dsv32.engine.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def llm():
    return dsv32.LLM()  # the embedded default model


def _greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, **kw)


def test_strings_and_token_ids_give_the_same_outputs(llm):
    prompts = ["Hello", "The capital of France is", "def f(x):"]
    by_text = llm.generate(prompts, _greedy(6))
    ids = [llm.tokenizer.encode(p, add_bos=True) for p in prompts]
    by_ids = llm.generate(prompt_token_ids=ids, sampling_params=_greedy(6))
    assert [o.prompt_token_ids for o in by_text] == ids
    for a, b in zip(by_text, by_ids, strict=True):
        assert a.token_ids == b.token_ids and len(a.token_ids) == 6
        assert a.text == b.text == llm.tokenizer.decode(a.token_ids)
        assert a.finish_reason == "length"
    # batched through one engine, each output equals the prompt run alone
    assert llm.generate(prompts[1], _greedy(6))[0].token_ids == by_text[1].token_ids
    llm.engine.pool.assert_no_leaks()


def test_logprobs_when_asked(llm):
    out = llm.generate(["Hello"], _greedy(4, logprobs=True, top_logprobs=3))[0]
    assert len(out.logprobs) == 4
    for tok, lp in zip(out.token_ids, out.logprobs, strict=True):
        assert len(lp["top"]) == 3 and lp["top"][0][0] == tok  # greedy: the chosen token is the top one
        assert lp["logprob"] == pytest.approx(lp["top"][0][1])
    assert llm.generate(["Hello"], _greedy(2))[0].logprobs is None


def test_prompt_logprobs_when_asked(llm):
    """vLLM's ``prompt_logprobs``: one entry per prompt token (None for the first), each the raw
    distribution's logprob of that token with k alternatives; equal to the full forward's (over the
    tokenizer's ids: the checkpoint's padding rows past them are never emitted)."""
    out = llm.generate(["Hello there, world"], _greedy(1, prompt_logprobs=2))[0]
    ids = out.prompt_token_ids
    assert len(out.prompt_logprobs) == len(ids) and out.prompt_logprobs[0] is None
    with torch.no_grad():
        ref = torch.log_softmax(
            llm.model(torch.tensor([ids]))[0, :, : llm.tokenizer.vocab_size].float(), dim=-1
        )
    for p in range(1, len(ids)):
        e = out.prompt_logprobs[p]
        assert e["logprob"] == pytest.approx(ref[p - 1, ids[p]].item(), abs=1e-4) and len(e["top"]) == 2
    assert llm.generate(["Hello"], _greedy(1))[0].prompt_logprobs is None


def test_n_samples_of_each_prompt(llm):
    """``SamplingParams(n=k)`` (vLLM): each output holds k samples in ``.outputs`` (itself first); a seed
    gives sample i seed + i, so each sample is what that seed alone gives; greedy samples agree; the
    shared prompt is computed once (the others report its full blocks cached)."""
    prompts = ["Once upon a time there was a", "Hello"]
    outs = llm.generate(prompts, SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=5, ignore_eos=True))
    assert [len(o.outputs) for o in outs] == [3, 3]
    for o, prompt in zip(outs, prompts, strict=True):
        assert o.outputs[0] is o and [s.index for s in o.outputs] == [0, 1, 2]
        for i, sample in enumerate(o.outputs):
            assert sample.prompt_token_ids == o.prompt_token_ids and len(sample.token_ids) == 5
            alone = llm.generate(
                prompt, SamplingParams(temperature=1.0, seed=7 + i, max_tokens=5, ignore_eos=True)
            )
            assert sample.token_ids == alone[0].token_ids and sample.text == alone[0].text
        assert len({tuple(s.token_ids) for s in o.outputs}) > 1  # three seeds: not all the same sample
    fresh = "A prompt nobody asked for before, long enough to fill a few blocks of the cache: " * 3
    greedy = llm.generate(fresh, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, n=2))[0]
    assert greedy.outputs[0].token_ids == greedy.outputs[1].token_ids
    assert greedy.num_cached_tokens == 0 and greedy.outputs[1].num_cached_tokens > 0
    chat = llm.chat(
        [{"role": "user", "content": "Hi"}],
        SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, n=2),
    )[0]
    assert [s.message["content"] for s in chat.outputs] == [chat.message["content"]] * 2
    assert llm.generate("Hello", _greedy(2))[0].outputs[0].index == 0
    llm.engine.pool.assert_no_leaks()


def test_bad_calls_are_errors_and_leave_no_blocks(llm):
    with pytest.raises(ValueError, match="either prompts or prompt_token_ids"):
        llm.generate(["a"], _greedy(2), prompt_token_ids=[[1, 2]])
    with pytest.raises(ValueError, match="2 sampling_params for 1 prompts"):
        llm.generate(["a"], [_greedy(2), _greedy(2)])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate(prompt_token_ids=[[1, 2], [10**9]], sampling_params=_greedy(2))
    with pytest.raises(ValueError, match="must be integers"):  # (before: a torch error from inside the step)
        llm.generate(prompt_token_ids=[[1, 2], [0, 5.0, 6]], sampling_params=_greedy(2))
    zero = _greedy(2)
    zero.n = 0  # set after construction: refused, not an empty output
    with pytest.raises(ValueError, match="n must be"):
        llm.generate(prompt_token_ids=[[1, 2]], sampling_params=zero)
    llm.engine.pool.assert_no_leaks()
    assert llm.generate(prompt_token_ids=[[1, 2]], sampling_params=_greedy(2))[0].finish_reason == "length"


def test_inputs_as_vllm_users_give_them_and_clear_errors_otherwise(llm):
    """(Found by a fuzz of the offline API.) A flat id list is one prompt, as vLLM takes it; arrays and tensors
    are id lists; a tuple of SamplingParams is a list. A missing model directory is named as such (it was a
    chat-format error), and misshapen arguments are ValueErrors naming the argument, not errors from inside."""
    import numpy as np

    from dsv32.weights.loader import CheckpointError

    want = llm.generate(prompt_token_ids=[[0, 5, 6]], sampling_params=_greedy(3))[0].token_ids
    for ids in ([0, 5, 6], (0, 5, 6), np.array([0, 5, 6]), torch.tensor([[0, 5, 6]]), [np.array([0, 5, 6])]):
        assert llm.generate(prompt_token_ids=ids, sampling_params=_greedy(3))[0].token_ids == want
    two = llm.generate(["a", "b"], (_greedy(2), _greedy(3)))
    assert [len(o.token_ids) for o in two] == [2, 3]
    with pytest.raises(CheckpointError, match="/nonexistent/xyz does not exist"):
        dsv32.LLM(model="/nonexistent/xyz")
    with pytest.raises(ValueError, match="empty path"):
        dsv32.LLM(model="")
    for call, words in [
        (lambda: llm.generate("a", "greedy"), "sampling_params"),
        (lambda: llm.generate([["a"]], _greedy(2)), "prompts are strings"),
        (
            lambda: llm.generate(prompt_token_ids=[5, [6]], sampling_params=_greedy(2)),
            "each prompt is a list",
        ),
        (lambda: llm.generate(prompt_token_ids=[0, 1.0], sampling_params=_greedy(2)), "integers, got 1.0"),
        (lambda: llm.chat({"role": "user", "content": "hi"}), "messages: a list"),
        (lambda: dsv32.LLM(engine_config={"num_blocks": 8}), "engine_config"),
        (lambda: SamplingParams(stop_exempt=("<a>", "</a>")), "stop_exempt"),
        (
            lambda: llm.generate("a", _greedy(2, guided={"json_object": True, "start_token": 10**9})),
            "start_token",
        ),
    ]:
        with pytest.raises(ValueError, match=words):
            call()
    llm.engine.pool.assert_no_leaks()


def test_vllm_output_fields_and_constructor_arguments(llm):
    """What vLLM's outputs and ``LLM(...)`` have: ``prompt``, ``request_id``, ``finished``, ``stop_reason``
    (the stop string or stop token id, not EOS), ``cumulative_logprob``; ``LLM(max_model_len=...)`` caps the
    context; ``LLM(seed=...)`` makes requests without a seed reproducible; ``SamplingParams()`` gives 16 tokens."""
    free = llm.generate(["Hello"], _greedy(12, logprobs=True))[0]
    assert free.prompt == "Hello" and free.request_id and free.finished and free.stop_reason is None
    assert free.cumulative_logprob == pytest.approx(sum(lp["logprob"] for lp in free.logprobs))
    assert llm.generate(["Hello"], _greedy(2))[0].cumulative_logprob is None
    stop = llm.tokenizer.decode(free.token_ids[3:5])
    assert llm.generate(["Hello"], _greedy(12, stop=[stop]))[0].stop_reason == stop
    tid = free.token_ids[2]
    by_id = llm.generate(["Hello"], _greedy(12, stop_token_ids=[tid]))[0]
    assert by_id.stop_reason == tid and by_id.token_ids == free.token_ids[: free.token_ids.index(tid) + 1]
    assert llm.generate(prompt_token_ids=[[0, 5]], sampling_params=_greedy(1))[0].prompt is None
    assert len(llm.generate(["Hello"], SamplingParams(ignore_eos=True))[0].token_ids) == 16
    short, again = dsv32.LLM(max_model_len=32, seed=3), dsv32.LLM(max_model_len=32, seed=3)
    sampled = SamplingParams(max_tokens=6, temperature=1.0, ignore_eos=True)
    first = [o.token_ids for o in short.generate(["Hi", "Yo"], sampled)]
    assert first == [o.token_ids for o in again.generate(["Hi", "Yo"], sampled)]
    assert first != [o.token_ids for o in short.generate(["Hi", "Yo"], sampled)]  # (the next seeds)
    assert short.engine.max_model_len == 32
    with pytest.raises(ValueError, match="32"):
        short.generate(prompt_token_ids=[[0] + [5] * 40], sampling_params=_greedy(1))


def test_extreme_sampling_values_stay_in_the_vocabulary(llm):
    """A temperature that float32 rounds to 0 (it used to draw an id past the vocabulary, then crash the next
    step) samples at 0.01, as vLLM; a repetition penalty whose division overflows keeps its logits finite."""
    for kw in ({"temperature": 1e-46}, {"temperature": 3e-39, "top_p": 0.9}, {"repetition_penalty": 1e-39},
               {"repetition_penalty": 1e-39, "top_a": 0.5, "temperature": 0.7}):  # fmt: skip
        out = llm.generate(["Hello"], SamplingParams(max_tokens=4, seed=0, ignore_eos=True, **kw))[0]
        assert len(out.token_ids) == 4 and all(0 <= t < llm.tokenizer.vocab_size for t in out.token_ids), kw
    llm.engine.pool.assert_no_leaks()


def test_prompt_logprobs_are_over_the_ids_the_engine_emits(llm):
    """The checkpoint's padding rows (past the tokenizer's ids) are neither alternatives nor in the normaliser:
    a prompt token's logprob equals the logprob generation gave the same token in the same context."""
    prompt = llm.tokenizer.encode("The capital of France is", add_bos=True)
    gen = llm.generate(prompt_token_ids=[prompt], sampling_params=_greedy(1, logprobs=True, top_logprobs=3))[
        0
    ]
    scored = llm.generate(
        prompt_token_ids=[prompt + gen.token_ids], sampling_params=_greedy(1, prompt_logprobs=20)
    )[0]
    last = scored.prompt_logprobs[-1]
    assert last["logprob"] == pytest.approx(gen.logprobs[0]["logprob"], abs=1e-4) and last["rank"] == 1
    for entry in scored.prompt_logprobs[1:]:
        assert all(t < llm.tokenizer.vocab_size for t, _ in entry["top"])


def _contains(ids: list[int], seq: list[int]) -> bool:
    return any(ids[i : i + len(seq)] == seq for i in range(len(ids) - len(seq) + 1))


def test_allowed_token_ids_bad_words_and_kept_stop_strings(llm):
    """vLLM's ``allowed_token_ids``, ``bad_words`` and ``include_stop_str_in_output`` through the engine and
    its tokenizer."""
    prompt = ["The capital of France is"]
    free = llm.generate(prompt, _greedy(24))[0]
    allowed = sorted(set(free.token_ids[::2]))[:3] + [15, 16]
    only = llm.generate(prompt, _greedy(12, allowed_token_ids=allowed))[0]
    assert only.token_ids and set(only.token_ids) <= set(allowed)
    sampled = llm.generate(
        prompt, SamplingParams(max_tokens=12, seed=3, ignore_eos=True, allowed_token_ids=allowed)
    )
    assert set(sampled[0].token_ids) <= set(allowed)
    # a word the free output writes (two of its tokens): never written once banned, in either spelling
    word = llm.tokenizer.decode(free.token_ids[4:6])
    seqs = [llm.tokenizer.encode(w) for w in (word.lstrip(), " " + word.lstrip())]
    assert any(_contains(free.token_ids, s) for s in seqs)
    clean = llm.generate(prompt, _greedy(24, bad_words=[word]))[0]
    assert not any(_contains(clean.token_ids, s) for s in seqs), (word, seqs, clean.token_ids)
    assert clean.token_ids[:4] == free.token_ids[:4]  # the same output up to where the word began
    # a stop string spanning tokens: cut before it, or kept as the end of the text
    stop = free.text[len(llm.tokenizer.decode(free.token_ids[:7])) - 2 :][:5]
    at = free.text.index(stop)
    cut = llm.generate(prompt, _greedy(24, stop=[stop]))[0]
    kept = llm.generate(prompt, _greedy(24, stop=[stop], include_stop_str_in_output=True))[0]
    assert cut.text == free.text[:at] and kept.text == free.text[: at + len(stop)]
    assert cut.finish_reason == kept.finish_reason == "stop" and cut.token_ids == kept.token_ids
    with pytest.raises(ValueError, match="allowed_token_ids"):
        llm.generate(prompt, _greedy(2, allowed_token_ids=[10**7]))
    # bans that leave no token (the allowed tokens are all bad words): the
    # request ends there, with what it had, instead of sampling an id past the vocabulary (a crashed step)
    a, b = free.token_ids[0], free.token_ids[1]
    words = [llm.tokenizer.decode([a]), llm.tokenizer.decode([b])]
    for kw in ({"temperature": 0.0}, {"temperature": 0.8, "seed": 2}):
        none = llm.generate(
            prompt, SamplingParams(max_tokens=8, allowed_token_ids=[a], bad_words=words, **kw)
        )[0]
        assert (none.token_ids, none.text, none.finish_reason) == ([], "", "stop")
    llm.engine.pool.assert_no_leaks()


def test_chat_renders_like_the_server_and_parses_the_reply(llm):
    from dsv32.chat import ChatFormatError, encode_prompt
    from dsv32.chat.tokens import THINK_START

    convs = [[{"role": "user", "content": "Hi"}], [{"role": "system", "content": "Be brief."},
                                                   {"role": "user", "content": "Why?"}]]  # fmt: skip
    outs = llm.chat(convs, _greedy(6))
    ids = [encode_prompt(c, family="v3.2", tokenizer=llm.tokenizer) for c in convs]
    assert llm.chat_format == "v3.2" and [o.prompt_token_ids for o in outs] == ids
    assert [o.token_ids for o in outs] == [
        o.token_ids for o in llm.generate(prompt_token_ids=ids, sampling_params=_greedy(6))
    ]
    for o in outs:  # no thinking: the reply is content
        assert o.message == {
            "role": "assistant",
            "reasoning_content": None,
            "content": o.text,
            "tool_calls": [],
        }

    one = llm.chat(convs[0], _greedy(6), thinking=True)  # one conversation: one output
    assert len(one) == 1 and llm.tokenizer.decode(one[0].prompt_token_ids).endswith(THINK_START)
    # a reply that never closes its thinking is all reasoning
    assert one[0].message["reasoning_content"] == one[0].text and not one[0].message["content"]
    same = llm.chat(convs[0], _greedy(6), chat_template_kwargs={"thinking": True})  # vLLM's spelling
    assert same[0].token_ids == one[0].token_ids

    with pytest.raises(ValueError, match="only 'thinking'"):
        llm.chat(convs[0], _greedy(2), chat_template_kwargs={"enable_thinking": True})
    with pytest.raises(ChatFormatError):
        llm.chat([{"role": "wizard", "content": "x"}], _greedy(2))
    llm.engine.pool.assert_no_leaks()


def test_speculative_config_gives_the_same_outputs(llm):
    spec = dsv32.LLM(speculative_config={"method": "mtp", "num_speculative_tokens": 1})
    prompts = ["Hello", "The capital of France is"]
    # top_k keeps the draw off float noise: over this random model's near-flat 129K-token distribution the
    # inverse CDF can move with the last bits of the logits, which the batch's shape (two rows a request) sets
    params = SamplingParams(temperature=0.8, top_k=20, seed=7, max_tokens=8, ignore_eos=True)
    assert [o.token_ids for o in spec.generate(prompts, params)] == [
        o.token_ids for o in llm.generate(prompts, params)
    ]
    # bans hold at every verified depth: the drafts that write a banned token are rejected
    free = llm.generate(prompts, _greedy(12))
    banned = _greedy(12, bad_words=[llm.tokenizer.decode(free[1].token_ids[3:5])])
    allowed = _greedy(12, allowed_token_ids=sorted(set(free[0].token_ids[::3])))
    for p in (banned, allowed):
        got = [o.token_ids for o in spec.generate(prompts, p)]
        assert got == [o.token_ids for o in llm.generate(prompts, p)]
        assert got != [o.token_ids for o in free]  # (the bans changed the outputs)
    assert spec.engine.num_speculative_tokens == 1 and spec.engine.stats()["spec_draft_tokens"] > 0
    spec.engine.pool.assert_no_leaks()
    with pytest.raises(ValueError, match="num_speculative_tokens must be"):
        dsv32.LLM(speculative_config='{"method": "mtp", "num_speculative_tokens": 9}')


def test_priority_orders_prompts_under_the_priority_policy():
    """vLLM's ``priority`` argument: with one sequence at a time, the lower value runs first (its first token
    is out before the other is admitted); the default first-come-first-served engine refuses it."""
    from dsv32.engine.core import EngineConfig

    llm = dsv32.LLM(engine_config=EngineConfig(max_num_seqs=1, scheduling_policy="priority"))
    outs = llm.generate(["first", "second"], _greedy(2), priority=[5, -5])
    assert [o.token_ids for o in outs] == [
        llm.generate(p, _greedy(2))[0].token_ids for p in ("first", "second")
    ]
    order = []
    for rid, p, prio in (("a", [0, 11, 12], 5), ("b", [0, 21, 22], -5)):
        llm.engine.add_request(rid, p, _greedy(2, priority=prio))
    while llm.engine.has_work():
        order += [o.request_id for o in llm.engine.step() if o.finished]
    assert order == ["b", "a"]
    with pytest.raises(Exception, match="priority scheduling policy"):
        dsv32.LLM().generate(["x"], _greedy(1), priority=[1])
