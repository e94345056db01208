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

import numbers
import re
from pathlib import Path
from typing import Iterable

from .errors import LoadError
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


def hf_id_limit(tok) -> int:
    """One more than the largest id of a tokenizers.Tokenizer, added tokens included."""
    return max(tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1


class _HFBackend:
    """A tokenizers.Tokenizer."""

    def __init__(self, tok):
        self.tok = tok

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
        return hf_id_limit(self.tok)


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

    # ---- use ----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._b.vocab_size()

    @property
    def id_limit(self) -> int:
        """One more than the largest id the tokenizer can produce (the embedding rows it needs)."""
        return self._b.id_limit()

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Ids of ``text``; special tokens written in the text match whole. BOS is prepended when
        ``add_bos`` (None: the tokenizer config's default)."""
        ids = list(self._b.encode(text))
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of ``ids`` (special tokens written out unless ``skip_special``)."""
        return self._b.decode([int(i) for i in ids], skip_special)

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
        tc, config, gc = tokenizer_config or {}, config or {}, generation_config or {}
        tc_path = path.parent / "tokenizer_config.json"
        special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        atd = tc.get("added_tokens_decoder") or {}
        if not isinstance(atd, dict):
            raise LoadError(f"{tc_path}: added_tokens_decoder is a JSON {type(atd).__name__}; expected an object "
                            "{id: token}")
        for i, t in atd.items():
            if not (i.isdigit() and isinstance(t, dict)):
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
            return read_json(p, name) if p.exists() else {}

        tc, gc = js("tokenizer_config.json"), js("generation_config.json")
        config = config if config is not None else js("config.json")
        if (path / "tokenizer.json").exists():
            return cls.from_tokenizer_json(path / "tokenizer.json", tc, config, gc)
        if (path / "tokenizer.model").exists():
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
        return cls(_HFBackend(tok), bos_id=bos, eos_ids=eos, add_bos=add_bos, special_ids=special,
                   kind=f"gguf-{model}")


class MissingTokenizer:
    """The tokenizer of a model directory that has none. The weights load and token ids work (the
    engine stops at the config's eos ids); whatever needs text (encode, decode, a chat template,
    a text stream) raises one LoadError saying which files are missing."""

    kind = "none"
    bos_id = None
    add_bos = False
    special_ids = frozenset()
    source = None

    def __init__(self, directory, eos_ids: Iterable[int] = ()):
        self.directory = Path(directory)
        self.eos_ids = list(eos_ids)

    def __bool__(self) -> bool:          # `if tokenizer:` -- there is none to use
        return False

    def _missing(self, *args, **kwargs):
        raise LoadError(f"no tokenizer.json or tokenizer.model in {self.directory}: text cannot be encoded or "
                        "decoded without one (add the tokenizer files of the model; token ids work without)")

    encode = decode = id_to_piece = piece_to_id = stream_decoder = _missing

    @property
    def vocab_size(self) -> int:
        self._missing()

    id_limit = vocab_size

    def __repr__(self) -> str:
        return f"none (no tokenizer.json or tokenizer.model in {self.directory})"


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
