"""Reading a model's files safely: every path is stat()ed before it is opened (a FIFO, a device
or a socket is refused, never opened, so nothing blocks), reads are bounded by a size limit,
and a text file that is not UTF-8 or a JSON file that does not parse is one LoadError naming
the file (and the line and column)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from ..errors import LoadError

MAX_JSON_BYTES = 64 << 20         # config.json, tokenizer_config.json, generation_config.json, the index
MAX_TOKENIZER_BYTES = 512 << 20   # tokenizer.json, tokenizer.model, tokenizer.bin

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def file_kind(mode: int) -> str:
    """'a directory', 'a FIFO (named pipe)', ... for a st_mode; 'a regular file' or 'a special file'."""
    if stat.S_ISREG(mode):
        return "a regular file"
    return next((name for test, name in _KINDS if test(mode)), "a special file")


def stat_path(path, what: str = "file") -> os.stat_result:
    """os.stat (symlinks followed) or LoadError: missing, a dangling symlink, no permission."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        dangling = " (a symlink to a missing file)" if os.path.islink(path) else ""
        raise LoadError(f"{what} {path} does not exist{dangling}") from None
    except (OSError, ValueError) as e:      # ValueError: a NUL byte in the name
        raise LoadError(f"cannot stat {what} {path}: {getattr(e, 'strerror', None) or e}") from None


def file_size(path, what: str = "file") -> int:
    """Size of a regular file (or a symlink to one); LoadError for anything else."""
    st = stat_path(path, what)
    if not stat.S_ISREG(st.st_mode):
        raise LoadError(f"{path}: {what} is {file_kind(st.st_mode)}; expected a regular file")
    return st.st_size


def read_bytes(path, what: str, limit: int) -> bytes:
    """The whole of a regular file of at most ``limit`` bytes."""
    size = file_size(path, what)
    if size > limit:
        raise LoadError(f"{path}: {what} is {size} bytes; expected at most {limit} bytes (is this the right file?)")
    try:
        with open(path, "rb") as f:
            data = f.read(size + 1)         # (read(n) allocates n bytes up front: the size, not the limit)
    except OSError as e:
        raise LoadError(f"cannot read {what} {path}: {e.strerror}") from None
    if len(data) > size:
        raise LoadError(f"{path}: {what} grew while it was read; expected a file that is not being written")
    return data


def decode_utf8(data: bytes, path, what: str) -> str:
    """data as UTF-8 text (a leading byte-order mark dropped), or LoadError with the offset and line."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise LoadError(f"{path}: {what} is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}, "
                        f"line {line}); expected UTF-8 text") from None


def read_text(path, what: str, limit: int = MAX_JSON_BYTES) -> str:
    return decode_utf8(read_bytes(path, what, limit), path, what)


def json_type(v) -> str:
    """The JSON name of a parsed value's type: object, array, string, number, boolean, null."""
    if isinstance(v, dict):
        return "object"
    if isinstance(v, list):
        return "array"
    if isinstance(v, bool):
        return "boolean"
    if v is None:
        return "null"
    return "string" if isinstance(v, str) else "number"


def parse_json(text: str, path, what: str, object_pairs_hook=None):
    """json.loads or LoadError naming the file with line and column."""
    try:
        return json.loads(text, object_pairs_hook=object_pairs_hook)
    except LoadError as e:               # raised by object_pairs_hook
        raise LoadError(f"{path}: {what}: {e}") from None
    except json.JSONDecodeError as e:
        raise LoadError(f"{path}: {what} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise LoadError(f"{path}: {what} is nested too deeply to be a {what}") from None
    except ValueError as e:              # e.g. an integer of more than 4300 digits
        raise LoadError(f"{path}: {what} is not valid JSON ({e})") from None


def read_json(path, what: str, expect: type | None = dict, limit: int = MAX_JSON_BYTES):
    """A JSON file parsed; with ``expect`` (default dict) its top level must be of that type."""
    obj = parse_json(read_text(path, what, limit), path, what)
    if expect is not None and not isinstance(obj, expect):
        want = {dict: "an object", list: "an array"}.get(expect, expect.__name__)
        raise LoadError(f"{path}: {what} holds a JSON {json_type(obj)}; expected {want}")
    return obj


def inside_name(base: Path, name, where: str) -> Path:
    """base / name for a file name read from a file (the shard index): a relative path without '..'
    parts, so it cannot point outside ``base``; LoadError otherwise."""
    if not isinstance(name, str) or not name or "\0" in name or "\\" in name:
        raise LoadError(f"{where}: file name {name!r} is not a plain relative file name")
    p = Path(name)
    if p.is_absolute() or ".." in p.parts or name.startswith("~"):
        raise LoadError(f"{where}: file name {name!r} points outside the model directory {base}; expected a "
                        "file name inside it (such as model-00001-of-00002.safetensors)")
    return base / p
