"""The HTTP side of a request's tokens: text from the engine core's token ids (stop strings
held back by TextStream), then Events to the request's asyncio queue, a whole step's events
handed to their event loop in one wake-up. Both engine clients (EngineClient below) use it:
EngineLoop from its engine thread, EngineProcess on the event loop as the core's messages come."""

from __future__ import annotations

import asyncio
import threading
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
class Request:
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
        post(self.loop, [(self.queue, ev)])


def _put_all(items) -> None:
    for queue, ev in items:
        queue.put_nowait(ev)


def post(loop, items) -> None:
    """Hand events to their queues on their event loop: one wake-up of the loop for the lot."""
    try:
        loop.call_soon_threadsafe(_put_all, items)
    except RuntimeError:              # the event loop is closed: nobody is listening
        pass


class OutputProcessor:
    """The open requests. open/close run on the event loop, process where the client reads the
    engine's outputs (EngineLoop: its engine thread), so the dict and the counter change under a
    lock: either side may end a request."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._reqs: dict[str, Request] = {}
        self._lock = threading.Lock()
        self.num_inflight = 0             # requests opened and not ended (any thread reads)
        self.failed: str | None = None    # the engine failed: every request gets this error

    def open(self, req: Request) -> bool:
        """Register req (its text stream, its stop ids); False (and an error event) if it cannot run."""
        if self.failed:
            req.post(Event(req.index, finished=True, error=f"the engine failed: {self.failed}"))
            return False
        try:
            req.stream = TextStream(self.tokenizer, req.params.stop)
            req.stop_ids = req.params.stop_ids(self.tokenizer.eos_ids)
        except Exception as e:
            req.post(Event(req.index, finished=True, error=str(e)))
            return False
        with self._lock:
            self._reqs[req.rid] = req
            self.num_inflight += 1
        return True

    def close(self, rid: str) -> bool:
        """End rid here; True if it was open (the engine should abort it)."""
        with self._lock:
            if self._reqs.pop(rid, None) is None:
                return False
            self.num_inflight -= 1
        return True

    def fail_all(self, why: str) -> None:
        self.failed = why
        with self._lock:
            reqs = list(self._reqs.values())
        for req in reqs:
            if self.close(req.rid):
                req.post(Event(req.index, finished=True, error=f"the engine failed: {why}"))

    def process(self, outputs) -> list[str]:
        """Deliver a step's CoreOutputs; the ids of requests a stop string ended (to abort)."""
        outbox: dict = {}                      # event loop -> [(queue, Event)]
        stopped = []
        for o in outputs:
            req = self._reqs.get(o.request_id)
            if req is None:                    # aborted or already answered
                continue
            if o.error is not None:
                if self.close(req.rid):
                    req.post(Event(req.index, finished=True, error=o.error))
                continue
            try:
                ev = self._event(req, o)
            except Exception as e:             # e.g. a decoder error: this request only
                if self.close(req.rid):
                    stopped.append(req.rid)
                    req.post(Event(req.index, finished=True, error=f"{type(e).__name__}: {e}"))
                continue
            if ev.finished:
                if not self.close(req.rid):
                    continue
                if not o.finished:             # a stop string ended it: the engine must stop too
                    stopped.append(req.rid)
            outbox.setdefault(req.loop, []).append((req.queue, ev))
        for loop, items in outbox.items():
            post(loop, items)
        return stopped

    def _event(self, req: Request, o) -> Event:
        text, st = [], req.stream
        lps = [] if req.num_logprobs is not None else None
        for i, t in enumerate(o.new_token_ids):
            if t in req.stop_ids or st.stopped:
                continue
            text.append(st.push(t))
            if lps is not None and o.logprobs and i < len(o.logprobs):
                lps.append((t, o.logprobs[i][0], o.logprobs[i][1]))
        finished, reason = o.finished or st.stopped, o.finish_reason
        if finished:
            text.append(st.flush())
            reason = "stop" if st.stopped or reason in ("stop", "abort") else "length"
        return Event(req.index, "".join(text), len(o.new_token_ids), finished, reason,
                     prompt_tokens=o.num_prompt_tokens, logprobs=lps)


class EngineClient:
    """What the server uses of an engine client (EngineLoop, EngineProcess): a request is opened
    in the client's OutputProcessor (`out`), then handed to the engine by its _add / _abort."""

    out: OutputProcessor

    @property
    def failed(self) -> str | None:
        return self.out.failed

    @property
    def num_inflight(self) -> int:
        return self.out.num_inflight

    # --- called from the event loop ---------------------------------------------------
    def submit(self, rid: str, index: int, ids: list[int], params, queue: asyncio.Queue,
               num_logprobs: int | None = None) -> None:
        req = Request(rid, index, ids, params, queue, asyncio.get_running_loop(), num_logprobs)
        if self.out.open(req):
            self._add(req)

    def abort(self, rid: str) -> None:
        if self.out.close(rid):
            self._abort(rid)

    def _add(self, req: Request) -> None:
        raise NotImplementedError

    def _abort(self, rid: str) -> None:
        raise NotImplementedError
