"""Tensor: shape, strides (in elements), dtype and an offset into a Buffer.

Views (indexing, transpose, reshape of contiguous data) share the buffer and
copy nothing. On host-memory devices `.numpy()` is a zero-copy view; on other
devices it copies to the host."""

from __future__ import annotations

import math

import numpy as np

from .device import Device, get_allocator
from .dtypes import DType, dtype as to_dtype
from .errors import DeviceError, ShapeError


def _contig_strides(shape) -> tuple[int, ...]:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= n
    return tuple(reversed(strides))


class Tensor:
    __slots__ = ("buffer", "shape", "strides", "offset", "dtype", "device", "_host", "_np")

    def __init__(self, buffer, shape, dtype, strides=None, offset: int = 0):
        self.buffer = buffer
        self.shape = tuple(int(s) for s in shape)
        self.dtype: DType = to_dtype(dtype)
        self.strides = tuple(int(s) for s in strides) if strides is not None else _contig_strides(self.shape)
        self.offset = int(offset)
        self.device: Device = buffer.device
        self._host = getattr(buffer.allocator, "host_memory", False)
        self._np = None              # cached zero-copy view (host memory only)

    # --- facts -------------------------------------------------------------
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def is_contiguous(self) -> bool:
        expect = _contig_strides(self.shape)
        return all(s == e or n == 1 for s, e, n in zip(self.strides, expect, self.shape))

    @property
    def byte_offset(self) -> int:
        return self.offset * self.dtype.itemsize

    def __repr__(self) -> str:
        return f"Tensor(shape={self.shape}, dtype={self.dtype}, device={self.device})"

    def __len__(self) -> int:
        return self.shape[0]

    # --- views ---------------------------------------------------------------
    def _restride(self, fn) -> "Tensor":
        """Apply a numpy view operation to a fake array of the same layout and read
        the resulting shape, strides and offset back (numpy does the index maths)."""
        fake = np.lib.stride_tricks.as_strided(np.empty(1, np.uint8), self.shape, self.strides)
        try:
            view = fn(fake)
        except ShapeError:
            raise
        except (ValueError, np.exceptions.AxisError) as e:
            raise ShapeError(f"bad axes for a tensor of shape {self.shape}: {e}") from None
        base = view if isinstance(view, np.ndarray) else None
        while base is not None and base is not fake:      # a view's base chain reaches fake
            base = base.base
        if base is None:
            raise ShapeError("that operation needs a copy (basic indexing only); call .contiguous() first")
        delta = view.__array_interface__["data"][0] - fake.__array_interface__["data"][0]
        return Tensor(self.buffer, view.shape, self.dtype, view.strides, self.offset + delta)

    def __getitem__(self, idx) -> "Tensor":
        try:
            idx = idx if isinstance(idx, tuple) else (idx,)
            if not any(i is Ellipsis for i in idx):
                idx = idx + (Ellipsis,)          # keeps an all-integer index (0-d result) a view
            return self._restride(lambda a: a[idx])
        except IndexError as e:
            raise ShapeError(f"bad index {idx!r} for tensor of shape {self.shape}: {e}") from None
        except TypeError:
            raise ShapeError(f"tensors support basic indexing only (ints, slices, ...); got {idx!r}") from None

    def transpose(self, a: int = -2, b: int = -1) -> "Tensor":
        return self._restride(lambda x: np.swapaxes(x, a, b))

    def permute(self, *dims) -> "Tensor":
        return self._restride(lambda x: np.transpose(x, dims))

    def view(self, *shape) -> "Tensor":
        """A view of another shape; works for strided tensors where no copy is needed."""
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        shape = list(shape)
        if shape.count(-1) > 1:
            raise ShapeError(f"view: only one -1 allowed, got {tuple(shape)}")
        if -1 in shape:
            known = math.prod(s for s in shape if s != -1)
            shape[shape.index(-1)] = self.numel // known if known else 0
        if math.prod(shape) != self.numel:
            raise ShapeError(f"view: cannot view {self.shape} ({self.numel} elements) as {tuple(shape)}")
        if self.is_contiguous:
            return Tensor(self.buffer, shape, self.dtype, None, self.offset)

        def reshape_no_copy(a):
            try:                           # copy=False: numpy refuses rather than copies
                return np.reshape(a, tuple(shape), copy=False)
            except ValueError:
                raise ShapeError(f"view: tensor of shape {self.shape} with strides {self.strides} "
                                 f"cannot be viewed as {tuple(shape)} without a copy; "
                                 "call .contiguous() first") from None
        return self._restride(reshape_no_copy)

    reshape = view

    # --- data movement ----------------------------------------------------------
    def numpy(self) -> np.ndarray:
        """Host-memory devices: a zero-copy view. Others: a copy on the host."""
        isz = self.dtype.itemsize
        if self._host:
            if self._np is None:     # a tensor's layout never changes, so its view can be kept
                self._np = np.ndarray(self.shape, self.dtype.np, buffer=self.buffer.handle,
                                      offset=self.byte_offset, strides=tuple(s * isz for s in self.strides))
            return self._np
        if self.numel == 0:
            return np.empty(self.shape, self.dtype.np)
        # copy the byte range the view covers, then take the view on the host
        lo = sum(s * (n - 1) for s, n in zip(self.strides, self.shape) if s < 0)
        hi = sum(s * (n - 1) for s, n in zip(self.strides, self.shape) if s > 0)
        span = np.empty(hi - lo + 1, self.dtype.np)
        self.buffer.allocator.copy_out(self.buffer, (self.offset + lo) * isz, span.view(np.uint8))
        view = np.lib.stride_tricks.as_strided(span[-lo:], self.shape, tuple(s * isz for s in self.strides))
        return view.copy()        # (np.ascontiguousarray would turn a 0-d view into shape (1,))

    def to(self, device) -> "Tensor":
        device = Device.parse(device)
        if device == self.device:
            return self
        src = np.ascontiguousarray(self.numpy())
        out = empty(self.shape, self.dtype, device)
        out.buffer.allocator.copy_in(out.buffer, 0, src.reshape(-1).view(np.uint8))
        return out

    def contiguous(self) -> "Tensor":
        if self.is_contiguous:
            return self
        if self._host:
            return from_numpy(np.ascontiguousarray(self.numpy()), self.device)
        return tensor(self.numpy(), device=self.device)

    def copy_(self, src) -> "Tensor":
        """Copy src (Tensor or array) into this tensor's elements. Between tensors of one
        non-host device the copy runs on the device (the backend's strided cast kernel)."""
        if (isinstance(src, Tensor) and not self._host and src.device == self.device
                and self.dtype.is_float and src.dtype.is_float):
            if src.shape != self.shape:
                raise ShapeError(f"copy_: source shape {src.shape} != destination shape {self.shape}")
            from . import ops
            ops.cast(src, out=self)
            return self
        arr = src.numpy() if isinstance(src, Tensor) else np.asarray(src)
        if arr.shape != self.shape:
            raise ShapeError(f"copy_: source shape {arr.shape} != destination shape {self.shape}")
        arr = arr.astype(self.dtype.np, copy=False)
        if self._host:
            self.numpy()[...] = arr
        elif self.is_contiguous:
            self.buffer.allocator.copy_in(self.buffer, self.byte_offset,
                                          np.ascontiguousarray(arr).reshape(-1).view(np.uint8))
        else:
            raise ShapeError("copy_ into a non-contiguous view of a device tensor is not supported")
        return self

    def fill_(self, value) -> "Tensor":
        return self.copy_(np.full(self.shape, value, self.dtype.np))


