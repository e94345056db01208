"""Many sequences at once on the CPU: continuous batching with chunked prefill, prefix
caching and preemption give every request the tokens it gets alone (batch invariance,
bit for bit in f32); bad requests and settings get one clear error and hurt no other."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

import hetinfer as hi  # noqa: E402
from hetinfer import LLM, SamplingParams  # noqa: E402
from hetinfer.engine import LLMEngine, load  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny_models import make_tiny
    d, _ = make_tiny(tmp_path_factory.mktemp("batch"), "llama3-gqa-scaled-tied")
    return d


@pytest.fixture(scope="module")
def model(tiny):
    return load(tiny, "cpu", "f32", max_context=128, progress=False)[0]


def _prompts(n, seed=0, lo=1, hi_=60):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 300, size=int(rng.integers(lo, hi_))).tolist() for _ in range(n)]


def _alone(model, prompts, params):
    out = []
    for p, sp in zip(prompts, params):
        eng = LLMEngine(model, None, max_context=128, block_size=8)
        out.append(eng.generate([p], sp)[0].output_ids)
    return out


def test_64_prompts_of_mixed_lengths_give_each_its_tokens_alone(tiny):
    """LLM.generate on 64 prompts runs them concurrently (chunked prefill: a 48-token budget
    per step, so prompts are split and decode rows share steps with prefill chunks) and each
    gets exactly the greedy tokens it gets alone."""
    llm = LLM(tiny, max_context=128, max_num_seqs=64, max_num_batched_tokens=48, block_size=8)
    prompts = _prompts(64)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    together = llm.generate(prompts, params)
    alone = _alone(llm.model, prompts, [params] * 64)
    assert [o.token_ids for o in together] == alone
    assert all(len(o.token_ids) == 12 and o.finish_reason == "length" for o in together)
    assert llm.engine.num_steps < 64 * 12 / 4               # they really ran together


def test_seeded_sampling_is_the_same_in_any_batch(model):
    prompts = _prompts(12, seed=1)
    params = [SamplingParams(temperature=t, top_p=0.9, top_k=k, seed=100 + i, max_tokens=10, ignore_eos=True)
              for i, (t, k) in enumerate(zip([0.7, 1.0, 1.3, 0.0] * 3, [0, 20, 5] * 4))]
    eng = LLMEngine(model, None, max_context=128, block_size=8, max_num_batched_tokens=40)
    together = [s.output_ids for s in eng.generate(prompts, params)]
    assert together == _alone(model, prompts, params)


def test_preemption_under_a_small_kv_budget_loses_nothing(model):
    """A pool of a few blocks: sequences are preempted and recomputed, and still finish
    with the tokens they get alone."""
    c = model.config
    per_block = 2 * c.num_hidden_layers * 8 * c.num_key_value_heads * c.head_dim * 4
    eng = LLMEngine(model, None, max_context=64, block_size=8, kv_cache_memory=10 * per_block)
    prompts = _prompts(8, seed=2, lo=10, hi_=30)
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    got = [s.output_ids for s in eng.generate(prompts, params)]
    assert eng.scheduler.num_preemptions > 0
    assert got == _alone(model, prompts, [params] * 8)
    assert eng.blocks.num_free == eng.blocks.num_blocks


def test_shared_prefix_is_prefilled_once(model):
    system = list(range(10, 74))                           # 64 tokens = 8 blocks of 8
    prompts = [system + [100 + i, 200 + i] for i in range(6)]
    eng = LLMEngine(model, None, max_context=128, block_size=8)
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    first = eng.generate(prompts[:1], params)
    rest = eng.generate(prompts[1:], params)
    assert all(s.num_cached_tokens == 64 for s in rest) and first[0].num_cached_tokens == 0
    assert [s.output_ids for s in first + rest] == _alone(model, prompts, [params] * 6)


def test_abort_frees_blocks_and_the_others_finish(model):
    eng = LLMEngine(model, None, max_context=128, block_size=8)
    a = eng.add_request(list(range(3, 40)), SamplingParams(max_tokens=50, ignore_eos=True))
    b = eng.add_request(list(range(5, 30)), SamplingParams(max_tokens=5, ignore_eos=True))
    eng.step()
    eng.step()
    eng.abort(a.request_id)
    while eng.has_unfinished():
        eng.step()
    assert a.finish_reason == "abort" and b.finish_reason == "length" and len(b.output_ids) == 5
    assert eng.blocks.num_free == eng.blocks.num_blocks
    with pytest.raises(hi.InputError, match="no unfinished request with id 'nope'"):
        eng.abort("nope")


def test_bad_requests_get_one_clear_error_and_harm_no_other(model):
    eng = LLMEngine(model, None, max_context=64, block_size=8)
    good = eng.add_request([5, 6, 7], SamplingParams(max_tokens=4, ignore_eos=True))
    with pytest.raises(hi.InputError, match=r"plus max_tokens \(10\) is 70 tokens; the context holds 64"):
        eng.add_request(list(range(3, 63)), SamplingParams(max_tokens=10))
    with pytest.raises(hi.InputError, match=r"token id 9999 is outside the vocabulary \[0, 320\)"):
        eng.add_request([1, 9999], SamplingParams())
    with pytest.raises(hi.InputError, match="top_p must be in"):
        eng.add_request([1, 2], SamplingParams(top_p=0.0))
    with pytest.raises(hi.InputError, match="prompt has no tokens"):
        eng.add_request([], SamplingParams())
    with pytest.raises(hi.InputError, match="already in use"):
        eng.add_request([1], SamplingParams(), request_id=good.request_id)
    while eng.has_unfinished():
        eng.step()
    assert good.finish_reason == "length" and len(good.output_ids) == 4


@pytest.mark.parametrize("kw,err,match", [
    (dict(max_num_seqs=0), hi.ConfigError, "max_num_seqs must be a whole number >= 1"),
    (dict(max_num_batched_tokens=0), hi.ConfigError, "max_num_batched_tokens must be"),
    (dict(kv_cache_memory=1000), hi.OutOfMemoryError,
     r"holds 0 blocks of 16 tokens .* one sequence of the full context \(128 tokens\) needs 8"),
    (dict(kv_cache_memory=-1), hi.ConfigError, "kv_cache_memory must be a positive number of bytes"),
    (dict(gpu_memory_utilization=0.5), hi.ConfigError, "needs a device that reports its memory"),
])
def test_bad_engine_settings(model, kw, err, match):
    with pytest.raises(err, match=match):
        LLMEngine(model, None, max_context=128, **kw)


def test_budget_line_says_blocks_tokens_and_fit(model):
    eng = LLMEngine(model, None, max_context=128, kv_cache_memory=1 << 20)
    line = eng.budget.line()
    assert f"{eng.blocks.num_blocks} blocks of 16 tokens" in line and "sequence(s) of the full context (128)" in line


def test_layers_built_by_hand_prefill_as_the_loaded_ones(model):
    """A Layer made from its fused weights alone (as hetinfer_cuda.bench.random_model makes
    them, no qkv_parts given) computes q/k/v in prefill steps: same tokens as the loaded model."""
    from hetinfer_models.llama import Layer
    layers = [Layer(attn_norm=l.attn_norm, wqkv=l.wqkv, bqkv=l.bqkv, wo=l.wo, mlp_norm=l.mlp_norm,
                    w_gate_up=l.w_gate_up, w_down=l.w_down, qkv_rows=l.qkv_rows) for l in model.layers]
    assert all(len(l.qkv_parts) == 3 for l in layers)
    again = type(model)(model.config, layers, model.embed, model.norm, model.lm_head, model.device, model.dtype,
                        model.max_context)
    prompts = _prompts(3, seed=5, lo=20)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    want = [s.output_ids for s in LLMEngine(model, None, max_context=128).generate(prompts, params)]
    assert [s.output_ids for s in LLMEngine(again, None, max_context=128).generate(prompts, params)] == want
    with pytest.raises(hi.ConfigError, match="qkv_rows"):
        Layer(attn_norm=model.layers[0].attn_norm, wqkv=model.layers[0].wqkv, bqkv=None, wo=model.layers[0].wo,
              mlp_norm=model.layers[0].mlp_norm, w_gate_up=model.layers[0].w_gate_up, w_down=model.layers[0].w_down,
              qkv_rows=(1, 2, 3))


def test_warm_up_captures_each_step_shape_once_and_leaves_nothing_behind(model):
    """warm_up() on an engine whose runner 'captures' by running the step eagerly (a CPU stand-in
    for CUDA graphs): one graph per decode batch bucket up to max_num_seqs and per prefill token
    bucket the budget reaches, for each sampling kind; every block free again, no request left;
    the requests after it get the tokens they get alone, and their steps (prefills, chunks,
    mixed, decode) all replay a graph warm_up captured: none is captured or run eagerly later."""
    from hetinfer.engine.runner import SEQ_BUCKETS
    eng = LLMEngine(model, None, max_context=128, block_size=8, max_num_seqs=16, max_num_batched_tokens=256)
    assert eng.warm_up() == (0, 0)                     # no graphs on the CPU: nothing to do
    eng.runner.capture = lambda body: body
    decode, prefill = eng.warm_up()
    mixed = eng.runner.mixed_shapes(256)
    assert mixed == [24, 32, 48, 64, 96, 128, 192, 256, 384]     # the buckets of 16 + 1 + 1 .. 256 + 16 rows
    assert (decode, prefill) == (2 * len([b for b in SEQ_BUCKETS if b <= 16]), 2 * len(mixed))
    assert not eng.has_unfinished() and eng.blocks.num_free == eng.blocks.num_blocks
    captures, eager = eng.runner.num_captures, eng.runner.num_eager
    prompts = _prompts(10, seed=5, lo=3) + _prompts(2, seed=6, lo=100, hi_=118)           # long ones prefill in chunks
    params = [SamplingParams(max_tokens=12, ignore_eos=True)] * 6 + \
        [SamplingParams(max_tokens=9, temperature=0.8, seed=i, ignore_eos=True) for i in range(6)]
    got = [s.output_ids for s in eng.generate(prompts, params)]
    assert got == _alone(model, prompts, params)
    assert (eng.runner.num_captures, eng.runner.num_eager) == (captures, eager)
    eng.add_request([5], SamplingParams(max_tokens=2))
    with pytest.raises(hi.InputError, match="before any request"):
        eng.warm_up()
