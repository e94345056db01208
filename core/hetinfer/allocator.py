"""The Allocator contract every backend implements.

Small on purpose (tinygrad's shape): alloc/free and three copies. Caching,
statistics and out-of-memory retries live in the backends' implementations."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from .buffer import Buffer


class Allocator(ABC):
    host_memory = False   # True where buffers are host arrays (Tensor.numpy() is then a view)

    def __init__(self, device):
        self.device = device

    @abstractmethod
    def alloc(self, nbytes: int) -> Buffer:
        """Return an owned Buffer of at least nbytes."""

    @abstractmethod
    def free(self, buf: Buffer) -> None:
        """Give an owned buffer's memory back (called by Buffer.__del__)."""

    @abstractmethod
    def copy_in(self, buf: Buffer, offset: int, src: np.ndarray) -> None:
        """Copy the bytes of contiguous host array src into buf at byte offset."""

    @abstractmethod
    def copy_out(self, buf: Buffer, offset: int, dst: np.ndarray) -> None:
        """Copy dst.nbytes bytes of buf from byte offset into contiguous host array dst."""

    def copy(self, dst: Buffer, dst_offset: int, src: Buffer, src_offset: int, nbytes: int) -> None:
        """Device-to-device copy; the default stages through the host."""
        tmp = np.empty(nbytes, np.uint8)
        self.copy_out(src, src_offset, tmp)
        self.copy_in(dst, dst_offset, tmp)

    def wrap_host(self, array: np.ndarray) -> Buffer:
        """An external Buffer over a contiguous host array, with no copy.
        Only host-memory devices can do this."""
        from .errors import DeviceError
        raise DeviceError(f"device {self.device} cannot wrap host memory; copy it with .to()")

    can_capture = False   # True where capture() records device work for replay (CUDA graphs)

    def capture(self, fn):
        """Record the device work of fn() and return replay(), which runs it again with no
        host work. Devices that cannot (can_capture False) raise."""
        from .errors import DeviceError
        raise DeviceError(f"device {self.device} cannot capture work for replay")

    def memory_info(self) -> tuple[int, int] | None:
        """(free, total) bytes of device memory, counting memory this allocator caches as
        free; None where the device does not report it (the CPU)."""
        return None

    def stats(self) -> dict:
        """allocated / reserved / peak bytes, where the backend tracks them."""
        return {}

    def synchronize(self) -> None:
        """Wait until all queued work on the device has finished."""
