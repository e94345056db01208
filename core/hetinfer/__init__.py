"""hetinfer: heterogeneous LLM inference. Backends and models are plugins.

    import hetinfer
    x = hetinfer.tensor([[1.0, 2.0]], device="cpu")
    y = hetinfer.ops.rms_norm(x, hetinfer.tensor([1.0, 1.0]))
"""

import os as _os

# OpenBLAS's idle worker threads spin for a while after each call and take the second core
# from the CPU backend's own OpenMP kernels (a 3.8 ms f32 product took 9-10 ms right after a
# small BLAS call); with this they sleep at once. Read when NumPy first loads OpenBLAS, so it
# acts when hetinfer is imported before NumPy (the CLI); a value set by the user wins.
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from . import ops  # noqa: E402
from .device import Device, DeviceType
from .dtypes import DType, bf16, dtype, f16, f32, i8, i32, i64
from .errors import (ConfigError, DeviceError, DTypeError, HetinferError, InputError,
                     KernelNotFoundError, LoadError, OutOfMemoryError, PluginError,
                     RegistrationError, ShapeError)
from .hookspecs import hookimpl
from .registry import kernel, register_kernel, unregister_kernel
from .tensor import Tensor, empty, from_numpy, tensor

__version__ = "0.1.0"


_LAZY = {"LLM": "api", "CompletionOutput": "api", "SamplingParams": "sampling"}


def __getattr__(name):
    """LLM and SamplingParams load the engine only when first used."""
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'hetinfer' has no attribute {name!r}")


def devices():
    """Every registered device type, available or not (see DeviceType.reason)."""
    from .device import device_types
    return list(device_types().values())


__all__ = [
    "ops", "Device", "DeviceType", "DType", "dtype", "f32", "f16", "bf16", "i8", "i32", "i64",
    "HetinferError", "ShapeError", "DTypeError", "DeviceError", "KernelNotFoundError",
    "RegistrationError", "PluginError", "LoadError", "ConfigError", "OutOfMemoryError", "InputError",
    "hookimpl", "kernel", "register_kernel", "unregister_kernel",
    "Tensor", "empty", "from_numpy", "tensor", "devices", "LLM", "CompletionOutput", "SamplingParams",
]
