"""`python tools/bench.py --device cuda`: the CUDA decode/prefill benchmark.

Random weights with real model shapes (made on the device by a hash fill kernel, so
nothing the size of the weights ever exists on the host), f16, batch 1: a 32-token
prompt then 256 new tokens through hetinfer's Generator (CUDA graphs unless --eager).
One JSON line per case:

  decode_tok_s          Generator.stats (the first decode step runs eagerly and the
                        second is captured into a graph: both are inside this figure)
  decode_tok_s_steady   the same run, from the 4th new token on (graph replays only)
  weight_bytes, roofline_pct = decode_tok_s_steady x weight_bytes / read bandwidth
  prefill_ms            one forward over a 512-token prompt (median of 3, synchronised)
  peak_bytes            the allocator's peak during the case, against weights + KV cache

The read bandwidth is measured in the same run (a 2 GiB read-only reduction kernel;
also a device-to-device copy, counting bytes read plus written). With --anchor PATH the
PyTorch anchor (../shared/bench/torch_anchor.py) runs afterwards in its own process on
the same shapes, and a line per model gives the ratios ours / anchor.

    python tools/bench.py --device cuda [--models a,b] [--prompt 32] [--new 256]
                          [--prefill 512] [--eager] [--anchor .carry/torch_anchor.py]
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time

import numpy as np

# dim, ffn, layers, heads, kv_heads, vocab, qkv_bias, tied_embeddings, rope_theta
# (as torch_anchor.py SHAPES)
SHAPES = {
    "smollm2-135m":   (576, 1536, 30, 9, 3, 49152, False, True, 100000.0),
    "qwen2.5-0.5b":   (896, 4864, 24, 14, 2, 151936, True, True, 1000000.0),
    "tinyllama-1.1b": (2048, 5632, 22, 32, 4, 32000, False, False, 10000.0),
    "llama3.2-1b":    (2048, 8192, 16, 32, 8, 128256, False, True, 500000.0),
    "llama2-7b":      (4096, 11008, 32, 32, 32, 32000, False, False, 10000.0),
}
DEFAULT_MODELS = "smollm2-135m,qwen2.5-0.5b,tinyllama-1.1b,llama3.2-1b,llama2-7b"


class _NoTokenizer:
    eos_ids: list = []
    bos_id = None


def shape_config(name: str, max_position: int = 4096):
    from hetinfer.config import ModelConfig
    dim, ffn, layers, heads, kv, vocab, bias, tied, theta = SHAPES[name]
    return ModelConfig(architecture="Qwen2ForCausalLM" if bias else "LlamaForCausalLM",
                       vocab_size=vocab, hidden_size=dim, intermediate_size=ffn, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv, head_dim=dim // heads,
                       rope_theta=theta, max_position_embeddings=max_position, tie_word_embeddings=tied,
                       attention_bias=bias, rms_norm_eps=1e-5)


def random_model(config, dtype="f16", device="cuda", max_context: int = 1024, seed: int = 0,
                 quantize: str | None = None, quantize_head: bool = False):
    """A Llama/Qwen2 model of config's shapes with hashed uniform weights made on the device:
    linear weights in +-sqrt(3/K) (unit variance through each product), embeddings in
    +-1, norm weights 1. quantize="int8": the linear weights are int8 (hashed bytes) with
    f16 scales per group of 64 (embeddings and output head stay in dtype, as hetinfer.quant);
    quantize="q4_k", "q8_0" ...: the linear weights are packed GGUF blocks of random bytes;
    quantize_head: an untied output head packed too (as in GGUF files of one type: llama.cpp's
    `llama-quantize --pure`; its Q4_K_M keeps the head in Q6_K), else it stays in dtype."""
    import hetinfer as hi
    from hetinfer.tensor import Tensor
    from hetinfer_models.llama import Layer, LlamaForCausalLM, Qwen2ForCausalLM
    from .kernels import fill_uniform
    c = config
    seeds = iter(range(seed * 100003, seed * 100003 + 100000))

    def rnd(shape, a):
        t = hi.empty(shape, dtype, device)
        fill_uniform(t, -a, a, next(seeds))
        return t

    def ones(n):
        t = hi.empty((n,), dtype, device)
        fill_uniform(t, 1.0, 1.0, 0)
        return t

    D, F, Dh = c.hidden_size, c.intermediate_size, c.head_dim
    nq, nkv = c.num_attention_heads * Dh, c.num_key_value_heads * Dh
    lin = lambda n, k: rnd((n, k), (3.0 / k) ** 0.5)   # noqa: E731

    def lin8(n, k, group=64):
        """(int8 weight, f16 scales): random bytes (an f16 hash fill seen as int8) and scales
        that keep each product near unit variance."""
        q = hi.empty((n, k), "i8", device)
        fill_uniform(Tensor(q.buffer, (n * k // 2,), hi.f16), -1.0, 1.0, next(seeds))
        sc = hi.empty((n, k // group), "f16", device)
        fill_uniform(sc, 0.5 * (3.0 / k) ** 0.5 / 64, (3.0 / k) ** 0.5 / 64, next(seeds))
        return q, sc

    rng = np.random.default_rng(seed)

    def lin_packed(n, k):
        """A packed (GGUF block) weight of format `quantize`: random quant bytes made on the host,
        every f16 scale field set so that a product keeps about unit variance."""
        from hetinfer.packed import fmt, from_blocks
        f = fmt(quantize)
        raw = rng.integers(0, 256, size=(n, k // f.block, f.nbytes), dtype=np.uint8)   # (N, K // block, bytes)
        scale = np.frombuffer(np.float16((3.0 / k) ** 0.5 / 8).tobytes(), np.uint8)
        for off in f.scales:
            raw[:, :, off:off + 2] = scale
        return from_blocks(raw.view(hi.dtype(f.name).np).reshape(n, k // f.block), f.name, device)

    layers = []
    for _ in range(c.num_hidden_layers):
        if quantize not in (None, "int8"):
            wqkv, wo, wgu, wd = lin_packed(nq + 2 * nkv, D), lin_packed(D, nq), lin_packed(2 * F, D), lin_packed(D, F)
            sqkv = so = sgu = sd = None
        elif quantize == "int8":
            (wqkv, sqkv), (wo, so), (wgu, sgu), (wd, sd) = (lin8(nq + 2 * nkv, D), lin8(D, nq),
                                                           lin8(2 * F, D), lin8(D, F))
        else:
            wqkv, wo, wgu, wd = lin(nq + 2 * nkv, D), lin(D, nq), lin(2 * F, D), lin(D, F)
            sqkv = so = sgu = sd = None
        layers.append(Layer(attn_norm=ones(D), wqkv=wqkv,
                            bqkv=rnd((nq + 2 * nkv,), 0.1) if c.attention_bias else None,
                            wo=wo, mlp_norm=ones(D), w_gate_up=wgu, w_down=wd,
                            wqkv_scales=sqkv, wo_scales=so, w_gate_up_scales=sgu, w_down_scales=sd,
                            qkv_rows=(nq, nkv, nkv)))
    embed = rnd((c.vocab_size, D), 1.0)
    if c.tie_word_embeddings:
        lm_head = embed
    elif quantize_head and quantize not in (None, "int8"):
        lm_head = lin_packed(c.vocab_size, D)
    else:
        lm_head = lin(c.vocab_size, D)
    cls = Qwen2ForCausalLM if c.attention_bias else LlamaForCausalLM
    return cls(c, layers, embed, ones(D), lm_head, device, dtype, max_context)


# ---------------------------------------------------------------- timing helpers
class _Events:
    def __init__(self, dev):
        from . import driver as D
        self.D, self.dev = D, dev
        drv = D._drv()
        self.a = D.check(drv.cuEventCreate(0), "cuEventCreate")
        self.b = D.check(drv.cuEventCreate(0), "cuEventCreate")

    def start(self):
        self.D.check(self.D._drv().cuEventRecord(self.a, self.dev.stream), "cuEventRecord")

    def stop_ms(self) -> float:
        drv = self.D._drv()
        self.D.check(drv.cuEventRecord(self.b, self.dev.stream), "cuEventRecord")
        self.D.check(drv.cuEventSynchronize(self.b), "cuEventSynchronize")
        return float(self.D.check(drv.cuEventElapsedTime(self.a, self.b), "cuEventElapsedTime"))


def bandwidth(device="cuda") -> dict:
    """Read bandwidth (a read-only reduction over 2 GiB, 16-byte loads) and device copy
    bandwidth (1 GiB -> 1 GiB, bytes read + written), medians of 10 in GB/s."""
    import hetinfer as hi
    from . import driver as D
    from .kernels import _dev, _grid_1d, _launch, _p, fill_uniform
    from .driver import Arg
    buf = hi.empty((1 << 30,), "f16", device)               # 2 GiB
    fill_uniform(buf, -1.0, 1.0, 7)
    sink = hi.empty((1,), "i32", device)
    dev = _dev(buf)
    ev = _Events(dev)
    n16 = buf.nbytes // 16

    def read():
        _launch(dev, "f32", "read_sum", (dev.sm_count * 8,), (512,),
                [Arg.ptr(_p(buf)), Arg.i64(n16), Arg.ptr(_p(sink))])
    times = []
    for i in range(13):
        ev.start()
        read()
        ms = ev.stop_ms()
        if i >= 3:
            times.append(ms)
    read_gbs = buf.nbytes / (np.median(times) / 1e3) / 1e9
    half = buf.nbytes // 2
    drv = D._drv()
    ctimes = []
    for i in range(13):
        ev.start()
        D.check(drv.cuMemcpyDtoDAsync(_p(buf) + half, _p(buf), half, dev.stream), "cuMemcpyDtoDAsync")
        ms = ev.stop_ms()
        if i >= 3:
            ctimes.append(ms)
    copy_gbs = 2 * half / (np.median(ctimes) / 1e3) / 1e9
    del buf, sink
    return {"case": "bandwidth", "read_GB_s": round(read_gbs, 1), "copy_rw_GB_s": round(copy_gbs, 1),
            "read_bytes": 1 << 31, "device": dev.name}


def _free_all(device="cuda"):
    from hetinfer.device import get_allocator
    gc.collect()
    alloc = get_allocator(device)
    alloc.synchronize()
    alloc.empty_cache()
    alloc.reset_peak()
    return alloc


def bench_case(name: str, args, read_gbs: float, device="cuda") -> dict:
    import hetinfer as hi
    from hetinfer.engine import Generator
    alloc = _free_all(device)
    before = alloc.stats()["allocated"]
    max_ctx = max(args.prompt + args.new + 8, args.prefill + 8)
    cfg = shape_config(name, max_position=max(4096, max_ctx))
    t0 = time.perf_counter()
    model = random_model(cfg, args.dtype, device, max_context=max_ctx, quantize=args.quantize,
                         quantize_head=args.quantize_head)
    alloc.synchronize()
    build_s = time.perf_counter() - t0
    gen = Generator(model, _NoTokenizer(), max_ctx, graphs=not args.eager)
    rng = np.random.default_rng(0)
    ids = [int(i) for i in rng.integers(0, cfg.vocab_size, args.prompt)]
    list(gen.generate(ids[:8], max_new_tokens=8, stop_ids=[]))                 # warm-up
    runs = []
    for _ in range(args.repeat):
        stamps = []
        for _tok in gen.generate(ids, max_new_tokens=args.new + 1, stop_ids=[]):
            stamps.append(time.perf_counter())
        st = gen.stats
        steady = (len(stamps) - 4) / (stamps[-1] - stamps[3]) if len(stamps) > 8 else 0.0
        runs.append((st.decode_tok_s, steady, st.prefill_s))
    decode = float(np.median([r[0] for r in runs]))
    steady = float(np.median([r[1] for r in runs]))
    # prefill of a longer prompt: one forward (one sequence, paged), synchronised
    from hetinfer.engine.kv_cache import PagedKVCache
    from hetinfer.engine.step import StepInput
    kv1 = PagedKVCache.for_tokens(model, args.prefill)
    p_step = StepInput.single(rng.integers(0, cfg.vocab_size, args.prefill).tolist(), 0, kv1.block_size).to(device)
    pt = []
    for _ in range(4):
        alloc.synchronize()
        t = time.perf_counter()
        model.forward(p_step, kv1)
        alloc.synchronize()
        pt.append(time.perf_counter() - t)
    prefill_ms = float(np.median(pt[1:])) * 1e3
    try:
        bd = decode_breakdown(model, kv1, args.prompt + args.new // 2, device)
    except Exception as e:      # noqa: BLE001 - the breakdown is a diagnostic
        bd = {"error": f"{type(e).__name__}: {e}"[:300]}
    del kv1, p_step
    st = alloc.stats()
    wb, kvb = model.weight_bytes, gen.engine.runner.kv.nbytes
    peak = st["peak"] - before
    kind = args.dtype + (f"+{args.quantize}" if args.quantize else "")
    kind += "+head" if args.quantize_head and args.quantize not in (None, "int8") else ""
    res = {"case": name, "engine": "hetinfer-cuda" + ("-eager" if args.eager else "-graphs"),
           "dtype": kind, "prompt": args.prompt, "new": args.new,
           "decode_tok_s": round(decode, 1), "decode_tok_s_steady": round(steady, 1),
           "weight_bytes": wb, "roofline_pct": round(100 * steady * wb / (read_gbs * 1e9), 1),
           "roofline_pct_generator": round(100 * decode * wb / (read_gbs * 1e9), 1),
           "us_per_token": round(1e6 / steady, 1) if steady else None,
           "prefill_ms": round(prefill_ms, 2), "prefill_tokens": args.prefill,
           "peak_bytes": peak, "kv_cache_bytes": kvb,
           "peak_over_weights_kv_MiB": round((peak - wb - kvb) / 2**20, 1), "build_s": round(build_s, 2),
           "step_gpu_us": bd.get("step_gpu_us"),
           "host_us_per_token": round(1e6 / steady - bd["step_gpu_us"], 1) if steady and "step_gpu_us" in bd else None}
    print(json.dumps({"case": "breakdown", "model": name, **bd}), flush=True)
    del gen, model
    _free_all(device)
    return res


def _graph_us(alloc, ev, fn, reps: int = 20, iters: int = 10) -> float:
    """GPU microseconds per call of fn: reps calls captured in one graph, replayed iters times."""
    replay = alloc.capture(lambda: [fn() for _ in range(reps)])
    replay()
    ev.start()
    for _ in range(iters):
        replay()
    return ev.stop_ms() * 1e3 / (iters * reps)


def decode_breakdown(model, kv, position: int, device="cuda") -> dict:
    """GPU time of the decode step (one captured forward + argmax, replayed) and of each
    op of it with the model's shapes (layer 0; each op captured 20 times in a graph), so
    the sum over ops x layers shows where a token's time goes. kv: pools of one sequence
    in blocks 0, 1, ... (PagedKVCache.for_tokens), at least position + 1 long."""
    import hetinfer as hi
    from hetinfer import ops
    from hetinfer.device import get_allocator
    from hetinfer.engine.step import StepInput
    from .kernels import _dev
    alloc = get_allocator(device)
    c = model.config
    step = StepInput.single([5], position, kv.block_size).to(device)
    tok = hi.empty((1,), "i32", device)
    logits = model.forward(step, kv)                 # eager once: workspace, kernels loaded
    ops.argmax(logits, out=tok)
    ev = _Events(_dev(logits))
    step_us = _graph_us(alloc, ev, lambda: ops.argmax(model.forward(step, kv), out=tok), reps=5, iters=20)
    ws = model._workspace(1, 1)
    x, L, eps = ws["x"], model.layers[0], c.rms_norm_eps
    kc, vc = kv.k[0], kv.v[0]
    per_layer = {      # the layer as LlamaForCausalLM.forward runs it (T = 1)
        "matmul_qkv+norm": lambda: ops.matmul(x, L.wqkv, L.bqkv, L.wqkv_scales, norm_weight=L.attn_norm,
                                              eps=eps, out=ws["qkv"]),
        "rope_paged_kv_write": lambda: ops.rope_paged_kv_write(ws["q"], ws["k"], ws["v"], kc, vc, step.positions,
                                                               step.slot_mapping, model.cos, model.sin,
                                                               c.rope_style),
        "paged_attention": lambda: ops.paged_attention(ws["q"], kc, vc, step.query_start, step.context_lens,
                                                       step.block_tables, out=ws["attn"]),
        "matmul_o+residual": lambda: ops.matmul(ws["attn_flat"], L.wo, scales=L.wo_scales, residual=x, out=x),
        "matmul_gate_up+norm+swiglu": lambda: ops.matmul(x, L.w_gate_up, scales=L.w_gate_up_scales,
                                                         norm_weight=L.mlp_norm, eps=eps, act="swiglu",
                                                         out=ws["act"]),
        "matmul_down+residual": lambda: ops.matmul(ws["act"], L.w_down, scales=L.w_down_scales, residual=x,
                                                   out=x),
    }
    head = {
        "embedding": lambda: ops.embedding(step.input_ids, model.embed, out=x),
        "matmul_lm_head+norm": lambda: ops.matmul(ws["x_rows"], model.lm_head, norm_weight=model.norm, eps=eps,
                                                  out=ws["logits"]),
        "argmax": lambda: ops.argmax(ws["logits"], out=tok),
    }
    us = {k: round(_graph_us(alloc, ev, f), 2) for k, f in per_layer.items()}
    us_head = {k: round(_graph_us(alloc, ev, f), 2) for k, f in head.items()}
    total = sum(us.values()) * c.num_hidden_layers + sum(us_head.values())
    def nb(*ts):
        return sum(t.nbytes for t in ts if t is not None)
    wbytes = {"matmul_qkv+norm": nb(L.wqkv, L.wqkv_scales), "matmul_o+residual": nb(L.wo, L.wo_scales),
              "matmul_gate_up+norm+swiglu": nb(L.w_gate_up, L.w_gate_up_scales),
              "matmul_down+residual": nb(L.w_down, L.w_down_scales)}
    gbs = {k: round(b / (us[k] * 1e-6) / 1e9) for k, b in wbytes.items()}
    gbs["matmul_lm_head+norm"] = round(model.lm_head.nbytes / (us_head["matmul_lm_head+norm"] * 1e-6) / 1e9)
    return {"step_gpu_us": round(step_us, 1), "ops_sum_us": round(total, 1),
            "kernels_per_step": len(per_layer) * c.num_hidden_layers + len(head), "per_layer_us": us, "head_us": us_head,
            "matmul_GB_s": gbs, "position": position}


def _engine(model, args, max_context, max_num_seqs):
    from hetinfer.engine import LLMEngine
    return LLMEngine(model, _NoTokenizer(), max_context=max_context, max_num_seqs=max_num_seqs,
                     max_num_batched_tokens=args.max_num_batched_tokens, graphs=not args.eager,
                     gpu_memory_utilization=args.gpu_memory_utilization)


def batch_cases(name: str, args, read_gbs: float, device="cuda") -> list[dict]:
    """Batched decode: B sequences of --batch-prompt random tokens, --batch-new new tokens
    each, all added at once; aggregate decode tok/s from the step after the last prefill to
    the end (every step a decode of B rows). Roofline: weights + the K/V read per step."""
    from hetinfer.sampling import SamplingParams
    alloc = _free_all(device)
    batches = [int(b) for b in args.batch.split(",")]
    ctx = args.batch_prompt + args.batch_new + 16
    cfg = shape_config(name, max_position=max(4096, ctx))
    model = random_model(cfg, args.dtype, device, max_context=ctx, quantize=args.quantize,
                         quantize_head=args.quantize_head)
    eng = _engine(model, args, ctx, max(batches))
    rng = np.random.default_rng(1)
    out = []
    c = cfg
    kv_tok = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * model.dtype.itemsize
    for b in [batches[0]] + batches:                         # the first is a warm-up
        params = SamplingParams(max_tokens=args.batch_new, ignore_eos=True)
        seqs = [eng.add_request(rng.integers(0, c.vocab_size, args.batch_prompt).tolist(), params)
                for _ in range(b)]
        t_dec, steps = None, 0
        while eng.has_unfinished():
            eng.step()
            if t_dec is None and all(s.num_output_tokens >= 1 for s in seqs):
                alloc.synchronize()
                t_dec = time.perf_counter()
                steps = 0
            steps += 1
        alloc.synchronize()
        dt = time.perf_counter() - t_dec
        toks = sum(s.num_output_tokens - 1 for s in seqs)
        per_step = dt / max(1, steps - 1)
        mean_ctx = args.batch_prompt + args.batch_new / 2
        bytes_step = model.weight_bytes + b * mean_ctx * kv_tok
        out.append({"case": "batch_decode", "model": name, "dtype": args.dtype, "batch": b,
                    "prompt": args.batch_prompt, "new": args.batch_new, "decode_tok_s": round(toks / dt, 1),
                    "step_ms": round(per_step * 1e3, 3),
                    "roofline_pct": round(100 * bytes_step / per_step / (read_gbs * 1e9), 1),
                    "graph_replays": eng.runner.num_replays, "eager_steps": eng.runner.num_eager,
                    "capture_errors": eng.runner.capture_errors[:2]})
    out = out[1:]
    for r in out:
        print(json.dumps(r), flush=True)
    del eng, model
    _free_all(device)
    return out


def throughput_case(name: str, args, device="cuda") -> dict:
    """Offline throughput as nano-vllm measures it: N requests, prompt and output lengths
    uniform in 100..1024 (random ids, ignore_eos), all added at once; output tok/s."""
    from hetinfer.sampling import SamplingParams
    alloc = _free_all(device)
    cfg = shape_config(name, max_position=4096)
    model = random_model(cfg, args.dtype, device, max_context=2048 + 16)
    eng = _engine(model, args, 2048 + 16, args.throughput_seqs)
    rng = np.random.default_rng(0)
    n = args.throughput
    lens = rng.integers(100, 1025, size=(n, 2))
    eng.generate([rng.integers(0, cfg.vocab_size, 16).tolist()], SamplingParams(max_tokens=4, ignore_eos=True))
    alloc.synchronize()
    t = time.perf_counter()
    seqs = eng.generate([rng.integers(0, cfg.vocab_size, int(p)).tolist() for p, _ in lens],
                        [SamplingParams(max_tokens=int(o), ignore_eos=True) for _, o in lens])
    alloc.synchronize()
    dt = time.perf_counter() - t
    toks = sum(s.num_output_tokens for s in seqs)
    res = {"case": "throughput", "model": name, "dtype": args.dtype, "requests": n, "output_tokens": toks,
           "seconds": round(dt, 2), "output_tok_s": round(toks / dt, 1),
           "prompt_tokens": int(lens[:, 0].sum()), "preemptions": eng.scheduler.num_preemptions,
           "kv_blocks": eng.blocks.num_blocks, "steps": eng.num_steps, "graph_replays": eng.runner.num_replays,
           "eager_steps": eng.runner.num_eager, "captures": eng.runner.num_captures}
    print(json.dumps(res), flush=True)
    del eng, model
    _free_all(device)
    return res


def run_anchor(path: str, models: list[str], prompt: int, new: int, timeout: int,
               batch: str | None = None) -> list[dict]:
    cmd = [sys.executable, path, "--models", ",".join(models), "--prompt", str(prompt), "--new", str(new)]
    if batch:
        cmd += ["--batch", batch]
    got = []
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        t_end = time.time() + timeout
        for line in proc.stdout:
            line = line.strip()
            if line.startswith("{"):
                print(json.dumps({"anchor": json.loads(line)}), flush=True)
                got.append(json.loads(line))
            if time.time() > t_end:
                proc.kill()
                print(json.dumps({"anchor_error": f"timed out after {timeout} s"}), flush=True)
                break
        proc.wait(timeout=30)
        if proc.returncode not in (0, None, -9):
            err = proc.stderr.read()[-1500:]
            print(json.dumps({"anchor_error": f"exit {proc.returncode}", "stderr": err}), flush=True)
    except Exception as e:      # noqa: BLE001 - report and go on
        print(json.dumps({"anchor_error": repr(e)[:300]}), flush=True)
    return got


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="f16")
    p.add_argument("--models", default=DEFAULT_MODELS)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--quantize", choices=["int8", "q4_k", "q8_0", "q4_0", "q6_k"], default=None,
                   help="int8 linear weights (per-group f16 scales); the anchor stays f16")
    p.add_argument("--quantize-head", action="store_true",
                   help="with a packed --quantize: the untied output head packed in the same format")
    p.add_argument("--anchor", default=None, help="path of torch_anchor.py, run after our cases")
    p.add_argument("--anchor-timeout", type=int, default=420)
    p.add_argument("--batch", default=None, help="batched decode at these batch sizes, e.g. 1,4,16,64")
    p.add_argument("--batch-prompt", type=int, default=128)
    p.add_argument("--batch-new", type=int, default=128)
    p.add_argument("--batch-models", default="tinyllama-1.1b,qwen2.5-0.5b")
    p.add_argument("--throughput", type=int, default=0, help="offline throughput over this many requests")
    p.add_argument("--throughput-seqs", type=int, default=256, help="max_num_seqs of the throughput case")
    p.add_argument("--throughput-model", default="qwen2.5-0.5b")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.8)
    p.add_argument("--skip-single", action="store_true", help="no batch-1 cases (only --batch/--throughput)")
    # options of the CPU bench that may be passed through
    p.add_argument("--model", default=None)
    p.add_argument("--prompt-len", type=int, default=None)
    args = p.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bw = bandwidth(args.device)
    print(json.dumps(bw), flush=True)
    _free_all(args.device)
    ours = {}
    for name in ([] if args.skip_single else models):
        try:
            r = bench_case(name, args, bw["read_GB_s"], args.device)
        except Exception as e:      # noqa: BLE001 - report and go on with the next case
            r = {"case": name, "error": f"{type(e).__name__}: {e}"[:500]}
            _free_all(args.device)
        ours[name] = r
        print(json.dumps(r), flush=True)
    batched = {}
    if args.batch:
        for name in [m for m in args.batch_models.split(",") if m]:
            try:
                batched[name] = batch_cases(name, args, bw["read_GB_s"], args.device)
            except Exception as e:      # noqa: BLE001
                print(json.dumps({"case": "batch_decode", "model": name, "error": f"{type(e).__name__}: {e}"[:500]}),
                      flush=True)
                _free_all(args.device)
    if args.throughput:
        try:
            throughput_case(args.throughput_model, args, args.device)
        except Exception as e:      # noqa: BLE001
            print(json.dumps({"case": "throughput", "error": f"{type(e).__name__}: {e}"[:500]}), flush=True)
            _free_all(args.device)
    if args.anchor and args.batch:
        _free_all(args.device)
        bms = [m for m in args.batch_models.split(",") if m]
        anchor_b = run_anchor(args.anchor, bms, args.batch_prompt, args.batch_new, args.anchor_timeout, args.batch)
        for a in anchor_b:
            mine = {r["batch"]: r for r in batched.get(a.get("model"), []) if "batch" in r}
            o = mine.get(a.get("batch"))
            if o and "decode_tok_s" in a:
                print(json.dumps({"case": "batch_ratio", "model": a["model"], "batch": a["batch"],
                                  "ours_tok_s": o["decode_tok_s"], "anchor_tok_s": a["decode_tok_s"],
                                  "ours_over_anchor": round(o["decode_tok_s"] / a["decode_tok_s"], 2)}), flush=True)
    if args.anchor and not args.skip_single:
        _free_all(args.device)
        anchor = {a["model"]: a for a in run_anchor(args.anchor, models, args.prompt, args.new,
                                                    args.anchor_timeout) if "decode_tok_s" in a}
        for name in models:
            o, a = ours.get(name, {}), anchor.get(name)
            if not a or "decode_tok_s" not in o:
                continue
            print(json.dumps({"case": "ratio", "model": name,
                              "decode_ours_over_anchor": round(o["decode_tok_s"] / a["decode_tok_s"], 2),
                              "decode_steady_ours_over_anchor": round(o["decode_tok_s_steady"] / a["decode_tok_s"], 2),
                              "prefill_ms_ours": o["prefill_ms"],
                              "prefill_ms_anchor_prompt32": a["prefill_ms"],
                              "ours_tok_s": o["decode_tok_s"], "anchor_tok_s": a["decode_tok_s"],
                              "roofline_pct": o["roofline_pct"]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
