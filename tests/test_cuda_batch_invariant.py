"""Batch-invariant matmul on CUDA (HETINFER_CUDA_BATCH_INVARIANT=1, the gemm_bi kernels).

With the flag every f16/bf16-weight matmul runs the tensor-core GEMM whose arithmetic for
an output element depends on K alone: a row's result must be bit-identical whether it is
computed alone (M = 1) or inside a batch of any size, at any position. Needs a CUDA GPU
(skipped otherwise, never faked); the flag is the module's, monkeypatched.
"""

from __future__ import annotations

import numpy as np
import pytest

hetinfer_cuda = pytest.importorskip("hetinfer_cuda")

import hetinfer  # noqa: E402
from hetinfer import ops  # noqa: E402
from hetinfer.ops import reference as R  # noqa: E402

CUDA = hetinfer_cuda.probe()["available"]
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device: "
                                + (hetinfer_cuda.probe()["reason"] or "?"))
pytestmark = needs_cuda

TOL = {"f16": 3e-3, "bf16": 2e-2}
DTYPES = ("f16", "bf16")


@pytest.fixture
def bi(monkeypatch):
    """The flag on, and a count of gemm_bi launches (the path must really be taken)."""
    import hetinfer_cuda.kernels as K
    monkeypatch.setattr(K, "BATCH_INVARIANT", True)
    calls = []
    real = K._gemm_bi

    def spy(dev, key, a, w, y, y32, M, N, Kd):
        calls.append((key, M, N, Kd))
        return real(dev, key, a, w, y, y32, M, N, Kd)

    monkeypatch.setattr(K, "_gemm_bi", spy)
    return calls


def _rnd(rng, shape, dt, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(hetinfer.dtype(dt).np)


def _cu(a, dt=None):
    return hetinfer.tensor(a, dt, device="cuda")


def _close(got, want, dt):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.isfinite(got).all()
    err = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)
    assert err < TOL[dt], f"relative error {err:.3g} >= {TOL[dt]} ({dt})"


def _bits(a):
    a = np.ascontiguousarray(a)
    return a.view(np.uint16 if a.dtype.itemsize == 2 else np.uint32)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("m,n,k,bias", [
    (1, 96, 256, False), (3, 77, 129, True), (8, 128, 64, True), (17, 200, 320, True),
    (64, 130, 1000, False),          # K % 64 != 0 (BK tail), K % 8 == 0: cp.async path
    (300, 50, 17, False),            # K % 8 != 0: element loads, several M tiles
    (65, 2560, 2048, False),         # tinyllama qkv, a second M tile of one row
])
def test_matches_reference(bi, dt, m, n, k, bias):
    rng = np.random.default_rng(m * 1000 + n + k)
    x, w = _rnd(rng, (m, k), dt), _rnd(rng, (n, k), dt, k ** -0.5)
    b = _rnd(rng, (n,), dt) if bias else None
    got = ops.matmul(_cu(x), _cu(w), bias=_cu(b) if bias else None).numpy()
    _close(got, R.matmul(x, w, b), dt)
    assert bi and all(c[1] == m and c[2] == n and c[3] == k for c in bi)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("n,k", [(200, 2048), (2560, 1000), (96, 131), (48, 8)])
