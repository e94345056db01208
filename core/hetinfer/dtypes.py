"""The dtype table: every element type a Tensor may hold."""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

from .errors import DTypeError


@dataclass(frozen=True, eq=False)      # the six DTypes are singletons: identity is equality
class DType:
    name: str          # short name used in kernel keys: "f32", "bf16", "i8" ...
    np: np.dtype       # numpy dtype of one element (bf16 through ml_dtypes)
    is_float: bool

    @property
    def itemsize(self) -> int:
        return self.np.itemsize

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"hetinfer.{self.name}"


f32 = DType("f32", np.dtype(np.float32), True)
f16 = DType("f16", np.dtype(np.float16), True)
bf16 = DType("bf16", np.dtype(ml_dtypes.bfloat16), True)
i8 = DType("i8", np.dtype(np.int8), False)
i32 = DType("i32", np.dtype(np.int32), False)
i64 = DType("i64", np.dtype(np.int64), False)

ALL = (f32, f16, bf16, i8, i32, i64)
FLOATS = (f32, f16, bf16)
BY_NAME = {d.name: d for d in ALL}
_ALIASES = {
    "float32": f32, "fp32": f32, "float": f32,
    "float16": f16, "fp16": f16, "half": f16,
    "bfloat16": bf16,
    "int8": i8, "int32": i32, "int64": i64,
}
_BY_NP = {d.np: d for d in ALL}


def dtype(x) -> DType:
    """Resolve a DType, a name ("f16", "bfloat16") or a numpy dtype to a DType."""
    if isinstance(x, DType):
        return x
    if isinstance(x, str):
        d = BY_NAME.get(x) or _ALIASES.get(x.lower())
        if d is None:
            raise DTypeError(f"unknown dtype {x!r}; expected one of {', '.join(BY_NAME)}")
        return d
    try:
        npd = np.dtype(x)
    except TypeError:
        raise DTypeError(f"cannot interpret {x!r} as a dtype; expected one of {', '.join(BY_NAME)}") from None
    d = _BY_NP.get(npd)
    if d is None:
        raise DTypeError(f"numpy dtype {npd} is not supported; expected one of "
                         + ", ".join(f"{d.name} ({d.np})" for d in ALL))
    return d
