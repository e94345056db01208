"""Quick look at the CUDA backend on a GPU machine: device facts, the compile cache
(run it twice: the second run must compile nothing), every op against its float64
reference at LLM-like shapes, and a few sanity timings (CUDA events, median of 20).

    python backends/cuda/scripts/cuda_smoke.py [--no-timing]
"""

from __future__ import annotations

import sys
import time

import numpy as np

import hetinfer
from hetinfer import ops
from hetinfer.ops import reference as R
from hetinfer.rope import rope_table


def rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def main():
    import hetinfer_cuda
    from hetinfer_cuda import cupy_bridge
    from hetinfer_cuda import driver as D

    p = hetinfer_cuda.probe()
    print("probe:", p)
    if not p["available"]:
        return 1
    t0 = time.perf_counter()
    dev = D.get_device(0)
    print(f"device: {dev.name} {dev.arch} SMs={dev.sm_count} mem={dev.total_memory / 2**30:.1f} GiB "
          f"driver={D.driver_version()} nvrtc={D.nvrtc_version()} cache={D.cache_dir()}")
    alloc = hetinfer.device.get_allocator("cuda:0")
    print("cupy:", cupy_bridge.cupy().__version__ if cupy_bridge.cupy() else f"absent ({cupy_bridge.reason()})")
    rng = np.random.default_rng(0)
    cu = lambda a, dt=None: hetinfer.tensor(a, dt, device="cuda")    # noqa: E731
    rows = []
    for dt in ("f32", "f16", "bf16"):
        npdt = hetinfer.dtype(dt).np
        r = lambda *s, sc=1.0: (rng.standard_normal(s) * sc).astype(npdt)   # noqa: E731
        t_c = time.perf_counter()
        x, w = r(4, 2048), r(2048)
        rows.append((dt, "rms_norm", rel(ops.rms_norm(cu(x), cu(w)).numpy(), R.rms_norm(x, w, 1e-6))))
        t_first = time.perf_counter() - t_c
        for m in (1, 4, 64):
            xm, wm, bm = r(m, 1024), r(1536, 1024, sc=1 / 32), r(1536)
            rows.append((dt, f"matmul M={m}", rel(ops.matmul(cu(xm), cu(wm), cu(bm)).numpy(),
                                                   R.matmul(xm, wm, bm))))
        a, b = r(3, 5000), r(3, 5000)
        rows.append((dt, "add", rel(ops.add(cu(a), cu(b)).numpy(), R.add(a, b))))
        rows.append((dt, "swiglu", rel(ops.swiglu(cu(a), cu(b)).numpy(), R.swiglu(a, b))))
        rows.append((dt, "softmax", rel(ops.softmax(cu(a)).numpy(), R.softmax(a))))
        am = ops.argmax(cu(a)).numpy()
        rows.append((dt, "argmax", float(np.sum(am != R.argmax(a)))))
        tab = r(32000, 256)
        ids = rng.integers(0, 32000, 9).astype(np.int32)
        rows.append((dt, "embedding", rel(ops.embedding(cu(ids), cu(tab)).numpy(), R.embedding(ids, tab))))
        cos, sin = rope_table(64, 4096)
        q = r(16, 8, 64)
        pos = np.arange(100, 116, dtype=np.int32)
        for style in ("half", "interleaved"):
            rows.append((dt, f"rope {style}", rel(ops.rope(cu(q), cu(pos), cu(cos), cu(sin), style=style).numpy(),
                                                  R.rope(q, pos, cos, sin, style))))
        S = 1024
        kc, vc = cu(r(S, 2, 64)), cu(r(S, 2, 64))
        ops.kv_cache_write(cu(r(16, 2, 64)), cu(r(16, 2, 64)), kc, vc, cu(pos))
        kn, vn = kc.numpy(), vc.numpy()
        rows.append((dt, "attention prefill", rel(ops.attention(cu(q), kc, vc, cu(pos)).numpy(),
                                                  R.attention(q, kn, vn, pos, 0.125))))
        q1, p1 = r(1, 8, 64), np.array([S - 1], np.int32)
        rows.append((dt, "attention decode", rel(ops.attention(cu(q1), kc, vc, cu(p1)).numpy(),
                                                 R.attention(q1, kn, vn, p1, 0.125))))
        rows.append((dt, "cast->f32", rel(ops.cast(cu(a), "f32").numpy(), a)))
        print(f"{dt}: first op (module load/compile) {t_first * 1e3:.0f} ms")
    for dt, name, err in rows:
        print(f"  {dt:5s} {name:20s} {err:.2e}")
    print(f"compile stats: nvrtc_compiles={D.stats.nvrtc_compiles} disk_hits={D.stats.disk_hits}; "
          f"setup+checks {time.perf_counter() - t0:.1f} s")
    print("allocator:", alloc.stats())
    if "--no-timing" not in sys.argv:
        timings(dev, cu)
    return 0