# --- constructors ------------------------------------------------------------------
def empty(shape, dtype="f32", device="cpu") -> Tensor:
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if any((not isinstance(s, (int, np.integer))) or s < 0 for s in shape):
        raise ShapeError(f"empty: bad shape {shape}; expected non-negative integers")
    dt = to_dtype(dtype)
    alloc = get_allocator(device)
    buf = alloc.alloc(max(1, math.prod(shape)) * dt.itemsize)
    return Tensor(buf, shape, dt)


def from_numpy(array: np.ndarray, device="cpu", dtype=None) -> Tensor:
    """Wrap a host array with no copy (memory-mapped weights stay mapped). The array
    must be C-contiguous and the device must use host memory. dtype: for arrays whose
    numpy dtype does not name one (packed blocks, np.void; see hetinfer.packed)."""
    device = Device.parse(device)
    alloc = get_allocator(device)
    if not alloc.host_memory:
        raise DeviceError(f"from_numpy needs a host-memory device, not {device}; use tensor(..., device=)")
    dt = to_dtype(array.dtype if dtype is None else dtype)
    if dt.np != array.dtype:
        raise ShapeError(f"from_numpy: array of {array.dtype} cannot be wrapped as {dt} ({dt.np})")
    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)
    flat = array.reshape(-1).view(np.uint8) if array.size else np.empty(dt.itemsize, np.uint8)
    buf = alloc.wrap_host(flat)
    return Tensor(buf, array.shape, dt)


def tensor(data, dtype=None, device="cpu") -> Tensor:
    """Copy array-like data into a new tensor on device."""
    arr = np.asarray(data)
    dt = to_dtype(dtype) if dtype is not None else to_dtype(arr.dtype if arr.dtype != np.float64 else np.float32)
    arr = np.asarray(arr.astype(dt.np, copy=False), order="C")    # keeps 0-d arrays 0-d
    out = empty(arr.shape, dt, device)
    out.buffer.allocator.copy_in(out.buffer, 0, arr.reshape(-1).view(np.uint8))
    return out
