"""Collectives of the CPU backend: MPI through mpi4py on the NumPy buffers of CPU tensors
(one rank a process). mpi4py is imported when a world of two or more ranks makes its
communicator, never at import: at world size 1 the kernels copy."""

from __future__ import annotations

import numpy as np

FLOATS = ("f32", "f16", "bf16")


class MPICommunicator:
    """comm.Allreduce / Allgather on host arrays. f16 / bf16 are summed in f32 (MPI has no
    reduction for them); gathers move bytes, so any dtype goes."""

    def __init__(self, group):
        if group.mpi is None:
            raise RuntimeError("the CPU communicator needs a process group made by hetinfer.distributed.init")
        self.comm, self.size = group.mpi, group.world_size

    def all_reduce(self, x: np.ndarray, out: np.ndarray) -> None:
        from mpi4py import MPI
        if x.dtype in (np.float32, np.float64) and out.flags.c_contiguous:
            if np.shares_memory(x, out):
                self.comm.Allreduce(MPI.IN_PLACE, out, op=MPI.SUM)
            else:
                self.comm.Allreduce(np.ascontiguousarray(x), out, op=MPI.SUM)
            return
        buf = np.ascontiguousarray(x, np.float32)
        if buf is x or np.shares_memory(buf, x):
            buf = buf.copy()
        self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        out[...] = buf.astype(out.dtype)

    def all_gather(self, x: np.ndarray, dim: int, out: np.ndarray) -> None:
        src = np.ascontiguousarray(x)
        if dim == 0 and out.flags.c_contiguous:                  # rank blocks lie end to end
            self.comm.Allgather(src.view(np.uint8).reshape(-1), out.view(np.uint8).reshape(-1))
            return
        tmp = np.empty((self.size,) + src.shape, src.dtype)
        self.comm.Allgather(src.view(np.uint8).reshape(-1), tmp.view(np.uint8).reshape(-1))
        out[...] = np.concatenate(list(tmp), axis=dim)


def all_reduce(x, out, group):
    xn, o = x.numpy(), out.numpy()
    if group.world_size == 1:
        if not np.shares_memory(xn, o):
            np.copyto(o, xn)
        return
    group.communicator("cpu").all_reduce(xn, o)


def all_gather(x, dim, out, group):
    if group.world_size == 1:
        np.copyto(out.numpy(), x.numpy())
        return
    group.communicator("cpu").all_gather(x.numpy(), dim, out.numpy())


KERNELS = [
    ("all_reduce", FLOATS, all_reduce),
    ("all_gather", FLOATS, all_gather),
]
