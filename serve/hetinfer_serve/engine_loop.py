"""The engine runs in one thread: it takes new requests and aborts from a command queue,
calls engine.step() whenever there is work, turns each request's tokens into text (stop
strings held back by TextStream) and posts events to that request's asyncio queue.

Only this thread touches the engine (stats() is read from other threads: plain ints)."""

from __future__ import annotations

import asyncio
import collections
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field

from hetinfer.streaming import TextStream


@dataclass
class Event:
    index: int                       # the choice
    text: str = ""
    num_tokens: int = 0              # new tokens in this event (stop token included)
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None         # this request failed (the others go on)
    prompt_tokens: int = 0
    logprobs: list | None = None     # [(token id, logprob, [(id, logprob)] top)] when asked


@dataclass
class _Req:
    rid: str
    index: int
    ids: list
    params: object
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    num_logprobs: int | None = None
    stream: TextStream | None = None
    stop_ids: set = field(default_factory=set)

    def post(self, ev: Event) -> None:
        _post(self.loop, [(self.queue, ev)])


def _put_all(items) -> None:
    for queue, ev in items:
        queue.put_nowait(ev)


def _post(loop, items) -> None:
    """Hand events to their queues on their event loop: one wake-up of the loop for the lot."""
    try:
        loop.call_soon_threadsafe(_put_all, items)
    except RuntimeError:              # the event loop is closed: nobody is listening
        pass


class EngineLoop:
    def __init__(self, engine, tokenizer, on_step=None):
        self.engine, self.tokenizer = engine, tokenizer
        self.on_step = on_step                      # called (in this thread) after each step
        self._cmds: collections.deque = collections.deque()
        self._wake = threading.Event()
        self._reqs: dict[str, _Req] = {}
        self._stop = False
        self.failed: str | None = None
        self._lock = threading.Lock()
        self.num_inflight = 0                       # requests added and not finished (any thread reads)
        self._thread = threading.Thread(target=self._run, name="hetinfer-engine", daemon=True)

    def _count(self, d: int) -> None:
        with self._lock:
            self.num_inflight += d

    def start(self) -> None:
        self._thread.start()

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)

    # --- called from the event loop ---------------------------------------------------
    def submit(self, rid: str, index: int, ids: list[int], params, queue: asyncio.Queue,
               num_logprobs: int | None = None) -> None:
        req = _Req(rid, index, ids, params, queue, asyncio.get_running_loop(), num_logprobs)
        self._count(1)
        self._cmds.append(("add", req))
        self._wake.set()

    def abort(self, rid: str) -> None:
        self._cmds.append(("abort", rid))
        self._wake.set()

    # --- the engine thread ----------------------------------------------------------
    def _finish(self, req: _Req) -> None:
        if self._reqs.pop(req.rid, None) is not None:
            self._count(-1)

    def _commands(self) -> None:
        eng = self.engine
        while self._cmds:
            kind, x = self._cmds.popleft()
            if kind == "add":
                if self.failed:
                    self._count(-1)
                    x.post(Event(x.index, finished=True, error=f"the engine failed: {self.failed}"))
                    continue
                try:
                    x.stream = TextStream(self.tokenizer, x.params.stop)
                    x.stop_ids = x.params.stop_ids(self.tokenizer.eos_ids)
                    seq = eng.add_request(x.ids, x.params, request_id=x.rid, stop_ids=x.stop_ids)
                    seq.num_logprobs = x.num_logprobs
                except Exception as e:             # bad input found late: this request only
                    self._count(-1)
                    x.post(Event(x.index, finished=True, error=str(e)))
                    continue
                self._reqs[x.rid] = x
            else:
                req = self._reqs.get(x)
                if req is not None:
                    self._finish(req)
                    try:
                        eng.abort(x)
                    except Exception:
                        pass

    def _deliver(self, o, outbox: dict) -> None:
        """o's new text as an Event, added to outbox (event loop -> [(queue, Event)]) to be posted
        with the step's others; errors are posted at once."""
        req = self._reqs.get(o.request_id)
        if req is None:                              # aborted or already answered
            return
        try:
            text, st = [], req.stream
            lps = None
            if req.num_logprobs is not None:
                lps, got = [], o.seq.logprobs[len(o.seq.logprobs) - len(o.new_token_ids):]
            for i, t in enumerate(o.new_token_ids):
                if t in req.stop_ids or st.stopped:
                    continue
                text.append(st.push(t))
                if lps is not None and i < len(got):
                    lps.append((t, got[i][0], got[i][1]))
            finished, reason = o.finished, o.finish_reason
            if st.stopped and not finished:          # a stop string ended it
                self.engine.abort(o.request_id)
                finished = True
            if finished:
                text.append(st.flush())
                reason = "stop" if st.stopped or reason in ("stop", "abort") else "length"
                self._finish(req)
            outbox.setdefault(req.loop, []).append(
                (req.queue, Event(req.index, "".join(text), len(o.new_token_ids), finished, reason,
                                  prompt_tokens=o.seq.num_prompt_tokens, logprobs=lps)))
        except Exception as e:                       # e.g. a decoder error: this request only
            self._finish(req)
            try:
                self.engine.abort(o.request_id)
            except Exception:
                pass
            req.post(Event(req.index, finished=True, error=f"{type(e).__name__}: {e}"))

    def _run(self) -> None:
        eng = self.engine
        while not self._stop:
            self._commands()
            if not eng.has_unfinished():
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                outputs = eng.step()
            except Exception as e:
                self.failed = f"{type(e).__name__}: {e}"
                traceback.print_exc(file=sys.stderr)
                for req in list(self._reqs.values()):
                    self._finish(req)
                    req.post(Event(req.index, finished=True, error=f"the engine failed: {self.failed}"))
                # nothing more runs; requests that arrive get the error
                while not self._stop:
                    self._commands()
                    self._wake.wait(0.5)
                    self._wake.clear()
                return
            outbox: dict = {}                        # the step's events, one wake-up per event loop
            for o in outputs:
                self._deliver(o, outbox)
            for loop, items in outbox.items():
                _post(loop, items)
            if self.on_step is not None:
                try:
                    self.on_step(time.perf_counter())
                except Exception:
                    pass
