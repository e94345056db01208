"""int8 weight-only quantization (hetinfer.quant, loaders/int8_dir.py, hetinfer_cpu/int8.py):
the scheme, the on-disk format from every source format, the CPU kernel against the float64
reference, bad input, the CLI, and accuracy on real weights (SmolLM2 here; Qwen2.5 marked slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

import hetinfer as hi
from hetinfer import quant
from hetinfer.engine import load
from hetinfer.engine.kv_cache import PagedKVCache
from hetinfer.engine.step import StepInput
from hetinfer.loaders import load_checkpoint
from hetinfer.ops import reference as R

from _fixtures_loaders import (qwen_path, smollm2_path, tiny_weights, train_sentencepiece, write_gguf, write_hf_dir,
                               write_llama2c, hf_config)

HERE = Path(__file__).resolve().parent
TEXT = (HERE / "data" / "pride_and_prejudice_ch1.txt").read_text(encoding="utf-8")
L0Q = "model.layers.0.self_attn.q_proj.weight"
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def same_int8_weights(a, b):
    """Two models hold bit-identical int8 weights and scales."""
    for la, lb in zip(a.layers, b.layers):
        for f in ("wqkv", "wo", "w_gate_up", "w_down"):
            np.testing.assert_array_equal(getattr(la, f).numpy(), getattr(lb, f).numpy(), err_msg=f)
            sa, sb = getattr(la, f + "_scales").numpy(), getattr(lb, f + "_scales").numpy()
            assert sa.dtype == sb.dtype and sa.tobytes() == sb.tobytes(), f


def close_logits(a, b, tol=2e-2):
    """Relative L2 error per position below tol (the directory keeps embeddings in f16)."""
    rel = np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)
    assert rel.max() < tol, rel


def logits_all(model, ids) -> np.ndarray:
    """(T, V) float32 logits of one teacher-forced forward (as test_model_equivalence.our_logits)."""
    kv = PagedKVCache.for_tokens(model, len(ids))
    return model.forward(StepInput.single(ids, 0, kv.block_size, all_logits=True).to(model.device), kv).numpy()


def nll(logits: np.ndarray, targets) -> np.ndarray:
    """Negative log-likelihood of targets under each row of logits, in float64."""
    x = logits.astype(np.float64)
    m = x.max(-1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(x - m).sum(-1))
    return lse - x[np.arange(len(targets)), targets]


def agreement_and_ppl(f32_model, int8_model, tokenizer, n=512):
    ids = tokenizer.encode(TEXT)[:n + 1]
    assert len(ids) == n + 1, f"the text has only {len(ids)} tokens"
    a, b = logits_all(f32_model, ids)[:n], logits_all(int8_model, ids)[:n]
    targets = np.array(ids[1:])
    agree = float((a.argmax(-1) == b.argmax(-1)).mean())
    return agree, float(np.exp(nll(a, targets).mean())), float(np.exp(nll(b, targets).mean()))


# ---- the scheme ------------------------------------------------------------------------------
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("sdt", ["f16", "f32"])
def test_quantize_roundtrip_error_bound(group, sdt):
    rng = np.random.default_rng(group)
    w = rng.standard_normal((40, 256)).astype(np.float32) * rng.uniform(0.01, 3, (40, 1)).astype(np.float32)
    w[3, :group] = 0.0                                     # an all-zero group: scale 0, q 0
    q, s = quant.quantize_int8(w, group, sdt)
    assert q.dtype == np.int8 and q.shape == w.shape and s.shape == (40, 256 // group)
    assert s.dtype == quant.SCALE_DTYPES[sdt] and np.abs(q).max() <= 127
    assert s[3, 0] == 0 and not q[3, :group].any()
    sf = s.astype(np.float32)
    # the largest |w| of each nonzero group maps to +-127 (up to the f16 rounding of its scale)
    peak = np.abs(q.reshape(40, -1, group).astype(int)).max(-1)
    assert peak[sf > 0].min() >= (126 if sdt == "f16" else 127)
    err = np.abs(quant.dequantize_int8(q, s) - w).reshape(40, -1, group)
    bound = np.where(sf > 0, sf * 0.5 * 1.0001, 0)[..., None] + (np.abs(w).reshape(40, -1, group).max(-1)
                                                                 * (0.002 if sdt == "f16" else 1e-6))[..., None]
    assert (err <= bound).all()
    np.testing.assert_allclose(quant.dequantize_int8(q, s), R.dequantize_int8(q, s), rtol=1e-6, atol=0)


def test_gguf_q8_0_blocks_equal_our_scheme():
    """GGUF Q8_0 is this scheme at group 32 with f16 scales: gguf's own quantizer agrees."""
    from gguf.quants import quantize
    w = np.random.default_rng(0).standard_normal((16, 128)).astype(np.float32)
    blocks = quantize(w, Q.Q8_0).reshape(16, 4, 34)
    s_ref = blocks[:, :, :2].copy().view(np.float16).reshape(16, 4)
    q_ref = blocks[:, :, 2:].copy().view(np.int8).reshape(16, 128)
    q, s = quant.quantize_int8(w, 32, "f16")
    np.testing.assert_array_equal(s, s_ref)
    assert np.abs(q.astype(int) - q_ref).max() <= 1 and (q == q_ref).mean() > 0.99   # llama.cpp divides by d in f32


