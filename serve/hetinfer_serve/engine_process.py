"""The engine client of `hetinfer serve`: the EngineCore in a process of its own (spawned,
engine_core.run_core), so that the model's steps and the HTTP event loop never wait for
each other's GIL. Two one-way pipes: commands go out through a sender thread (a large
prompt never blocks the event loop), and a reader thread takes each step's token ids,
turns them into text and events (OutputProcessor) and keeps the core's last stats.

The core process gone (killed, crashed) fails every open request and /health; the HTTP
process gone ends the core (its command pipe reaches EOF)."""

from __future__ import annotations

import asyncio
import multiprocessing
import queue as queue_mod
import threading

from hetinfer import errors
from hetinfer.errors import HetinferError

from .engine_core import CoreInfo, run_core
from .output_processor import OutputProcessor, Request


def _core_error(name: str, message: str) -> HetinferError:
    """The core's start-up error as the same hetinfer error class (its message unchanged)."""
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, HetinferError):
        try:
            return cls(message)
        except TypeError:
            pass
    return HetinferError(f"the engine process could not start: {name}: {message}")


class EngineProcess:
    def __init__(self, args):
        ctx = multiprocessing.get_context("spawn")          # no fork: CUDA and threads
        cmd_r, self._cmd = ctx.Pipe(duplex=False)
        self._out, out_w = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=run_core, args=(args, cmd_r, out_w), name="hetinfer-engine-core",
                                daemon=True)
        self.proc.start()
        cmd_r.close()
        out_w.close()
        self.info: CoreInfo | None = None
        self.tokenizer = None
        self.out: OutputProcessor | None = None
        self._stats: dict = {}
        self._sendq: queue_mod.SimpleQueue = queue_mod.SimpleQueue()
        self._stopping = False
        self._threads = [threading.Thread(target=self._send_loop, name="hetinfer-core-send", daemon=True),
                         threading.Thread(target=self._read_loop, name="hetinfer-core-read", daemon=True)]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, tokenizer) -> CoreInfo:
        """Block until the core has loaded the model; its error (a HetinferError) if it could not."""
        try:
            msg = self._out.recv()
        except (EOFError, OSError):
            self.proc.join(5)
            raise HetinferError(f"the engine process exited (code {self.proc.exitcode}) before it was "
                                "ready; its output above says why") from None
        if msg[0] == "error":
            self.proc.join(5)
            raise _core_error(msg[1], msg[2])
        self.info, self._stats, self.tokenizer = msg[1], msg[2], tokenizer
        self.out = OutputProcessor(tokenizer)
        return self.info

    @property
    def failed(self) -> str | None:
        return self.out.failed

    @property
    def num_inflight(self) -> int:
        return self.out.num_inflight

    def stats(self) -> dict:
        return self._stats

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def shutdown(self, timeout: float = 5.0) -> None:
        if self._stopping:
            return
        self._stopping = True
        self._sendq.put(("shutdown",))
        self._sendq.put(None)
        if not self._threads[0].is_alive():                 # never started: send it here
            try:
                self._cmd.send(("shutdown",))
            except OSError:
                pass
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)

    # --- called from the event loop ---------------------------------------------------
    def submit(self, rid: str, index: int, ids: list[int], params, queue: asyncio.Queue,
               num_logprobs: int | None = None) -> None:
        req = Request(rid, index, ids, params, queue, asyncio.get_running_loop(), num_logprobs)
        if self.out.open(req):
            self._sendq.put(("add", rid, ids, params, req.stop_ids, num_logprobs))

    def abort(self, rid: str) -> None:
        if self.out.close(rid):
            self._sendq.put(("abort", rid))

    # --- threads ------------------------------------------------------------------------
    def _send_loop(self) -> None:
        while (msg := self._sendq.get()) is not None:
            try:
                self._cmd.send(msg)
            except OSError:                                  # the core is gone: the reader says so
                return

    def _read_loop(self) -> None:
        while True:
            try:
                msg = self._out.recv()
            except (EOFError, OSError):
                if not self._stopping:
                    self.proc.join(1)
                    self.out.fail_all(f"the engine process exited (code {self.proc.exitcode})")
                return
            if msg[0] == "out":
                self._stats = msg[2]
                for rid in self.out.process(msg[1]):
                    self._sendq.put(("abort", rid))
            elif msg[0] == "failed":
                self.out.fail_all(msg[1])
