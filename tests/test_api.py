"""The vLLM-style Python API on SmolLM2's real weights."""

from __future__ import annotations

import pytest

import hetinfer as hi
from hetinfer import LLM, SamplingParams
from _fixtures_loaders import smollm2_path


@pytest.fixture(scope="module")
def llm():
    smollm2_path()
    return LLM(device="cpu", dtype="f32", max_context=1024)


def test_generate_greedy_and_stream_agree(llm):
    out = llm.generate("The capital of France is", SamplingParams(max_tokens=12))[0]
    assert "Paris" in out.text and out.finish_reason == "length" and len(out.token_ids) == 12
    assert "".join(llm.stream("The capital of France is", SamplingParams(max_tokens=12))) == out.text


def test_seed_reproduces_and_differs(llm):
    p = dict(temperature=1.0, top_p=0.95, max_tokens=16)
    a = llm.generate("Once upon a time", SamplingParams(seed=7, **p))[0].text
    b = llm.generate("Once upon a time", SamplingParams(seed=7, **p))[0].text
    texts = {llm.generate("Once upon a time", SamplingParams(seed=s, **p))[0].text for s in (1, 2, 3)}
    assert a == b and len(texts) > 1


def test_stop_string_and_stop_token(llm):
    out = llm.generate("Count: 1, 2, 3,", SamplingParams(max_tokens=30, stop=["6"]))[0]
    assert out.finish_reason == "stop" and "6" not in out.text and out.text.strip().startswith("4")
    comma = llm.tokenizer.encode(",", add_bos=False)[-1]
    out = llm.generate("Count: 1, 2, 3,", SamplingParams(max_tokens=30, stop_token_ids=[comma]))[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == comma


def test_chat_and_batch_of_prompts(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}], SamplingParams(max_tokens=20))
    assert "Paris" in out.text
    outs = llm.generate(["The sky is", "Water is"], SamplingParams(max_tokens=5))
    assert len(outs) == 2 and all(len(o.token_ids) == 5 for o in outs)
    with pytest.raises(hi.InputError, match="non-empty list"):
        llm.chat([])
    with pytest.raises(hi.InputError, match="prompt is empty"):
        llm.generate("")
