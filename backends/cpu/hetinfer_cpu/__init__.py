"""hetinfer's CPU backend, registered through the same hooks as any plugin."""

import os

import numpy as np

from hetinfer import DeviceType, hookimpl

from .allocator import CPUAllocator
from .kernels import KERNELS

_threads_set = False


def _limit_blas_threads() -> None:
    """BLAS threads for the CPU kernels: HETINFER_CPU_THREADS, default 1.

    Batch-1 decode is a chain of matrix-vector products bound by memory bandwidth,
    where BLAS threading only adds synchronisation; on our 2-vCPU machines OpenBLAS
    with 2 threads ran a 3072x576 product 47x slower than with one (and torch's
    GEMM 2.2x slower). Set HETINFER_CPU_THREADS=N on machines where more pays."""
    global _threads_set
    if _threads_set:
        return
    _threads_set = True
    from threadpoolctl import threadpool_limits
    threadpool_limits(limits=int(os.environ.get("HETINFER_CPU_THREADS", "1")), user_api="blas")


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
