"""CuPy, where installed: its allocations come from our caching allocator (one pool),
its work goes to our stream, and cuBLAS (GemmEx, f32 accumulation) does the larger
matrix products. Without CuPy (or with HETINFER_CUDA_CUPY=0) the backend still works:
larger products then run on a plain tiled kernel of ours."""

from __future__ import annotations

import os
import warnings

import numpy as np

_state = {"checked": False, "cupy": None, "reason": ""}
_allocators: dict[int, object] = {}      # device index -> CudaAllocator
_streams: dict[int, object] = {}         # device index -> cupy ExternalStream

# cudaDataType / cublas constants (stable across CUDA 12 and 13)
CUDA_R_32F, CUDA_R_16F, CUDA_R_16BF = 0, 2, 14
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
CUBLAS_COMPUTE_32F = 68
CUBLAS_GEMM_DEFAULT = -1
CUBLAS_POINTER_MODE_HOST = 0
_CUDA_TYPE = {"f32": CUDA_R_32F, "f16": CUDA_R_16F, "bf16": CUDA_R_16BF}


def cupy():
    """The cupy module, or None (the reason is in reason())."""
    if not _state["checked"]:
        _state["checked"] = True
        if os.environ.get("HETINFER_CUDA_CUPY", "1") == "0":
            _state["reason"] = "disabled by HETINFER_CUDA_CUPY=0"
        else:
            try:
                import cupy as cp
                from cupy_backends.cuda.libs import cublas  # noqa: F401  (loads libcublas)
                _state["cupy"] = cp
            except Exception as e:
                _state["reason"] = f"{type(e).__name__}: {e}"
    return _state["cupy"]


def reason() -> str:
    cupy()
    return _state["reason"]


def _cupy_malloc(nbytes: int):
    cp = _state["cupy"]
    dev = cp.cuda.runtime.getDevice()
    alloc = _allocators.get(dev)
    if alloc is None:   # a device we have not set up: CuPy's own default
        return cp.cuda.MemoryPointer(cp.cuda.memory.Memory(nbytes), 0)
    buf = alloc.alloc(nbytes)
    mem = cp.cuda.UnownedMemory(int(buf.handle), nbytes, buf, dev)   # owner keeps buf alive
    return cp.cuda.MemoryPointer(mem, 0)


def attach(allocator) -> None:
    """Route CuPy's allocations on allocator's device through it; use our stream."""
    cp = cupy()
    if cp is None:
        return
    idx = allocator.device.index
    _allocators[idx] = allocator
    try:
        with cp.cuda.Device(idx):
            cp.cuda.set_allocator(_cupy_malloc)
            stream(idx, allocator.cu.stream_handle).use()
    except Exception as e:   # CuPy present but unusable: run without it
        _state["cupy"] = None
        _state["reason"] = f"CuPy could not be set up: {type(e).__name__}: {e}"
        _allocators.pop(idx, None)


def stream(idx: int, handle: int):
    s = _streams.get(idx)
    if s is None:
        cp = _state["cupy"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)   # ExternalStream, CuPy 14
            s = _streams[idx] = cp.cuda.ExternalStream(handle, idx)
    return s


_alpha_beta = np.array([1.0, 0.0], np.float32)


def gemm(dev, dtype_name: str, x_ptr: int, w_ptr: int, out_ptr: int, M: int, N: int, K: int,
         out_dtype: str | None = None) -> None:
    """out (M, N) = x (M, K) @ w (N, K)^T, row-major, x and w of one dtype, out of that dtype
    or out_dtype (f32), f32 accumulation, on dev's stream. Column-major view:
    out^T (N, M) = w (N, K) . x^T (K, M)."""
    cp = _state["cupy"]
    from cupy_backends.cuda.libs import cublas
    with cp.cuda.Device(dev.index):
        handle = cp.cuda.device.get_cublas_handle()
        stream(dev.index, dev.stream_handle).use()
        cublas.setStream(handle, dev.stream_handle)
        cublas.setPointerMode(handle, CUBLAS_POINTER_MODE_HOST)
        t = _CUDA_TYPE[dtype_name]
        a = _alpha_beta.ctypes.data
        cublas.gemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K,
                      a, w_ptr, t, K, x_ptr, t, K,
                      a + 4, out_ptr, _CUDA_TYPE[out_dtype or dtype_name], N, CUBLAS_COMPUTE_32F,
                      CUBLAS_GEMM_DEFAULT)


def gemm_or_disable(dev, dtype_name, x_ptr, w_ptr, out_ptr, M, N, K, out_dtype=None) -> bool:
    """gemm(); if cuBLAS through CuPy fails, warn once, stop using CuPy and return False
    (the caller then runs its own kernel)."""
    try:
        gemm(dev, dtype_name, x_ptr, w_ptr, out_ptr, M, N, K, out_dtype)
        return True
    except Exception as e:
        _state["cupy"] = None
        _state["reason"] = f"cuBLAS through CuPy failed: {type(e).__name__}: {e}"
        warnings.warn(f"hetinfer-cuda: {_state['reason']}; using the built-in GEMM kernel", RuntimeWarning)
        return False
