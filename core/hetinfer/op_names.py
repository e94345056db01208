"""The ops every backend may implement: name -> (the argument whose dtype picks the kernel,
a one-line description). A leaf module: the registry checks names against it without
importing the ops (which import the registry)."""

# op name -> (key argument, one-line description)
OPS: dict[str, tuple[str, str]] = {
    "embedding": ("table", "out[t] = table[ids[t]]"),
    "rms_norm": ("x", "x / sqrt(mean(x^2) + eps) * weight over the last axis"),
    "matmul": ("weight", "residual + act(pro(x) @ weight^T + bias); pro: rms_norm or none, act: "
                         "swiglu of [gate | up] or none; weight f32/f16/bf16, or i8 with group scales"),
    "rope": ("x", "rotary embedding at per-token positions, 'half' or 'interleaved' pairs"),
    "add": ("a", "a + b"),
    "swiglu": ("gate", "silu(gate) * up"),
    "softmax": ("x", "softmax over the last axis"),
    "attention": ("q", "causal attention by position over a KV cache, grouped-query heads"),
    "kv_cache_write": ("k_cache", "k_cache[positions[t]] = k[t]; v likewise"),
    "rope_kv_write": ("k_cache", "rope on q in place; rope(k) and v into rows positions[t] of the caches"),
    "paged_attention": ("q", "causal attention of B sequences' query rows over block-paged K/V pools, GQA"),
    "rope_paged_kv_write": ("k_pool", "rope on q in place; rope(k) and v into pool slots slot_mapping[t] "
                                      "(block slot // BS, row slot % BS; a slot < 0 is not written)"),
    "decode_layer": ("wo", "one pre-norm decoder layer for decode rows (one token per sequence), fused: x += "
                           "attention block, x += SwiGLU MLP block, K/V written to the paged pools"),
    "argmax": ("x", "index of the largest value over the last axis (first on ties)"),
    "cast": ("x", "convert to out's dtype"),
    "penalties": ("logits", "per-row repetition (seen tokens), presence and frequency (output counts) penalties"),
    "sample": ("logits", "draw a token per row: per-row temperature (0 = argmax), top-k, top-p, min-p, "
                         "by a given uniform number"),
    "all_reduce": ("x", "sum of x over the ranks of the process group (tensor parallelism), into out or in place"),
    "all_gather": ("x", "the ranks' x concatenated along one dim, in rank order"),
}
