"""The web playground: its page and script are served without an API key, and the page's own script, run
in Node against the real server, streams a reply equal to the API's."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from dsv32.api.service import ServingContext
from dsv32.engine.async_engine import AsyncEngine
from dsv32.engine.core import EngineConfig, EngineCore
from dsv32.weights.loader import load_model
from tests.api.server_harness import RunningServer
from tests.engine.test_metrics import samples

PAGE_DRIVER = Path(__file__).with_name("playground_page.js")
KEY = "sk-playground"


@pytest.fixture(scope="module")
def keyed_server(default_model_dir, tokenizer):
    model = load_model(default_model_dir, dtype=torch.float32, progress=False)
    core = EngineCore(model, EngineConfig(block_size=16, num_blocks=256), eos_id=tokenizer.eos_id)
    ctx = ServingContext(engine=AsyncEngine(core, tokenizer), tokenizer=tokenizer, family="v3.2",
                         max_model_len=4096, served_model_name="dsv32-default", eos_id=tokenizer.eos_id,
                         api_keys=[KEY])  # fmt: skip
    with RunningServer(ctx) as srv:
        yield srv
    ctx.engine.shutdown()


def test_page_and_script_are_served_without_a_key(keyed_server):
    url = keyed_server.url
    page = httpx.get(url + "/playground")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="/playground/playground.js">' in page.text
    script = httpx.get(url + "/playground/playground.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    root = httpx.get(url + "/")
    assert root.status_code == 307 and root.headers["location"] == "/playground"
    # with a trailing slash, the redirect to the page (it used to be a 401 where a key is set)
    slash = httpx.get(url + "/playground/", follow_redirects=True)
    assert slash.status_code == 200 and slash.text == page.text
    # the page is open; what it calls is not (a trailing slash opens nothing)
    assert httpx.post(url + "/chat/completions", json={}).status_code == 401
    assert httpx.get(url + "/stats/").status_code == httpx.get(url + "/models/").status_code == 401
    # every element the script looks up is on the page
    ids = set(re.findall(r'\sid="([^"]+)"', page.text))
    assert set(re.findall(r'\$\("([^"]+)"\)', script.text)) <= ids


@pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js to run the page's script")
def test_the_page_streams_the_same_reply_as_the_api(keyed_server):
    run = subprocess.run(["node", str(PAGE_DRIVER), keyed_server.url, KEY, "Hello there"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    shown = json.loads(run.stdout)
    client = openai.OpenAI(base_url=keyed_server.url, api_key=KEY)
    ref = client.chat.completions.create(
        model="deepseek-chat",
        messages=[{"role": "user", "content": "Hello there"}],
        temperature=0,
        max_tokens=12,
    )
    assert [m["className"] for m in shown["log"]] == ["msg user", "msg assistant"]
    assert shown["log"][0]["text"] == "Hello there"
    assert shown["log"][1]["text"] == ref.choices[0].message.content
    assert "finish: length" in shown["status"] and "completion 12" in shown["status"]
    assert shown["model"] == "dsv32-default" and not shown["sendDisabled"]
    assert shown["stored"] == {"dsv32-api-key": KEY}


@pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js to run the page's script")
def test_the_page_shows_the_api_error(keyed_server):
    run = subprocess.run(["node", str(PAGE_DRIVER), keyed_server.url, "sk-wrong", "Hello"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    shown = json.loads(run.stdout)
    assert "Authentication Fails" in shown["log"][1]["text"] and not shown["sendDisabled"]


@pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js to run the page's script")
def test_stop_aborts_the_request_on_the_server(keyed_server):
    run = subprocess.run(["node", str(PAGE_DRIVER), keyed_server.url, KEY, "Write a long story", "2000", "stop"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    shown = json.loads(run.stdout)
    assert "stopped" in shown["log"][1]["text"] and not shown["sendDisabled"]
    # the reply streamed so far stays on the page (Stop used to leave only "stopped")
    assert shown["beforeStop"] and shown["log"][1]["text"].startswith(shown["beforeStop"]), shown
    for _ in range(100):  # the server notices the closed stream and aborts the request
        stats = httpx.get(keyed_server.url + "/stats", headers={"Authorization": f"Bearer {KEY}"}).json()
        if stats["running"] == 0 and stats["waiting"] == 0:
            break
        time.sleep(0.05)
    assert stats["running"] == 0 and stats["free_blocks"] == stats["total_blocks"]
    aborted = samples(httpx.get(keyed_server.url + "/metrics").content)
    assert aborted[("dsv32:request_success_total", (("finished_reason", "abort"),))] >= 1


@pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js to run the page's script")
def test_sse_reader_takes_any_chunking(tmp_path):
    script = tmp_path / "sse.js"
    script.write_text(
        f"const pg = require({json.dumps(str(Path(__file__).parents[2] / 'dsv32/api/playground/playground.js'))});\n"
        + r"""
const stream = ": keep-alive\n\ndata: {\"choices\":[{\"delta\":{\"reasoning_content\":\"th\"}}]}\r\n\r\n"
  + "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\",\"tool_calls\":[{\"index\":0,\"id\":\"c\",\"function\":{\"name\":\"f\",\"arguments\":\"{\\\"a\\\"\"}}]}}]}\n\n"
  + "data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\":1}\"}}]},\"finish_reason\":\"tool_calls\"}],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\n\n"
  + "data: [DONE]\n\n";
const results = [];
for (const size of [1, 2, 7, stream.length]) {
  const reader = new pg.SSEReader();
  const reply = pg.newReply();
  const seen = [];
  for (let i = 0; i < stream.length; i += size) {
    for (const d of reader.feed(stream.slice(i, i + size))) { seen.push(d); if (d !== "[DONE]") pg.applyChunk(reply, JSON.parse(d)); }
  }
  results.push({ seen: seen.length, reply });
}
console.log(JSON.stringify(results));
"""
    )
    run = subprocess.run(["node", str(script)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    for r in json.loads(run.stdout):
        assert r["seen"] == 4  # three chunks and [DONE]; the keep-alive comment is no event
        reply = r["reply"]
        assert (
            reply["reasoning"] == "th" and reply["content"] == "Hi" and reply["finishReason"] == "tool_calls"
        )
        assert reply["toolCalls"] == [{"id": "c", "name": "f", "arguments": '{"a":1}'}]
        assert reply["usage"] == {"prompt_tokens": 3, "completion_tokens": 2}
