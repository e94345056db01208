"""CUDA graphs (allocator.capture) and the sample kernel inside them.

Graph replay must give the same tokens as eager execution, greedy and sampled (the
sample kernel sums masses in fixed point, so it is deterministic); capture must refuse
allocations and host transfers with a clear error; a replay's graph is destroyed when
it is garbage collected. Needs a CUDA GPU; skipped without one, never faked.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest

hetinfer_cuda = pytest.importorskip("hetinfer_cuda")

import hetinfer as hi  # noqa: E402
from hetinfer.errors import DeviceError  # noqa: E402

CUDA = hetinfer_cuda.probe()["available"]
pytestmark = pytest.mark.skipif(not CUDA, reason="no CUDA device: " + (hetinfer_cuda.probe()["reason"] or "?"))


def _tiny(dtype, bias=False, tied=True, seed=0):
    from hetinfer.config import ModelConfig
    from hetinfer_cuda.bench import random_model
    cfg = ModelConfig(architecture="Qwen2ForCausalLM" if bias else "LlamaForCausalLM", vocab_size=1000,
                      hidden_size=128, intermediate_size=320, num_hidden_layers=3, num_attention_heads=8,
                      num_key_value_heads=2, head_dim=16, rope_theta=10000.0, max_position_embeddings=512,
                      tie_word_embeddings=tied, attention_bias=bias)
    return random_model(cfg, dtype, "cuda", max_context=256, seed=seed)


class _Tok:
    eos_ids: list = []
    bos_id = None


def _run(model, graphs, params, n=40, prompt=(5, 17, 300, 42, 7, 999, 3)):
    from hetinfer.engine import Generator
    gen = Generator(model, _Tok(), 256, graphs=graphs)
    assert (gen.engine.runner.capture is not None) == graphs
    out = list(gen.generate(list(prompt), params, max_new_tokens=n, stop_ids=[]))
    again = list(gen.generate(list(prompt), params, max_new_tokens=n, stop_ids=[]))   # a second capture
    return out, again


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_graph_replay_matches_eager_greedy(dtype):
    from hetinfer.sampling import SamplingParams
    model = _tiny(dtype, bias=(dtype == "bf16"), tied=(dtype != "f16"))
    p = SamplingParams(temperature=0.0)
    eager, eager2 = _run(model, False, p)
    graph, graph2 = _run(model, True, p)
    assert eager == eager2 and graph == eager and graph2 == eager


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_graph_replay_matches_eager_sampled(dtype):
    from hetinfer.sampling import SamplingParams
    model = _tiny(dtype, seed=1)
    p = SamplingParams(temperature=3.0, top_k=50, top_p=0.9, min_p=0.02, repetition_penalty=1.2,
                       presence_penalty=0.3, frequency_penalty=0.1, seed=123)
    eager, _ = _run(model, False, p)
    graph, _ = _run(model, True, p)
    assert graph == eager
    assert len(set(eager)) > 1      # it did sample (the random tiny model is very peaked)


def test_sample_kernel_deterministic_large_vocab():
    """152k logits (Qwen's vocab): the same uniform gives the same token, repeatedly; it is a
    member of the reference's candidates; and the histogram over many uniforms follows
    the filtered distribution."""
    from hetinfer import ops
    from hetinfer.ops import reference as R
    rng = np.random.default_rng(0)
    V = 151936
    logits = (rng.standard_normal((2, V)) * 3).astype(np.float32)
    lt = hi.tensor(logits, "f16", "cuda")
    lf16 = lt.numpy().astype(np.float64)
    for params in [(0.8, 0, 0.9, 0.0), (1.0, 40, 1.0, 0.0), (0.7, 100, 0.95, 0.05), (1.2, 0, 1.0, 0.1)]:
        u = rng.random(2).astype(np.float32)
        ut = hi.tensor(u, "f32", "cuda")
        a = ops.sample(lt, ut, *params).numpy()
        b = ops.sample(lt, ut, *params).numpy()
        assert (a == b).all()
        from hetinfer.testing.cases import sample_candidates
        cand = sample_candidates(lf16, u.astype(np.float64), *params)
        assert all(int(t) in c for t, c in zip(a, cand)), (params, a, cand)


def test_capture_refuses_allocation_and_host_copies():
    from hetinfer.device import get_allocator
    alloc = get_allocator("cuda")
    with pytest.raises(DeviceError, match="the cache cannot serve"):      # a new cuMemAlloc
        alloc.capture(lambda: hi.empty((3 << 28,), "f32", "cuda"))
    t = hi.empty((4,), "f32", "cuda").fill_(1.0)
    with pytest.raises(DeviceError, match="captured"):
        alloc.capture(lambda: t.numpy())
    with pytest.raises(DeviceError, match="captured"):
        alloc.capture(lambda: t.fill_(2.0))
    # the stream is usable afterwards, and a capture that only launches kernels works
    out = hi.empty((4,), "f32", "cuda")
    from hetinfer import ops
    replay = alloc.capture(lambda: ops.add(t, t, out=out))
    out.fill_(0.0)
    replay()
    assert out.numpy().tolist() == [2.0] * 4
    t.fill_(3.0)                      # inputs changed before the replay, on the same stream
    replay()
    assert out.numpy().tolist() == [6.0] * 4
    fin = replay._finalizer
    del replay
    gc.collect()
    assert not fin.alive              # graph and executable destroyed


def test_temporaries_of_a_capture_belong_to_its_graph():
    """A block a captured step allocates (from the cache) and frees is not handed out again
    while the graph lives; it returns to the cache when the graph is destroyed."""
    from hetinfer import ops
    from hetinfer.device import get_allocator
    alloc = get_allocator("cuda")
    x = hi.tensor(np.arange(64, dtype=np.float32), "f32", "cuda")
    out = hi.empty((64,), "f32", "cuda")
    hi.empty((64,), "f32", "cuda")                      # leaves a cached block of that size
    seen = {}

    def body():
        tmp = hi.empty((64,), "f32", "cuda")             # served from the cache, owned by the graph
        seen["ptr"] = int(tmp.buffer.handle)
        ops.add(x, x, out=tmp)
        ops.add(tmp, x, out=out)
    replay = alloc.capture(body)
    others = [hi.empty((64,), "f32", "cuda") for _ in range(4)]
    assert seen["ptr"] not in {int(t.buffer.handle) for t in others}
    for t in others:
        t.fill_(-1.0)
    replay()
    assert out.numpy().tolist() == (3 * np.arange(64)).tolist()
    del replay, others
    gc.collect()
    again = [int(hi.empty((64,), "f32", "cuda").buffer.handle) for _ in range(8)]
    assert alloc.stats()["allocated"] >= 0 and len(again) == 8


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_argmax_long_rows(dtype):
    """argmax over vocabulary-sized rows (the multi-block kernel with self-resetting
    scratch): first index on ties, NaN counts as the largest (as numpy); twice in a row."""
    from hetinfer import ops
    rng = np.random.default_rng(3)
    V = 151936
    x = rng.standard_normal((3, V)).astype(np.float32)
    x[0, [777, 150000]] = 9.0                     # a tie: the first wins
    x[1, [5, 90000]] = [7.0, 8.0]
    x[2, [60000, 61000]] = np.nan                 # NaN wins, the first one
    xt = hi.tensor(x, dtype, "cuda")
    want = np.argmax(xt.numpy().astype(np.float64), axis=-1)
    for _ in range(2):
        assert ops.argmax(xt).numpy().tolist() == want.tolist() == [777, 90000, 60000]
    one = hi.tensor(x[1:2], dtype, "cuda")
    assert ops.argmax(one).numpy().tolist() == [90000]
