"""AWQ scaling for hetinfer's int8 format (Lin et al. 2023, "activation-aware weight
quantization"), the default of ``hetinfer quantize``.

A Linear layer y = x W^T is the same function as y = (x / s) (W diag(s))^T for any positive
per-input-channel s. Quantizing W diag(s) instead of W gives the channels that carry large
activations finer steps (relative to their share of the output) at the cost of the quiet ones.
Here s = d^alpha, d the RMS of each input channel over the calibration text (hetinfer/calibrate.py),
and alpha in 0, 0.1, ..., 1 is chosen per Linear group to minimise the output error on those
inputs, tr(E H E^T) with E = W - Q(W diag(s)) diag(s)^-1 and H = E[x x^T] (alpha 0 is plain
round to nearest, so the search never does worse than it on the calibration data).

The 1 / s goes where it costs nothing at run time, into the op before the layer:
  q/k/v:    the input rms_norm weight          (input_layernorm.weight / s)
  gate/up:  the post-attention rms_norm weight  (post_attention_layernorm.weight / s)
  down:     the rows of up_proj                 (silu(gate) * up is linear in up)
  o:        the rows (and bias) of v_proj       (attention mixes rows of v linearly); with
            grouped-query attention one s per kv channel, shared by the query heads that read it
So the files and kernels are those of round to nearest: int8 groups and scales, and float
norms (and a v bias) that now carry the 1 / s."""

from __future__ import annotations

import numpy as np

from .calibrate import calibration_ids, layer_inputs
from .quant import dequantize_int8, quantize_int8, scale_dtype

ALPHAS = tuple(np.round(np.arange(11) * 0.1, 1))
_FLOOR = 1e-3               # channel RMS floor, relative to the largest (never-active channels)


def _output_error(w: np.ndarray, we: np.ndarray, h: np.ndarray) -> float:
    e = (w - we).astype(np.float64)
    return float(((e @ h) * e).sum())


def search_scales(w: np.ndarray, h: np.ndarray, group: int, sdt, tie: tuple[int, int, int] | None = None
                  ) -> tuple[np.ndarray, float]:
    """(s (K,) float32, alpha) for one (N, K) weight whose inputs have H = E[x x^T] (K, K).
    tie = (kv_heads, query heads per kv head, head_dim): o_proj's input channels of the query
    heads that share a kv head get one s (the mean of their RMS), so s can be folded into v."""
    h = np.asarray(h, np.float64)
    d = np.sqrt(np.maximum(np.diag(h), 0.0))
    if tie is not None:
        hkv, rep, dh = tie
        d = np.repeat(d.reshape(hkv, rep, dh).mean(1), rep, axis=0).reshape(-1)
    d = np.maximum(d, max(float(d.max()), 1e-30) * _FLOOR)
    best = None
    for a in ALPHAS:
        s = d ** a
        s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)
        we = dequantize_int8(*quantize_int8(w * s, group, sdt, allowed=None)) / s
        err = _output_error(w, we, h)
        if best is None or err < best[0]:
            best = (err, s, float(a))
    return best[1], best[2]


def awq_quantize_all(ckpt, group: int, scale_dt="f16", ids=None) -> tuple[dict, dict]:
    """({name: (int8, scales)} for every quantizable weight, {name: float32 tensor} for the
    norms and v biases that take the 1 / s) of a Llama/Qwen2 checkpoint, calibrated over ids
    (B, T) (default: CALIBRATION_TEXT)."""
    c = ckpt.config
    if ids is None:
        ids = calibration_ids(ckpt)
    sdt = scale_dtype(scale_dt)
    tie = (c.num_key_value_heads, c.num_attention_heads // c.num_key_value_heads, c.head_dim)
    quantized, floats = {}, {}
    layer: dict[str, tuple] = {}            # suffixes[0] -> (names, weights, s) for the layer at hand

    for _, p, suffixes, ws, inp in layer_inputs(ckpt, ids):
        w = np.concatenate(ws) if len(ws) > 1 else ws[0]
        hm = inp.T @ inp
        hm /= np.float32(len(inp))
        s, _ = search_scales(w, hm, group, sdt, tie if suffixes[0].endswith("o_proj.weight") else None)
        layer[suffixes[0]] = ([p + x for x in suffixes], ws, s)
        if not suffixes[0].endswith("down_proj.weight"):
            continue
        (qn, qk, vn), (wq, wk, wv), s_qkv = layer["self_attn.q_proj.weight"]
        (on,), (wo,), s_o = layer["self_attn.o_proj.weight"]
        (gn, un), (wg, wu), s_gu = layer["mlp.gate_proj.weight"]
        (dn,), (wd,), s_d = layer["mlp.down_proj.weight"]
        wv = wv / _kv_rows(s_o, tie)[:, None]
        wu = wu / s_d[:, None]
        for name, wt, s in ((qn, wq, s_qkv), (qk, wk, s_qkv), (vn, wv, s_qkv), (on, wo, s_o),
                            (gn, wg, s_gu), (un, wu, s_gu), (dn, wd, s_d)):
            q8, sc = quantize_int8(wt * s, group, sdt, name, allowed=None)
            quantized[name] = (q8, sc)
        floats[p + "input_layernorm.weight"] = ckpt.tensor(p + "input_layernorm.weight", np.float32) / s_qkv
        floats[p + "post_attention_layernorm.weight"] = (
            ckpt.tensor(p + "post_attention_layernorm.weight", np.float32) / s_gu)
        if c.attention_bias:
            floats[p + "self_attn.v_proj.bias"] = (
                ckpt.tensor(p + "self_attn.v_proj.bias", np.float32) / _kv_rows(s_o, tie))
        layer.clear()
    return quantized, floats


def _kv_rows(s_o: np.ndarray, tie) -> np.ndarray:
    """o_proj's input scales (query heads x head_dim, tied per kv head) as v_proj's rows."""
    hkv, rep, dh = tie
    return s_o.reshape(hkv, rep, dh)[:, 0].reshape(-1)
