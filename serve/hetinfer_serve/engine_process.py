"""The engine client of `hetinfer serve`: the EngineCore in a process of its own (spawned,
engine_core.run_core), so that the model's steps and the HTTP event loop never wait for
each other's GIL. Two one-way pipes, both served on the event loop: a command is written
at once (small ones; a large prompt, or one behind it, goes through a sender thread so that
the loop never waits on a full pipe), and the core's messages are read when the pipe is
readable (loop.add_reader): each step's token ids become text and events (OutputProcessor)
with no thread hop, and the core's last stats are kept.

The core process gone (killed, crashed) fails every open request and /health; the HTTP
process gone ends the core (its command pipe reaches EOF)."""

from __future__ import annotations

import asyncio
import fcntl
import multiprocessing
import queue as queue_mod
import threading
from multiprocessing.reduction import ForkingPickler

from hetinfer import errors
from hetinfer.errors import HetinferError

from .engine_core import CoreInfo, run_core
from .output_processor import EngineClient, OutputProcessor, Request


DIRECT_BYTES = 16384           # commands up to this size are written from the event loop
PIPE_BYTES = 1 << 20           # the command pipe's buffer (Linux's default limit for F_SETPIPE_SZ)


def _core_error(name: str, message: str) -> HetinferError:
    """The core's start-up error as the same hetinfer error class (its message unchanged)."""
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, HetinferError):
        try:
            return cls(message)
        except TypeError:
            pass
    return HetinferError(f"the engine process could not start: {name}: {message}")


class EngineProcess(EngineClient):
    def __init__(self, args):
        ctx = multiprocessing.get_context("spawn")          # no fork: CUDA and threads
        cmd_r, self._cmd = ctx.Pipe(duplex=False)
        self._out, out_w = ctx.Pipe(duplex=False)
        try:                                                 # room for many prompts while a step runs
            fcntl.fcntl(self._cmd.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        except (AttributeError, OSError):
            pass
        self.proc = ctx.Process(target=run_core, args=(args, cmd_r, out_w), name="hetinfer-engine-core",
                                daemon=True)
        self.proc.start()
        cmd_r.close()
        out_w.close()
        self.info: CoreInfo | None = None
        self.tokenizer = None
        self.out: OutputProcessor | None = None
        self._stats: dict = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._write = threading.Lock()                       # one writer of the command pipe at a time
        self._count = threading.Lock()
        self._queued = 0                                     # commands handed to the sender thread, not yet written
        self._sendq: queue_mod.SimpleQueue = queue_mod.SimpleQueue()
        self._sender = threading.Thread(target=self._send_loop, name="hetinfer-core-send", daemon=True)
        self._sender.start()

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

    def stats(self) -> dict:
        return self._stats

    def start(self) -> None:
        """Read the core's messages on the running event loop (call from it: the app's lifespan)."""
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._out.fileno(), self._on_readable)

    def shutdown(self, timeout: float = 5.0) -> None:
        if self._stopping:
            return
        self._stopping = True
        self._stop_reading()
        self._send(("shutdown",))
        self._sendq.put(None)
        self._sender.join(timeout)
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)

    def _add(self, req: Request) -> None:
        self._send(("add", req.rid, req.ids, req.params, req.stop_ids, req.num_logprobs))

    def _abort(self, rid: str) -> None:
        self._send(("abort", rid))

    def _send(self, msg) -> None:
        """Write msg now if it is small and nothing waits before it; else queue it for the sender
        thread (the order of commands is kept either way)."""
        buf = ForkingPickler.dumps(msg)
        if len(buf) <= DIRECT_BYTES and self._write.acquire(blocking=False):
            try:
                if self._queued == 0:
                    try:
                        self._cmd.send_bytes(buf)
                    except OSError:                          # the core is gone: the reader says so
                        pass
                    return
            finally:
                self._write.release()
        with self._count:
            self._queued += 1
        self._sendq.put(buf)

    def _send_loop(self) -> None:
        while (buf := self._sendq.get()) is not None:
            with self._write:
                try:
                    self._cmd.send_bytes(buf)
                except OSError:
                    pass
                with self._count:
                    self._queued -= 1

    def _stop_reading(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.remove_reader(self._out.fileno())
            except (ValueError, OSError, RuntimeError):
                pass

    def _on_readable(self) -> None:
        try:
            while self._out.poll():
                self._handle(self._out.recv())
        except (EOFError, OSError):
            self._stop_reading()
            if not self._stopping:
                self.proc.join(1)
                self.out.fail_all(f"the engine process exited (code {self.proc.exitcode})")

    def _handle(self, msg) -> None:
        if msg[0] == "out":
            self._stats = msg[2]
            for rid in self.out.process(msg[1]):          # ended here by a stop string
                self._abort(rid)
        elif msg[0] == "failed":
            self.out.fail_all(msg[1])
