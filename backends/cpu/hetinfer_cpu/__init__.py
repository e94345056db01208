"""hetinfer's CPU backend, registered through the same hooks as any plugin."""

import os

import numpy as np

from hetinfer import DeviceType, hookimpl

from .allocator import CPUAllocator
from .kernels import KERNELS


@hookimpl
def register_devices(register):
    register(DeviceType("cpu", available=True, count=1, make_allocator=CPUAllocator,
                        description=f"{os.cpu_count()} cores, NumPy {np.__version__} with BLAS"))


@hookimpl
def register_kernels(register):
    for op, dtypes, fn in KERNELS:
        for dt in dtypes:
            register(op, "cpu", dt, fn)
