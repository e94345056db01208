"""The dtype table: every element type a Tensor may hold."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import DTypeError
from .packed import FORMATS, Format


@dataclass(frozen=True, eq=False)      # DTypes are singletons: identity is equality
class DType:
    name: str          # short name used in kernel keys: "f32", "bf16", "i8", "q4_k" ...
    _np: object        # numpy dtype of one element (a packed block: np.void), or a function making
                       # it on first use (bf16: ml_dtypes, ~8 MB and 0.1 s that f32 / f16 runs skip)
    is_float: bool
    packed: Format | None = None    # packed formats: one element is one block (hetinfer.packed)

    @property
    def np(self) -> np.dtype:
        v = self._np
        if not isinstance(v, np.dtype):
            v = np.dtype(v())
            object.__setattr__(self, "_np", v)
        return v

    @property
    def itemsize(self) -> int:
        return self.np.itemsize

    @property
    def block(self) -> int:
        """Logical values per element: 1, or a packed format's block size."""
        return self.packed.block if self.packed is not None else 1

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"hetinfer.{self.name}"


f32 = DType("f32", np.dtype(np.float32), True)
f16 = DType("f16", np.dtype(np.float16), True)


def _bfloat16():
    import ml_dtypes
    return ml_dtypes.bfloat16


bf16 = DType("bf16", _bfloat16, True)
i8 = DType("i8", np.dtype(np.int8), False)
i32 = DType("i32", np.dtype(np.int32), False)
i64 = DType("i64", np.dtype(np.int64), False)

# GGUF block formats kept packed (the table: hetinfer.packed.FORMATS)
PACKED = tuple(DType(f.name, np.dtype((np.void, f.nbytes)), False, f) for f in FORMATS)
q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k = PACKED

ALL = (f32, f16, bf16, i8, i32, i64) + PACKED
FLOATS = (f32, f16, bf16)
BY_NAME = {d.name: d for d in ALL}
_ALIASES = {
    "float32": f32, "fp32": f32, "float": f32,
    "float16": f16, "fp16": f16, "half": f16,
    "bfloat16": bf16,
    "int8": i8, "int32": i32, "int64": i64,
}
_BY_NP = {d.np: d for d in ALL if d.packed is None and d is not bf16}   # a packed dtype is always named


def dtype(x) -> DType:
    """Resolve a DType, a name ("f16", "bfloat16") or a numpy dtype to a DType."""
    if isinstance(x, DType):
        return x
    if isinstance(x, str):
        d = BY_NAME.get(x) or BY_NAME.get(x.lower()) or _ALIASES.get(x.lower())
        if d is None:
            raise DTypeError(f"unknown dtype {x!r}; expected one of {', '.join(BY_NAME)}")
        return d
    try:
        npd = np.dtype(x)
    except TypeError:
        raise DTypeError(f"cannot interpret {x!r} as a dtype; expected one of {', '.join(BY_NAME)}") from None
    d = _BY_NP.get(npd) or (bf16 if npd.name == "bfloat16" and npd == bf16.np else None)
    if d is None:
        raise DTypeError(f"numpy dtype {npd} is not supported; expected one of "
                         + ", ".join(f"{d.name} ({d.np})" for d in ALL if d.packed is None))
    return d
