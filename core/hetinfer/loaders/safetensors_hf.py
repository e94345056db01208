"""Hugging Face model directories: config.json + model.safetensors (or a sharded
model.safetensors.index.json), tokenizer.json / tokenizer.model, tokenizer_config.json.

Each shard is memory-mapped; its header (8-byte little-endian length + JSON) is parsed here so a
truncated or corrupt shard is reported by name, and every tensor is a numpy view of the map
(bf16 through ml_dtypes). Tensor names are already HF names; shapes already HF orientation.
"""

from __future__ import annotations

import itertools
import math
import os
import struct
from pathlib import Path

import numpy as np

from ..config import KNOWN_ARCHITECTURES, ModelConfig
from ..errors import ConfigError, LoadError
from .base import Checkpoint, bf16_np, file_size, memmap, progress_bar
from .files import decode_utf8, inside_name, json_type, parse_json, read_json, read_text

_ST_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": None, "F64": np.dtype("<f8")}
# every whole-byte dtype of the safetensors format, with its size: a file may hold any of them
# (the loaders read the float ones; int8 directories I8 too)
ST_DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
                  "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}
MAX_HEADER_BYTES = 100_000_000     # the safetensors library's own limit
MAX_RANK = 8


def _unique_keys(pairs):
    """object_pairs_hook: a JSON object whose keys are unique (a tensor named twice is corrupt)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise LoadError(f"key {dup!r} appears more than once")
    return out


def _header_json(raw: bytes, path: Path) -> dict:
    what = "safetensors header"
    header = parse_json(decode_utf8(raw, path, what), path, what, object_pairs_hook=_unique_keys)
    if not isinstance(header, dict):
        raise LoadError(f"{path}: {what} holds a JSON {json_type(header)}; expected an object of tensor entries")
    return header


def _check_metadata(meta, path: Path) -> None:
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise LoadError(f"{path}: safetensors __metadata__ is {json_type(meta)} {str(meta)[:80]}; expected an "
                        "object of string values")


def _entry(name: str, info, path: Path, data_len: int) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry, every field checked against the data section."""
    where = f"{path}: safetensors header entry {name!r}"
    if not isinstance(info, dict):
        raise LoadError(f"{where} is a JSON {json_type(info)}; expected an object with dtype, shape, data_offsets")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in info:
            raise LoadError(f"{where} has no {key!r}; expected dtype, shape and data_offsets")
    dt, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dt, str) or dt not in ST_DTYPE_SIZES:
        raise LoadError(f"{where}: dtype {str(dt)[:40]!r} is unknown; expected one of {', '.join(ST_DTYPE_SIZES)}")
    if (not isinstance(shape, list) or len(shape) > MAX_RANK
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise LoadError(f"{where}: shape {str(shape)[:80]} is not a list of at most {MAX_RANK} non-negative "
                        "integers")
    if (not isinstance(offs, list) or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offs)):
        raise LoadError(f"{where}: data_offsets {str(offs)[:80]} is not two non-negative integers [begin, end]")
    b, e = offs
    if b > e:
        raise LoadError(f"{where}: data_offsets [{b}, {e}] end before they begin")
    if e > data_len:
        raise LoadError(f"{where} (bytes {b}..{e} of the data) runs past the end of the file, whose data "
                        f"section has {data_len} bytes; the file is truncated or corrupt")
    want = math.prod(shape) * ST_DTYPE_SIZES[dt]
    if e - b != want:
        raise LoadError(f"{where} has {e - b} bytes but shape {tuple(shape)} in {dt} needs {want}; the file is "
                        "corrupt")
    return dt, tuple(shape), b, e


def read_safetensors_header(path: Path):
    """-> ({name: (dtype_str, shape, absolute start, nbytes)}, memmap), every entry checked: dtype
    known, shape non-negative integers, offsets in the data section, byte length = shape x dtype
    size, no two tensors overlapping, __metadata__ an object of strings. LoadError naming the
    file and the entry otherwise."""
    size = file_size(path, "safetensors file")
    if size < 8:
        raise LoadError(f"{path}: safetensors file is truncated ({size} bytes; expected an 8-byte header "
                        "length, a JSON header and tensor data)")
    try:
        with open(path, "rb") as f:
            (hlen,) = struct.unpack("<Q", f.read(8))
            if hlen > size - 8:
                raise LoadError(f"{path}: safetensors header claims {hlen} bytes but the file has {size}; the file "
                                "is truncated or not a safetensors file")
            if hlen > MAX_HEADER_BYTES:
                raise LoadError(f"{path}: safetensors header claims {hlen} bytes; the format allows at most "
                                f"{MAX_HEADER_BYTES}, so the file is corrupt or not a safetensors file")
            raw = f.read(hlen)
    except OSError as e:
        raise LoadError(f"cannot read safetensors file {path}: {e.strerror}") from None
    header = _header_json(raw, path)
    if "__metadata__" in header:
        _check_metadata(header.pop("__metadata__"), path)
    data_start = 8 + hlen
    entries = {name: _entry(name, info, path, size - data_start) for name, info in header.items()}
    spans = sorted((b, e, name) for name, (_, _, b, e) in entries.items() if e > b)
    for (_, e0, n0), (b1, _, n1) in itertools.pairwise(spans):
        if b1 < e0:
            raise LoadError(f"{path}: tensors {n0!r} and {n1!r} overlap in the data section (one ends at byte "
                            f"{e0}, the other begins at {b1}); the file is corrupt")
    _check_covered(path, spans, size - data_start)
    out = {name: (dt, shape, data_start + b, e - b) for name, (dt, shape, b, e) in entries.items()}
    return out, (memmap(path) if size > data_start else np.zeros(0, np.uint8))


