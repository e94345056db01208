"""Tests of the CUDA backend (backends/cuda, dist hetinfer-cuda).

Without a GPU (CI) only the registration tests run: the cuda device type must be
registered unavailable, with a reason. The rest needs a CUDA GPU and is skipped,
never faked. Kernel correctness against the float64 references is the conformance
suite's job (`pytest --hetinfer-device=cuda`); the op checks here are a quick
smoke test of each kernel path (GEMV, cuBLAS, vectorised and scalar loads, GQA).
"""

from __future__ import annotations

import sys
import uuid

import numpy as np
import pytest

hetinfer_cuda = pytest.importorskip("hetinfer_cuda")

import hetinfer  # noqa: E402
from hetinfer import ops  # noqa: E402
from hetinfer.ops import reference as R  # noqa: E402

CUDA = hetinfer_cuda.probe()["available"]
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device: "
                                + (hetinfer_cuda.probe()["reason"] or "?"))


# ---------------------------------------------------------------- no GPU needed
def _registered():
    got = []
    hetinfer_cuda.register_devices(register=got.append)
    return got


def test_import_needs_no_cuda():
    """Importing the package pulls in neither cuda.bindings nor cupy."""
    import subprocess
    code = ("import sys, hetinfer_cuda, hetinfer_cuda.driver, hetinfer_cuda.kernels, "
            "hetinfer_cuda.allocator, hetinfer_cuda.cupy_bridge; "
            "print(any(m.startswith(('cuda.bindings', 'cupy')) for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_device_registered_with_reason_or_available():
    (dt,) = _registered()
    assert dt.name == "cuda"
    if dt.available:
        assert dt.count >= 1 and dt.make_allocator is not None
    else:
        assert dt.reason, "an unavailable cuda device must say why"
        assert dt.count == 0


def test_unavailable_device_registers_no_kernels():
    if CUDA:
        pytest.skip("a CUDA device is present")
    got = []
    hetinfer_cuda.register_kernels(register=lambda *a, **k: got.append(a))
    assert got == []


def test_hetinfer_devices_lists_cuda():
    """Through the entry point (when hetinfer-cuda is installed): `hetinfer devices` sees it."""
    from importlib.metadata import entry_points
    if not any(ep.name == "cuda" for ep in entry_points(group="hetinfer")):
        pytest.skip("hetinfer-cuda is not installed as a distribution (no entry point)")
    devs = {d.name: d for d in hetinfer.devices()}
    assert "cuda" in devs
    assert devs["cuda"].available == CUDA
    if not CUDA:
        assert devs["cuda"].reason
        with pytest.raises(hetinfer.DeviceError, match="not available"):
            hetinfer.empty((2,), "f32", "cuda")


def test_reason_names_missing_bindings(monkeypatch):
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    monkeypatch.setitem(sys.modules, "cuda.bindings.driver", None)
    try:
        p = hetinfer_cuda.probe(refresh=True)
        assert not p["available"]
        assert "cuda-bindings not installed" in p["reason"]
        assert "hetinfer-cuda[cuda13]" in p["reason"]
    finally:
        monkeypatch.undo()
        hetinfer_cuda.probe(refresh=True)


def test_size_classes():
    from hetinfer_cuda.allocator import size_class
    assert size_class(0) == 512 and size_class(1) == 512 and size_class(512) == 512
    assert size_class(513) == 1024
    assert size_class(1 << 20) == 1 << 20
    assert size_class((1 << 20) + 1) == 2 << 20
    assert size_class(3 << 20) == 4 << 20


# ---------------------------------------------------------------- GPU: allocator
@pytest.fixture
def alloc():
    from hetinfer.device import get_allocator
    return get_allocator("cuda:0")


@needs_cuda
def test_allocator_reuses_freed_blocks(alloc):
    alloc.synchronize()
    b1 = alloc.alloc(1000)
    p1 = b1.handle
    s0 = alloc.stats()
    assert s0["allocated"] >= 1024 and s0["reserved"] >= s0["allocated"] and s0["peak"] >= s0["allocated"]
    del b1
    s1 = alloc.stats()
    assert s1["allocated"] == s0["allocated"] - 1024
    assert s1["reserved"] == s0["reserved"]                     # cached, not given back
    b2 = alloc.alloc(900)                                         # same 1024-byte class
    assert b2.handle == p1
    s2 = alloc.stats()
    assert s2["num_reuses"] == s1["num_reuses"] + 1
    assert s2["num_mallocs"] == s1["num_mallocs"]
    big = alloc.alloc(3 << 20)                                    # 4 MiB class
    assert alloc.stats()["allocated"] == s2["allocated"] + (4 << 20)
    assert alloc.stats()["peak"] >= alloc.stats()["allocated"]
    del big, b2


@needs_cuda
def test_allocator_empty_cache(alloc):
    b = alloc.alloc(5 << 20)
    del b
    assert alloc.stats()["cached"] >= 6 << 20
    alloc.empty_cache()
    s = alloc.stats()
    assert s["cached"] == 0 and s["reserved"] == s["allocated"]


@needs_cuda
def test_out_of_memory_message(alloc):
    req = 1 << 50   # 1 PiB
    with pytest.raises(hetinfer.OutOfMemoryError) as ei:
        alloc.alloc(req)
    msg = str(ei.value)
    s = alloc.stats()
    assert f"requested {req} bytes" in msg
    assert f"allocated {s['allocated']} bytes" in msg
    assert f"reserved {s['reserved']} bytes" in msg
    assert s["num_ooms"] >= 1
    x = hetinfer.tensor(np.arange(10, dtype=np.float32), device="cuda")   # still usable
    assert np.array_equal(x.numpy(), np.arange(10, dtype=np.float32))


@needs_cuda
def test_copies_roundtrip(alloc):
    a = np.random.default_rng(0).standard_normal((37, 53)).astype(np.float32)
    t = hetinfer.tensor(a, device="cuda")
    assert t.device == hetinfer.Device("cuda", 0)
    assert np.array_equal(t.numpy(), a)
    assert np.array_equal(t[3:7, 5:9].numpy(), a[3:7, 5:9])            # strided view to host
    u = hetinfer.empty((37, 53), "f32", "cuda")
    alloc.copy(u.buffer, 0, t.buffer, 0, t.nbytes)                     # device to device
    assert np.array_equal(u.to("cpu").numpy(), a)


@needs_cuda
def test_cupy_allocations_come_from_our_pool(alloc):
    from hetinfer_cuda import cupy_bridge
    cp = cupy_bridge.cupy()
    if cp is None:
        pytest.skip(f"CuPy not usable: {cupy_bridge.reason()}")
    before = alloc.stats()["allocated"]
    arr = cp.ones((1 << 20,), cp.float32)                              # 4 MiB
    assert alloc.stats()["allocated"] == before + (4 << 20)
    assert cp.cuda.get_current_stream().ptr == alloc.cu.stream_handle
    assert float(arr.sum()) == float(1 << 20)
    del arr
    assert alloc.stats()["allocated"] == before


# ---------------------------------------------------------------- GPU: NVRTC and the driver
_TINY = 'extern "C" __global__ void tiny_%s(float* p) { p[threadIdx.x] = 2.f * threadIdx.x; }'


@needs_cuda
def test_disk_cache_hit_on_second_compile(tmp_path, monkeypatch):
    from hetinfer_cuda import driver as D
    monkeypatch.setenv("HETINFER_CACHE", str(tmp_path))
    tag = uuid.uuid4().hex[:12]
    src = _TINY % tag
    dev = D.get_device(0)
    c0, h0 = D.stats.nvrtc_compiles, D.stats.disk_hits
    cubin1 = D.compile_cubin(src, "tiny", (), dev.arch)
    assert D.stats.nvrtc_compiles == c0 + 1 and D.stats.disk_hits == h0
    files = list((tmp_path / "cuda").glob("tiny-*.cubin"))
    assert len(files) == 1
    cubin2 = D.compile_cubin(src, "tiny", (), dev.arch)                # a second start: from disk
    assert cubin2 == cubin1
    assert D.stats.nvrtc_compiles == c0 + 1 and D.stats.disk_hits == h0 + 1
    # and the cached CUBIN loads and runs
    fn = dev.function(src, "tiny", f"tiny_{tag}")
    assert D.stats.nvrtc_compiles == c0 + 1
    out = hetinfer.empty((32,), "f32", "cuda")
    D.launch(dev, fn, (1,), (32,), [D.Arg.ptr(out.buffer.handle)])
    assert np.array_equal(out.numpy(), 2 * np.arange(32, dtype=np.float32))


@needs_cuda
def test_compile_error_has_nvrtc_log(tmp_path, monkeypatch):
    from hetinfer_cuda import driver as D
    monkeypatch.setenv("HETINFER_CACHE", str(tmp_path))
    bad = 'extern "C" __global__ void broken(float* p) { p[0] = no_such_symbol_xyz; }'
    with pytest.raises(D.CompileError) as ei:
        D.compile_cubin(bad, "broken", (), D.get_device(0).arch)
    msg = str(ei.value)
    assert isinstance(ei.value, hetinfer.DeviceError)
    assert "no_such_symbol_xyz" in msg and "undefined" in msg
    assert "compile log" in msg and "--gpu-architecture=sm_" in msg


@needs_cuda
def test_launch_error_names_driver_error():
    from hetinfer_cuda import driver as D
    dev = D.get_device(0)
    fn = dev.function(_TINY % "launcherr", "tiny", "tiny_launcherr")
    out = hetinfer.empty((32,), "f32", "cuda")
    with pytest.raises(hetinfer.DeviceError, match="CUDA_ERROR_INVALID_VALUE"):
        D.launch(dev, fn, (1,), (4096,), [D.Arg.ptr(out.buffer.handle)])   # > 1024 threads


@needs_cuda
def test_kernels_registered_for_all_float_dtypes():
    from hetinfer import registry
    from hetinfer_cuda.kernels import KERNELS
    for op, _ in KERNELS:
        for dt in ("f32", "f16", "bf16"):
            assert registry.lookup(op, "cuda", dt).source == "cuda"


# ---------------------------------------------------------------- GPU: op smoke tests
TOL = {"f32": 2e-5, "f16": 3e-3, "bf16": 2e-2}
DTYPES = ("f32", "f16", "bf16")


def _rnd(rng, shape, dt, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(hetinfer.dtype(dt).np)


def _cu(a, dt=None):
    return hetinfer.tensor(a, dt, device="cuda")


def _close(got, want, dt):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.isfinite(got).all()
    err = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)
    assert err < TOL[dt], f"relative error {err:.3g} >= {TOL[dt]} ({dt})"


@needs_cuda
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("m,n,k,bias", [(1, 96, 256, False), (3, 77, 129, True), (8, 128, 64, True),
                                         (64, 200, 320, True), (33, 50, 17, False)])
def test_matmul_paths(dt, m, n, k, bias):
    rng = np.random.default_rng(m * 1000 + n)
    x, w = _rnd(rng, (m, k), dt), _rnd(rng, (n, k), dt, k ** -0.5)
    b = _rnd(rng, (n,), dt) if bias else None
    got = ops.matmul(_cu(x), _cu(w), bias=_cu(b) if bias else None).numpy()
    _close(got, R.matmul(x, w, b), dt)


@needs_cuda
@pytest.mark.parametrize("dt", DTYPES)
def test_norm_elementwise_softmax_argmax_cast(dt):
    rng = np.random.default_rng(1)
    x, w = _rnd(rng, (5, 4096), dt), _rnd(rng, (4096,), dt)
    _close(ops.rms_norm(_cu(x), _cu(w), eps=1e-5).numpy(), R.rms_norm(x, w, 1e-5), dt)
    x2, w2 = _rnd(rng, (3, 77), dt), _rnd(rng, (77,), dt)                 # scalar path
    _close(ops.rms_norm(_cu(x2), _cu(w2)).numpy(), R.rms_norm(x2, w2, 1e-6), dt)
    a, b = _rnd(rng, (7, 1000), dt), _rnd(rng, (7, 1000), dt)
    _close(ops.add(_cu(a), _cu(b)).numpy(), R.add(a, b), dt)
    _close(ops.swiglu(_cu(a), _cu(b)).numpy(), R.swiglu(a, b), dt)
    s = _rnd(rng, (4, 1500), dt, 10.0)
    _close(ops.softmax(_cu(s)).numpy(), R.softmax(s), dt)
    v = _rnd(rng, (3, 32000), dt, 5.0)
    v[1, 100] = v[1, 7] = v[1].max() + 1                                 # a tie: first index wins
    assert np.array_equal(ops.argmax(_cu(v)).numpy(), R.argmax(v))
    lg = _rnd(rng, (2, 300), dt)
    cnt = rng.integers(0, 3, (2, 300)).astype(np.int32)
    seen = (rng.random((2, 300)) < 0.3).astype(np.int32)
    _close(ops.penalties(_cu(lg), _cu(cnt), _cu(seen), 1.3, 0.2, 0.1).numpy(),
           R.penalties(lg, cnt, seen, 1.3, 0.2, 0.1), dt)
    for to in DTYPES:
        got = ops.cast(_cu(a), to).numpy()
        assert np.array_equal(got.astype(np.float64), R.cast(a, hetinfer.dtype(to).np).astype(np.float64))


@needs_cuda
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("style", ["half", "interleaved"])
def test_embedding_rope(dt, style):
    rng = np.random.default_rng(2)
    table = _rnd(rng, (1000, 256), dt)
    ids = np.array([0, 999, 5, 5, 17], np.int64)
    assert np.array_equal(ops.embedding(_cu(ids), _cu(table)).numpy(), R.embedding(ids, table))
    from hetinfer.rope import rope_table
    cos, sin = rope_table(64, 600)
    x = _rnd(rng, (6, 4, 64), dt)
    pos = np.array([0, 1, 2, 100, 599, 3], np.int32)
    xt = _cu(x)
    got = ops.rope(xt, _cu(pos), _cu(cos), _cu(sin), style=style).numpy()
    _close(got, R.rope(x, pos, cos, sin, style), dt)
    ops.rope(xt, _cu(pos), _cu(cos), _cu(sin), style=style, out=xt)      # in place
    _close(xt.numpy(), R.rope(x, pos, cos, sin, style), dt)


@needs_cuda
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("hq,hkv,d", [(8, 2, 128), (4, 4, 64), (6, 1, 40)])
def test_attention_prefill_decode_gqa(dt, hq, hkv, d):
    rng = np.random.default_rng(hq * 100 + d)
    S, T = 300, 37
    kc = _cu(_rnd(rng, (S, hkv, d), dt))
    vc = _cu(_rnd(rng, (S, hkv, d), dt))
    k_new, v_new = _rnd(rng, (T, hkv, d), dt), _rnd(rng, (T, hkv, d), dt)
    pos = np.arange(200, 200 + T, dtype=np.int32)
    ops.kv_cache_write(_cu(k_new), _cu(v_new), kc, vc, _cu(pos))
    kn, vn = kc.numpy(), vc.numpy()
    assert np.array_equal(kn[200:237], k_new) and np.array_equal(vn[200:237], v_new)
    q = _rnd(rng, (T, hq, d), dt)
    _close(ops.attention(_cu(q), kc, vc, _cu(pos)).numpy(),
           R.attention(q, kn, vn, pos, 1 / np.sqrt(d)), dt)
    q1 = _rnd(rng, (1, hq, d), dt)                                         # decode, i64 position
    p1 = np.array([S - 1], np.int64)
    _close(ops.attention(_cu(q1), kc, vc, _cu(p1), scale=0.1).numpy(),
           R.attention(q1, kn, vn, p1, 0.1), dt)


@needs_cuda
def test_strided_views_stay_on_device():
    rng = np.random.default_rng(3)
    a = _rnd(rng, (8, 12), "f32")
    big = _cu(np.full((8, 30), np.nan, np.float32))
    out = big[:, 1:25:2]                                                   # strided output view
    x = _cu(a.T.copy()).transpose(-2, -1)                                  # transposed input
    ops.add(x, _cu(a), out=out)
    got = big.numpy()
    assert np.allclose(got[:, 1:25:2], 2 * a)
    mask = np.ones(30, bool)
    mask[1:25:2] = False
    assert np.isnan(got[:, mask]).all()


@needs_cuda
@pytest.mark.parametrize("dt", ["f16", "bf16"])
@pytest.mark.parametrize("k,n,g,act,norm,residual,bias,sdt", [
    (2048, 2560, 64, None, True, False, False, "f16"),         # qkv of a 1B model: 1 row per warp
    (2048, 2 * 5632, 64, "swiglu", True, False, False, "f16"),  # its gate/up: 4 rows per warp
    (5632, 2048, 32, None, False, True, False, "f32"),         # its down, residual in place
    (896, 1152, 128, None, True, False, True, "f16"),          # Qwen2.5-0.5B qkv, with bias
    (576, 2 * 1536, 64, "swiglu", True, False, False, "f16"),  # SmolLM2 gate/up: 2 rows per warp
    (4096, 4 * 132 * 16 + 3, 64, None, False, False, True, "f32"),   # 4 rows, a ragged last warp
    (8192, 130, 128, None, False, False, False, "f16"),        # more chunks than in flight
])
def test_int8_decode_gemv_dp4a(monkeypatch, dt, k, n, g, act, norm, residual, bias, sdt):
    """The decode GEMV of int8 weights by dp4a (x in 16-bit fixed point, f16/bf16 runs)
    against the float64 reference and against the float kernel, in the model's layouts:
    f32 x with the norm prologue -> dt out, dt x -> f32 out with the residual in place."""
    import hetinfer_cuda.kernels as K
    rng = np.random.default_rng(k + n)
    x_dt = "f32" if norm else dt
    x = _rnd(rng, (1, k), x_dt, 3.0)
    x[0, 5] = 40.0                                             # an outlier channel
    w = rng.integers(-127, 128, size=(n, k)).astype(np.int8)
    s = rng.uniform(0.001, 0.02, size=(n, k // g)).astype(hetinfer.dtype(sdt).np)
    b = _rnd(rng, (n,), dt) if bias else None
    nw = (_rnd(rng, (k,), dt, 0.3) + 1).astype(hetinfer.dtype(dt).np) if norm else None
    no = n // 2 if act else n
    r = _rnd(rng, (1, no), "f32") if residual else None
    want = R.matmul(x, w, b, s, norm_weight=nw, eps=1e-5, act=act, residual=r)
    got = {}
    for dp4a in (True, False):
        monkeypatch.setattr(K, "DP4A", dp4a)
        out = _cu(r) if residual else hetinfer.empty((1, no), dt, device="cuda")
        ops.matmul(_cu(x), _cu(w), _cu(b) if bias else None, _cu(s), out=out,
                   norm_weight=_cu(nw) if norm else None, eps=1e-5, act=act, residual=out if residual else None)
        got[dp4a] = out.numpy()
        _close(got[dp4a], want, dt)
    _close(got[True], got[False], dt)


@needs_cuda
def test_swiglu_f32_out_keeps_tiny_results():
    """f16 inputs, f32 out: silu of a large negative gate is far below f16's normal range;
    written as f32 directly it keeps its precision (through f16 it lost up to 10%)."""
    g = np.array([-17.0, -12.5, -9.0, 3.0] * 8, np.float16)
    u = np.array([0.5, -1.25, 2.0, 1.0] * 8, np.float16)
    out = hetinfer.empty(g.shape, "f32", device="cuda")
    ops.swiglu(_cu(g), _cu(u), out=out)
    want = R.swiglu(g.astype(np.float64), u.astype(np.float64))
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-5)


# ---------------------------------------------------------------- GPU: paged attention, per-row sampling
def _paged(rng, seqs, bs, dt, extra_mb=0, nb=None, mb=None):
    """seqs: (k (L, Hkv, D), v, q (n, Hq, D)) per sequence -> the numpy arguments of
    paged_attention: each sequence's keys in shuffled distinct blocks, NaN in every slot
    no sequence uses (a kernel reading past a length gets NaN), unused table entries at a
    spare block."""
    hkv, d = seqs[0][0].shape[1:]
    need = [-(-len(k) // bs) for k, _, _ in seqs]
    nb = nb or sum(need) + 1
    ids = rng.permutation(nb)
    mb = mb or max(need) + extra_mb
    table = np.full((len(seqs), mb), ids[-1], np.int32)
    npdt = hetinfer.dtype(dt).np
    kp = np.full((nb, bs, hkv, d), np.nan, npdt)
    vp = np.full((nb, bs, hkv, d), np.nan, npdt)
    at = 0
    for i, (k, v, _) in enumerate(seqs):
        blocks = ids[at:at + need[i]]
        at += need[i]
        table[i, :need[i]] = blocks
        slots = np.arange(len(k))
        kp[blocks[slots // bs], slots % bs] = k
        vp[blocks[slots // bs], slots % bs] = v
    q = np.concatenate([s[2] for s in seqs])
    qs = np.concatenate([[0], np.cumsum([len(s[2]) for s in seqs])]).astype(np.int32)
    cl = np.array([len(s[0]) for s in seqs], np.int32)
    return q, kp, vp, qs, cl, table


def _seqs(rng, specs, hq, hkv, d, dt):
    return [(_rnd(rng, (L, hkv, d), dt), _rnd(rng, (L, hkv, d), dt), _rnd(rng, (n, hq, d), dt)) for L, n in specs]


def _paged_run(args, out=None):
    q, kp, vp, qs, cl, bt = args
    return ops.paged_attention(_cu(q), _cu(kp), _cu(vp), _cu(qs), _cu(cl), _cu(bt), scale=0.1, out=out).numpy()


@needs_cuda
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("hq,hkv,d", [(8, 2, 128), (6, 1, 40)])
def test_paged_attention_mixed_batch_invariant(dt, hq, hkv, d):
    """Decode rows and prefill chunks in one call match the reference, never read a NaN
    slot, and give the same bits alone (another block size, other blocks) and in a batch
    of 64 sequences in another order."""
    rng = np.random.default_rng(hq * 10 + d)
    specs = [(300, 1), (37, 37), (5000, 1), (129, 20), (5, 1), (64, 33), (2, 2)]    # (context, query rows)
    seqs = _seqs(rng, specs, hq, hkv, d, dt)
    args = _paged(rng, seqs, 16, dt, extra_mb=2)
    batch = _paged_run(args)
    _close(batch, R.paged_attention(*args, 0.1), dt)
    rows = np.cumsum([0] + [n for _, n in specs])
    for i in range(len(specs)):
        alone = _paged_run(_paged(rng, [seqs[i]], 8, dt))
        assert np.array_equal(alone, batch[rows[i]:rows[i + 1]]), f"sequence {i} alone differs"
    order = (list(range(len(specs))) * 10)[:64]
    rng.shuffle(order)
    big = _paged_run(_paged(rng, [seqs[i] for i in order], 32, dt, extra_mb=1))
    at = 0
    for i in order:
        n = specs[i][1]
        assert np.array_equal(big[at:at + n], batch[rows[i]:rows[i + 1]]), f"sequence {i} in a batch of 64 differs"
        at += n


@needs_cuda
def test_paged_attention_graph_replay_reads_indices_on_device():
    """Captured once, replayed with other lengths, row splits and block tables of the same
    shapes: the launch reads them on the device, so the replay gives the eager result."""
    from hetinfer.device import get_allocator
    dt, hq, hkv, d, bs = "f16", 4, 2, 64, 8
    rng = np.random.default_rng(11)
    a = _paged(rng, _seqs(rng, [(300, 1), (40, 7), (90, 1)], hq, hkv, d, dt), bs, dt, nb=80, mb=40)
    b = _paged(rng, _seqs(rng, [(120, 4), (1, 1), (200, 4)], hq, hkv, d, dt), bs, dt, nb=80, mb=40)
    ts = [_cu(x) for x in a]
    out = hetinfer.empty(a[0].shape, dt, device="cuda")
    call = lambda: ops.paged_attention(*ts, scale=0.1, out=out)         # noqa: E731
    call()                                                               # eager: scratch made
    assert np.array_equal(out.numpy(), _paged_run(a))
    replay = get_allocator("cuda").capture(call)
    for t, x in zip(ts, b):
        t.copy_(x)
    replay()
    assert np.array_equal(out.numpy(), _paged_run(b))
    _close(out.numpy(), R.paged_attention(*b, 0.1), dt)


@needs_cuda
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("style", ["half", "interleaved"])
def test_rope_paged_kv_write(dt, style):
    from hetinfer.rope import rope_table
    rng = np.random.default_rng(5)
    nb, bs, hkv, hq, d, t = 5, 4, 2, 4, 64, 7
    slots = rng.permutation(nb * bs)[:t].astype(np.int32)
    slots[[1, 4]] = -1                                                   # padding rows
    pos = rng.integers(0, 100, t).astype(np.int32)
    cos, sin = rope_table(d, 128)
    q, k, v = _rnd(rng, (t, hq, d), dt), _rnd(rng, (t, hkv, d), dt), _rnd(rng, (t, hkv, d), dt)
    kp, vp = _rnd(rng, (nb, bs, hkv, d), dt), _rnd(rng, (nb, bs, hkv, d), dt)
    qt, kpt, vpt = _cu(q), _cu(kp), _cu(vp)
    ops.rope_paged_kv_write(qt, _cu(k), _cu(v), kpt, vpt, _cu(pos), _cu(slots), _cu(cos), _cu(sin), style)
    eq, ek, ev = R.rope_paged_kv_write(q, k, v, kp, vp, pos, slots, cos, sin, style)
    _close(qt.numpy(), eq, dt)
    _close(kpt.numpy(), ek, dt)
    assert np.array_equal(vpt.numpy().astype(np.float64), ev)


@needs_cuda
@pytest.mark.parametrize("dt", DTYPES)
def test_sample_penalties_per_row(dt):
    """Per-row parameters: greedy rows (first index on ties) and sampled rows in one launch;
    captured, the replay reads new temperatures from the device."""
    from hetinfer.device import get_allocator
    from hetinfer.testing.cases import sample_candidates
    rng = np.random.default_rng(9)
    B, V = 6, 5000
    logits = _rnd(rng, (B, V), dt, 3.0)
    temp = np.array([0.0, 0.7, 1.0, 0.0, 1.5, 0.9], np.float32)
    top_k = np.array([0, 40, 0, 5, 0, 1], np.int32)
    top_p = np.array([1.0, 0.9, 0.5, 1.0, 1.0, 0.95], np.float32)
    min_p = np.array([0.0, 0.0, 0.05, 0.0, 0.3, 0.0], np.float32)
    for r in range(B):
        logits[r, [7, 4000]] = logits[r].max() + 1                      # ties: the first wins when greedy
    u = rng.random(B).astype(np.float32)
    lt, ut = _cu(logits), _cu(u)
    pt = [_cu(temp), _cu(top_k), _cu(top_p), _cu(min_p)]
    got = ops.sample(lt, ut, *pt).numpy()
    cand = sample_candidates(logits.astype(np.float64), u.astype(np.float64), temp, top_k, top_p, min_p)
    assert all(int(x) in c for x, c in zip(got, cand)), (got, cand)
    assert got[0] == 7 and got[3] == 7                                   # greedy rows
    out = hetinfer.empty((B,), "i32", device="cuda")
    replay = get_allocator("cuda").capture(lambda: ops.sample(lt, ut, *pt, out=out))
    replay()
    assert np.array_equal(out.numpy(), got)
    pt[0].copy_(np.zeros(B, np.float32))                                 # every row greedy now
    replay()
    assert (out.numpy() == 7).all()
    cnt = rng.integers(0, 3, (B, V)).astype(np.int32)
    seen = (rng.random((B, V)) < 0.3).astype(np.int32)
    rep = np.array([1.0, 1.3, 0.8, 1.1, 1.0, 1.2], np.float32)
    pres = np.array([0.0, 0.5, -0.25, 0.0, 0.2, 0.1], np.float32)
    freq = np.array([0.0, 0.2, 0.0, 0.1, 0.0, 0.3], np.float32)
    _close(ops.penalties(lt, _cu(cnt), _cu(seen), _cu(rep), _cu(pres), _cu(freq)).numpy(),
           R.penalties(logits, cnt, seen, rep, pres, freq), dt)
