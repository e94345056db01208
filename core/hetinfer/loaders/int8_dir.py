"""hetinfer_int8 directories (written by ``hetinfer quantize``; format in hetinfer.quant):
config.json with ``quantization_config.quant_method == "hetinfer_int8"``, model.safetensors
holding ``<name>`` int8 (N, K) + ``<name>.scales`` f16/f32 (N, K // group) per quantized Linear
weight and f16/f32 for the rest, tokenizer files as in an HF directory.

``raw(name)`` gives (int8, scales) as stored; ``tensor(name)`` dequantizes (for tools);
``quantized`` names the int8 tensors the model keeps as int8. Tensors are read with pread, not
memory-mapped, so a loaded model's resident memory is its own copy only (file pages touched
through a map would count in RSS a second time for fused q/k/v and gate/up).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .. import quant
from ..errors import LoadError
from .base import bf16_np
from .files import read_json
from .safetensors_hf import HFCheckpoint

_DT = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": None, "I8": np.dtype(np.int8)}


def is_int8_dir(path: Path) -> bool:
    """A directory whose config.json says quant_method hetinfer_int8."""
    try:
        qc = read_json(Path(path) / "config.json", "config.json").get("quantization_config") or {}
    except LoadError:
        return False
    return isinstance(qc, dict) and qc.get("quant_method") == quant.QUANT_METHOD


class Int8Checkpoint(HFCheckpoint):
    """A hetinfer_int8 directory; see the module docstring."""

    format = "hetinfer_int8"
    quant_method = quant.QUANT_METHOD

    def __init__(self, path: Path, progress: bool = True):
        super().__init__(path, progress=progress)
        cfg_dict = read_json(path / "config.json", "config.json")
        qc = cfg_dict.get("quantization_config") or {}
        g = qc.get("group_size")
        if not isinstance(g, int) or isinstance(g, bool) or g <= 0:
            raise LoadError(f"{path / 'config.json'}: quantization_config.group_size is {g!r}; expected a "
                            f"positive integer ({', '.join(map(str, quant.GROUP_SIZES))})")
        sd = qc.get("scale_dtype", "f16")
        if not isinstance(sd, str) or sd not in quant.SCALE_DTYPES:
            raise LoadError(f"{path / 'config.json'}: quantization_config.scale_dtype is {sd!r}; expected "
                            "f16 or f32")
        self.group_size, self.quantization = g, dict(qc)
        if cfg_dict.get("rope_style") in ("half", "interleaved"):
            self.config.rope_style = cfg_dict["rope_style"]        # written for llama2.c sources
        self.config.extra["quantization"] = {"method": quant.QUANT_METHOD, "group_size": g, "scale_dtype": sd}
        self.quantized = frozenset(n for n in self._expected if n in self._entries
                                   and self._entries[n][1] == "I8")

    # ---- reading --------------------------------------------------------------------------
    def _read(self, name: str) -> np.ndarray:
        shard, dt, shape, start, nbytes = self._entry(name)
        if dt not in _DT:
            raise LoadError(f"{self.path / shard}: tensor {name!r} is stored as {dt}; supported here: "
                            f"{', '.join(_DT)}")
        want = int(np.prod(shape)) * (_DT[dt] or bf16_np()).itemsize
        if nbytes != want:
            raise LoadError(f"{self.path / shard}: tensor {name!r} has {nbytes} bytes but shape {shape} in {dt} "
                            f"needs {want}; the file is corrupt")
        fd = os.open(self.path / shard, os.O_RDONLY)
        try:
            buf = bytearray(nbytes)
            view, got = memoryview(buf), 0
            while got < nbytes:
                n = os.preadv(fd, [view[got:]], start + got)
                if n <= 0:
                    raise LoadError(f"{self.path / shard}: short read of tensor {name!r}; the file is truncated")
                got += n
        finally:
            os.close(fd)
        return np.frombuffer(buf, _DT[dt] or bf16_np()).reshape(shape)

    def _stored_dtype(self, name):
        dt = super()._stored_dtype(name)
        if name in getattr(self, "quantized", ()):
            return f"I8(group {self.group_size}, {self._entry(name + '.scales')[1]} scales)"
        return dt

    def _load(self, name):
        if name in self.quantized:
            return quant.dequantize_int8(*self._raw(name))
        arr = self._read(name)
        if arr.dtype == np.int8:
            raise LoadError(f"{self.path}: tensor {name!r} is int8 but not a quantized Linear weight")
        return arr

    def _raw(self, name):
        if name not in self.quantized:
            return super()._raw(name)
        return self._read(name), self._read(name + ".scales")

    def _consumed_names(self):
        return {n + ".scales" for n in self.quantized}

    def validate(self) -> None:
        super().validate()
        for name in sorted(self.quantized):
            n, k = self._shape(name)
            sname = name + ".scales"
            if sname not in self._entries:
                raise LoadError(f"{self.path}: int8 tensor {name!r} has no scale tensor {sname!r}")
            _, sdt, sshape, _, _ = self._entries[sname]
            if sdt not in ("F16", "F32"):
                raise LoadError(f"{self.path}: scale tensor {sname!r} is stored as {sdt}; expected F16 or F32")
            if k % self.group_size:
                raise LoadError(f"{self.path}: group_size {self.group_size} does not divide the input width "
                                f"{k} of {name!r}")
            want = (n, k // self.group_size)
            if tuple(sshape) != want:
                raise LoadError(f"{self.path}: scale tensor {sname!r} has shape {tuple(sshape)}; expected {want} "
                                f"(one scale per group of {self.group_size} of the int8 weight {(n, k)})")
