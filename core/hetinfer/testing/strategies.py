"""Building blocks of the conformance cases: hypothesis strategies for sizes,
tensor layouts (contiguous, offset, strided, transposed), fresh random inputs,
poisoned outputs, and the per-dtype comparison against float64 references.

A case builder gets a `Case` and draws everything through it, so that a failing
example is reproducible from hypothesis' report (the NumPy seed is drawn too)."""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
from hypothesis import strategies as st

import hetinfer
from hetinfer import dtypes as D
from hetinfer.tensor import Tensor

# --- sizes -------------------------------------------------------------------------
MAX_HIDDEN = 300          # hidden / vocab / feature sizes: 1..300, odd ones included
MAX_SEQ = 512             # sequence lengths and positions for attention and rope
SEEDS = st.integers(0, 2**32 - 1)


def hidden(lo: int = 1, hi: int = MAX_HIDDEN):
    """A hidden size: any integer, odd and prime sizes included."""
    return st.integers(lo, max(lo, hi))


def head_dim(hi: int = 128):
    """An even head dimension 2..hi."""
    return st.integers(1, hi // 2).map(lambda h: 2 * h)


def lead_shape(max_elems: int, max_ndim: int = 2):
    """Leading (batch-like) dims: () or up to max_ndim dims whose product is <= max_elems."""
    @st.composite
    def strat(draw):
        ndim = draw(st.integers(0, max_ndim))
        shape, budget = [], max(1, max_elems)
        for _ in range(ndim):
            n = draw(st.integers(1, max(1, budget)))
            shape.append(n)
            budget //= n
        return tuple(shape)
    return strat()


# --- tolerances ----------------------------------------------------------------------
@dataclass(frozen=True)
class Tol:
    norm: float      # ||actual - expected||_2 / ||expected||_2
    max: float       # max |actual - expected| / magnitude (max |expected|, or a per-element bound)


TOLERANCES = {
    "f32": Tol(norm=1e-5, max=1e-4),
    "f16": Tol(norm=2e-3, max=4e-3),
    "bf16": Tol(norm=1.6e-2, max=3.2e-2),
}
_LOOSENESS = {"f32": 0, "f16": 1, "bf16": 2}


def loosest(dtypes) -> str:
    """The float dtype of least precision among dtypes (the one the tolerance follows)."""
    names = [D.dtype(d).name for d in dtypes if D.dtype(d).is_float]
    return max(names, key=_LOOSENESS.__getitem__) if names else "f32"


POISON_FLOAT = float("nan")
POISON_INT = -7


def poison_value(dt) -> float:
    return POISON_FLOAT if D.dtype(dt).is_float else POISON_INT


# --- layouts -------------------------------------------------------------------------
# A layout says how a tensor of a given shape is carved out of a bigger buffer:
#   ("contig",)                 the tensor itself
#   ("offset", base, idx)       rows k: of a taller buffer (contiguous, non-zero offset)
#   ("step", base, idx)         every step-th element along one axis (non-contiguous)
#   ("transpose", base)         the transpose of the last two axes of a buffer
@dataclass(frozen=True)
class Layout:
    kind: str
    base: tuple = ()
    idx: tuple = ()

    def apply(self, obj):
        """The view of obj (a Tensor or an ndarray of shape self.base)."""
        if self.kind == "contig":
            return obj
        if self.kind == "transpose":
            return obj.transpose(-2, -1) if isinstance(obj, Tensor) else np.swapaxes(obj, -2, -1)
        return obj[self.idx]

    def __str__(self) -> str:
        if self.kind == "contig":
            return "contiguous"
        if self.kind == "transpose":
            return f"transposed view of {self.base}"
        parts = ",".join("..." if s == slice(None) else f"{s.start}:{s.stop}:{s.step or 1}" for s in self.idx)
        return f"{self.kind} view [{parts}] of {self.base}"


def layouts(shape, allow=("contig", "offset", "step", "transpose")):
    """Strategy: a Layout for a tensor of this shape (contiguous about half the time)."""
    shape = tuple(shape)
    options = [st.just(Layout("contig"))]
    if shape and "offset" in allow:
        def offset(k):
            return Layout("offset", (shape[0] + k,) + shape[1:], (slice(k, k + shape[0]),))
        options.append(st.integers(1, 3).map(offset))
    if shape and "step" in allow:
        def step(args):
            axis, s, start = args
            axis %= len(shape)
            base = list(shape)
            base[axis] = shape[axis] * s + start
            idx = tuple(slice(None) for _ in range(axis)) + (slice(start, start + shape[axis] * s, s),)
            return Layout("step", tuple(base), idx)
        options.append(st.tuples(st.sampled_from([-1, 0]), st.integers(2, 3), st.integers(0, 1)).map(step))
    if len(shape) >= 2 and "transpose" in allow:
        options.append(st.just(Layout("transpose", shape[:-2] + (shape[-1], shape[-2]))))
    return st.one_of(st.just(Layout("contig")), st.one_of(*options))


# --- packed weights -------------------------------------------------------------------
def packed_blocks(rng: np.random.Generator, dtype, n: int, k: int, scale: float = 1.0) -> np.ndarray:
    """(N, K // block) blocks of a packed dtype (hetinfer.packed), as np.void. The legacy
    formats: N(0, scale^2) weights quantized by the gguf package. The k-quants (which gguf
    cannot quantize): random bytes (every quant, scale and min) with f16 super-block scales
    d, dmin drawn so the values have about the given scale."""
    f = D.dtype(dtype).packed
    if f.block == 32:
        from gguf.constants import GGMLQuantizationType
        from gguf.quants import quantize
        w = (rng.standard_normal((n, k)) * scale).astype(np.float32)
        raw = quantize(w, GGMLQuantizationType(f.ggml_type))
    else:
        raw = rng.integers(0, 256, size=(n, k // f.block, f.nbytes), dtype=np.uint8)
        # q4_k / q5_k: |x| <= d 63 31 + dmin 63; q6_k: |x| <= d 128 32
        unit = scale / (63 * 16) if f.name != "q6_k" else scale / (128 * 32)
        d = (rng.uniform(0.5, 2.0, size=raw.shape[:2] + (2,)) * unit).astype(np.float16).view(np.uint8)
        for i, off in enumerate(f.scales):                       # d (q4_k / q5_k: and dmin)
            raw[:, :, off:off + 2] = d[:, :, 2 * i:2 * i + 2]
        raw = raw.reshape(n, -1)
    return np.ascontiguousarray(raw).view(D.dtype(dtype).np)  # (N, K // block)


def packed_rounding_bound(a: np.ndarray, w: np.ndarray, act_block: int) -> np.ndarray:
    """The most a packed matmul's rounding of its activations a (..., K) to 8 bits per block
    of act_block values (scale max|a| / 127, so each value moves by <= max|a| / 254) can
    change a @ w^T, w (N, K) float64: sum_k |w[n, k]| max|a|(block of k) / 254, (..., N)."""
    a = np.abs(np.asarray(a, np.float64))
    k = a.shape[-1]
    amax = a.reshape(a.shape[:-1] + (k // act_block, act_block)).max(-1)      # (..., K // act_block)
    return np.repeat(amax / 254.0, act_block, axis=-1) @ np.abs(w).T          # (..., N)


# --- one case ------------------------------------------------------------------------
@dataclass
class _Out:
    name: str
    tensor: Tensor
    base: Tensor
    layout: Layout
    dtype: D.DType


@dataclass
class _Check:
    name: str
    tensor: Tensor
    expected: object
    kind: str             # "close", "exact" or "member"
    mag: object = None
    bound: object = None  # an error allowed per element on top of the tolerance (see expect_close)


class Case:
    """What one conformance example draws and checks. Builders call, in order:
    inputs/outputs (drawn layouts, random data, poisoned outputs), then
    `self.call = lambda: ...` with the op call, then expect_close/expect_exact."""

    def __init__(self, data, device, dtype):
        self.data = data
        self.device = str(device)
        self.dtype: D.DType = D.dtype(dtype)         # the kernel's key dtype
        self.rng = np.random.default_rng(data.draw(SEEDS, label="seed"))
        self.notes: list[str] = []
        self.dtypes: set[str] = {self.dtype.name} if self.dtype.is_float else set()
        self._inputs: list[tuple[str, Tensor, np.ndarray]] = []
        self._outs: list[_Out] = []
        self._checks: list[_Check] = []
        self.call = None

    # drawing
    def draw(self, strategy, label: str):
        value = self.data.draw(strategy, label=label)
        self.notes.append(f"{label}={value}")
        return value

    def other_float(self, label: str) -> D.DType:
        """The key dtype most of the time, else any float dtype (ops accept mixed dtypes)."""
        dt = self.dtype if self.dtype.is_float else D.f32
        return D.dtype(self.draw(st.one_of(st.just(dt.name), st.sampled_from([d.name for d in D.FLOATS])), label))

    # data
    def normal(self, shape, dtype, scale: float = 1.0) -> np.ndarray:
        """Fresh N(0, scale^2) values rounded to dtype; never zero."""
        a = self.rng.standard_normal(tuple(shape)) * scale
        a[a == 0] = scale
        out = a.astype(D.dtype(dtype).np)
        out[out.astype(np.float64) == 0] = np.asarray(scale, D.dtype(dtype).np)
        return out

    def _filler(self, shape, dtype) -> np.ndarray:
        dt = D.dtype(dtype)
        if dt.is_float:
            return self.normal(shape, dt, 3.0)
        if dt.packed is not None:                    # blocks of random bytes
            return self.rng.integers(0, 256, size=tuple(shape) + (dt.itemsize,), dtype=np.uint8).view(dt.np)[..., 0]
        return self.rng.integers(-100, 100, size=tuple(shape)).astype(dt.np)

    def _place(self, name, arr, dtype, layout_ok=True):
        dt = D.dtype(dtype)
        arr = np.asarray(arr).astype(dt.np)
        layout = self.draw(layouts(arr.shape), f"{name}.layout") if layout_ok and arr.ndim else Layout("contig")
        if layout.kind == "contig":
            return hetinfer.tensor(arr, dt, self.device), arr
        base = self._filler(layout.base, dt)
        layout.apply(base)[...] = arr
        return layout.apply(hetinfer.tensor(base, dt, self.device)), arr

    def input(self, name: str, arr: np.ndarray, dtype=None, layout: bool = True) -> Tensor:
        """A read-only input tensor holding arr (in a drawn layout); checked unchanged after the call."""
        dt = D.dtype(dtype if dtype is not None else arr.dtype)
        if dt.is_float:
            self.dtypes.add(dt.name)
        t, arr = self._place(name, arr, dt, layout)
        self._inputs.append((name, t, arr))
        return t

    def inout(self, name: str, arr: np.ndarray, dtype=None, layout: bool = True) -> Tensor:
        """A tensor the op reads and writes (a cache, or x when out=x); check it with expect_*."""
        dt = D.dtype(dtype if dtype is not None else arr.dtype)
        if dt.is_float:
            self.dtypes.add(dt.name)
        return self._place(name, arr, dt, layout)[0]

    def output(self, name: str, shape, dtype, layout: bool = True) -> Tensor:
        """An output tensor, poisoned (NaN / -7) so unwritten elements are caught; in a
        drawn layout whose gaps must stay poisoned."""
        dt = D.dtype(dtype)
        if dt.is_float:
            self.dtypes.add(dt.name)
        shape = tuple(shape)
        lay = self.draw(layouts(shape), f"{name}.layout") if layout and shape else Layout("contig")
        base = hetinfer.empty(lay.base if lay.kind != "contig" else shape, dt, self.device)
        base.fill_(poison_value(dt))
        t = lay.apply(base)
        self._outs.append(_Out(name, t, base, lay, dt))
        return t

    # expectations
    def expect_close(self, name: str, tensor: Tensor, expected, mag=None, bound=None) -> None:
        """tensor ~= expected (float64) within the tolerance of the least precise dtype
        involved. mag: per-element error scale (default max |expected|). bound: a per-element
        error allowed on top, one the op's contract permits (a packed matmul's 8-bit rounding
        of its activations: packed_rounding_bound)."""
        self._checks.append(_Check(name, tensor, np.asarray(expected, np.float64), "close", mag, bound))

    def expect_exact(self, name: str, tensor: Tensor, expected) -> None:
        """tensor == expected, after expected is rounded to tensor's dtype."""
        self._checks.append(_Check(name, tensor, np.asarray(expected), "exact"))

    def expect_member(self, name: str, tensor: Tensor, allowed) -> None:
        """tensor[i] in allowed[i] for each i of a 1-D integer tensor (e.g. sampled token ids)."""
        self._checks.append(_Check(name, tensor, [set(a) for a in allowed], "member"))

    # running
    def describe(self) -> str:
        return ", ".join(self.notes)

    def run(self) -> None:
        assert self.call is not None, "case builder set no call"
        self.call()
        problems = []
        for c in self._checks:
            problems += _compare(c, self.dtypes)
        for o in self._outs:
            problems += _gaps_untouched(o)
        for name, t, arr in self._inputs:
            got = t.numpy()
            if not _same(got, arr):
                problems.append(f"input {name} was modified by the kernel")
        if problems:
            raise AssertionError("; ".join(problems) + f"\n  case: {self.describe()}")


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return False
    if a.dtype.kind == "V" or b.dtype.kind == "V":                # packed blocks: their bytes
        return a.dtype == b.dtype and bool(np.array_equal(np.ascontiguousarray(a).view(np.uint8),
                                                          np.ascontiguousarray(b).view(np.uint8)))
    if a.dtype.kind in "iu" or b.dtype.kind in "iu":
        return bool(np.array_equal(a, b))
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return bool(np.array_equal(a64, b64, equal_nan=True))


def _compare(c: _Check, dtypes) -> list[str]:
    got = c.tensor.numpy()
    want = c.expected
    if c.kind == "member":
        bad = [(i, int(g), sorted(a)[:8]) for i, (g, a) in enumerate(zip(got.tolist(), want)) if g not in a]
        return [f"{c.name}: element {i} is {g}, expected one of {a}" for i, g, a in bad[:3]]
    if got.shape != want.shape:
        return [f"{c.name}: shape {got.shape}, expected {want.shape}"]
    if c.kind == "exact":
        want = want.astype(got.dtype)
        if _same(got, want):
            return []
        bad = np.argwhere(~(got == want) if got.dtype.kind in "iu"
                          else ~(got.astype(np.float64) == want.astype(np.float64)))
        first = tuple(int(i) for i in bad[0]) if len(bad) else ()
        return [f"{c.name}: {len(bad)} of {got.size} elements differ (exact check); first at {first}: "
                f"got {got[first]!r}, expected {want[first]!r}"]
    g = got.astype(np.float64)
    unwritten = int(np.isnan(g).sum())
    if unwritten and not np.isnan(want).any():
        idx = tuple(int(i) for i in np.argwhere(np.isnan(g))[0])
        return [f"{c.name}: {unwritten} of {g.size} elements are NaN (poisoned output not written?); first at {idx}"]
    if not np.isfinite(g).all() and np.isfinite(want).all():
        return [f"{c.name}: {int((~np.isfinite(g)).sum())} non-finite elements where the reference is finite"]
    tol = TOLERANCES[loosest(dtypes)]
    # below the output dtype's smallest normal number values are subnormal (or flushed to
    # zero, as GPU kernels may): errors up to that size are rounding, not a bug
    atol = float(ml_dtypes.finfo(got.dtype).smallest_normal)
    err = np.maximum(np.abs(g - want) - atol - (0.0 if c.bound is None else np.asarray(c.bound)), 0.0)
    mag = np.broadcast_to(np.asarray(c.mag, np.float64) if c.mag is not None
                          else np.float64(np.abs(want).max(initial=0.0)), want.shape)
    mag = np.maximum(mag, 1e-30)
    ratio = err / mag
    worst = float(ratio.max(initial=0.0))
    # relative to ||expected||, or to ||magnitude|| where the builder gave an error bound per
    # element (matmul, add: cancellation makes ||expected|| tiny while rounding errors are not)
    denom = np.linalg.norm(mag) if c.mag is not None else np.linalg.norm(want)
    norm = float(np.linalg.norm(err) / max(float(denom), 1e-30))
    out = []
    if worst > tol.max:
        i = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
        out.append(f"{c.name}: max error {worst:.3g} (relative to magnitude) > {tol.max:g} "
                   f"({loosest(dtypes)} tolerance) at {tuple(int(j) for j in i)}: got {g[i]!r}, "
                   f"expected {want[i]!r}")
    if norm > tol.norm:
        out.append(f"{c.name}: relative norm error {norm:.3g} > {tol.norm:g} ({loosest(dtypes)} tolerance)")
    return out


def _gaps_untouched(o: _Out) -> list[str]:
    if o.layout.kind == "contig":
        return []
    mask = np.ones(o.layout.base, bool)
    o.layout.apply(mask)[...] = False
    rest = o.base.numpy()[mask]
    if o.dtype.is_float:
        ok = np.isnan(rest.astype(np.float64)).all()
    else:
        ok = bool((rest == POISON_INT).all())
    return [] if ok else [f"{o.name}: the kernel wrote outside the output view ({o.layout})"]
