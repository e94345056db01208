"""The streaming hot path writes its chunks from a fixed head and the encoded text
(app.text_chunk); they must be the same bytes as the general path (_sse of the chunk's dict),
and parse back to the same object, for any text."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, strategies as st

pytest.importorskip("hetinfer_serve", reason="hetinfer-serve is not installed (pip install -e serve)")

from hetinfer_serve.app import _sse, chunk_head, text_chunk  # noqa: E402


@given(text=st.text(min_size=1), chat=st.booleans(), index=st.integers(0, 10**4),
       finish=st.sampled_from([None, "stop", "length"]), model=st.text(max_size=20),
       created=st.integers(0, 2**40))
def test_text_chunk_is_the_sse_of_its_dict(text, chat, index, finish, model, created):
    cid, obj = "chatcmpl-1f" if chat else "cmpl-2e", "chat.completion.chunk" if chat else "text_completion"
    choice = ({"index": index, "delta": {"content": text}, "logprobs": None, "finish_reason": finish} if chat else
              {"index": index, "text": text, "logprobs": None, "finish_reason": finish})
    want = {"id": cid, "object": obj, "created": created, "model": model, "choices": [choice]}
    got = text_chunk(chunk_head(cid, obj, created, model), chat, index, text, finish)
    assert got == _sse(want)
    assert got.startswith(b"data: ") and got.endswith(b"\n\n")
    assert json.loads(got[6:].decode()) == want
