"""Our Llama / Qwen2 forward against HF transformers (CPU torch, float32).

Random tiny configs are written as safetensors by the test itself; SmolLM2's real
weights come from its GGUF, which transformers also loads (gguf_file=)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hetinfer.engine import Generator, load  # noqa: E402

from tiny_models import TINY, VOCAB, make_tiny  # noqa: E402
from _fixtures_loaders import smollm2_path  # noqa: E402


def hf_greedy(model, ids, n):
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def our_logits(model, ids):
    from hetinfer.engine.kv_cache import PagedKVCache
    from hetinfer.engine.step import StepInput
    kv = PagedKVCache.for_tokens(model, 128)
    step = StepInput.single(ids, 0, kv.block_size, all_logits=True).to(model.device)
    return model.forward(step, kv).numpy().astype(np.float64)


@pytest.mark.parametrize("name", list(TINY))
def test_tiny_logits_and_greedy_match_hf(tmp_path, name):
    d, hf = make_tiny(tmp_path, name)
    model, ckpt = load(d, "cpu", "f32", progress=False)       # the model's own limit (64 for some configs)
    rng = np.random.default_rng(1)
    ids = rng.integers(3, VOCAB, size=24).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].double().numpy()
    ours = our_logits(model, ids)
    rel = np.linalg.norm(ours - ref, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert rel.max() < 1e-4, f"relative logit error per position: {rel}"
    gen = Generator(model, ckpt.tokenizer, min(128, ckpt.config.context_limit))
    ours_greedy = list(gen.generate(ids, max_new_tokens=32, stop_ids=[]))
    assert ours_greedy == hf_greedy(hf, ids, 32)


def test_prefill_then_decode_equals_full_forward(tmp_path):
    """Decoding token by token over the cache gives the logits of one full forward."""
    d, _ = make_tiny(tmp_path, "llama3-gqa-scaled-tied")
    model, _ = load(d, "cpu", "f32", max_context=128, progress=False)
    from hetinfer.engine.kv_cache import PagedKVCache
    from hetinfer.engine.step import StepInput
    ids = list(range(5, 25))
    full = our_logits(model, ids)
    kv = PagedKVCache.for_tokens(model, 128)
    model.forward(StepInput.single(ids[:8], 0, kv.block_size).to("cpu"), kv)
    for p in range(8, len(ids)):
        step = model.forward(StepInput.single([ids[p]], p, kv.block_size).to("cpu"), kv)
        np.testing.assert_allclose(step.numpy()[0], full[p], rtol=1e-4, atol=1e-4)


# --- SmolLM2-135M-Instruct, real weights from its GGUF ---------------------------------
@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_path()
    model, ckpt = load(path, "cpu", "f32", max_context=512, progress=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return model, ckpt, hf


PROSE = ("The history of the lighthouse begins in the ancient world, where fires were lit on hills "
         "to guide ships home. Over centuries, engineers learned to build tall towers of stone, and "
         "later of iron, with lenses that could throw a beam of light across many miles of dark water. Keepers lived "
         "in small houses at the foot of each tower, trimming wicks, polishing brass and writing the "
         "weather into thick logbooks every night of the year.")


def test_smollm2_top1_every_position_and_greedy(smollm2):
    model, ckpt, hf = smollm2
    ids = ckpt.tokenizer.encode(PROSE)[:64]
    assert len(ids) == 64
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    ours = our_logits(model, ids)
    agree = (ours.argmax(-1) == ref.argmax(-1)).mean()
    assert agree == 1.0, f"top-1 agreement {agree:.3f}"
    gen = Generator(model, ckpt.tokenizer, 512)
    assert list(gen.generate(ids[:20], max_new_tokens=32, stop_ids=[])) == hf_greedy(hf, ids[:20], 32)


def test_smollm2_config(smollm2):
    model, ckpt, _ = smollm2
    c = ckpt.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (30, 576, 9, 3)
    assert c.tie_word_embeddings and model.lm_head is model.embed


# --- Qwen2.5-Coder-0.5B-Instruct (qwen2 arch, Q4_K_M GGUF), assembled by the fetch script -------
@pytest.mark.slow
def test_qwen25_top1_every_position_and_greedy():
    import os
    from pathlib import Path
    path = Path(os.environ.get("HETINFER_QWEN_GGUF",
                               Path.home() / ".cache/hetinfer/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"))
    if not path.exists():
        pytest.skip("run ../shared/models/fetch-qwen2.5-0.5b.sh first")
    model, ckpt = load(path, "cpu", "f32", max_context=512, progress=False)
    assert ckpt.config.architecture == "Qwen2ForCausalLM" and ckpt.config.attention_bias
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    ids = ckpt.tokenizer.encode(PROSE)[:64]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    ours = our_logits(model, ids)
    rel = np.linalg.norm(ours - ref, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() == 1.0, f"relative errors {rel}"
    gen = Generator(model, ckpt.tokenizer, 512)
    assert list(gen.generate(ids[:20], max_new_tokens=32, stop_ids=[])) == hf_greedy(hf, ids[:20], 32)
