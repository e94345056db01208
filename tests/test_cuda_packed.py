"""GGUF weights kept packed on CUDA (backends/cuda/hetinfer_cuda/packed.py, csrc/packed.cu).

Without a GPU only the table checks run. On a GPU: every format's matmul (fused GEMV for
M <= 8, dequantize + cuBLAS above) against the float64 product with the gguf package's own
dequantization of the same bytes, the fused prologue/epilogues, and dequant_<fmt> exactness.
The device script backends/cuda/scripts/packed_check.py runs the same checks with timings.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

hetinfer_cuda = pytest.importorskip("hetinfer_cuda")

import hetinfer as hi
from hetinfer_cuda import packed as PK

CUDA = hetinfer_cuda.probe()["available"]
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device: " + (hetinfer_cuda.probe()["reason"] or "?"))
FORMATS = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k")
TOL = {"f32": 2e-4, "f16": 2e-3, "bf16": 1.5e-2}


# ---------------------------------------------------------------- no GPU needed
def test_table_matches_gguf():
    gguf = pytest.importorskip("gguf")
    from gguf.constants import GGML_QUANT_SIZES
    from gguf.constants import GGMLQuantizationType as GT
    assert set(PK.FORMATS) == set(FORMATS)
    for name in FORMATS:
        assert PK._TABLE[name] == GGML_QUANT_SIZES[GT[name.upper()]], name
        assert PK.row_bytes(name, 4096) == 4096 // PK._TABLE[name][0] * PK._TABLE[name][1]
    del gguf


def test_staging_holds_a_chunk():
    """A row's chunk (up to 64 or 128 items) plus its alignment slack fits a staging window; 8
    warps' ring of windows leaves room for x at decode shapes."""
    for name in FORMATS:
        block, nbytes = PK._TABLE[name]
        for ck in (32, 64, 128):
            if ck > PK._chunk(name) or ck % (block // 32):
                continue
            win = PK._win(name, ck)
            assert win % 16 == 0 and win - 16 >= 15 + ck // (block // 32) * nbytes + 15, (name, ck)
        assert PK._smem(name, 1, 11008) + PK._static(1) <= 227 * 1024, name      # the H100/H200 opt-in limit
        assert PK._smem(name, 4, 4096) + PK._static(4) <= 227 * 1024, name       # M = 4 in one pass


class _FakeDev:
    """What packed.plan reads of a device: an H200's multiprocessors and shared memory."""
    index, sm_count, smem_optin = 99, 132, 227 * 1024


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(FORMATS), n=st.integers(1, 40000), kb=st.integers(1, 64), m=st.sampled_from([1, 2, 4, 8]),
       swiglu=st.booleans(), force=st.none() | st.tuples(st.sampled_from([32, 64, 128]), st.sampled_from([1, 2, 4, 8]),
                                                          st.integers(1, 3)))
