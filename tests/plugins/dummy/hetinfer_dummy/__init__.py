"""A fake hetinfer backend for the plugin tests, installed for real with pip.

Device type "dummy" (two devices): memory is host bytes, but the allocator says
host_memory = False, so tensors behave as on a GPU: .numpy() copies, from_numpy
is refused, and device-to-device copies (Tensor.copy_) run the backend's cast
kernel. Kernels: add for dummy/f32 (contiguous: dispatch hands it copies) and
cast for every float dtype (writes strided outputs itself); CALLS records calls.
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


def _write(t, values):
    """Write host values into tensor t on the dummy device, strided views included
    (read-modify-write of the byte span the view covers, as a device kernel would)."""
    if t.numel == 0:
        return
    isz = t.dtype.itemsize
    lo = sum(s * (n - 1) for s, n in zip(t.strides, t.shape) if s < 0)
    hi = sum(s * (n - 1) for s, n in zip(t.strides, t.shape) if s > 0)
    span = np.empty(hi - lo + 1, t.dtype.np)
    t.buffer.allocator.copy_out(t.buffer, (t.offset + lo) * isz, span.view(np.uint8))
    view = np.lib.stride_tricks.as_strided(span[-lo:], t.shape, tuple(s * isz for s in t.strides))
    view[...] = np.asarray(values).astype(t.dtype.np)
    t.buffer.allocator.copy_in(t.buffer, (t.offset + lo) * isz, span.view(np.uint8))


def cast(x, out):
    """out = x converted to out's dtype (round to nearest even, like NumPy / ml_dtypes)."""
    CALLS.append(("cast", x.shape, str(x.device)))
    _write(out, x.numpy())


@hookimpl
def register_devices(register):
    """Register the dummy device types."""
    register(DeviceType("dummy", available=True, count=2, make_allocator=DummyAllocator,
                        description="fake device for hetinfer's plugin tests"))
    register(DeviceType("dummyabsent", available=False, reason=ABSENT_REASON, count=0))


@hookimpl
def register_kernels(register):
    """Register add for dummy/f32 (contiguous: dispatch hands it contiguous copies) and cast."""
    register("add", "dummy", "f32", add, contiguous=True)
    for dt in ("f32", "f16", "bf16"):
        register("cast", "dummy", dt, cast)
