"""Checkpoint: the format-neutral view of a weight file that every loader returns.

A Checkpoint names its tensors the Hugging Face way (``model.layers.0.self_attn.q_proj.weight``),
reports their shapes in HF orientation (a Linear weight is ``(out_features, in_features)``) and
materialises one tensor at a time, on request, in float32, float16 or bfloat16. Nothing is read
or dequantized before it is asked for, so a caller converting tensor by tensor keeps peak memory
to about one tensor.

Subclasses (one per format) implement four small methods: ``_stored_names``, ``_shape``,
``_stored_dtype`` and ``_load``; ``_raw`` optionally.
"""

from __future__ import annotations

import mmap
import sys
from pathlib import Path
from typing import Iterator

import numpy as np

from ..config import ModelConfig
from ..errors import LoadError
from .files import file_size  # noqa: F401  (re-exported: the loaders import it from here)


def bf16_np() -> np.dtype:
    """numpy's bfloat16 dtype (ml_dtypes, imported on first use: hetinfer.dtypes.bf16)."""
    from ..dtypes import bf16
    return bf16.np


def normalize_dtype(dtype) -> np.dtype:
    """np.float32 / np.float16 / ml_dtypes.bfloat16 (or their names) -> np.dtype; else LoadError."""
    if isinstance(dtype, str) and dtype.lower() in ("bf16", "bfloat16"):
        return bf16_np()
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or (dt not in (np.dtype(np.float32), np.dtype(np.float16)) and dt.name != "bfloat16"):
        raise LoadError(f"unsupported output dtype {dtype!r}; expected one of float32, float16, bfloat16")
    return dt


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a decoder with this config needs, in load order, with its HF-orientation shape."""
    H, I, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, H)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (H,)
        out[p + "self_attn.q_proj.weight"] = (q, H)
        out[p + "self_attn.k_proj.weight"] = (kv, H)
        out[p + "self_attn.v_proj.weight"] = (kv, H)
        if cfg.attention_bias:
            out[p + "self_attn.q_proj.bias"] = (q,)
            out[p + "self_attn.k_proj.bias"] = (kv,)
            out[p + "self_attn.v_proj.bias"] = (kv,)
        out[p + "self_attn.o_proj.weight"] = (H, q)
        if cfg.attention_out_bias:
            out[p + "self_attn.o_proj.bias"] = (H,)
        out[p + "post_attention_layernorm.weight"] = (H,)
        out[p + "mlp.gate_proj.weight"] = (I, H)
        out[p + "mlp.up_proj.weight"] = (I, H)
        out[p + "mlp.down_proj.weight"] = (H, I)
        if cfg.mlp_bias:
            out[p + "mlp.gate_proj.bias"] = (I,)
            out[p + "mlp.up_proj.bias"] = (I,)
            out[p + "mlp.down_proj.bias"] = (H,)
    out["model.norm.weight"] = (H,)
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (V, H)
    return out


def progress_bar(iterable, total: int, desc: str, enabled: bool):
    """A tqdm bar on stderr when enabled, else the iterable itself."""
    if not enabled:
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=desc, unit="t", file=sys.stderr, leave=False)


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1000
    return f"{n:.1f} GB"


class Checkpoint:
    """A loaded (memory-mapped, not materialised) checkpoint.

    Attributes: ``config`` (ModelConfig), ``tokenizer`` (hetinfer.tokenizer.Tokenizer or None),
    ``chat_template`` (str or None), ``format`` ("hf" | "gguf" | "llama2c"), ``path`` (Path),
    ``mapped_bytes`` (int: bytes of the files mapped).
    """

    format: str = "?"

    def __init__(self, path: Path, config: ModelConfig, tokenizer=None, chat_template: str | None = None,
                 mapped_bytes: int = 0):
        self.path = Path(path)
        self.config = config
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.mapped_bytes = int(mapped_bytes)
        self.notices: list[str] = []     # set by load_checkpoint: tensors skipped on purpose, unknown keys
        self._expected = expected_shapes(config)

    # ---- to implement per format -------------------------------------------------------
    def _stored_names(self) -> set[str]:
        """HF names of the tensors present in the file(s)."""
        raise NotImplementedError

    def _shape(self, name: str) -> tuple[int, ...]:
        """HF-orientation shape of a present tensor."""
        raise NotImplementedError

    def _stored_dtype(self, name: str) -> str:
        """How the tensor is stored, e.g. 'F32', 'BF16', 'Q4_1'."""
        raise NotImplementedError

    def _load(self, name: str) -> np.ndarray:
        """The tensor in HF layout, as float32/float16/bfloat16 (any of them), possibly a read-only view."""
        raise NotImplementedError

    def _raw(self, name: str):
        raise LoadError(f"{self.path}: tensor {name!r} is stored as {self._stored_dtype(name)}; "
                        "raw() only returns int8 group-quantized tensors (GGUF Q8_0, llama2.c version 2)")

    # ---- public API ---------------------------------------------------------------------
    def names(self) -> list[str]:
        """HF-style names of the tensors the model uses, in load order (lm_head absent when tied)."""
        return list(self._expected)

    def _check_name(self, name: str) -> None:
        if name not in self._expected:
            raise LoadError(f"{self.path}: no tensor named {name!r} in this {self.format} checkpoint "
                            f"(it has {len(self._expected)} tensors, e.g. {next(iter(self._expected))!r})")

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape in HF orientation (Linear weights are (out_features, in_features))."""
        self._check_name(name)
        return tuple(int(d) for d in self._shape(name))

    def stored_dtype(self, name: str) -> str:
        """The type the file stores the tensor in (F32, F16, BF16, Q8_0, Q4_K, ...)."""
        self._check_name(name)
        return self._stored_dtype(name)

    def tensor(self, name: str, dtype=np.float32) -> np.ndarray:
        """Materialise one tensor in HF layout as ``dtype`` (np.float32, np.float16 or
        ml_dtypes.bfloat16). When no conversion is needed the result may be a read-only view of
        the memory-mapped file."""
        dt = normalize_dtype(dtype)
        self._check_name(name)
        arr = self._load(name)
        if arr.dtype != dt:
            src, arr = arr, arr.astype(dt)
            release_pages(src)          # converted: its file pages are not needed in memory
        return arr

    def raw(self, name: str):
        """(int8 weights (N, K), scales (N, K // group)) of an int8 group-quantized tensor, read
        without a float round trip: GGUF Q8_0 (float16 scales, group 32) or llama2.c version 2
        (float32 scales, the file's group size). LoadError for any other storage."""
        self._check_name(name)
        return self._raw(name)

    def iter_tensors(self, dtype=np.float32, progress: bool = True) -> Iterator[tuple[str, np.ndarray]]:
        """Yield (name, array) for every tensor of names(), one at a time, with a tqdm bar."""
        dt = normalize_dtype(dtype)
        names = self.names()
        for name in progress_bar(names, len(names), f"loading {self.path.name}", progress):
            yield name, self.tensor(name, dt)

    def validate(self) -> None:
        """Every tensor the config needs exists and has the shape the config implies."""
        present = self._stored_names()
        for name, want in self._expected.items():
            if name not in present:
                raise LoadError(f"{self.path}: tensor {name!r} is missing; the config "
                                f"({self.config.architecture}, {self.config.num_hidden_layers} layers) needs it "
                                f"with shape {want}")
            got = tuple(int(d) for d in self._shape(name))
            if got != want:
                raise LoadError(f"{self.path}: tensor {name!r} has shape {got} but the config implies "
                                f"{want}")

    def _consumed_names(self) -> set[str]:
        """Stored tensors a format reads besides the names() (int8 scales, GGUF rope_freqs)."""
        return set()

    def _other_stored_names(self) -> set[str]:
        """Stored tensors outside the HF-name view (a GGUF tensor with no HF name), by file name."""
        return set()

    def check_unused(self) -> list[str]:
        """Stored tensors the model would not read: LoadError naming them, unless every one is
        skipped on purpose (SKIPPED_ON_PURPOSE); returns the notice lines for those."""
        cfg = self.config
        extra = (self._stored_names() - set(self._expected) - self._consumed_names()) | self._other_stored_names()
        skipped, bad = [], []
        for name in sorted(extra):
            why = skip_reason(name, cfg)
            (skipped if why else bad).append((name, why))
        if bad:
            names = [n for n, _ in bad]
            shown = ", ".join(repr(n) for n in names[:12]) + (f" and {len(names) - 12} more" if len(names) > 12 else "")
            raise LoadError(
                f"{self.path}: the checkpoint holds {len(names)} tensor(s) that the {cfg.architecture} forward "
                f"pass does not use: {shown}. The model would run without them and give wrong results, so "
                "loading stops (is the config missing a flag such as attention_bias / mlp_bias, or is this "
                "a different architecture?)")
        notices = []
        by_reason: dict[str, list[str]] = {}
        for n, why in skipped:
            by_reason.setdefault(why, []).append(n)
        for why, names in by_reason.items():
            shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
            notices.append(f"skipped {len(names)} tensor(s) on purpose ({why}): {shown}")
        return notices

    def summary(self) -> str:
        """Multi-line description: format, config, then one line per tensor (name, shape, stored type)."""
        lines = [f"format: {self.format}", f"path: {self.path}",
                 f"mapped: {human_bytes(self.mapped_bytes)}"]
        for k, v in self.config.to_dict().items():
            lines.append(f"config.{k}: {v}")
        lines.append(f"chat_template: {'yes' if self.chat_template else 'no'}")
        if self.tokenizer is not None:
            lines.append(f"tokenizer: {self.tokenizer!r}")
        lines.append(f"tensors: {len(self._expected)}")
        width = max(len(n) for n in self._expected)
        kept = getattr(self, "kept_as", None)            # formats that keep some tensors packed (GGUF)
        for name in self._expected:
            lines.append(f"  {name:<{width}}  {str(self.shape(name)):<16} {self.stored_dtype(name):<8}"
                         + (f" kept as {kept(name)}" if kept else ""))
        return "\n".join(lines)

    def __repr__(self) -> str:
        c = self.config
        return (f"<Checkpoint {self.format} {self.path.name}: {c.architecture} L={c.num_hidden_layers} "
                f"H={c.hidden_size} V={c.vocab_size}>")


