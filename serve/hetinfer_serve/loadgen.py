"""A load generator for OpenAI-compatible servers (hetinfer serve, vLLM, llama.cpp ...), on
httpx and asyncio: tools/serve_bench.py and the CI load test both drive a server with it.

make_specs() draws a seeded, reproducible list of requests (completions with a token-id
prompt of an exact length, or chats of random words; streaming or not; output lengths; a few
that hang up mid-stream); run() sends them at a fixed concurrency (or Poisson arrivals) and
returns one Record per request (run_procs: the same, the clients spread over several
processes, so that the client's own parsing is never the limit); summarize() turns those into throughput, TTFT, TPOT,
inter-token latency and end-to-end percentiles and the failures."""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import httpx

WORDS = ("sea", "lamp", "river", "stone", "bread", "cloud", "train", "song", "garden", "winter", "clock",
         "letter", "window", "forest", "market", "bridge")


@dataclass
class Spec:
    index: int
    endpoint: str                        # "completions" (token-id prompt) or "chat" (text)
    stream: bool
    prompt: list | str
    max_tokens: int
    ignore_eos: bool = True
    disconnect_after: int | None = None  # hang up after this many text chunks (streaming only)

    def body(self, model: str, temperature: float) -> dict:
        b = {"model": model, "max_tokens": self.max_tokens, "temperature": temperature,
             "ignore_eos": self.ignore_eos, "stream": self.stream}
        if self.stream:
            b["stream_options"] = {"include_usage": True}
        if self.endpoint == "chat":
            b["messages"] = [{"role": "user", "content": self.prompt}]
        else:
            b["prompt"] = self.prompt
        return b


@dataclass
class Record:
    index: int
    endpoint: str
    stream: bool
    ok: bool = False                     # answered: 200, a finish_reason (and [DONE] when streaming)
    disconnected: bool = False           # hung up on purpose (not counted as answered or failed)
    status: int | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float | None = None          # first text chunk (streaming only)
    e2e_s: float | None = None
    itl_s: list = field(default_factory=list)
    error: str | None = None


