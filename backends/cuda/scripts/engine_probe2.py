"""Prefill through the engine's step graphs (TTFT of a 512-token prompt, batch 1) and where a
B=64 decode step goes (per-op GPU time of one eager step; host time of building a step)."""
import json
import time

import numpy as np

from hetinfer.device import get_allocator
from hetinfer.engine import LLMEngine
from hetinfer.engine.step import StepInput
from hetinfer.profiler import Profiler
from hetinfer.sampling import SamplingParams
from hetinfer_cuda.bench import _NoTokenizer, random_model, shape_config

alloc = get_allocator("cuda")
for name in ("tinyllama-1.1b",):
    cfg = shape_config(name)
    model = random_model(cfg, "f16", "cuda", max_context=1024)
    eng = LLMEngine(model, _NoTokenizer(), max_context=1024, max_num_seqs=64, kv_cache_memory=16 << 30)
    rng = np.random.default_rng(0)
    ttft = []
    for _ in range(4):
        eng.add_request(rng.integers(0, cfg.vocab_size, 512).tolist(), SamplingParams(max_tokens=1))
        alloc.synchronize()
        t = time.perf_counter()
        eng.step()
        alloc.synchronize()
        ttft.append(round((time.perf_counter() - t) * 1e3, 2))
    print(json.dumps({"model": name, "prefill512_step_ms": ttft, "captures": eng.runner.num_captures,
                      "errors": eng.runner.capture_errors[:1]}), flush=True)
    seqs = [eng.add_request(rng.integers(0, cfg.vocab_size, 128).tolist(), SamplingParams(max_tokens=6, ignore_eos=True))
            for _ in range(64)]
    while not all(s.num_output_tokens >= 1 for s in seqs):
        eng.step()
    plan = eng.scheduler.schedule()
    t = time.perf_counter()
    for _ in range(20):
        StepInput.build(plan.scheduled, 16, pad_seqs=0, max_blocks=64, all_rows=True).packed()
    build_ms = (time.perf_counter() - t) / 20 * 1e3
    eng.runner.capture = None
    with Profiler(model.device) as prof:
        toks = eng.runner.run(plan)
    eng.scheduler.postprocess(plan, toks)
    print(json.dumps({"host_build_ms": round(build_ms, 3)}))
    print(prof.table().split("\n\n")[0], flush=True)
