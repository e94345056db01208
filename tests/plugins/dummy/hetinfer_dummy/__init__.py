"""A fake hetinfer backend for the plugin tests, installed for real with pip.

Device type "dummy" (two devices): memory is host bytes, but the allocator says
host_memory = False, so tensors behave as on a GPU: .numpy() copies, from_numpy
is refused. One kernel, add for dummy/f32, counts its calls in CALLS.
Device type "dummyabsent" is registered unavailable, like CUDA on a machine
without a GPU."""

import numpy as np

from hetinfer import DeviceType, hookimpl
from hetinfer.allocator import Allocator
from hetinfer.buffer import Buffer

CALLS: list = []
ABSENT_REASON = "no dummy accelerator in this machine"


class DummyAllocator(Allocator):
    host_memory = False

    def __init__(self, device):
        super().__init__(device)
        self.allocated = 0

    def alloc(self, nbytes):
        self.allocated += nbytes
        return Buffer(self.device, nbytes, np.zeros(nbytes, np.uint8), self, owned=True)

    def free(self, buf):
        self.allocated -= buf.nbytes

    def copy_in(self, buf, offset, src):
        buf.handle[offset:offset + src.nbytes] = src.reshape(-1).view(np.uint8)

    def copy_out(self, buf, offset, dst):
        dst.reshape(-1).view(np.uint8)[...] = buf.handle[offset:offset + dst.nbytes]

    def stats(self):
        return {"allocated": self.allocated}


def add(a, b, out):
    """out = a + b, computed in float32 on the 'device' (through host copies)."""
    CALLS.append(("add", a.shape, str(a.device)))
    out.copy_(a.numpy().astype(np.float32) + b.numpy().astype(np.float32))


@hookimpl
def register_devices(register):
    """Register the dummy device types."""
    register(DeviceType("dummy", available=True, count=2, make_allocator=DummyAllocator,
                        description="fake device for hetinfer's plugin tests"))
    register(DeviceType("dummyabsent", available=False, reason=ABSENT_REASON, count=0))


@hookimpl
def register_kernels(register):
    """Register add for dummy/f32 (contiguous: dispatch hands it contiguous copies)."""
    register("add", "dummy", "f32", add, contiguous=True)
