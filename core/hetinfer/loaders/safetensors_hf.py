"""Hugging Face model directories: config.json + model.safetensors (or a sharded
model.safetensors.index.json), tokenizer.json / tokenizer.model, tokenizer_config.json.

Each shard is memory-mapped; its header (8-byte little-endian length + JSON) is parsed here so a
truncated or corrupt shard is reported by name, and every tensor is a numpy view of the map
(bf16 through ml_dtypes). Tensor names are already HF names; shapes already HF orientation.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from ..config import KNOWN_ARCHITECTURES, ModelConfig
from ..errors import ConfigError, LoadError
from .base import BF16, Checkpoint, file_size, memmap, progress_bar

_ST_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": BF16, "F64": np.dtype("<f8")}


def read_json(path: Path, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise LoadError(f"cannot read {what} {path}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoadError(f"{path}: {what} is not valid JSON ({e})") from None


def read_safetensors_header(path: Path):
    """-> ({name: (dtype_str, shape, absolute start, nbytes)}, memmap). LoadError when truncated/corrupt."""
    size = file_size(path)
    if size < 8:
        raise LoadError(f"{path}: safetensors file is truncated ({size} bytes; expected an 8-byte header "
                        "length, a JSON header and tensor data)")
    with open(path, "rb") as f:
        (hlen,) = struct.unpack("<Q", f.read(8))
        if hlen > size - 8 or hlen > 100 << 20:
            raise LoadError(f"{path}: safetensors header claims {hlen} bytes but the file has {size}; the file "
                            "is truncated or not a safetensors file")
        raw = f.read(hlen)
    try:
        header = json.loads(raw)
        assert isinstance(header, dict)
    except Exception:
        raise LoadError(f"{path}: safetensors JSON header is corrupt") from None
    header.pop("__metadata__", None)
    data_start = 8 + hlen
    out = {}
    for name, info in header.items():
        try:
            dt, shape, (b, e) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except Exception:
            raise LoadError(f"{path}: safetensors header entry for {name!r} is malformed") from None
        if data_start + e > size:
            raise LoadError(f"{path}: tensor {name!r} (bytes {b}..{e} of the data) runs past the end of the file "
                            f"({size} bytes); the file is truncated")
        if dt in _ST_DTYPES and (e - b) != int(np.prod(shape)) * _ST_DTYPES[dt].itemsize:
            raise LoadError(f"{path}: tensor {name!r} has {e - b} bytes but shape {shape} in {dt} needs "
                            f"{int(np.prod(shape)) * _ST_DTYPES[dt].itemsize}; the file is corrupt")
        out[name] = (dt, shape, data_start + b, e - b)
    return out, (memmap(path) if size > data_start else np.zeros(0, np.uint8))


class HFCheckpoint(Checkpoint):
    """A Hugging Face directory with safetensors weights."""

    format = "hf"

    def __init__(self, path: Path, progress: bool = True):
        cfg_dict = read_json(path / "config.json", "config.json")
        config = ModelConfig.from_hf(cfg_dict)
        if config.architecture not in KNOWN_ARCHITECTURES:
            raise ConfigError(f"{path / 'config.json'}: architecture {config.architecture!r} is not supported; "
                              f"known: {', '.join(KNOWN_ARCHITECTURES)}")
        index = path / "model.safetensors.index.json"
        single = path / "model.safetensors"
        if index.exists():
            wm = read_json(index, "safetensors index").get("weight_map")
            if not isinstance(wm, dict):
                raise LoadError(f"{index}: has no 'weight_map' object")
            shards = sorted(set(wm.values()))
        elif single.exists():
            shards = ["model.safetensors"]
        else:
            others = sorted(p.name for p in path.glob("*.safetensors"))
            if not others:
                raise LoadError(f"{path}: no model.safetensors or model.safetensors.index.json "
                                "(only safetensors weights are supported for HF directories)")
            shards = others
        self._entries: dict[str, tuple] = {}
        self._maps: dict[str, np.ndarray] = {}
        mapped = 0
        for shard in progress_bar(shards, len(shards), f"opening {path.name}", progress):
            sp = path / shard
            if not sp.exists():
                raise LoadError(f"{path}: shard {shard} named in the index is missing")
            entries, mm = read_safetensors_header(sp)
            self._maps[shard] = mm
            mapped += file_size(sp)
            for name, e in entries.items():
                self._entries[name] = (shard, *e)
        tok, template = None, None
        from ..tokenizer import Tokenizer
        tok = Tokenizer.from_hf_dir(path, cfg_dict)
        tc = path / "tokenizer_config.json"
        if tc.exists():
            template = read_json(tc, "tokenizer_config.json").get("chat_template")
            if isinstance(template, list):  # named templates: take the default one
                template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if template is None and (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        super().__init__(path, config, tok, template, mapped)

    def _stored_names(self):
        return set(self._entries)

    def _entry(self, name):
        if name not in self._entries:
            raise LoadError(f"{self.path}: tensor {name!r} is missing from the safetensors files")
        return self._entries[name]

    def _shape(self, name):
        return self._entry(name)[2]

    def _stored_dtype(self, name):
        return self._entry(name)[1]

    def _load(self, name):
        shard, dt, shape, start, nbytes = self._entry(name)
        if dt not in _ST_DTYPES:
            raise LoadError(f"{self.path / shard}: tensor {name!r} is stored as {dt}; supported: "
                            f"{', '.join(_ST_DTYPES)}")
        arr = self._maps[shard][start:start + nbytes].view(_ST_DTYPES[dt]).reshape(shape)
        return arr.astype(np.float32) if dt == "F64" else arr
