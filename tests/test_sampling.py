"""Sampling: the `sample` and `penalties` ops draw from the reference distribution
(chi-square), seeds reproduce, bad parameters give one clear error."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import hetinfer as hi
from hetinfer import ops
from hetinfer.ops import reference as R
from hetinfer.engine.sequence import Sequence
from hetinfer.sampling import BatchSampler, SamplingParams

DRAWS = 4000


def chi_square_ok(counts: np.ndarray, probs: np.ndarray) -> tuple[bool, float, int]:
    """Pearson chi-square against expected counts; categories expected < 5 are pooled.
    The bound is the 1 - 1e-6 quantile region (dof + 7 sqrt(2 dof) + 15): a correct
    sampler fails it about once in a million runs."""
    exp = probs * counts.sum()
    big = exp >= 5
    obs_b, exp_b = list(counts[big]), list(exp[big])
    if (~big).any():
        obs_b.append(counts[~big].sum())
        exp_b.append(exp[~big].sum())
    obs_b, exp_b = np.array(obs_b, float), np.array(exp_b, float)
    keep = exp_b > 0
    chi2 = float((((obs_b - exp_b) ** 2)[keep] / exp_b[keep]).sum())
    dof = max(int(keep.sum()) - 1, 1)
    return chi2 < dof + 7 * np.sqrt(2 * dof) + 15, chi2, dof


def draw_counts(logits: np.ndarray, **kw) -> np.ndarray:
    v = logits.shape[0]
    lt = hi.tensor(np.repeat(logits[None], 64, 0).astype(np.float32))     # 64 rows per call
    rng = np.random.default_rng(0)
    counts = np.zeros(v, np.int64)
    for _ in range(DRAWS // 64):
        u = hi.tensor(rng.random(64, dtype=np.float32))
        counts += np.bincount(ops.sample(lt, u, **kw).numpy(), minlength=v)
    return counts


FILTERS = {
    "temperature": dict(temperature=0.7),
    "top_k": dict(temperature=1.0, top_k=5),
    "top_p": dict(temperature=1.0, top_p=0.8),
    "min_p": dict(temperature=1.0, min_p=0.1),
    "all": dict(temperature=1.3, top_k=12, top_p=0.9, min_p=0.05),
}


@pytest.mark.parametrize("name", list(FILTERS))
@settings(max_examples=6, deadline=None)
@given(v=st.integers(2, 40), seed=st.integers(0, 2**31 - 1), spread=st.floats(0.5, 3.0))
def test_sampled_distribution_matches_reference(name, v, seed, spread):
    kw = FILTERS[name]
    logits = np.random.default_rng(seed).normal(0, spread, v).astype(np.float32)
    probs = R.sample_probs(logits[None].astype(np.float64), kw.get("temperature", 1.0), kw.get("top_k", 0),
                           kw.get("top_p", 1.0), kw.get("min_p", 0.0))[0]
    counts = draw_counts(logits, **kw)
    assert counts[probs == 0].sum() == 0, "sampled a token the filters remove"
    ok, chi2, dof = chi_square_ok(counts, probs)
    assert ok, f"chi-square {chi2:.1f} with {dof} dof"


def test_inverse_cdf_matches_reference_exactly():
    rng = np.random.default_rng(5)
    logits = rng.normal(0, 2, (16, 50)).astype(np.float32)
    u = rng.random(16, dtype=np.float32)
    got = ops.sample(hi.tensor(logits), hi.tensor(u), temperature=0.9, top_k=20, top_p=0.95, min_p=0.02).numpy()
    assert (got == R.sample(logits, u, 0.9, 20, 0.95, 0.02)).all()


def test_temperature_zero_is_argmax():
    logits = np.random.default_rng(2).normal(0, 1, (3, 100)).astype(np.float32)
    got = ops.sample(hi.tensor(logits), hi.tensor(np.full(3, 0.5, np.float32)), temperature=0.0).numpy()
    assert (got == logits.argmax(-1)).all()


@settings(max_examples=25, deadline=None)
@given(v=st.integers(2, 64), seed=st.integers(0, 2**31 - 1), rep=st.floats(0.5, 2.0),
       pres=st.floats(-2, 2), freq=st.floats(-2, 2))
def test_penalties_match_reference(v, seed, rep, pres, freq):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (2, v)).astype(np.float32)
    counts = rng.integers(0, 3, (2, v)).astype(np.int32)
    seen = np.maximum(counts, rng.integers(0, 2, (2, v))).astype(np.int32)
    got = ops.penalties(hi.tensor(logits), hi.tensor(counts), hi.tensor(seen), rep, pres, freq).numpy()
    np.testing.assert_allclose(got, R.penalties(logits, counts, seen, rep, pres, freq), rtol=1e-5, atol=1e-5)


def _draw(sampler, seqs, logits):
    sampler.prepare(seqs)
    sampler.device_step(logits)
    return sampler.read(len(seqs))


def test_batch_sampler_rows_follow_their_own_parameters_and_seeds():
    """Rows of one call sample with their own settings and seeded streams: each row's
    tokens equal the tokens it gets sampled alone; penalties act per row."""
    v = 30
    base = np.random.default_rng(0).normal(0, 1, v).astype(np.float32)
    params = [SamplingParams(temperature=1.0, top_p=0.95, seed=1234), SamplingParams(),
              SamplingParams(temperature=0.7, top_k=5, seed=7), SamplingParams(temperature=1.2, min_p=0.1, seed=9)]
    seqs = [Sequence(f"r{i}", [1, 2], p, set()) for i, p in enumerate(params)]
    together = [_draw(BatchSampler(4, v, "cpu"), seqs, hi.tensor(np.repeat(base[None], 4, 0))) for _ in range(40)]
    for i, p in enumerate(params):
        alone_seq = Sequence("x", [1, 2], p, set())
        one = BatchSampler(1, v, "cpu")
        alone = [_draw(one, [alone_seq], hi.tensor(base[None]))[0] for _ in range(40)]
        assert [t[i] for t in together] == alone
    assert len({t[0] for t in together}) > 3 and {t[1] for t in together} == {int(base.argmax())}
    # a huge presence penalty never repeats a token while others remain
    s = Sequence("p", [0], SamplingParams(temperature=0.0, presence_penalty=2.0, repetition_penalty=2.0), set())
    big = hi.tensor(np.linspace(0, 1, v, dtype=np.float32)[None] * 0.1)
    one = BatchSampler(1, v, "cpu")
    for _ in range(10):
        s.token_ids.append(_draw(one, [s], hi.tensor(big.numpy().copy()))[0])
    assert len(set(s.output_ids)) == 10 and 0 not in s.output_ids


@pytest.mark.parametrize("kw,match", [
    (dict(temperature=-0.1), "temperature must be >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-3), "top_k"),
    (dict(min_p=2.0), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(presence_penalty=5.0), "presence_penalty"),
    (dict(max_tokens=-1), "max_tokens"),
    (dict(stop=[""]), "stop strings"),
])
def test_bad_sampling_parameters(kw, match):
    with pytest.raises(hi.InputError, match=match):
        SamplingParams(**kw)