def _check_covered(path: Path, spans: list, data_len: int) -> None:
    """The tensors fill the data section back to back from byte 0 to its end, as the safetensors
    library's own validation requires (its InvalidOffset / MetadataIncompleteBuffer): a header
    length or an offset that lies by a few bytes would otherwise read every tensor shifted."""
    pos = 0
    for b, e, name in spans:
        if b != pos:
            raise LoadError(f"{path}: safetensors header entry {name!r} begins at byte {b} of the data section, but "
                            f"the tensors before it end at byte {pos}; expected the tensors back to back (the header "
                            "length or an offset is wrong: the file is corrupt)")
        pos = e
    if pos != data_len:
        raise LoadError(f"{path}: the safetensors tensors end at byte {pos} of the data section, which has {data_len} "
                        "bytes; expected them to fill it (the header length is wrong or the file is corrupt)")


def _index_shards(path: Path, index: Path) -> tuple[list[str], dict[str, str]]:
    """(shard file names, weight_map) of model.safetensors.index.json, types and names checked."""
    wm = read_json(index, "safetensors index").get("weight_map")
    if not isinstance(wm, dict) or not wm:
        raise LoadError(f"{index}: has no 'weight_map' object; expected {{tensor name: shard file name}}")
    for name, shard in wm.items():
        if not isinstance(shard, str):
            raise LoadError(f"{index}: weight_map[{name!r}] is a JSON {json_type(shard)}; expected a shard file name")
    shards = sorted(set(wm.values()))
    for shard in shards:
        inside_name(path, shard, str(index))
    return shards, wm


class HFCheckpoint(Checkpoint):
    """A Hugging Face directory with safetensors weights."""

    format = "hf"

    def __init__(self, path: Path, progress: bool = True):
        cfg_path = path / "config.json"
        cfg_dict = read_json(cfg_path, "config.json")
        config = ModelConfig.from_hf(cfg_dict, source=str(cfg_path))
        if config.architecture not in KNOWN_ARCHITECTURES:
            raise ConfigError(f"{cfg_path}: architecture {config.architecture!r} is not supported; "
                              f"known: {', '.join(KNOWN_ARCHITECTURES)}")
        index = path / "model.safetensors.index.json"
        weight_map = None
        if os.path.lexists(index):
            shards, weight_map = _index_shards(path, index)
        elif os.path.lexists(path / "model.safetensors"):
            shards = ["model.safetensors"]
        else:
            shards = sorted(p.name for p in path.glob("*.safetensors"))
            if not shards:
                raise LoadError(f"{path}: no model.safetensors or model.safetensors.index.json "
                                "(only safetensors weights are supported for HF directories)")
        self._entries: dict[str, tuple] = {}
        self._maps: dict[str, np.ndarray] = {}
        mapped = 0
        for shard in progress_bar(shards, len(shards), f"opening {path.name}", progress):
            sp = path / shard
            if weight_map is not None and not os.path.lexists(sp):
                raise LoadError(f"{path}: shard {shard} named in the index is missing")
            entries, mm = read_safetensors_header(sp)
            self._maps[shard] = mm
            mapped += file_size(sp)
            for name, e in entries.items():
                if name in self._entries:
                    raise LoadError(f"{path}: tensor {name!r} is stored twice, in {self._entries[name][0]} and "
                                    f"in {shard}; expected each tensor in one shard")
                self._entries[name] = (shard, *e)
        for name, shard in (weight_map or {}).items():
            if name not in self._entries or self._entries[name][0] != shard:
                raise LoadError(f"{index}: weight_map puts tensor {name!r} in {shard}, but {shard} does not hold "
                                "it; the index does not match the shards")
        from ..tokenizer import MissingTokenizer, Tokenizer
        tok = Tokenizer.from_hf_dir(path, cfg_dict) or MissingTokenizer(path, config.eos_token_ids)
        super().__init__(path, config, tok, _chat_template(path), mapped)

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
        arr = self._maps[shard][start:start + nbytes].view(_ST_DTYPES[dt] or bf16_np()).reshape(shape)
        return arr.astype(np.float32) if dt == "F64" else arr


def _chat_template(path: Path) -> str | None:
    """tokenizer_config.json's chat_template (a string, or the one named "default" of a list of
    {name, template}), else chat_template.jinja, else None."""
    tc = path / "tokenizer_config.json"
    template = read_json(tc, "tokenizer_config.json").get("chat_template") if os.path.lexists(tc) else None
    if isinstance(template, list):  # named templates: take the default one
        if not all(isinstance(t, dict) and isinstance(t.get("template"), str) for t in template):
            raise LoadError(f"{tc}: chat_template is a list whose items are not all {{name, template}} objects "
                            "with a string template")
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template is not None and not isinstance(template, str):
        raise LoadError(f"{tc}: chat_template is a JSON {json_type(template)}; expected a string or a list of "
                        "{name, template} objects")
    jinja = path / "chat_template.jinja"
    if template is None and os.path.lexists(jinja):
        template = read_text(jinja, "chat_template.jinja")
    return template
