"""hetinfer's CUDA backend: NVRTC-compiled kernels through cuda-python, a caching
allocator, cuBLAS through CuPy.

Importing this package needs neither a GPU nor any CUDA library: cuda.bindings and
cupy are imported only when the device is probed or used. Where no driver, no GPU or
no cuda-bindings is found, the `cuda` device type is registered as unavailable with
the reason (`hetinfer devices` shows it) and no kernels are registered.
"""

from __future__ import annotations

from hetinfer import DeviceType, hookimpl

__all__ = ["probe", "register_devices", "register_kernels"]

_INSTALL_HINT = "pip install 'hetinfer-cuda[cuda13]' (CUDA 13 driver) or 'hetinfer-cuda[cuda12]'"
_probe_cache: dict | None = None


def probe(refresh: bool = False) -> dict:
    """{'available': bool, 'reason': str, 'count': int, 'description': str}; cached."""
    global _probe_cache
    if _probe_cache is not None and not refresh:
        return _probe_cache
    _probe_cache = _probe()
    return _probe_cache


def _unavailable(reason: str) -> dict:
    return {"available": False, "reason": reason, "count": 0, "description": ""}


def _probe() -> dict:
    try:
        from cuda.bindings import driver  # noqa: F401
    except Exception as e:
        return _unavailable(f"cuda-bindings not installed ({type(e).__name__}: {e}): {_INSTALL_HINT}")
    from . import driver as D
    try:
        err, = driver.cuInit(0)
    except Exception as e:   # libcuda.so not found: no NVIDIA driver on this machine
        return _unavailable(f"no CUDA driver: {type(e).__name__}: {e}".strip())
    if err != driver.CUresult.CUDA_SUCCESS:
        return _unavailable(f"cuInit failed: {D.error_text(err)}")
    try:
        n = D.device_count()
    except Exception as e:
        return _unavailable(f"cuDeviceGetCount failed: {e}")
    if n == 0:
        return _unavailable("no CUDA GPU found (cuDeviceGetCount = 0)")
    try:
        nv = "%d.%d" % D.nvrtc_version()
    except Exception as e:
        return _unavailable(f"NVRTC (libnvrtc) not usable: {type(e).__name__}: {e}; {_INSTALL_HINT}")
    try:
        names = []
        for i in range(n):
            dev = driver.cuDeviceGet(i)[1]
            raw = driver.cuDeviceGetName(256, dev)[1]
            names.append(raw.split(b"\0", 1)[0].decode(errors="replace"))
        desc = f"{', '.join(names)}; driver CUDA {D.driver_version()}, NVRTC {nv}"
    except Exception as e:
        desc = f"{n} device(s) ({e})"
    return {"available": True, "reason": "", "count": n, "description": desc}


def _make_allocator(device):
    from .allocator import CudaAllocator
    return CudaAllocator(device)


@hookimpl
def register_devices(register):
    """Register the cuda device type: available with a GPU and driver, else why not."""
    p = probe()
    register(DeviceType("cuda", available=p["available"], reason=p["reason"], count=p["count"],
                        make_allocator=_make_allocator if p["available"] else None,
                        description=p["description"]))


@hookimpl
def register_kernels(register):
    """Register the CUDA kernels for f32, f16 and bf16 (only where the device is available)."""
    if not probe()["available"]:
        return
    from .kernels import FLOATS, KERNELS
    from .packed import FORMATS as PACKED, PACKED_OPS
    for op, fn in KERNELS:
        extra = (("i8",) if op == "matmul" else ()) + (PACKED if op in PACKED_OPS else ())
        for dt in FLOATS + extra:
            register(op, "cuda", dt, fn)   # strided views handled on the device
    from hetinfer import distributed

    from . import comm                     # NCCL through CuPy, imported when a world > 1 first uses it
    distributed.register_communicator("cuda", comm.NCCLCommunicator)
    for op, fn in comm.KERNELS:
        for dt in comm.FLOATS:
            register(op, "cuda", dt, fn, contiguous=True)
