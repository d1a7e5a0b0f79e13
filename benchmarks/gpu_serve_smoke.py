"""Part of the prepared GPU check (gpu_check.sh): `dsv32 serve --device cuda` answers over HTTP.

Standard library only (the GPU machine has no openai / anthropic SDKs): starts the server on the embedded
model, then asks for a plain completion, a JSON-mode completion with logprobs, a streamed one, a request
that must get a 400, and a long greedy prompt twice (the second mostly from the prefix cache: its prefill
starts past position 0) that must give the same text; prints what came back and exits non-zero on a surprise.
Extra arguments go to `dsv32 serve` (e.g. `--compile --max-model-len 400 --max-num-seqs 2`).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request

from dsv32.api.server import free_port


def _post(url: str, body: dict) -> tuple[int, bytes]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def main(device: str = "cuda", *serve_args: str) -> int:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable,
        "-m",
        "dsv32.cli",
        "serve",
        "--device",
        device,
        "--dtype",
        "bf16",
        "--port",
        str(port),
        *serve_args,
    ]
    server = subprocess.Popen(cmd)
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"{base}/v1/models", timeout=1).read()
                break
            except OSError:
                if server.poll() is not None:
                    print(f"server exited with {server.returncode}")
                    return 1
                time.sleep(0.5)
        else:
            print("server did not come up in 300 s")
            return 1
        msgs = [{"role": "user", "content": "Say hello."}]
        checks = [
            ("plain", {"model": "deepseek-chat", "messages": msgs, "max_tokens": 8}, 200),
            (
                "json+logprobs",
                {
                    "model": "deepseek-chat",
                    "messages": msgs,
                    "max_tokens": 12,
                    "logprobs": True,
                    "top_logprobs": 3,
                    "response_format": {"type": "json_object"},
                },
                200,
            ),  # fmt: skip
            ("stream", {"model": "deepseek-chat", "messages": msgs, "max_tokens": 8, "stream": True}, 200),
            ("bad", {"model": "deepseek-chat", "messages": [], "max_tokens": 8}, 400),
        ]
        ok = True
        for name, body, want in checks:
            t0 = time.perf_counter()
            status, raw = _post(f"{base}/v1/chat/completions", body)
            dt = time.perf_counter() - t0
            text = raw.decode(errors="replace")
            print(f"== {name}: HTTP {status} in {dt:.2f}s\n{text[:600]}")
            ok &= status == want
        long = [{"role": "user", "content": "Count the words: " + "alpha beta gamma " * 100}]
        texts = []
        for i in range(2):
            body = {"model": "deepseek-chat", "messages": long, "max_tokens": 8, "temperature": 0}
            t0 = time.perf_counter()
            status, raw = _post(f"{base}/v1/chat/completions", body)
            dt = time.perf_counter() - t0
            out = json.loads(raw) if status == 200 else {}
            texts.append(out.get("choices", [{}])[0].get("message", {}).get("content"))
            print(
                f"== long greedy #{i}: HTTP {status} in {dt:.2f}s, usage {out.get('usage')}, text {texts[-1]!r}"
            )
            ok &= status == 200
        ok &= texts[0] == texts[1]
        return 0 if ok else 1
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
