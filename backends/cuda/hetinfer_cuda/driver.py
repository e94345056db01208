"""The CUDA driver layer, on cuda-python (cuda.bindings.driver / cuda.bindings.nvrtc).

- `check()` turns every driver result into a value or a DeviceError naming the call and
  the driver's error name and string.
- `CudaDevice`: the primary context and one stream per GPU, the device's architecture.
- `compile_cubin()`: NVRTC for the device's own architecture (sm_XY); the compile log is
  in the exception; CUBINs are cached on disk ($HETINFER_CACHE/cuda, default
  ~/.cache/hetinfer/cuda) under a hash of source, options, architecture and NVRTC
  version, so a second start compiles nothing. The cache is private to the user
  (hetinfer.kernel_cache: 0700, files 0600 with a sha256 recorded at build; a CUBIN not owned
  by this user, writable by others, a symlink or not matching its digest is recompiled, with a
  warning). Modules and functions are cached in process.
- `launch()`: the one place kernels are launched (args packed for cuLaunchKernel).

cuda.bindings is imported inside functions only: importing this module needs no CUDA.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import threading
from pathlib import Path

from hetinfer.errors import DeviceError

_CSRC = Path(__file__).parent / "csrc"


class CompileError(DeviceError):
    """NVRTC could not compile a kernel source; the message holds the compile log."""


# ---------------------------------------------------------------- error checking
def _drv():
    from cuda.bindings import driver
    return driver


def _nvrtc():
    from cuda.bindings import nvrtc
    return nvrtc


def error_text(err) -> str:
    """'CUDA_ERROR_X: the driver's description' for a CUresult."""
    driver = _drv()
    try:
        _, name = driver.cuGetErrorName(err)
        _, desc = driver.cuGetErrorString(err)
        name = name.decode() if isinstance(name, bytes) else str(name)
        desc = desc.decode() if isinstance(desc, bytes) else str(desc)
        return f"{name}: {desc}"
    except Exception:
        return str(err)


def check(result, what: str = "CUDA driver call"):
    """Unpack a cuda.bindings driver result (err, *values): raise DeviceError on error,
    else return None, the one value, or the tuple of values."""
    driver = _drv()
    if isinstance(result, tuple):
        err, vals = result[0], result[1:]
    else:
        err, vals = result, ()
    if err != driver.CUresult.CUDA_SUCCESS:
        raise DeviceError(f"{what} failed: {error_text(err)}")
    if not vals:
        return None
    return vals[0] if len(vals) == 1 else vals


def check_nvrtc(result, what: str = "NVRTC call"):
    nvrtc = _nvrtc()
    err, vals = result[0], result[1:]
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        try:
            msg = nvrtc.nvrtcGetErrorString(err)[1].decode()
        except Exception:
            msg = str(err)
        raise CompileError(f"{what} failed: {msg}")
    if not vals:
        return None
    return vals[0] if len(vals) == 1 else vals


# ---------------------------------------------------------------- devices
_init_lock = threading.RLock()   # get_device -> CudaDevice() -> init() re-enter it
_initialized = False
_devices: dict[int, "CudaDevice"] = {}
_tls = threading.local()


def init() -> None:
    global _initialized
    with _init_lock:
        if not _initialized:
            check(_drv().cuInit(0), "cuInit")
            _initialized = True


def device_count() -> int:
    init()
    return int(check(_drv().cuDeviceGetCount(), "cuDeviceGetCount"))


def driver_version() -> str:
    v = int(check(_drv().cuDriverGetVersion(), "cuDriverGetVersion"))
    return f"{v // 1000}.{(v % 1000) // 10}"


def nvrtc_version() -> tuple[int, int]:
    major, minor = check_nvrtc(_nvrtc().nvrtcVersion(), "nvrtcVersion")
    return int(major), int(minor)


