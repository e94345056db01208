"""The engine: many sequences at once over a paged KV cache.

    sequence.py    a request's state          blocks.py      block pool + prefix cache
    scheduler.py   continuous batching        step.py        one step's input tensors
    kv_cache.py    the paged pools, budget    runner.py      forward + sampling, CUDA graphs
    llm_engine.py  add_request / step / abort generator.py   the single-stream client
    loading.py     checkpoint -> model
"""

from .generator import Generator, Stats, peak_rss_bytes
from .llm_engine import LLMEngine, RequestOutput
from .loading import DEFAULT_MODEL_FILE, DEFAULT_MODEL_PACKAGE, default_model_path, load
from ..sampling import SamplingParams

__all__ = ["Generator", "Stats", "peak_rss_bytes", "LLMEngine", "RequestOutput", "load", "default_model_path",
           "DEFAULT_MODEL_FILE", "DEFAULT_MODEL_PACKAGE", "SamplingParams"]
