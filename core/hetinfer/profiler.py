"""--profile: time per op kind and per layer. Off unless a Profiler is active; ops'
dispatch then times each kernel (synchronizing the device, so each time is the
kernel's own) and the model reports which layer it is in."""

from __future__ import annotations

import time
from collections import defaultdict

active: "Profiler | None" = None
_layer: str = "embed"


def set_layer(name) -> None:
    """Called by models as they enter each layer (cheap when profiling is off)."""
    global _layer
    _layer = name


class Profiler:
    def __init__(self, device=None):
        self.by_op = defaultdict(float)
        self.calls = defaultdict(int)
        self.by_layer = defaultdict(float)
        self._sync = None
        if device is not None and device.type != "cpu":
            from .device import get_allocator
            self._sync = get_allocator(device).synchronize

    def __enter__(self):
        global active
        active = self
        return self

    def __exit__(self, *exc):
        global active
        active = None

    def run(self, op: str, fn, kwargs) -> None:
        if self._sync:
            self._sync()
        t = time.perf_counter()
        fn(**kwargs)
        if self._sync:
            self._sync()
        dt = time.perf_counter() - t
        self.by_op[op] += dt
        self.calls[op] += 1
        self.by_layer[_layer] += dt

    def table(self) -> str:
        total = sum(self.by_op.values()) or 1e-12
        lines = [f"{'op':<16}{'calls':>8}{'ms':>10}{'%':>7}"]
        for op, s in sorted(self.by_op.items(), key=lambda kv: -kv[1]):
            lines.append(f"{op:<16}{self.calls[op]:>8}{s * 1e3:>10.1f}{100 * s / total:>7.1f}")
        lines.append(f"{'total':<16}{sum(self.calls.values()):>8}{total * 1e3:>10.1f}")
        lines.append("")
        lines.append(f"{'layer':<16}{'ms':>18}{'%':>7}")
        def order(k):
            name = k[0]
            return (0, -1) if name == "embed" else (2, 0) if name == "head" else (1, int(str(name).split()[-1]))
        for name, s in sorted(self.by_layer.items(), key=order):
            lines.append(f"{str(name):<16}{s * 1e3:>18.1f}{100 * s / total:>7.1f}")
        return "\n".join(lines)
