#!/usr/bin/env python
"""An attacker's sweep of hetinfer's input validation (issue 12).

Builds, under a temporary directory, a corpus of >= 1000 malformed inputs derived from valid tiny
models written by the test fixtures (tests/tiny_models.py, tests/_fixtures_loaders.py): GGUF files,
HF safetensors directories (single file and sharded), hetinfer_int8 directories, llama2.c .bin files
with a tokenizer.bin, special paths (FIFOs, devices, sockets, symlink loops), hostile chat
templates, bad command-line flags, prompts and API requests, and resource attacks (sparse files
claiming gigabytes of weights or millions of metadata elements, tokenizers that grow text or
backtrack, prompts of tens of megabytes). Each case is run through the CLI (``info`` and
``generate -n 4 --max-context 64`` with a prompt; ``chat`` / ``generate --story`` for templates)
under a wall timeout and an address-space cap, and classified:

  ok           exit 0 (for a case that may legitimately load)
  error        a clean refusal: exit != 0, one ``error:`` line on stderr, no traceback
  traceback    a Python traceback on stderr
  hang         past the wall timeout (faulthandler's dump of the stacks is kept)
  memory       MemoryError, "Unable to allocate", or killed by SIGKILL (not by the sweep)
  crash        killed by another signal (segfault, abort)
  suspicious   exit 0 for a case that must be refused (a corrupt file accepted)
  refused-ok   a clean refusal of a case that must load (a valid variant)
  other        exit != 0 without an error line or a traceback

Modes:
  default      each run is a child forked from a warm worker (hetinfer pre-imported, so a run
               costs ~50 ms, not the ~1 s of a fresh interpreter); the child sets RLIMIT_AS,
               redirects stdio, enables faulthandler and calls hetinfer.cli.main(argv), exactly as
               ``python -X faulthandler -m hetinfer argv`` would (argv bytes decoded with
               surrogateescape, sys.exit semantics, uncaught exceptions printed as tracebacks).
  --exec       each run is a real ``python -X faulthandler -m hetinfer ...`` subprocess (slow).
  --api        the Python API in-process (in a forked child for the limits): load_checkpoint,
               hetinfer.LLM(...).generate / .chat, SamplingParams(...), for the API subset.

Output: one JSON line per class (count, examples), then a summary line.

    .venv/bin/python tools/fuzz_inputs.py                 # CLI sweep + API sweep, 2 workers
    .venv/bin/python tools/fuzz_inputs.py --only gguf --show traceback
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import stat
import struct
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"

TIMEOUT_S = 20.0
MEM_BYTES = 4 << 30
KV = "16M"  # --kv-cache-memory of every generate: keep each case small
CLASSES = ("ok", "error", "traceback", "hang", "memory", "crash", "suspicious", "refused-ok", "other")
BAD = ("traceback", "hang", "memory", "crash")

# ---- tiny base models ------------------------------------------------------------------------------
DIMS = dict(hidden=64, inter=64, layers=1, heads=4, kv=2, vocab=64, ctx=64)  # HF / int8
GDIMS = dict(hidden=64, inter=64, layers=2, heads=4, kv=2, vocab=260, ctx=64)  # GGUF (byte-level vocab)
CDIMS = dict(hidden=64, inter=64, layers=1, heads=4, kv=2, vocab=276, ctx=64)  # llama2.c
HF_PROMPT = "w3 w4 w5"
GGUF_PROMPT = "hello"
TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


def _fixtures():
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    import _fixtures_loaders as fx
    import tiny_models as tm

    return fx, tm


class Corpus:
    """Cases: dicts {id, family, expect ('error' | 'ok' | 'any'), runs: [(label, argv, stdin)],
    api: None | spec}. argv items may be bytes (invalid UTF-8 in argv)."""

    def __init__(self, root: Path, seed: int = 0):
        self.root = Path(root)
        self.rng = random.Random(seed)
        self.cases: list[dict] = []
        self.n = 0

    def new_path(self, family: str, suffix: str = "") -> Path:
        self.n += 1
        p = self.root / "cases" / family / f"c{self.n:05d}{suffix}"
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def add(
        self,
        cid: str,
        family: str,
        model,
        expect: str = "error",
        prompt: str | None = None,
        runs: list | None = None,
        api: dict | str | None = "auto",
        info: str | None = None,
    ) -> None:
        """A file/dir case: by default `info MODEL` and `generate PROMPT --model MODEL ...` (info:
        the expectation of `info` when it differs, e.g. "any" for what only generation needs)."""
        if runs is None:
            runs = [
                ("info", ["info", str(model)], None, info or expect),
                ("generate", gen_argv(model, prompt or GGUF_PROMPT), None),
            ]
        if api == "auto":
            api = {"op": "llm", "path": str(model), "prompt": prompt or GGUF_PROMPT} if model is not None else None
        self.cases.append({"id": cid, "family": family, "expect": expect, "runs": runs, "api": api})


def gen_argv(model, prompt, *extra) -> list:
    return [
        "generate",
        prompt,
        "--model",
        str(model),
        "-n",
        "4",
        "--max-context",
        "64",
        "--kv-cache-memory",
        KV,
        *extra,
    ]


def link_dir(src: Path, dst: Path, skip=()) -> Path:
    """A copy of directory src made of hard links (files are replaced, never written through)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name not in skip:
            os.link(f, dst / f.name)
    return dst


def replace_file(p: Path, data: bytes) -> None:
    if p.exists() or p.is_symlink():
        p.unlink()
    p.write_bytes(data)


# ---- GGUF as editable parts -------------------------------------------------------------------------
_SC = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_SCSZ = {k: struct.calcsize(v) for k, v in _SC.items()}
STRING, ARRAY = 8, 9


def _skip(b: bytes, pos: int, vt: int) -> int:
    if vt in _SCSZ:
        return pos + _SCSZ[vt]
    if vt == STRING:
        return pos + 8 + struct.unpack_from("<Q", b, pos)[0]
    et, n = struct.unpack_from("<IQ", b, pos)
    pos += 12
    if et in _SCSZ:
        return pos + n * _SCSZ[et]
    for _ in range(n):
        pos = _skip(b, pos, et)
    return pos


def enc(vt: int, value, et: int | None = None) -> bytes:
    """u32 value type + payload."""
    return struct.pack("<I", vt) + payload(vt, value, et)


def payload(vt: int, value, et: int | None = None) -> bytes:
    if vt == STRING:
        b = value if isinstance(value, bytes) else value.encode()
        return struct.pack("<Q", len(b)) + b
    if vt == ARRAY:
        return struct.pack("<IQ", et, len(value)) + b"".join(payload(et, v) for v in value)
    return struct.pack(_SC[vt], value)


def gstr(s) -> bytes:
    b = s if isinstance(s, bytes) else s.encode()
    return struct.pack("<Q", len(b)) + b


class Gguf:
    """kvs: [[key bytes, encoded value (type + payload)]]; tensors: [[name bytes, dims, qtype, offset]]."""

    def __init__(self, data: bytes):
        assert data[:4] == b"GGUF"
        self.version, nt, nkv = struct.unpack_from("<IQQ", data, 4)
        pos = 24
        self.kvs, self.tensors = [], []
        self.offsets = {}  # key -> (start of the value type, end) in the original
        for _ in range(nkv):
            n = struct.unpack_from("<Q", data, pos)[0]
            key = data[pos + 8 : pos + 8 + n]
            pos += 8 + n
            vt = struct.unpack_from("<I", data, pos)[0]
            end = _skip(data, pos + 4, vt)
            self.offsets[key] = (pos, end)
            self.kvs.append([key, data[pos:end]])
            pos = end
        self.info_start = pos
        for _ in range(nt):
            n = struct.unpack_from("<Q", data, pos)[0]
            name = data[pos + 8 : pos + 8 + n]
            pos += 8 + n
            nd = struct.unpack_from("<I", data, pos)[0]
            dims = list(struct.unpack_from(f"<{nd}Q", data, pos + 4))
            pos += 4 + 8 * nd
            qt, off = struct.unpack_from("<IQ", data, pos)
            pos += 12
            self.tensors.append([name, dims, qt, off])
        self.header_end = pos
        self.align = 32
        for k, v in self.kvs:
            if k == b"general.alignment":
                self.align = struct.unpack_from("<I", v, 4)[0]
        self.data_start = -(-pos // self.align) * self.align
        self.data = data[self.data_start :]

    def kv(self, key: str) -> bytes:
        return next(v for k, v in self.kvs if k == key.encode())

    def set_kv(self, key: str, value: bytes) -> None:
        for kv in self.kvs:
            if kv[0] == key.encode():
                kv[1] = value
                return
        self.kvs.append([key.encode(), value])

    def drop_kv(self, key: str) -> None:
        self.kvs = [kv for kv in self.kvs if kv[0] != key.encode()]

    def tensor(self, name: str) -> list:
        return next(t for t in self.tensors if t[0] == name.encode())

    def build(self, counts: tuple | None = None, align: int | None = None, raw_infos: bytes | None = None) -> bytes:
        nt, nkv = counts or (len(self.tensors), len(self.kvs))
        out = [b"GGUF", struct.pack("<IQQ", self.version, nt, nkv)]
        for k, v in self.kvs:
            out += [gstr(k), v]
        if raw_infos is not None:
            out.append(raw_infos)
        else:
            for name, dims, qt, off in self.tensors:
                out += [gstr(name), struct.pack(f"<I{len(dims)}Q", len(dims), *dims), struct.pack("<IQ", qt, off)]
        head = b"".join(out)
        a = align or self.align
        a = a if 0 < a <= 1 << 20 else 32
        return head + b"\0" * (-len(head) % a) + self.data


# value variants for GGUF metadata: (label, encoded value, is an integer variant)
def gguf_value_variants() -> list[tuple[str, bytes, bool]]:
    return [
        ("u8=0", enc(0, 0), True),
        ("u32=1", enc(4, 1), True),
        ("i32=-1", enc(5, -1), True),
        ("u32=2^31", enc(4, 2**31), True),
        ("u64=2^63", enc(10, 2**63), True),
        ("u64=max", enc(10, 2**64 - 1), True),
        ("i64=min", enc(11, -(2**63)), True),
        ("f32=nan", enc(6, math.nan), False),
        ("f32=inf", enc(6, math.inf), False),
        ("f64=-1", enc(12, -1.0), False),
        ("f32=0.5", enc(6, 0.5), False),
        ("bool=true", enc(7, True), False),
        ("str", enc(STRING, "64"), False),
        ("str=badutf8", enc(STRING, b"\xff\xfe\xc3"), False),
        ("arr=[]", enc(ARRAY, [], 4), False),
        ("arr=[1,2,3]", enc(ARRAY, [1, 2, 3], 4), False),
        ("arr=[str]", enc(ARRAY, ["a"], STRING), False),
        ("vtype=99", struct.pack("<II", 99, 0), False),
        ("vtype=2^31", struct.pack("<II", 2**31, 0), False),
    ]


# ---- building the corpus ------------------------------------------------------------------------------
def build(root: Path, seed: int = 0, only: set | None = None) -> list[dict]:
    fx, tm = _fixtures()
    c = Corpus(root, seed)
    base = root / "base"
    base.mkdir(parents=True, exist_ok=True)
    fams = {
        "gguf": gguf_cases,
        "hf": hf_cases,
        "int8": int8_cases,
        "llama2c": llama2c_cases,
        "paths": path_cases,
        "template": template_cases,
        "flags": flag_cases,
        "api": api_cases,
        "resources": resource_cases,
    }
    bases = make_bases(base, fx, tm)
    for name, fn in fams.items():
        if only is None or name in only:
            fn(c, bases, fx)
    return c.cases


def make_bases(base: Path, fx, tm) -> dict:
    from gguf import GGMLQuantizationType as Q

    b = {}
    # HF directory: config.json + model.safetensors + word-level tokenizer.json + tokenizer_config.json
    hf = fx.write_hf_dir(base / "hf", fx.tiny_weights(d=DIMS), fx.hf_config(d=DIMS))
    tm.write_tokenizer(hf, DIMS["vocab"])
    (hf / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<s>",
                "eos_token": "</s>",
                "add_bos_token": True,
                "chat_template": TEMPLATE,
                "added_tokens_decoder": {
                    "1": {"content": "<s>", "special": True},
                    "2": {"content": "</s>", "special": True},
                },
            }
        )
    )
    b["hf"] = hf
    sh = fx.write_hf_dir(base / "hf_sharded", fx.tiny_weights(d=DIMS), fx.hf_config(d=DIMS), shards=2)
    tm.write_tokenizer(sh, DIMS["vocab"])
    b["hf_sharded"] = sh
    for dt in ("f16", "bf16"):
        d = fx.write_hf_dir(base / f"hf_{dt}", fx.tiny_weights(d=DIMS), fx.hf_config(d=DIMS), dtype=dt)
        tm.write_tokenizer(d, DIMS["vocab"])
        b[f"hf_{dt}"] = d
    q = fx.write_hf_dir(
        base / "hf_qwen2",
        fx.tiny_weights(d=DIMS, bias=True, tied=True),
        fx.hf_config(d=DIMS, arch="Qwen2ForCausalLM", tied=True),
    )
    tm.write_tokenizer(q, DIMS["vocab"])
    b["hf_qwen2"] = q
    # int8 directory, written by hetinfer's own quantizer (round to nearest)
    from hetinfer.loaders import load_checkpoint
    from hetinfer.quant import save_quantized

    b["int8"] = save_quantized(
        load_checkpoint(hf, progress=False), base / "int8", group=32, progress=False, method="rtn"
    )
    # GGUF: F16 llama, F32+Q8_0, Q4_0, qwen2 with biases
    w = fx.tiny_weights(d=GDIMS)
    b["gguf"] = fx.write_gguf(base / "m.gguf", w, d=GDIMS)
    b["gguf_q8"] = fx.write_gguf(base / "q8.gguf", w, d=GDIMS, qtypes={"*": Q.Q8_0})
    b["gguf_q4"] = fx.write_gguf(base / "q4.gguf", w, d=GDIMS, qtypes={"*": Q.Q4_0})
    b["gguf_qwen2"] = fx.write_gguf(base / "qwen2.gguf", fx.tiny_weights(d=GDIMS, bias=True), arch="qwen2", d=GDIMS)
    # llama2.c, three versions, with a llama2.c tokenizer.bin beside them
    cw = fx.tiny_weights(d=CDIMS)
    for v in (0, 1, 2):
        d = base / f"llama2c_v{v}"
        d.mkdir()
        fx.write_llama2c(d / "model.bin", cw, v, d=CDIMS, group_size=32)
        (d / "tokenizer.bin").write_bytes(tokenizer_bin(CDIMS["vocab"]))
        b[f"llama2c_v{v}"] = d / "model.bin"
    return b


