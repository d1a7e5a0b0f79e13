"""``GET /metrics``: the engine's Prometheus metrics through the real server, counted as the API's usage."""

from __future__ import annotations

import httpx
import openai

from tests.engine.test_metrics import samples


def test_metrics_count_what_usage_reports(engine_server):
    client = openai.OpenAI(base_url=engine_server.url, api_key="unused")
    messages = [{"role": "user", "content": "Tell me about caches. " * 20}]
    usages = [client.chat.completions.create(model="deepseek-chat", messages=messages, max_tokens=4).usage
              for _ in range(2)]  # fmt: skip
    assert usages[1].prompt_cache_hit_tokens > 0  # the second one hit the prefix cache
    r = httpx.get(engine_server.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    s = samples(r.content)
    assert s[("dsv32:prompt_tokens_total", ())] == sum(u.prompt_tokens for u in usages)
    assert s[("dsv32:prompt_tokens_cached_total", ())] == sum(u.prompt_cache_hit_tokens for u in usages)
    assert s[("dsv32:generation_tokens_total", ())] == sum(u.completion_tokens for u in usages)
    assert s[("dsv32:time_to_first_token_seconds_count", ())] == 2
    finished = sum(v for (name, _), v in s.items() if name == "dsv32:request_success_total")
    assert finished == 2
    assert s[("dsv32:num_requests_running", ())] == 0