def test_gptq_rounding_keeps_scales_and_lowers_output_error():
    """GPTQ rounding (hessian given): the same amax / 127 scales and the same int8 range as
    round to nearest, and a smaller layer-output error tr(D H D^T), D = W - q s, on inputs with
    correlated channels and a few large ones (as real layer inputs have)."""
    rng = np.random.default_rng(7)
    k, t = 256, 2048
    mix = rng.standard_normal((k, k)).astype(np.float32) / np.float32(np.sqrt(k))
    x = rng.standard_normal((t, k)).astype(np.float32) @ (np.eye(k, dtype=np.float32) + mix)
    x[:, [3, 70, 200]] *= 20                                # massive channels
    h = x.T @ x / np.float32(t)
    w = rng.standard_normal((96, k)).astype(np.float32) * np.float32(0.05)
    w[5, 64:128] = 0.0                                     # an all-zero group stays zero

    def out_err(q, s):
        d = (w - quant.dequantize_int8(q, s)).astype(np.float64)
        return float(np.einsum("nk,kj,nj->", d, h.astype(np.float64), d))

    for g, sdt in ((64, "f16"), (32, "f32")):
        q_r, s_r = quant.quantize_int8(w, g, sdt)
        q_g, s_g = quant.quantize_int8(w, g, sdt, hessian=h)
        assert q_g.dtype == np.int8 and q_g.shape == w.shape and np.abs(q_g.astype(int)).max() <= 127
        assert s_g.dtype == s_r.dtype and s_g.tobytes() == s_r.tobytes()
        assert not q_g[5, 64:128].any()
        assert out_err(q_g, s_g) < 0.6 * out_err(q_r, s_r), (g, out_err(q_g, s_g), out_err(q_r, s_r))
    with pytest.raises(quant.QuantError, match="hessian has shape"):
        quant.quantize_int8(w, 64, hessian=h[:10, :10])


