"""Load benchmark for an OpenAI-compatible server (hetinfer serve, vLLM, llama.cpp ...).

Against --url, or (no --url) it starts `hetinfer serve` itself on a free localhost port with
--model/--device/--dtype and the engine knobs below, and stops it at the end. Requests come
from hetinfer_serve.loadgen: seeded random prompt and output lengths (--input-len and
--output-len take N or LO:HI), token-id prompts to /v1/completions (exact lengths) and/or
chats of random words (--chat-share), streaming (--stream-share; TTFT and TPOT need it),
sent by --concurrency clients (a comma list runs each level) or Poisson arrivals at --rate,
spread over --client-procs processes (one Python client parses about 8k chunks/s, less than
a fast server streams).
Prints JSON lines: one per request with --per-request, one summary per level (output
tokens/s, TTFT, TPOT, inter-token and end-to-end latency p50/p90/p99, failures); --offline
adds the engine's own batched figure for the same requests (LLM.generate, in this process,
after the server it started has stopped). cpu_s_per_s: CPU seconds per second of the run of
the client processes, the server's HTTP process and its engine core (one near 1.0 is the limit).

    python tools/serve_bench.py --device cuda --dtype f16 --model qwen2.5-0.5b --concurrency 16,64 \\
        --num-requests 256 --input-len 128 --output-len 128 --offline
    python tools/serve_bench.py --url http://127.0.0.1:8000 --concurrency 8 --input-len 32:256
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import sys
import time

from hetinfer_serve import loadgen


def serve_args(args, concurrency: int) -> list[str]:
    out = ["--device", args.device, "--dtype", args.dtype, "--max-num-seqs", str(concurrency),
           "--max-queued", str(max(256, concurrency))]
    for flag, v in (("--model", args.model), ("--max-context", args.max_context),
                    ("--kv-cache-memory", args.kv_cache_memory), ("--api-key", args.api_key),
                    ("--weights", args.weights)):
        if v is not None:
            out += [flag, str(v)]
    return out + (["--eager"] if args.eager else []) + list(args.serve_arg)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (Linux /proc; None elsewhere or when gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def core_pid(lines: list[str]) -> int | None:
    """The engine core's pid, from the server's "loading the model in the engine process (pid N)"."""
    for line in lines:
        m = re.search(r"engine process \(pid (\d+)\)", line)
        if m:
            return int(m.group(1))
    return None


def cpu_snapshot(server_pid: int | None, engine_pid: int | None) -> dict:
    """CPU seconds of this client (with its finished client processes), and of the server
    started here and its engine core process: which process is the limit shows as ~1 s/s."""
    ru = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    out = {"client": sum(r.ru_utime + r.ru_stime for r in ru)}
    if server_pid is not None:
        out["http"] = cpu_seconds(server_pid)
        out["core"] = cpu_seconds(engine_pid) if engine_pid is not None else None
    return out


async def drive(args, url: str, concurrency: int, specs, server_pid: int | None = None,
                engine_pid: int | None = None) -> dict:
    async with loadgen.client_for(url, args.api_key, concurrency, args.timeout) as client:
        model = args.served_model or await loadgen.first_model(client)
        for w in loadgen.make_specs(args.warmup, args.seed + 10**6, loadgen.span(args.input_len), (8, 8)):
            await loadgen.run(client, [w], model, 1)
        before = await loadgen.metrics(client) if args.hetinfer_metrics else {}
        procs = args.client_procs or loadgen.default_procs(concurrency)
        cpu0 = cpu_snapshot(server_pid, engine_pid)
        records, wall = await asyncio.to_thread(loadgen.run_procs, url, args.api_key, specs, model, concurrency,
                                                procs, args.rate, args.temperature, args.seed, args.timeout)
        cpu1 = cpu_snapshot(server_pid, engine_pid)
        after = await loadgen.wait_idle(client) if args.hetinfer_metrics else {}
    if args.per_request:
        for r in records:
            print(json.dumps(loadgen.record_line(r)), flush=True)
    summary = {"url": url, "model": model, "concurrency": None if args.rate else concurrency, "rate": args.rate,
               "client_procs": procs,
               "input_len": args.input_len, "output_len": args.output_len, "seed": args.seed}
    summary |= loadgen.summarize(records, wall)
    summary["cpu_s_per_s"] = {k: round((cpu1[k] - cpu0[k]) / wall, 3) if cpu1.get(k) is not None and
                              cpu0.get(k) is not None and wall else None for k in cpu1}
    if after:
        summary["server"] = {k: after.get(f"hetinfer_{k}", 0) - before.get(f"hetinfer_{k}", 0)
                             for k in ("preemptions_total", "prompt_tokens_total", "generation_tokens_total",
                                       "graph_captures_total", "eager_steps_total")}
        for k in ("time_to_first_token_seconds", "core_time_to_first_token_seconds", "core_step_seconds",
                  "core_first_token_step_seconds"):                                   # means, as the server saw them
            d = {x: after.get(f"hetinfer_{k}_{x}", 0) - before.get(f"hetinfer_{k}_{x}", 0) for x in ("sum", "count")}
            summary["server"][k.replace("seconds", "mean_ms")] = (round(1e3 * d["sum"] / d["count"], 3)
                                                                  if d["count"] else None)
    return summary


def offline(args, concurrency: int, specs) -> dict:
    """The same requests through the engine directly, all given at once (LLM.generate)."""
    from hetinfer import LLM, SamplingParams

    opts = {"max_num_seqs": concurrency}
    if args.kv_cache_memory:
        from hetinfer.cli import _bytes
        opts["kv_cache_memory"] = _bytes(args.kv_cache_memory)
    if args.weights:
        opts["weights"] = args.weights
    llm = LLM(args.model, args.device, args.dtype, args.max_context, eager=args.eager, **opts)
    prompts = [s.prompt if s.endpoint == "completions" else
               llm.tokenizer.encode(llm.chat_template.render([{"role": "user", "content": s.prompt}]), add_bos=False)
               for s in specs]
    params = [SamplingParams(max_tokens=s.max_tokens, ignore_eos=s.ignore_eos, temperature=args.temperature,
                             seed=args.seed + s.index) for s in specs]
    llm.engine.warm_up()                                   # the step graphs, as the server captures them
    llm.generate(prompts[:1], SamplingParams(max_tokens=8))                     # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    wall = time.perf_counter() - t0
    n = sum(len(o.token_ids) for o in outs)
    return {"offline": True, "device": args.device, "dtype": args.dtype, "weights": args.weights,
            "max_num_seqs": concurrency,
            "requests": len(outs), "output_tokens": n, "duration_s": round(wall, 3),
            "output_throughput_tok_s": round(n / wall, 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default=None, help="a running server (default: start hetinfer serve here)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--served-model", default=None, help="the model id to send (default: the first of /v1/models)")
    g = p.add_argument_group("the server this tool starts (no --url)")
    g.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct")
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", default="f32")
    g.add_argument("--max-context", type=int, default=None)
    g.add_argument("--kv-cache-memory", default=None, help="e.g. 4G")
    g.add_argument("--weights", choices=["packed", "dequantize"], default=None,
                   help="a GGUF's packed blocks kept or widened to --dtype (server and --offline)")
    g.add_argument("--eager", action="store_true")
    g.add_argument("--serve-arg", action="append", default=[], help="one more hetinfer serve argument (repeat)")
    g.add_argument("--offline", action="store_true", help="also the engine's offline batched figure")
    g = p.add_argument_group("the load")
    g.add_argument("--concurrency", default="8", help="clients in flight; a comma list runs each (8)")
    g.add_argument("--rate", type=float, default=None, help="Poisson arrivals at this many requests/s instead")
    g.add_argument("--num-requests", type=int, default=32)
    g.add_argument("--input-len", default="128", help="prompt tokens (words for chats): N or LO:HI")
    g.add_argument("--output-len", default="128", help="max_tokens: N or LO:HI")
    g.add_argument("--token-ids", default="1000:20000", help="range LO:HI the prompt token ids are drawn from")
    g.add_argument("--chat-share", type=float, default=0.0, help="share of chats (0: all completions)")
    g.add_argument("--stream-share", type=float, default=1.0, help="share of streaming requests")
    g.add_argument("--no-ignore-eos", action="store_true", help="let requests end at EOS")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--warmup", type=int, default=1, help="requests sent (and not counted) first")
    g.add_argument("--client-procs", type=int, default=None,
                   help="processes the clients are spread over (default: one per 8 clients, at most cores/4)")
    g.add_argument("--timeout", type=float, default=600.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--per-request", action="store_true", help="also one JSON line per request")
    g.add_argument("--no-hetinfer-metrics", dest="hetinfer_metrics", action="store_false",
                   help="do not read /metrics (for servers other than hetinfer)")
    args = p.parse_args(argv)
    if args.url and args.offline and not args.model:
        p.error("--offline with --url needs --model (the checkpoint the server runs)")
    levels = [int(c) for c in args.concurrency.split(",")]
    specs = loadgen.make_specs(args.num_requests, args.seed, loadgen.span(args.input_len),
                               loadgen.span(args.output_len), args.chat_share, args.stream_share,
                               ignore_eos=not args.no_ignore_eos, token_ids=loadgen.span(args.token_ids))
    failed = 0
    for c in levels:
        if args.url:
            summary = asyncio.run(drive(args, args.url, c, specs))
        else:
            from hetinfer_serve.proc import ServeProcess
            with ServeProcess(*serve_args(args, c), ready_timeout=900, echo=sys.stderr) as srv:
                summary = asyncio.run(drive(args, srv.url, c, specs, srv.proc.pid, core_pid(srv.lines)))
        print(json.dumps(summary), flush=True)
        failed += summary["failed"]
        if args.offline:
            print(json.dumps(offline(args, c, specs)), flush=True)
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