def get_device(index: int = 0) -> "CudaDevice":
    dev = _devices.get(index)
    if dev is None:
        with _init_lock:
            dev = _devices.get(index)
            if dev is None:
                dev = _devices[index] = CudaDevice(index)
    dev.make_current()
    return dev


class CudaDevice:
    """One GPU: its primary context, one stream, its architecture and loaded modules."""

    def __init__(self, index: int):
        driver = _drv()
        init()
        n = device_count()
        if index >= n:
            raise DeviceError(f"cuda:{index} does not exist: {n} CUDA device(s) present")
        self.index = index
        self.cu_device = check(driver.cuDeviceGet(index), "cuDeviceGet")
        self.context = check(driver.cuDevicePrimaryCtxRetain(self.cu_device), "cuDevicePrimaryCtxRetain")
        check(driver.cuCtxSetCurrent(self.context), "cuCtxSetCurrent")
        _tls.current = index
        attr = driver.CUdevice_attribute
        self.cc = (self.attribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
                   self.attribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR))
        self.sm_count = self.attribute(attr.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        # shared memory a block may ask for with the opt-in attribute (227 KiB on Hopper)
        self.smem_optin = self.attribute(attr.CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        self.arch = f"sm_{self.cc[0]}{self.cc[1]}"
        raw = check(driver.cuDeviceGetName(256, self.cu_device), "cuDeviceGetName")
        self.name = raw.split(b"\0", 1)[0].decode(errors="replace") if isinstance(raw, bytes) else str(raw)
        self.total_memory = int(check(driver.cuDeviceTotalMem(self.cu_device), "cuDeviceTotalMem"))
        # non-blocking: never serialised against the legacy default stream
        self.stream = check(driver.cuStreamCreate(driver.CUstream_flags.CU_STREAM_NON_BLOCKING),
                            "cuStreamCreate")
        self.stream_handle = int(self.stream)
        self.capturing = 0        # > 0 while a CUDA graph is being captured on self.stream
        self._modules: dict[str, object] = {}        # cache key -> CUmodule
        self._functions: dict[tuple, object] = {}    # (module key, name) -> CUfunction
        self._lock = threading.RLock()

    def attribute(self, attr) -> int:
        return int(check(_drv().cuDeviceGetAttribute(attr, self.cu_device), "cuDeviceGetAttribute"))

    def make_current(self) -> None:
        if getattr(_tls, "current", None) != self.index:
            check(_drv().cuCtxSetCurrent(self.context), "cuCtxSetCurrent")
            _tls.current = self.index

    def synchronize(self) -> None:
        self.make_current()
        check(_drv().cuStreamSynchronize(self.stream), f"cuStreamSynchronize on cuda:{self.index}")

    def mem_info(self) -> tuple[int, int]:
        free, total = check(_drv().cuMemGetInfo(), "cuMemGetInfo")
        return int(free), int(total)

    # ------------------------------------------------------------ modules
    def load_module(self, source: str, name: str, options=()) -> tuple[str, object]:
        """Compile (or fetch from the caches) and load a module; returns (key, CUmodule)."""
        options = tuple(options)
        key = cache_key(source, options, self.arch)
        mod = self._modules.get(key)
        if mod is None:
            with self._lock:
                mod = self._modules.get(key)
                if mod is None:
                    cubin = compile_cubin(source, name, options, self.arch, key=key)
                    self.make_current()
                    import numpy as np
                    image = np.frombuffer(cubin, np.uint8)
                    mod = check(_drv().cuModuleLoadData(image.ctypes.data), f"cuModuleLoadData({name})")
                    self._modules[key] = mod
        return key, mod

    def function(self, source: str, name: str, fn_name: str, options=()):
        """The CUfunction fn_name of the module compiled from source (cached)."""
        key, mod = self.load_module(source, name, options)
        f = self._functions.get((key, fn_name))
        if f is None:
            f = check(_drv().cuModuleGetFunction(mod, fn_name.encode()),
                      f"cuModuleGetFunction({fn_name!r} in {name})")
            self._functions[(key, fn_name)] = f
        return f

    def __repr__(self) -> str:
        return f"CudaDevice(cuda:{self.index}, {self.name}, {self.arch})"


# ---------------------------------------------------------------- NVRTC + disk cache
class CompileStats:
    nvrtc_compiles = 0     # programs compiled by NVRTC in this process
    disk_hits = 0          # CUBINs read back from the disk cache


stats = CompileStats()


def cache_dir() -> Path:
    root = os.environ.get("HETINFER_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "hetinfer"
    return base / "cuda"


def cache_key(source: str, options, arch: str) -> str:
    try:
        ver = "%d.%d" % nvrtc_version()
    except Exception:
        ver = "?"
    h = hashlib.sha256()
    for part in (source, "\0".join(options), arch, ver):
        h.update(part.encode())
        h.update(b"\1")
    return h.hexdigest()


def compile_cubin(source: str, name: str, options, arch: str, key: str | None = None,
                  use_disk_cache: bool = True) -> bytes:
    """NVRTC: source -> CUBIN for arch (e.g. 'sm_90'), through the private disk cache.
    Raises CompileError with the log."""
    from hetinfer.kernel_cache import KernelCache
    key = key or cache_key(source, tuple(options), arch)
    fname = f"{name}-{arch}-{key[:32]}.cubin"
    cache = KernelCache(cache_dir()) if use_disk_cache else None
    if cache is not None:
        data = cache.read(fname)
        if data:
            stats.disk_hits += 1
            return data
    cubin = nvrtc_compile(source, name, options, arch)
    stats.nvrtc_compiles += 1
    if cache is not None:
        try:
            cache.store(fname, cubin)
        except OSError:
            pass   # a read-only cache only costs a compile next time
    return cubin


def nvrtc_compile(source: str, name: str, options, arch: str) -> bytes:
    """NVRTC: source -> CUBIN bytes for arch, no cache. Raises CompileError with the log."""
    nvrtc = _nvrtc()
    opts = [f"--gpu-architecture={arch}", "--std=c++17", "-default-device"] + list(options)
    prog = check_nvrtc(nvrtc.nvrtcCreateProgram(source.encode(), f"{name}.cu".encode(), 0, [], []),
                       "nvrtcCreateProgram")
    try:
        err, = nvrtc.nvrtcCompileProgram(prog, len(opts), [o.encode() for o in opts])
        log = ""
        try:
            size = check_nvrtc(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
            # a fresh bytearray: NVRTC writes into it (never into a bytes object, which
            # for size 1 is CPython's shared b" " and would corrupt it)
            buf = bytearray(max(int(size), 1))
            check_nvrtc(nvrtc.nvrtcGetProgramLog(prog, buf), "nvrtcGetProgramLog")
            log = bytes(buf).rstrip(b"\0 ").decode(errors="replace")
        except CompileError:
            pass
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            what = nvrtc.nvrtcGetErrorString(err)[1].decode()
            raise CompileError(f"NVRTC could not compile {name}.cu for {arch} ({what}); "
                               f"options: {' '.join(opts)}\n--- compile log ---\n{log}")
        size = check_nvrtc(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
        buf = bytearray(int(size))
        check_nvrtc(nvrtc.nvrtcGetCUBIN(prog, buf), "nvrtcGetCUBIN")
        return bytes(buf)
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


# ---------------------------------------------------------------- the project's kernels
_DTYPE_CODE = {"f32": 0, "f16": 1, "bf16": 2}
_source_cache: str | None = None


def ops_source() -> str:
    global _source_cache
    if _source_cache is None:
        _source_cache = (_CSRC / "common.cuh").read_text() + "\n" + (_CSRC / "ops.cu").read_text()
    return _source_cache


_kernels: dict[tuple, object] = {}   # (device, dtype, name) -> CUfunction: no source hashing per launch


def kernel(dev: CudaDevice, dtype_name: str, fn_name: str):
    """The CUfunction fn_name of the ops module for element type dtype_name."""
    f = _kernels.get((dev.index, dtype_name, fn_name))
    if f is None:
        f = _kernels[(dev.index, dtype_name, fn_name)] = dev.function(
            ops_source(), f"hetinfer_ops_{dtype_name}", fn_name, (f"-DHI_DTYPE={_DTYPE_CODE[dtype_name]}",))
    return f


_packed_source: str | None = None


def packed_kernel(dev: CudaDevice, dtype_name: str, fn_name: str):
    """The CUfunction fn_name of the packed-weight module (common.cuh + packed.cu: GGUF block
    formats) for activation type dtype_name; a module of its own, compiled on first use."""
    global _packed_source
    f = _kernels.get((dev.index, dtype_name, "packed:" + fn_name))
    if f is None:
        if _packed_source is None:
            _packed_source = (_CSRC / "common.cuh").read_text() + "\n" + (_CSRC / "packed.cu").read_text()
        f = _kernels[(dev.index, dtype_name, "packed:" + fn_name)] = dev.function(
            _packed_source, f"hetinfer_packed_{dtype_name}", fn_name, (f"-DHI_DTYPE={_DTYPE_CODE[dtype_name]}",))
    return f


# ---------------------------------------------------------------- launching
class Arg:
    """Typed kernel arguments for launch(): Arg.ptr(int), Arg.i32(int), Arg.i64(int), Arg.f32(float)."""
    ptr = ctypes.c_uint64
    i32 = ctypes.c_int32
    i64 = ctypes.c_int64
    f32 = ctypes.c_float


_SYNC = os.environ.get("HETINFER_CUDA_SYNC", "") not in ("", "0")


_smem_set: dict[int, int] = {}       # id(CUfunction) -> dynamic shared bytes allowed so far


def _allow_shared(dev: CudaDevice, fn, shared: int, name: str) -> None:
    """Above 48 KiB (static + dynamic) a kernel must opt in to its dynamic shared memory
    (once per size); our kernels' static shared memory is under 1 KiB."""
    if shared <= _smem_set.get(id(fn), 47 * 1024):
        return
    if shared > dev.smem_optin:
        raise DeviceError(f"{name} needs {shared} bytes of shared memory; this GPU allows {dev.smem_optin}")
    attr = _drv().CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    check(_drv().cuFuncSetAttribute(fn, attr, shared), f"cuFuncSetAttribute({name}, {shared} bytes)")
    _smem_set[id(fn)] = shared


def launch(dev: CudaDevice, fn, grid, block, args, shared: int = 0, name: str = "kernel",
           pdl: bool = False) -> None:
    """Launch fn on dev's stream. args: ctypes scalars (see Arg). A grid with a zero
    dimension launches nothing. With HETINFER_CUDA_SYNC=1 every launch is synchronised
    so an error is reported at the kernel that caused it. pdl: programmatic dependent
    launch (sm_90+; see pdl_wait in common.cuh): fn may start before the previous kernel
    ends and must pdl_wait() before reading its output."""
    grid = tuple(grid) + (1,) * (3 - len(grid))
    block = tuple(block) + (1,) * (3 - len(block))
    if min(grid) <= 0:
        return
    if shared > 47 * 1024:
        _allow_shared(dev, fn, shared, name)
    holders = list(args)
    ptrs = (ctypes.c_void_p * max(1, len(holders)))(*[ctypes.addressof(a) for a in holders])
    dev.make_current()
    if pdl and dev.cc >= (9, 0):
        err, = _drv().cuLaunchKernelEx(_pdl_config(dev, grid, block, shared), fn, ctypes.addressof(ptrs), 0)
    else:
        err, = _drv().cuLaunchKernel(fn, grid[0], grid[1], grid[2], block[0], block[1], block[2],
                                     shared, dev.stream, ctypes.addressof(ptrs), 0)
    if err != _drv().CUresult.CUDA_SUCCESS:
        raise DeviceError(f"launch of {name} (grid {grid}, block {block}) failed: {error_text(err)}")
    if _SYNC and not dev.capturing:
        check(_drv().cuStreamSynchronize(dev.stream), f"kernel {name} (HETINFER_CUDA_SYNC)")


def _pdl_config(dev: CudaDevice, grid, block, shared: int):
    drv = _drv()
    attr = drv.CUlaunchAttribute()
    attr.id = drv.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
    attr.value.programmaticStreamSerializationAllowed = 1
    cfg = drv.CUlaunchConfig()
    cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ = grid
    cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ = block
    cfg.sharedMemBytes, cfg.hStream = shared, dev.stream
    cfg.attrs, cfg.numAttrs = [attr], 1
    return cfg


# ---------------------------------------------------------------- CUDA graphs
def _destroy_graph(dev: CudaDevice, graph, graph_exec) -> None:
    try:
        dev.make_current()
        drv = _drv()
        if graph_exec is not None:
            drv.cuGraphExecDestroy(graph_exec)
        if graph is not None:
            drv.cuGraphDestroy(graph)
    except Exception:      # interpreter shutdown: the context may be gone already
        pass


class GraphReplay:
    """An instantiated CUDA graph; calling it launches the graph on the device's stream.
    The graph and its executable are destroyed when this object is garbage collected."""

    def __init__(self, dev: CudaDevice, graph, graph_exec, nodes: int):
        import weakref
        self.dev, self._exec, self.nodes = dev, graph_exec, nodes
        self.launches = 0
        self._finalizer = weakref.finalize(self, _destroy_graph, dev, graph, graph_exec)

    def __call__(self) -> None:
        dev = self.dev
        dev.make_current()
        err, = _drv().cuGraphLaunch(self._exec, dev.stream)
        if err != _drv().CUresult.CUDA_SUCCESS:
            raise DeviceError(f"cuGraphLaunch ({self.nodes} nodes) failed: {error_text(err)}")
        self.launches += 1
        if _SYNC:
            check(_drv().cuStreamSynchronize(dev.stream), "graph replay (HETINFER_CUDA_SYNC)")

    def destroy(self) -> None:
        self._finalizer()

    def __repr__(self) -> str:
        return f"GraphReplay({self.nodes} nodes on cuda:{self.dev.index}, {self.launches} launches)"


def capture_graph(dev: CudaDevice, fn) -> GraphReplay:
    """Capture the work fn() queues on dev's stream into a CUDA graph (thread-local
    capture mode: nothing fn queues runs now), instantiate it and return its replay.
    While capturing, the allocator refuses to allocate, copy to or from the host or
    synchronise (a clear DeviceError instead of a broken graph)."""
    drv = _drv()
    dev.make_current()
    check(drv.cuStreamBeginCapture(dev.stream, drv.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL),
          "cuStreamBeginCapture")
    dev.capturing += 1
    graph = None
    try:
        try:
            fn()
        finally:
            dev.capturing -= 1
            err, graph = drv.cuStreamEndCapture(dev.stream)
        if err != drv.CUresult.CUDA_SUCCESS:
            graph = None
            raise DeviceError(f"cuStreamEndCapture failed: {error_text(err)} (the captured step did "
                              "something a CUDA graph cannot hold: a host sync, a host copy or an allocation)")
        try:
            res = drv.cuGraphGetNodes(graph, 0)          # (err, nodes, numNodes)
            nodes = int(res[-1]) if res[0] == drv.CUresult.CUDA_SUCCESS else -1
        except Exception:
            nodes = -1
        graph_exec = check(drv.cuGraphInstantiate(graph, 0), "cuGraphInstantiate")
        try:
            check(drv.cuGraphUpload(graph_exec, dev.stream), "cuGraphUpload")
        except Exception:
            pass
    except BaseException:
        if graph is not None:
            _destroy_graph(dev, graph, None)
        raise
    return GraphReplay(dev, graph, graph_exec, nodes)
