"""Llama 2 / Llama 3.x / Qwen2 decoder, composed of core ops only, so one model
runs on every backend.

Llama 2: multi-head attention. Llama 3.x: grouped-query attention, "llama3"
rope scaling, tied embeddings (3.2). Llama with attention_bias (q/k/v/o biases) and
mlp_bias (gate/up/down biases). Qwen2: q/k/v biases, tied or untied output.
RoPE: hetinfer.rope (linear, llama3, yarn, dynamic, GGUF freq factors).
Weights arrive in HF layout; q/k/v and gate/up are fused into one product each.

GGUF weights in a packed block format (hetinfer.packed: Q4_K, Q5_0, Q8_0 ...) stay packed on
a device with kernels for that format (the CPU backend has all of them), memory-mapped from
the file; fusing q/k/v or gate/up rows makes one packed copy of them, and parts in different
formats (a Q4_K_M file's Q8_0 v next to Q5_0 q and k) stay separate products. Token
embeddings are read from the packed table, and a tied output head multiplies by it.
weights="dequantize" (or HETINFER_WEIGHTS=dequantize) widens them to the run dtype instead."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

import hetinfer as hi
from hetinfer import ops, profiler, registry
from hetinfer.config import ModelConfig
from hetinfer.errors import ConfigError, KernelNotFoundError, LoadError
from hetinfer.packed import from_blocks
from hetinfer.rope import rope_table


@dataclass
class Layer:
    attn_norm: hi.Tensor     # (D,)
    wqkv: hi.Tensor | None   # ((Hq + 2 Hkv) * Dh, D); None when q, k, v are packed differently
    bqkv: hi.Tensor | None   # ((Hq + 2 Hkv) * Dh,)
    wo: hi.Tensor            # (D, Hq * Dh)
    mlp_norm: hi.Tensor      # (D,)
    w_gate_up: hi.Tensor | None   # (2 F, D); None when gate and up are packed differently
    w_down: hi.Tensor        # (D, F)
    # int8 weights (hetinfer.quant): the four products above are i8 and these hold their
    # group scales (N, K // G); None for float weights
    wqkv_scales: hi.Tensor | None = None        # ((Hq + 2 Hkv) * Dh, D // G)
    wo_scales: hi.Tensor | None = None          # (D, Hq * Dh // G)
    w_gate_up_scales: hi.Tensor | None = None   # (2 F, D // G)
    w_down_scales: hi.Tensor | None = None      # (D, F // G)
    # row counts of the fused qkv weight, for prefill, which multiplies by row-slices so
    # that q, k, v come out as separate contiguous tensors
    qkv_rows: tuple = ()     # (Hq Dh, Hkv Dh, Hkv Dh)
    # biases of Llama's attention_bias (o_proj) and mlp_bias (gate/up fused, down); None without
    bo: hi.Tensor | None = None          # (D,)
    b_gate_up: hi.Tensor | None = None   # (2 F,)
    b_down: hi.Tensor | None = None      # (D,)
    # the q, k, v products as (weight, scales): row views of wqkv when fused, else separate
    qkv_parts: tuple = ()
    # gate and up as (weight, scales) when not fused (w_gate_up None): two products, then swiglu
    gate_up_parts: tuple = ()

    def __post_init__(self):
        if not self.qkv_parts and self.wqkv is not None:     # fused q/k/v: row views of it
            if sum(self.qkv_rows) != self.wqkv.shape[0]:
                raise ConfigError(f"Layer: qkv_rows {self.qkv_rows} do not add up to wqkv's {self.wqkv.shape[0]} rows")
            self.qkv_parts = tuple(zip(self.split(self.wqkv, self.qkv_rows),
                                       self.split(self.wqkv_scales, self.qkv_rows)))

    @staticmethod
    def split(w, rows):
        """Row-slices of a fused weight, bias or scales: contiguous views, no copy."""
        out, at = [], 0
        for n in rows:
            out.append(None if w is None else w[at:at + n])
            at += n
        return out


class LlamaForCausalLM:
    """forward(step, kv) -> logits (R, V) of the step's rows that need them."""
    tp = None          # tensor parallel (sharding.TensorParallel) when the process group has N > 1 ranks
    tp_root = True     # rank 0 (or no tensor parallelism): adds the residual and row-parallel biases

    def __init__(self, config: ModelConfig, layers: list[Layer], embed: hi.Tensor, norm: hi.Tensor,
                 lm_head: hi.Tensor, device, dtype, max_context: int):
        self.config, self.layers, self.embed, self.norm, self.lm_head = config, layers, embed, norm, lm_head
        self.device, self.dtype, self.max_context = hi.Device.parse(device), hi.dtype(dtype), max_context
        cos, sin = rope_table(config.head_dim, max_context, config.rope_theta, config.rope_scaling,
                              config.max_position_embeddings)
        self.cos, self.sin = hi.tensor(cos, hi.f32, self.device), hi.tensor(sin, hi.f32, self.device)
        self._ws: dict[tuple, dict[str, hi.Tensor]] = {}

    # --- loading ----------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, ckpt, device="cpu", dtype=None, max_context: int | None = None,
                        progress: bool = True, weights: str | None = None):
        """dtype: the run dtype (f32, f16, bf16; None = f32). weights: "packed" keeps a GGUF file's
        packed blocks where the device has kernels for them, "dequantize" widens every weight to
        dtype. Default: $HETINFER_WEIGHTS, else packed when dtype is None and dequantize when a
        dtype is given (so `--dtype f32` runs the file's weights dequantized, exactly)."""
        from .sharding import shard_for_group
        ckpt, tp = shard_for_group(ckpt)      # N > 1 ranks: this rank's slices and config
        cfg: ModelConfig = ckpt.config
        weights = weights or os.environ.get("HETINFER_WEIGHTS") or ("packed" if dtype is None else "dequantize")
        dt = hi.dtype(dtype or "f32")
        if dt not in (hi.f32, hi.f16, hi.bf16):
            raise ConfigError(f"unsupported run dtype {dt}; expected f32, f16 or bf16")
        limit = cfg.context_limit      # max_position_embeddings, or what yarn / dynamic rope extends it to
        max_context = min(max_context or limit, limit)
        from hetinfer.loaders.base import progress_bar, release_pages
        from hetinfer.quant import check_int8, quantized_names
        qnames = quantized_names(ckpt)        # int8 Linear weights: kept as (int8, scales), never widened
        names = set(ckpt.names())
        dev = hi.Device.parse(device)
        packed_of = _packed_chooser(ckpt, dev, weights, qnames)

        def put(arr):
            arr = np.ascontiguousarray(arr, dtype=dt.np)
            return hi.from_numpy(arr, dev) if dev.type == "cpu" else hi.tensor(arr, dt, dev)

        def put_as_is(arr):                   # int8 weights and their scales keep their dtype
            arr = np.ascontiguousarray(arr)
            return hi.from_numpy(arr, dev) if dev.type == "cpu" else hi.tensor(arr, hi.dtype(arr.dtype), dev)

        def need(name):
            """One tensor, read (and converted) when its layer is built: on a GPU the host copy
            is dropped once uploaded, so host memory peaks at about one layer."""
            if name not in names:
                raise LoadError(f"{ckpt.path}: missing tensor {name!r} needed by {cfg.architecture}")
            return ckpt.raw(name) if name in qnames else ckpt.tensor(name, dt.np)

        def linear(*names):
            """(weight, scales): float rows concatenated, int8 rows and scale rows concatenated, or
            packed rows concatenated (None when the names are packed in different formats)."""
            fmts = {packed_of(n) for n in names}
            if fmts != {None}:
                if len(fmts) > 1:
                    return None
                got = [ckpt.packed(n) for n in names]                        # (N_i, K // block) views
                blocks = np.concatenate(got) if len(got) > 1 else got[0]     # fused: one packed copy
                if len(got) > 1:
                    for g in got:
                        release_pages(g)
                return from_blocks(blocks, fmts.pop(), dev), None
            got = [need(n) for n in names]
            if not isinstance(got[0], tuple):
                return put(np.concatenate(got) if len(got) > 1 else got[0]), None
            for n, (q, s) in zip(names, got):
                check_int8(q, s, n)
            if len({q.shape[1] // s.shape[1] for q, s in got}) > 1 or len({s.dtype for _, s in got}) > 1:
                raise LoadError(f"{ckpt.path}: {', '.join(names)} have different int8 group sizes or scale "
                                "dtypes and cannot be fused")
            q = np.concatenate([q for q, _ in got]) if len(got) > 1 else got[0][0]
            s = np.concatenate([s for _, s in got]) if len(got) > 1 else got[0][1]
            return put_as_is(q), put_as_is(s)

        layers = []
        steps = progress_bar(range(cfg.num_hidden_layers), cfg.num_hidden_layers,
                             f"loading {ckpt.path.name} (layers)", progress)
        for i in steps:
            p = f"model.layers.{i}."
            qkv_names = [p + f"self_attn.{n}_proj.weight" for n in "qkv"]
            qkv_rows = (cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim,
                        cfg.num_key_value_heads * cfg.head_dim)
            fused = linear(*qkv_names)
            if fused is not None:
                (wqkv, sqkv), qkv_parts = fused, ()          # parts: row views, made by Layer
            else:
                wqkv = sqkv = None
                qkv_parts = tuple(linear(n) for n in qkv_names)
            bqkv = None
            if cfg.attention_bias:
                bqkv = put(np.concatenate([need(p + f"self_attn.{n}_proj.bias") for n in "qkv"]))
            attn_norm = put(need(p + "input_layernorm.weight"))
            wo, so = linear(p + "self_attn.o_proj.weight")
            bo = put(need(p + "self_attn.o_proj.bias")) if cfg.attention_out_bias else None
            mlp_norm = put(need(p + "post_attention_layernorm.weight"))
            gate_up = linear(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight")
            w_gate_up, sgu = gate_up if gate_up is not None else (None, None)
            gate_up_parts = () if gate_up is not None else \
                (linear(p + "mlp.gate_proj.weight"), linear(p + "mlp.up_proj.weight"))
            w_down, sd = linear(p + "mlp.down_proj.weight")
            b_gate_up = b_down = None
            if cfg.mlp_bias:
                b_gate_up = put(np.concatenate([need(p + "mlp.gate_proj.bias"), need(p + "mlp.up_proj.bias")]))
                b_down = put(need(p + "mlp.down_proj.bias"))
            layers.append(Layer(
                attn_norm=attn_norm, wqkv=wqkv, bqkv=bqkv, wo=wo, mlp_norm=mlp_norm,
                w_gate_up=w_gate_up, w_down=w_down,
                wqkv_scales=sqkv, wo_scales=so, w_gate_up_scales=sgu, w_down_scales=sd,
                qkv_rows=qkv_rows, bo=bo, b_gate_up=b_gate_up, b_down=b_down,
                qkv_parts=qkv_parts, gate_up_parts=gate_up_parts,
            ))
        embed_name = "model.embed_tokens.weight"
        embed = linear(embed_name)[0] if packed_of(embed_name) else put(need(embed_name))
        lm_head = embed if cfg.tie_word_embeddings or "lm_head.weight" not in names else \
            (linear("lm_head.weight")[0] if packed_of("lm_head.weight") else put(need("lm_head.weight")))
        model = cls(cfg, layers, embed, put(need("model.norm.weight")), lm_head, dev, dt, max_context)
        return model if tp is None else tp.finish(model)

    # --- workspace: a step of up to WS_KEEP rows reuses its buffers (decode steps, and the
    # captured graphs that read them, allocate nothing); longer prefill steps make their own
    WS_KEEP = 256

    def _workspace(self, t: int, r: int) -> dict[str, hi.Tensor]:
        ws = self._ws.get((t, r))
        if ws is None:
            c, dt, dev = self.config, self.dtype, self.device
            hq, hkv, dh = c.num_attention_heads, c.num_key_value_heads, c.head_dim
            ws = {
                # the residual stream is f32 whatever the run dtype: bf16 sums of 20-30 layer
                # outputs lose the top-1 token a few percent of the time
                "x": hi.empty((t, c.hidden_size), hi.f32, dev),                # (T, D) f32
                "attn": hi.empty((t, hq, dh), dt, dev),                        # (T, Hq, Dh)
                "act": hi.empty((t, c.intermediate_size), dt, dev),            # (T, F) silu(gate) * up
                "x_rows": hi.empty((r, c.hidden_size), hi.f32, dev),           # (R, D) rows for logits
                # logits in f32 whatever the run dtype: bf16 logits (8-bit mantissa) flip near-ties
                "logits": hi.empty((r, c.vocab_size), hi.f32, dev),            # (R, V)
            }
            ws["attn_flat"] = ws["attn"].view(t, hq * dh)                      # (T, Hq Dh)
            if any(l.w_gate_up is None for l in self.layers):                 # unfused gate, up (T, F)
                ws["gate"], ws["up"] = (hi.empty((t, c.intermediate_size), dt, dev) for _ in range(2))
            if t == 1:            # q, k, v as views of one fused qkv product (made once)
                qkv = ws["qkv"] = hi.empty((1, (hq + 2 * hkv) * dh), dt, dev)  # (1, (Hq + 2 Hkv) Dh)
                ws["q"] = qkv[:, :hq * dh].view(1, hq, dh)                     # (1, Hq, Dh)
                ws["k"] = qkv[:, hq * dh:(hq + hkv) * dh].view(1, hkv, dh)     # (1, Hkv, Dh)
                ws["v"] = qkv[:, (hq + hkv) * dh:].view(1, hkv, dh)
            else:                 # more rows: three products into contiguous q, k, v
                ws["q"] = hi.empty((t, hq, dh), dt, dev)
                ws["k"] = hi.empty((t, hkv, dh), dt, dev)
                ws["v"] = hi.empty((t, hkv, dh), dt, dev)
            if t <= self.WS_KEEP:
                if len(self._ws) >= 32:
                    self._ws.pop(next(iter(self._ws)))
                self._ws[(t, r)] = ws
        return ws

    def forward(self, step, kv) -> hi.Tensor:
        """One engine step (hetinfer.engine.step.StepInput, tensors on the model's device):
        the token rows of every scheduled sequence, flattened. Writes their K/V into the paged
        pools kv.k[i], kv.v[i] at step.slot_mapping; attention reads each sequence's blocks
        by step.block_tables. Returns f32 logits (R, V) of the rows step.logits_rows.

        Per layer: four products, each carrying its neighbours: rms_norm into the qkv and
        gate/up products (prologue), swiglu into the gate/up product (epilogue), the
        residual add into the o and down products (epilogue, in place on the f32 stream x)."""
        c = self.config
        t, r = step.num_tokens, step.logits_rows.shape[0]
        ws = self._workspace(t, r)
        x, eps = ws["x"], c.rms_norm_eps
        q, k, v = ws["q"], ws["k"], ws["v"]
        profiler.set_layer("embed")
        if self.tp is None:
            ops.embedding(step.input_ids, self.embed, out=x)                   # (T, D) f32
        else:                        # tensor parallel: vocabulary-parallel lookup + all_reduce
            self.tp.embed(self, step.input_ids, x)
        fused = self._decode_layers(t, step)
        for i, layer in enumerate(self.layers):
            if fused:                # decode rows: the whole layer in one call (ops.decode_layer)
                profiler.set_layer(f"layer {i}")
                ops.decode_layer(x, layer.attn_norm, fused[i][0], layer.wo, layer.mlp_norm, fused[i][1], layer.w_down,
                                 kv.k[i], kv.v[i], step.positions, step.slot_mapping, step.context_lens,
                                 step.block_tables, self.cos, self.sin, num_heads=c.num_attention_heads,
                                 bqkv=layer.bqkv, eps=eps, style=c.rope_style)
                continue
            profiler.set_layer(f"layer {i}")
            if t == 1 and layer.wqkv is not None:
                ops.matmul(x, layer.wqkv, layer.bqkv, layer.wqkv_scales, norm_weight=layer.attn_norm,
                           eps=eps, out=ws["qkv"])                            # (1, (Hq+2Hkv) Dh)
            else:
                for (w, sc), b, o in zip(layer.qkv_parts, layer.split(layer.bqkv, layer.qkv_rows), (q, k, v)):
                    ops.matmul(x, w, b, sc, norm_weight=layer.attn_norm, eps=eps, out=o.view(t, -1))
            # q rotated in place; rotated k and v into the pools at the slot mapping
            ops.rope_paged_kv_write(q, k, v, kv.k[i], kv.v[i], step.positions, step.slot_mapping,
                                    self.cos, self.sin, c.rope_style)
            ops.paged_attention(q, kv.k[i], kv.v[i], step.query_start, step.context_lens, step.block_tables,
                                out=ws["attn"])                               # (T, Hq, Dh)
            ops.matmul(ws["attn_flat"], layer.wo, layer.bo, layer.wo_scales, residual=x if self.tp_root else None,
                       out=x)
            if self.tp is not None:  # row-parallel o: partial sums (rank 0's holds the residual)
                ops.all_reduce(x, group=self.tp.group)
            if layer.w_gate_up is not None:
                ops.matmul(x, layer.w_gate_up, layer.b_gate_up, layer.w_gate_up_scales, norm_weight=layer.mlp_norm,
                           eps=eps, act="swiglu", out=ws["act"])              # (T, F)
            else:                                                             # gate, up packed differently
                f = c.intermediate_size
                for (w, sc), b, o in zip(layer.gate_up_parts, layer.split(layer.b_gate_up, (f, f)),
                                         (ws["gate"], ws["up"])):
                    ops.matmul(x, w, b, sc, norm_weight=layer.mlp_norm, eps=eps, out=o)   # (T, F)
                ops.swiglu(ws["gate"], ws["up"], out=ws["act"])
            ops.matmul(ws["act"], layer.w_down, layer.b_down, layer.w_down_scales, residual=x if self.tp_root else None,
                       out=x)
            if self.tp is not None:  # row-parallel down
                ops.all_reduce(x, group=self.tp.group)
        profiler.set_layer("head")
        rows = ops.embedding(step.logits_rows, x, out=ws["x_rows"])           # (R, D) gathered rows
        if self.tp is not None:      # vocabulary-parallel head: V/N logits a rank, all_gather
            return self.tp.head(self, rows, ws["logits"])
        return ops.matmul(rows, self.lm_head, norm_weight=self.norm, eps=eps, out=ws["logits"])  # (R, V)

    DECODE_LAYER_ROWS = 8    # decode steps of up to this many sequences run ops.decode_layer

    def _decode_layers(self, t: int, step):
        """Per layer (qkv parts, gate/up parts) for ops.decode_layer when this step is decode rows
        only (one per sequence, at most DECODE_LAYER_ROWS), without tensor parallelism, and the
        device has a decode_layer kernel for every layer's weights (int8 weights and o / MLP
        biases: no); else None."""
        if t > self.DECODE_LAYER_ROWS or step.block_tables.shape[0] != t or self.tp is not None:
            return None              # (tensor parallel: the layer's all_reduces run between its ops)
        got = getattr(self, "_decode_parts", False)
        if got is False:
            got = []
            for l in self.layers:
                if l.wqkv_scales is not None or l.bo is not None or l.b_gate_up is not None or l.b_down is not None \
                        or any(s is not None for _, s in l.qkv_parts + l.gate_up_parts):
                    got = None
                    break
                try:
                    registry.lookup("decode_layer", self.device.type, l.wo.dtype)
                except KernelNotFoundError:
                    got = None
                    break
                got.append(((l.wqkv,) if l.wqkv is not None else tuple(w for w, _ in l.qkv_parts),
                            (l.w_gate_up,) if l.w_gate_up is not None else tuple(w for w, _ in l.gate_up_parts)))
            self._decode_parts = got
        return got

    @property
    def weight_bytes(self) -> int:
        ts = [self.embed, self.norm] + ([] if self.lm_head is self.embed else [self.lm_head])
        for l in self.layers:
            ts += [l.attn_norm, l.wqkv, l.bqkv, l.wo, l.mlp_norm, l.w_gate_up, l.w_down, l.bo, l.b_gate_up, l.b_down,
                   l.wqkv_scales, l.wo_scales, l.w_gate_up_scales, l.w_down_scales]
            if l.wqkv is None:
                ts += [t for part in l.qkv_parts for t in part]
            ts += [t for part in l.gate_up_parts for t in part]
        return sum(t.nbytes for t in ts if t is not None)


WEIGHTS = ("packed", "dequantize")


def _packed_chooser(ckpt, dev, weights, qnames):
    """name -> the packed DType to keep it in, or None (read as floats / int8). Packed when the
    checkpoint has packed storage (GGUF), no int8 view is in use, weights is "packed" and the
    device has matmul and embedding kernels for the format."""
    if weights not in WEIGHTS:
        raise ConfigError(f"weights={weights!r} (or HETINFER_WEIGHTS) is not supported; expected one of "
                          f"{', '.join(WEIGHTS)}")
    stored = getattr(ckpt, "packed_dtype", None)
    if weights != "packed" or qnames or stored is None:
        return lambda name: None
    ok = {}

    def has_kernels(dt) -> bool:
        if dt not in ok:
            try:
                registry.lookup("matmul", dev.type, dt)
                registry.lookup("embedding", dev.type, dt)
                ok[dt] = True
            except KernelNotFoundError:
                ok[dt] = False
        return ok[dt]

    def packed_of(name):
        dt = stored(name)
        return dt if dt is not None and has_kernels(dt) else None
    return packed_of


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2 is Llama with q/k/v biases (config.attention_bias) and its own defaults."""