def timings(dev, cu):
    """Sanity only. Op calls from Python are host-bound (dispatch ~tens of us), so kernel
    times are taken from back-to-back launches through the launch helper (10 per
    event pair), and the per-op host cost is reported separately."""
    from hetinfer_cuda import driver as D
    from hetinfer_cuda.driver import Arg
    drv = D._drv()

    def bench(fn, reps=10, inner=10):
        fn()
        dev.synchronize()
        start, end = D.check(drv.cuEventCreate(0)), D.check(drv.cuEventCreate(0))
        ts = []
        for _ in range(reps):
            D.check(drv.cuEventRecord(start, dev.stream))
            for _ in range(inner):
                fn()
            D.check(drv.cuEventRecord(end, dev.stream))
            D.check(drv.cuEventSynchronize(end))
            ts.append(D.check(drv.cuEventElapsedTime(start, end)) / inner)
        return float(np.median(ts)) * 1e-3   # seconds per call

    def p(t):
        return int(t.buffer.handle) + t.byte_offset

    rng = np.random.default_rng(1)
    print("sanity timings (CUDA events; kernel = back-to-back launches, op = Python op call):")
    N, K = 14336, 4096
    w = cu(rng.standard_normal((N, K)).astype(np.float16))
    x = cu(rng.standard_normal((1, K)).astype(np.float16))
    out = hetinfer.empty((1, N), "f16", "cuda")
    gemv = D.kernel(dev, "f16", "gemv_m1")
    # x, x32, w, scales, G, bias, norm weight, eps, prologue, act, residual, r32, out, o32, M, N, K, vec, rows/warp
    args = [Arg.ptr(p(x)), Arg.i32(0), Arg.ptr(p(w)), Arg.ptr(0), Arg.i32(0), Arg.ptr(0), Arg.ptr(0),
            Arg.f32(0.0), Arg.i32(0), Arg.i32(0), Arg.ptr(0), Arg.i32(0), Arg.ptr(p(out)), Arg.i32(0),
            Arg.i32(1), Arg.i32(N), Arg.i32(K), Arg.i32(1), Arg.i32(2)]
    t = bench(lambda: D.launch(dev, gemv, ((N + 15) // 16,), (256,), args))
    print(f"  gemv kernel f16 {N}x{K} M=1: {t * 1e6:.1f} us, {N * K * 2 / t / 1e9:.0f} GB/s of weight")
    t = bench(lambda: ops.matmul(x, w, out=out))
    print(f"  matmul op (same, through dispatch): {t * 1e6:.1f} us per call")
    x64 = cu(rng.standard_normal((512, K)).astype(np.float16))
    o64 = hetinfer.empty((512, N), "f16", "cuda")
    t = bench(lambda: ops.matmul(x64, w, out=o64))
    print(f"  matmul op f16 M=512 ({'cuBLAS' if __import__('hetinfer_cuda').cupy_bridge.cupy() else 'tiled'}): "
          f"{t * 1e6:.1f} us, {2 * 512 * N * K / t / 1e12:.1f} TFLOP/s")
    xs = cu(rng.standard_normal((1, 4096)).astype(np.float16))
    g = cu(rng.standard_normal(4096).astype(np.float16))
    xo = hetinfer.empty((1, 4096), "f16", "cuda")
    t = bench(lambda: ops.rms_norm(xs, g, out=xo))
    print(f"  rms_norm op f16 1x4096: {t * 1e6:.1f} us per call (host dispatch cost)")
    S, Hq, Hkv, Dh = 2048, 32, 8, 128
    kc = cu(rng.standard_normal((S, Hkv, Dh)).astype(np.float16))
    vc = cu(rng.standard_normal((S, Hkv, Dh)).astype(np.float16))
    q = cu(rng.standard_normal((1, Hq, Dh)).astype(np.float16))
    pos = cu(np.array([S - 1], np.int32))
    ao = hetinfer.empty((1, Hq, Dh), "f16", "cuda")
    ops.attention(q, kc, vc, pos, out=ao)                 # scratch made outside the timing
    t = bench(lambda: ops.attention(q, kc, vc, pos, out=ao))
    print(f"  attention decode op f16 S={S} Hq={Hq} Hkv={Hkv} D={Dh}: {t * 1e6:.1f} us per call "
          f"(with dispatch), {2 * S * Hkv * Dh * 2 / t / 1e9:.0f} GB/s of cache")
    qp = cu(rng.standard_normal((512, Hq, Dh)).astype(np.float16))
    pp = cu(np.arange(512, dtype=np.int32))
    po = hetinfer.empty((512, Hq, Dh), "f16", "cuda")
    t = bench(lambda: ops.attention(qp, kc, vc, pp, out=po), reps=5, inner=2)
    print(f"  attention prefill op f16 T=512: {t * 1e3:.2f} ms")


if __name__ == "__main__":
    sys.exit(main())
