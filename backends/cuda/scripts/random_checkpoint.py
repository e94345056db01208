"""Write an HF checkpoint directory of a real model's shapes with random weights, through
transformers (config.json, model.safetensors in f16, a word-level tokenizer.json of the full
vocabulary, a ChatML chat template): a server or engine benchmark of those shapes on a machine
that holds no real weights.

    python3 backends/cuda/scripts/random_checkpoint.py qwen2.5-0.5b /tmp/qwen-shape
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SHAPES = {   # hidden, ffn, layers, heads, kv heads, vocab, model_type, tied, rope theta
    "qwen2.5-0.5b": (896, 4864, 24, 14, 2, 151936, "qwen2", True, 1000000.0),
    "tinyllama-1.1b": (2048, 5632, 22, 32, 4, 32000, "llama", False, 10000.0),
    "tiny": (64, 256, 2, 4, 2, 32000, "llama", True, 10000.0),     # a CPU proxy of the server's own cost
}
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def main(argv=None) -> int:
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    name, out = (argv or sys.argv[1:])[:2]
    d, f, n, h, kv, vocab, mtype, tied, theta = SHAPES[name]
    out = Path(out)
    config = transformers.AutoConfig.for_model(
        model_type=mtype, hidden_size=d, intermediate_size=f, num_hidden_layers=n, num_attention_heads=h,
        num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=32768, rope_theta=theta,
        rms_norm_eps=1e-6, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, torch_dtype="float16")
    config.architectures = ["Qwen2ForCausalLM" if mtype == "qwen2" else "LlamaForCausalLM"]
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float16)
    model.save_pretrained(out, safe_serialization=True)
    special = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    words = {t: i for i, t in enumerate(special)}
    words.update({f"w{i}": i for i in range(len(special), vocab)})
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML, "bos_token": "<s>",
                                                           "eos_token": "</s>", "add_bos_token": False}))
    print(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