# ---- the CPU kernel ---------------------------------------------------------------------------
def _check_kernel(m, n, k, g, s_dt, x_dt=np.float32, out_dt="f32", bias=False, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(x_dt)
    w = rng.integers(-127, 128, (n, k)).astype(np.int8)
    s = rng.uniform(0.002, 0.05, (n, k // g)).astype(s_dt)
    b = rng.standard_normal(n).astype(np.float32) if bias else None
    out = hi.empty((m, n), out_dt)
    hi.ops.matmul(hi.tensor(x), hi.tensor(w, hi.i8), hi.tensor(b) if bias else None, scales=hi.tensor(s), out=out)
    ref = R.matmul(x, w, b, s)
    mag = np.abs(x.astype(np.float64)) @ np.abs(R.dequantize_int8(w, s)).T
    tol = (1e-5 if out_dt == "f32" else 4e-3) * mag + 1e-6
    assert (np.abs(out.numpy().astype(np.float64) - ref) <= tol).all(), (m, n, k, g, s_dt)


CASES = [(1, 96, 128, 32, np.float16), (1, 300, 576, 64, np.float16), (3, 200, 192, 64, np.float32),
         (8, 64, 256, 128, ml_dtypes.bfloat16), (9, 130, 256, 128, np.float16), (40, 70, 384, 64, np.float32),
         (1, 7, 96, 96, np.float32), (2, 5, 60, 12, np.float16)]      # groups that are no multiple of 32


@pytest.mark.parametrize("m,n,k,g,sdt", CASES)
def test_int8_kernel_matches_reference(m, n, k, g, sdt):
    _check_kernel(m, n, k, g, sdt, bias=m % 2 == 1)


def test_int8_kernel_f16_activations_and_out():
    _check_kernel(1, 64, 128, 64, np.float16, x_dt=np.float16, out_dt="f16")
    _check_kernel(12, 64, 128, 32, np.float32, x_dt=np.float16, out_dt="bf16", bias=True)


def test_int8_kernel_is_compiled_and_cached():
    from hetinfer_cpu import int8
    if int8.library() is None:
        pytest.skip("no C compiler here: the NumPy fallback is in use (tested below)")
    assert int8.backend_name().startswith("c ")
    assert any(p.name.startswith("int8_") and p.suffix == ".so" for p in int8.cache_dir().iterdir())


def test_int8_kernel_numpy_fallback(monkeypatch):
    from hetinfer_cpu import int8
    monkeypatch.setattr(int8._LIB, "state", "numpy")
    monkeypatch.setattr(int8._LIB, "lib", None)
    for m, n, k, g, sdt in CASES[:4]:
        _check_kernel(m, n, k, g, sdt, bias=True)


def test_no_compiler_warns_once_and_still_computes(tmp_path):
    code = ("import warnings, numpy as np, hetinfer as hi\n"
            "from hetinfer_cpu import int8\n"
            "with warnings.catch_warnings(record=True) as ws:\n"
            "    warnings.simplefilter('always')\n"
            "    for _ in range(3):\n"
            "        y = hi.ops.matmul(hi.tensor(np.ones((1, 64), np.float32)), hi.tensor(np.ones((4, 64), np.int8)),"
            " scales=hi.tensor(np.full((4, 2), 0.5, np.float16)))\n"
            "print(len([w for w in ws if 'falls back to NumPy' in str(w.message)]), y.numpy().tolist())\n")
    env = dict(os.environ, CC=str(tmp_path / "no-such-cc"), XDG_CACHE_HOME=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split(None, 1)[0] == "1" and "[[32.0, 32.0, 32.0, 32.0]]" in r.stdout


# ---- the format, from each source ------------------------------------------------------------
def _tiny_hf(tmp_path, outliers=False, **kw):
    w = tiny_weights(vocab=400, **kw)                        # the trained BPE tokenizer has <= 400 ids
    for name in w:                                           # realistic scale: 1/sqrt(fan-in), norms ~1
        if quant.is_quantizable(name):
            w[name] = w[name] / np.float32(np.sqrt(w[name].shape[1]))
        elif name.endswith("norm.weight"):
            w[name] = 1 + 0.1 * w[name]
            if outliers and "layers." in name:               # a few input channels that carry large values
                w[name][[3, 70, 200]] = 25.0
    d = write_hf_dir(tmp_path / "hf", w, hf_config(tied=kw.get("tied", False), vocab=400))
    from _fixtures_loaders import train_bpe_tokenizer_json
    train_bpe_tokenizer_json(d)
    return d, w


def test_hf_dir_to_int8_dir_and_back(tmp_path):
    src, w = _tiny_hf(tmp_path)
    out = quant.save_quantized(load_checkpoint(src, progress=False), tmp_path / "q", group=64, progress=False,
                               method="rtn")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "hetinfer_int8", "group_size": 64, "scale_dtype": "f16",
                                          "method": "rtn", "modules_not_converted": ["model.embed_tokens", "lm_head"]}
    assert {"tokenizer.json", "tokenizer_config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    ck = load_checkpoint(out, progress=False)
    assert ck.format == "hetinfer_int8" and ck.group_size == 64
    assert ck.quantized == {n for n in ck.names() if n.endswith(tuple(f"{x}.weight" for x in LINEARS))}
    from safetensors.numpy import load_file
    stored = load_file(str(out / "model.safetensors"))
    assert stored["model.embed_tokens.weight"].dtype == np.float16 and stored["lm_head.weight"].dtype == np.float16
    assert stored["model.norm.weight"].dtype == np.float32
    for name in ck.quantized:
        q, s = ck.raw(name)
        q_ref, s_ref = quant.quantize_int8(w[name], 64, "f16")
        np.testing.assert_array_equal(q, q_ref)
        np.testing.assert_array_equal(s, s_ref)
        np.testing.assert_allclose(ck.tensor(name), w[name], atol=float(s.astype(np.float32).max()) * 0.51)
        assert ck.stored_dtype(name) == "I8(group 64, F16 scales)"
    assert ck.tokenizer.encode("hello world") == load_checkpoint(src, progress=False).tokenizer.encode("hello world")
    assert ck.chat_template == "{{ messages }}"


def test_model_keeps_int8_and_matches_load_time_quantization(tmp_path):
    src, _ = _tiny_hf(tmp_path)
    out = quant.save_quantized(load_checkpoint(src, progress=False), tmp_path / "q", progress=False, method="rtn")
    m_dir, _ = load(out, progress=False)
    m_lt, ck_lt = load(src, progress=False, quantize="int8")
    m_f, _ = load(src, progress=False)
    for lay in m_dir.layers:
        assert lay.wqkv.dtype == hi.i8 and lay.wo.dtype == hi.i8 and lay.w_gate_up.dtype == hi.i8
        assert lay.w_down.dtype == hi.i8 and lay.wqkv_scales.shape == (lay.wqkv.shape[0], 256 // 64)
    assert m_dir.embed.dtype == hi.f32 and m_f.layers[0].wqkv_scales is None
    ids = list(range(3, 40))
    a, b, f = logits_all(m_dir, ids), logits_all(m_lt, ids), logits_all(m_f, ids)
    same_int8_weights(m_dir, m_lt)
    close_logits(a, b, 0.05)             # random tiny weights amplify the f16 rounding of the embeddings
    rel = np.linalg.norm(a - f, axis=-1) / np.linalg.norm(f, axis=-1)
    assert rel.max() < 0.05, rel
    # prefill (dequantized tiles + BLAS) and decode (GEMV) agree
    kv = PagedKVCache.for_tokens(m_dir, 64)
    m_dir.forward(StepInput.single(ids[:20], 0, kv.block_size).to("cpu"), kv)
    for p in range(20, len(ids)):
        step = m_dir.forward(StepInput.single([ids[p]], p, kv.block_size).to("cpu"), kv)
        np.testing.assert_allclose(step.numpy()[0], a[p], rtol=2e-4, atol=2e-4)


def test_gptq_directory_matches_load_time_and_stays_close(tmp_path):
    src, w = _tiny_hf(tmp_path)
    with pytest.raises(hi.HetinferError, match="rounding method 'hqq' is not supported"):
        quant.Int8View(load_checkpoint(src, progress=False), method="hqq")
    view = quant.Int8View(load_checkpoint(src, progress=False), method="gptq")
    assert view.method == "gptq" and quant.DEFAULT_METHOD == "rtn"
    assert quant.Int8View(load_checkpoint(src, progress=False)).method == "rtn"
    out = quant.save_quantized(load_checkpoint(src, progress=False), tmp_path / "q", method="gptq", progress=False)
    ck = load_checkpoint(out, progress=False)
    for name in sorted(ck.quantized):
        q, s = ck.raw(name)
        q_v, s_v = view.raw(name)                               # the same calibration, the same bytes
        np.testing.assert_array_equal(q, q_v)
        assert s.tobytes() == s_v.tobytes()
        assert s.tobytes() == quant.quantize_int8(w[name], 64, "f16")[1].tobytes()   # amax / 127 scales
        assert (q != quant.quantize_int8(w[name], 64, "f16")[0]).any()               # other rounding
    m8, _ = load(out, progress=False)
    m_f, _ = load(src, progress=False)
    ids = list(range(3, 40))
    a, f = logits_all(m8, ids), logits_all(m_f, ids)
    rel = np.linalg.norm(a - f, axis=-1) / np.linalg.norm(f, axis=-1)
    assert rel.max() < 0.05, rel


def test_awq_folds_scales_into_norms_and_beats_round_to_nearest(tmp_path):
    """AWQ (the default of save_quantized): W diag(s) is quantized and 1 / s goes into the norms
    and the rows of v_proj / up_proj, so the int8 model computes the float model's function; with
    input channels that carry large values it is closer to the float model than round to nearest."""
    src, w = _tiny_hf(tmp_path, outliers=True)
    ck = load_checkpoint(src, progress=False)
    view = quant.Int8View(ck, method="awq")
    norm = "model.layers.0.input_layernorm.weight"
    s = w[norm] / view.tensor(norm)                               # the s folded into the q/k/v inputs
    assert (s > 0).all() and s[[3, 70, 200]].min() > np.median(s)  # the loud channels got larger s
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"):
        q, sc = view.raw(name)
        step = np.repeat(sc.astype(np.float32), 64, axis=1)
        assert (np.abs(quant.dequantize_int8(q, sc) - w[name] * s) <= 0.51 * step + 1e-7).all()
    out = quant.save_quantized(ck, tmp_path / "awq", progress=False)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["method"] == "awq"
    rtn = quant.save_quantized(ck, tmp_path / "rtn", progress=False, method="rtn")
    ids = list(range(3, 60))
    f = logits_all(load(src, progress=False)[0], ids)
    err = {}
    for tag, d in (("awq", out), ("rtn", rtn)):
        a = logits_all(load(d, progress=False)[0], ids)
        err[tag] = float((np.linalg.norm(a - f, axis=-1) / np.linalg.norm(f, axis=-1)).mean())
    assert err["awq"] < 0.05, err
    assert err["awq"] < err["rtn"], err


def test_gguf_q8_0_copied_bit_exact(tmp_path):
    w = tiny_weights()
    f = write_gguf(tmp_path / "m.gguf", w, "llama", qtypes={"*": Q.Q8_0})
    src = load_checkpoint(f, progress=False)
    assert quant.native_int8(src) == (32, np.float16)
    out = quant.save_quantized(src, tmp_path / "q", progress=False)       # default: keep its group 32
    ck = load_checkpoint(out, progress=False)
    assert quant.Int8View(src, method="gptq").method == "rtn"          # passthrough: no re-rounding
    assert ck.group_size == 32 and ck.quantization["scale_dtype"] == "f16"
    for name in ck.quantized:
        q, s = ck.raw(name)
        q0, s0 = src.raw(name)                                  # q/k rows unpermuted the same way
        np.testing.assert_array_equal(q, q0)
        assert s.tobytes() == s0.tobytes()
    m8, _ = load(out, progress=False)
    m_lt, _ = load(f, progress=False, quantize="int8")          # load time: the same int8 bytes
    ids = list(range(3, 30))
    same_int8_weights(m8, m_lt)
    close_logits(logits_all(m8, ids), logits_all(m_lt, ids))
    # a different group requantizes (dequantize-requantize) and says so in the config
    out64 = quant.save_quantized(src, tmp_path / "q64", group=64, progress=False, method="rtn")
    ck64 = load_checkpoint(out64, progress=False)
    assert ck64.group_size == 64
    np.testing.assert_allclose(ck64.tensor(L0Q), src.tensor(L0Q), atol=0.05)
    assert ck64.tokenizer.encode("hello world") == src.tokenizer.encode("hello world")
    assert ck64.chat_template == src.chat_template and ck64.config.rope_style == "half"


def test_llama2c_v2_keeps_its_groups(tmp_path):
    train_sentencepiece(tmp_path / "tokenizer.model")
    w = tiny_weights(seed=2)
    for n in ("model.embed_tokens.weight", "lm_head.weight"):  # 400 rows: the trained tokenizer has 400 ids
        w[n] = np.concatenate([w[n], np.random.default_rng(7).standard_normal((140, 256), dtype=np.float32)])
    expect = write_llama2c(tmp_path / "model.bin", w, 2, group_size=64, vocab=400)
    src = load_checkpoint(tmp_path / "model.bin", progress=False)
    out = quant.save_quantized(src, tmp_path / "q", progress=False)
    ck = load_checkpoint(out, progress=False)
    assert ck.group_size == 64 and ck.quantization["scale_dtype"] == "f32"
    assert ck.config.rope_style == "interleaved" and (out / "tokenizer.model").exists()
    q, s = ck.raw(L0Q)
    np.testing.assert_array_equal(q, expect[L0Q + ":raw"][0])
    np.testing.assert_array_equal(s, expect[L0Q + ":raw"][1])
    assert ck.tokenizer.encode("Once upon a time") == src.tokenizer.encode("Once upon a time")
    m8, _ = load(out, progress=False)
    m_lt, _ = load(tmp_path / "model.bin", progress=False, quantize="int8")
    ids = list(range(3, 30))
    same_int8_weights(m8, m_lt)
    f32 = logits_all(load(tmp_path / "model.bin", progress=False)[0], ids)   # the same int8 values dequantized
    # the same values, products in different f32 orders (dequantized tiles + BLAS against the
    # f32 kernel's fixed-order lanes)
    close_logits(logits_all(m_lt, ids), f32, 3e-5)
    close_logits(logits_all(m8, ids), f32)


# ---- bad input -------------------------------------------------------------------------------
def test_group_that_does_not_divide_the_width(tmp_path):
    w = tiny_weights(d=dict(hidden=96, inter=160, layers=1, heads=2, kv=1, vocab=260, ctx=64))
    d = write_hf_dir(tmp_path / "hf", w, hf_config(d=dict(hidden=96, inter=160, layers=1, heads=2, kv=1,
                                                          vocab=260, ctx=64)))
    with pytest.raises(hi.HetinferError, match="group size 64 does not divide its input width 96"):
        quant.save_quantized(load_checkpoint(d, progress=False), tmp_path / "q", group=64, progress=False)
    with pytest.raises(hi.HetinferError, match="group size 64 does not divide"):
        load(d, progress=False, quantize="int8")
    with pytest.raises(hi.HetinferError, match="group size 48 is not supported"):
        quant.quantize_int8(np.ones((2, 96), np.float32), 48)
    assert not (tmp_path / "q").exists() or not any((tmp_path / "q").iterdir())


def test_quantizing_a_quantized_model(tmp_path):
    src, _ = _tiny_hf(tmp_path)
    out = quant.save_quantized(load_checkpoint(src, progress=False), tmp_path / "q", progress=False)
    with pytest.raises(hi.HetinferError, match="already quantized"):
        quant.save_quantized(load_checkpoint(out, progress=False), tmp_path / "qq", progress=False)
    model, _ = load(out, progress=False, quantize="int8")        # loading it with --quantize is a no-op
    assert model.layers[0].wqkv.dtype == hi.i8


def test_scale_tensor_of_the_wrong_shape(tmp_path):
    from safetensors.numpy import load_file, save_file
    src, _ = _tiny_hf(tmp_path)
    out = quant.save_quantized(load_checkpoint(src, progress=False), tmp_path / "q", progress=False)
    t = load_file(str(out / "model.safetensors"))
    t[L0Q + ".scales"] = t[L0Q + ".scales"][:, :2].copy()
    save_file(t, str(out / "model.safetensors"))
    with pytest.raises(hi.LoadError, match=r"scale tensor '.*q_proj.weight.scales' has shape \(256, 2\); "
                                           r"expected \(256, 4\)"):
        load_checkpoint(out, progress=False)
    # and at the op: scales that do not match the weight
    with pytest.raises(hi.ShapeError, match="scales has shape"):
        hi.ops.matmul(hi.tensor(np.ones((1, 64), np.float32)), hi.tensor(np.ones((4, 64), np.int8)),
                      scales=hi.tensor(np.ones((4, 3), np.float16)))
    with pytest.raises(hi.HetinferError, match="scales has shape"):
        quant.check_int8(np.ones((4, 64), np.int8), np.ones((5, 2), np.float16))


# ---- CLI --------------------------------------------------------------------------------------
def test_cli_quantize_generate_and_errors(tmp_path, capsys):
    from hetinfer.cli import main
    src, _ = _tiny_hf(tmp_path)
    assert main(["quantize", str(src), "--out", str(tmp_path / "q"), "--group", "32"]) == 0
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["group_size"] == 32
    assert main(["generate", "--model", str(tmp_path / "q"), "-n", "5", "hello world"]) == 0
    a = capsys.readouterr().out
    assert main(["generate", "--model", str(src), "--quantize", "int8", "-n", "5", "hello world"]) == 0
    assert capsys.readouterr().out.startswith("hello world")
    assert a.startswith("hello world")
    assert main(["quantize", str(tmp_path / "q"), "--out", str(tmp_path / "qq")]) == 2
    assert "already quantized" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:       # an argparse error: one line, exit 2
        main(["quantize", str(src), "--out", str(tmp_path / "q3"), "--group", "48"])
    assert e.value.code == 2 and "--group: invalid choice: 48" in capsys.readouterr().err


# ---- accuracy on real weights -----------------------------------------------------------------
def _accuracy(path, tmp_path, via_dir=True, method=None):
    f32, ck = load(path, "cpu", "f32", max_context=520, progress=False)
    if via_dir:
        out = quant.save_quantized(ck, tmp_path / "q", progress=False, method=method)
        i8, ck8 = load(out, "cpu", "f32", max_context=520, progress=False)
        assert ck8.group_size == 64 and i8.layers[0].w_down.dtype == hi.i8
    else:
        i8, _ = load(path, "cpu", "f32", max_context=520, progress=False, quantize="int8")
    return agreement_and_ppl(f32, i8, ck.tokenizer)


def test_smollm2_int8_accuracy(tmp_path):
    """Issue 5's bar on real weights: `hetinfer quantize` (AWQ, group 64) against f32 over 512
    teacher-forced tokens of tests/data/pride_and_prejudice_ch1.txt."""
    agree, ppl32, ppl8 = _accuracy(smollm2_path(), tmp_path)
    print(f"SmolLM2-135M int8 awq (group 64) vs f32 over 512 tokens: top-1 agreement {agree:.2%}, "
          f"perplexity f32 {ppl32:.3f} int8 {ppl8:.3f} ({ppl8 / ppl32 - 1:+.2%})")
    # Measured: 98.63% (7 flips of 512, each a near-tie), perplexity +0.13%.
    assert agree >= 0.98
    assert ppl8 <= 1.02 * ppl32


def test_smollm2_int8_load_time_accuracy(tmp_path):
    """--quantize int8 (round to nearest while loading, no calibration): the level it gives."""
    agree, ppl32, ppl8 = _accuracy(smollm2_path(), tmp_path, via_dir=False)
    print(f"SmolLM2-135M int8 rtn (group 64, at load) vs f32 over 512 tokens: top-1 agreement {agree:.2%}, "
          f"perplexity f32 {ppl32:.3f} int8 {ppl8:.3f} ({ppl8 / ppl32 - 1:+.2%})")
    # Measured: 96.88% (16 flips, every one a near-tie: f32 top-2 margin < 0.2 nats), perplexity
    # -0.49%: below the 98% that the calibrated `hetinfer quantize` reaches (above), which is why
    # that one is the way to make an int8 model of a small model.
    assert agree >= 0.96
    assert ppl8 <= 1.02 * ppl32


@pytest.mark.slow
def test_smollm2_int8_gptq_accuracy(tmp_path):
    """GPTQ rounding (calibrated on hetinfer.gptq.CALIBRATION_TEXT, not on the evaluation text)."""
    agree, ppl32, ppl8 = _accuracy(smollm2_path(), tmp_path, method="gptq")
    print(f"SmolLM2-135M int8 gptq (group 64) vs f32 over 512 tokens: top-1 agreement {agree:.2%}, "
          f"perplexity f32 {ppl32:.3f} int8 {ppl8:.3f} ({ppl8 / ppl32 - 1:+.2%})")
    # Measured: 97.46% (13 flips; mean KL to f32 6.4e-4 against 1.48e-3 for round to nearest),
    # perplexity -0.13%. Still short of 98% at group 64 (group 32: 98.05%).
    assert agree >= 0.97
    assert abs(ppl8 / ppl32 - 1) <= 0.02


@pytest.mark.slow
def test_qwen25_int8_accuracy(tmp_path):
    path = qwen_path()
    if path is None:
        pytest.skip("the Qwen2.5 GGUF is not fetched (../shared/models/fetch-qwen2.5-0.5b.sh)")
    for via_dir in (True, False):          # hetinfer quantize (awq), --quantize int8 (rtn)
        agree, ppl32, ppl8 = _accuracy(path, tmp_path / str(via_dir), via_dir=via_dir)
        print(f"Qwen2.5-Coder-0.5B int8 {'awq' if via_dir else 'rtn at load'} (group 64) vs f32 over 512 "
              f"tokens: top-1 agreement {agree:.2%}, perplexity f32 {ppl32:.3f} int8 {ppl8:.3f} "
              f"({ppl8 / ppl32 - 1:+.2%})")
        assert agree >= 0.98
        assert ppl8 <= 1.02 * ppl32
