"""Host memory: buffers are uint8 NumPy arrays, so tensors view them with no copy."""

import numpy as np

from hetinfer.allocator import Allocator
from hetinfer.buffer import Buffer


class CPUAllocator(Allocator):
    host_memory = True

    def __init__(self, device):
        super().__init__(device)
        self.allocated = 0
        self.peak = 0

    def alloc(self, nbytes: int) -> Buffer:
        buf = Buffer(self.device, nbytes, np.empty(nbytes, np.uint8), self, owned=True)
        self.allocated += nbytes
        self.peak = max(self.peak, self.allocated)
        return buf

    def free(self, buf: Buffer) -> None:
        self.allocated -= buf.nbytes

    def wrap_host(self, array: np.ndarray) -> Buffer:
        return Buffer(self.device, array.nbytes, array, self, owned=False)

    def copy_in(self, buf, offset, src):
        buf.handle[offset:offset + src.nbytes] = src.reshape(-1).view(np.uint8)

    def copy_out(self, buf, offset, dst):
        dst.reshape(-1).view(np.uint8)[...] = buf.handle[offset:offset + dst.nbytes]

    def copy(self, dst, dst_offset, src, src_offset, nbytes):
        dst.handle[dst_offset:dst_offset + nbytes] = src.handle[src_offset:src_offset + nbytes]

    def stats(self) -> dict:
        return {"allocated": self.allocated, "reserved": self.allocated, "peak": self.peak}
