"""Chat: templates rendered exactly as HF's apply_chat_template, a session that keeps
the KV cache between turns, context overflow, and a real terminal session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

import hetinfer as hi
from hetinfer.chat import ChatSession
from hetinfer.chat_template import ChatTemplate
from hetinfer.sampling import SamplingParams
from _fixtures_loaders import smollm2_path

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"}],
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."},
     {"role": "user", "content": "And 3+3?"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Good morning"},
     {"role": "assistant", "content": "Bonjour !"}, {"role": "user", "content": "Thanks, bye 👋"}],
]


def qwen_path():
    p = Path(os.environ.get("HETINFER_QWEN_GGUF",
                            Path.home() / ".cache/hetinfer/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"))
    if not p.exists():
        pytest.skip("Qwen2.5 GGUF not fetched (../shared/models/fetch-qwen2.5-0.5b.sh)")
    return p


def check_against_hf(path):
    transformers = pytest.importorskip("transformers")
    from hetinfer.loaders import load_checkpoint
    ours = ChatTemplate.from_checkpoint(load_checkpoint(path, progress=False))
    assert not ours.fallback
    hf = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for msgs in CONVERSATIONS:
        for gen_prompt in (True, False):
            want = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen_prompt)
            assert ours.render(msgs, add_generation_prompt=gen_prompt) == want


def test_smollm2_template_renders_like_hf():
    check_against_hf(smollm2_path())


@pytest.mark.slow
def test_qwen25_template_renders_like_hf():
    check_against_hf(qwen_path())


def test_chatml_fallback_and_bad_messages(capsys):
    t = ChatTemplate(None, name="tiny-test-model")
    assert "no chat template" in capsys.readouterr().err
    assert t.render([{"role": "user", "content": "hi"}]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(hi.InputError, match="non-empty list"):
        t.render([])
    with pytest.raises(hi.InputError, match="unknown role 'wizard'"):
        t.render([{"role": "wizard", "content": "abracadabra"}])
    with pytest.raises(hi.InputError, match="'role' and 'content'"):
        t.render([{"content": "no role"}])


@pytest.fixture(scope="module")
def tiny_gen(tmp_path_factory):
    pytest.importorskip("torch")
    from tiny_models import make_tiny
    from hetinfer.engine import Generator, load
    d, _ = make_tiny(tmp_path_factory.mktemp("chat"), "qwen2-bias-tied")
    model, ckpt = load(d, max_context=128, progress=False)
    return Generator(model, ckpt.tokenizer, 128, block_size=4)     # prefix caching by blocks of 4


WORD_TEMPLATE = ("{% for m in messages %}w3 {{ 'w5' if m['role'] == 'assistant' else 'w6' }} "
                 "{{ m['content'] }} w4 {% endfor %}{% if add_generation_prompt %}w3 w5{% endif %}")


def test_second_turn_prefills_only_the_new_tokens(tiny_gen):
    s = ChatSession(tiny_gen, ChatTemplate(WORD_TEMPLATE), params=SamplingParams(max_tokens=6, ignore_eos=True))
    "".join(s.send("w10 w11 w12"))
    first = tiny_gen.stats.prompt_tokens
    assert first == 8 and tiny_gen.stats.cached_tokens == 0
    "".join(s.send("w20 w21"))
    full = tiny_gen.tokenizer.encode(s.template.render(s.messages[:-1]), add_bos=False)
    st = tiny_gen.stats
    assert st.cached_tokens + st.prompt_tokens == len(full)
    assert st.cached_tokens >= first          # the whole first turn came from the cached blocks
    assert st.cached_tokens % 4 == 0
    assert st.prompt_tokens < len(full) - first + 8


def test_overflowing_conversation_drops_oldest_turns(tiny_gen):
    s = ChatSession(tiny_gen, ChatTemplate(WORD_TEMPLATE), system="w9",
                    params=SamplingParams(max_tokens=4, ignore_eos=True), reply_room=16)
    for i in range(12):
        "".join(s.send(" ".join(f"w{30 + i}" for _ in range(12))))
    assert any("dropped" in n for n in s.notices)
    assert s.messages[0] == {"role": "system", "content": "w9"}
    assert len(tiny_gen.cached) <= tiny_gen.max_context
    with pytest.raises(hi.InputError, match="context holds 128"):
        "".join(s.send("w7 " * 200))


def test_terminal_chat_remembers_the_first_turn():
    """Two turns through a pseudo-terminal: the second answer uses the first."""
    pexpect = pytest.importorskip("pexpect")
    smollm2_path()
    # --dtype f32: the file's weights widened, so the greedy answer is the float model's (the
    # packed default rounds activations to 8 bits, and this 135M model then forgets the fruit)
    c = pexpect.spawn(sys.executable, ["-m", "hetinfer", "chat", "--temperature", "0", "-n", "40",
                                       "--dtype", "f32", "--max-context", "1024"], encoding="utf-8", timeout=240)
    try:
        c.expect("> ")
        c.sendline("My favourite fruit is mango.")
        c.expect("> ")
        c.sendline("What is my favourite fruit?")
        c.expect("> ")
        answer = c.before.split("What is my favourite fruit?", 1)[1]
        assert "mango" in answer.lower()
        c.sendline("/reset")
        c.expect(r"\[conversation cleared\]")
        c.sendline("/exit")
        c.expect(pexpect.EOF)
    finally:
        c.close(force=True)


def test_ctrl_c_stops_the_answer_and_keeps_the_session():
    pexpect = pytest.importorskip("pexpect")
    smollm2_path()
    c = pexpect.spawn(sys.executable, ["-m", "hetinfer", "chat", "--temperature", "0", "-n", "400"],
                      encoding="utf-8", timeout=240)
    try:
        c.expect("> ")
        c.sendline("Write a long story about a dragon who learns to bake bread.")
        c.expect_exact("bake bread.")            # the terminal's echo of the line, not the answer
        c.expect(r"\w+\s+\w+\s+\w+")            # the answer has started streaming
        c.sendintr()
        c.expect(r"\[stopped\]")
        c.expect("> ")                          # the session goes on
        c.sendline("What is the capital of France?")
        c.expect("> ")
        assert "paris" in c.before.lower()
        c.sendline("/exit")
        c.expect(pexpect.EOF)
    finally:
        c.close(force=True)
