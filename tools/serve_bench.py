"""Load benchmark for an OpenAI-compatible server (hetinfer serve, vLLM, llama.cpp ...).

Fixed concurrency (N clients, each sending its next request when the last one ends) or
Poisson arrivals at --rate requests/s; prompts of --input-len random token ids (sent as a
token-id prompt to /v1/completions, so the length is exact) or --chat with a text prompt
of about that many words; --output-len tokens each (ignore_eos). Streams every request and
prints JSON lines: one per request with --per-request, then a summary line with output
throughput, TTFT, TPOT and inter-token latency (p50/p90/p99) and the failures.

    python tools/serve_bench.py --url http://127.0.0.1:8000 --concurrency 8 --num-requests 32 \\
        --input-len 128 --output-len 128
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time

import httpx


def pct(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def dist(xs, scale=1e3):
    return {f"p{q}": (None if pct(xs, q) is None else round(pct(xs, q) * scale, 3)) for q in (50, 90, 99)} | {
        "mean": None if not xs else round(sum(xs) / len(xs) * scale, 3)}


async def one(client, args, model, i, rng):
    if args.chat:
        words = " ".join(rng.choice(["sea", "lamp", "river", "stone", "bread", "cloud", "train", "song"])
                         for _ in range(args.input_len))
        path = "/v1/chat/completions"
        body = {"messages": [{"role": "user", "content": words}]}
    else:
        path = "/v1/completions"
        body = {"prompt": [rng.randrange(args.min_id, args.max_id) for _ in range(args.input_len)]}
    body |= {"model": model, "max_tokens": args.output_len, "temperature": args.temperature, "ignore_eos": True,
             "stream": True, "stream_options": {"include_usage": True}}
    rec = {"request": i, "ok": False, "ttft_s": None, "e2e_s": None, "output_tokens": 0, "itl_s": [], "error": None}
    t0 = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                rec["error"] = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                return rec
            done = False
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                obj = json.loads(data)
                if "error" in obj:
                    rec["error"] = obj["error"].get("message")
                    return rec
                if obj.get("usage"):
                    rec["output_tokens"] = obj["usage"]["completion_tokens"]
                for c in obj.get("choices", []):
                    piece = c.get("text") if "text" in c else (c.get("delta") or {}).get("content")
                    if piece:
                        now = time.perf_counter()
                        if last is None:
                            rec["ttft_s"] = now - t0
                        else:
                            rec["itl_s"].append(now - last)
                        last = now
            rec["e2e_s"] = time.perf_counter() - t0
            rec["ok"] = done and rec["ttft_s"] is not None
            if not rec["ok"] and rec["error"] is None:
                rec["error"] = "the stream ended without [DONE] or text"
    except (httpx.HTTPError, ValueError) as e:
        rec["error"] = f"{type(e).__name__}: {e}"
    return rec


async def run(args):
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency + 4, max_keepalive_connections=args.concurrency + 4)
    async with httpx.AsyncClient(base_url=args.url, headers=headers, timeout=args.timeout, limits=limits) as client:
        model = args.model
        if model is None:
            model = (await client.get("/v1/models")).json()["data"][0]["id"]
        rng = random.Random(args.seed)
        for w in range(args.warmup):
            await one(client, args, model, -1 - w, rng)
        records = []
        t0 = time.perf_counter()
        if args.rate:
            tasks = []
            for i in range(args.num_requests):
                tasks.append(asyncio.create_task(one(client, args, model, i, random.Random(args.seed + i))))
                await asyncio.sleep(rng.expovariate(args.rate))
            records = await asyncio.gather(*tasks)
        else:
            counter = iter(range(args.num_requests))

            async def worker():
                for i in counter:
                    records.append(await one(client, args, model, i, random.Random(args.seed + i)))
            await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        wall = time.perf_counter() - t0
    ok = [r for r in records if r["ok"]]
    if args.per_request:
        for r in sorted(records, key=lambda r: r["request"]):
            print(json.dumps({k: v for k, v in r.items() if k != "itl_s"} | {"chunks": len(r["itl_s"]) + 1}))
    out_tokens = sum(r["output_tokens"] for r in ok)
    tpot = [(r["e2e_s"] - r["ttft_s"]) / (r["output_tokens"] - 1) for r in ok if r["output_tokens"] > 1]
    summary = {
        "url": args.url, "model": model, "endpoint": "chat" if args.chat else "completions",
        "concurrency": None if args.rate else args.concurrency, "rate": args.rate,
        "input_len": args.input_len, "output_len": args.output_len,
        "requests": len(records), "completed": len(ok), "failed": len(records) - len(ok),
        "duration_s": round(wall, 3), "output_tokens": out_tokens,
        "output_throughput_tok_s": round(out_tokens / wall, 2), "request_throughput_req_s": round(len(ok) / wall, 3),
        "ttft_ms": dist([r["ttft_s"] for r in ok]), "tpot_ms": dist(tpot),
        "itl_ms": dist([x for r in ok for x in r["itl_s"]]), "e2e_ms": dist([r["e2e_s"] for r in ok]),
        "errors": sorted({r["error"] for r in records if r["error"]})[:5],
    }
    print(json.dumps(summary))
    return 0 if summary["failed"] == 0 else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default=None)
    p.add_argument("--model", default=None, help="default: the first of /v1/models")
    p.add_argument("--concurrency", type=int, default=8, help="clients in flight (fixed concurrency)")
    p.add_argument("--rate", type=float, default=None, help="Poisson arrivals at this many requests/s instead")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens (words with --chat)")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--chat", action="store_true", help="use /v1/chat/completions with a text prompt")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--min-id", type=int, default=1000, help="random prompt token ids from [min, max)")
    p.add_argument("--max-id", type=int, default=20000)
    p.add_argument("--warmup", type=int, default=1, help="requests sent (and not counted) first")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-request", action="store_true", help="also one JSON line per request")
    args = p.parse_args(argv)
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
