"""The engine core: one LLMEngine driven by commands (add, abort) and stepped, giving raw
outputs (token ids, no text) and its stats. It runs in the HTTP process's engine thread
(engine_loop.EngineLoop) or in a process of its own (run_core, started by
engine_process.EngineProcess): vLLM V1's split, where the HTTP process detokenizes and
streams while the core only schedules and runs the model, each with its own GIL."""

from __future__ import annotations

import signal
import sys
import time
import traceback
from dataclasses import dataclass
from typing import NamedTuple

from hetinfer.engine.scheduler import check_fits
from hetinfer.errors import InputError


class CoreOutput(NamedTuple):
    request_id: str
    new_token_ids: list            # the tokens this step gave (a stop token included)
    finished: bool
    finish_reason: str | None      # "stop", "length", "abort"
    num_prompt_tokens: int
    logprobs: list | None = None   # [(logprob, [(id, logprob)] top)] per new token, when asked
    error: str | None = None       # the request was refused (found late): it alone fails


@dataclass(frozen=True)
class CoreInfo:
    """What the HTTP side needs to check requests without the engine at hand."""
    vocab_size: int
    max_context: int
    max_num_seqs: int
    num_blocks: int
    block_size: int
    budget_line: str

    def check(self, num_prompt: int, max_tokens: int) -> None:
        check_fits(num_prompt, max_tokens, self.max_context, self.num_blocks, self.block_size)


class EngineCore:
    def __init__(self, engine):
        self.engine = engine
        self._added: dict[str, float] = {}       # request -> when it was added, until its first token
        self.first_token_sum = 0.0               # seconds from add to the first token, in this process
        self.first_token_count = 0
        self.step_sum, self.num_steps = 0.0, 0   # engine steps: seconds, count
        self.first_step_sum, self.num_first_steps = 0.0, 0     # the steps that gave a first token

    def info(self) -> CoreInfo:
        e = self.engine
        return CoreInfo(e.model.config.vocab_size, e.max_context, e.scheduler.max_num_seqs, e.blocks.num_blocks,
                        e.blocks.block_size, e.budget.line())

    def add(self, rid: str, ids: list[int], params, stop_ids, num_logprobs) -> CoreOutput | None:
        """Queue a request; an error output (nothing queued) when the engine refuses it."""
        try:
            seq = self.engine.add_request(ids, params, request_id=rid, stop_ids=stop_ids)
        except Exception as e:                   # bad input found late: this request only
            return CoreOutput(rid, [], True, None, 0, error=str(e))
        seq.num_logprobs = num_logprobs
        self._added[rid] = time.perf_counter()
        return None

    def abort(self, rid: str) -> None:
        try:
            self.engine.abort(rid)
        except InputError:                       # finished in the meantime
            pass

    def has_unfinished(self) -> bool:
        return self.engine.has_unfinished()

    def step(self) -> list[CoreOutput]:
        out = []
        start = time.perf_counter()
        outputs = self.engine.step()
        now = time.perf_counter()
        self.step_sum += now - start
        self.num_steps += 1
        first = False
        for o in outputs:
            seq, new = o.seq, o.new_token_ids
            t0 = self._added.pop(o.request_id, None) if (new or o.finished) else None
            if t0 is not None and new:
                self.first_token_sum += now - t0
                self.first_token_count += 1
                first = True
            lps = None
            if seq.num_logprobs is not None and new:
                lps = seq.logprobs[len(seq.logprobs) - len(new):]
            out.append(CoreOutput(o.request_id, list(new), o.finished, o.finish_reason, seq.num_prompt_tokens, lps))
        if first:
            self.first_step_sum += now - start
            self.num_first_steps += 1
        return out

    def stats(self) -> dict:
        b = self.engine.blocks
        return self.engine.stats() | {"prefix_hits": b.hits, "prefix_queries": b.queries,
                                      "first_token_sum": self.first_token_sum,
                                      "first_token_count": self.first_token_count,
                                      "step_sum": self.step_sum, "step_count": self.num_steps,
                                      "first_step_sum": self.first_step_sum, "first_step_count": self.num_first_steps,
                                      "graph_captures": self.engine.runner.num_captures,
                                      "eager_steps": self.engine.runner.num_eager}


def build_engine(args):
    """The LLMEngine of the serve flags (the model loads here)."""
    from hetinfer.cli import engine_options
    from hetinfer.engine import LLMEngine, load
    model, ckpt = load(args.model, args.device, args.dtype, args.max_context, progress=False,
                       quantize=args.quantize, weights=args.weights)
    opts = engine_options(args) | {"verbose": False}
    engine = LLMEngine(model, ckpt.tokenizer, max_context=args.max_context, graphs=not args.eager, **opts)
    t0 = time.perf_counter()
    decode, prefill = engine.warm_up()
    if decode or prefill:
        print(f"hetinfer serve: {decode + prefill} step graphs captured ({decode} decode, {prefill} prefill) in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
    return engine


# --- the engine core's own process --------------------------------------------------------
# Messages, core -> HTTP: ("ready", CoreInfo, stats) | ("error", class name, message) once, then
# ("out", [CoreOutput], stats) after each step or batch of commands, ("failed", message) when
# a step raised. HTTP -> core: ("add", rid, ids, params, stop_ids, num_logprobs),
# ("abort", rid), ("shutdown",). The HTTP process gone (EOF) ends this one too.

def run_core(args, cmd_conn, out_conn) -> None:
    """The engine process's main: load, say ready, then serve commands and step."""
    for sig in (signal.SIGINT, signal.SIGTERM):         # the HTTP process says when to stop (a
        signal.signal(sig, signal.SIG_IGN)              # Ctrl-C or a group's SIGTERM drains there)
    try:
        core = EngineCore(build_engine(args))
        out_conn.send(("ready", core.info(), core.stats()))
    except BaseException as e:                           # the HTTP process reports it and exits
        out_conn.send(("error", type(e).__name__, str(e)))
        return
    try:
        _serve(core, cmd_conn, out_conn)
    except (EOFError, OSError):                          # the HTTP process is gone
        pass


def _serve(core: EngineCore, cmd_conn, out_conn) -> None:
    failed = None
    while True:
        outs: list[CoreOutput] = []
        busy = failed is None and core.has_unfinished()
        if cmd_conn.poll(0 if busy else None):
            while True:
                msg = cmd_conn.recv()
                if msg[0] == "add":
                    err = (core.add(*msg[1:]) if failed is None else
                           CoreOutput(msg[1], [], True, None, 0, error=f"the engine failed: {failed}"))
                    if err is not None:
                        outs.append(err)
                elif msg[0] == "abort":
                    core.abort(msg[1])
                else:                                    # shutdown
                    return
                if not cmd_conn.poll():
                    break
        if failed is None and core.has_unfinished():
            try:
                outs += core.step()
            except Exception as e:
                failed = f"{type(e).__name__}: {e}"
                traceback.print_exc(file=sys.stderr)
                out_conn.send(("failed", failed))
                continue
        out_conn.send(("out", outs, core.stats()))
