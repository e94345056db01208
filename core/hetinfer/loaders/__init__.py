"""Weight loaders: ``load_checkpoint(path)`` -> Checkpoint, whatever the format.

- a directory with config.json        -> HF safetensors   (safetensors_hf.HFCheckpoint)
  ... whose quantization_config says hetinfer_int8 -> int8 groups (int8_dir.Int8Checkpoint)
- a file starting with b"GGUF"        -> GGUF             (gguf_file.GGUFCheckpoint)
- any other file                      -> llama2.c .bin    (llama2c.Llama2cCheckpoint; needs tokenizer.model)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..errors import LoadError
from .base import Checkpoint, expected_shapes, report_mapped

__all__ = ["load_checkpoint", "Checkpoint", "expected_shapes"]


def load_checkpoint(path, progress: bool = True, tokenizer_path=None) -> Checkpoint:
    """Open a checkpoint lazily (memory-mapped), validate it against its config and return it.

    Raises LoadError for a missing path, unknown format, truncated or corrupt file, missing tensor or
    wrong shape; ConfigError for an unknown architecture.
    """
    p = Path(os.fspath(path)).expanduser()
    if not p.exists():
        raise LoadError(f"checkpoint path {p} does not exist; expected an HF model directory (config.json + "
                        "*.safetensors), a .gguf file or a llama2.c .bin file")
    if p.is_dir():
        if not (p / "config.json").exists():
            raise LoadError(f"{p} is a directory without config.json; expected an HF model directory "
                            "(config.json + model.safetensors), or pass a .gguf / llama2.c file")
        from .int8_dir import Int8Checkpoint, is_int8_dir
        from .safetensors_hf import HFCheckpoint
        ckpt = Int8Checkpoint(p, progress=progress) if is_int8_dir(p) else HFCheckpoint(p, progress=progress)
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
    ckpt.validate()
    ckpt.notices = ckpt.check_unused()
    unknown = ckpt.config.extra.get("unknown_config_keys")
    if unknown:
        ckpt.notices.append(f"config.json keys not known to hetinfer, ignored: {', '.join(unknown)}")
    for note in ckpt.notices:
        print(f"hetinfer: notice: {note}", file=sys.stderr)
    report_mapped(ckpt, progress)
    return ckpt