def tokenizer_bin(vocab: int, pieces: list[bytes] | None = None) -> bytes:
    """A llama2.c tokenizer.bin: <unk>, <s>, </s>, 256 byte tokens, then words up to `vocab`."""
    if pieces is None:
        pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [f"<0x{i:02X}>".encode() for i in range(256)]
        words = [
            b" ",
            b"h",
            b"e",
            b"l",
            b"o",
            b"w",
            b"r",
            b"d",
            b" h",
            b"he",
            b"ll",
            b"lo",
            b" hel",
            b" hello",
            b"or",
            b"ld",
            b" world",
        ]
        pieces += words[: vocab - len(pieces)]
        pieces += [f"x{i}".encode() for i in range(vocab - len(pieces))]
    out = [struct.pack("<i", max(len(p) for p in pieces))]
    for i, p in enumerate(pieces):
        out.append(struct.pack("<fi", -float(i), len(p)) + p)
    return b"".join(out)


def _trunc_lengths(size: int, header_end: int, rng, n_head: int, n_data: int) -> list[int]:
    head = sorted(
        set([0, 1, 3, 4, 7, 8, 12, 23, 24, 25] + rng.sample(range(1, max(2, header_end)), min(n_head, header_end - 1)))
    )
    data = sorted(set(rng.sample(range(header_end, size), min(n_data, size - header_end)) + [size - 1]))
    return [n for n in head + data if n < size]


# --- GGUF ---------------------------------------------------------------------------------------------
GGUF_READ_KEYS = {
    "general.architecture",
    "general.alignment",
    "llama.context_length",
    "llama.embedding_length",
    "llama.block_count",
    "llama.feed_forward_length",
    "llama.attention.head_count",
    "llama.attention.head_count_kv",
    "llama.attention.layer_norm_rms_epsilon",
    "llama.rope.freq_base",
    "llama.rope.dimension_count",
    "llama.vocab_size",
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.chat_template",
}


GGUF_FLOAT_KEYS = {"llama.attention.layer_norm_rms_epsilon", "llama.rope.freq_base"}


def gguf_cases(c: Corpus, b: dict, fx) -> None:
    rng = c.rng
    src = b["gguf"].read_bytes()
    g0 = Gguf(src)

    def add(cid, data: bytes, expect="error", prompt=GGUF_PROMPT):
        p = c.new_path("gguf", ".gguf")
        p.write_bytes(data)
        c.add(f"gguf/{cid}", "gguf", p, expect, prompt)

    # the valid bases (must load)
    for k in ("gguf", "gguf_q8", "gguf_q4", "gguf_qwen2"):
        c.add(f"gguf/valid/{k}", "gguf", b[k], "ok")
    # truncations at many lengths (header dense, data sparse)
    for n in _trunc_lengths(len(src), g0.header_end, rng, 110, 20):
        add(f"truncate/{n}", src[:n])
    for k in ("gguf_q8", "gguf_q4"):
        s = b[k].read_bytes()
        for n in rng.sample(range(24, len(s)), 8):
            add(f"truncate-{k}/{n}", s[:n])
    # byte flips in the header (and a few in the tensor data: garbage values, may load)
    for i in range(150):
        pos = rng.choice(
            [rng.randrange(0, 24), rng.randrange(24, g0.info_start), rng.randrange(g0.info_start, g0.header_end)]
        )
        val = rng.choice([0x00, 0xFF, 0x80, 0x7F, src[pos] ^ (1 << rng.randrange(8))])
        if val == src[pos]:
            continue
        add(f"flip/{pos}={val:02x}", src[:pos] + bytes([val]) + src[pos + 1 :], "any")
    for i in range(10):
        pos = rng.randrange(g0.data_start, len(src))
        add(f"flip-data/{pos}", src[:pos] + bytes([src[pos] ^ 0xFF]) + src[pos + 1 :], "any")
    # lying header counts
    nt, nkv = len(g0.tensors), len(g0.kvs)
    for v in (0, 1, nt - 1, nt + 1, 2**31, 2**63, 2**64 - 1):
        add(f"n_tensors={v}", g0.build(counts=(v, nkv)), "error")
    for v in (0, 1, nkv - 1, nkv + 1, 2**31, 2**63, 2**64 - 1):
        add(f"n_kv={v}", g0.build(counts=(nt, v)), "error")
    add("version=1", src[:4] + struct.pack("<I", 1) + src[8:])
    add("version=2^31", src[:4] + struct.pack("<I", 2**31) + src[8:])
    add("version=2", src[:4] + struct.pack("<I", 2) + src[8:], "any")
    add("magic-big-endian-version", src[:4] + struct.pack(">I", 3) + src[8:])
    # every metadata key x wrong value types (a sample of them per key)
    variants = gguf_value_variants()
    for key, _ in g0.kvs:
        k = key.decode()
        for label, value, is_int in rng.sample(variants, 6):
            g = Gguf(src)
            g.set_kv(k, value)
            expect = "error" if (k in GGUF_READ_KEYS and not (is_int and label in ("u8=0", "u32=1"))) else "any"
            if k in GGUF_FLOAT_KEYS and label in ("f32=0.5", "u32=2^31", "u64=2^63", "u64=max", "u32=1"):
                expect = "any"  # odd but legal values of a float key
            if label.startswith("vtype"):
                expect = "error"
            add(f"kv/{k}/{label}", g.build(), expect)
        g = Gguf(src)
        g.drop_kv(k)
        add(f"kv/{k}/missing", g.build(), "any")
    # lying lengths inside the header: a key length, a string length, array counts
    first_key_len = 24
    for v in (2**31, 2**63, 2**64 - 1, 0):
        add(f"keylen={v}", src[:first_key_len] + struct.pack("<Q", v) + src[first_key_len + 8 :])
    for key in (
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type",
        "tokenizer.chat_template",
        "general.architecture",
    ):
        start, end = g0.offsets[key.encode()]
        vt = struct.unpack_from("<I", src, start)[0]
        cnt_at = start + (8 if vt == ARRAY else 4)
        (cnt,) = struct.unpack_from("<Q", src, cnt_at)
        for v in (cnt - 1, cnt + 1, 2**31, 2**63, 2**64 - 1):
            add(f"count/{key}={v}", src[:cnt_at] + struct.pack("<Q", v) + src[cnt_at + 8 :])
    # a token string whose length lies
    start, _ = g0.offsets[b"tokenizer.ggml.tokens"]
    tok_at = start + 4 + 12
    for v in (2**31, 2**63, 2**64 - 1, 2**20):
        add(f"tokenlen={v}", src[:tok_at] + struct.pack("<Q", v) + src[tok_at + 8 :])
    # array nesting, element types
    for label, value in (
        (
            "nested-3",
            enc(ARRAY, [], ARRAY)[:4]
            + struct.pack("<IQ", ARRAY, 1)
            + struct.pack("<IQ", ARRAY, 1)
            + struct.pack("<IQ", ARRAY, 1)
            + struct.pack("<IQ", 4, 0),
        ),
        ("etype=99", struct.pack("<IIQ", ARRAY, 99, 3) + b"\0" * 12),
        ("etype=bool", enc(ARRAY, [True, False], 7)),
        ("tokens-ints", enc(ARRAY, list(range(260)), 5)),
        ("tokens-empty", enc(ARRAY, [], STRING)),
        ("tokens-dup", enc(ARRAY, ["a"] * 260, STRING)),
        ("tokens-badutf8", enc(ARRAY, [b"\xff" + bytes([i % 256]) for i in range(260)], STRING)),
        ("tokens-empty-strings", enc(ARRAY, [""] * 260, STRING)),
    ):
        g = Gguf(src)
        g.set_kv("tokenizer.ggml.tokens", value)
        # duplicate (and empty) tokens occur in real vocabularies: llama.cpp loads them, so may hetinfer
        add(
            f"tokens/{label}",
            g.build(),
            "any" if label in ("tokens-badutf8", "tokens-dup", "tokens-empty-strings") else "error",
        )
    # semantic lies, one field at a time
    for key, vt, value in (
        ("llama.block_count", 4, 2**31),
        ("llama.block_count", 4, 3),
        ("llama.block_count", 4, 0),
        ("llama.attention.head_count", 4, 3),
        ("llama.attention.head_count", 4, 2**31),
        ("llama.attention.head_count_kv", 4, 3),
        ("llama.attention.head_count_kv", 4, 8),
        ("llama.context_length", 4, 2**31),
        ("llama.context_length", 10, 2**63),
        ("llama.context_length", 4, 1),
        ("llama.embedding_length", 4, 128),
        ("llama.feed_forward_length", 4, 2**31),
        ("llama.vocab_size", 4, 2**31),
        ("llama.rope.dimension_count", 4, 8),
        ("llama.rope.dimension_count", 4, 2**31),
        ("llama.attention.key_length", 4, 2**31),
        ("llama.attention.key_length", 4, 8),
        ("llama.attention.value_length", 4, 32),
        ("general.alignment", 4, 0),
        ("general.alignment", 4, 3),
        ("general.alignment", 4, 2**31),
        ("general.alignment", 10, 2**63),
        ("general.alignment", 4, 1 << 21),
        ("tokenizer.ggml.bos_token_id", 4, 260),
        ("tokenizer.ggml.eos_token_id", 5, -1),
        ("tokenizer.ggml.eot_token_id", 4, 2**31),
        ("tokenizer.ggml.padding_token_id", 4, 999),
        ("llama.rope.scaling.type", STRING, "longrope"),
        ("llama.rope.scaling.type", STRING, "yarn"),
        ("llama.rope.scaling.factor", 6, -1.0),
        ("llama.rope.scaling.factor", 6, math.nan),
        ("llama.rope.scaling.original_context_length", 4, 2**31),
        ("llama.attention.layer_norm_rms_epsilon", 6, 0.0),
        ("llama.rope.freq_base", 6, -1.0),
        ("general.architecture", STRING, "gpt2"),
        ("general.architecture", STRING, ""),
        ("general.architecture", STRING, "llama\0"),
        ("tokenizer.ggml.model", STRING, "bert"),
        ("tokenizer.ggml.pre", STRING, "qwen2"),
        ("tokenizer.ggml.merges", ARRAY, ["a"]),
        ("tokenizer.ggml.merges", ARRAY, ["zz qq"]),
        ("tokenizer.ggml.scores", ARRAY, [math.nan] * 260),
        ("tokenizer.ggml.add_bos_token", 4, 1),
    ):
        g = Gguf(src)
        if vt == ARRAY:
            et = 6 if isinstance(value[0], float) else STRING
            g.set_kv(key, enc(ARRAY, value, et))
        else:
            g.set_kv(key, enc(vt, value))
        ok_ish = (key, value) in (
            ("llama.rope.scaling.type", "yarn"),
            ("tokenizer.ggml.pre", "qwen2"),
            ("tokenizer.ggml.padding_token_id", 999),
            ("tokenizer.ggml.merges", ["zz qq"]),
            ("llama.context_length", 1),
            ("llama.rope.scaling.type", "longrope"),
        )
        # rope.scaling.* without a scaling type (or a type without a factor) are ignored, as llama.cpp does
        ok_ish = ok_ish or key in ("llama.rope.scaling.factor", "llama.rope.scaling.original_context_length")
        add(f"meta/{key}={str(value)[:20]}", g.build(), "any" if ok_ish else "error")
    # tensors: offsets, dims, types, names
    names = [t[0].decode() for t in g0.tensors]
    tvars = [
        "off=2^31",
        "off=2^63",
        "off=max",
        "off+1",
        "off=other",
        "dim0=0",
        "dim=2^31",
        "dim=2^63",
        "dims-overflow",
        "ndim=0",
        "ndim=5",
        "ndim=2^31",
        "qtype=99",
        "qtype=2^31",
        "qtype=Q4_K",
        "qtype=F32",
        "qtype=Q8_0",
        "qtype=I8",
        "name-dup",
        "name-badutf8",
        "name-empty",
        "name=blk.1e3",
        "name=blk.99",
        "name=blk.-1",
        "name-unknown",
        "dims-swap",
        "rank-up",
    ]
    for name in names:
        for tv in rng.sample(tvars, 5):
            g = Gguf(src)
            t = g.tensor(name)
            raw = None
            other = rng.choice([x for x in g.tensors if x is not t])
            if tv.startswith("off="):
                t[3] = {"off=2^31": 2**31, "off=2^63": 2**63, "off=max": 2**64 - 32, "off=other": other[3]}[tv]
            elif tv == "off+1":
                t[3] += 1
            elif tv == "dim0=0":
                t[1][0] = 0
            elif tv == "dim=2^31":
                t[1][-1] = 2**31
            elif tv == "dim=2^63":
                t[1][-1] = 2**63
            elif tv == "dims-overflow":
                t[1] = [2**32, 2**32, 2**32][: max(2, len(t[1]))]
            elif tv == "dims-swap":
                t[1] = t[1][::-1]
            elif tv == "rank-up":
                t[1] = t[1] + [1]
            elif tv.startswith("ndim="):
                nd = {"ndim=0": 0, "ndim=5": 5, "ndim=2^31": 2**31}[tv]
                infos = []
                for x in g.tensors:
                    if x is t:
                        dims = (x[1] + [1] * 5)[:nd] if nd <= 5 else x[1]
                        infos.append(
                            gstr(x[0])
                            + struct.pack("<I", nd)
                            + struct.pack(f"<{len(dims)}Q", *dims)
                            + struct.pack("<IQ", x[2], x[3])
                        )
                    else:
                        infos.append(
                            gstr(x[0])
                            + struct.pack(f"<I{len(x[1])}Q", len(x[1]), *x[1])
                            + struct.pack("<IQ", x[2], x[3])
                        )
                raw = b"".join(infos)
            elif tv.startswith("qtype="):
                t[2] = {
                    "qtype=99": 99,
                    "qtype=2^31": 2**31,
                    "qtype=Q4_K": 12,
                    "qtype=F32": 0,
                    "qtype=Q8_0": 8,
                    "qtype=I8": 24,
                }[tv]
            elif tv == "name-dup":
                t[0] = other[0]
            elif tv == "name-badutf8":
                t[0] = t[0][:4] + b"\xff\xfe" + t[0][4:]
            elif tv == "name-empty":
                t[0] = b""
            elif tv.startswith("name="):
                t[0] = {
                    "name=blk.1e3": b"blk.1e3.attn_q.weight",
                    "name=blk.99": b"blk.99.attn_q.weight",
                    "name=blk.-1": b"blk.-1.attn_q.weight",
                }[tv]
            elif tv == "name-unknown":
                t[0] = b"blk.0.attn_qkv.weight"
            same = tv == "dims-swap" and t[1] == t[1][::-1] or tv == "rank-up" and False
            add(f"tensor/{name}/{tv}", g.build(raw_infos=raw), "any" if same else "error")
    # duplicates
    g = Gguf(src)
    g.kvs.append(list(g.kvs[3]))
    add("dup-key", g.build())
    g = Gguf(src)
    g.tensors.append(list(g.tensors[-1]))
    add("dup-tensor", g.build())
    g = Gguf(src)
    t = g.tensors[-1]
    g.tensors.append([b"blk.0.attn_q.bias", [64], 0, t[3]])
    add("extra-overlapping-tensor", g.build())
    # alignment: a valid other alignment (relaid out) must load; a lying one must not
    for a in (64, 256, 1):
        g = Gguf(src)
        g.set_kv("general.alignment", enc(4, a))
        pos, infos = 0, []
        chunks = []
        for t in sorted(g.tensors, key=lambda t: t[3]):
            nb = _tensor_nbytes(t)
            pos = -(-pos // a) * a
            chunks.append((pos, g0.data[t[3] : t[3] + nb]))
            t[3] = pos
            pos += nb
        data = bytearray(pos)
        for p, ch in chunks:
            data[p : p + len(ch)] = ch
        g.data = bytes(data)
        add(f"align={a}-relaid", g.build(align=a), "ok")
        g2 = Gguf(src)
        g2.set_kv("general.alignment", enc(4, a * 2 if a > 1 else 3))
        add(f"align={a}-lie", g2.build(align=32), "error")
    # a tensor type that gguf knows but hetinfer does not read, stored consistently (IQ2_XXS, 16)
    # invalid UTF-8 in every text field
    for key in (
        "general.architecture",
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.chat_template",
        "general.name",
    ):
        try:
            g = Gguf(src)
            old = g.kv(key)
        except StopIteration:
            continue
        s = old[12:]
        g.set_kv(key, enc(STRING, s[:2] + b"\xc3\x28" + s[2:]))
        add(f"badutf8/{key}", g.build(), "any")
    g = Gguf(src)
    g.kvs[0][0] = b"\xff\xfe" + g.kvs[0][0]
    add("badutf8/key", g.build(), "any")
    # a file of random bytes after the magic, and a zero-filled one
    for n in (32, 4096, 100_000):
        add(f"random/{n}", b"GGUF" + bytes(rng.getrandbits(8) for _ in range(n)))
        add(f"zeros/{n}", b"GGUF" + bytes(n))
    add("empty", b"")
    # a sparse file claiming a terabyte after a valid header (mapped, never read)
    p = c.new_path("gguf", ".gguf")
    with open(p, "wb") as f:
        f.write(src)
        f.truncate(1 << 40)
    c.add("gguf/sparse-1TB", "gguf", p, "any")
    # quantized bases: type confusions
    for k in ("gguf_q8", "gguf_q4"):
        s = b[k].read_bytes()
        gq = Gguf(s)
        for name in rng.sample([t[0].decode() for t in gq.tensors], 6):
            for qt in rng.sample([0, 1, 2, 3, 6, 7, 8, 12, 14, 30], 2):
                g = Gguf(s)
                t = g.tensor(name)
                if t[2] == qt:
                    continue
                t[2] = qt
                p = c.new_path("gguf", ".gguf")
                p.write_bytes(g.build())
                c.add(f"gguf/{k}/qtype/{name}={qt}", "gguf", p, "error")


def _tensor_nbytes(t) -> int:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(t[2])]
    return math.prod(t[1]) // block * size


