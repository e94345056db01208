"""Collectives of the CUDA backend: NCCL through CuPy (cupy.cuda.nccl), one rank a GPU.

The communicator is made on the first collective of a device, by every rank together: rank 0
draws NCCL's unique id and broadcasts it over the group's MPI communicator, each rank joins
with NcclCommunicator(world size, id, rank) on its own GPU. allReduce / allGather are then
enqueued on the backend's own stream (the one every hetinfer kernel of that GPU runs on, so
no extra synchronisation, and capturable into a CUDA graph) with the tensors' raw device
pointers. CuPy and mpi4py are imported only here, when a world of two or more ranks first
needs them."""

from __future__ import annotations

from hetinfer import dtypes as DT
from hetinfer.errors import ConfigError

FLOATS = ("f32", "f16", "bf16")


def _nccl():
    try:
        from cupy.cuda import nccl
    except Exception as e:          # no CuPy, or a CuPy built without NCCL
        raise ConfigError(f"tensor parallelism on CUDA needs NCCL through CuPy (cupy.cuda.nccl): "
                          f"{type(e).__name__}: {e}") from e
    return nccl


def _ptr(t) -> int:
    return int(t.buffer.handle) + t.byte_offset


class NCCLCommunicator:
    """One NcclCommunicator per GPU index of this process (normally one)."""

    def __init__(self, group):
        if group.mpi is None:
            raise ConfigError("the CUDA communicator needs a process group made by hetinfer.distributed.init")
        self.group = group
        self._comms: dict[int, object] = {}

    def _comm(self, index: int):
        c = self._comms.get(index)
        if c is None:
            nccl = _nccl()
            import cupy
            g = self.group
            uid = nccl.get_unique_id() if g.rank == 0 else None
            uid = g.mpi.bcast(uid, root=0)              # the bootstrap: rank 0's id to every rank
            with cupy.cuda.Device(index):
                c = self._comms[index] = nccl.NcclCommunicator(g.world_size, uid, g.rank)
        return c

    @staticmethod
    def _type(dtype):
        nccl = _nccl()
        t = {DT.f32: nccl.NCCL_FLOAT32, DT.f16: nccl.NCCL_FLOAT16,
             DT.bf16: getattr(nccl, "NCCL_BFLOAT16", None)}.get(dtype)
        if t is None:
            raise ConfigError(f"NCCL (through this CuPy) has no type for {dtype}")
        return t

    def all_reduce(self, dev, x, out) -> None:
        """Sum over the ranks; x and out contiguous (out may be x: NCCL reduces in place)."""
        nccl = _nccl()
        self._comm(dev.index).allReduce(_ptr(x), _ptr(out), x.numel, self._type(x.dtype), nccl.NCCL_SUM,
                                        dev.stream_handle)

    def all_gather(self, dev, x, gathered) -> None:
        """gathered (N, *x.shape) contiguous <- every rank's contiguous x, in rank order."""
        self._comm(dev.index).allGather(_ptr(x), _ptr(gathered), x.numel, self._type(x.dtype),
                                        dev.stream_handle)


def _dev(t):
    from . import driver
    return driver.get_device(t.device.index)


def all_reduce(x, out, group):
    if group.world_size == 1:
        if _ptr(x) != _ptr(out):
            out.copy_(x)
        return
    group.communicator("cuda").all_reduce(_dev(x), x, out)


def all_gather(x, dim, out, group):
    if group.world_size == 1:
        out.copy_(x)
        return
    gather(group.communicator("cuda"), _dev(x), x, dim, out, group.world_size)


def gather(comm, dev, x, dim, out, n) -> None:
    """out = the n ranks' x concatenated along dim, through comm.all_gather."""
    if dim == 0:                                   # rank blocks lie end to end in out
        comm.all_gather(dev, x, out)
        return
    from hetinfer.tensor import empty
    tmp = empty((n,) + x.shape, x.dtype, x.device)                 # (N, ..., S_dim, ...)
    comm.all_gather(dev, x, tmp)
    # out (..., N * S_dim, ...) seen as (..., N, S_dim, ...) with N moved first = tmp
    split = out.view(*(out.shape[:dim] + (n, x.shape[dim]) + out.shape[dim + 1:]))
    order = (dim,) + tuple(i for i in range(split.ndim) if i != dim)
    split.permute(*order).copy_(tmp)


KERNELS = [
    ("all_reduce", all_reduce),
    ("all_gather", all_gather),
]