def skip_reason(name: str, cfg: ModelConfig) -> str | None:
    """Why a stored tensor the model does not read is skipped on purpose, or None (an error)."""
    if name.endswith("rotary_emb.inv_freq") or name.endswith(".attn_rot_embd"):
        return "rotary inv_freq buffers: hetinfer computes the RoPE table from the config"
    if name == "lm_head.weight" and cfg.tie_word_embeddings:
        return "tie_word_embeddings is true: the output layer is the embedding, as transformers ties it"
    if name in ("output.weight",) and cfg.tie_word_embeddings:
        return "tie_word_embeddings: the output layer is the embedding"
    return None


def report_mapped(ckpt: Checkpoint, progress: bool) -> None:
    """The final 'mapped 98.4 MB from <file>' line on stderr."""
    if progress:
        print(f"mapped {human_bytes(ckpt.mapped_bytes)} from {ckpt.path}", file=sys.stderr)


def release_pages(view: np.ndarray) -> None:
    """Drop from memory the file pages under view, a slice of a memmap whose contents were
    just copied out (converted or dequantized), so that host memory holds the converted
    tensors, not the file as well. The pages stay mapped: a later read loads them again.
    Whole pages inside the view only; nothing for arrays not backed by a memmap."""
    root = view
    while isinstance(root.base, np.ndarray):          # slices of a memmap are memmaps too
        root = root.base
    mm = root.base
    if not isinstance(root, np.memmap) or not isinstance(mm, mmap.mmap) or not hasattr(mmap, "MADV_DONTNEED"):
        return
    # the mmap starts at the allocation-granularity boundary at or below the array's file offset
    mm_start = root.__array_interface__["data"][0] - root.offset % mmap.ALLOCATIONGRANULARITY
    lo = view.__array_interface__["data"][0] - mm_start
    hi = lo + view.nbytes
    page = mmap.PAGESIZE
    start, end = -(-lo // page) * page, hi // page * page
    if end > start:
        try:
            mm.madvise(mmap.MADV_DONTNEED, start, end - start)
        except (OSError, ValueError):
            pass


def memmap(path: Path) -> np.ndarray:
    """The whole file as a read-only uint8 memory map."""
    try:
        return np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as e:
        raise LoadError(f"cannot memory-map {path}: {e}") from None
