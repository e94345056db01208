"""Calibration for int8 quantization (hetinfer/gptq.py, hetinfer/awq.py): a text, and a float32
NumPy forward of Llama/Qwen2 that hands over each Linear group's inputs, layer by layer, so
that rounding (GPTQ) or scaling (AWQ) can be chosen for the activations a layer really sees."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

CALIB_SEQ = 512               # calibration sequence length (tokens) at most

# Written for hetinfer's int8 calibration (original prose in several registers: narrative,
# dialogue, a letter, exposition, a recipe), not copied from any book; no evaluation text in it.
CALIBRATION_TEXT = (
    'The village of Ashcombe lay at the bottom of a long green valley, and the road that led to '
    'it was so narrow that two carts could not pass without one of them backing into a gate. Old '
    'Mr. Thornton, who kept the inn, used to say that the road had been made narrow on purpose, '
    'so that strangers would think twice before coming, and that most of them did think twice and '
    'went on to Wexley instead. His wife, a small brisk woman with a sharp eye for a bargain, did '
    'not agree with him, and said so whenever the matter came up, which was nearly every '
    'evening.\n'
    '\n'
    '"You talk as if we wanted nobody," said she, setting down the teapot with more force than '
    'was needed. "And yet you complain that the rooms stand empty half the year."\n'
    '\n'
    '"I complain of the weather, my dear, not of the rooms."\n'
    '\n'
    '"The weather is the same for Wexley, and their rooms are full."\n'
    '\n'
    'Mr. Thornton had no answer to this, and therefore took up his newspaper, which was three '
    'days old, and read the shipping news with great attention, though he had never seen the sea '
    'and did not intend to.\n'
    '\n'
    'It was on such an evening, late in October, that a young man on horseback rode into the yard '
    'and asked whether he might have a room for a week. He was tall, rather pale, and dressed '
    'with a plainness that did not quite hide the quality of his coat. He gave his name as Edward '
    'Hale, said that he had business with a lawyer in the town, and paid for three nights in '
    'advance. Mrs. Thornton, who had been prepared to dislike him, found herself showing him the '
    'best room instead of the second best, and could not afterwards explain why.\n'
    '\n'
    'Dear Margaret,\n'
    '\n'
    'I write in haste, for the coach leaves at seven and I have promised to send this by it. You '
    'asked me in your last letter whether I was happy in my new situation, and I hardly know how '
    'to answer you. The family are kind, the children are no worse than children generally are, '
    'and the house is large and warm. But I miss our long walks by the river, and I miss your '
    'conversation more than I can say. Pray write soon, and tell me everything: what you have '
    'been reading, whom you have seen, and whether your brother has at last made up his mind '
    'about the farm.\n'
    '\n'
    'Your affectionate friend,\n'
    'Anne\n'
    '\n'
    'The study of the weather is one of the oldest of the sciences, and one of the most '
    'difficult. Air is warmed by the sun, rises, cools, and lets fall the water it carried as '
    'rain or snow. Because the earth turns, the winds do not blow straight from high pressure to '
    'low, but are bent to the right in the northern half of the world and to the left in the '
    'southern. A forecaster must therefore consider not only what the air is doing now, but what '
    'it has been doing for several days over a very wide area, and even then he can rarely be '
    'certain of more than a day or two ahead.\n'
    '\n'
    'In the spring of that year the river rose higher than anyone could remember. The meadows '
    'below the mill were under water for three weeks, and the miller, a patient man, moved his '
    'family into the upper rooms and waited. When the water went down at last it left behind a '
    'layer of fine grey mud, and in the mud, to the astonishment of the whole parish, a small '
    'iron box, locked, and very heavy.\n'
    '\n'
    '"It is treasure," said the blacksmith\'s boy, who had found it.\n'
    '\n'
    '"It is more likely to be nails," said the blacksmith.\n'
    '\n'
    'It was, in fact, neither. When the parson had been sent for, and the lock had been broken '
    'with a good deal of ceremony, the box was found to contain a bundle of letters tied with a '
    'faded ribbon, a gold ring, and a small portrait of a lady in a blue dress. Nobody in the '
    'village knew who she was. The parson took the letters home to read, and for a fortnight he '
    'spoke of nothing else.\n'
    '\n'
    'How to bake a simple loaf of bread: mix five hundred grams of flour with ten grams of salt '
    'and seven grams of dried yeast. Add about three hundred and fifty millilitres of warm water '
    'and stir until the dough comes together. Knead it on a floured table for ten minutes, until '
    'it is smooth and springs back when pressed. Leave it in a covered bowl in a warm place for '
    'an hour, or until it has doubled in size. Then shape it, put it in a tin, let it rise again '
    'for half an hour, and bake it in a hot oven for thirty to thirty-five minutes. The loaf is '
    'done when it sounds hollow when tapped underneath.\n'
    '\n'
    'Miss Caroline Ward was twenty-three years old, and had been told so often that she was '
    'sensible that she had begun to suspect it was not a compliment. Her elder sister had married '
    'well and early; her younger sister was pretty, lively, and already the subject of more '
    'gossip than their mother thought proper. Caroline, between them, read a great deal, walked a '
    'great deal, and said rather less than she thought. When her aunt invited her to spend the '
    'winter in Bath, she accepted at once, less from any hope of amusement than from a wish to '
    "be, for a few months, nobody's sensible daughter.\n"
    '\n'
    'The journey took two days. On the second afternoon the carriage was delayed by a broken '
    'wheel, and the passengers were obliged to wait at a small inn while it was mended. Among '
    'them was a gentleman of about thirty, with a grave face and a good deal of luggage, who '
    'spent the whole time writing letters and did not appear to notice anyone. Caroline noticed '
    'him, however, and was annoyed with herself for doing so.\n'
    '\n'
    '"Do you know who that is?" whispered her aunt\'s maid, who knew everything.\n'
    '\n'
    '"I have not the least idea," said Caroline, "and I do not wish to."\n'
    '\n'
    '"That is Mr. Ashford, of Langley Park. They say he has eight thousand a year and has refused '
    'two duchesses\' daughters."\n'
    '\n'
    '"Then he is either very proud or very foolish," said Caroline, "and in either case I am '
    'sorry for the duchesses."\n'
    '\n'
    'The history of the town is told in its buildings. The church, with its square tower, is the '
    'oldest, and parts of it are said to date from before the Conquest. The market hall was built '
    'in the reign of Queen Anne, when the wool trade made the merchants rich, and the long row of '
    'brick houses on the hill was put up a hundred years later for the families of the men who '
    'worked in the new mills. The railway came in eighteen forty-seven, and with it the station, '
    'the hotel, and the great iron bridge across the river, which the older inhabitants thought '
    'an eyesore and their grandchildren now think beautiful.\n'
)

_FUSED = (("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
          ("self_attn.o_proj.weight",), ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
          ("mlp.down_proj.weight",))


def _rms(x, weight, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + np.float32(eps)) * weight


def _rope(x, cos, sin, style):                          # x (B, T, H, Dh), cos/sin (T, Dh/2)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    if style == "half":
        h = x.shape[-1] // 2
        x1, x2 = x[..., :h], x[..., h:]
        return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x1 * s + x2 * c
    return out


def calibration_ids(ckpt, text: str = CALIBRATION_TEXT, seq: int = CALIB_SEQ) -> np.ndarray | None:
    """The calibration text as (B, T) token ids: equal chunks of at most seq tokens (and at most
    the model's context); None without a tokenizer."""
    tok = getattr(ckpt, "tokenizer", None)
    if not tok:                  # None, or the MissingTokenizer of a directory without tokenizer files
        return None
    ids = list(tok.encode(text))
    seq = max(1, min(seq, int(ckpt.config.max_position_embeddings)))
    b = -(-len(ids) // seq)
    t = len(ids) // b
    if t < 2:
        return None
    return np.array(ids[:b * t], np.int64).reshape(b, t)


def layer_inputs(ckpt, ids) -> Iterator[tuple[int, str, tuple, list, np.ndarray]]:
    """(layer, prefix, suffixes, float weights, inputs (B T, K)) for each Linear group of each
    layer in order (q/k/v, o, gate/up, down), from the float model over ids (B, T). One float
    layer is held at a time; weights are the checkpoint's, as float32."""
    c = ckpt.config
    ids = np.asarray(ids)
    b, t = ids.shape
    hq, hkv, dh, eps = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rms_norm_eps
    from .rope import rope_table
    cos, sin = rope_table(dh, t, c.rope_theta, c.rope_scaling)
    mask = np.triu(np.full((t, t), -np.inf, np.float32), 1)
    x = ckpt.tensor("model.embed_tokens.weight", np.float32)[ids.reshape(-1)]          # (B T, D)

    def load(p, suffixes):
        return [ckpt.tensor(p + s, np.float32) for s in suffixes]

    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        gamma = ckpt.tensor(p + "input_layernorm.weight", np.float32)
        h = _rms(x, gamma, eps)
        wq, wk, wv = ws = load(p, _FUSED[0])
        yield i, p, _FUSED[0], ws, h
        q, k, v = h @ wq.T, h @ wk.T, h @ wv.T
        if c.attention_bias:
            q += ckpt.tensor(p + "self_attn.q_proj.bias", np.float32)
            k += ckpt.tensor(p + "self_attn.k_proj.bias", np.float32)
            v += ckpt.tensor(p + "self_attn.v_proj.bias", np.float32)
        q = _rope(q.reshape(b, t, hq, dh), cos, sin, c.rope_style)
        k = np.repeat(_rope(k.reshape(b, t, hkv, dh), cos, sin, c.rope_style), hq // hkv, axis=2)
        v = np.repeat(v.reshape(b, t, hkv, dh), hq // hkv, axis=2)
        q, k, v = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)   # (B, H, T, Dh) ...
        sc = q @ k * np.float32(1.0 / np.sqrt(dh)) + mask                                    # (B, H, T, T)
        sc = np.exp(sc - sc.max(-1, keepdims=True))
        sc /= sc.sum(-1, keepdims=True)
        att = (sc @ v).transpose(0, 2, 1, 3).reshape(b * t, hq * dh)
        del q, k, v, sc
        (wo,) = ws = load(p, _FUSED[1])
        yield i, p, _FUSED[1], ws, att
        x = x + att @ wo.T
        gamma = ckpt.tensor(p + "post_attention_layernorm.weight", np.float32)
        h = _rms(x, gamma, eps)
        wg, wu = ws = load(p, _FUSED[2])
        gate = h @ wg.T
        act = gate / (1 + np.exp(-gate)) * (h @ wu.T)
        del gate
        yield i, p, _FUSED[2], ws, h
        (wd,) = ws = load(p, _FUSED[3])
        yield i, p, _FUSED[3], ws, act
        x = x + act @ wd.T
