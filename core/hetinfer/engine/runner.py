"""The model runner: the paged KV pools, one forward per step, batched sampling, and
CUDA graphs of whole steps.

A step of T token rows from B sequences runs padded to a bucket (T', B') (shape()):
padding sequences hold the extra rows (their slots are -1: nothing written; their logits
are ignored). Decode steps (T = B) pad to the batch bucket; prefill and mixed steps always
to B' = max_num_seqs + 1 and the token bucket of T, so that they come in few shapes, which
LLMEngine.warm_up captures before serving. The graph captured for (T', B', sampling kind)
is replayed: the host writes its input tensors, the graph runs forward and sampling, and
only the sampled ids come back. So decode steps, prefill chunks and mixed steps all cost one
replay instead of hundreds of kernel launches from Python. The first step of a bucket runs
eagerly (warming workspaces and the cache the capture allocates from); the second is
captured. Steps with penalized rows (per-row token counts uploaded each step) and devices
that cannot capture run eagerly."""

from __future__ import annotations

from dataclasses import dataclass

from .. import distributed
from ..device import get_allocator
from ..errors import HetinferError
from ..sampling import BatchSampler
from .kv_cache import KVBudget, PagedKVCache
from .scheduler import SchedulerOutput
from .step import StepInput

SEQ_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)


