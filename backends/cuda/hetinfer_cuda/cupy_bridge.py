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


def _libcublas():
    """libcublas as CuPy loaded it, called directly through ctypes: CuPy's wrappers refuse
    to run while a stream is being captured, cuBLAS itself can be captured into a graph
    (with a workspace set beforehand, so it allocates nothing then)."""
    lib = _state.get("libcublas")
    if lib is None:
        import ctypes
        from cupy_backends.cuda.libs import cublas  # noqa: F401  (loads libcublas into the process)
        path = None
        try:
            with open("/proc/self/maps") as f:
                for line in f:
                    name = line.split()[-1]
                    if "/libcublas.so" in name:
                        path = name
                        break
        except OSError:
            pass
        lib = ctypes.CDLL(path or "libcublas.so")
        vp, i32 = ctypes.c_void_p, ctypes.c_int
        lib.cublasSetStream_v2.argtypes = [vp, vp]
        lib.cublasSetPointerMode_v2.argtypes = [vp, i32]
        lib.cublasSetWorkspace_v2.argtypes = [vp, vp, ctypes.c_size_t]
        lib.cublasGemmEx.argtypes = [vp, i32, i32, i32, i32, i32, vp, vp, i32, i32, vp, i32, i32, vp, vp, i32,
                                     i32, i32, i32]
        _state["libcublas"] = lib
    return lib


CUBLAS_WORKSPACE = 32 << 20
_workspaces: dict = {}


def _check(status: int, what: str) -> None:
    if status != 0:
        from hetinfer.errors import DeviceError
        raise DeviceError(f"{what} failed: cuBLAS status {status}")


def gemm(dev, dtype_name: str, x_ptr: int, w_ptr: int, out_ptr: int, M: int, N: int, K: int,
         out_dtype: str | None = None) -> None:
    """out (M, N) = x (M, K) @ w (N, K)^T, row-major, x and w of one dtype, out of that dtype
    or out_dtype (f32), f32 accumulation, on dev's stream. Column-major view:
    out^T (N, M) = w (N, K) . x^T (K, M). Capturable in a CUDA graph."""
    cp = _state["cupy"]
    lib = _libcublas()
    with cp.cuda.Device(dev.index):
        handle = cp.cuda.device.get_cublas_handle()
        if dev.index not in _workspaces:            # made eagerly, before any capture
            _workspaces[dev.index] = ws = _allocators[dev.index].alloc(CUBLAS_WORKSPACE)
            _check(lib.cublasSetWorkspace_v2(handle, int(ws.handle), CUBLAS_WORKSPACE), "cublasSetWorkspace")
        _check(lib.cublasSetStream_v2(handle, dev.stream_handle), "cublasSetStream")
        _check(lib.cublasSetPointerMode_v2(handle, CUBLAS_POINTER_MODE_HOST), "cublasSetPointerMode")
        t = _CUDA_TYPE[dtype_name]
        a = _alpha_beta.ctypes.data
        _check(lib.cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, a, w_ptr, t, K, x_ptr, t, K,
                                a + 4, out_ptr, _CUDA_TYPE[out_dtype or dtype_name], N, CUBLAS_COMPUTE_32F,
                                CUBLAS_GEMM_DEFAULT), "cublasGemmEx")


def gemm_or_disable(dev, dtype_name, x_ptr, w_ptr, out_ptr, M, N, K, out_dtype=None) -> bool:
    """gemm(); if cuBLAS through CuPy fails, warn once, stop using CuPy and return False
    (the caller then runs its own kernel)."""
    try:
        gemm(dev, dtype_name, x_ptr, w_ptr, out_ptr, M, N, K, out_dtype)
        return True
    except Exception as e:
        if dev.capturing:            # a graph that cannot hold this call: the capture fails, CuPy stays
            from hetinfer.errors import DeviceError
            raise DeviceError(f"cuBLAS through CuPy could not be captured: {type(e).__name__}: {e}") from e
        _state["cupy"] = None
        _state["reason"] = f"cuBLAS through CuPy failed: {type(e).__name__}: {e}"
        warnings.warn(f"hetinfer-cuda: {_state['reason']}; using the built-in GEMM kernel", RuntimeWarning)
        return False