# --- HF directories -----------------------------------------------------------------------------------
CONFIG_BAD_VALUES = [
    ("str", "64"),
    ("float", 64.5),
    ("float-int", 64.0),
    ("neg", -1),
    ("zero", 0),
    ("2^31", 2**31),
    ("2^63", 2**63),
    ("huge", 10**400),
    ("true", True),
    ("null", None),
    ("list", [64]),
    ("obj", {"a": 1}),
    ("nan", math.nan),
    ("inf", math.inf),
]


def _json(v) -> str:
    return json.dumps(v, allow_nan=True)


def hf_cases(c: Corpus, b: dict, fx) -> None:
    rng = c.rng
    hf = b["hf"]

    def variant(cid, files: dict, base=hf, expect="error", skip=(), prompt=HF_PROMPT, api="auto"):
        d = link_dir(base, c.new_path("hf"), skip=skip)
        for name, data in files.items():
            if isinstance(data, str):
                data = data.encode()
            replace_file(d / name, data)
        c.add(f"hf/{cid}", "hf", d, expect, prompt, api=api)
        return d

    for k in ("hf", "hf_sharded", "hf_f16", "hf_bf16", "hf_qwen2"):
        c.add(f"hf/valid/{k}", "hf", b[k], "ok", HF_PROMPT)
    st = (hf / "model.safetensors").read_bytes()
    hlen = struct.unpack_from("<Q", st)[0]
    header = json.loads(st[8 : 8 + hlen])
    body = st[8 + hlen :]
    # truncations and byte flips of model.safetensors
    for n in _trunc_lengths(len(st), 8 + hlen, rng, 50, 15):
        variant(f"st-truncate/{n}", {"model.safetensors": st[:n]})
    for i in range(60):
        pos = rng.randrange(0, 8 + hlen)
        val = rng.choice([0x00, 0xFF, ord("9"), ord("-"), ord('"'), ord("}"), st[pos] ^ 0x20])
        if val != st[pos]:
            variant(
                f"st-flip/{pos}={val:02x}", {"model.safetensors": st[:pos] + bytes([val]) + st[pos + 1 :]}, expect="any"
            )
    # lying header length
    for v in (0, 1, 7, hlen - 1, hlen + 1, len(st) - 8, len(st) - 7, 2**31, 2**63, 2**64 - 1, 100_000_001):
        variant(f"st-hlen={v}", {"model.safetensors": struct.pack("<Q", v) + st[8:]})

    def st_with(h, raw=None, tail=body):
        hb = raw if raw is not None else json.dumps(h).encode()
        return struct.pack("<Q", len(hb)) + hb + tail

    names = [n for n in header if n != "__metadata__"]
    entry_vars = {
        "dtype=F99": ("dtype", "F99"),
        "dtype=5": ("dtype", 5),
        "dtype=null": ("dtype", None),
        "dtype=I8": ("dtype", "I8"),
        "dtype=F64": ("dtype", "F64"),
        "dtype=BOOL": ("dtype", "BOOL"),
        "dtype=U8": ("dtype", "U8"),
        "dtype=F16": ("dtype", "F16"),
        "dtype=f32": ("dtype", "f32"),
        "dtype=F8_E4M3": ("dtype", "F8_E4M3"),
        "shape=str": ("shape", "64"),
        "shape=[-1]": ("shape", [-1]),
        "shape=huge": ("shape", [2**63, 2**63]),
        "shape=[]": ("shape", []),
        "shape=[0]": ("shape", [0]),
        "shape=floats": ("shape", [64.0, 64.0]),
        "shape=nested": ("shape", [[64], [64]]),
        "shape=rank9": ("shape", [1] * 9),
        "shape=bools": ("shape", [True, True]),
        "shape=rev": None,
        "off=neg": ("data_offsets", [-4, 0]),
        "off=huge": ("data_offsets", [0, 2**63]),
        "off=floats": ("data_offsets", [0.0, 4.0]),
        "off=str": ("data_offsets", ["0", "4"]),
        "off=rev": None,
        "off=3": ("data_offsets", [0, 4, 8]),
        "off=shift1": None,
        "off=overlap": None,
        "off=null": ("data_offsets", None),
        "entry=list": "list",
        "entry=str": "str",
        "missing=dtype": "dtype",
        "missing=shape": "shape",
        "missing=data_offsets": "data_offsets",
        "extra-key": "extra",
    }
    for name in rng.sample(names, min(len(names), 8)):
        for label in rng.sample(sorted(entry_vars), 9):
            h = json.loads(json.dumps(header))
            e = h[name]
            v = entry_vars[label]
            if isinstance(v, tuple):
                e[v[0]] = v[1]
            elif label == "shape=rev":
                e["shape"] = e["shape"][::-1]
            elif label == "off=rev":
                e["data_offsets"] = e["data_offsets"][::-1]
            elif label == "off=shift1":
                e["data_offsets"] = [x + 1 for x in e["data_offsets"]]
            elif label == "off=overlap":
                other = h[rng.choice([n for n in names if n != name])]
                e["data_offsets"] = list(other["data_offsets"])
            elif v == "list":
                h[name] = [e["dtype"], e["shape"]]
            elif v == "str":
                h[name] = "F32"
            elif v == "extra":
                e["extra"] = {"x": [1, 2]}
            else:
                del e[v]
            ok = label in ("shape=rev",) and len(set(e["shape"])) == 1 or label == "extra-key"
            variant(f"st-entry/{name}/{label}", {"model.safetensors": st_with(h)}, expect="any" if ok else "error")
    for label, meta in (("list", [1]), ("ints", {"a": 1}), ("nested", {"a": {"b": "c"}}), ("str", "x"), ("null", None)):
        h = json.loads(json.dumps(header))
        h["__metadata__"] = meta
        variant(f"st-metadata/{label}", {"model.safetensors": st_with(h)})
    # raw header JSON: duplicate tensor, not an object, invalid UTF-8, deep nesting, a huge number
    n0 = names[0]
    raw = json.dumps(header)
    dup = raw[:-1] + ", " + json.dumps(n0) + ": " + json.dumps(header[n0]) + "}"
    for label, hb in (
        ("dup-tensor", dup.encode()),
        ("array", b"[]"),
        ("string", b'"x"'),
        ("number", b"1"),
        ("empty", b""),
        ("spaces", b" " * 64),
        ("badutf8", raw.encode().replace(b"model", b"m\xffdel", 1)),
        ("nested", b"[" * 100_000 + b"]" * 100_000),
        ("bignum", raw.encode().replace(b"[0,", b"[" + b"9" * 5000 + b",", 1)),
        ("nan", raw.encode().replace(b"[0,", b"[NaN,", 1)),
        ("bom", b"\xef\xbb\xbf" + raw.encode()),
        ("nul", raw.encode()[:-1] + b"\0}"),
    ):
        variant(
            f"st-header/{label}",
            {"model.safetensors": st_with(None, raw=hb)},
            expect="any" if label == "bom" else "error",
        )
    # tensors: a tensor missing, an extra one, one stored twice across shards
    h = json.loads(json.dumps(header))
    del h[names[-1]]
    variant("st-tensor-missing", {"model.safetensors": st_with(h)})
    h = json.loads(json.dumps(header))
    h["model.layers.0.self_attn.q_proj.bias"] = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
    variant("st-tensor-extra-empty", {"model.safetensors": st_with(h)})
    h = json.loads(json.dumps(header))
    h["model.layers.7.mlp.up_proj.weight"] = dict(h[names[0]])
    variant("st-tensor-extra-alias", {"model.safetensors": st_with(h)})
    # config.json: every key x wrong JSON types, and whole-file corruptions
    cfg = json.loads((hf / "config.json").read_text())
    keys = sorted(cfg) + [
        "head_dim",
        "rope_scaling",
        "rope_parameters",
        "quantization_config",
        "layer_types",
        "hidden_act",
        "partial_rotary_factor",
        "use_sliding_window",
        "attention_bias",
        "mlp_bias",
        "original_max_position_embeddings",
    ]
    for key in keys:
        for label, value in CONFIG_BAD_VALUES:
            d = dict(cfg)
            d[key] = value
            expect = "error"
            if value is None and key not in (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
            ):
                expect = "any"
            if key in ("max_position_embeddings",) and label in ("2^31",):
                expect = "any"
            if label == "float-int" and key in ("rms_norm_eps", "rope_theta"):
                expect = "any"
            if key in ("rms_norm_eps", "rope_theta") and label in ("float", "2^31", "2^63", "huge"):
                expect = "any"
            if key == "eos_token_id" and label == "list":
                expect = "error"
            if key == "original_max_position_embeddings" and label in ("2^31", "2^63", "huge"):
                expect = "any"
            if key in ("head_dim",) and label in ("zero", "neg"):
                expect = "error"
            if key in ("bos_token_id", "eos_token_id") and label == "zero":
                expect = "any"  # token id 0 is an id
            if key == "model_type" or (key, label) in (
                ("tie_word_embeddings", "true"),
                ("use_sliding_window", "true"),
                ("rope_scaling", "obj"),
                ("rope_parameters", "obj"),
            ):
                expect = "any"  # architectures wins; lm_head skipped; Llama has no sliding window; no type
            variant(f"config/{key}/{label}", {"config.json": _json(d)}, expect=expect)
    for key in ("rope_scaling",):
        for label, rs in (
            ("factor-str", {"rope_type": "linear", "factor": "2"}),
            ("factor-nan", {"rope_type": "linear", "factor": math.nan}),
            ("factor-neg", {"rope_type": "linear", "factor": -2.0}),
            ("type-unknown", {"rope_type": "longrope", "factor": 2.0}),
            ("type-int", {"rope_type": 3, "factor": 2.0}),
            ("no-factor", {"rope_type": "linear"}),
            ("yarn-orig-huge", {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 2**63}),
            ("yarn-orig-str", {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": "32"}),
            ("yarn-factor-huge", {"rope_type": "yarn", "factor": 1e300, "original_max_position_embeddings": 32}),
            ("llama3-missing", {"rope_type": "llama3", "factor": 8.0}),
            (
                "llama3-zero",
                {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 0,
                    "high_freq_factor": 0,
                    "original_max_position_embeddings": 32,
                },
            ),
            (
                "llama3-equal",
                {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 4.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 32,
                },
            ),
            ("dynamic-huge", {"rope_type": "dynamic", "factor": 2.0**40}),
            ("dynamic-list", {"rope_type": "dynamic", "factor": [2.0]}),
            ("beta-nan", {"rope_type": "yarn", "factor": 2.0, "beta_fast": math.nan}),
            ("attn-factor-str", {"rope_type": "yarn", "factor": 2.0, "attention_factor": "x"}),
        ):
            d = dict(cfg, rope_scaling=rs)
            dd = variant(
                f"config/rope_scaling/{label}",
                {"config.json": _json(d)},
                expect="any" if label in ("llama3-missing",) else "error",
            )
            c.cases[-1]["runs"].append(
                (
                    "generate-nomax",
                    ["generate", HF_PROMPT, "--model", str(dd), "-n", "4", "--kv-cache-memory", KV],
                    None,
                )
            )
    cj = (hf / "config.json").read_bytes()
    for label, data in (
        ("empty", b""),
        ("array", b"[]"),
        ("string", b'"x"'),
        ("null", b"null"),
        ("number", b"3"),
        ("not-json", b"{hidden_size: 64}"),
        ("truncated", cj[: len(cj) // 2]),
        ("nested", b"[" * 100_000 + b"]" * 100_000),
        ("nested-obj", b'{"a":' * 50_000 + b"1" + b"}" * 50_000),
        ("bignum", cj.replace(b'"hidden_size": 64', b'"hidden_size": ' + b"9" * 5000)),
        ("bom", b"\xef\xbb\xbf" + cj),
        ("utf16", cj.decode().encode("utf-16")),
        ("dup-key", cj[:-1] + b', "hidden_size": 48}'),
        ("nul", cj[:-1] + b', "x\\u0000": 1}'),
    ):
        variant(f"config-file/{label}", {"config.json": data}, expect="any" if label in ("bom", "nul") else "error")
    for i in range(12):  # invalid UTF-8 at a few places of every text file
        pos = rng.randrange(1, len(cj) - 1)
        variant(
            f"config-badutf8/{pos}",
            {"config.json": cj[:pos] + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88"]) + cj[pos:]},
        )
    # tokenizer.json: truncations, invalid UTF-8, wrong types
    tj = (hf / "tokenizer.json").read_bytes()
    tjd = json.loads(tj)
    for n in rng.sample(range(1, len(tj)), 10):
        variant(f"tokenizer-truncate/{n}", {"tokenizer.json": tj[:n]})
    for i in range(8):
        pos = rng.randrange(1, len(tj) - 1)
        variant(f"tokenizer-badutf8/{pos}", {"tokenizer.json": tj[:pos] + b"\xff" + tj[pos:]})
    vocab = tjd["model"]["vocab"]

    def tok_with(**edits):
        d = json.loads(tj)
        for path, v in edits.items():
            obj = d
            parts = path.split(".")
            for p in parts[:-1]:
                obj = obj[p]
            if v is _DEL:
                del obj[parts[-1]]
            else:
                obj[parts[-1]] = v
        return json.dumps(d)

    for label, text in (
        ("model=list", tok_with(model=[1])),
        ("model=null", tok_with(model=None)),
        ("vocab=list", tok_with(**{"model.vocab": list(vocab)})),
        ("vocab-id-huge", tok_with(**{"model.vocab": dict(vocab, w5=2**63)})),
        ("vocab-id-2^32", tok_with(**{"model.vocab": dict(vocab, w5=2**32 + 5)})),
        ("vocab-id-neg", tok_with(**{"model.vocab": dict(vocab, w5=-1)})),
        ("vocab-id-float", tok_with(**{"model.vocab": dict(vocab, w5=5.5)})),
        ("vocab-id-dup", tok_with(**{"model.vocab": dict(vocab, w5=4)})),
        ("vocab-id-above", tok_with(**{"model.vocab": dict(vocab, w5=1000)})),
        ("vocab-empty", tok_with(**{"model.vocab": {}})),
        ("unk-missing", tok_with(**{"model.unk_token": "<nope>"})),
        ("model-type-bpe", tok_with(**{"model.type": "BPE"})),
        ("model-type-unknown", tok_with(**{"model.type": "Nope"})),
        ("added-tokens-bad", tok_with(added_tokens=[{"id": 2**63, "content": "x"}])),
        (
            "added-tokens-id-above",
            tok_with(
                added_tokens=[
                    {
                        "id": 500,
                        "content": "<x>",
                        "special": True,
                        "single_word": False,
                        "lstrip": False,
                        "rstrip": False,
                        "normalized": False,
                    }
                ]
            ),
        ),
        ("added-tokens-str", tok_with(added_tokens="x")),
        ("pre-tokenizer-bad", tok_with(pre_tokenizer={"type": "Nope"})),
        ("normalizer-regex-bad", tok_with(normalizer={"type": "Replace", "pattern": {"Regex": "("}, "content": "x"})),
        ("decoder-bad", tok_with(decoder={"type": "Nope"})),
        ("top-array", "[]"),
        ("top-null", "null"),
        ("empty-obj", "{}"),
        ("nested", "[" * 100_000 + "]" * 100_000),
    ):
        variant(
            f"tokenizer/{label}",
            {"tokenizer.json": text},
            expect="any" if label in ("vocab-id-dup", "model-type-bpe", "unk-missing") else "error",
        )
    # BPE tokenizer.json with merges naming unknown tokens
    bpe = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": None,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": "<unk>",
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3, "b": 4},
            "merges": ["a b", "x y"],
        },
    }
    variant("tokenizer/bpe-merge-unknown", {"tokenizer.json": json.dumps(bpe)})
    bpe["model"]["merges"] = [["a", "b", "c"]]
    variant("tokenizer/bpe-merge-triple", {"tokenizer.json": json.dumps(bpe)})
    bpe["model"]["merges"] = [1, 2]
    variant("tokenizer/bpe-merge-ints", {"tokenizer.json": json.dumps(bpe)})
    # tokenizer_config.json
    tc = json.loads((hf / "tokenizer_config.json").read_text())
    for label, edit in (
        ("bos=int", {"bos_token": 1}),
        ("bos=list", {"bos_token": ["<s>"]}),
        ("bos=unknown", {"bos_token": "<nope>"}),
        ("bos=dict-int", {"bos_token": {"content": 1}}),
        ("bos=dict", {"bos_token": {"content": "<s>"}}),
        ("eos=null", {"eos_token": None}),
        ("eos=huge-str", {"eos_token": "x" * 100_000}),
        ("add_bos=str", {"add_bos_token": "yes"}),
        ("add_bos=int", {"add_bos_token": 1}),
        ("template=int", {"chat_template": 3}),
        ("template=list-bad", {"chat_template": [1, 2]}),
        ("template=list-ok", {"chat_template": [{"name": "default", "template": "x"}]}),
        ("template=list-nodefault", {"chat_template": [{"name": "tool_use", "template": "x"}]}),
        ("template=obj", {"chat_template": {"a": "b"}}),
        ("atd=list", {"added_tokens_decoder": [1]}),
        ("atd=neg", {"added_tokens_decoder": {"-1": {"content": "x", "special": True}}}),
        ("atd=huge", {"added_tokens_decoder": {"99999999999999999999999": {"content": "x", "special": True}}}),
        ("atd=superscript", {"added_tokens_decoder": {"\u00b2": {"content": "x", "special": True}}}),
        ("atd=arabic-digit", {"added_tokens_decoder": {"\u0661": {"content": "x", "special": True}}}),
        ("atd=value-str", {"added_tokens_decoder": {"1": "x"}}),
        ("atd=special-str", {"added_tokens_decoder": {"1": {"content": "<s>", "special": "no"}}}),
        ("atd=content-int", {"added_tokens_decoder": {"1": {"content": 5, "special": True}}}),
    ):
        expect = (
            "any"
            if label
            in (
                "bos=dict",
                "eos=null",
                "template=list-ok",
                "template=list-nodefault",
                "atd=huge",
                "atd=arabic-digit",
                "atd=special-str",
                "atd=content-int",
            )
            else "error"
        )
        variant(f"tokenizer_config/{label}", {"tokenizer_config.json": json.dumps(dict(tc, **edit))}, expect=expect)
    tcb = (hf / "tokenizer_config.json").read_bytes()
    for label, data in (
        ("array", b"[]"),
        ("badutf8", tcb[:10] + b"\xff" + tcb[10:]),
        ("truncated", tcb[:20]),
        ("empty", b""),
    ):
        variant(f"tokenizer_config-file/{label}", {"tokenizer_config.json": data})
    variant("generation_config/eos-huge", {"generation_config.json": json.dumps({"eos_token_id": 2**63})})
    variant("generation_config/eos-str", {"generation_config.json": json.dumps({"eos_token_id": "x"})})
    variant("generation_config/array", {"generation_config.json": "[]"})
    variant("generation_config/badutf8", {"generation_config.json": b'{"a": "\xff"}'})
    # missing / special files inside the directory
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        exp = "any" if name in ("tokenizer_config.json",) else "error"
        d = link_dir(hf, c.new_path("hf"), skip=(name,))
        # a directory without tokenizer files loads (token ids work); text is the error, at generate
        c.add(f"hf/missing/{name}", "hf", d, exp, HF_PROMPT, info="any" if name == "tokenizer.json" else None)
        for kind in ("dir", "fifo", "loop", "dangling", "devzero", "devnull", "socket", "empty"):
            d = link_dir(hf, c.new_path("hf"), skip=(name,))
            p = d / name
            special_file(p, kind, c.root)
            c.add(f"hf/special/{name}/{kind}", "hf", d, "error", HF_PROMPT)
    # shard index
    sh = b["hf_sharded"]
    idx = json.loads((sh / "model.safetensors.index.json").read_text())
    wm = idx["weight_map"]
    shard_names = sorted(set(wm.values()))
    first = next(iter(wm))
    for label, obj in (
        ("wm=list", dict(idx, weight_map=[1])),
        ("wm-empty", dict(idx, weight_map={})),
        ("wm-missing", {"metadata": {}}),
        ("wm-int", dict(idx, weight_map=dict(wm, **{first: 3}))),
        ("wm-dotdot", dict(idx, weight_map=dict(wm, **{first: "../hf/model.safetensors"}))),
        ("wm-abs", dict(idx, weight_map=dict(wm, **{first: "/etc/passwd"}))),
        ("wm-tilde", dict(idx, weight_map=dict(wm, **{first: "~/x.safetensors"}))),
        ("wm-nul", dict(idx, weight_map=dict(wm, **{first: "a\0b"}))),
        ("wm-dir", dict(idx, weight_map=dict(wm, **{first: "."}))),
        ("wm-missing-shard", dict(idx, weight_map=dict(wm, **{first: "model-00009-of-00009.safetensors"}))),
        ("wm-wrong-shard", dict(idx, weight_map=dict(wm, **{first: [s for s in shard_names if s != wm[first]][0]}))),
        ("wm-extra-tensor", dict(idx, weight_map=dict(wm, **{"model.layers.9.x": shard_names[0]}))),
        ("wm-drop-tensor", dict(idx, weight_map={k: v for k, v in wm.items() if k != first})),
        ("metadata-str", dict(idx, metadata="x")),
    ):
        expect = "any" if label in ("wm-drop-tensor", "metadata-str") else "error"
        variant(f"index/{label}", {"model.safetensors.index.json": json.dumps(obj)}, base=sh, expect=expect)
    ib = (sh / "model.safetensors.index.json").read_bytes()
    for label, data in (("array", b"[]"), ("badutf8", ib[:5] + b"\xfe" + ib[5:]), ("truncated", ib[: len(ib) // 2])):
        variant(f"index-file/{label}", {"model.safetensors.index.json": data}, base=sh)
    # a tensor stored in both shards
    s0 = (sh / shard_names[0]).read_bytes()
    s1 = (sh / shard_names[1]).read_bytes()
    variant("index/tensor-in-both-shards", {shard_names[1]: s0}, base=sh)
    for kind in ("fifo", "loop", "dir", "devzero"):
        d = link_dir(sh, c.new_path("hf"), skip=(shard_names[1],))
        special_file(d / shard_names[1], kind, c.root)
        c.add(f"hf/index/shard-{kind}", "hf", d, "error", HF_PROMPT)
    variant("index/shard-truncated", {shard_names[1]: s1[: len(s1) // 2]}, base=sh)
    # chat_template.jinja invalid UTF-8 (used by chat; loading reads it)
    variant("jinja/badutf8", {"chat_template.jinja": b"{{ 'a' }}\xff"}, skip=("tokenizer_config.json",))


_DEL = object()


def special_file(p: Path, kind: str, root: Path) -> None:
    """Make p a directory, FIFO, symlink loop, dangling symlink, device link, socket or empty file."""
    if kind == "dir":
        p.mkdir()
    elif kind == "fifo":
        os.mkfifo(p)
    elif kind == "loop":
        os.symlink(p.name + ".b", p)
        os.symlink(p.name, p.parent / (p.name + ".b"))
    elif kind == "dangling":
        os.symlink(p.parent / "does-not-exist", p)
    elif kind == "devzero":
        os.symlink("/dev/zero", p)
    elif kind == "devnull":
        os.symlink("/dev/null", p)
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        try:
            s.bind(str(p))
        except OSError:  # path too long for a socket: a FIFO instead
            os.mkfifo(p)
        finally:
            s.close()
    elif kind == "empty":
        p.write_bytes(b"")


# --- int8 ---------------------------------------------------------------------------------------------
def int8_cases(c: Corpus, b: dict, fx) -> None:
    rng = c.rng
    d0 = b["int8"]
    c.add("int8/valid", "int8", d0, "ok", HF_PROMPT)
    cfg = json.loads((d0 / "config.json").read_text())
    qc = cfg["quantization_config"]

    def variant(cid, files, expect="error", skip=()):
        d = link_dir(d0, c.new_path("int8"), skip=skip)
        for name, data in files.items():
            replace_file(d / name, data.encode() if isinstance(data, str) else data)
        c.add(f"int8/{cid}", "int8", d, expect, HF_PROMPT)

    for key in ("group_size", "scale_dtype", "quant_method"):
        for label, value in CONFIG_BAD_VALUES + [("g=3", 3), ("g=128", 128), ("g=16", 16)]:
            if key != "group_size" and label.startswith("g="):
                continue
            variant(
                f"qc/{key}/{label}", {"config.json": _json(dict(cfg, quantization_config=dict(qc, **{key: value})))}
            )
    variant("qc/list", {"config.json": json.dumps(dict(cfg, quantization_config=[qc]))})
    st = (d0 / "model.safetensors").read_bytes()
    hlen = struct.unpack_from("<Q", st)[0]
    header = json.loads(st[8 : 8 + hlen])
    body = st[8 + hlen :]
    for n in _trunc_lengths(len(st), 8 + hlen, rng, 15, 10):
        variant(f"truncate/{n}", {"model.safetensors": st[:n]})

    def st_with(h):
        hb = json.dumps(h).encode()
        return struct.pack("<Q", len(hb)) + hb + body

    scales = [n for n in header if n.endswith(".scales")]
    for sname in rng.sample(scales, min(4, len(scales))):
        w = sname[: -len(".scales")]
        h = json.loads(json.dumps(header))
        del h[sname]
        variant(f"scales-missing/{w}", {"model.safetensors": st_with(h)})
        for label, edit in (
            ("dtype=I8", {"dtype": "I8"}),
            ("dtype=BF16", {"dtype": "BF16"}),
            ("shape-rev", {"shape": header[sname]["shape"][::-1]}),
        ):
            h = json.loads(json.dumps(header))
            h[sname] = dict(h[sname], **edit)
            if label == "dtype=I8":
                o = h[sname]["data_offsets"]
                h[sname]["data_offsets"] = [o[0], o[0] + (o[1] - o[0]) // 2]
            variant(f"scales/{w}/{label}", {"model.safetensors": st_with(h)})
        h = json.loads(json.dumps(header))
        h[w] = dict(h[w], dtype="U8")
        variant(f"weight-dtype/{w}=U8", {"model.safetensors": st_with(h)})
        h = json.loads(json.dumps(header))
        o = h[w]["data_offsets"]
        h[w] = dict(h[w], dtype="F16", shape=[h[w]["shape"][0], h[w]["shape"][1] // 2])
        variant(f"weight-dtype/{w}=F16", {"model.safetensors": st_with(h)}, expect="any")
    norms = [n for n in header if n.endswith("norm.weight")]
    h = json.loads(json.dumps(header))
    o = h[norms[0]]["data_offsets"]
    h[norms[0]] = {"dtype": "I8", "shape": [(o[1] - o[0])], "data_offsets": o}
    variant("norm-as-int8", {"model.safetensors": st_with(h)})
    for i in range(15):
        pos = rng.randrange(0, 8 + hlen)
        variant(f"flip/{pos}", {"model.safetensors": st[:pos] + bytes([st[pos] ^ 0x41]) + st[pos + 1 :]}, expect="any")


# --- llama2.c -----------------------------------------------------------------------------------------
def llama2c_cases(c: Corpus, b: dict, fx) -> None:
    rng = c.rng
    fields = ["dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"]
    values = [0, -1, 1, 3, 7, 2**31 - 1, -(2**31), 1 << 20, 65536, 4096]

    def variant(v, cid, model: bytes | None = None, tok: bytes | None = None, expect="error", tok_kind=None, info=None):
        src = b[f"llama2c_v{v}"]
        d = link_dir(src.parent, c.new_path("llama2c"))
        if model is not None:
            replace_file(d / "model.bin", model)
        if tok is not None:
            replace_file(d / "tokenizer.bin", tok)
        if tok_kind is not None:
            (d / "tokenizer.bin").unlink()
            if tok_kind != "missing":
                special_file(d / "tokenizer.bin", tok_kind, c.root)
        c.add(f"llama2c/v{v}/{cid}", "llama2c", d / "model.bin", expect, GGUF_PROMPT, info=info)

    for v in (0, 1, 2):
        c.add(f"llama2c/v{v}/valid", "llama2c", b[f"llama2c_v{v}"], "ok", GGUF_PROMPT)
        src = b[f"llama2c_v{v}"].read_bytes()
        at = 0 if v == 0 else 8
        for i, f in enumerate(fields):
            for val in rng.sample(values, 5):
                pos = at + 4 * i
                expect = "error"
                info = None
                if f == "seq_len" and val in (65536, 4096, 1 << 20):
                    expect = "any"  # a longer context than the model was trained for is legal
                if f == "seq_len" and val in (1, 3, 7):
                    info = "any"  # a short context loads; --max-context 64 is refused
                if f == "vocab_size" and v == 0 and val < 0 and val != -(2**31):
                    expect = "error"
                if f in ("n_layers",) and val == CDIMS["layers"] or f == "n_kv_heads" and val == CDIMS["kv"]:
                    expect = "ok"
                variant(v, f"{f}={val}", src[:pos] + struct.pack("<i", val) + src[pos + 4 :], expect=expect, info=info)
        for n in sorted(set(rng.sample(range(1, len(src)), 10) + [27, 28, 255, 256, len(src) - 1])):
            variant(v, f"truncate/{n}", src[:n])
        for _ in range(5):
            pos = rng.randrange(at + 28, len(src))
            variant(v, f"flip-data/{pos}", src[:pos] + bytes([src[pos] ^ 0xFF]) + src[pos + 1 :], expect="any")
        if v:
            for ver in (0, 3, -1, 2**31 - 1):
                variant(v, f"version={ver}", src[:4] + struct.pack("<i", ver) + src[8:])
            for sh in (2, 255):
                variant(v, f"shared={sh}", src[:36] + bytes([sh]) + src[37:], expect="any")
            variant(v, "magic-flip", bytes([src[0] ^ 1]) + src[1:])
        if v == 2:
            for gs in (0, -1, 3, 2**31 - 1, 1, 64, 128):
                variant(
                    v,
                    f"group_size={gs}",
                    src[:37] + struct.pack("<i", gs) + src[41:],
                    expect="any" if gs in (1,) else "error",
                )
    # tokenizer.bin corruptions (against v1)
    tb = tokenizer_bin(CDIMS["vocab"])
    V = CDIMS["vocab"]
    for label, data in (
        ("max_len=0", struct.pack("<i", 0) + tb[4:]),
        ("max_len=-1", struct.pack("<i", -1) + tb[4:]),
        ("max_len=2^31-1", struct.pack("<i", 2**31 - 1) + tb[4:]),
        ("empty", b""),
        ("truncated", tb[: len(tb) // 2]),
        ("extra-bytes", tb + b"\0" * 9),
        ("len0=-1", tb[:8] + struct.pack("<i", -1) + tb[12:]),
        ("len0=2^31-1", tb[:8] + struct.pack("<i", 2**31 - 1) + tb[12:]),
        ("score0=nan", tb[:4] + struct.pack("<f", math.nan) + tb[8:]),
        ("score0=inf", tb[:4] + struct.pack("<f", math.inf) + tb[8:]),
        ("fewer-tokens", tokenizer_bin(V - 10)),
        ("more-tokens", tokenizer_bin(V + 10)),
        ("badutf8-piece", tokenizer_bin(V, [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [b"\xff\xfe"] * (V - 3))),
        ("dup-pieces", tokenizer_bin(V, [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [b"a"] * (V - 3))),
        ("empty-pieces", tokenizer_bin(V, [b""] * V)),
    ):
        expect = "any" if label in ("dup-pieces", "empty-pieces", "max_len=2^31-1") else "error"
        variant(1, f"tokenizer.bin/{label}", tok=data, expect=expect)
    for kind in ("missing", "fifo", "loop", "dir", "devzero", "dangling"):
        variant(1, f"tokenizer.bin/{kind}", tok_kind=kind)
    # a garbage tokenizer.model instead
    for label, data in (("garbage", b"garbage" * 20), ("empty", b""), ("proto-ish", b"\n\x05hello\x12\x00")):
        d = link_dir(b["llama2c_v1"].parent, c.new_path("llama2c"), skip=("tokenizer.bin",))
        (d / "tokenizer.model").write_bytes(data)
        c.add(f"llama2c/tokenizer.model/{label}", "llama2c", d / "model.bin", "error", GGUF_PROMPT)


# --- paths --------------------------------------------------------------------------------------------
def path_cases(c: Corpus, b: dict, fx) -> None:
    for kind in ("fifo", "loop", "dangling", "devzero", "devnull", "socket", "empty", "dir"):
        p = c.new_path("paths")
        special_file(p, kind, c.root)
        c.add(f"paths/{kind}", "paths", p, "error")
        for suffix in (".gguf", ".safetensors"):
            p = c.new_path("paths", suffix)
            special_file(p, kind, c.root)
            c.add(f"paths/{kind}{suffix}", "paths", p, "error")
    # --model "" / LLM(model=""): the default model, as --model absent (info "" is an error)
    c.add(
        "paths/empty-model-arg",
        "paths",
        None,
        "any",
        runs=[("info", ["info", ""], None, "error"), ("generate", gen_argv("", "hello"), None)],
        api={"op": "llm", "path": "", "prompt": "hi"},
    )
    for label, p in (
        ("nonexistent", c.root / "nope" / "model.gguf"),
        ("slash-dev", Path("/dev")),
        ("proc-self-mem", Path("/proc/self/mem")),
        ("dev-stdin", Path("/dev/stdin")),
        ("proc-kmsg", Path("/proc/self/fd/0")),
        ("root", Path("/")),
    ):
        c.add(
            f"paths/{label}",
            "paths",
            str(p),
            "error",
            api={"op": "llm", "path": str(p), "prompt": "hi"} if label not in ("dev-stdin", "proc-kmsg") else None,
        )
    d = c.new_path("paths")
    d.mkdir()
    (d / "a.gguf").write_bytes(b"GGUF")
    c.add("paths/dir-with-gguf", "paths", d, "error")
    p = c.new_path("paths", ".gguf")
    p.write_bytes(b"NOPE" + bytes(100))
    c.add("paths/gguf-wrong-magic", "paths", p, "error")
    p = c.new_path("paths", ".safetensors")
    shutil.copy(b["hf"] / "model.safetensors", p)
    c.add("paths/safetensors-file", "paths", p, "error")
    p = c.new_path("paths", ".bin")
    p.write_bytes(os.urandom(4096))
    c.add("paths/random-bin", "paths", p, "error")
    p = c.new_path("paths", ".bin")
    p.write_bytes(b"\x00" * 4096)
    c.add("paths/zeros-bin", "paths", p, "error")
    if os.geteuid() != 0:
        d = link_dir(b["hf"], c.new_path("paths"))
        os.chmod(d, 0)
        c.add("paths/unreadable-dir", "paths", d, "error")
        d = link_dir(b["hf"], c.new_path("paths"), skip=("config.json",))
        shutil.copy(b["hf"] / "config.json", d / "config.json")
        os.chmod(d / "config.json", 0)
        c.add("paths/unreadable-config", "paths", d, "error")
        p = c.new_path("paths", ".gguf")
        shutil.copy(b["gguf"], p)
        os.chmod(p, 0)
        c.add("paths/unreadable-gguf", "paths", p, "error")
    # a symlink to a valid model is fine
    p = c.new_path("paths", ".gguf")
    os.symlink(b["gguf"], p)
    c.add("paths/symlink-to-gguf", "paths", p, "ok")
    long = c.root / ("x" * 300)
    c.add("paths/name-too-long", "paths", long, "error")
    c.add("paths/newline-in-name", "paths", str(c.root / "a\nb.gguf"), "error")


# --- chat templates -----------------------------------------------------------------------------------
HOSTILE_TEMPLATES = [
    ("grow-mul", "{{ 'a' * 10**10 }}"),
    ("grow-mul2", "{{ 'ab' * 99999999 }}"),
    (
        "grow-loop",
        "{% set ns = namespace(s='a') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    ),
    ("range-huge", "{% for i in range(10**12) %}x{% endfor %}"),
    ("range-nested", "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"),
    ("recurse-macro", "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"),
    ("recurse-loop", "{% for m in messages recursive %}{{ loop([m]) }}{% endfor %}"),
    ("raise", "{{ raise_exception('no') }}"),
    ("zerodiv", "{{ 1 // 0 }}"),
    ("typeerror", "{{ 'a' + 1 }}"),
    ("syntax", "{% for %}"),
    ("syntax-unclosed", "{{ messages"),
    ("undefined-call", "{{ nope() }}"),
    ("attr-escape", "{{ ''.__class__.__mro__[1].__subclasses__() }}"),
    ("pow-huge", "{{ 10 ** (10 ** 10) }}"),
    ("pow-left", "{{ 10 ** 10 ** 10 }}"),
    ("format-huge", "{{ '%99999999999s' % 'a' }}"),
    ("strformat-huge", "{{ '{:>99999999999}'.format('a') }}"),
    ("join-huge", "{{ ['a'] * 10**9 | join }}"),
    ("replace-grow", "{{ ('a' * 4000) | replace('a', 'a' * 4000) }}"),
    ("indent-huge", "{{ 'a\\nb' | indent(10**9) }}"),
    ("center-huge", "{{ 'a' | center(10**10) }}"),
    ("wordwrap", "{{ ('a ' * 100000) | wordwrap(1) }}"),
    ("tojson-deep", "{% set ns = namespace(x=[]) %}{{ ns.x | tojson }}"),
    ("strftime-huge", "{{ strftime_now('%Y' * 1000) }}"),
    ("dict-grow", "{{ dict(a=1) * 3 }}"),
    ("mutate", "{% set x = messages.append(1) %}{{ x }}"),
    ("deep-nest", "{% if 1 %}" * 200 + "x" + "{% endif %}" * 200),
    ("huge-source", "{# " + "a" * (2 << 20) + " #}"),
    ("badutf8-surrogate", "{{ '\\ud800' }}"),
    ("output-huge", "{% for i in range(100000) %}{{ 'a' * 1000 }}{% endfor %}"),
    ("loop-filter", "{% for i in range(100000) | list | list | list %}{% endfor %}"),
    ("sum-huge", "{{ range(100000) | sum }}{{ range(100000) | map('string') | join | length }}"),
    ("lipsum", "{{ lipsum(10**9) }}"),
    ("cycler", "{% set c = cycler(*range(10**6)) %}{{ c.next() }}"),
    ("slice-huge", "{{ (range(10) | list)[::10**18] }}"),
    ("batch-huge", "{{ range(10) | batch(10**12) | list }}"),
]


# templates whose hostile work the sandbox bounds without an error (the render may succeed)
TEMPLATES_MAY_RENDER = ("tojson-deep", "mutate", "wordwrap", "sum-huge", "slice-huge", "strftime-huge", "pow-left",
                        "loop-filter")


def template_cases(c: Corpus, b: dict, fx) -> None:
    hf = b["hf"]
    tc = json.loads((hf / "tokenizer_config.json").read_text())

    def add_chat(cid, path, expect, text, story=False):
        """One case: `hetinfer chat` on path with one line of text (and `generate --story`), and
        the API's chat with the same message."""
        runs = [("chat", ["chat", "--model", str(path), "-n", "4", "--max-context", "64", "--kv-cache-memory", KV],
                 text.encode() + b"\n/exit\n")]
        if story:
            runs.append(("story", ["generate", "--story", "--model", str(path), "-n", "4", "--max-context", "64",
                                   "--kv-cache-memory", KV], None))
        c.add(cid, "template", path, expect, runs=runs,
              api={"op": "chat", "path": str(path), "messages": [{"role": "user", "content": text}]})

    for label, src in HOSTILE_TEMPLATES:
        d = link_dir(hf, c.new_path("template"), skip=("tokenizer_config.json",))
        (d / "tokenizer_config.json").write_text(json.dumps(dict(tc, chat_template=src)))
        add_chat(f"template/{label}", d, "any" if label in TEMPLATES_MAY_RENDER else "error", "w3 w4", story=True)
    # a few through GGUF metadata, and a jinja file
    src = b["gguf"].read_bytes()
    for label, tsrc in HOSTILE_TEMPLATES[:12]:
        g = Gguf(src)
        g.set_kv("tokenizer.chat_template", enc(STRING, tsrc))
        p = c.new_path("template", ".gguf")
        p.write_bytes(g.build())
        add_chat(f"template/gguf/{label}", p, "any" if label == "mutate" else "error", "hello")
    for label, tsrc in HOSTILE_TEMPLATES[:6]:
        d = link_dir(hf, c.new_path("template"), skip=("tokenizer_config.json",))
        (d / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in tc.items() if k != "chat_template"}))
        (d / "chat_template.jinja").write_text(tsrc)
        add_chat(f"template/jinja/{label}", d, "error", "w3")


# --- flags and prompts --------------------------------------------------------------------------------
def flag_cases(c: Corpus, b: dict, fx) -> None:
    m, hf = str(b["gguf"]), str(b["hf"])
    G = ["--model", m, "--max-context", "64", "--kv-cache-memory", KV]
    bad = [
        ("--temperature", "nan"),
        ("--temperature", "inf"),
        ("--temperature", "-0.5"),
        ("--temperature", "1e999"),
        ("--temperature", "0x10"),
        ("--top-p", "nan"),
        ("--top-p", "0"),
        ("--top-p", "1.0000001"),
        ("--top-p", "abc"),
        ("--min-p", "-inf"),
        ("--top-k", "-2"),
        ("--top-k", "1e3"),
        ("--top-k", str(2**70)),
        ("--repetition-penalty", "0"),
        ("--repetition-penalty", "nan"),
        ("--presence-penalty", "2.5"),
        ("--frequency-penalty", "nan"),
        ("--seed", "-1"),
        ("--seed", str(2**64)),
        ("--seed", "1.0"),
        ("--seed", "0x10"),
        ("--seed", "9" * 5000),
        ("-n", "0"),
        ("-n", "-1"),
        ("-n", "1e3"),
        ("-n", "9" * 5000),
        ("--max-context", "0"),
        ("--max-context", "-1"),
        ("--max-context", "1"),
        ("--max-context", str(2**63)),
        ("--max-context", "65"),
        ("--max-context", "9" * 5000),
        ("--kv-cache-memory", "0"),
        ("--kv-cache-memory", "1"),
        ("--kv-cache-memory", "1T"),
        ("--kv-cache-memory", "nanG"),
        ("--kv-cache-memory", "1e30"),
        ("--kv-cache-memory", "-5M"),
        ("--block-size", "0"),
        ("--block-size", str(2**40)),
        ("--max-num-seqs", "0"),
        ("--max-num-batched-tokens", "1"),
        ("--max-num-batched-tokens", str(2**62)),
        ("--gpu-memory-utilization", "2"),
        ("--device", "cuda:99"),
        ("--device", "tpu"),
        ("--device", ""),
        ("--dtype", "f8"),
        ("--stop", ""),
        ("--stop-id", "-1"),
        ("--stop-id", str(2**64)),
        ("--quantize", "int4"),
    ]
    for flag, value in bad:
        expect = (
            "any"
            if (flag, value)
            in (
                ("--temperature", "1e999"),
                ("--max-num-batched-tokens", "1"),
                ("--kv-cache-memory", "1T"),
                ("--max-num-batched-tokens", str(2**62)),
                ("--block-size", str(2**40)),
                ("--kv-cache-memory", "1e30"),
                ("--stop-id", "-1"),
                ("--top-k", str(2**70)),
                ("--stop-id", str(2**64)),
            )
            else "error"
        )
        runs = [("generate", ["generate", "hello", *G, "-n", "4", flag, value], None)]
        c.add(f"flags/{flag}={value[:24]}", "flags", None, expect, runs=runs, api=None)
    # prompts
    prompts = [
        ("badutf8", b"\xff\xfe"),
        ("badutf8-mid", b"hel\xc3lo"),
        ("surrogate", b"\xed\xa0\x80"),
        ("overlong", b"\xc0\xaf"),
        ("empty", b""),
        ("nul-ish", "a\u0000b".encode()[:1]),
        ("huge", ("hello " * 5000).encode()),
        ("control", b"\x1b[2J\x07"),
        ("rtl", "\u202e abc".encode()),
        ("specials", b"<|endoftext|><|im_start|>"),
        ("dash-stdin-bad", b"-"),
    ]
    for label, p in prompts:
        stdin = b"\xff\xfe bad" if label == "dash-stdin-bad" else None
        expect = (
            "error"
            if label in ("badutf8", "badutf8-mid", "surrogate", "overlong", "empty", "huge", "dash-stdin-bad")
            else "any"
        )
        bad_text = label.startswith("badutf8") or label in ("surrogate", "overlong", "dash-stdin-bad")
        runs = [
            ("generate", ["generate", p, *G, "-n", "4"], stdin),
            ("generate-hf", ["generate", p, "--model", hf, "--kv-cache-memory", KV, "-n", "4"], stdin),
            ("tokenize", ["tokenize", "--model", m, p], stdin, "error" if bad_text else "any"),
        ]
        c.add(f"prompt/{label}", "flags", None, expect, runs=runs, api=None)
    for label, text in (
        ("ids-out", "5 260"),
        ("ids-neg", "-1"),
        ("ids-huge", "9" * 400),
        ("ids-float", "1.5"),
        ("ids-badutf8", b"1 \xff"),
        ("ids-empty", ""),
        ("ids-unicode-digit", "\u0661\u0662"),
        ("ids-superscript", "\u00b2"),
        ("ids-many", " ".join(["5"] * 20000)),
    ):
        expect = "any" if label in ("ids-empty", "ids-many") else "error"
        c.add(
            f"decode/{label}",
            "flags",
            None,
            expect,
            runs=[("tokenize", ["tokenize", "--model", m, "--decode", text], None)],
            api=None,
        )
    # stdin prompts
    for label, data in (("stdin-badutf8", b"ab\xffcd"), ("stdin-empty", b""), ("stdin-nul", b"a\0b")):
        c.add(
            f"stdin/{label}",
            "flags",
            None,
            "any" if label == "stdin-nul" else "error",
            runs=[("generate", ["generate", "-", *G, "-n", "4"], data)],
            api=None,
        )
    # chat with hostile stdin lines
    for label, data in (
        ("badutf8", b"\xff\xfe\n/exit\n"),
        ("empty", b""),
        ("long-line", b"w3 " * 100_000 + b"\n"),
        ("nul", b"\0\0\n/exit\n"),
    ):
        c.add(
            f"chat-stdin/{label}",
            "flags",
            None,
            "any",
            runs=[("chat", ["chat", "--model", hf, "-n", "4", "--max-context", "64", "--kv-cache-memory", KV], data)],
            api=None,
        )
    # huge -n with a valid model: runs to the context limit, not forever
    c.add(
        "flags/-n-huge-valid",
        "flags",
        None,
        "any",
        runs=[("generate", ["generate", "hello", *G, "-n", str(10**9), "--temperature", "1", "--seed", "3"], None)],
        api=None,
    )
    for flag, value in (
        ("--temperature", "1e300"),
        ("--temperature", "1e-300"),
        ("--repetition-penalty", "1e-300"),
        ("--repetition-penalty", "1e300"),
        ("--top-p", "1e-300"),
        ("--min-p", "1e-300"),
        ("--frequency-penalty", "-2"),
        ("--presence-penalty", "2"),
    ):
        c.add(
            f"flags/f32-extreme/{flag}={value}",
            "flags",
            None,
            "any",
            runs=[("generate", ["generate", "hello", *G, "-n", "4", "--temperature", "0.7", flag, value], None)],
            api=None,
        )
    c.add(
        "flags/top-k-huge-sampled",
        "flags",
        None,
        "any",
        runs=[
            (
                "generate",
                [
                    "generate",
                    "hello",
                    *G,
                    "-n",
                    "4",
                    "--top-k",
                    str(2**70),
                    "--temperature",
                    "1",
                    "--top-p",
                    "0.5",
                    "--min-p",
                    "0.1",
                    "--repetition-penalty",
                    "1e30",
                    "--presence-penalty",
                    "2",
                    "--seed",
                    str(2**64 - 1),
                ],
                None,
            )
        ],
        api=None,
    )
    c.add(
        "flags/story-no-template",
        "flags",
        None,
        "any",
        runs=[
            (
                "story",
                ["generate", "--story", "--model", str(b["llama2c_v1"]), "-n", "4", "--kv-cache-memory", KV],
                None,
            )
        ],
        api=None,
    )


# --- the Python API -----------------------------------------------------------------------------------
def api_cases(c: Corpus, b: dict, fx) -> None:
    hf, m = str(b["hf"]), str(b["gguf"])
    nan, inf = math.nan, math.inf
    for i, kw in enumerate(
        [
            {"temperature": nan},
            {"temperature": "0.5"},
            {"temperature": -inf},
            {"top_p": "1"},
            {"top_p": nan},
            {"top_k": 1.5},
            {"top_k": True},
            {"min_p": [0.1]},
            {"seed": -1},
            {"seed": 2**64},
            {"seed": 1.0},
            {"seed": "1"},
            {"max_tokens": -1},
            {"max_tokens": 2**63},
            {"max_tokens": 1.5},
            {"max_tokens": None},
            {"stop": [1, 2]},
            {"stop": 5},
            {"stop": [""]},
            {"stop_token_ids": ["a"]},
            {"stop_token_ids": [-1]},
            {"stop_token_ids": 5},
            {"repetition_penalty": 0},
            {"presence_penalty": nan},
            {"ignore_eos": "yes"},
            {"frequency_penalty": 1j},
            {"top_k": 2**70},
            {"seed": nan},
            {"temperature": 10**400},
            {"top_p": -(10**400)},
            {"repetition_penalty": 10**400},
        ]
    ):
        ok = "max_tokens" in kw and kw["max_tokens"] == 2**63 or "top_k" in kw and kw["top_k"] == 2**70
        c.cases.append(
            {
                "id": f"api/params/{i}:{kw}",
                "family": "api",
                "expect": "any" if ok else "error",
                "runs": [],
                "api": {"op": "params", "kwargs": kw},
            }
        )
    for label, prompt in (
        ("empty", ""),
        ("ids-neg", [-1]),
        ("ids-out", [5, 10**6]),
        ("ids-float", [1.5]),
        ("ids-bool", [True]),
        ("none", None),
        ("bytes", b"hi"),
        ("list-empty", []),
        ("nested", [[1, 2]]),
        ("huge-text", "w3 " * 10000),
        ("mixed", ["a", 1]),
        ("surrogate", "w3 \ud800"),
        ("tuple-ids", (5, 6)),
        ("ids-huge", [2**70]),
        ("set", {1, 2}),
    ):
        for path in (hf, m):
            ok = label in ("nested", "tuple-ids", "list-empty")
            c.cases.append(
                {
                    "id": f"api/prompt/{label}/{Path(path).name}",
                    "family": "api",
                    "expect": "any" if ok else "error",
                    "runs": [],
                    "api": {"op": "llm", "path": path, "prompt": prompt},
                }
            )
    for label, msgs in (
        ("empty", []),
        ("not-list", "hi"),
        ("no-role", [{"content": "x"}]),
        ("bad-role", [{"role": "god", "content": "x"}]),
        ("content-int", [{"role": "user", "content": 5}]),
        ("item-str", ["hi"]),
        ("none", None),
    ):
        c.cases.append(
            {
                "id": f"api/chat/{label}",
                "family": "api",
                "expect": "error",
                "runs": [],
                "api": {"op": "chat", "path": hf, "messages": msgs},
            }
        )
    for label, mc in (
        ("0", 0),
        ("-1", -1),
        ("1", 1),
        ("65", 65),
        ("huge", 2**63),
        ("float", 64.0),
        ("str", "64"),
        ("bool", True),
        ("nan", nan),
    ):
        c.cases.append(
            {
                "id": f"api/max_context/{label}",
                "family": "api",
                "expect": "error",
                "runs": [],
                "api": {"op": "llm", "path": m, "prompt": "hello", "max_context": mc},
            }
        )
    for label, kw in (
        ("kv-0", {"kv_cache_memory": 0}),
        ("kv-neg", {"kv_cache_memory": -1}),
        ("kv-str", {"kv_cache_memory": "1G"}),
        ("kv-huge", {"kv_cache_memory": 2**62}),
        ("block-0", {"block_size": 0}),
        ("seqs-0", {"max_num_seqs": 0}),
        ("batched-0", {"max_num_batched_tokens": 0}),
        ("gpu-util-nan", {"gpu_memory_utilization": nan}),
        ("dtype-bad", {"dtype": "f64"}),
        ("device-bad", {"device": "tpu"}),
        ("quantize-bad", {"quantize": "int4"}),
        ("model-int", {"model": 5}),
        ("model-bytes", {"model": b"/nope"}),
    ):
        c.cases.append(
            {
                "id": f"api/llm/{label}",
                "family": "api",
                "expect": "error",
                "runs": [],
                "api": {"op": "llm", "path": m, "prompt": "hello", "llm_kwargs": kw},
            }
        )


# --- resources: sparse files that claim gigabytes, headers that claim millions, growth ---------------
def _sparse(p: Path, head: bytes, size: int) -> Path:
    with open(p, "wb") as f:
        f.write(head)
        f.truncate(size)
    return p


def big_gguf(p: Path, src: bytes, hidden=4096, inter=16384, layers=4, heads=32, kv=8, vocab=260, qt=1) -> Path:
    """A consistent GGUF header for a large model (F16 by default) over a sparse, all-zero data section."""
    g = Gguf(src)
    for k, v in (
        ("llama.embedding_length", hidden),
        ("llama.feed_forward_length", inter),
        ("llama.block_count", layers),
        ("llama.attention.head_count", heads),
        ("llama.attention.head_count_kv", kv),
        ("llama.rope.dimension_count", hidden // heads),
    ):
        g.set_kv(k, enc(4, v))
    hd = hidden // heads
    ts = [("token_embd.weight", [hidden, vocab], qt)]
    for i in range(layers):
        b = f"blk.{i}."
        ts += [
            (b + "attn_norm.weight", [hidden], 0),
            (b + "attn_q.weight", [hidden, heads * hd], qt),
            (b + "attn_k.weight", [hidden, kv * hd], qt),
            (b + "attn_v.weight", [hidden, kv * hd], qt),
            (b + "attn_output.weight", [heads * hd, hidden], qt),
            (b + "ffn_norm.weight", [hidden], 0),
            (b + "ffn_gate.weight", [hidden, inter], qt),
            (b + "ffn_up.weight", [hidden, inter], qt),
            (b + "ffn_down.weight", [inter, hidden], qt),
        ]
    ts += [("output_norm.weight", [hidden], 0), ("output.weight", [hidden, vocab], qt)]
    off, g.tensors, g.data = 0, [], b""
    for name, dims, t in ts:
        g.tensors.append([name.encode(), dims, t, off])
        off += -(-_tensor_nbytes([name, dims, t, 0]) // g.align) * g.align
    head = g.build()
    return _sparse(p, head, len(head) + off)


def resource_cases(c: Corpus, b: dict, fx) -> None:
    src = b["gguf"].read_bytes()
    # a large, consistent model in a sparse file: loads lazily (info), then does not fit under the
    # address-space cap when its F16 weights are converted (a clean OutOfMemoryError, not a traceback)
    c.add(
        "resources/gguf-f16-1.8GiB-sparse",
        "resources",
        big_gguf(c.new_path("resources", ".gguf"), src),
        "any",
        api=None,
        info="ok",
    )
    c.add(
        "resources/gguf-q8-1.9GiB-sparse",
        "resources",
        big_gguf(c.new_path("resources", ".gguf"), src, layers=8, qt=8),
        "any",
        api=None,
        info="ok",
    )
    # headers that claim millions of metadata elements / tensors / keys over zeros
    for label, et, n in (
        ("strings-16M", STRING, 16_000_000),
        ("u8-400M", 0, 400_000_000),
        ("nested-3M", ARRAY, 3_000_000),
        ("u64-2^27", 10, 1 << 27),
    ):
        head = (
            b"GGUF"
            + struct.pack("<IQQ", 3, 0, 2)
            + gstr(b"general.architecture")
            + enc(STRING, "llama")
            + gstr(b"x.big")
            + struct.pack("<IIQ", ARRAY, et, n)
        )
        size = len(head) + n * {STRING: 8, ARRAY: 12, 0: 1, 10: 8}[et]
        c.add(f"resources/gguf-array-{label}", "resources", _sparse(c.new_path("resources", ".gguf"), head, size))
    g = Gguf(src)
    g.set_kv("tokenizer.ggml.tokens", struct.pack("<IIQ", ARRAY, STRING, 5_000_000) + b"")
    head = g.build()[: -len(g.data)] if g.data else g.build()
    cut = head.index(struct.pack("<IIQ", ARRAY, STRING, 5_000_000)) + 16
    c.add(
        "resources/gguf-tokens-5M-empty",
        "resources",
        _sparse(c.new_path("resources", ".gguf"), head[:cut], cut + 8 * 5_000_000),
    )
    for label, nt, nkv in (
        ("tensors-65537", 65537, 1),
        ("tensors-1M", 1 << 20, 1),
        ("kv-1M", 0, 1 << 20),
        ("tensors-2^40", 1 << 40, 1),
    ):
        head = b"GGUF" + struct.pack("<IQQ", 3, nt, nkv)
        size = min(len(head) + nt * 32 + nkv * 13, 1 << 40)
        c.add(f"resources/gguf-{label}", "resources", _sparse(c.new_path("resources", ".gguf"), head, size))
    # llama2.c v1 header of a 7B model over a sparse 27 GB file: mapped lazily or refused, never read whole
    hdr = struct.pack("<Ii", 0x616B3432, 1) + struct.pack("<7i", 4096, 11008, 32, 32, 32, 32000, 2048) + b"\1"
    hdr += b"\0" * (256 - len(hdr))
    from hetinfer.loaders.llama2c import _implied_size

    size = _implied_size(1, 4096, 11008, 32, 32, 32, 32000, 2048, True, None)
    d = c.new_path("resources")
    d.mkdir()
    (d / "tokenizer.bin").write_bytes(tokenizer_bin(32000))
    c.add("resources/llama2c-7B-sparse", "resources", _sparse(d / "model.bin", hdr, size), "any", api=None)
    # safetensors header declaring 2 GiB of F32 over a sparse file
    cfg = fx.hf_config(d=dict(hidden=4096, inter=8192, layers=2, heads=32, kv=8, vocab=64, ctx=64))
    shapes = {"model.embed_tokens.weight": [64, 4096], "model.norm.weight": [4096], "lm_head.weight": [64, 4096]}
    for i in range(2):
        pre = f"model.layers.{i}."
        shapes.update(
            {
                pre + "input_layernorm.weight": [4096],
                pre + "post_attention_layernorm.weight": [4096],
                pre + "self_attn.q_proj.weight": [4096, 4096],
                pre + "self_attn.k_proj.weight": [1024, 4096],
                pre + "self_attn.v_proj.weight": [1024, 4096],
                pre + "self_attn.o_proj.weight": [4096, 4096],
                pre + "mlp.gate_proj.weight": [8192, 4096],
                pre + "mlp.up_proj.weight": [8192, 4096],
                pre + "mlp.down_proj.weight": [4096, 8192],
            }
        )
    header, off = {}, 0
    for name, shp in shapes.items():
        n = 4 * math.prod(shp)
        header[name] = {"dtype": "F32", "shape": shp, "data_offsets": [off, off + n]}
        off += n
    hb = json.dumps(header).encode()
    d = link_dir(b["hf"], c.new_path("resources"), skip=("model.safetensors", "config.json"))
    (d / "config.json").write_text(json.dumps(cfg))
    _sparse(d / "model.safetensors", struct.pack("<Q", len(hb)) + hb, 8 + len(hb) + off)
    c.add("resources/safetensors-f32-1.3GiB-sparse", "resources", d, "any", HF_PROMPT, api=None, info="ok")
    # hostile tokenizer.json: a catastrophic regex, deep nesting, text growth
    hf = b["hf"]
    tj = json.loads((hf / "tokenizer.json").read_text())
    seq = {"type": "Lowercase"}
    for _ in range(200):
        seq = {"type": "Sequence", "normalizers": [seq]}
    for label, edit, prompt in (
        (
            "regex-backtrack",
            {
                "pre_tokenizer": {
                    "type": "Split",
                    "pattern": {"Regex": "(a+)+$"},
                    "behavior": "Isolated",
                    "invert": False,
                }
            },
            "a" * 40 + "b",
        ),
        (
            "regex-backtrack-2",
            {
                "pre_tokenizer": {
                    "type": "Split",
                    "pattern": {"Regex": "(?:a|aa)*(?:a|aa)*c"},
                    "behavior": "Isolated",
                    "invert": False,
                }
            },
            "a" * 3000,
        ),
        ("nested-200", {"normalizer": seq}, HF_PROMPT),
        (
            "replace-grow",
            {"normalizer": {"type": "Replace", "pattern": {"String": "w"}, "content": "w" * 100_000}},
            HF_PROMPT,
        ),
        (
            "replace-grow-seq",
            {
                "normalizer": {
                    "type": "Sequence",
                    "normalizers": [{"type": "Replace", "pattern": {"String": "w"}, "content": "ww" * 50}] * 6,
                }
            },
            HF_PROMPT,
        ),
        (
            "regex-empty-grow",
            {
                "normalizer": {
                    "type": "Sequence",
                    "normalizers": [{"type": "Replace", "pattern": {"Regex": ""}, "content": "x" * 40}] * 4,
                }
            },
            HF_PROMPT,
        ),
        ("prepend-huge", {"normalizer": {"type": "Prepend", "prepend": "x" * 10_000_000}}, HF_PROMPT),
        (
            "decoder-grow",
            {"decoder": {"type": "Replace", "pattern": {"String": "w"}, "content": "w" * 1_000_000}},
            HF_PROMPT,
        ),
        (
            "ok-replace",
            {
                "normalizer": {
                    "type": "Sequence",
                    "normalizers": [
                        {"type": "Prepend", "prepend": "\u2581"},
                        {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
                    ],
                }
            },
            HF_PROMPT,
        ),
    ):
        d = link_dir(hf, c.new_path("resources"), skip=("tokenizer.json",))
        (d / "tokenizer.json").write_text(json.dumps(dict(tj, **edit)))
        c.add(
            f"resources/tokenizer-{label}",
            "resources",
            d,
            "any" if label.startswith("ok") or label == "regex-backtrack-2" else "error",
            prompt,
            info="any" if label.startswith("regex") else None,
        )
    # prompts far longer than the context, from stdin and argv
    G = ["--max-context", "64", "--kv-cache-memory", KV, "-n", "4"]
    for label, model, data in (
        ("hf-60MB", hf, b"w3 " * 20_000_000),
        ("gguf-8MB", b["gguf"], b"hello " * 1_400_000),
        ("gguf-300KB-dense", b["gguf"], b" " * 300_000),
        ("gguf-200KB", b["gguf"], b"hi" * 100_000),
    ):
        c.add(
            f"resources/prompt-{label}",
            "resources",
            None,
            "error",
            runs=[("generate", ["generate", "-", "--model", str(model), *G], data)],
            api=None,
        )
    c.add(
        "resources/chat-line-10MB",
        "resources",
        None,
        "any",
        runs=[("chat", ["chat", "--model", str(hf), *G], b"w3 " * 3_500_000 + b"\n/exit\n")],
        api=None,
    )
    c.cases.append(
        {
            "id": "resources/api-prompt-8MB",
            "family": "resources",
            "expect": "error",
            "runs": [],
            "api": {"op": "llm", "path": str(b["gguf"]), "prompt": "hello " * 1_400_000},
        }
    )


# ---- running ------------------------------------------------------------------------------------------
_WARM = False


def warm() -> None:
    """Worker initializer: import what the CLI imports, without running a model (no BLAS or
    OpenMP thread pools exist before a fork)."""
    global _WARM
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ.setdefault("HETINFER_CPU_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import gguf.quants  # noqa: F401
    import jinja2  # noqa: F401
    import tokenizers  # noqa: F401
    import tqdm  # noqa: F401

    import hetinfer  # noqa: F401
    import hetinfer.api  # noqa: F401
    import hetinfer.chat  # noqa: F401
    import hetinfer.chat_template  # noqa: F401
    import hetinfer.engine  # noqa: F401
    import hetinfer.loaders.gguf_file  # noqa: F401
    import hetinfer.loaders.int8_dir  # noqa: F401
    import hetinfer.loaders.llama2c  # noqa: F401
    import hetinfer.loaders.safetensors_hf  # noqa: F401
    import hetinfer.streaming  # noqa: F401
    from hetinfer import cli, plugins

    cli.build_parser()
    plugins.models()
    _WARM = True


def _child_streams() -> None:
    import io

    enc = "utf-8"
    sys.stdin = io.TextIOWrapper(
        io.BufferedReader(io.FileIO(0, "r", closefd=False)), encoding=enc, errors="surrogateescape"
    )
    sys.stdout = io.TextIOWrapper(
        io.BufferedWriter(io.FileIO(1, "w", closefd=False)), encoding=enc, errors="surrogateescape"
    )
    sys.stderr = io.TextIOWrapper(
        io.BufferedWriter(io.FileIO(2, "w", closefd=False)),
        encoding=enc,
        errors="backslashreplace",
        line_buffering=True,
    )


def _fork_run(target, stdin: bytes | None, timeout: float, mem: int, workdir: Path):
    """Run target() in a forked child with RLIMIT_AS, stdio redirected to files and faulthandler
    on; -> (returncode or -signal, stdout, stderr, timed_out, seconds)."""
    import faulthandler
    import resource
    import traceback

    fin, fout, ferr = workdir / "in", workdir / "out", workdir / "err"
    fin.write_bytes(stdin or b"")
    sys.stdout.flush()
    sys.stderr.flush()
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setpgid(0, 0)
            resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
            fd = os.open(fin, os.O_RDONLY)
            os.dup2(fd, 0)
            fd = os.open(fout, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            fd = os.open(ferr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 2)
            _child_streams()
            faulthandler.enable(file=sys.stderr, all_threads=True)
            try:
                from multiprocessing import resource_tracker

                resource_tracker.register = resource_tracker.unregister = lambda *a, **k: None
            except ImportError:
                pass
            try:
                r = target()
                code = 0 if r is None else r if isinstance(r, int) else 1
            except SystemExit as e:
                if e.code is None:
                    code = 0
                elif isinstance(e.code, int):
                    code = e.code
                else:
                    print(e.code, file=sys.stderr)
                    code = 1
            except KeyboardInterrupt:
                traceback.print_exc()
                code = 130
            except BaseException:  # noqa: BLE001 - what the interpreter would print
                traceback.print_exc()
                code = 1
            try:
                sys.stdout.flush()
            except BaseException:  # noqa: BLE001
                traceback.print_exc()
                code = 120
            sys.stderr.flush()
        finally:
            os._exit(code & 0xFF)
    timed_out = False
    while True:
        wpid, status = os.waitpid(pid, os.WNOHANG)
        if wpid:
            break
        if time.monotonic() - t0 > timeout:
            timed_out = True
            try:
                os.killpg(pid, signal.SIGABRT)  # faulthandler dumps the stacks
                time.sleep(1.0)
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _, status = os.waitpid(pid, 0)
            break
        time.sleep(0.005)
    rc = os.waitstatus_to_exitcode(status)
    return rc, fout.read_bytes(), ferr.read_bytes(), timed_out, time.monotonic() - t0


def _exec_run(argv: list, stdin: bytes | None, timeout: float, mem: int):
    import resource
    import subprocess

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))

    t0 = time.monotonic()
    cmd = [
        sys.executable,
        "-X",
        "faulthandler",
        "-m",
        "hetinfer",
        *[a if isinstance(a, bytes) else a.encode() for a in argv],
    ]
    p = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=limit,
        start_new_session=True,
    )
    try:
        out, err = p.communicate(stdin or b"", timeout=timeout)
        return p.returncode, out, err, False, time.monotonic() - t0
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGABRT)
        time.sleep(1.0)
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        return p.returncode, out, err, True, time.monotonic() - t0


def classify(rc: int, err: bytes, timed_out: bool, expect: str) -> str:
    e = err.decode("utf-8", "replace")
    if timed_out:
        return "hang"
    memory = (
        "MemoryError" in e
        or "Unable to allocate" in e
        or "std::bad_alloc" in e
        or "Cannot allocate memory" in e
        and "hetinfer: error:" not in e
    )
    if "Traceback (most recent call last)" in e or "Fatal Python error" in e:
        if memory:
            return "memory"
        return "crash" if "Fatal Python error" in e else "traceback"
    if rc == -signal.SIGKILL:
        return "memory"
    if rc < 0:
        return "crash"
    if rc == 0:
        return "suspicious" if expect == "error" else "ok"
    lines = [ln for ln in e.splitlines() if ln.strip()]
    errors = [
        ln for ln in lines if ln.startswith("hetinfer: error: ") or (": error: " in ln and ln.startswith("hetinfer"))
    ]
    if len(errors) == 1 and rc != 0:  # (an OutOfMemoryError with its numbers is a clean error too)
        return "refused-ok" if expect == "ok" else "error"
    return "memory" if memory else "other"


def _error_line(err: bytes) -> str:
    e = err.decode("utf-8", "replace")
    lines = [ln for ln in e.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "error" in ln.lower() or "Error" in ln:
            return ln[:300]
    return (lines[-1] if lines else "")[:300]


def run_case(case: dict, mode: str, timeout: float, mem: int, tmp: str) -> list[dict]:
    """-> one result per run: {id, run, cls, rc, secs, err (the telling line), tail}."""
    if mode != "exec" and not _WARM:
        warm()
    work = Path(tempfile.mkdtemp(dir=tmp))
    out = []
    try:
        if mode == "api":
            if case.get("api"):
                out.append(_api_result(case, timeout, mem, work))
            return out
        from hetinfer import cli

        for run in case["runs"]:
            label, argv, stdin = run[:3]
            expect = run[3] if len(run) > 3 else case["expect"]
            if mode == "exec":
                rc, so, se, to, secs = _exec_run(argv, stdin, timeout, mem)
            else:
                args = [os.fsdecode(a) if isinstance(a, bytes) else a for a in argv]

                def target(args=args):
                    sys.argv = ["hetinfer", *args]
                    return cli.main(args)

                rc, so, se, to, secs = _fork_run(target, stdin, timeout, mem, work)
            cls = classify(rc, se, to, expect)
            if (
                cls == "suspicious"
                and label == "chat"
                and re.search(rb"^> \[(the chat template|the message)", so, re.M)
            ):
                cls = "error"  # chat prints a refused message as a notice and goes on
            out.append(
                {
                    "id": case["id"],
                    "run": label,
                    "cls": cls,
                    "rc": rc,
                    "secs": round(secs, 2),
                    "err": _error_line(se),
                    "tail": se.decode("utf-8", "replace")[-3000:] if cls in BAD + ("other",) else "",
                }
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def api_call(spec: dict):
    """The in-process API path of one case: returns normally, or raises what hetinfer raised."""
    import numpy as np  # noqa: F401

    import hetinfer
    from hetinfer.loaders import load_checkpoint

    op = spec["op"]
    if op == "params":
        return hetinfer.SamplingParams(**spec["kwargs"])
    if op == "load":
        return load_checkpoint(spec["path"], progress=False).summary()
    kw = dict(model=spec["path"], max_context=spec.get("max_context", 64), kv_cache_memory=16 << 20)
    kw.update(spec.get("llm_kwargs", {}))
    if "max_context" in spec:
        kw["max_context"] = spec["max_context"]
    if op == "llm" and isinstance(kw["model"], str) and kw["model"]:
        try:
            exists = os.path.lexists(kw["model"])
        except (OSError, ValueError):
            exists = False
        if exists:  # what `hetinfer info` does, then the LLM
            load_checkpoint(kw["model"], progress=False).summary()
    llm = hetinfer.LLM(**kw)
    if op == "chat":
        return llm.chat(spec["messages"], hetinfer.SamplingParams(max_tokens=4)).text
    out = llm.generate(spec["prompt"], hetinfer.SamplingParams(max_tokens=4))
    return [o.text for o in out]


def _api_result(case: dict, timeout: float, mem: int, work: Path) -> dict:
    spec = case["api"]
    res = work / "api.json"

    def target():
        import traceback

        from hetinfer.errors import HetinferError

        try:
            api_call(spec)
            r = {"status": "ok"}
        except HetinferError as e:
            r = {"status": "error", "exc": type(e).__name__, "msg": str(e)[:300]}
        except BaseException as e:  # noqa: BLE001
            r = {
                "status": "memory" if isinstance(e, MemoryError) else "traceback",
                "exc": type(e).__name__,
                "msg": str(e)[:300],
                "tb": traceback.format_exc()[-3000:],
            }
        res.write_text(json.dumps(r))
        return 0

    rc, so, se, to, secs = _fork_run(target, None, timeout, mem, work)
    if to:
        cls, r = "hang", {"tb": se.decode("utf-8", "replace")[-3000:]}
    elif not res.exists():
        cls, r = ("memory" if rc == -signal.SIGKILL else "crash"), {"tb": se.decode("utf-8", "replace")[-3000:]}
    else:
        r = json.loads(res.read_text())
        cls = r["status"]
        if cls == "ok" and case["expect"] == "error":
            cls = "suspicious"
        elif cls == "error" and case["expect"] == "ok":
            cls = "refused-ok"
    return {
        "id": case["id"],
        "run": "api:" + spec["op"],
        "cls": cls,
        "rc": rc,
        "secs": round(secs, 2),
        "err": (f"{r.get('exc')}: {r.get('msg')}" if r.get("exc") else "")[:300],
        "tail": r.get("tb", ""),
    }


def _run_chunk(chunk, mode, timeout, mem, tmp):
    out = []
    for case in chunk:
        out += run_case(case, mode, timeout, mem, tmp)
    return out


def sweep(
    cases: list[dict], mode: str, jobs: int, timeout: float, mem: int, tmp: str, progress: bool = True
) -> list[dict]:
    import concurrent.futures as cf
    import multiprocessing as mp

    results = []
    chunks = [cases[i : i + 8] for i in range(0, len(cases), 8)]
    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=None if mode == "exec" else warm) as ex:
        futs = [ex.submit(_run_chunk, ch, mode, timeout, mem, tmp) for ch in chunks]
        done = 0
        for f in cf.as_completed(futs):
            results += f.result()
            done += 1
            if progress and done % 20 == 0:
                print(f"  {mode}: {done}/{len(chunks)} chunks", file=sys.stderr, flush=True)
    order = {c["id"]: i for i, c in enumerate(cases)}
    results.sort(key=lambda r: (order.get(r["id"], 0), r["run"]))
    return results


def report(
    results: list[dict], mode: str, examples: int = 4, show: set | None = None, secs: float = 0.0, n_cases: int = 0
) -> dict:
    counts = {k: 0 for k in CLASSES}
    by = {k: [] for k in CLASSES}
    for r in results:
        counts[r["cls"]] = counts.get(r["cls"], 0) + 1
        by.setdefault(r["cls"], []).append(r)
    for k in CLASSES:
        if not counts.get(k):
            continue
        ex = [{"id": r["id"], "run": r["run"], "err": r["err"]} for r in by[k][:examples]]
        print(json.dumps({"mode": mode, "class": k, "count": counts[k], "examples": ex}, ensure_ascii=False))
        if show and k in show:
            for r in by[k]:
                print(f"--- {r['id']} [{r['run']}] rc={r['rc']}\n{r['tail'] or r['err']}", file=sys.stderr)
    summary = {
        "mode": mode,
        "summary": True,
        "cases": n_cases,
        "runs": len(results),
        "seconds": round(secs, 1),
        **{k: counts.get(k, 0) for k in CLASSES},
    }
    print(json.dumps(summary))
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=TIMEOUT_S)
    ap.add_argument("--mem-gib", type=float, default=MEM_BYTES / 2**30)
    ap.add_argument(
        "--only", default=None, help="comma-separated families: " + "gguf,hf,int8,llama2c,paths,template,flags,api,resources"
    )
    ap.add_argument("--match", default=None, help="only cases whose id contains this")
    ap.add_argument("--sample", type=int, default=None, help="a seeded sample of this many cases")
    ap.add_argument("--modes", default="cli,api", help="cli, exec, api (comma-separated)")
    ap.add_argument("--show", default="", help="classes whose every case is printed with its stderr tail")
    ap.add_argument("--keep", default=None, help="build the corpus here and keep it")
    ap.add_argument("--jsonl", default=None, help="write every result to this file")
    a = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ.setdefault("HETINFER_CPU_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tmp = a.keep or tempfile.mkdtemp(prefix="hetinfer-fuzz-")
    try:
        t0 = time.monotonic()
        only = set(a.only.split(",")) if a.only else None
        cases = build(Path(tmp) / "corpus", a.seed, only)
        if a.match:
            cases = [c for c in cases if a.match in c["id"]]
        if a.sample and a.sample < len(cases):
            cases = random.Random(a.seed).sample(cases, a.sample)
        print(
            json.dumps(
                {
                    "corpus": len(cases),
                    "build_seconds": round(time.monotonic() - t0, 1),
                    "families": {f: sum(c["family"] == f for c in cases) for f in sorted({c["family"] for c in cases})},
                }
            ),
            flush=True,
        )
        runs_tmp = Path(tmp) / "runs"
        runs_tmp.mkdir(exist_ok=True)
        mem = int(a.mem_gib * 2**30)
        show = set(a.show.split(",")) if a.show else set()
        bad = 0
        allres = []
        for mode in a.modes.split(","):
            t1 = time.monotonic()
            res = sweep(cases, "fork" if mode == "cli" else mode, a.jobs, a.timeout, mem, str(runs_tmp))
            s = report(
                res,
                mode,
                show=show,
                secs=time.monotonic() - t1,
                n_cases=sum(bool(c["runs"]) if mode != "api" else bool(c.get("api")) for c in cases),
            )
            bad += sum(s[k] for k in BAD)
            allres += [dict(r, mode=mode) for r in res]
        if a.jsonl:
            with open(a.jsonl, "w") as f:
                for r in allres:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
        return 1 if bad else 0
    finally:
        if not a.keep:
            _chmod_all(Path(tmp))
            shutil.rmtree(tmp, ignore_errors=True)


def _chmod_all(root: Path) -> None:
    """Undo the unreadable-file cases so the corpus can be removed."""
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            try:
                if not os.path.islink(p) and stat.S_IMODE(os.lstat(p).st_mode) == 0:
                    os.chmod(p, 0o700)
            except OSError:
                pass
    for dirpath, dirnames, _ in os.walk(root):
        for n in dirnames:
            p = os.path.join(dirpath, n)
            try:
                if not os.path.islink(p) and stat.S_IMODE(os.lstat(p).st_mode) == 0:
                    os.chmod(p, 0o700)
            except OSError:
                pass


if __name__ == "__main__":
    sys.exit(main())
