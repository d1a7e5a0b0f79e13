"""vLLM's /tokenize and /detokenize through the real server: the ids the chat route feeds the engine, text
prompts with and without BOS, the round trip, and their errors."""

from __future__ import annotations

import httpx
import pytest

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}  # fmt: skip
MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris? <think>"}]


def test_tokenize_gives_the_ids_the_chat_route_runs(scripted_server, tokenizer):
    url = scripted_server.url
    for model, extra in (("deepseek-chat", {}), ("deepseek-reasoner", {}),
                         ("deepseek-chat", {"chat_template_kwargs": {"thinking": True}})):  # fmt: skip
        httpx.post(url + "/chat/completions", json={"model": model, "messages": MSGS, "tools": [WEATHER],
                                                    "max_tokens": 2, **extra}, timeout=30)  # fmt: skip
        r = httpx.post(
            url + "/tokenize", json={"model": model, "messages": MSGS, "tools": [WEATHER], **extra}
        )
        assert r.status_code == 200, r.text
        assert r.json()["tokens"] == scripted_server.engine.prompts[-1]
        assert r.json()["count"] == len(r.json()["tokens"]) and r.json()["max_model_len"] == 4096
    # user text spelling a control token stays text, as in the chat prompt
    assert tokenizer.token_id("<think>") not in httpx.post(url + "/tokenize", json={"messages": MSGS[1:]}).json()[
        "tokens"][:-1]  # fmt: skip


def test_tokenize_text_and_detokenize(scripted_server, tokenizer):
    url = scripted_server.url
    text = "Hello, world! 你好"
    r = httpx.post(
        url + "/v1/tokenize", json={"model": "deepseek-chat", "prompt": text, "return_token_strs": True}
    )
    body = r.json()
    assert body["tokens"] == tokenizer.encode(text, add_bos=True) and body["tokens"][0] == tokenizer.bos_id
    assert body["token_strs"][0] == tokenizer.bos_token and len(body["token_strs"]) == body["count"]
    plain = httpx.post(url + "/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert plain["tokens"] == body["tokens"][1:] and plain["token_strs"] is None
    back = httpx.post(url + "/detokenize", json={"model": "deepseek-chat", "tokens": plain["tokens"]}).json()
    assert back == {"prompt": text}


@pytest.mark.parametrize(
    "path, body, status, words",
    [
        ("/tokenize", {"prompt": "x", "messages": MSGS}, 400, "either"),
        ("/tokenize", {}, 400, "either"),
        ("/tokenize", {"model": "gpt-4o", "prompt": "x"}, 400, "Model Not Exist"),
        ("/tokenize", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
        ("/tokenize", {"messages": MSGS, "add_generation_prompt": False}, 422, "add_generation_prompt"),
        ("/tokenize", {"messages": MSGS, "chat_template_kwargs": {"x": 1}}, 422, "chat_template_kwargs"),
        ("/detokenize", {"tokens": [1, 10**9]}, 422, "vocabulary"),
        ("/detokenize", {"tokens": ["a"]}, 422, "tokens"),
    ],
)  # fmt: skip
def test_tokenize_errors(scripted_server, path, body, status, words):
    r = httpx.post(scripted_server.url + path, json=body, timeout=30)
    assert r.status_code == status, r.text
    assert words.lower() in r.json()["error"]["message"].lower(), r.text
