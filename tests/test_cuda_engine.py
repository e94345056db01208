"""The batching engine on CUDA: decode steps replayed from graphs per batch bucket give
the tokens of eager steps; with the batch-invariant matmul (HETINFER_CUDA_BATCH_INVARIANT=1)
a request's greedy tokens are the same alone or among others, f16 and bf16. Needs a CUDA
GPU; skipped without one, never faked."""

from __future__ import annotations

import numpy as np
import pytest

hetinfer_cuda = pytest.importorskip("hetinfer_cuda")

CUDA = hetinfer_cuda.probe()["available"]
pytestmark = pytest.mark.skipif(not CUDA, reason="no CUDA device: " + (hetinfer_cuda.probe()["reason"] or "?"))


def _tiny(dtype, seed=0):
    from hetinfer.config import ModelConfig
    from hetinfer_cuda.bench import random_model
    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=1000, hidden_size=128, intermediate_size=320,
                      num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                      rope_theta=10000.0, max_position_embeddings=512, tie_word_embeddings=True)
    return random_model(cfg, dtype, "cuda", max_context=256, seed=seed)


def _prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 1000, size=int(rng.integers(1, 60))).tolist() for _ in range(n)]


def _engine(model, graphs=True, **kw):
    from hetinfer.engine import LLMEngine
    return LLMEngine(model, None, max_context=256, graphs=graphs, kv_cache_memory=64 << 20, **kw)


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_graph_buckets_match_eager_steps(dtype):
    """Batches of 1..8 (GEMV rows: each row computed the same way at any M) with greedy and
    seeded sampled requests: graph replays (padded to buckets 1, 2, 4, 8) give the eager tokens."""
    from hetinfer.sampling import SamplingParams
    model = _tiny(dtype)
    prompts = _prompts(7)
    params = [SamplingParams(max_tokens=24, ignore_eos=True, temperature=t, top_k=40, seed=i)
              for i, t in enumerate([0, 0.8, 0, 1.2, 0, 0.9, 0])]
    for n in (1, 3, 7):
        g = _engine(model, True)
        got = [s.output_ids for s in g.generate(prompts[:n], params[:n])]
        e = _engine(model, False)
        want = [s.output_ids for s in e.generate(prompts[:n], params[:n])]
        assert got == want
        assert g.runner.num_replays > 0 and e.runner.num_replays == 0


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_batch_invariant_greedy_alone_or_among_40(dtype, monkeypatch):
    from hetinfer.sampling import SamplingParams
    import hetinfer_cuda.kernels as K
    if not hasattr(K, "BATCH_INVARIANT"):
        pytest.fail("hetinfer_cuda.kernels has no BATCH_INVARIANT switch")
    monkeypatch.setattr(K, "BATCH_INVARIANT", True)
    model = _tiny(dtype, seed=2)
    prompts = _prompts(40, seed=3)
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    eng = _engine(model, True, max_num_batched_tokens=96)
    together = [s.output_ids for s in eng.generate(prompts, params)]
    alone = []
    for p in prompts:
        alone.append(_engine(model, True).generate([p], params)[0].output_ids)
    assert together == alone
