"""Buffer: a run of bytes on one device.

Owned buffers are returned to their allocator when garbage collected; external
buffers wrap memory someone else owns (a memory-mapped weight file, a NumPy
array) and are never freed or copied by hetinfer."""

from __future__ import annotations

from typing import Any


class Buffer:
    __slots__ = ("device", "nbytes", "handle", "allocator", "owned", "__weakref__")

    def __init__(self, device, nbytes: int, handle: Any, allocator, owned: bool = True):
        self.device = device        # hetinfer.Device
        self.nbytes = int(nbytes)
        self.handle = handle        # backend's handle: a uint8 ndarray on CPU, a pointer on CUDA
        self.allocator = allocator
        self.owned = owned

    def __del__(self):
        if self.owned and self.allocator is not None and self.handle is not None:
            try:
                self.allocator.free(self)
            except Exception:  # interpreter shutdown: nothing sensible to do
                pass
            self.handle = None

    def __repr__(self) -> str:
        kind = "owned" if self.owned else "external"
        return f"Buffer({self.device}, {self.nbytes} bytes, {kind})"
