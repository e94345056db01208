"""Batch-invariant GEMM (gemm_bi, ops.cu) against cuBLAS on tinyllama's matmul shapes.

    python3 backends/cuda/scripts/bench_gemm.py [--dtype f16] [--m 1,16,64,512]

Each product is timed as 20 launches captured in one CUDA graph, replayed 10 times
between CUDA events (GPU time per launch, no host launch cost); GB/s counts W, x and y
once. Also checks that both agree (max |ours - cuBLAS| relative to max |y|). At M = 1
the default GEMV kernel (ops.matmul without the flag) is shown too.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

SHAPES = [("qkv", 2560, 2048), ("o", 2048, 2048), ("gate/up", 11264, 2048),
          ("down", 2048, 5632), ("head", 32000, 2048)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="f16")
    ap.add_argument("--m", default="1,16,64,512")
    args = ap.parse_args(argv)
    import hetinfer as hi
    from hetinfer import ops
    from hetinfer.device import get_allocator
    from hetinfer_cuda import cupy_bridge, kernels as K, driver as D
    from hetinfer_cuda.bench import _Events, _graph_us

    alloc = get_allocator("cuda:0")
    dev = D.get_device(0)
    ev = _Events(dev)
    have_cublas = cupy_bridge.cupy() is not None
    dt = args.dtype
    npdt = hi.dtype(dt).np
    rng = np.random.default_rng(0)
    ms = [int(m) for m in args.m.split(",")]

    def timed(fn):
        fn()
        try:
            return _graph_us(alloc, ev, fn), ""
        except Exception as e:      # noqa: BLE001 - fall back to eager launches
            alloc.synchronize()
            ev.start()
            for _ in range(50):
                fn()
            return ev.stop_ms() * 1e3 / 50, f"eager ({type(e).__name__})"

    print(f"{dev!r}, {dt}, cuBLAS {'yes' if have_cublas else 'NO'}; tiles: _gemm_bi_tile(M, N)")
    hdr = f"{'shape':8} {'N':>6} {'K':>5} {'M':>4} {'tile':>7} | {'ours us':>8} {'GB/s':>6} | " \
          f"{'cuBLAS us':>9} {'GB/s':>6} | {'ours/cuBLAS':>11} | {'gemv us':>7} | rel.diff"
    print(hdr)
    print("-" * len(hdr))
    for name, N, Kd in SHAPES:
        w = hi.tensor((rng.random((N, Kd), dtype=np.float32) - 0.5).astype(npdt) * np.asarray(Kd ** -0.5, npdt),
                      dt, device="cuda")
        for M in ms:
            x = hi.tensor((rng.random((M, Kd), dtype=np.float32) * 2 - 1).astype(npdt), dt, device="cuda")
            y = hi.empty((M, N), dt, device="cuda")
            y2 = hi.empty((M, N), dt, device="cuda")
            nbytes = (N * Kd + M * Kd + M * N) * 2
            ours, note = timed(lambda: K._gemm_bi(dev, dt, x, w, y, 0, M, N, Kd))
            bm, bn = K._gemm_bi_tile(dev, M, N)
            cub = float("nan")
            if have_cublas:
                cub, n2 = timed(lambda: cupy_bridge.gemm(dev, dt, K._p(x), K._p(w), K._p(y2), M, N, Kd))
                # cuBLAS through CuPy did not capture on the H200 (NotImplementedError): eager
                # launches, so its small times are the host's launch floor (~17 us), not GPU time
                note = f"ours: {note or 'graph'}, cuBLAS: {n2 or 'graph'}"
            gv = float("nan")
            if M == 1:
                old = K.BATCH_INVARIANT
                K.BATCH_INVARIANT = False
                try:
                    y3 = hi.empty((M, N), dt, device="cuda")
                    gv, n3 = timed(lambda: ops.matmul(x, w, out=y3))
                finally:
                    K.BATCH_INVARIANT = old
            a, b = y.numpy().astype(np.float64), y2.numpy().astype(np.float64)
            rel = np.abs(a - b).max() / max(np.abs(b).max(), 1e-30) if have_cublas else float("nan")
            print(f"{name:8} {N:6d} {Kd:5d} {M:4d} {bm:>3}x{bn:<3} | {ours:8.2f} {nbytes / ours / 1e3:6.0f} | "
                  f"{cub:9.2f} {nbytes / cub / 1e3:6.0f} | {ours / cub:11.2f} | {gv:7.2f} | {rel:.1e} {note}",
                  flush=True)
            del x, y, y2
        del w
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    sys.exit(main())
