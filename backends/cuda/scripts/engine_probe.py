"""Diagnose a batched decode step on CUDA: capture errors, CuPy state, per-op times of one
eager step (synchronised), wall time of eager vs replayed steps, for tinyllama shapes."""
import json
import sys
import time
import traceback

import numpy as np

from hetinfer.device import get_allocator
from hetinfer.engine import LLMEngine
from hetinfer.profiler import Profiler
from hetinfer.sampling import SamplingParams
from hetinfer_cuda import cupy_bridge
from hetinfer_cuda.bench import _NoTokenizer, random_model, shape_config

name = sys.argv[1] if len(sys.argv) > 1 else "tinyllama-1.1b"
cfg = shape_config(name)
model = random_model(cfg, "f16", "cuda", max_context=512)
alloc = get_allocator("cuda")
for b in (16, 64):
    eng = LLMEngine(model, _NoTokenizer(), max_context=512, max_num_seqs=64, kv_cache_memory=8 << 30)
    rng = np.random.default_rng(0)
    seqs = [eng.add_request(rng.integers(0, cfg.vocab_size, 128).tolist(), SamplingParams(max_tokens=40, ignore_eos=True))
            for _ in range(b)]
    times = []
    while eng.has_unfinished():
        alloc.synchronize()
        t = time.perf_counter()
        eng.step()
        alloc.synchronize()
        times.append(time.perf_counter() - t)
    r = eng.runner
    print(json.dumps({"batch": b, "step_ms": [round(x * 1e3, 2) for x in times[:8]] + ["..."] +
                      [round(x * 1e3, 2) for x in times[-3:]], "replays": r.num_replays, "eager": r.num_eager,
                      "captures": r.num_captures, "capture_errors": [e[:400] for e in r.capture_errors],
                      "cupy": cupy_bridge._state.get("reason")}), flush=True)
    # one eager decode step, profiled
    seqs = [eng.add_request(rng.integers(0, cfg.vocab_size, 128).tolist(), SamplingParams(max_tokens=3, ignore_eos=True))
            for _ in range(b)]
    eng.step()
    eng.runner.capture = None
    with Profiler(model.device) as prof:
        eng.step()
    print(prof.table().split("\n\n")[0], flush=True)
    while eng.has_unfinished():
        eng.step()
    del eng
# a 64-row matmul captured directly
try:
    import hetinfer as hi
    from hetinfer import ops
    x = hi.empty((64, cfg.hidden_size), "f16", "cuda").fill_(0.01)
    w = model.layers[0].wo
    o = hi.empty((64, w.shape[0]), "f16", "cuda")
    ops.matmul(x, w, out=o)
    rep = alloc.capture(lambda: ops.matmul(x, w, out=o))
    rep()
    print("cuBLAS capture: ok")
except Exception:
    traceback.print_exc()
