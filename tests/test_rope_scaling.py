"""RoPE scaling tables (linear, llama3, yarn, dynamic) against transformers' own rope init
functions (transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS), and the dynamic (NTK)
model against transformers decoding one token at a time past max_position_embeddings."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import hetinfer as hi  # noqa: E402
from hetinfer.config import ModelConfig  # noqa: E402
from hetinfer.engine import load  # noqa: E402
from hetinfer.rope import dynamic_inv_freq, inv_freq, rope_table, rope_table64, yarn_params  # noqa: E402

from tiny_models import VOCAB, make_tiny  # noqa: E402

SCALINGS = [
    ({"rope_type": "linear", "factor": 4.0}, 2048),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8192}, 131072),
    ({"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}, 8192),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}, 32768),
    ({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}, 131072),
    ({"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32,
      "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}, 163840),
    ({"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 2048, "beta_fast": 8,
      "beta_slow": 2, "mscale": 0.707, "mscale_all_dim": 0.5}, 4096),
    ({"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 1000,
      "attention_factor": 1.3, "truncate": False}, 3000),
]


def hf_config(scaling, max_pos, head_dim=64, theta=10000.0):
    rp = dict(scaling, rope_theta=theta)
    rp.setdefault("rope_type", rp.pop("type", None))
    return transformers.LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                                    max_position_embeddings=max_pos, rope_parameters=rp)


@pytest.mark.parametrize("head_dim,theta", [(64, 10000.0), (128, 500000.0), (32, 1000000.0)])
@pytest.mark.parametrize("scaling,max_pos", SCALINGS)
def test_inv_freq_and_attention_factor_match_transformers(scaling, max_pos, head_dim, theta):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    cfg = hf_config(scaling, max_pos, head_dim, theta)
    kind = cfg.rope_parameters["rope_type"]
    ref, ref_scale = ROPE_INIT_FUNCTIONS[kind](cfg, "cpu")
    ours = inv_freq(head_dim, theta, scaling, max_pos)
    np.testing.assert_allclose(ours, ref.double().numpy(), rtol=2e-6, atol=0)
    if kind == "yarn":
        assert yarn_params(head_dim, theta, scaling, max_pos)[1] == pytest.approx(ref_scale, rel=1e-12)
        cos, sin = rope_table64(head_dim, 300, theta, scaling, max_pos)
        assert np.abs(cos[0]).max() == pytest.approx(ref_scale, rel=1e-12)   # the attention factor
        assert ModelConfig(architecture="LlamaForCausalLM", vocab_size=8, hidden_size=head_dim * 4,
                           intermediate_size=8, num_hidden_layers=1, num_attention_heads=4,
                           num_key_value_heads=4, head_dim=head_dim, rope_scaling=scaling,
                           max_position_embeddings=max_pos).context_limit >= max_pos


@pytest.mark.parametrize("scaling,max_pos", SCALINGS + [({"rope_type": "dynamic", "factor": 2.0}, 64)])
def test_cos_sin_table_matches_transformers_rotary_embedding(scaling, max_pos):
    """The whole float32 table against LlamaRotaryEmbedding's cos/sin (float64 positions)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    cfg = hf_config(scaling, max_pos, 64, 10000.0)
    n = 200
    rot = LlamaRotaryEmbedding(cfg)
    cos, sin = rope_table(64, n, 10000.0, scaling, max_pos)
    if cfg.rope_parameters["rope_type"] == "dynamic":
        # transformers recomputes per forward from seq_len: row p is the table of a length-(p+1) pass
        for p in (0, max_pos - 1, max_pos, max_pos + 7, n - 1):
            ids = torch.arange(p + 1)[None]
            c, s = rot(torch.zeros(1, dtype=torch.float32), ids)
            np.testing.assert_allclose(cos[p], c[0, p, :32].numpy(), atol=2e-5)
            np.testing.assert_allclose(sin[p], s[0, p, :32].numpy(), atol=2e-5)
        return
    c, s = rot(torch.zeros(1, dtype=torch.float32), torch.arange(n)[None])
    np.testing.assert_allclose(cos, c[0, :, :32].numpy(), atol=2e-5)
    np.testing.assert_allclose(sin, s[0, :, :32].numpy(), atol=2e-5)


def test_dynamic_rows_match_transformers_ntk_function():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    cfg = hf_config({"rope_type": "dynamic", "factor": 4.0}, 256, 64, 10000.0)
    cos, sin = rope_table64(64, 1024, 10000.0, {"rope_type": "dynamic", "factor": 4.0}, 256)
    for p in (0, 255, 256, 300, 1023):
        ref, scale = ROPE_INIT_FUNCTIONS["dynamic"](cfg, "cpu", seq_len=p + 1)
        assert scale == 1.0
        np.testing.assert_allclose(dynamic_inv_freq(64, 10000.0, 4.0, 256, p + 1), ref.double().numpy(), rtol=2e-6)
        np.testing.assert_allclose(cos[p], np.cos(p * ref.double().numpy()), atol=1e-4)


@pytest.mark.parametrize("scaling", [{"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]},
                                     {"rope_type": "su"}, {"rope_type": "linear"},
                                     {"rope_type": "yarn", "original_max_position_embeddings": 1024},
                                     {"rope_type": "yarn", "factor": 0.5, "original_max_position_embeddings": 8}])
def test_unsupported_scaling_refused_with_reason(scaling):
    with pytest.raises(hi.ConfigError, match="rope_scaling"):
        ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], "vocab_size": 8, "hidden_size": 16,
                             "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
                             "rope_scaling": scaling})


def test_dynamic_decode_past_max_position_matches_transformers_token_by_token(tmp_path):
    """Prefill 20 tokens (inside max_position_embeddings=32), then decode one token at a time to
    position 60: every step's logits equal transformers' with its KV cache."""
    from hetinfer.engine.kv_cache import PagedKVCache
    from hetinfer.engine.step import StepInput
    d, hf = make_tiny(tmp_path, "llama-dynamic")
    model, _ = load(d, "cpu", "f32", progress=False)
    assert model.max_context == 64                      # factor 2 x max_position_embeddings 32
    rng = np.random.default_rng(3)
    ids = rng.integers(3, VOCAB, size=61).tolist()
    with torch.no_grad():
        out = hf(torch.tensor([ids[:20]]), use_cache=True)
        ref, past = [out.logits[0, -1].double().numpy()], out["cache"]
        for p in range(20, len(ids)):
            out = hf(torch.tensor([[ids[p]]]), cache=past, position_ids=torch.tensor([[p]]), use_cache=True)
            ref.append(out.logits[0, -1].double().numpy())
            past = out["cache"]
    kv = PagedKVCache.for_tokens(model, 64)
    ours = [model.forward(StepInput.single(ids[:20], 0, kv.block_size).to("cpu"), kv).numpy()[0].copy()]
    for p in range(20, len(ids)):
        ours.append(model.forward(StepInput.single([ids[p]], p, kv.block_size).to("cpu"), kv).numpy()[0].copy())
    ours, ref = np.array(ours, np.float64), np.array(ref)
    rel = np.linalg.norm(ours - ref, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert rel.max() < 1e-4, rel
    # and the scaling matters: a model with plain rope differs past position 32
    plain = rope_table(16, 64, 10000.0)[0]
    assert np.abs(plain[40:] - model.cos.numpy()[40:]).max() > 1e-3
