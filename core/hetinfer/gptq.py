"""GPTQ rounding for hetinfer's int8 format (see hetinfer/quant.py): calibration text, a
float32 NumPy forward of Llama/Qwen2 that collects each Linear layer's input statistics
H = E[x x^T], and the column-by-column rounding that pushes each error onto the columns not
yet rounded. Same scales (amax / 127) and files as round to nearest; only q differs."""

from __future__ import annotations

import numpy as np

from .calibrate import CALIBRATION_TEXT, calibration_ids, layer_inputs  # noqa: F401
from .quant import QuantError, check_group, quantize_int8, scale_dtype  # noqa: F401

GPTQ_DAMP = 0.01              # H += damp * mean(diag H) * I (GPTQ's default)


def _amax_scales(w: np.ndarray, g: int, sdt) -> np.ndarray:
    n, k = w.shape
    out = np.empty((n, k // g), sdt)
    step = max(1, (1 << 20) // k)
    for r0 in range(0, n, step):
        out[r0:r0 + step] = (np.abs(np.asarray(w[r0:r0 + step], np.float32)).reshape(-1, k // g, g).max(-1)
                             / np.float32(127.0)).astype(sdt)
    return out


def gptq_rounding(w: np.ndarray, hessian: np.ndarray, g: int, sdt, damp: float = GPTQ_DAMP,
          block: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ (act-order, static groups) for one (N, K) weight given H = E[x x^T] (K, K).
    Scales: amax / 127 of the original groups, as round to nearest. Columns are rounded in
    decreasing order of diag(H); each column's error e (scaled by the Cholesky factor of H^-1)
    is subtracted from the columns still to come (lazy batch updates, `block` columns at a
    time). Rows are independent, so fused q/k/v or gate/up rows can go through together.
    Channels never seen active (diag 0) are rounded to nearest and push nothing onward."""
    n, k = w.shape
    scales = _amax_scales(w, g, sdt)
    h = np.array(hessian, np.float64)
    dead = np.diag(h) <= 0
    if dead.any():
        h[dead, :] = 0.0
        h[:, dead] = 0.0
        h[dead, dead] = 1.0
    mean_diag = float(np.mean(np.diag(h)))
    perm = np.argsort(-np.diag(h), kind="stable")
    h = h[perm][:, perm]
    hinv_u = None
    for d in (damp, damp * 10, damp * 100, 1.0):
        hd = h.copy()
        hd[np.diag_indices(k)] += d * mean_diag
        try:
            # upper U with U^T U = H^-1, from the Cholesky factor of H with its index order reversed
            # (J H J = L L^T  =>  H^-1 = (J L^-1 J)^T (J L^-1 J)); no explicit H^-1 is formed
            lo = np.linalg.cholesky(np.ascontiguousarray(hd[::-1, ::-1], np.float32))
            hinv_u = np.linalg.inv(lo)[::-1, ::-1]
        except np.linalg.LinAlgError:
            continue
        if np.isfinite(hinv_u).all() and (np.diag(hinv_u) > 0).all():
            break
        hinv_u = None
    if hinv_u is None:
        return quantize_int8(w, g, sdt, allowed=None)
    hinv_u = np.triu(hinv_u)
    # transposed (K, N): a column of W is a contiguous row here
    wt = np.ascontiguousarray(np.asarray(w, np.float32).T[perm])
    st = np.ascontiguousarray(scales.astype(np.float32).T[perm // g])                   # (K, N)
    with np.errstate(divide="ignore", invalid="ignore"):
        invt = np.where(st > 0, np.float32(1.0) / st, np.float32(0.0))
    qt = np.empty((k, n), np.float32)
    err = np.empty((block, n), np.float32)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        hb = hinv_u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            r = i1 + i
            x = wt[r]
            qi = qt[r]
            np.multiply(x, invt[r], out=qi)
            np.rint(qi, out=qi)
            np.clip(qi, -127, 127, out=qi)
            e = err[i]
            np.multiply(qi, st[r], out=e)
            np.subtract(x, e, out=e)
            e *= np.float32(1.0) / hb[i, i]
            if i + 1 < i2 - i1:
                wt[r + 1:i2] -= hb[i, i + 1:, None] * e[None, :]
        if i2 < k:
            wt[i2:] -= hinv_u[i1:i2, i2:].T @ err[:i2 - i1]
    q = np.empty((n, k), np.int8)
    q[:, perm] = qt.T
    return q, scales


def gptq_quantize_all(ckpt, group: int, scale_dt="f16", ids=None, damp: float = GPTQ_DAMP) -> dict:
    """{name: (int8, scales)} for every quantizable weight of a Llama/Qwen2 checkpoint, by GPTQ
    with H from the float model's layer inputs over ids (B, T) (default: CALIBRATION_TEXT).
    One float layer is held at a time; H is per layer and dropped after use."""
    if ids is None:
        ids = calibration_ids(ckpt)
    sdt = scale_dtype(scale_dt)
    out = {}
    for _, p, suffixes, ws, inp in layer_inputs(ckpt, ids):
        names = [p + s for s in suffixes]
        w = np.concatenate(ws) if len(ws) > 1 else ws[0]
        hm = inp.T @ inp
        hm /= np.float32(len(inp))
        q, s = quantize_int8(w, group, sdt, names[0], allowed=None, hessian=hm, damp=damp)
        r = 0
        for n, wi in zip(names, ws):
            out[n] = (np.ascontiguousarray(q[r:r + len(wi)]), np.ascontiguousarray(s[r:r + len(wi)]))
            r += len(wi)
    return out
