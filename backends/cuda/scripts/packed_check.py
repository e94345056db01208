"""Packed GGUF weights on CUDA: correctness of every format against the float64 reference of
the gguf package's own dequantizer, then decode GEMV timings beside the f16 and int8 paths.

    python3 backends/cuda/scripts/packed_check.py [--no-bench] [--quick]

JSON lines. Correctness ({"check": ...}): per format, activation dtype and M, ops.matmul on
cuda (M <= 8: the fused GEMV of csrc/packed.cu; M > 8: dequant_<fmt> + cuBLAS), also with
rms_norm + bias + residual and with swiglu; max |y - ref| / max |ref| against the float64
product of the gguf-dequantized weight and the x that was uploaded; dequant_<fmt> must match
gguf's float32 values exactly (after rounding to the output dtype).
Timing ({"bench": ...}): M = 1, the llama2-7b and tinyllama products (q, k, v and gate, up
fused as the models run them), Q4_K and Q8_0 beside f16 and int8 (group 64, f16 scales)
weights through ops.matmul, and (unless --no-sweep) every launch plan (chunk, K split, chunks
in flight, blocks per multiprocessor: packed.plan) of the packed GEMV, with the best one and
the per-token sums (plan keys "ck,sk,la,bps", bps 0 = as many blocks as fit). Each product is timed as 20 calls
captured in one CUDA graph replayed 10 times between CUDA events, median of 7; the calls
cycle through copies of the weight totalling >= 256 MB so that the 50 MB L2 holds none of
them (HBM time, not L2 time). GB/s counts the weight bytes; % of 4.4 TB/s.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time

import numpy as np

TOL = {"f32": 2e-4, "f16": 2e-3, "bf16": 1.5e-2}
FORMATS = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k")
# the products of a decode step as the models run them (q, k, v fused; gate and up fused)
SHAPES = [("llama2-7b qkv", 12288, 4096), ("llama2-7b o", 4096, 4096), ("llama2-7b gate|up", 22016, 4096),
          ("llama2-7b down", 4096, 11008), ("tinyllama qkv", 2560, 2048), ("tinyllama o", 2048, 2048),
          ("tinyllama gate|up", 11264, 2048), ("tinyllama down", 2048, 5632)]
LAYERS = {"llama2-7b": 32, "tinyllama": 22}
HBM = 4.4e12


def emit(**kw):
    print(json.dumps(kw), flush=True)


def random_packed(name: str, N: int, K: int, rng) -> np.ndarray:
    """(N, row bytes) uint8 of format name: gguf.quants.quantize of N(0, 1/K) weights where gguf
    can quantize the format, else random bytes with finite, small f16 scale fields."""
    import hetinfer as hi
    from gguf import quants
    from gguf.constants import GGMLQuantizationType as GT
    f = hi.dtype(name).packed
    try:
        return np.ascontiguousarray(quants.quantize(
            (rng.standard_normal((N, K)) / np.sqrt(K)).astype(np.float32), GT[f.gguf]))
    except NotImplementedError:
        pass
    nb = K // f.block
    raw = rng.integers(0, 256, (N, nb, f.nbytes), dtype=np.uint8)
    for off in f.scales:      # d (and dmin): |value| <~ 63 * 15 * d
        d = rng.uniform(0.5, 1.0, (N, nb)).astype(np.float16) * np.float16(4.0 / (63 * 15 * np.sqrt(K)))
        raw[:, :, off:off + 2] = d.view(np.uint8).reshape(N, nb, 2)
    return raw.reshape(N, nb * f.nbytes)


def reference_weight(name, raw):
    from hetinfer.ops import reference as R
    return R.dequantize_packed(raw, name)                          # (N, K) float64


def rel_err(y, ref) -> float:
    y = np.asarray(y, np.float64)
    den = float(np.abs(ref).max()) or 1.0
    return float(np.abs(y - ref).max() / den) if np.isfinite(y).all() else float("inf")


def check_correctness(rng, quiet: bool = False) -> int:
    import hetinfer as hi
    from hetinfer import ops
    from hetinfer import packed as HP
    from hetinfer.ops import reference as R
    from hetinfer_cuda import packed as PK
    fails = 0
    if quiet:
        def emit(**kw):
            if not kw.get("pass", True):
                print(json.dumps(kw), flush=True)
    else:
        emit = globals()["emit"]
    for name in FORMATS:
        block = hi.dtype(name).packed.block
        # K: several 64-item chunks, a partial one, and rows that are not 16-byte aligned
        # (q8_0 2080: 65 blocks of 34 bytes; q6_k 2816: 11 blocks of 210)
        K = 2080 if block == 32 else 2816
        N = 203                   # odd: a warp's last pair of rows has one
        raw = random_packed(name, N, K, rng)
        W = reference_weight(name, raw)
        w = HP.from_bytes(raw, name, (N, K), "cuda")
        t0 = time.time()
        # dequant: exact
        for dt in ("f32", "f16", "bf16"):
            out = hi.empty((N, K), dt, "cuda")
            PK.packed_dequant(w, name, N, K, out)
            exact = bool((out.numpy() == W.astype(np.float32).astype(hi.dtype(dt).np)).all())
            fails += not exact
            emit(check="dequant", fmt=name, dtype=dt, exact=exact, **{"pass": exact})
        for dt in ("f16", "bf16", "f32"):
            npdt = hi.dtype(dt).np
            for M in ((1, 2, 3, 4, 5, 8, 16, 64) if dt == "f16" else (1, 4, 8, 16)):
                xh = rng.standard_normal((M, K)).astype(npdt)
                x = hi.tensor(xh, dt, "cuda")
                y = ops.matmul(x, w)
                ref = np.asarray(xh, np.float64) @ W.T
                e = rel_err(y.numpy(), ref)
                ok = e <= TOL[dt]
                fails += not ok
                emit(check="matmul", fmt=name, dtype=dt, M=M, path="gemv" if M <= 8 else "dequant+cublas",
                     rel_err=e, tol=TOL[dt], **{"pass": ok})
        # fused: rms_norm prologue + bias + residual (f32 residual stream), and swiglu
        for M in (1, 4, 16):
            dt = "f16"
            npdt = np.float16
            xh = rng.standard_normal((M, K)).astype(np.float32)
            nwh = (1 + 0.1 * rng.standard_normal(K)).astype(npdt)
            bh = (0.1 * rng.standard_normal(N)).astype(npdt)
            rh = rng.standard_normal((M, N)).astype(np.float32)
            x = hi.tensor(xh, "f32", "cuda")                # an f32 residual stream into an f16 product
            out = hi.empty((M, N), dt, "cuda")
            ops.matmul(x, w, hi.tensor(bh, dt, "cuda"), out=out, norm_weight=hi.tensor(nwh, dt, "cuda"),
                       eps=1e-5)
            ref = R.matmul(xh, W, bias=bh, norm_weight=nwh, eps=1e-5)
            e = rel_err(out.numpy(), ref)
            ok = e <= TOL[dt]
            fails += not ok
            emit(check="fused norm+bias", fmt=name, dtype="x f32, out f16", M=M, rel_err=e,
                 tol=TOL[dt], **{"pass": ok})
            # residual stream: x f16, out = residual f32 (in place)
            xk = hi.tensor(xh.astype(npdt), dt, "cuda")
            out = hi.tensor(rh, "f32", "cuda")
            ops.matmul(xk, w, out=out, residual=out)
            ref = R.matmul(xh.astype(npdt), W, residual=rh)
            e = rel_err(out.numpy(), ref)
            ok = e <= TOL[dt]
            fails += not ok
            emit(check="fused residual", fmt=name, dtype="x f16, out=residual f32", M=M, rel_err=e,
                 tol=TOL[dt], **{"pass": ok})
            ys = ops.matmul(xk, w[:N - 1], act="swiglu")          # [gate | up] halves: even rows
            ref = R.matmul(xh.astype(npdt), W[:N - 1], act="swiglu")
            e = rel_err(ys.numpy(), ref)
            ok = e <= TOL[dt]
            fails += not ok
            emit(check="fused swiglu", fmt=name, dtype=dt, M=M, rel_err=e, tol=TOL[dt], **{"pass": ok})
        emit(check="format done", fmt=name, seconds=round(time.time() - t0, 2))
    return fails


def plans(name: str, K: int, full: bool):
    """(ck, sk, la, blocks per multiprocessor or 0: as many as fit) to time for a row of K
    values of format name: every plan the GEMV can run (full), else the whole or half chunk,
    no split or 2, 1 or 2 chunks in flight, at 1, 2, 3 blocks per multiprocessor or all."""
    from hetinfer_cuda import packed as PK
    ipb = PK._TABLE[name][0] // 32
    cmax = PK._chunk(name)
    for ck in (32, 64, 128):
        if ck > cmax or ck % ipb or (not full and ck < cmax // 2):
            continue
        for sk in (1, 2, 4, 8) if full else (1, 2):
            if sk > -(-(K // 32) // ck):
                continue
            for la in (1, 2, 3) if full else (1, 2):
                for bps in (0,) if full else (1, 2, 3, 0):
                    yield ck, sk, la, bps


def bench(rng, sweep: bool, full_sweep: bool = False) -> None:
    import hetinfer as hi
    from hetinfer import ops
    from hetinfer.device import get_allocator
    from hetinfer.tensor import Tensor
    from hetinfer_cuda import driver as D
    from hetinfer_cuda import kernels as KN
    from hetinfer_cuda import packed as PK
    from hetinfer_cuda.bench import _Events, _graph_us
    alloc = get_allocator("cuda:0")
    dev = D.get_device(0)
    ev = _Events(dev)
    seeds = itertools.count(1)
    per_token = {}                      # (model, fmt) -> [default us, best us] summed over layers

    def copies(nbytes):
        return max(2, min(32, -(-256_000_000 // nbytes)))

    def fill(t, lo, hi_):
        KN.fill_uniform(t, lo, hi_, next(seeds))

    def timed(fn_of):
        """median us of fn_of(i) over calls cycling i"""
        it = itertools.count()
        fn = lambda: fn_of(next(it))
        fn()
        alloc.synchronize()
        return statistics.median(_graph_us(alloc, ev, fn) for _ in range(5))

    for label, N, K in SHAPES:
        model = label.split()[0]
        x = hi.empty((1, K), "f16", "cuda")
        fill(x, -1.0, 1.0)
        y = hi.empty((1, N), "f16", "cuda")
        row = {"shape": label, "N": N, "K": K}
        # f16
        nb16 = N * K * 2
        w16 = []
        for _ in range(copies(nb16)):
            t = hi.empty((N, K), "f16", "cuda")
            fill(t, -(3.0 / K) ** 0.5, (3.0 / K) ** 0.5)
            w16.append(t)
        us16 = timed(lambda i, w=w16, x=x, y=y: ops.matmul(x, w[i % len(w)], out=y))
        w16.clear()
        # int8, group 64 f16 scales
        nb8 = N * K + N * K // 64 * 2
        w8 = []
        for _ in range(copies(nb8)):
            q = hi.empty((N, K), "i8", "cuda")
            fill(Tensor(q.buffer, (N * K // 2,), hi.f16), -1.0, 1.0)
            sc = hi.empty((N, K // 64), "f16", "cuda")
            fill(sc, 0.5 * (3.0 / K) ** 0.5 / 64, (3.0 / K) ** 0.5 / 64)
            w8.append((q, sc))
        us8 = timed(lambda i, w=w8, x=x, y=y: ops.matmul(x, w[i % len(w)][0], scales=w[i % len(w)][1], out=y))
        w8.clear()
        emit(bench="baseline", **row, f16_us=round(us16, 2), f16_gbs=round(nb16 / us16 / 1e3, 1),
             int8_us=round(us8, 2), int8_gbs=round(nb8 / us8 / 1e3, 1))
        for name in ("q4_k", "q8_0"):
            f = hi.dtype(name).packed
            nbq = N * (K // f.block) * f.nbytes
            wq = []
            for _ in range(copies(nbq)):
                t = hi.empty((N, K // f.block), name, "cuda")
                fill(Tensor(t.buffer, (nbq // 2,), hi.f16), -1e-3, 1e-3)   # every f16 field finite
                wq.append(t)
            usq = timed(lambda i, w=wq, x=x, y=y: ops.matmul(x, w[i % len(w)], out=y))
            default = PK.plan(dev, name, N, K, 1, False)
            times = {}
            if sweep:
                for pl in plans(name, K, full_sweep):
                    blocks = pl[3] * dev.sm_count or None
                    times[pl] = timed(lambda i, w=wq, x=x, y=y, n=name, pl=pl, b=blocks:
                                      PK.packed_gemv(x, w[i % len(w)], n, N, K, y, plan=pl[:3], blocks=b))
            best = min(times, key=times.get) if times else None
            wq.clear()
            emit(bench="packed", fmt=name, **row, us=round(usq, 2), gbs=round(nbq / usq / 1e3, 1),
                 pct_hbm=round(100 * nbq / (usq * 1e-6) / HBM, 1),
                 vs_f16=round(us16 / usq, 2), vs_int8=round(us8 / usq, 2), plan=list(default[:3]),
                 grid=default.grid, best=list(best) if best else None,
                 best_us=round(times[best], 2) if best else None,
                 best_pct_hbm=round(100 * nbq / (times[best] * 1e-6) / HBM, 1) if best else None,
                 sweep={",".join(map(str, k)): round(v, 2) for k, v in sorted(times.items(), key=lambda kv: kv[1])})
            acc = per_token.setdefault((model, name), [0.0, 0.0, 0.0])
            acc[0] += usq * LAYERS[model]
            acc[1] += (times[best] if best else usq) * LAYERS[model]
            acc[2] += us16 * LAYERS[model]
        alloc.empty_cache() if hasattr(alloc, "empty_cache") else None
    for (model, name), (d, b, f16) in per_token.items():
        emit(bench="per token (layer products only)", model=model, fmt=name, default_us=round(d, 1),
             best_us=round(b, 1), f16_us=round(f16, 1), default_vs_f16=round(f16 / d, 2), best_vs_f16=round(f16 / b, 2))


def compile_only(module: str, dt: str) -> None:
    """Compile one NVRTC module into the disk cache (run in parallel processes first)."""
    from hetinfer_cuda import driver as D
    dev = D.get_device(0)
    if module == "packed":
        D.packed_kernel(dev, dt, "dequant_q8_0")
    else:
        D.kernel(dev, dt, "cast_to_f32" if dt != "f32" else "cast_to_f16")


def warm(modules) -> float:
    import subprocess
    t0 = time.time()
    procs = [subprocess.Popen([sys.executable, __file__, "--compile-only", *mod]) for mod in modules]
    for p in procs:
        p.wait()
    return time.time() - t0


def main(argv=None) -> int:
    if argv is None and len(sys.argv) == 4 and sys.argv[1] == "--compile-only":
        compile_only(*sys.argv[2:])
        return 0
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--no-sweep", action="store_true", help="time the default plan only")
    ap.add_argument("--full-sweep", action="store_true", help="every (chunk, split, in flight) plan, one wave")
    args = ap.parse_args(argv)
    import hetinfer_cuda
    if not hetinfer_cuda.probe()["available"]:
        emit(error="no CUDA device", reason=hetinfer_cuda.probe()["reason"])
        return 2
    from hetinfer_cuda import driver as D
    from hetinfer_cuda import packed as PK
    mods = [("packed", "f16"), ("packed", "bf16"), ("packed", "f32"), ("ops", "f16")]
    emit(warm_compile_s=round(warm(mods), 1), modules=len(mods))
    emit(registered_here=PK.ensure_registered(), device=repr(D.get_device(0)))
    A = D._drv().CUfunction_attribute
    for fn in ("gemv_q4_k_m1", "gemv_q8_0_m1", "gemv_q4_k_m8", "gemv_q8_0_m8"):
        f = D.packed_kernel(D.get_device(0), "f16", fn)
        emit(kernel=fn, registers=D.check(D._drv().cuFuncGetAttribute(A.CU_FUNC_ATTRIBUTE_NUM_REGS, f)),
             local_bytes=D.check(D._drv().cuFuncGetAttribute(A.CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES, f)),
             static_shared=D.check(D._drv().cuFuncGetAttribute(A.CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, f)))
    rng = np.random.default_rng(0)
    t0 = time.time()
    fails = 0
    if not args.no_check:
        fails = check_correctness(rng)
        emit(check="summary", fails=fails, seconds=round(time.time() - t0, 1), result="PASS" if not fails else "FAIL")
    if not args.no_bench:
        bench(rng, not args.no_sweep, args.full_sweep)
    emit(compile_stats={"nvrtc_compiles": D.stats.nvrtc_compiles, "disk_hits": D.stats.disk_hits},
         seconds=round(time.time() - t0, 1))
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
