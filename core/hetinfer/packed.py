"""GGUF block formats kept packed: the one table every backend's kernels follow.

A packed weight is a Tensor whose dtype is one of these formats and whose elements are whole
blocks: a weight of logical shape (N, K) is a Tensor of shape (N, K // block), each element
`nbytes` bytes, the rows byte for byte as the GGUF file stores them (each row is packed on its
own along K, so slicing or reordering whole rows keeps it valid). Row views, `.to(device)` and
`.numpy()` (a (N, K // block) array of np.void blocks) work as for any dtype.

Layouts, little-endian, one block (offsets in bytes; "f16" an IEEE half):

  q8_0  (32, 34)   d f16 @0; q int8[32] @2.                             x[j] = d q[j]
  q4_0  (32, 18)   d f16 @0; qs u8[16] @2: x[j] low nibble of qs[j], x[j+16] high nibble.
                   x = d (nibble - 8)
  q4_1  (32, 20)   d f16 @0, m f16 @2; qs u8[16] @4 as q4_0.            x = d nibble + m
  q5_0  (32, 22)   d f16 @0; qh u32 @2; qs u8[16] @6 as q4_0; bit j of qh is bit 4 of x[j].
                   x = d (q5 - 16)
  q5_1  (32, 24)   d f16 @0, m f16 @2; qh u32 @4; qs u8[16] @8.         x = d q5 + m
  q4_k  (256, 144) d f16 @0, dmin f16 @2; scales u8[12] @4; qs u8[128] @16.
                   8 sub-blocks of 32, each a 6-bit scale sc[j] and min m[j] packed in the 12
                   bytes: j < 4: sc = s[j] & 63, m = s[j+4] & 63; j >= 4: sc = (s[j+4] & 15) |
                   (s[j-4] >> 6) << 4, m = (s[j+4] >> 4) | (s[j] >> 6) << 4. Quants: chunk c of
                   64 elements (c = 0..3) is qs[32c .. 32c+32): low nibbles are elements
                   64c + l (sub-block 2c), high nibbles 64c + 32 + l (sub-block 2c+1).
                   x = d sc[j] q - dmin m[j]
  q5_k  (256, 176) d f16 @0, dmin f16 @2; scales u8[12] @4; qh u8[32] @16; qs u8[128] @48.
                   As q4_k; bit j of qh[l] is bit 4 of element 32j + l.
  q6_k  (256, 210) ql u8[128] @0; qh u8[64] @128; sc int8[16] @192; d f16 @208.
                   Half h (128 elements, h = 0, 1) uses ql[64h ..), qh[32h ..); for l < 32:
                   element 128h + 32i + l (i = 0..3) has low 4 bits ql[64h + l + 32 (i & 1)]
                   >> 4 (i >> 1) and high 2 bits qh[32h + l] >> 2i; scale sc[(element) // 16].
                   x = d sc (q6 - 32)

`act_block`: kernels may round the activations they multiply with a packed weight to 8 bits
per block of act_block values (scale max|x| / 127): 32 for the legacy formats, 256 for the
k-quants, as llama.cpp's dot products do. The conformance suite allows that rounding's error
on top of the dtype tolerance (hetinfer.testing.cases).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ShapeError


@dataclass(frozen=True)
class Format:
    name: str          # hetinfer dtype name, also the kernel key: "q4_k"
    gguf: str          # GGUF / ggml type name: "Q4_K"
    ggml_type: int     # ggml type id in GGUF tensor infos
    block: int         # elements per block
    nbytes: int        # bytes per block
    act_block: int     # activation values per 8-bit rounding block a kernel may use
    scales: tuple      # byte offsets of the block's f16 scale fields (d, and m / dmin where there is one)


FORMATS = (
    Format("q8_0", "Q8_0", 8, 32, 34, 32, (0,)),
    Format("q4_0", "Q4_0", 2, 32, 18, 32, (0,)),
    Format("q4_1", "Q4_1", 3, 32, 20, 32, (0, 2)),
    Format("q5_0", "Q5_0", 6, 32, 22, 32, (0,)),
    Format("q5_1", "Q5_1", 7, 32, 24, 32, (0, 2)),
    Format("q4_k", "Q4_K", 12, 256, 144, 256, (0, 2)),
    Format("q5_k", "Q5_K", 13, 256, 176, 256, (0, 2)),
    Format("q6_k", "Q6_K", 14, 256, 210, 256, (208,)),
)
BY_GGUF = {f.gguf: f for f in FORMATS}


def fmt(dtype) -> Format:
    """The Format of a packed DType (or its name)."""
    from .dtypes import dtype as to_dtype
    d = to_dtype(dtype)
    if d.packed is None:
        raise ShapeError(f"{d} is not a packed format; packed formats: {', '.join(f.name for f in FORMATS)}")
    return d.packed


def blocks_of(op: str, dtype, k: int) -> int:
    """K // block for a row of K values; ShapeError when K is not a whole number of blocks."""
    f = fmt(dtype)
    if k <= 0 or k % f.block:
        raise ShapeError(f"{op}: a {f.name} row holds whole blocks of {f.block} values; K={k} is not a "
                         f"multiple of {f.block}")
    return k // f.block


def from_bytes(data, dtype, shape, device="cpu"):
    """A packed Tensor of logical shape (N, K) from the file's bytes: data is uint8 (N, K // block *
    nbytes) (or flat), memory-mapped or not; on the CPU it is wrapped without a copy."""
    import numpy as np

    from .dtypes import dtype as to_dtype
    d = to_dtype(dtype)
    n, k = (int(s) for s in shape)
    nb = blocks_of("packed tensor", d, k)
    raw = np.asarray(data)
    if raw.dtype != np.uint8 or raw.size != n * nb * d.itemsize:
        raise ShapeError(f"packed tensor: {d} data of shape ({n}, {k}) needs {n * nb * d.itemsize} bytes "
                         f"(uint8); got {raw.size} of {raw.dtype}")
    return from_blocks(np.ascontiguousarray(raw).reshape(n, nb * d.itemsize).view(d.np), d, device)


def from_blocks(blocks, dtype, device="cpu"):
    """A packed Tensor of blocks (N, K // block) np.void of dtype's size: wrapped without a copy
    on a host-memory device (a memory map stays mapped), copied to any other."""
    import numpy as np

    from .device import Device, get_allocator
    from .dtypes import dtype as to_dtype
    from .tensor import from_numpy, tensor
    d, dev = to_dtype(dtype), Device.parse(device)
    blocks = np.asarray(blocks)
    if blocks.dtype != d.np or blocks.ndim != 2:
        raise ShapeError(f"packed tensor: expected 2-D blocks of {d} ({d.np}), got {blocks.dtype} {blocks.shape}")
    if get_allocator(dev).host_memory:
        return from_numpy(np.ascontiguousarray(blocks), dev, dtype=d)
    return tensor(blocks, d, dev)


def logical_shape(t) -> tuple[int, ...]:
    """(N, K) of a packed Tensor (its shape is (N, K // block)); a plain Tensor's shape."""
    b = t.dtype.block
    return t.shape[:-1] + (t.shape[-1] * b,) if t.shape else t.shape
