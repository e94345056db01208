"""The engine client that keeps the engine in this process: one thread takes new requests
and aborts from a command queue, steps the EngineCore whenever there is work and hands its
outputs to the OutputProcessor. Only this thread touches the engine. `hetinfer serve` runs
the core in its own process instead (engine_process.EngineProcess, the same interface);
this one serves an engine built in-process (tests, embedding the app)."""

from __future__ import annotations

import collections
import sys
import threading
import traceback

from .engine_core import EngineCore
from .output_processor import EngineClient, Event, OutputProcessor, Request


class EngineLoop(EngineClient):
    def __init__(self, engine, tokenizer):
        self.core = EngineCore(engine)
        self.info = self.core.info()
        self.tokenizer = tokenizer
        self.out = OutputProcessor(tokenizer)
        self._cmds: collections.deque = collections.deque()
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="hetinfer-engine", daemon=True)

    def stats(self) -> dict:
        return self.core.stats()                     # plain ints, read from any thread

    def start(self) -> None:
        self._thread.start()

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)

    def _add(self, req: Request) -> None:
        self._cmds.append(("add", req))
        self._wake.set()

    def _abort(self, rid: str) -> None:
        self._cmds.append(("abort", rid))
        self._wake.set()

    # --- the engine thread ----------------------------------------------------------
    def _commands(self) -> None:
        while self._cmds:
            kind, x = self._cmds.popleft()
            if kind == "add":
                err = self.core.add(x.rid, x.ids, x.params, x.stop_ids, x.num_logprobs)
                if err is not None:
                    self.out.process([err])
            else:
                self.core.abort(x)

    def _run(self) -> None:
        core = self.core
        while not self._stop:
            self._commands()
            if not core.has_unfinished():
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                outputs = core.step()
            except Exception as e:
                traceback.print_exc(file=sys.stderr)
                self.out.fail_all(f"{type(e).__name__}: {e}")
                while not self._stop:                # nothing more runs; later requests get the error
                    while self._cmds:
                        kind, x = self._cmds.popleft()
                        if kind == "add" and self.out.close(x.rid):
                            x.post(Event(x.index, finished=True, error=f"the engine failed: {self.failed}"))
                    self._wake.wait(0.5)
                    self._wake.clear()
                return
            for rid in self.out.process(outputs):
                core.abort(rid)