def test_plan_is_launchable(name, n, kb, m, swiglu, force):
    """Every plan the launcher makes (or is forced to) is one the kernel can run: a power-of-two
    split with a chunk for each warp of a slot, a chunk of whole blocks within CHUNK, shared
    memory within the opt-in limit, a grid that covers at least one slot's pair."""
    block = PK._TABLE[name][0]
    K = kb * block if block == 256 else kb * 64
    N = max(2, n) if swiglu else n
    dev = _FakeDev()
    PK._smem_per_sm[dev.index] = 228 * 1024         # (what resident_blocks would read of it)
    if PK._smem(name, m, K) + PK._static(m) > dev.smem_optin:
        return                                     # gemv_fused halves m first
    if force and (force[0] > PK._chunk(name) or force[0] % (block // 32)):
        with pytest.raises(ValueError):
            PK.plan(dev, name, N, K, m, swiglu, force)
        return
    p = PK.plan(dev, name, N, K, m, swiglu, force)
    cpr = -(-(K // 32) // p.ck)
    assert p.sk in (1, 2, 4, 8) and p.sk <= cpr
    assert p.ck % 32 == 0 and p.ck % (block // 32) == 0 and p.ck <= PK._chunk(name)
    assert 1 <= p.la <= 3 and p.shared == PK._smem(name, m, K, p.ck, p.la)
    assert p.shared + PK._static(m) <= dev.smem_optin
    pairs = N // 2 if swiglu else -(-N // 2)
    assert 1 <= p.grid <= -(-pairs // (8 // p.sk))


def test_names_and_errors():
    assert PK.fmt_name("Q4_K") == "q4_k" and PK.fmt_name(hi.dtype("q6_k")) == "q6_k"
    with pytest.raises(hi.DTypeError):
        PK.fmt_name("q3_k")
    with pytest.raises(hi.ShapeError):
        PK.row_bytes("q4_k", 4000)


# ---------------------------------------------------------------- GPU
def _random_packed(name, N, K, rng):
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
    for off in f.scales:      # d (and dmin)
        d = rng.uniform(0.5, 1.0, (N, nb)).astype(np.float16) * np.float16(4.0 / (63 * 15 * np.sqrt(K)))
        raw[:, :, off:off + 2] = d.view(np.uint8).reshape(N, nb, 2)
    return raw.reshape(N, nb * f.nbytes)


_cache: dict = {}


def _weight(name):
    """(device packed weight, float64 (N, K) reference weight); rows not 16-byte aligned for
    the 2-byte aligned formats, several chunks and a partial one per row, an odd N (a warp's
    last pair of rows has one)."""
    if name not in _cache:
        pytest.importorskip("gguf")
        from hetinfer import packed as HP
        from hetinfer.ops import reference as R
        K = 2080 if hi.dtype(name).packed.block == 32 else 2816
        N = 67
        raw = _random_packed(name, N, K, np.random.default_rng(hash(name) % 1000))
        _cache[name] = (HP.from_bytes(raw, name, (N, K), "cuda"), R.dequantize_packed(raw, name))
    return _cache[name]


@pytest.fixture(scope="module", autouse=True)
def _registered():
    if CUDA:
        PK.ensure_registered()


def _err(y, ref):
    y = np.asarray(y, np.float64)
    assert np.isfinite(y).all()
    return float(np.abs(y - ref).max() / np.abs(ref).max())


@needs_cuda
@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("dt,M", [("f16", 1), ("f16", 3), ("f16", 8), ("f16", 16), ("bf16", 1), ("bf16", 16),
                                  ("f32", 2), ("f32", 16)])
def test_matmul_matches_gguf(name, dt, M):
    from hetinfer import ops
    w, W = _weight(name)
    rng = np.random.default_rng(M)
    xh = rng.standard_normal((M, W.shape[1])).astype(hi.dtype(dt).np)
    y = ops.matmul(hi.tensor(xh, dt, "cuda"), w)
    assert y.dtype.name == dt and y.shape == (M, W.shape[0])
    assert _err(y.numpy(), np.asarray(xh, np.float64) @ W.T) <= TOL[dt]


@needs_cuda
@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("M", [1, 5, 16])
def test_fused_prologue_epilogues(name, M):
    """rms_norm + bias from an f32 stream into f16; f16 x into the f32 residual in place; swiglu."""
    from hetinfer import ops
    from hetinfer.ops import reference as R
    w, W = _weight(name)
    N, K = W.shape
    rng = np.random.default_rng(7 + M)
    xh = rng.standard_normal((M, K)).astype(np.float32)
    nwh = (1 + 0.1 * rng.standard_normal(K)).astype(np.float16)
    bh = (0.1 * rng.standard_normal(N)).astype(np.float16)
    out = hi.empty((M, N), "f16", "cuda")
    ops.matmul(hi.tensor(xh, "f32", "cuda"), w, hi.tensor(bh, "f16", "cuda"), out=out,
               norm_weight=hi.tensor(nwh, "f16", "cuda"), eps=1e-5)
    assert _err(out.numpy(), R.matmul(xh, W, bias=bh, norm_weight=nwh, eps=1e-5)) <= TOL["f16"]
    x16 = xh.astype(np.float16)
    rh = rng.standard_normal((M, N)).astype(np.float32)
    res = hi.tensor(rh, "f32", "cuda")
    ops.matmul(hi.tensor(x16, "f16", "cuda"), w, out=res, residual=res)
    assert _err(res.numpy(), R.matmul(x16, W, residual=rh)) <= TOL["f16"]
    ys = ops.matmul(hi.tensor(x16, "f16", "cuda"), w[:N - 1], act="swiglu")    # [gate | up]: even rows
    assert ys.shape == (M, (N - 1) // 2)
    assert _err(ys.numpy(), R.matmul(x16, W[:N - 1], act="swiglu")) <= TOL["f16"]


@needs_cuda
@pytest.mark.parametrize("name", FORMATS)
def test_dequant_is_exact(name):
    w, W = _weight(name)
    N, K = W.shape
    for dt in ("f32", "f16", "bf16"):
        out = hi.empty((N, K), dt, "cuda")
        PK.packed_dequant(w, name, N, K, out)
        np.testing.assert_array_equal(out.numpy(), W.astype(np.float32).astype(hi.dtype(dt).np))


@needs_cuda
def test_gemv_passes_and_grid_override():
    """M = 8 rows in one pass and the grid override give the same result as the default."""
    w, W = _weight("q4_k")
    N, K = W.shape
    xh = np.random.default_rng(3).standard_normal((8, K)).astype(np.float16)
    x = hi.tensor(xh, "f16", "cuda")
    a = PK.packed_gemv(x, w, "q4_k", N, K, hi.empty((8, N), "f16", "cuda"))
    b = PK.packed_gemv(x, w, "q4_k", N, K, hi.empty((8, N), "f16", "cuda"), blocks=1)
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert _err(a.numpy(), np.asarray(xh, np.float64) @ W.T) <= TOL["f16"]


@needs_cuda
@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("plan,blocks", [((32, 2, 1), None), ((32, 8, 3), None), ((64, 4, 2), None),
                                         ((128, 1, 3), None), ((32, 2, 2), 1), ((64, 8, 1), 1)])
def test_every_plan_matches_gguf(name, plan, blocks):
    """Split-K over 2-8 warps, small chunks, 1-3 chunks in flight, and one block walking every
    row pair in rounds: the same products, norm prologue, residual and swiglu epilogues."""
    from hetinfer.ops import reference as R
    w, W = _weight(name)
    N, K = W.shape
    plan = (min(plan[0], PK._chunk(name)),) + plan[1:]     # the 32-value formats' chunks: up to 64
    rng = np.random.default_rng(11)
    for M in (1, 3):
        xh = rng.standard_normal((M, K)).astype(np.float16)
        nwh = (1 + 0.1 * rng.standard_normal(K)).astype(np.float16)
        rh = rng.standard_normal((M, N)).astype(np.float32)
        x = hi.tensor(xh, "f16", "cuda")
        res = hi.tensor(rh, "f32", "cuda")
        PK.packed_gemv(x, w, name, N, K, res, residual=res, norm_weight=hi.tensor(nwh, "f16", "cuda"), eps=1e-5,
                       plan=plan, blocks=blocks)
        assert _err(res.numpy(), R.matmul(xh, W, norm_weight=nwh, eps=1e-5, residual=rh)) <= TOL["f16"], M
        ys = PK.packed_gemv(x, w[:N - 1], name, N - 1, K, hi.empty((M, (N - 1) // 2), "f16", "cuda"), act="swiglu",
                            plan=plan, blocks=blocks)
        assert _err(ys.numpy(), R.matmul(xh, W[:N - 1], act="swiglu")) <= TOL["f16"], M