def wait_until(pred, what: str, limit: float = 60.0) -> None:
    """Poll pred() every 50 ms until it is true; AssertionError naming `what` after limit s."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"gave up waiting: {what}")


def span(text: str) -> tuple[int, int]:
    """'128' -> (128, 128); '32:256' -> (32, 256)."""
    lo, _, hi = str(text).partition(":")
    lo, hi = int(lo), int(hi or lo)
    if not 1 <= lo <= hi:
        raise ValueError(f"a length or LO:HI range with 1 <= LO <= HI, got {text!r}")
    return lo, hi


def make_specs(num: int, seed: int = 0, input_len=(128, 128), output_len=(128, 128), chat_share: float = 0.0,
               stream_share: float = 1.0, disconnects: int = 0, ignore_eos: bool = True,
               token_ids=(1000, 20000)) -> list[Spec]:
    """num requests drawn from random.Random(seed): prompt lengths (tokens; words for chats) and
    max_tokens uniform in the given (lo, hi) spans; chat_share of them chats, stream_share
    streaming; `disconnects` of the streaming ones hang up after 1-3 chunks (those get
    ignore_eos and at least 48 tokens to make, so they are surely still running then)."""
    rng = random.Random(seed)
    specs = []
    for i in range(num):
        n_in, n_out = rng.randint(*input_len), rng.randint(*output_len)
        if rng.random() < chat_share:
            spec = Spec(i, "chat", False, " ".join(rng.choice(WORDS) for _ in range(n_in)), n_out, ignore_eos)
        else:
            spec = Spec(i, "completions", False, [rng.randrange(*token_ids) for _ in range(n_in)], n_out, ignore_eos)
        spec.stream = rng.random() < stream_share
        specs.append(spec)
    streaming = [s for s in specs if s.stream]
    for s in rng.sample(streaming, min(disconnects, len(streaming))):
        s.disconnect_after, s.ignore_eos, s.max_tokens = rng.randint(1, 3), True, max(s.max_tokens, 48)
    return specs


async def _send(client: httpx.AsyncClient, spec: Spec, model: str, temperature: float) -> Record:
    rec = Record(spec.index, spec.endpoint, spec.stream)
    path = "/v1/chat/completions" if spec.endpoint == "chat" else "/v1/completions"
    t0 = time.perf_counter()
    try:
        if not spec.stream:
            r = await client.post(path, json=spec.body(model, temperature))
            rec.status = r.status_code
            obj = r.json()
            if r.status_code != 200 or "error" in obj:
                rec.error = f"HTTP {r.status_code}: {obj.get('error', {}).get('message', r.text[:200])}"
                return rec
            rec.finish_reason = obj["choices"][0]["finish_reason"]
            rec.prompt_tokens = obj["usage"]["prompt_tokens"]
            rec.output_tokens = obj["usage"]["completion_tokens"]
        else:
            await _stream(client, path, spec, rec, model, temperature, t0)
            if rec.disconnected or rec.error:
                return rec
        rec.e2e_s = time.perf_counter() - t0
        rec.ok = rec.finish_reason in ("stop", "length")
        if not rec.ok:
            rec.error = f"no finish_reason (got {rec.finish_reason!r})"
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as e:
        rec.error = f"{type(e).__name__}: {e}"
    return rec


async def _stream(client, path, spec: Spec, rec: Record, model, temperature, t0) -> None:
    last, chunks, done = None, 0, False
    async with client.stream("POST", path, json=spec.body(model, temperature)) as r:
        rec.status = r.status_code
        if r.status_code != 200:
            rec.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
            return
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":       # read on to the end: the connection goes back to the pool
                done = True                  # (a response left unread is closed, and the next request
                continue                     # would pay for a new connection)
            obj = json.loads(line[6:])
            if "error" in obj:
                rec.error = obj["error"].get("message")
                return
            if obj.get("usage"):
                rec.prompt_tokens = obj["usage"]["prompt_tokens"]
                rec.output_tokens = obj["usage"]["completion_tokens"]
            for c in obj.get("choices", []):
                rec.finish_reason = c.get("finish_reason") or rec.finish_reason
                piece = c.get("text") if "text" in c else (c.get("delta") or {}).get("content")
                if piece:
                    now = time.perf_counter()
                    if last is None:
                        rec.ttft_s = now - t0
                    else:
                        rec.itl_s.append(now - last)
                    last, chunks = now, chunks + 1
            if spec.disconnect_after is not None and chunks >= spec.disconnect_after:
                rec.disconnected = True          # leaving the block closes the connection
                return
    if not done:
        rec.error = "the stream ended without [DONE]"


async def first_model(client: httpx.AsyncClient) -> str:
    r = await client.get("/v1/models")
    r.raise_for_status()
    return r.json()["data"][0]["id"]


def client_for(url: str, api_key: str | None = None, concurrency: int = 64, timeout: float = 600.0):
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    return httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout, limits=limits)


async def run(client: httpx.AsyncClient, specs: list[Spec], model: str, concurrency: int = 8,
              rate: float | None = None, temperature: float = 0.0, seed: int = 0):
    """Send every spec: `concurrency` clients each sending its next one when the last is
    answered, or (rate given) Poisson arrivals at `rate` requests/s. (records in spec order, wall s)."""
    records: dict[int, Record] = {}
    t0 = time.perf_counter()
    if rate:
        gaps = random.Random(seed)
        tasks = []
        for spec in specs:
            tasks.append(asyncio.create_task(_send(client, spec, model, temperature)))
            await asyncio.sleep(gaps.expovariate(rate))
        for rec in await asyncio.gather(*tasks):
            records[rec.index] = rec
    else:
        todo = iter(specs)

        async def worker():
            for spec in todo:
                records[spec.index] = await _send(client, spec, model, temperature)
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    return [records[s.index] for s in specs], wall


def default_procs(concurrency: int) -> int:
    """Client processes for a level: one per 8 clients, at most a quarter of the cores (one
    Python process parses about 8k SSE chunks/s through httpx, less than a fast server sends)."""
    return max(1, min((os.cpu_count() or 1) // 4, math.ceil(concurrency / 8)))


def _run_part(url, api_key, specs, model, concurrency, rate, temperature, seed, timeout, go_at=None):
    if go_at is not None:                       # the processes start together
        time.sleep(max(go_at - time.perf_counter(), 0))

    async def go():
        async with client_for(url, api_key, concurrency, timeout) as client:
            return await run(client, specs, model, concurrency, rate, temperature, seed)
    start = time.perf_counter()                 # CLOCK_MONOTONIC: one clock for all processes
    records, wall = asyncio.run(go())
    return records, start, start + wall


def run_procs(url: str, api_key: str | None, specs: list[Spec], model: str, concurrency: int = 8,
              procs: int = 1, rate: float | None = None, temperature: float = 0.0, seed: int = 0,
              timeout: float = 600.0):
    """run() with the clients spread over `procs` processes: process i sends specs[i::procs]
    with its share of the concurrency (or of the Poisson rate: the sum of the processes'
    arrivals is Poisson at `rate`). (records in spec order, wall s from the first start to the
    last end.)"""
    procs = max(1, min(procs, concurrency if not rate else len(specs), len(specs)))
    if procs == 1:
        records, start, end = _run_part(url, api_key, specs, model, concurrency, rate, temperature, seed, timeout)
        return records, end - start
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    shares = [concurrency // procs + (i < concurrency % procs) for i in range(procs)]
    go_at = time.perf_counter() + 2.0 + 0.2 * procs        # time for the processes to start
    with ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futs = [pool.submit(_run_part, url, api_key, specs[i::procs], model, shares[i],
                            rate / procs if rate else None, temperature, seed + i, timeout, go_at)
                for i in range(procs)]
        parts = [f.result() for f in futs]
    by_index = {r.index: r for recs, _, _ in parts for r in recs}
    wall = max(end for _, _, end in parts) - min(start for _, start, _ in parts)
    return [by_index[s.index] for s in specs], wall


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


async def metrics(client: httpx.AsyncClient) -> dict[str, float]:
    r = await client.get("/metrics")
    r.raise_for_status()
    return parse_metrics(r.text)


async def wait_idle(client: httpx.AsyncClient, limit: float = 60.0) -> dict[str, float]:
    """Poll /metrics until nothing runs or waits (aborts of hung-up requests land a step later);
    the last metrics read, idle or not after `limit` s."""
    end = time.monotonic() + limit
    while True:
        m = await metrics(client)
        if (m.get("hetinfer_running", 0) == 0 and m.get("hetinfer_waiting", 0) == 0) or time.monotonic() > end:
            return m
        await asyncio.sleep(0.1)


def pct(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def dist_ms(xs) -> dict:
    d = {f"p{q}": pct(xs, q) for q in (50, 90, 99)} | {"mean": sum(xs) / len(xs) if xs else None}
    return {k: None if v is None else round(v * 1e3, 3) for k, v in d.items()}


def summarize(records: list[Record], wall: float) -> dict:
    ok = [r for r in records if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    streamed = [r for r in ok if r.stream and r.ttft_s is not None]
    tpot = [(r.e2e_s - r.ttft_s) / (r.output_tokens - 1) for r in streamed if r.output_tokens > 1]
    return {
        "requests": len(records), "completed": len(ok), "disconnected": sum(r.disconnected for r in records),
        "failed": sum(not r.ok and not r.disconnected for r in records),
        "finish_reasons": dict(Counter(r.finish_reason for r in ok)),
        "duration_s": round(wall, 3), "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "output_tokens": out_tokens, "output_throughput_tok_s": round(out_tokens / wall, 2) if wall else None,
        "request_throughput_req_s": round(len(ok) / wall, 3) if wall else None,
        "ttft_ms": dist_ms([r.ttft_s for r in streamed]), "tpot_ms": dist_ms(tpot),
        "itl_ms": dist_ms([x for r in streamed for x in r.itl_s]), "e2e_ms": dist_ms([r.e2e_s for r in ok]),
        "errors": sorted({r.error for r in records if r.error})[:5],
    }


def record_line(r: Record) -> dict:
    """One request as a JSON-able dict (the inter-token gaps as a count)."""
    d = asdict(r)
    d["chunks"] = len(d.pop("itl_s")) + (r.ttft_s is not None)
    return d
