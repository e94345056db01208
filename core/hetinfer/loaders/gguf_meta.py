"""Typed reads of parsed GGUF metadata.

Each reader returns the value of one key with the type the model needs, or raises ONE LoadError
naming the file, the key, what the file holds there and what was expected. GGUF stores every
integer as an (u)int8..64 and every float as a float32/64, so after parsing an integer key holds a
Python int (never a bool or a float) and a float key an int or a finite float.
"""

from __future__ import annotations

import math
from operator import methodcaller

from ..errors import LoadError

REQUIRED = object()          # default meaning "the key must be present"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def describe(v) -> str:
    """A short phrase for a metadata value: 'the string "abc"', 'a list of 3 values', ..."""
    if isinstance(v, bool):
        return f"the bool {v}"
    if _is_int(v):
        return f"the integer {v}"
    if isinstance(v, float):
        return f"the float {v}"
    if isinstance(v, str):
        return f"the string {v[:40]!r}" + ("..." if len(v) > 40 else "")
    if isinstance(v, list):
        return f"a list of {len(v)} values"
    return f"a {type(v).__name__}"


def _absent(key: str, path, default, needed_for: str):
    """What a reader returns for an absent key: its default, or LoadError when required."""
    if default is REQUIRED:
        raise LoadError(f"{path}: GGUF metadata lacks {key!r}, needed for the {needed_for}")
    return default


def meta_int(meta: dict, key: str, path, default=REQUIRED, lo: int = 1, hi: int | None = None,
             needed_for: str = "model config") -> int | None:
    """An integer in [lo, hi] (hi None: no upper bound); default when absent (None allowed)."""
    if key not in meta:
        return _absent(key, path, default, needed_for)
    v = meta[key]
    if not _is_int(v) or v < lo or (hi is not None and v > hi):
        want = f"an integer >= {lo}" if hi is None else f"an integer from {lo} to {hi}"
        raise LoadError(f"{path}: GGUF metadata {key!r} holds {describe(v)}; expected {want}")
    return v


def meta_float(meta: dict, key: str, path, default=REQUIRED, positive: bool = True,
               needed_for: str = "model config") -> float | None:
    """A finite number (> 0 when positive), as float; default when absent."""
    if key not in meta:
        return _absent(key, path, default, needed_for)
    v = meta[key]
    if not _is_real(v) or (positive and v <= 0):
        want = "a finite number > 0" if positive else "a finite number"
        raise LoadError(f"{path}: GGUF metadata {key!r} holds {describe(v)}; expected {want}")
    return float(v)


def meta_str(meta: dict, key: str, path, default=REQUIRED, needed_for: str = "model config") -> str | None:
    if key not in meta:
        return _absent(key, path, default, needed_for)
    v = meta[key]
    if not isinstance(v, str):
        raise LoadError(f"{path}: GGUF metadata {key!r} holds {describe(v)}; expected a string")
    return v


def meta_bool(meta: dict, key: str, path, default=REQUIRED, needed_for: str = "tokenizer") -> bool | None:
    if key not in meta:
        return _absent(key, path, default, needed_for)
    v = meta[key]
    if not isinstance(v, bool):
        raise LoadError(f"{path}: GGUF metadata {key!r} holds {describe(v)}; expected a bool")
    return v


_ELEMENT = {"string": lambda x: isinstance(x, str), "integer": _is_int, "number": _is_real}
_TYPES = {"string": {str}, "integer": {int}, "number": {int, float}}   # the exact types the reader makes


def meta_list(meta: dict, key: str, path, element: str, default=REQUIRED, length: tuple[int, str] | None = None,
              needed_for: str = "tokenizer") -> list | None:
    """An array of `element` ("string" | "integer" | "number"); `length` = (n, what n counts) when
    its length must be n."""
    if key not in meta:
        return _absent(key, path, default, needed_for)
    v = meta[key]
    if not isinstance(v, list):
        raise LoadError(f"{path}: GGUF metadata {key!r} holds {describe(v)}; expected an array of {element}s")
    ok = _ELEMENT[element]
    fine = set(map(type, v)) <= _TYPES[element] and (element != "number" or all(map(math.isfinite, v)))
    for i, x in enumerate(() if fine else v):      # the fast check in C loops; only a failure is located
        if not ok(x):
            raise LoadError(f"{path}: GGUF metadata {key!r}[{i}] is {describe(x)}; expected an array of "
                            f"{element}s")
    if length is not None and len(v) != length[0]:
        raise LoadError(f"{path}: GGUF metadata {key!r} has {len(v)} entries but {length[1]} has {length[0]}; "
                        "expected one entry each")
    return v


def token_id(meta: dict, key: str, path, n_vocab: int) -> int | None:
    """A special-token id (bos, eos, ...) inside a vocabulary of n_vocab tokens, or None if absent."""
    v = meta.get(key)
    if v is None:
        return None
    if not _is_int(v) or not 0 <= v < n_vocab:
        raise LoadError(f"{path}: GGUF metadata {key!r} holds {describe(v)}; expected a token id from 0 to "
                        f"{n_vocab - 1} (the vocabulary has {n_vocab} tokens)")
    return v


def special_token_ids(meta: dict, path, n_vocab: int) -> dict[str, int]:
    """Every tokenizer.ggml.*_token_id key, checked to lie inside the vocabulary (gguf's own
    SpecialVocab drops out-of-range ids when converting, so one here means a corrupt file)."""
    return {k: token_id(meta, k, path, n_vocab) for k in meta
            if k.startswith("tokenizer.ggml.") and k.endswith("_token_id")}


def vocab_fields(meta: dict, path) -> dict:
    """The tokenizer.ggml.* fields a tokenizer is built from, each checked: tokens a non-empty
    array of strings; token_type / scores one integer / number per token; merges strings "a b";
    every *_token_id inside the vocabulary; model / pre strings; add_bos / add_space_prefix bools.
    Absent optional fields come back as None (token_type: all normal, 1)."""
    tokens = meta_list(meta, "tokenizer.ggml.tokens", path, "string")
    if not tokens:
        raise LoadError(f"{path}: GGUF metadata 'tokenizer.ggml.tokens' is empty; expected the vocabulary")
    n = (len(tokens), "'tokenizer.ggml.tokens'")
    merges = meta_list(meta, "tokenizer.ggml.merges", path, "string", None)
    pairs = None if merges is None else list(map(tuple, map(methodcaller("split", " ", 1), merges)))
    if pairs is not None and not all(len(p) == 2 for p in pairs):
        i = next(i for i, p in enumerate(pairs) if len(p) != 2)
        raise LoadError(f"{path}: GGUF metadata 'tokenizer.ggml.merges'[{i}] is {describe(merges[i])}; "
                        "expected two tokens separated by a space")
    return {
        "model": meta_str(meta, "tokenizer.ggml.model", path, None),
        "pre": meta_str(meta, "tokenizer.ggml.pre", path, None),
        "tokens": tokens,
        "types": meta_list(meta, "tokenizer.ggml.token_type", path, "integer", None, n) or [1] * len(tokens),
        "scores": meta_list(meta, "tokenizer.ggml.scores", path, "number", None, n),
        "merges": pairs,
        "add_bos": meta_bool(meta, "tokenizer.ggml.add_bos_token", path, None),
        "add_space_prefix": meta_bool(meta, "tokenizer.ggml.add_space_prefix", path, True),
        "special_ids": special_token_ids(meta, path, len(tokens)),
    }
