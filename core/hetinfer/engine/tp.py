"""Tensor-parallel steps: rank 0 schedules and samples; every other rank follows. Before each
forward rank 0 broadcasts the step (StepInput's packed i32 array after a 5-number header:
num_seqs, T, B, MB, R; num_seqs -1 = stop); every rank runs model.forward on its shard, the
collectives inside forward meet, and only rank 0 samples from the gathered logits."""

from __future__ import annotations

import atexit

import numpy as np

from .step import StepInput

STOP = -1
_stopping: list = []


def send(group, step: StepInput) -> None:
    b, mb = np.asarray(step.block_tables).shape
    head = np.array([step.num_seqs, step.num_tokens, b, mb, np.asarray(step.logits_rows).size], np.int32)
    group.broadcast_array(np.concatenate([head, step.packed()]))


def send_stop(group) -> None:
    if group.world_size > 1 and group.is_root and not _stopping:
        _stopping.append(True)
        group.broadcast_array(np.array([STOP, 0, 0, 0, 0], np.int32))


def receive(group) -> StepInput | None:
    arr = group.broadcast_array(None)
    num_seqs, t, b, mb, r = (int(v) for v in arr[:5])
    if num_seqs == STOP:
        return None
    at, fields = 5, []
    for shape in ((t,), (t,), (t,), (b + 1,), (b,), (b, mb), (r,)):
        n = int(np.prod(shape))
        fields.append(arr[at:at + n].reshape(shape))
        at += n
    return StepInput(*fields, num_seqs)


def follow(runner) -> None:
    """A worker's loop: run every step rank 0 sends until it sends stop."""
    while True:
        step = receive(runner.group)
        if step is None:
            return
        runner.model.forward(step.to(runner.device), runner.kv)


def claim() -> None:
    """One tensor-parallel engine a process: the workers follow the first one's steps."""
    from ..errors import ConfigError
    if _claimed:
        raise ConfigError("a tensor-parallel process runs one engine (one LLM / LLMEngine); its workers "
                          "follow that engine's steps")
    _claimed.append(True)


_claimed: list = []


def start(engine) -> None:
    """Called by LLMEngine at world size N > 1: workers follow rank 0's steps here and then
    leave the process (exit 0); rank 0 returns and stops them when it exits."""
    g = engine.runner.group
    if g.is_root:
        atexit.register(send_stop, g)
        return
    try:
        follow(engine.runner)
    except BaseException as e:       # one clear error, then every rank stops (MPI Abort)
        g.abort(f"worker failed: {type(e).__name__}: {e}")
    raise SystemExit(0)
