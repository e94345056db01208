"""Tokenizer: text <-> token ids, from tokenizer.json, tokenizer.model or a GGUF's vocabulary.

Backends:
- ``tokenizers.Tokenizer`` for tokenizer.json and for GGUF vocabularies, rebuilt the way
  transformers converts them (transformers/integrations/gguf/gguf_tokenizer_mapping.py):
  ``gpt2`` -> byte-level BPE with the file's merges and the split regex named by
  tokenizer.ggml.pre; ``llama`` -> SentencePiece-style BPE with byte fallback, merges derived
  from the scores, Metaspace (prepend to the first section only).
  Control (type 3) and user-defined (type 4) tokens are added so they match whole.
- ``sentencepiece.SentencePieceProcessor`` for tokenizer.model (llama2.c, old HF repos).

``encode`` never lets the backend add special tokens; it prepends BOS itself when ``add_bos``
(default: what the model's tokenizer config says). ``StreamDecoder`` turns ids into text
incrementally.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from pathlib import Path
from typing import Iterable

from .errors import InputError, LoadError
from .loaders.files import MAX_TOKENIZER_BYTES, read_bytes, read_json, read_text

GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> split regex; absent ("smollm", "gpt2", "default", ...) -> ByteLevel's GPT-2 regex
PRE_TOKENIZER_SPLITS = {
    "llama3": LLAMA3_SPLIT, "llama-v3": LLAMA3_SPLIT, "llama-bpe": LLAMA3_SPLIT, "smaug-bpe": LLAMA3_SPLIT,
    "dbrx": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT, "deepseek-r1-qwen": QWEN2_SPLIT,
}
IGNORE_MERGES_PRE = ("llama3", "llama-v3", "llama-bpe")
GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def generate_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two vocabulary
    pieces, best score first (ties: shorter left, shorter right), as transformers does."""
    merges = []
    for token, score in scores.items():
        local = [(token[:i], token[i:], score) for i in range(1, len(token))
                 if token[:i] in vocab and token[i:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def token_ids(d: dict, key: str, where, vocab=None, limit: int | None = None) -> list[int]:
    """d[key] as a list of token ids (absent/null: none; an id; a list of ids), each below
    ``limit`` (the ids of the tokenizer file ``vocab``) when given; else LoadError naming the file
    ``where``."""
    v = d.get(key)
    ids = [] if v is None else v if isinstance(v, list) else [v]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise LoadError(f"{where}: {key} is {str(v)[:60]}; expected a non-negative integer token id or a list of them")
    for i in ids:
        if limit is not None and i >= limit:
            raise LoadError(f"{where}: {key} {i} is outside the vocabulary of {vocab} (ids 0..{limit - 1})")
    return ids


_SHORT_TEXT = 1 << 16      # characters: a text this short is tokenized without the length checks


def valid_text(text) -> str:
    """text itself if it is a str the tokenizer can encode; InputError for another type or a
    lone surrogate (which Python strings can hold and UTF-8 cannot: the tokenizers library would
    raise a TypeError)."""
    if not isinstance(text, str):
        raise InputError(f"text to encode must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"the text holds a lone surrogate (U+{ord(text[e.start]):04X}) at character {e.start}, "
                         "which is not valid Unicode; expected text that encodes as UTF-8") from None
    return text


MAX_TEXT_GROWTH = 64          # characters a normalizer (or decoder) may make of one
MAX_INSERTED = 4096           # characters a Prepend / Append / Replace step may insert at once


def _growth(node, where: str) -> float:
    """An upper bound of the characters a normalizer / decoder JSON node makes of one character:
    Replace makes len(content) of each match (a regex may match the empty string: 1 + that),
    Sequence multiplies its steps; Prepend / Append add a constant (bounded by MAX_INSERTED);
    Unicode normalizations (NFKC expands a character to at most 18, once: it is idempotent) and
    everything else count 1."""
    if isinstance(node, list):
        return math.prod(_growth(n, where) for n in node)
    if not isinstance(node, dict):
        return 1.0
    kind = node.get("type")
    if kind == "Sequence":
        return math.prod(_growth(n, where) for n in (node.get("normalizers") or node.get("decoders") or []))
    for key in ("content", "prepend", "append"):
        v = node.get(key)
        if isinstance(v, str) and len(v) > MAX_INSERTED:
            raise ValueError(f"its {where} {kind} step inserts {len(v)} characters at a time (at most {MAX_INSERTED})")
    if kind == "Replace":
        pattern, content = node.get("pattern") or {}, node.get("content") or ""
        if isinstance(pattern, dict) and isinstance(pattern.get("String"), str) and pattern["String"]:
            return max(1.0, len(content) / len(pattern["String"]))
        return 1.0 + len(content)
    return 1.0


def check_growth(tok, path) -> None:
    """LoadError for a tokenizer.json whose normalizer or decoder can grow text more than
    MAX_TEXT_GROWTH-fold (e.g. Replace 'w' -> 100000 characters): the tokenizers library would
    allocate that much for every prompt or output and, out of memory, abort the process (Rust
    aborts on a failed allocation: no Python exception). Ordinary tokenizers replace one
    character by one (' ' -> '\u2581')."""
    import json
    for where, part in (("normalizer", tok.normalizer), ("decoder", tok.decoder)):
        if part is None:
            continue
        try:
            node = json.loads(part.__getstate__())
            g = _growth(node, where)
        except ValueError as e:
            raise LoadError(f"{path}: {e}; expected a tokenizer that does not grow text") from None
        except Exception:           # noqa: BLE001 - a part the library cannot serialize: nothing to check
            continue
        if g > MAX_TEXT_GROWTH:
            raise LoadError(f"{path}: its {where} can make up to {g:.0f} characters of one (Replace steps); "
                            f"expected at most {MAX_TEXT_GROWTH}: it would exhaust memory on ordinary text")


def hf_id_limit(tok) -> int:
    """One more than the largest id of a tokenizers.Tokenizer, added tokens included."""
    return max(tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1


class _HFBackend:
    """A tokenizers.Tokenizer."""

    def __init__(self, tok, id_limit: int | None = None):
        self.tok = tok
        self._limit = id_limit           # known by the builder (a GGUF vocabulary: its length)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special: bool) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special)

    def id_to_piece(self, i: int) -> str:
        p = self.tok.id_to_token(i)
        if p is None:
            raise IndexError(f"token id {i} is out of range (vocab size {self.vocab_size()})")
        return p

    def piece_to_id(self, piece: str):
        return self.tok.token_to_id(piece)

    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def id_limit(self) -> int:
        if self._limit is None:        # a dict of the whole vocabulary: once
            self._limit = hf_id_limit(self.tok)
        return self._limit


class _SPBackend:
    """A sentencepiece model; control pieces (<s>, </s>, ...) in the text are matched whole."""

    def __init__(self, sp):
        self.sp = sp
        n = sp.get_piece_size()
        self.control = {i for i in range(n) if sp.is_control(i)}
        pieces = sorted((sp.id_to_piece(i) for i in self.control if sp.id_to_piece(i)), key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, pieces)) + ")") if pieces else None

    def encode(self, text: str) -> list[int]:
        if self._split is None:
            return self.sp.encode(text)
        out: list[int] = []
        for k, part in enumerate(self._split.split(text)):
            if k % 2:
                out.append(self.sp.piece_to_id(part))
            elif part:
                out += self.sp.encode(part)
        return out

    def decode(self, ids: list[int], skip_special: bool) -> str:
        out, run = [], []
        for i in ids:
            if i in self.control:
                if run:
                    out.append(self.sp.decode(run))
                    run = []
                if not skip_special:
                    out.append(self.sp.id_to_piece(i))
            else:
                run.append(i)
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)

    def id_to_piece(self, i: int) -> str:
        if not 0 <= i < self.sp.get_piece_size():
            raise IndexError(f"token id {i} is out of range (vocab size {self.sp.get_piece_size()})")
        return self.sp.id_to_piece(i)

    def piece_to_id(self, piece: str):
        i = self.sp.piece_to_id(piece)
        return None if i == self.sp.unk_id() and piece != self.sp.id_to_piece(i) else i

    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def id_limit(self) -> int:
        return self.sp.get_piece_size()


