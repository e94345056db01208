"""Weight loaders: ``load_checkpoint(path)`` -> Checkpoint, whatever the format.

- a directory with config.json        -> HF safetensors   (safetensors_hf.HFCheckpoint)
  ... whose quantization_config says hetinfer_int8 -> int8 groups (int8_dir.Int8Checkpoint)
- a file starting with b"GGUF"        -> GGUF             (gguf_file.GGUFCheckpoint)
- any other file                      -> llama2.c .bin    (llama2c.Llama2cCheckpoint; needs tokenizer.model)
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

from ..errors import LoadError
from .base import Checkpoint, expected_shapes, report_mapped
from .files import file_kind

_EXPECTED = ("an HF model directory (config.json + *.safetensors), a .gguf file or a llama2.c .bin file "
             "(a regular file or a symlink to one)")

__all__ = ["load_checkpoint", "Checkpoint", "expected_shapes"]


def load_checkpoint(path, progress: bool = True, tokenizer_path=None) -> Checkpoint:
    """Open a checkpoint lazily (memory-mapped), validate it against its config and return it.

    Raises LoadError for a missing path, a path that is not a regular file or a readable directory
    (a FIFO, a device, a socket: refused by stat, never opened), unknown format, truncated or
    corrupt file, missing tensor or wrong shape, a tokenizer with more ids than the embedding
    has rows; ConfigError for a config that is malformed or names an unknown architecture. A
    model directory without tokenizer files loads (token ids work); its ``tokenizer`` raises a
    LoadError saying so when text is first needed.
    """
    try:
        raw = os.fspath(path)
    except TypeError:
        raise LoadError(f"checkpoint path {str(path)[:60]!r} is a {type(path).__name__}; expected a str or an "
                        "os.PathLike naming " + _EXPECTED) from None
    if not raw:
        raise LoadError(f"the checkpoint path is empty; expected {_EXPECTED}")
    p = Path(os.fsdecode(raw)).expanduser()
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise LoadError(f"checkpoint path {p} does not exist; expected {_EXPECTED}") from None
    except (OSError, ValueError) as e:
        raise LoadError(f"cannot read checkpoint path {p}: {getattr(e, 'strerror', None) or e}") from None
    if stat.S_ISDIR(st.st_mode):
        if not os.access(p, os.R_OK | os.X_OK):
            raise LoadError(f"cannot read the directory {p}: permission denied")
        if not os.path.lexists(p / "config.json"):      # (a dangling config.json link: the reader says so)
            found = sorted(q.name for q in p.glob("*.gguf"))[:3]
            hint = f" (it holds {', '.join(found)}: pass that file)" if found else ""
            raise LoadError(f"{p} is a directory without config.json{hint}; expected an HF model directory "
                            "(config.json + model.safetensors), or pass a .gguf / llama2.c file")
        from .int8_dir import Int8Checkpoint, is_int8_dir
        from .safetensors_hf import HFCheckpoint
        ckpt = Int8Checkpoint(p, progress=progress) if is_int8_dir(p) else HFCheckpoint(p, progress=progress)
    elif not stat.S_ISREG(st.st_mode):
        raise LoadError(f"checkpoint path {p} is {file_kind(st.st_mode)}; expected {_EXPECTED}")
    else:
        try:
            with open(p, "rb") as f:
                magic = f.read(4)
        except OSError as e:
            raise LoadError(f"cannot read {p}: {e.strerror}") from None
        if magic == b"GGUF":
            from .gguf_file import GGUFCheckpoint
            ckpt = GGUFCheckpoint(p, progress=progress)
        elif p.suffix.lower() == ".gguf":
            raise LoadError(f"{p}: has a .gguf name but its magic is {magic!r}, expected b'GGUF'; the file is "
                            "corrupt or not a GGUF file")
        elif p.suffix.lower() == ".safetensors":
            raise LoadError(f"{p}: pass the model directory (with config.json), not the .safetensors file")
        else:
            from .llama2c import Llama2cCheckpoint
            ckpt = Llama2cCheckpoint(p, tokenizer_path=tokenizer_path, progress=progress)
    check_tokenizer_fits(ckpt)
    ckpt.validate()
    ckpt.notices = ckpt.check_unused()
    unknown = ckpt.config.extra.get("unknown_config_keys")
    if unknown:
        ckpt.notices.append(f"config.json keys not known to hetinfer, ignored: {', '.join(unknown)}")
    for note in ckpt.notices:
        print(f"hetinfer: notice: {note}", file=sys.stderr)
    report_mapped(ckpt, progress)
    return ckpt


def check_tokenizer_fits(ckpt: Checkpoint) -> None:
    """LoadError when the tokenizer can produce ids the model cannot embed (more ids than rows)."""
    from ..tokenizer import MissingTokenizer      # (the tokenizer module imports loaders.files)
    tok = ckpt.tokenizer
    if tok is None or isinstance(tok, MissingTokenizer):
        return
    n, rows = tok.id_limit, ckpt.config.vocab_size
    if n > rows:
        raise LoadError(f"{tok.source or ckpt.path}: the tokenizer has ids up to {n - 1} but the model's embedding "
                        f"has {rows} rows (vocab_size {rows}); expected a tokenizer of at most {rows} ids (is it "
                        "the tokenizer of another model?)")
