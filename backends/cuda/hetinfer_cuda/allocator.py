"""The CUDA caching allocator: cuMemAlloc underneath, freed blocks cached by size class.

Size classes: requests up to 1 MiB round up to 512 B, larger ones to 2 MiB. A freed
block goes to the cache of its class and is handed out again for the next request of
that class, with no driver call. When cuMemAlloc reports out of memory, the cache is
emptied (cuMemFree of every cached block) and the allocation retried once; then
OutOfMemoryError states the requested, allocated and reserved bytes.

allocated: bytes of blocks in use (rounded sizes); reserved: bytes held from the
driver (in use + cached); peak: the largest `allocated` seen.

All work goes to the device's one stream, so a block freed while kernels that use it
are still queued can be reused at once: the next user is ordered after them.
CuPy's allocations are routed here too (cupy_bridge), so there is one pool.

capture(fn) -> replay: CUDA graphs (the Allocator contract's capture). While fn
is captured, alloc, copy_in, copy_out, synchronize and empty_cache raise DeviceError:
a captured step must use preallocated buffers and leave host transfers to the caller
(done on the same stream before the replay).
"""

from __future__ import annotations

import threading

import numpy as np

from hetinfer.allocator import Allocator
from hetinfer.buffer import Buffer
from hetinfer.errors import DeviceError, OutOfMemoryError

from . import driver as D

SMALL_LIMIT = 1 << 20
SMALL_ROUND = 512
LARGE_ROUND = 2 << 20


def size_class(nbytes: int) -> int:
    n = max(int(nbytes), 1)
    r = SMALL_ROUND if n <= SMALL_LIMIT else LARGE_ROUND
    return (n + r - 1) // r * r


def _fmt(n: int) -> str:
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n} bytes ({n / div:.2f} {unit})"
    return f"{n} bytes"


