"""The CPU backend's f32 matmul kernel (backends/cpu/hetinfer_cpu/f32.py): accuracy against a
float64 reference, and batch invariance -- a row's result is bit-identical whether it is
computed alone or inside a larger batch, at any position -- on every path this compiler can
build (AVX-512, AVX2/FMA, plain C) and through hetinfer.ops.matmul."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hetinfer as hi
from hetinfer_cpu import f32

SETTINGS = dict(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))


def _variants():
    """(name, lib) for each kernel path the compiler builds here (the default one first)."""
    lib = f32.library()
    if lib is None:
        return []
    out = [(lib.hi_f32_path().decode(), lib)]
    seen = {out[0][0]}
    extra = [["-O3", "-march=native", "-mno-avx512f", "-fopenmp", "-ffp-contract=off"],   # AVX2
             ["-O3", "-fopenmp", "-ffp-contract=off"]]                                  # plain C
    for flags in extra:
        try:
            v = f32.build([flags])
        except RuntimeError:
            continue
        name = v.hi_f32_path().decode()
        if name not in seen:
            seen.add(name)
            out.append((name, v))
    return out


VARIANTS = _variants()
needs_c = pytest.mark.skipif(not VARIANTS, reason="no C compiler: the BLAS fallback is in use")
PATHS = pytest.mark.parametrize("lib", [v for _, v in VARIANTS] or [None], ids=[n for n, _ in VARIANTS] or ["none"])


def _prod(lib, x, w, bias=None, threads=0):
    out = np.full((x.shape[0], w.shape[0]), np.nan, np.float32)
    f32.run(lib, np.ascontiguousarray(x), np.ascontiguousarray(w), bias, out, threads)
    return out


def _check_close(got, x, w, bias=None):
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    mag = np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)).T
    if bias is not None:
        ref = ref + bias
        mag = mag + np.abs(bias.astype(np.float64))
    # f32 accumulation bound: a chain of ceil(K/8) steps (at most two roundings each: the plain-C
    # path multiplies and adds apart), a tree of <= 4 levels, the bias
    steps = -(-x.shape[1] // 8)
    tol = (2 * steps + 6) * np.finfo(np.float32).eps * mag + 1e-30
    err = np.abs(got.astype(np.float64) - ref)
    assert np.isfinite(got).all()
    assert (err <= tol).all(), f"max err/mag {float((err / (mag + 1e-30)).max()):.3g}"


def _data(seed, m, n, k, bias):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = (rng.standard_normal((n, k)) / np.sqrt(max(k, 1))).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32) if bias else None
    return x, w, b


# ---- accuracy -------------------------------------------------------------------------------
@needs_c
@PATHS
@settings(**SETTINGS)
@given(m=st.integers(1, 70), n=st.integers(1, 130), k=st.integers(1, 300), bias=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_matches_float64_reference(lib, m, n, k, bias, seed):
    x, w, b = _data(seed, m, n, k, bias)
    _check_close(_prod(lib, x, w, b), x, w, b)


@needs_c
@PATHS
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (1, 49, 7), (3, 97, 15), (4, 6, 16), (16, 48, 17),
                                   (17, 101, 576), (33, 7, 1023), (64, 200, 96), (70, 333, 129)])
def test_matches_reference_fixed_shapes(lib, m, n, k):
    x, w, b = _data(m * 1000 + n, m, n, k, True)
    _check_close(_prod(lib, x, w, b), x, w, b)
    _check_close(_prod(lib, x, w), x, w)


@needs_c
def test_large_product_threads_and_blocks():
    """Many blocks of w, split over threads (>= 4 M multiply-adds), packed and unpacked rows."""
    lib = f32.library()
    x, w, b = _data(7, 37, 2500, 577, True)
    got = _prod(lib, x, w, b)
    _check_close(got, x, w, b)
    for threads in (1, 2, 3):
        assert np.array_equal(_prod(lib, x, w, b, threads), got)


def test_empty_and_k0():
    lib = f32.library()
    if lib is None:
        pytest.skip("no C compiler")
    assert _prod(lib, np.zeros((0, 5), np.float32), np.ones((3, 5), np.float32)).shape == (0, 3)
    b = np.arange(3, dtype=np.float32)
    assert np.array_equal(_prod(lib, np.zeros((2, 0), np.float32), np.zeros((3, 0), np.float32), b),
                          np.stack([b, b]))


# ---- batch invariance -----------------------------------------------------------------------
def _invariant(lib, x, w, b, sizes=(1, 2, 3, 17, 64)):
    """Every row of x, computed in batches of each size at each position, equals the row alone."""
    rng = np.random.default_rng(x.shape[1])
    alone = np.concatenate([_prod(lib, x[i:i + 1], w, b) for i in range(x.shape[0])])
    for size in sizes:
        for i in range(x.shape[0]):
            for pos in sorted({0, size - 1, int(rng.integers(size))}):
                others = rng.standard_normal((size, x.shape[1])).astype(np.float32) * rng.uniform(0.01, 100)
                others[pos] = x[i]
                got = _prod(lib, others, w, b)[pos]
                assert np.array_equal(got.view(np.uint32), alone[i].view(np.uint32)), (size, pos, i)
    full = _prod(lib, x, w, b)
    assert np.array_equal(full.view(np.uint32), alone.view(np.uint32))


@needs_c
@PATHS
@pytest.mark.parametrize("n,k", [(131, 576), (50, 1000), (97, 29), (64, 16), (13, 7)])
def test_row_alone_equals_row_in_batch(lib, n, k):
    x, w, b = _data(n + k, 5, n, k, bias=n % 2 == 1)
    _invariant(lib, x, w, b)


@needs_c
@PATHS
@settings(**dict(SETTINGS, max_examples=15))
@given(n=st.integers(1, 150), k=st.integers(1, 700), bias=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_row_invariance_random_shapes(lib, n, k, bias, seed):
    x, w, b = _data(seed, 2, n, k, bias)
    _invariant(lib, x, w, b, sizes=(2, 3, 17, 64))


@needs_c
def test_invariance_over_threads_and_large_batches():
    """Rows of a threaded, packed, multi-block product (M up to 300) equal the rows alone."""
    lib = f32.library()
    x, w, b = _data(11, 300, 1100, 576, True)
    full = _prod(lib, x, w, b)
    for i in (0, 1, 150, 298, 299):
        assert np.array_equal(_prod(lib, x[i:i + 1], w, b), full[i:i + 1])
    assert np.array_equal(_prod(lib, x[:67], w, b, threads=1), full[:67])


@needs_c
def test_ops_matmul_is_batch_invariant():
    """Through hetinfer.ops.matmul (CPU, f32 weights), with the fused prologue and epilogues."""
    rng = np.random.default_rng(3)
    k, n = 192, 2 * 160
    w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    nw = (1 + 0.1 * rng.standard_normal(k)).astype(np.float32)
    x = rng.standard_normal((64, k)).astype(np.float32)
    for kw in ({}, {"bias": hi.tensor(b)}, {"norm_weight": hi.tensor(nw), "act": "swiglu"}):
        full = hi.ops.matmul(hi.tensor(x), hi.tensor(w), **kw).numpy()
        for i in (0, 5, 63):
            one = hi.ops.matmul(hi.tensor(x[i:i + 1]), hi.tensor(w), **kw).numpy()
            assert np.array_equal(one[0], full[i]), (kw.keys(), i)
    ref = x.astype(np.float64) @ w.astype(np.float64).T + b
    got = hi.ops.matmul(hi.tensor(x), hi.tensor(w), bias=hi.tensor(b)).numpy()
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


# ---- build, cache and fallbacks -------------------------------------------------------------
def test_kernel_is_compiled_and_cached():
    if f32.library() is None:
        pytest.skip("no C compiler here: the BLAS fallback is in use")
    assert f32.backend_name().startswith("c ")
    assert any(p.name.startswith("f32_") and p.suffix == ".so" for p in f32.cache_dir().iterdir())


def _subprocess(code, **env):
    e = dict(os.environ, **env)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout


_FALLBACK = ("import warnings, numpy as np, hetinfer as hi\n"
             "from hetinfer_cpu import f32\n"
             "with warnings.catch_warnings(record=True) as ws:\n"
             "    warnings.simplefilter('always')\n"
             "    for _ in range(3):\n"
             "        y = hi.ops.matmul(hi.tensor(np.ones((2, 64), np.float32)), hi.tensor(np.ones((4, 64), np.float32)),"
             " bias=hi.tensor(np.ones(4, np.float32)))\n"
             "print(len([w for w in ws if 'f32 matmul falls back' in str(w.message)]), f32.backend_name(),"
             " y.numpy().tolist())\n")


def test_no_compiler_falls_back_to_blas_with_one_warning(tmp_path):
    out = _subprocess(_FALLBACK, CC=str(tmp_path / "no-such-cc"), XDG_CACHE_HOME=str(tmp_path / "cache"))
    assert out.split()[:2] == ["1", "numpy"] and "[[65.0, 65.0, 65.0, 65.0], [65.0" in out


def test_env_selects_blas_without_warning(tmp_path):
    out = _subprocess(_FALLBACK, HETINFER_CPU_F32="blas")
    assert out.split()[:2] == ["0", "blas"] and "[[65.0, 65.0, 65.0, 65.0], [65.0" in out
