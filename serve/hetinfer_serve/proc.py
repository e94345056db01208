"""`hetinfer serve` as a child process on a free localhost port, started and waited for until
it prints its ready line: the tests and tools/serve_bench.py talk to a real server this way."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServeProcess:
    """`python -m hetinfer serve --port P *args`; .url once it is ready, .lines its output so far.
    Raises RuntimeError (with that output) if it exits or is not ready within ready_timeout s."""

    def __init__(self, *args: str, env: dict | None = None, ready_timeout: float = 300.0, echo=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.echo = echo                       # a file to copy the output to (e.g. sys.stderr)
        self.proc = subprocess.Popen([sys.executable, "-m", "hetinfer", "serve", "--port", str(self.port), *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        self._ready = threading.Event()           # set by the ready line, or when the output ends
        self.up = False                            # the ready line was seen
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(ready_timeout) or not self.up or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError("the server did not start:\n" + "".join(self.lines))

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if self.echo is not None:
                print(line, end="", file=self.echo, flush=True)
            if "hetinfer serve:" in line and "http://" in line:
                self.up = True
                self._ready.set()
        self._ready.set()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> "ServeProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