class CudaAllocator(Allocator):
    host_memory = False

    def __init__(self, device):
        super().__init__(device)
        self.cu = D.get_device(device.index)
        self._cache: dict[int, list[int]] = {}
        self._graph = None                    # the capture in progress: its blocks
        self._graph_ptrs: dict[int, dict] = {}  # block -> the live graph that owns it
        self._lock = threading.RLock()   # a Buffer freed by GC inside alloc re-enters
        self.allocated = 0
        self.reserved = 0
        self.peak = 0
        self.cached = 0
        self.num_mallocs = 0       # cuMemAlloc calls that succeeded
        self.num_reuses = 0        # requests served from the cache
        self.num_frees = 0         # cuMemFree calls (cache emptied)
        self.num_ooms = 0
        from . import cupy_bridge
        cupy_bridge.attach(self)

    # ------------------------------------------------------------ alloc / free
    def _no_capture(self, what: str) -> None:
        if self.cu.capturing:
            raise DeviceError(f"{self.device}: {what} while a CUDA graph is being captured; a captured "
                              "step must use preallocated buffers and no host transfers "
                              "(run it eagerly with graphs=False / --eager to find the culprit)")

    can_capture = True

    def memory_info(self):
        free, total = self.cu.mem_info()
        return free + self.cached, total

    def capture(self, fn):
        """Capture the device work of fn() into a CUDA graph; returns replay(), which
        launches it on this device's stream (no host sync). Destroyed when replay is
        garbage collected.

        Temporaries fn allocates come from blocks already cached (an eager run of the same
        step first leaves them there; a new cuMemAlloc cannot be captured) and belong to the
        graph from then on: freed during the capture they are reused only by later
        allocations of the same capture (stream order keeps that safe), and they go back to
        the cache only when the graph is destroyed."""
        import weakref
        g = self._graph = {"owned": [], "free": {}}
        try:
            replay = D.capture_graph(self.cu, fn)
        finally:
            self._graph = None
        for ptr, _ in g["owned"]:
            self._graph_ptrs[ptr] = g
        weakref.finalize(replay, self._release_graph_blocks, g)
        return replay

    def _release_graph_blocks(self, g) -> None:
        """The graph is gone: its freed blocks go back to the cache (one still referenced
        is freed the usual way when its buffer goes)."""
        with self._lock:
            for ptr, _ in g["owned"]:
                self._graph_ptrs.pop(ptr, None)
            for size, ptrs in g["free"].items():
                self._cache.setdefault(size, []).extend(ptrs)
                self.allocated -= size * len(ptrs)
                self.cached += size * len(ptrs)

    def _alloc_captured(self, nbytes: int) -> Buffer:
        size = size_class(nbytes)
        g = self._graph
        with self._lock:
            lst = g["free"].get(size)
            if lst:
                ptr = lst.pop()
            else:
                lst = self._cache.get(size)
                if not lst:
                    self._no_capture(f"allocation of {nbytes} bytes that the cache cannot serve (run the "
                                     "step eagerly once before capturing it)")
                ptr = lst.pop()
                self.cached -= size
                self.allocated += size
                self.peak = max(self.peak, self.allocated)
                g["owned"].append((ptr, size))
        return Buffer(self.device, nbytes, ptr, self, owned=True)

    def alloc(self, nbytes: int) -> Buffer:
        if nbytes < 0:
            raise DeviceError(f"cannot allocate {nbytes} bytes")
        if self.cu.capturing:
            if self._graph is None:
                self._no_capture(f"allocation of {nbytes} bytes")
            return self._alloc_captured(nbytes)
        size = size_class(nbytes)
        with self._lock:
            lst = self._cache.get(size)
            if lst:
                ptr = lst.pop()
                self.cached -= size
                self.num_reuses += 1
            else:
                ptr = self._malloc(size, nbytes)
            self.allocated += size
            self.peak = max(self.peak, self.allocated)
        return Buffer(self.device, nbytes, ptr, self, owned=True)

    def _malloc(self, size: int, requested: int) -> int:
        drv = D._drv()
        self.cu.make_current()
        err, ptr = drv.cuMemAlloc(size)
        if err == drv.CUresult.CUDA_ERROR_OUT_OF_MEMORY and self.cached:
            self._empty_cache_locked()
            err, ptr = drv.cuMemAlloc(size)
        if err == drv.CUresult.CUDA_ERROR_OUT_OF_MEMORY or (
                err != drv.CUresult.CUDA_SUCCESS and size > self.cu.total_memory):
            self.num_ooms += 1
            try:
                free, total = self.cu.mem_info()
                dev_info = f"; the device has {_fmt(free)} free of {_fmt(total)}"
            except DeviceError:
                dev_info = ""
            raise OutOfMemoryError(
                f"{self.device}: out of memory: requested {_fmt(requested)} "
                f"(block of {_fmt(size)}); allocated {_fmt(self.allocated)}, "
                f"reserved {_fmt(self.reserved)} by hetinfer (cache emptied and retried)"
                f"{dev_info}")
        if err != drv.CUresult.CUDA_SUCCESS:
            raise DeviceError(f"cuMemAlloc({size}) on {self.device} failed: {D.error_text(err)}")
        self.reserved += size
        self.num_mallocs += 1
        return int(ptr)

    def free(self, buf: Buffer) -> None:
        if buf.handle is None:
            return
        size = size_class(buf.nbytes)
        ptr = int(buf.handle)
        with self._lock:
            g = self._graph
            if g is not None and any(p == ptr for p, _ in g["owned"]):
                g["free"].setdefault(size, []).append(ptr)          # reused within this capture only
                return
            owner = self._graph_ptrs.get(ptr)
            if owner is not None:                                   # a graph's: back at its destruction
                owner["free"].setdefault(size, []).append(ptr)
                return
            self._cache.setdefault(size, []).append(int(buf.handle))
            self.allocated -= size
            self.cached += size

    def _empty_cache_locked(self) -> None:
        if not self.cached:
            return
        drv = D._drv()
        self.cu.synchronize()
        for size, lst in self._cache.items():
            while lst:
                ptr = lst.pop()
                D.check(drv.cuMemFree(ptr), "cuMemFree")
                self.reserved -= size
                self.cached -= size
                self.num_frees += 1
        self._cache.clear()

    def empty_cache(self) -> None:
        """Give every cached (free) block back to the driver."""
        self._no_capture("empty_cache")
        with self._lock:
            self._empty_cache_locked()

    # ------------------------------------------------------------ copies
    @staticmethod
    def ptr(buf: Buffer, offset: int = 0) -> int:
        return int(buf.handle) + int(offset)

    def copy_in(self, buf: Buffer, offset: int, src: np.ndarray) -> None:
        self._no_capture("a host-to-device copy")
        src = np.ascontiguousarray(src)
        n = src.nbytes
        if offset < 0 or offset + n > buf.nbytes:
            raise DeviceError(f"copy_in of {n} bytes at offset {offset} overruns a buffer of {buf.nbytes}")
        if n == 0:
            return
        self.cu.make_current()
        # pageable source: the call returns once the bytes are staged, so src may go away
        D.check(D._drv().cuMemcpyHtoDAsync(self.ptr(buf, offset), src.ctypes.data, n, self.cu.stream),
                "cuMemcpyHtoDAsync")

    def copy_out(self, buf: Buffer, offset: int, dst: np.ndarray) -> None:
        self._no_capture("a device-to-host copy")
        if not dst.flags.c_contiguous:
            raise DeviceError("copy_out needs a contiguous host array")
        n = dst.nbytes
        if offset < 0 or offset + n > buf.nbytes:
            raise DeviceError(f"copy_out of {n} bytes at offset {offset} overruns a buffer of {buf.nbytes}")
        if n == 0:
            return
        self.cu.make_current()
        D.check(D._drv().cuMemcpyDtoHAsync(dst.ctypes.data, self.ptr(buf, offset), n, self.cu.stream),
                "cuMemcpyDtoHAsync")
        self.cu.synchronize()

    def copy(self, dst: Buffer, dst_offset: int, src: Buffer, src_offset: int, nbytes: int) -> None:
        if nbytes == 0:
            return
        if dst_offset + nbytes > dst.nbytes or src_offset + nbytes > src.nbytes:
            raise DeviceError(f"device copy of {nbytes} bytes overruns a buffer")
        self.cu.make_current()
        D.check(D._drv().cuMemcpyDtoDAsync(self.ptr(dst, dst_offset), self.ptr(src, src_offset),
                                           nbytes, self.cu.stream), "cuMemcpyDtoDAsync")

    # ------------------------------------------------------------ facts
    def stats(self) -> dict:
        return {"allocated": self.allocated, "reserved": self.reserved, "peak": self.peak,
                "cached": self.cached, "num_mallocs": self.num_mallocs,
                "num_reuses": self.num_reuses, "num_frees": self.num_frees, "num_ooms": self.num_ooms}

    def reset_peak(self) -> None:
        self.peak = self.allocated

    def synchronize(self) -> None:
        self._no_capture("synchronize")
        self.cu.synchronize()
