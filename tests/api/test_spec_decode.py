"""The real server with speculative decoding on: through the openai SDK, the same replies as without it
(text, stop strings, logprobs, JSON mode, streaming), and the accepted drafts counted in ``/metrics``."""

from __future__ import annotations

import httpx
import openai
import pytest

from dsv32.api.service import ServingContext
from dsv32.engine.async_engine import AsyncEngine
from dsv32.engine.core import EngineConfig, EngineCore
from tests.api.server_harness import RunningServer
from tests.engine.test_metrics import samples
from tests.engine.test_spec_decode import oracle_mtp_model


@pytest.fixture(scope="module")
def servers(tokenizer):
    """(plain, speculative): two servers on one model whose MTP drafts are nearly always right."""
    model = oracle_mtp_model(vocab_size=tokenizer.vocab_size)
    running = []
    for spec in (0, 1):
        core = EngineCore(
            model, EngineConfig(block_size=16, num_blocks=512, num_speculative_tokens=spec),
            eos_id=tokenizer.eos_id,
        )  # fmt: skip
        ctx = ServingContext(engine=AsyncEngine(core, tokenizer), tokenizer=tokenizer, family="v3.2",
                             max_model_len=4096, served_model_name="oracle", eos_id=tokenizer.eos_id)  # fmt: skip
        running.append(RunningServer(ctx))
    with running[0] as plain, running[1] as spec:
        yield plain, spec
    for srv in running:
        srv.ctx.engine.shutdown()


def chat(srv, **kw):
    client = openai.OpenAI(base_url=srv.url, api_key="unused")
    messages = [{"role": "user", "content": "Count the ways."}]
    return client.chat.completions.create(model="oracle", messages=messages, temperature=0, **kw)


def streamed(srv, **kw) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chat(srv, stream=True, **kw) if c.choices)


def test_replies_equal_those_without_drafts(servers):
    plain, spec = servers
    a, b = chat(plain, max_tokens=40), chat(spec, max_tokens=40)
    assert b.choices[0].message.content == a.choices[0].message.content
    assert b.usage.completion_tokens == a.usage.completion_tokens == 40
    text = a.choices[0].message.content
    assert streamed(spec, max_tokens=40) == text

    # A stop string that the first token of a two-token step completes ends the reply at that token. With
    # every draft accepted, steps bring tokens 0, then 1-2, 3-4, ...: stop on the text of an odd token.
    pieces = [t.token for t in chat(plain, max_tokens=40, logprobs=True).choices[0].logprobs.content]
    assert "".join(pieces) == text
    j = next(
        j for j in range(3, 40, 2)
        if pieces[j].strip() and text.find(pieces[j]) == len("".join(pieces[:j]))
    )  # fmt: skip
    stop = pieces[j]
    a, b = chat(plain, max_tokens=40, stop=[stop]), chat(spec, max_tokens=40, stop=[stop])
    assert b.choices[0].message.content == a.choices[0].message.content == "".join(pieces[:j])
    assert (
        b.choices[0].finish_reason == "stop"
        and b.usage.completion_tokens == a.usage.completion_tokens == j + 1
    )
    assert streamed(spec, max_tokens=40, stop=[stop]) == "".join(pieces[:j])

    a, b = (
        chat(plain, max_tokens=12, logprobs=True, top_logprobs=2),
        chat(spec, max_tokens=12, logprobs=True, top_logprobs=2),
    )
    la, lb = a.choices[0].logprobs.content, b.choices[0].logprobs.content
    assert [t.token for t in lb] == [t.token for t in la] and len(lb) == 12
    assert [t.logprob for t in lb] == pytest.approx([t.logprob for t in la], abs=1e-4)

    fmt = {"type": "json_object"}
    a, b = chat(plain, max_tokens=30, response_format=fmt), chat(spec, max_tokens=30, response_format=fmt)
    assert b.choices[0].message.content == a.choices[0].message.content

    s = samples(httpx.get(spec.url + "/metrics").content)
    drafted = s[("dsv32:spec_decode_num_draft_tokens_total", ())]
    accepted = s[("dsv32:spec_decode_num_accepted_tokens_total", ())]
    assert accepted >= 0.5 * drafted > 0
    # one draft a step: as many drafted steps as draft tokens, and every acceptance at position 0
    assert s[("dsv32:spec_decode_num_drafts_total", ())] == drafted
    assert s[("dsv32:spec_decode_num_accepted_tokens_per_pos_total", (("position", "0"),))] == accepted
    spec.ctx.engine.core.pool.assert_no_leaks()
