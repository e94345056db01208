#!/usr/bin/env python3
"""Speed figures, one JSON line per case.

CPU (default): SmolLM2-135M-Instruct (or --model) in f32: load time, prefill tok/s of
a --prompt-len prompt, decode tok/s, peak RSS; the same for HF transformers on the
same weights; and the machine's read bandwidth (a large NumPy reduction), so decode
is also reported as % of the roofline (tok/s x weight bytes / bandwidth).
Each case runs in its own process so peak RSS is its own. --quantize int8 adds a case
that loads the same model quantized to int8 groups (hetinfer.quant) and a summary line
comparing its decode tok/s and peak RSS with the f32 case of the same run.

    python tools/bench.py --device cpu [--model PATH] [--prompt-len 256] [--new 64] [--quantize int8]
    python tools/bench.py --device cpu --batch 1,4,16 [--batch-prompt 128] [--batch-new 32]
    python tools/bench.py --device cpu --gguf [--model FILE.gguf] [--threads 1,2] [--llamacpp-python PY]

--gguf (issue 16): a GGUF file run packed (its blocks as stored, 8-bit activations) and
dequantized to f32, and llama.cpp through llama-cpp-python on the same file, in the same
run, at each thread count (OMP_NUM_THREADS / n_threads): load time, prefill and decode
tok/s, peak RSS, and a summary line of ratios to llama.cpp. llama-cpp-python is an optional
bench dependency: it runs when importable by this interpreter, or by --llamacpp-python
(or $HETINFER_LLAMACPP_PYTHON), e.g. a separate venv; else its cases are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np


def rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def prompt_ids(tokenizer_encode, n):
    text = ("The old lighthouse keeper climbed the spiral stairs each evening, counting the steps "
            "and listening to the sea. ") * 64
    ids = tokenizer_encode(text)
    return ids[:n]


def case_bandwidth(args):
    """Read bandwidth: a 512 MiB NumPy sum, one slice per core in threads (NumPy releases
    the GIL), median of 5."""
    from concurrent.futures import ThreadPoolExecutor
    a = np.random.default_rng(0).random(1 << 27, dtype=np.float32)   # 512 MiB
    n = os.cpu_count() or 1
    slices = np.array_split(a, n)
    def median_s(fn):
        fn()
        times = []
        for _ in range(5):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return float(np.median(times))
    with ThreadPoolExecutor(n) as pool:
        all_cores = median_s(lambda: list(pool.map(np.sum, slices)))
    one = median_s(a.sum)
    return {"case": "read_bandwidth", "bytes": a.nbytes, "threads": n, "GB_s": a.nbytes / all_cores / 1e9,
            "GB_s_one_thread": a.nbytes / one / 1e9}


def case_hetinfer(args):
    from hetinfer.engine import Generator, load
    t = time.perf_counter()
    quantize = getattr(args, "case_quantize", None)
    dtype = None if args.dtype == "packed" else args.dtype             # dtype None: GGUF blocks kept packed
    model, ckpt = load(args.model, args.device, dtype, max_context=args.prompt_len + args.new + 8,
                       progress=False, quantize=quantize)
    load_s = time.perf_counter() - t
    ids = prompt_ids(ckpt.tokenizer.encode, args.prompt_len)
    gen = Generator(model, ckpt.tokenizer, args.prompt_len + args.new + 8)
    list(gen.generate(ids[:16], max_new_tokens=4, stop_ids=[]))                       # warm-up
    list(gen.generate(ids, max_new_tokens=args.new, stop_ids=[]))
    st = gen.stats
    kinds = sorted({str(t.dtype) for l in model.layers for t in (l.wo, l.w_down)})
    return {"case": "hetinfer" + (f"_{quantize}" if quantize else ""), "device": args.device,
            "dtype": args.dtype, "quantize": quantize, "weights": kinds, "threads": _threads(),
            "load_s": load_s,
            "prompt_tokens": len(ids), "prefill_tok_s": st.prefill_tok_s,
            "decode_tokens": st.new_tokens - 1, "decode_tok_s": st.decode_tok_s,
            "weight_bytes": model.weight_bytes, "peak_rss_bytes": rss()}


def case_hf(args):
    import torch
    import transformers
    from hetinfer.engine import default_model_path
    from hetinfer.loaders import load_checkpoint
    path = args.model or str(default_model_path())
    torch.set_num_threads(args.hf_threads or os.cpu_count() or 1)
    t = time.perf_counter()
    if os.path.isdir(path):
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    else:
        hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), dtype=torch.float32,
                                                               gguf_file=os.path.basename(path))
    hf.eval()
    load_s = time.perf_counter() - t
    ids = prompt_ids(load_checkpoint(path, progress=False).tokenizer.encode, args.prompt_len)
    with torch.inference_mode():
        hf(torch.tensor([ids[:16]]))                                   # warm-up
        t = time.perf_counter()
        out = hf(torch.tensor([ids]), use_cache=True)
        prefill_s = time.perf_counter() - t
        pkv, nxt = out.past_key_values, out.logits[0, -1].argmax()
        t = time.perf_counter()
        for _ in range(args.new - 1):
            out = hf(nxt.view(1, 1), past_key_values=pkv, use_cache=True)
            pkv, nxt = out.past_key_values, out.logits[0, -1].argmax()
        decode_s = time.perf_counter() - t
    return {"case": "hf_transformers", "torch": torch.__version__, "threads": torch.get_num_threads(),
            "load_s": load_s,
            "prompt_tokens": len(ids), "prefill_tok_s": len(ids) / prefill_s,
            "decode_tokens": args.new - 1, "decode_tok_s": (args.new - 1) / decode_s,
            "peak_rss_bytes": rss()}


def case_batch(args):
    """Batched decode (issue 11 (d)): B sequences of --batch-prompt tokens (the same text
    cut at different offsets, so no prefix is shared), --batch-new new tokens each, added
    at once; aggregate decode tok/s from the step after the last prefill to the end."""
    from hetinfer.engine import LLMEngine, load
    from hetinfer.sampling import SamplingParams
    ctx = args.batch_prompt + args.batch_new + 8
    model, ckpt = load(args.model, args.device, args.dtype, max_context=ctx, progress=False)
    text = prompt_ids(ckpt.tokenizer.encode, args.batch_prompt + 64)
    out = []
    for b in [int(x) for x in args.batch.split(",")]:
        eng = LLMEngine(model, ckpt.tokenizer, max_context=ctx, max_num_seqs=max(b, 1))
        params = SamplingParams(max_tokens=args.batch_new, ignore_eos=True)
        seqs = [eng.add_request(text[i % 64:i % 64 + args.batch_prompt], params) for i in range(b)]
        t0 = time.perf_counter()
        t_dec = None
        while eng.has_unfinished():
            eng.step()
            if t_dec is None and all(s.num_output_tokens >= 1 for s in seqs):
                t_dec = time.perf_counter()
        dt = time.perf_counter() - t_dec
        toks = sum(s.num_output_tokens - 1 for s in seqs)
        out.append({"batch": b, "decode_tok_s": toks / dt, "prefill_s": t_dec - t0})
    base = out[0]["decode_tok_s"]
    return {"case": "batch_decode", "device": args.device, "dtype": args.dtype, "prompt": args.batch_prompt,
            "new": args.batch_new, "runs": out, "speedup_over_first": [r["decode_tok_s"] / base for r in out]}


def _threads() -> int:
    return int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)


def case_llamacpp(args):
    """llama.cpp (llama-cpp-python) on the same file: the same prompt text, greedy decode."""
    from llama_cpp import Llama, __version__
    n = _threads()
    t = time.perf_counter()
    llm = Llama(model_path=args.model, n_ctx=args.prompt_len + args.new + 16, n_threads=n, n_threads_batch=n,
                n_batch=512, verbose=False)
    load_s = time.perf_counter() - t
    ids = prompt_ids(lambda text: llm.tokenize(text.encode(), add_bos=False), args.prompt_len)
    llm.eval(ids[:16])                                                             # warm-up
    llm.reset()
    t = time.perf_counter()
    llm.eval(ids)
    prefill_s = time.perf_counter() - t
    nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t = time.perf_counter()
    for _ in range(args.new - 1):
        llm.eval([nxt])
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    decode_s = time.perf_counter() - t
    return {"case": "llamacpp", "version": __version__, "threads": n, "load_s": load_s,
            "prompt_tokens": len(ids), "prefill_tok_s": len(ids) / prefill_s,
            "decode_tokens": args.new - 1, "decode_tok_s": (args.new - 1) / decode_s, "peak_rss_bytes": rss()}


def _llamacpp_python(args) -> str | None:
    """An interpreter that can import llama_cpp: --llamacpp-python, $HETINFER_LLAMACPP_PYTHON, or this one."""
    for py in (args.llamacpp_python, os.environ.get("HETINFER_LLAMACPP_PYTHON"), sys.executable):
        if py and subprocess.run([py, "-c", "import llama_cpp"], capture_output=True, check=False).returncode == 0:
            return py
    return None


def run_gguf(args):
    """Packed, dequantized and llama.cpp on one GGUF file, at each thread count."""
    from hetinfer.engine import default_model_path
    args.model = args.model or str(default_model_path())
    llama_py = _llamacpp_python(args)
    if llama_py is None:
        print(json.dumps({"case": "llamacpp", "skipped": "llama-cpp-python is not importable (pip install "
                          "llama-cpp-python, or give --llamacpp-python)"}), flush=True)
    here = os.path.dirname(os.path.abspath(__file__))
    for n in [int(x) for x in args.threads.split(",")]:
        env = dict(os.environ, OMP_NUM_THREADS=str(n), HETINFER_CPU_THREADS=str(n))
        common = ["--model", args.model, "--prompt-len", str(args.prompt_len), "--new", str(args.new)]
        got = {}
        runs = [("packed", [sys.executable, __file__, "--case", "hetinfer", "--dtype", "packed"]),
                ("f32", [sys.executable, __file__, "--case", "hetinfer", "--dtype", "f32"])]
        if llama_py:    # run as a script path so that a venv without hetinfer can run it
            runs.append(("llamacpp", [llama_py, os.path.join(here, "bench.py"), "--case", "llamacpp"]))
        keep = set(args.gguf_runs.split(","))
        runs = [r for r in runs if r[0] in keep]
        for name, cmd in runs:
            r = subprocess.run(cmd + common, capture_output=True, text=True, env=env, check=False)
            if r.returncode != 0:
                print(json.dumps({"case": name, "threads": n, "error": r.stderr.strip()[-500:]}), flush=True)
                continue
            got[name] = json.loads(r.stdout.strip().splitlines()[-1])
            got[name]["case"] = "hetinfer_" + name if name != "llamacpp" else "llamacpp"
            print(json.dumps(got[name]), flush=True)
        if "llamacpp" in got and "packed" in got:
            a, b = got["packed"], got["llamacpp"]
            print(json.dumps({"case": "summary_vs_llamacpp", "threads": n, "model": os.path.basename(args.model),
                              "decode_ratio": a["decode_tok_s"] / b["decode_tok_s"],
                              "prefill_ratio": a["prefill_tok_s"] / b["prefill_tok_s"],
                              "peak_rss_ratio": a["peak_rss_bytes"] / b["peak_rss_bytes"],
                              "load_s": a["load_s"], "load_s_llamacpp": b["load_s"]}), flush=True)


def case_hetinfer_int8(args):
    args.case_quantize = "int8"
    return case_hetinfer(args)


CASES = {"bandwidth": case_bandwidth, "hetinfer": case_hetinfer, "hetinfer_int8": case_hetinfer_int8,
         "hf": case_hf, "batch": case_batch, "llamacpp": case_llamacpp}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="f32")
    p.add_argument("--model", default=None)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--quantize", choices=["int8", "q4_k", "q8_0", "q4_0", "q6_k"], default=None,
                   help="also run hetinfer with int8 weights and compare with f32")
    p.add_argument("--batch", default=None, help="only batched decode at these batch sizes, e.g. 1,4,16")
    p.add_argument("--batch-prompt", type=int, default=128)
    p.add_argument("--batch-new", type=int, default=32)
    p.add_argument("--gguf", action="store_true",
                   help="a GGUF file packed, dequantized and on llama.cpp (llama-cpp-python), side by side")
    p.add_argument("--threads", default="1,2", help="thread counts for --gguf (default 1,2)")
    p.add_argument("--llamacpp-python", default=None, help="an interpreter that has llama-cpp-python")
    p.add_argument("--gguf-runs", default="packed,f32,llamacpp",
                   help="which --gguf cases to run (default packed,f32,llamacpp; f32 is the slow one)")
    p.add_argument("--case", choices=list(CASES), help=argparse.SUPPRESS)
    p.add_argument("--hf-threads", type=int, default=0, help=argparse.SUPPRESS)
    args, unknown = p.parse_known_args()
    if args.device != "cpu" and not args.case:
        from hetinfer_cuda.bench import main as cuda_main   # the CUDA suite and the torch anchor
        return cuda_main(sys.argv[1:])                      # (it parses its own options)
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.quantize not in (None, "int8"):
        p.error(f"--quantize {args.quantize} is a CUDA bench option (random packed weights); on cpu use --gguf FILE")
    if args.case:
        print(json.dumps(CASES[args.case](args)))
        return
    if args.gguf:
        run_gguf(args)
        return
    if args.batch:
        print(json.dumps(case_batch(args)))
        return
    results = {}
    runs = [("bandwidth", []), ("hetinfer", [])] + ([("hetinfer_int8", [])] if args.quantize else [])
    # HF at 1 thread and at every core: the comparison is against its better figure of each
    runs += [("hf", ["--hf-threads", str(n)]) for n in sorted({1, os.cpu_count() or 1})]
    hf_runs = []
    for name, extra in runs:
        cmd = [sys.executable, __file__, "--case", name] + extra + sys.argv[1:]
        line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        results[name] = json.loads(line)
        if name == "hf":
            hf_runs.append(results[name])
        print(line, flush=True)
    hf = {"decode_tok_s": max(r["decode_tok_s"] for r in hf_runs),
          "prefill_tok_s": max(r["prefill_tok_s"] for r in hf_runs)}
    ours, bw = results["hetinfer"], results["bandwidth"]
    roof = ours["decode_tok_s"] * ours["weight_bytes"] / (bw["GB_s"] * 1e9)
    roof1 = ours["decode_tok_s"] * ours["weight_bytes"] / (bw["GB_s_one_thread"] * 1e9)
    print(json.dumps({"case": "summary", "decode_vs_hf": ours["decode_tok_s"] / hf["decode_tok_s"],
                      "prefill_vs_hf": ours["prefill_tok_s"] / hf["prefill_tok_s"],
                      "decode_roofline_pct": 100 * roof, "decode_roofline_pct_one_thread_bw": 100 * roof1,
                      "load_s": ours["load_s"],
                      "peak_rss_over_weights": ours["peak_rss_bytes"] / ours["weight_bytes"]}))
    if args.quantize:
        q = results["hetinfer_int8"]
        print(json.dumps({"case": "summary_int8", "decode_tok_s_f32": ours["decode_tok_s"],
                          "decode_tok_s_int8": q["decode_tok_s"],
                          "decode_int8_over_f32": q["decode_tok_s"] / ours["decode_tok_s"],
                          "peak_rss_f32": ours["peak_rss_bytes"], "peak_rss_int8": q["peak_rss_bytes"],
                          "peak_rss_int8_over_f32": q["peak_rss_bytes"] / ours["peak_rss_bytes"],
                          "prefill_int8_over_f32": q["prefill_tok_s"] / ours["prefill_tok_s"]}))


if __name__ == "__main__":
    main()