def test_rows_bit_identical_across_batches(bi, dt, n, k):
    """Each row alone (M = 1) == the same row in batches of 2, 17, 64, 300 at other positions."""
    rng = np.random.default_rng(n + k)
    total = 300
    x, w = _rnd(rng, (total, k), dt, 2.0), _rnd(rng, (n, k), dt, k ** -0.5)
    wd = _cu(w)
    probe = [0, 1, 15, 16, 31, 63, 64, 150, 299]
    alone = {i: ops.matmul(_cu(x[i:i + 1]), wd).numpy()[0] for i in probe}
    for i in probe:
        _close(alone[i], R.matmul(x[i:i + 1], w)[0], dt)
    for size in (2, 17, 64, 300):
        for shift in (0, 7, size - 1):
            # a batch of `size` rows of x, rolled so each probed row sits elsewhere
            rows = [(j + shift) % total for j in range(size)]
            for i in probe:
                if i not in rows:
                    rows[(i * 13 + shift) % size] = i
            got = ops.matmul(_cu(x[rows]), wd).numpy()
            for pos, r in enumerate(rows):
                if r in alone:
                    assert np.array_equal(_bits(got[pos]), _bits(alone[r])), \
                        f"row {r} alone != row {r} at position {pos} of a batch of {size} ({dt}, n={n}, k={k})"
    assert {c[1] for c in bi} >= {1, 2, 17, 64, 300}


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("k,n,act,norm,residual,bias", [
    (2048, 2560, None, True, False, False),        # qkv: f32 x through the norm, dt out
    (2048, 2 * 704, "swiglu", True, False, False),  # gate/up: norm and swiglu
    (1000, 2048, None, False, True, False),        # down: f32 residual in place (K % 64 != 0)
    (136, 90, None, True, False, True),            # bias, norm, small K
    (129, 2 * 40, "swiglu", False, True, True),    # everything, K % 8 != 0
])
def test_epilogues_reference_and_invariant(bi, dt, k, n, act, norm, residual, bias):
    """The model's layouts (f32 residual stream): vs float64, and row 0 / row 37 alone ==
    the same rows in a batch of 64."""
    rng = np.random.default_rng(k * 7 + n)
    M = 64
    x_dt = "f32" if norm or residual else dt
    x = _rnd(rng, (M, k), x_dt, 3.0)
    w = _rnd(rng, (n, k), dt, k ** -0.5)
    b = _rnd(rng, (n,), dt) if bias else None
    nw = (_rnd(rng, (k,), dt, 0.3) + 1).astype(hetinfer.dtype(dt).np) if norm else None
    no = n // 2 if act else n
    r = _rnd(rng, (M, no), "f32") if residual else None
    wd, bd, nwd = _cu(w), _cu(b) if bias else None, _cu(nw) if norm else None

    def run(rows):
        if residual:
            out = _cu(r[rows])
        else:
            out = hetinfer.empty((len(rows), no), dt, device="cuda")
        ops.matmul(_cu(x[rows]), wd, bd, out=out, norm_weight=nwd, eps=1e-5, act=act,
                   residual=out if residual else None)
        return out.numpy()

    full = run(list(range(M)))
    want = R.matmul(x, w, b, norm_weight=nw, eps=1e-5, act=act, residual=r)
    _close(full, want, dt)
    for i in (0, 37):
        assert np.array_equal(_bits(run([i])[0]), _bits(full[i])), f"row {i} alone != in the batch"
    assert bi


@pytest.mark.parametrize("dt", DTYPES)
def test_f32_logits_direct(bi, dt):
    """The head: dt x, f32 out written by the kernel itself (no rounding to dt first)."""
    rng = np.random.default_rng(5)
    x, w = _rnd(rng, (20, 256), dt), _rnd(rng, (1000, 256), dt, 256 ** -0.5)
    out = hetinfer.empty((20, 1000), "f32", device="cuda")
    ops.matmul(_cu(x), _cu(w), out=out)
    got = out.numpy()
    _close(got, R.matmul(x, w), dt)
    one = hetinfer.empty((1, 1000), "f32", device="cuda")
    ops.matmul(_cu(x[3:4]), _cu(w), out=one)
    assert np.array_equal(_bits(one.numpy()[0]), _bits(got[3]))


def test_graph_capture_replays(bi):
    """gemm_bi launches allocate nothing: a captured product replays with new inputs."""
    from hetinfer.device import get_allocator
    alloc = get_allocator("cuda:0")
    rng = np.random.default_rng(9)
    x1, x2 = _rnd(rng, (33, 320), "f16"), _rnd(rng, (33, 320), "f16")
    w = _rnd(rng, (200, 320), "f16", 320 ** -0.5)
    xd, wd = _cu(x1), _cu(w)
    out = hetinfer.empty((33, 200), "f16", device="cuda")
    ops.matmul(xd, wd, out=out)                           # eager warm-up (compiles, caches)
    eager = out.numpy()
    replay = alloc.capture(lambda: ops.matmul(xd, wd, out=out))
    out.fill_(0)
    replay()
    assert np.array_equal(_bits(out.numpy()), _bits(eager))
    xd.copy_(x2)                                          # new input, same graph
    replay()
    _close(out.numpy(), R.matmul(x2, w), "f16")
