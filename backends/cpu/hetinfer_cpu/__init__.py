"""hetinfer's CPU backend, registered through the same hooks as any plugin."""

import os

import numpy as np

from hetinfer import DeviceType, hookimpl

from .allocator import CPUAllocator
from .kernels import KERNELS

_threads_set = False


def _limit_blas_threads() -> None:
    """HETINFER_CPU_THREADS=N caps the BLAS threads of the CPU kernels (default: BLAS's
    own, all cores). On an idle 2-vCPU machine two threads ran SmolLM2's prefill 1.6x
    and decode 1.3x faster than one; on one whose cores other processes were using,
    OpenBLAS's two threads ran a 3072x576 matrix-vector product 47x slower than one
    thread: there, HETINFER_CPU_THREADS=1."""
    global _threads_set
    if _threads_set:
        return
    _threads_set = True
    n = os.environ.get("HETINFER_CPU_THREADS")
    if n:
        from threadpoolctl import threadpool_limits
        threadpool_limits(limits=int(n), user_api="blas")


@hookimpl
def register_devices(register):
    register(DeviceType("cpu", available=True, count=1, make_allocator=CPUAllocator,
                        description=f"{os.cpu_count()} cores, NumPy {np.__version__} with BLAS"))


@hookimpl
def register_kernels(register):
    _limit_blas_threads()
    for op, dtypes, fn in KERNELS:
        for dt in dtypes:
            register(op, "cpu", dt, fn)
    from hetinfer import distributed

    from . import comm
    distributed.register_communicator("cpu", comm.MPICommunicator)
    for op, dtypes, fn in comm.KERNELS:         # MPI collectives (mpi4py imported on first use)
        for dt in dtypes:
            register(op, "cpu", dt, fn, contiguous=True)