def bucket(n: int, buckets=SEQ_BUCKETS) -> int:
    """The smallest bucket >= n; beyond the table, multiples of the last step (32 / 512)."""
    for b in buckets:
        if b >= n:
            return b
    step = 32 if buckets is SEQ_BUCKETS else 512
    return -(-n // step) * step


@dataclass
class _Graph:
    step: StepInput              # device tensors the graph reads
    sampler: BatchSampler
    replay: object = None        # None until captured (the first use runs eagerly)
    warm: bool = False


class ModelRunner:
    def __init__(self, model, budget: KVBudget, max_num_seqs: int, graphs: bool = True):
        self.model = model
        self.device = model.device
        self.kv = PagedKVCache(model.config, budget, model.dtype, model.device)
        self.block_size = budget.block_size
        self.max_context = budget.max_context
        self.max_blocks = -(-budget.max_context // budget.block_size)
        self.max_num_seqs = max_num_seqs
        alloc = get_allocator(model.device)
        self.capture = alloc.capture if graphs and alloc.can_capture else None
        self.group = distributed.group()
        if self.group.world_size > 1:      # every rank would have to replay its graph in step: eager for now
            self.capture = None
        self._graphs: dict[tuple, _Graph] = {}
        self._samplers: dict[int, BatchSampler] = {}
        self.num_replays = self.num_eager = self.num_captures = 0
        self.capture_errors: list[str] = []

    def _sampler(self, rows: int) -> BatchSampler:
        s = self._samplers.get(rows)
        if s is None:
            if len(self._samplers) >= 16:
                self._samplers.pop(next(iter(self._samplers)))
            s = self._samplers[rows] = BatchSampler(rows, self.model.config.vocab_size, self.device)
        return s

    def run(self, out: SchedulerOutput) -> list[int]:
        """Run one scheduled step; the sampled token of each sequence that needed logits."""
        seqs = [s.seq for s in out.scheduled if s.needs_logits]
        kind = BatchSampler.kind(seqs)
        wants_logprobs = any(s.num_logprobs is not None for s in seqs)     # such steps run eagerly
        if self.capture is not None and kind != "penalized" and not wants_logprobs:
            return self._run_graph(out, kind)
        self.num_eager += 1
        step = StepInput.build(out.scheduled, self.block_size)
        if self.group.world_size > 1:      # tensor parallel: the workers run the same step
            from .tp import send
            send(self.group, step)
        step = step.to(self.device)
        logits = self.model.forward(step, self.kv)                         # (R, V)
        if not seqs:
            return []
        rows = logits.numpy() if wants_logprobs else None                  # before penalties (in place)
        sampler = self._sampler(len(seqs))
        sampler.prepare(seqs)
        sampler.device_step(logits)
        tokens = sampler.read(len(seqs))
        if rows is not None:
            attach_logprobs(seqs, rows, tokens)
        return tokens

    def shape(self, t: int, b: int) -> tuple[int, int]:
        """(T', B'): the padded shape a step of t token rows from b sequences runs as. Padding
        sequences hold the padding rows (at least one each, at most max_context)."""
        if t > b:                                   # prefill / mixed: one batch size, token buckets
            bb = self.max_num_seqs + 1              # (at least one padding sequence)
            tb = bucket(t + bb - b, TOKEN_BUCKETS)
            if tb - t <= (bb - b) * self.max_context:
                return tb, bb
        tb = bucket(t, TOKEN_BUCKETS) if t > b else bucket(t)          # decode: T = B buckets
        pad_t = tb - t
        need = -(-pad_t // self.max_context) if pad_t else 0            # padding sequences
        bb = bucket(b + need) if pad_t else bucket(b)
        if pad_t == 0 and bb > b:                                       # one row per padding sequence
            tb = t + bb - b
        return tb, bb

    def mixed_shapes(self, max_num_batched_tokens: int) -> list[int]:
        """The T' of every prefill / mixed step shape a scheduler with this token budget can
        give (B' = max_num_seqs + 1), smallest first."""
        shapes = (self.shape(t, 1) for t in range(2, max_num_batched_tokens + 1))
        return sorted({tb for tb, bb in shapes if bb == self.max_num_seqs + 1})

    def _run_graph(self, out: SchedulerOutput, kind: str) -> list[int]:
        t, b = out.num_tokens, len(out.scheduled)
        tb, bb = self.shape(t, b)
        pad_t, pad_s = tb - t, bb - b
        host = StepInput.build(out.scheduled, self.block_size, pad_seqs=pad_s, pad_tokens=pad_t,
                               max_blocks=self.max_blocks, all_rows=True)
        # rows: every scheduled sequence then padding; only the sampling ones draw numbers
        rows = [s.seq if s.needs_logits else None for s in out.scheduled]
        key = (host.num_tokens, bb, kind)
        g = self._graphs.get(key)
        if g is None:
            if len(self._graphs) >= 64:                                 # keep the most recent
                self._graphs.pop(next(iter(self._graphs)))
            g = self._graphs[key] = _Graph(host.to(self.device), BatchSampler(
                bb, self.model.config.vocab_size, self.device))
        else:
            host.copy_into(g.step)
        g.sampler.prepare(rows)

        def body():
            g.sampler.device_step(self.model.forward(g.step, self.kv))
        if g.replay is None and not g.warm:
            g.warm = True
            body()
            self.num_eager += 1
        elif g.replay == "eager":
            body()
            self.num_eager += 1
        else:
            if g.replay is None:
                try:
                    g.replay = self.capture(body)
                    self.num_captures += 1
                except HetinferError as e:         # this shape cannot be captured: eager from now on
                    g.replay = "eager"
                    self.capture_errors.append(f"{key}: {e}")
                    body()
                    self.num_eager += 1
                    return self._tokens(g, out)
            g.replay()
            self.num_replays += 1
        return self._tokens(g, out)

    @staticmethod
    def _tokens(g: _Graph, out: SchedulerOutput) -> list[int]:
        got = g.sampler.read(len(out.scheduled))
        return [tok for tok, s in zip(got, out.scheduled) if s.needs_logits]


# --- logprobs: only for sequences whose num_logprobs is set --------------------------------
def attach_logprobs(seqs, rows, tokens) -> None:
    """Append (logprob of the sampled token, top-k [(id, logprob)]) to each asking sequence,
    from its row of the raw logits (host array (R, V)), log-softmax in float64."""
    import numpy as np
    for seq, row, tok in zip(seqs, rows, tokens):
        k = seq.num_logprobs
        if k is None:
            continue
        x = row.astype(np.float64)
        m = x.max()
        lp = x - (m + np.log(np.exp(x - m).sum()))
        top = []
        if k > 0:
            idx = np.argpartition(-lp, min(k, lp.size - 1))[:k]
            idx = idx[np.argsort(-lp[idx], kind="stable")]
            top = [(int(i), float(lp[i])) for i in idx]
        seq.logprobs.append((float(lp[tok]), top))