class Tokenizer:
    """Text <-> ids. Attributes: ``bos_id`` (int | None), ``eos_ids`` (list[int]), ``vocab_size``,
    ``special_ids`` (frozenset of control/special token ids), ``add_bos`` (the default of encode)."""

    def __init__(self, backend, *, bos_id: int | None, eos_ids: Iterable[int], add_bos: bool,
                 special_ids: Iterable[int], kind: str, source=None):
        self._b = backend
        self.source = source          # the file it was read from (None: built in memory)
        limit = backend.id_limit()
        for what, ids in (("bos token id", [] if bos_id is None else [bos_id]), ("eos token id", list(eos_ids))):
            for i in ids:
                if not (isinstance(i, numbers.Integral) and not isinstance(i, bool) and 0 <= i < limit):
                    raise LoadError(f"{source or 'tokenizer'}: {what} {i!r} is outside the vocabulary; expected an "
                                    f"id in 0..{limit - 1}")
        self.bos_id = None if bos_id is None else int(bos_id)
        self.eos_ids = list(dict.fromkeys(int(e) for e in eos_ids))
        self.add_bos = bool(add_bos) and self.bos_id is not None
        self.special_ids = frozenset(int(i) for i in special_ids)
        self.kind = kind
        self._longest = None          # bytes of the longest vocabulary entry (_longest_piece)

    # ---- use ----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._b.vocab_size()

    @property
    def id_limit(self) -> int:
        """One more than the largest id the tokenizer can produce (the embedding rows it needs)."""
        return self._b.id_limit()

    def encode(self, text: str, add_bos: bool | None = None, max_tokens: int | None = None) -> list[int]:
        """Ids of ``text``; special tokens written in the text match whole. BOS is prepended when
        ``add_bos`` (None: the tokenizer config's default). With ``max_tokens`` (a context), a text
        that certainly has more tokens is refused (InputError) before it is tokenized whole: the
        tokenizers library spends ~1 s and ~150 bytes of memory per byte of input (a 64 MiB
        prompt: 80 s and 10 GB), and a prompt longer than the context is refused anyway."""
        text = valid_text(text)
        if max_tokens is not None and len(text) > _SHORT_TEXT:
            self._refuse_longer_than(text, max_tokens)
        ids = self._run("encode", self._b.encode, text)
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        return ids

    def _run(self, what: str, fn, arg) -> list:
        """fn(arg) with whatever the backend raises (a bare Exception, or a Rust panic, which
        pyo3 raises as a BaseException: e.g. a regex of the tokenizer file past its retry
        limit) as one InputError naming the tokenizer."""
        try:
            return list(fn(arg)) if what == "encode" else fn(*arg)
        except Exception as e:                       # noqa: BLE001
            why = e
        except BaseException as e:                   # noqa: BLE001 - pyo3's PanicException only
            if type(e).__name__ != "PanicException":
                raise
            why = e
        raise InputError(f"the tokenizer ({self.source or self.kind}) failed to {what} the text: "
                         f"{type(why).__name__}: {str(why).strip()[:200]}") from None

    def _refuse_longer_than(self, text: str, max_tokens: int) -> None:
        """InputError when text has more than max_tokens tokens, found without tokenizing it
        whole: more UTF-8 bytes than 2 x max_tokens x the longest vocabulary entry, or a prefix
        (cut at whitespace) that alone has more than max_tokens + 64 tokens."""
        n_bytes = len(text.encode("utf-8"))
        longest = self._longest_piece()
        if n_bytes > 2 * max_tokens * longest:
            raise InputError(f"the prompt is {n_bytes} bytes; no token of this vocabulary covers more than {longest}, "
                             f"so it has more tokens than the context ({max_tokens}); shorten it")
        cut = 16 * (max_tokens + 64)
        if len(text) > cut:
            space = max(text.rfind(" ", cut - 4096, cut), text.rfind("\n", cut - 4096, cut))
            prefix = text[:space if space > 0 else cut]
            n = len(self._run("encode", self._b.encode, prefix))
            if n > max_tokens + 64:
                raise InputError(f"the prompt has more tokens than the context ({max_tokens}): its first "
                                 f"{len(prefix)} characters alone are {n} tokens; shorten it")

    def _longest_piece(self) -> int:
        """Bytes of the longest vocabulary entry (added tokens included), as UTF-8; cached."""
        if self._longest is None:
            b = self._b
            if isinstance(b, _HFBackend):
                pieces = b.tok.get_vocab(with_added_tokens=True)
            else:
                pieces = (b.id_to_piece(i) for i in range(b.vocab_size()))
            self._longest = max((len(p.encode("utf-8", "surrogatepass")) for p in pieces), default=1) or 1
        return self._longest

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of ``ids`` (special tokens written out unless ``skip_special``)."""
        return self._run("decode", self._b.decode, ([int(i) for i in ids], skip_special))

    def id_to_piece(self, i: int) -> str:
        """The vocabulary entry of id ``i`` as stored (e.g. 'Ġthe', '▁the', '<0x0A>')."""
        return self._b.id_to_piece(int(i))

    def piece_to_id(self, piece: str) -> int | None:
        return self._b.piece_to_id(piece)

    def stream_decoder(self, skip_special: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, skip_special)

    def __repr__(self) -> str:
        return (f"Tokenizer({self.kind}, vocab={self.vocab_size}, bos={self.bos_id}, eos={self.eos_ids}, "
                f"add_bos={self.add_bos})")

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_sentencepiece(cls, path, add_bos: bool = True, eos_ids: Iterable[int] = ()) -> "Tokenizer":
        """A SentencePiece tokenizer.model."""
        import sentencepiece as spm
        path = Path(path)
        data = read_bytes(path, "tokenizer.model", MAX_TOKENIZER_BYTES)
        try:
            sp = spm.SentencePieceProcessor(model_proto=data)
            n = sp.get_piece_size()
        except (OSError, RuntimeError, ValueError, TypeError) as e:
            raise LoadError(f"{path}: not a valid SentencePiece tokenizer.model ({str(e).strip()[:200]})") from None
        if n <= 0:
            raise LoadError(f"{path}: not a valid SentencePiece tokenizer.model (it holds no pieces)")
        if not isinstance(add_bos, bool):
            raise LoadError(f"{path.parent / 'tokenizer_config.json'}: add_bos_token is {add_bos!r}; expected true "
                            "or false")
        b = _SPBackend(sp)
        bos = sp.bos_id() if sp.bos_id() >= 0 else None
        eos = ([sp.eos_id()] if sp.eos_id() >= 0 else []) + list(eos_ids)
        return cls(b, bos_id=bos, eos_ids=eos, add_bos=add_bos, special_ids=b.control, kind="sentencepiece",
                   source=path)

    @classmethod
    def from_tokenizer_json(cls, path, tokenizer_config: dict | None = None, config: dict | None = None,
                            generation_config: dict | None = None) -> "Tokenizer":
        """A tokenizers tokenizer.json plus the HF tokenizer_config.json / config.json /
        generation_config.json dicts. LoadError (naming the file) for a file the tokenizers library
        rejects, special tokens it does not hold, or ids outside its vocabulary."""
        from tokenizers import Tokenizer as HFTok
        path = Path(path)
        text = read_text(path, "tokenizer.json", MAX_TOKENIZER_BYTES)
        try:
            tok = HFTok.from_str(text)
        except Exception as e:  # tokenizers raises a bare Exception (bad JSON, a merge of unknown tokens, ...)
            raise LoadError(f"{path}: not a valid tokenizer.json ({str(e)[:300]})") from None
        check_growth(tok, path)
        tc, config, gc = tokenizer_config or {}, config or {}, generation_config or {}
        tc_path = path.parent / "tokenizer_config.json"
        special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        atd = tc.get("added_tokens_decoder") or {}
        if not isinstance(atd, dict):
            raise LoadError(f"{tc_path}: added_tokens_decoder is a JSON {type(atd).__name__}; expected an object "
                            "{id: token}")
        for i, t in atd.items():
            if not (i.isascii() and i.isdigit() and isinstance(t, dict)):
                raise LoadError(f"{tc_path}: added_tokens_decoder entry {i[:40]!r}: {str(t)[:60]} is not "
                                "\"<id>\": {\"content\": ..., \"special\": ...}")
            if t.get("special"):
                special.add(int(i))

        def tid(key):
            v = tc.get(key)
            if isinstance(v, dict):
                v = v.get("content")
            if v is None:
                return None
            if not isinstance(v, str):
                raise LoadError(f"{tc_path}: {key} is {str(v)[:60]!r}; expected a token string or null")
            i = tok.token_to_id(v)
            if i is None:
                raise LoadError(f"{tc_path}: {key} {v[:60]!r} is not in the vocabulary of {path}")
            return i

        limit = hf_id_limit(tok)
        cfg_path, gc_path = path.parent / "config.json", path.parent / "generation_config.json"
        bos = tid("bos_token")
        if bos is None:
            bos = next(iter(token_ids(config, "bos_token_id", cfg_path, path, limit)), None)
        eos = [] if (e := tid("eos_token")) is None else [e]
        eos += token_ids(config, "eos_token_id", cfg_path, path, limit)
        eos += token_ids(gc, "eos_token_id", gc_path, path, limit)
        if "add_bos_token" in tc:
            add_bos = tc["add_bos_token"]
            if not isinstance(add_bos, bool):
                raise LoadError(f"{tc_path}: add_bos_token is {add_bos!r}; expected true or false")
        else:  # what the post-processor does
            with_sp = tok.encode("a", add_special_tokens=True).ids
            without = tok.encode("a", add_special_tokens=False).ids
            add_bos = bos is not None and len(with_sp) > len(without) and with_sp[0] == bos
        return cls(_HFBackend(tok), bos_id=bos, eos_ids=eos, add_bos=add_bos, special_ids=special,
                   kind="tokenizers", source=path)

    @classmethod
    def from_hf_dir(cls, path, config: dict | None = None) -> "Tokenizer | None":
        """tokenizer.json (preferred) or tokenizer.model of an HF directory; None if it has neither."""
        path = Path(path)

        def js(name):
            p = path / name
            return read_json(p, name) if os.path.lexists(p) else {}

        tc, gc = js("tokenizer_config.json"), js("generation_config.json")
        config = config if config is not None else js("config.json")
        # lexists: a dangling symlink or a symlink loop is a LoadError from the reader, not "absent"
        if os.path.lexists(path / "tokenizer.json"):
            return cls.from_tokenizer_json(path / "tokenizer.json", tc, config, gc)
        if os.path.lexists(path / "tokenizer.model"):
            tok = cls.from_sentencepiece(path / "tokenizer.model", add_bos=tc.get("add_bos_token", True))
            extra = token_ids(config, "eos_token_id", path / "config.json", path / "tokenizer.model", tok.id_limit)
            tok.eos_ids = list(dict.fromkeys(tok.eos_ids + extra))
            return tok
        return None

    @classmethod
    def from_gguf(cls, path) -> "Tokenizer":
        """The vocabulary embedded in a GGUF file."""
        from .loaders.gguf_file import read_gguf
        meta, _, _ = read_gguf(Path(path))
        return cls.from_gguf_metadata(meta, path)

    @classmethod
    def from_gguf_metadata(cls, meta: dict, path="<gguf>") -> "Tokenizer":
        """Build from GGUF ``tokenizer.ggml.*`` metadata (parsed values). Every field is type-
        and length-checked first (gguf_meta.vocab_fields), and whatever the ``tokenizers`` library
        raises while building is one LoadError naming the file."""
        from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
        from tokenizers import Tokenizer as HFTok

        from .errors import HetinferError
        from .loaders.gguf_meta import vocab_fields

        f = vocab_fields(meta, path)
        model, tokens, types = f["model"], f["tokens"], f["types"]
        try:
            if model == "gpt2":
                spelling = bytes_to_unicode()
                alphabet = set(spelling.values())
                if set("".join(tokens)) <= alphabet:        # the usual case: already byte-level spelt
                    vocab = dict(zip(tokens, range(len(tokens))))
                else:
                    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
                             for i, t in enumerate(tokens)}
                # llama.cpp's LLAMA3 pre-type (and Llama 3's tokenizer.json) sets ignore_merges: a
                # pre-token that is itself in the vocabulary is one token, whatever the merges say
                ignore = f["pre"] in IGNORE_MERGES_PRE
                tok = HFTok(models.BPE(vocab=vocab, merges=f["merges"] or [], dropout=None,
                                       continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                                       ignore_merges=ignore))
                split = PRE_TOKENIZER_SPLITS.get(f["pre"])
                if split is None:
                    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
                else:
                    tok.pre_tokenizer = pre_tokenizers.Sequence([
                        pre_tokenizers.Split(Regex(split), behavior="isolated"),
                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
                tok.decoder = decoders.ByteLevel()
                control_ok = lambda t: set(t) <= alphabet  # noqa: E731  (others are llama.cpp mislabels)
                default_bos = False
            elif model == "llama":
                vocab = {t: i for i, t in enumerate(tokens)}
                merges = f["merges"] or generate_merges(vocab, dict(zip(tokens, f["scores"] or [0.0] * len(tokens))))
                tok = HFTok(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
                # SentencePiece's dummy prefix: "▁" before every text run (llama.cpp: at the start and
                # after each special token, add_space_prefix), even one that starts with a space
                # (" Hello" -> "▁▁Hello" -> [29871, 15043]); Metaspace's prepend_scheme skips that case
                steps = [normalizers.Replace(" ", "▁")]
                if f["add_space_prefix"]:
                    steps.insert(0, normalizers.Prepend("▁"))
                tok.normalizer = normalizers.Sequence(steps)
                tok.pre_tokenizer = None
                tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                                 decoders.Fuse(), decoders.Strip(content=" ", left=1, right=0)])
                control_ok = lambda t: True  # noqa: E731
                default_bos = True
            else:
                raise LoadError(f"{path}: GGUF tokenizer model {model!r} is not supported; supported: gpt2 "
                                "(byte-level BPE), llama (SentencePiece)")
            control = [t for t, ty in zip(tokens, types) if ty == GGUF_CONTROL and control_ok(t)]
            if control:
                tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
            user = [t for t, ty in zip(tokens, types) if ty == GGUF_USER_DEFINED and t in vocab]
            if user:
                tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
        except HetinferError:
            raise
        except Exception as e:
            raise LoadError(f"{path}: the GGUF vocabulary (tokenizer.ggml.*) could not be built into a "
                            f"{model} tokenizer: {e}") from None
        special = {i for i, ty in enumerate(types) if ty == GGUF_CONTROL}
        ids = f["special_ids"]
        bos = ids.get("tokenizer.ggml.bos_token_id")
        eos = [ids[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if ids.get(k) is not None]
        add_bos = default_bos if f["add_bos"] is None else f["add_bos"]
        # every token, added ones included, is one of the GGUF array's: ids 0 .. len(tokens) - 1
        return cls(_HFBackend(tok, id_limit=len(tokens)), bos_id=bos, eos_ids=eos, add_bos=add_bos,
                   special_ids=special, kind=f"gguf-{model}")


class MissingTokenizer:
    """The tokenizer of a model directory that has none. The weights load and token ids work (the
    engine stops at the config's eos ids); whatever needs text (encode, decode, a chat template,
    a text stream) raises one LoadError saying which files are missing."""

    kind = "none"
    bos_id = None
    add_bos = False
    special_ids = frozenset()
    source = None

    def __init__(self, directory, eos_ids: Iterable[int] = (), reason: str | None = None):
        self.directory = Path(directory)
        self.eos_ids = list(eos_ids)
        self.reason = reason or f"no tokenizer.json or tokenizer.model in {self.directory}"

    def __bool__(self) -> bool:          # `if tokenizer:` -- there is none to use
        return False

    def _missing(self, *args, **kwargs):
        raise LoadError(f"{self.reason}: text cannot be encoded or decoded without a tokenizer (add the "
                        "tokenizer files of the model; token ids work without)")

    encode = decode = id_to_piece = piece_to_id = stream_decoder = _missing

    @property
    def vocab_size(self) -> int:
        self._missing()

    id_limit = vocab_size

    def __repr__(self) -> str:
        return f"none ({self.reason})"


class StreamDecoder:
    """Incremental detokenizer: ``push(id)`` returns only the newly completed text.

    It decodes a short window of recent ids (so SentencePiece's leading-space rule and multi-byte
    characters split over several byte tokens come out right) and holds text back while it ends in
    an incomplete character (U+FFFD). ``"".join(push(i) for i in ids) + flush() == decode(ids)``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self.tok = tokenizer
        self.skip_special = skip_special
        self.ids: list[int] = []
        self._prefix = 0   # window start
        self._read = 0     # ids before this were emitted

    def _decode(self, ids):
        return self.tok.decode(ids, self.skip_special)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        new_text = self._decode(self.ids[self._prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd") \
                and new_text.startswith(prefix_text):
            self._prefix, self._read = self._read, len(self.ids)
            return new_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        new_text = self._decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return new_text[len(prefix_text):] if new_text.startswith(prefix_text) else new_text

    def reset(self) -> None:
        self.ids.clear()
        self._prefix = self._read = 0
