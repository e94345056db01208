"""Tiny random Llama / Qwen2 checkpoints written by the tests themselves, through HF
transformers (config.json + model.safetensors + a word-level tokenizer.json)."""

from __future__ import annotations

import torch
import transformers

VOCAB = 320

TINY = {
    "llama2-mha": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64,
                       intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, rms_norm_eps=1e-5, rope_theta=10000.0,
                       tie_word_embeddings=False),
    "llama3-gqa-scaled-tied": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64,
                                   intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
                                   num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500000.0,
                                   rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                 "original_max_position_embeddings": 32},
                                   tie_word_embeddings=True),
    "qwen2-bias-tied": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=64,
                            intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1000000.0,
                            tie_word_embeddings=True),
    "qwen2-bias-untied": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=48,
                              intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
                              num_key_value_heads=3, rms_norm_eps=1e-6, rope_theta=1000000.0,
                              tie_word_embeddings=False),
    # Llama with attention_bias (q/k/v AND o_proj biases) and mlp_bias (gate/up/down biases)
    "llama-attn-bias": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64,
                            intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
                            attention_bias=True, tie_word_embeddings=False),
    "llama-mlp-bias": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64,
                           intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
                           mlp_bias=True, tie_word_embeddings=True),
    "llama-both-biases": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=48,
                              intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
                              num_key_value_heads=3, rms_norm_eps=1e-5, rope_theta=10000.0,
                              attention_bias=True, mlp_bias=True, tie_word_embeddings=False),
    # Qwen2 with the key present and false: transformers still gives q/k/v biases
    "qwen2-attention-bias-false": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=64,
                                       intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1000000.0,
                                       attention_bias=False, tie_word_embeddings=True),
    # YaRN (Qwen2.5's long-context setting) with its attention factor; and with mscale keys
    "qwen2-yarn": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=64,
                       intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0,
                       rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
                       tie_word_embeddings=True),
    "llama-yarn-beta-mscale": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64,
                                   intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
                                   rope_scaling={"rope_type": "yarn", "factor": 2.0,
                                                 "original_max_position_embeddings": 64,
                                                 "beta_fast": 16, "beta_slow": 2, "mscale": 1.0,
                                                 "mscale_all_dim": 0.5},
                                   tie_word_embeddings=False),
    # dynamic NTK: max_position_embeddings is set small per test (see make_tiny's max_pos)
    "llama-dynamic": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64,
                          intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
                          rope_scaling={"rope_type": "dynamic", "factor": 2.0},
                          tie_word_embeddings=False),
}
# configs whose HF forward differs from a full-sequence pass beyond max_position_embeddings
MAX_POS = {"llama-dynamic": 32}


def write_tokenizer(path, vocab_size):
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))


def make_tiny(tmp_path, name, seed=0):
    cfg = dict(TINY[name], vocab_size=VOCAB, max_position_embeddings=MAX_POS.get(name, 128), bos_token_id=1,
               eos_token_id=2, initializer_range=0.2, torch_dtype="float32")
    config = transformers.AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "architectures"})
    config.architectures = cfg["architectures"]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():   # HF initialises norms to 1 and biases to 0; make them matter
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            if n.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    d = tmp_path / name
    model.save_pretrained(d, safe_serialization=True)
    write_tokenizer(d, VOCAB)
    return d, model


