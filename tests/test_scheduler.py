"""The block pool and the scheduler as hypothesis state machines (pure Python, no device):
reference counts never negative, no block owned twice, every block free again at the end,
prefix hits reuse the same blocks, every admitted request finishes or is aborted."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import assume, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from hetinfer.engine.blocks import BlockManager
from hetinfer.engine.scheduler import Scheduler
from hetinfer.engine.sequence import Sequence, SequenceStatus
from hetinfer.errors import ConfigError, InputError
from hetinfer.sampling import SamplingParams

BS = 4


def _seq(rid, tokens, max_tokens=8):
    return Sequence(rid, tokens, SamplingParams(max_tokens=max_tokens), stop_ids={0})


def _owned(seqs) -> Counter:
    c = Counter()
    for s in seqs:
        c.update(s.block_table)
    return c


class BlockPoolMachine(RuleBasedStateMachine):
    """Sequences take, grow and free blocks; the pool's counts must match who holds what."""

    def __init__(self):
        super().__init__()
        self.pool = BlockManager(12, BS)
        self.live: list[Sequence] = []
        self.n = 0

    @rule(prefix=st.sampled_from([[1, 2, 3, 4], [1, 2, 3, 4, 5, 6, 7, 8], [9, 9, 9, 9]]),
          tail=st.lists(st.integers(1, 5), max_size=9))
    def admit(self, prefix, tail):
        seq = _seq(f"s{self.n}", prefix + tail)
        self.n += 1
        hit = self.pool.match_prefix(seq)
        need = self.pool.blocks_for(len(seq)) - len(hit) + sum(1 for b in hit if self.pool.ref_count[b] == 0)
        assume(need <= self.pool.num_free)
        before = {b: self.pool.ref_count[b] for b in hit}
        self.pool.take_prefix(seq, hit)
        for b in hit:                                        # a hit shares the very same block
            assert self.pool.ref_count[b] == before[b] + 1
        n = len(seq) - seq.num_computed_tokens
        assert self.pool.can_allocate(seq, n)
        self.pool.allocate(seq, n)
        seq.num_computed_tokens = len(seq)
        self.pool.register_full_blocks(seq)
        self.live.append(seq)

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 100), k=st.integers(1, 6))
    def grow(self, i, k):
        seq = self.live[i % len(self.live)]
        assume(self.pool.can_allocate(seq, k))
        seq.token_ids += [7] * k
        self.pool.allocate(seq, k)
        seq.num_computed_tokens = len(seq)
        self.pool.register_full_blocks(seq)

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 100))
    def free(self, i):
        seq = self.live.pop(i % len(self.live))
        self.pool.free_blocks(seq)

    @rule(tokens=st.lists(st.integers(1, 9), min_size=BS + 1, max_size=12))
    def rehit_after_free(self, tokens):
        """A prefix registered, freed, and asked for again comes back as the same blocks
        (unless evicted for new tokens meanwhile, which only happens when nothing is free)."""
        seq = _seq("tmp", tokens)
        hit = self.pool.match_prefix(seq)
        if self.pool.blocks_for(len(tokens)) + len(hit) > self.pool.num_free:
            return
        self.pool.take_prefix(seq, hit)
        self.pool.allocate(seq, len(tokens) - seq.num_computed_tokens)
        seq.num_computed_tokens = len(tokens)
        self.pool.register_full_blocks(seq)
        full = list(seq.block_table[:(len(tokens) - 1) // BS])
        self.pool.free_blocks(seq)
        again = _seq("tmp2", tokens)
        assert self.pool.match_prefix(again) == full

    @invariant()
    def counts_match_owners(self):
        owned = _owned(self.live)
        for b in range(self.pool.num_blocks):
            assert self.pool.ref_count[b] >= 0
            assert self.pool.ref_count[b] == owned.get(b, 0)
            assert (b in self.pool.free) == (self.pool.ref_count[b] == 0)
        for s in self.live:
            assert len(set(s.block_table)) == len(s.block_table), "a block twice in one table"
        for h, b in self.pool.cached.items():
            assert self.pool.hash_of[b] == h

    def teardown(self):
        for s in self.live:
            self.pool.free_blocks(s)
        assert self.pool.num_free == self.pool.num_blocks
        assert all(c == 0 for c in self.pool.ref_count)


class SchedulerMachine(RuleBasedStateMachine):
    """Requests arrive, steps run (a fake model samples tokens), some are aborted; with a
    pool small enough that preemption happens. Every admitted request ends."""

    def __init__(self):
        super().__init__()
        self.blocks = BlockManager(10, BS)
        self.sched = Scheduler(self.blocks, max_num_seqs=4, max_num_batched_tokens=7, max_model_len=40)
        self.all: list[Sequence] = []
        self.n = 0

    @rule(prompt=st.lists(st.integers(1, 6), min_size=1, max_size=14), max_tokens=st.integers(1, 10),
          shared=st.booleans())
    def add(self, prompt, max_tokens, shared):
        tokens = ([1, 2, 3, 4, 5, 6, 7, 8] + prompt) if shared else prompt
        seq = _seq(f"r{self.n}", tokens, max_tokens)
        self.n += 1
        self.sched.add(seq)
        self.all.append(seq)

    @precondition(lambda self: self.sched.has_unfinished())
    @rule(token=st.integers(0, 6))
    def step(self, token):
        out = self.sched.schedule()
        assert out.num_tokens <= self.sched.max_num_batched_tokens
        assert len(self.sched.running) <= self.sched.max_num_seqs
        rows = [s for s in out.scheduled if s.needs_logits]
        seen = set()
        for s in out.scheduled:
            assert s.seq.status == SequenceStatus.RUNNING and id(s.seq) not in seen
            seen.add(id(s.seq))
            # the chunk's tokens have slots in the block table
            assert len(s.seq.block_table) * BS >= s.seq.num_computed_tokens + s.num_tokens
        # a fake sampler: never the stop token unless drawn, same for every row
        self.sched.postprocess(out, [token] * len(rows))

    @precondition(lambda self: self.sched.has_unfinished())
    @rule(i=st.integers(0, 100))
    def abort(self, i):
        live = [s for s in self.all if not s.is_finished]
        self.sched.abort(live[i % len(live)].request_id)

    @invariant()
    def pool_consistent(self):
        holders = self.sched.running + list(self.sched.waiting)
        owned = _owned(holders)
        for b in range(self.blocks.num_blocks):
            assert self.blocks.ref_count[b] == owned.get(b, 0) >= 0
        for s in self.sched.waiting:                     # preempted ones hold nothing
            if s.num_preemptions:
                assert not s.block_table or s.num_computed_tokens == s.num_cached_tokens
        for s in self.all:
            if s.is_finished:
                assert not s.block_table and s.finish_reason in ("stop", "length", "abort")
                assert s.num_output_tokens <= s.params.max_tokens

    def teardown(self):
        for _ in range(500):                             # every request ends (no livelock)
            if not self.sched.has_unfinished():
                break
            out = self.sched.schedule()
            self.sched.postprocess(out, [5] * sum(s.needs_logits for s in out.scheduled))
        assert not self.sched.has_unfinished()
        assert all(s.is_finished for s in self.all)
        assert self.blocks.num_free == self.blocks.num_blocks


TestBlockPool = BlockPoolMachine.TestCase
TestBlockPool.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestScheduler = SchedulerMachine.TestCase
TestScheduler.settings = settings(max_examples=150, stateful_step_count=50, deadline=None)


def test_prefix_hit_skips_prefill_and_eviction_is_lru():
    pool = BlockManager(4, BS)
    a = _seq("a", list(range(1, 10)))                    # 9 tokens: 2 full blocks + 1
    pool.allocate(a, 9)
    a.num_computed_tokens = 9
    pool.register_full_blocks(a)
    first_two = a.block_table[:2]
    pool.free_blocks(a)
    b = _seq("b", list(range(1, 9)) + [42, 43])
    hit = pool.match_prefix(b)
    assert hit == first_two
    pool.take_prefix(b, hit)
    assert b.num_computed_tokens == b.num_cached_tokens == 8 and pool.hit_rate == 1.0
    # only when the free list is all that is left are cached blocks taken, oldest first
    c = _seq("c", [50] * 8)
    pool.allocate(c, 8)
    assert set(c.block_table).isdisjoint(first_two)
    assert pool.match_prefix(_seq("d", list(range(1, 10)))) == first_two


def test_a_whole_prompt_hit_still_runs_its_last_token():
    pool = BlockManager(8, BS)
    a = _seq("a", list(range(1, 9)))                     # exactly two blocks
    pool.allocate(a, 8)
    a.num_computed_tokens = 8
    pool.register_full_blocks(a)
    b = _seq("b", list(range(1, 9)))
    assert len(pool.match_prefix(b)) == 1                # the last block runs again for logits


def test_preempted_request_is_recomputed_not_lost():
    blocks = BlockManager(4, BS)
    sched = Scheduler(blocks, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=16)
    old, new = _seq("old", [1] * 7, 9), _seq("new", [2] * 7, 9)
    sched.add(old)
    sched.add(new)
    finished = []
    for _ in range(100):
        if not sched.has_unfinished():
            break
        out = sched.schedule()
        finished += sched.postprocess(out, [3] * sum(s.needs_logits for s in out.scheduled))
    assert {s.request_id for s in finished} == {"old", "new"}
    assert sched.num_preemptions >= 1 and new.num_preemptions >= 1 and old.num_preemptions == 0
    assert all(s.num_output_tokens == 9 for s in finished)


@pytest.mark.parametrize("kw,match", [
    (dict(max_num_seqs=0), "max_num_seqs must be a whole number >= 1"),
    (dict(max_num_batched_tokens=-5), "max_num_batched_tokens must be"),
    (dict(max_model_len=1.5), "max_model_len must be"),
])
def test_bad_scheduler_settings(kw, match):
    with pytest.raises(ConfigError, match=match):
        Scheduler(BlockManager(4, BS), **kw)


def test_requests_that_could_never_fit_are_refused_when_added():
    sched = Scheduler(BlockManager(4, BS), max_model_len=64)
    with pytest.raises(InputError, match=r"the context holds 64"):
        sched.add(_seq("long", [1] * 60, max_tokens=10))
    with pytest.raises(InputError, match=r"whole KV cache holds 16 \(4 blocks of 4\)"):
        sched.add(_seq("big", [1] * 10, max_tokens=10))
    with pytest.raises(InputError, match="no tokens"):
        sched.add(_seq("empty", [], max_tokens=1))
    with pytest.raises(ConfigError, match="at least one block"):
        BlockManager(0, BS)


def test_step_input_rows_slots_and_padding():
    """The arrays a step hands the model (as a captured graph's fixed shapes need them):
    slots through the block table, one logits row per sequence, padding rows never written."""
    import numpy as np
    from hetinfer.engine.scheduler import ScheduledSeq
    from hetinfer.engine.step import StepInput
    a, b = _seq("a", [11, 12, 13, 14, 15, 16]), _seq("b", [21, 22, 23])
    a.block_table, b.block_table = [7, 2], [5]
    a.num_computed_tokens = 4                            # a: decode-like chunk of 2 at positions 4, 5
    plan = [ScheduledSeq(a, 2), ScheduledSeq(b, 3)]
    st = StepInput.build(plan, 4, pad_seqs=2, pad_tokens=3, max_blocks=3, all_rows=True)
    assert st.input_ids.tolist() == [15, 16, 21, 22, 23, 0, 0, 0]
    assert st.positions.tolist() == [4, 5, 0, 1, 2, 0, 1, 0]
    assert st.slot_mapping.tolist() == [2 * 4 + 0, 2 * 4 + 1, 20, 21, 22, -1, -1, -1]
    assert st.query_start.tolist() == [0, 2, 5, 7, 8] and st.context_lens.tolist() == [6, 3, 2, 1]
    assert st.block_tables.tolist() == [[7, 2, 0], [5, 0, 0], [0, 0, 0], [0, 0, 0]]
    assert st.logits_rows.tolist() == [1, 4, 6, 7] and st.num_seqs == 2
    only = StepInput.build(plan, 4)                      # eager: rows that sample only
    assert only.logits_rows.tolist() == [1, 4] and only.block_tables.shape == (2, 2)
    packed = st.packed()
    assert packed.dtype == np.int32 and packed.size == 8 * 3 + 5 + 4 + 12 + 4
    dev = st.to("cpu")
    assert dev.block_tables.shape == (4, 3) and dev.block_tables.numpy().tolist() == st.block_tables.tolist()
    other = StepInput.build(plan[::-1], 4, pad_seqs=2, pad_tokens=3, max_blocks=3, all_rows=True)
    other.copy_into(dev)                                 # one copy into the same views
    assert dev.input_ids.numpy().tolist() == [21, 22, 23, 15, 16, 0, 0, 0]
