"""Hostile requests get one clear hetinfer error (issue 12): sampling parameters checked when
SamplingParams is built, chat templates rendered under a budget and named in their errors,
max_context and the KV cache bounded by the model and the host, and the command line's bad
input (invalid UTF-8, ids outside the vocabulary, bad flag values) refused in one line."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import hetinfer as hi
from hetinfer import cli
from hetinfer.chat_template import CHATML, ChatTemplate, template_origin
from hetinfer.engine import kv_cache
from hetinfer.errors import ChatTemplateError, ConfigError, InputError, OutOfMemoryError
from hetinfer.sampling import SamplingParams
from hetinfer.template_sandbox import TemplateBudget

from _fixtures_loaders import hf_config, tiny_weights, train_bpe_tokenizer_json, write_gguf, write_hf_dir

# ---- sampling parameters ------------------------------------------------------------------------
# the documented range of every float parameter, written here independently of sampling.py
VALID = {
    "temperature": st.floats(0, 1e6),
    "top_p": st.floats(0, 1, exclude_min=True),
    "min_p": st.floats(0, 1),
    "repetition_penalty": st.floats(0, 1e6, exclude_min=True),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
}
OUT_OF_RANGE = {
    "temperature": st.floats(max_value=0, exclude_max=True, allow_infinity=False),
    "top_p": st.floats(max_value=0, allow_infinity=False) | st.floats(min_value=1, exclude_min=True,
                                                                       allow_infinity=False),
    "min_p": st.floats(max_value=0, exclude_max=True, allow_infinity=False) | st.floats(
        min_value=1, exclude_min=True, allow_infinity=False),
    "repetition_penalty": st.floats(max_value=0, allow_infinity=False),
    "presence_penalty": st.floats(max_value=-2, exclude_max=True, allow_infinity=False) | st.floats(
        min_value=2, exclude_min=True, allow_infinity=False),
    "frequency_penalty": st.floats(max_value=-2, exclude_max=True, allow_infinity=False) | st.floats(
        min_value=2, exclude_min=True, allow_infinity=False),
}
NON_FINITE = [math.nan, math.inf, -math.inf, np.float32("nan"), np.float64("inf")]


def _refused(name, **kw):
    with pytest.raises(InputError, match=rf"\b{name}\b") as e:
        SamplingParams(**kw)
    assert isinstance(e.value, ValueError)
    return str(e.value)


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(sorted(VALID)), bad=st.sampled_from(NON_FINITE))
def test_nan_and_infinities_are_refused_in_every_float_parameter(name, bad):
    msg = _refused(name, **{name: bad})
    assert repr(bad) in msg or str(bad) in msg


@settings(max_examples=120, deadline=None)
@given(data=st.data(), name=st.sampled_from(sorted(VALID)))
def test_float_parameters_in_range_are_accepted_and_out_of_range_refused(data, name):
    v = data.draw(VALID[name])
    p = SamplingParams(**{name: v})
    assert getattr(p, name) == v and isinstance(getattr(p, name), float)
    bad = data.draw(OUT_OF_RANGE[name])
    assert repr(bad) in _refused(name, **{name: bad})


@pytest.mark.parametrize("name", sorted(VALID))
@pytest.mark.parametrize("bad", ["0.5", True, None, [0.5], 1j])
def test_float_parameters_of_the_wrong_type_are_refused(name, bad):
    _refused(name, **{name: bad})


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**64 - 1))
def test_seeds_in_range_are_accepted(seed):
    assert SamplingParams(temperature=1.0, seed=seed).seed == seed


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(max_value=-1) | st.integers(min_value=2**64))
def test_seeds_out_of_range_are_refused(seed):
    assert str(seed) in _refused("seed", seed=seed)


@pytest.mark.parametrize("seed", [True, False, 1.0, 2.0**64, "1", math.nan])
def test_seeds_that_are_not_whole_numbers_are_refused(seed):
    _refused("seed", seed=seed)


@pytest.mark.parametrize("kw,name", [
    (dict(top_k=-2), "top_k"), (dict(top_k=1.5), "top_k"), (dict(top_k=True), "top_k"), (dict(top_k="5"), "top_k"),
    (dict(max_tokens=-1), "max_tokens"), (dict(max_tokens=2.0), "max_tokens"), (dict(max_tokens=True), "max_tokens"),
    (dict(stop=[1, 2]), "stop"), (dict(stop=5), "stop"), (dict(stop=["ok", None]), "stop"), (dict(stop=[""]), "stop"),
    (dict(stop_token_ids=[1.5]), "stop_token_ids"), (dict(stop_token_ids=["3"]), "stop_token_ids"),
    (dict(stop_token_ids=[True]), "stop_token_ids"), (dict(stop_token_ids=5), "stop_token_ids"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"), (dict(ignore_eos="yes"), "ignore_eos"),
])
def test_wrong_types_are_refused_at_construction(kw, name):
    _refused(name, **kw)


def test_accepted_forms_are_normalised():
    p = SamplingParams(top_k=-1, stop="x", stop_token_ids=(np.int64(4), 5), seed=np.uint64(7), max_tokens=0)
    assert (p.top_k, p.stop, p.stop_token_ids, p.seed, p.max_tokens) == (0, ["x"], [4, 5], 7, 0)
    assert type(p.seed) is int and all(type(t) is int for t in p.stop_token_ids)


# ---- chat templates under a budget --------------------------------------------------------------------
ORIGIN = "TEST-ORIGIN"
MSGS = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Tell me a fact"}]

HOSTILE = [
    ("{{ 'a' * 10**10 }}", "10000000000 characters"),
    ("{% set n = 10 %}{{ 'ab' * n ** 10 }}", r"\* would make"),
    ("{{ [0] * 10**12 }}", r"\* would make"),
    ("{{ 9 ** (9 ** 9) }}", "bits"),
    ("{% for i in range(10**10) %}{% endfor %}", r"range\(\) of 10000000000 items"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "steps"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}", "steps|characters"),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "nested more than 64 deep"),
    ("{% for x in range(3) recursive %}{{ loop(range(3)) }}{% endfor %}", "nested more than 64 deep"),
    ("{% set ns = namespace(s='a') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}", r"\+ would"),
    ("{% set ns = namespace(s='a') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "~ would"),
    ("{{ 'a'|center(10**9) }}", "integer argument"),
    ("{{ 'a'.ljust(10**9) }}", "integer argument"),
    ("{{ (5).to_bytes(10**9, 'big') }}", "integer argument"),
    ("{{ '{:>1000000000}'.format('a') }}", "str.format would make"),
    ("{{ '%1000000000s' % 'a' }}", "% would make"),
    ("{{ '%*s' % (1000000000, 'a') }}", "% would make"),
    ("{% set s = 'a' * 1000000 %}{{ s|replace('a', s) }}", "replace filter"),
    ("{% set s = 'a' * 1000000 %}{{ ([s] * 1000)|join }}", "join filter"),
    ("{% set s = 'a' * 1000000 %}{{ ''.join([s] * 1000) }}", "str.join"),
    ("{% set s = 'a' * 1000000 %}{{ [s] * 1000 }}", "an output would make"),
    ("{% set s = 'a\n' * 100000 %}{{ s|indent(60000) }}", "indent filter"),
    ("{% set s = 'a' * 100000 %}{{ s.translate({97: 'b' * 60000}) }}", "str.translate"),
    ("{{ ('\t' * 100000).expandtabs(60000) }}", "str.expandtabs"),
    ("{{ [1]|batch(10**9, 0)|list }}", "integer argument"),
    ("{{ ([[1]] * 100000)|sum(start=[])|length }}", "sum filter"),
    ("{{ range(1000)|list|tojson(indent=1000000) }}", "integer argument"),
    ("{% set s = 'a' * 1000000 %}{% macro m() %}{% for i in range(10000) %}{{ s }}{% endfor %}{% endmacro %}"
     "{{ m()|length }}", "characters made"),
    ("{% macro m() %}{% for i in range(100000) %}" + "x" * 1000 + "{% endfor %}{% endmacro %}{{ m() }}",
     "characters made"),
    ("{% set s = 'a' * 4000000 %}{% for i in range(100000) %}{% set t = s[1:] %}{% endfor %}", "characters made"),
    ("{% for i in range(100000) %}{{ 'a' * 100 }}{% endfor %}", "rendered text passed"),
    ("{{ lipsum(10**6) }}", "'lipsum' is undefined"),
    ("{{ 1 // 0 }}", "ZeroDivisionError"),
    ("{{ 'a' + 1 }}", "TypeError"),
    ("{{ foo.bar.baz }}", "UndefinedError"),
    ("{{ ''.__class__.__mro__ }}", "SecurityError"),
    ("{{ raise_exception('roles must alternate') }}", "refused these messages: roles must alternate"),
    ("{% for %}", "syntax error at line 1"),
    ("{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}", "nests too deeply|syntax error"),
    ("x" * (2 << 20), "characters; at most"),
]


@pytest.mark.parametrize("source,why", HOSTILE, ids=[f"h{i}" for i in range(len(HOSTILE))])
def test_a_hostile_template_is_one_clear_error_naming_its_source(source, why):
    with pytest.raises(ChatTemplateError, match=why) as e:
        ChatTemplate(source, origin=ORIGIN).render(MSGS)
    assert ORIGIN in str(e.value) and isinstance(e.value, InputError)


def test_deep_recursion_past_python_limit_is_a_clear_error():
    t = ChatTemplate("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", origin=ORIGIN,
                     budget=TemplateBudget(max_depth=10**6))
    with pytest.raises(ChatTemplateError, match="nests too deeply"):
        t.render(MSGS)


def test_slow_work_the_sandbox_cannot_see_is_bounded_by_cpu_time():
    src = ("{% set s = 'a' * 4000000 %}{% set u = 'a' * 4000000 %}"
           "{% for i in range(100000) %}{% if s == u %}{% endif %}{% endfor %}")
    with pytest.raises(ChatTemplateError, match="CPU time"):
        ChatTemplate(src, origin=ORIGIN, budget=TemplateBudget(max_seconds=0.05)).render(MSGS)


LEGIT = [
    CHATML,
    "{% for m in messages %}{{ loop.index }}/{{ loop.length }} {{ m['role'] }}: {{ m.content|trim }}"
    "{% if not loop.last %}\n{% endif %}{% endfor %}",
    "{% set ns = namespace(n=0, text='') %}{% for m in messages if m.role == 'user' %}{% set ns.n = ns.n + 1 %}"
    "{% set ns.text = ns.text ~ m.content[:3] %}{% endfor %}{{ ns.n }} {{ ns.text }} {{ messages[-1:] }}",
    "{% macro fact(n) %}{% if n <= 1 %}1{% else %}{{ n * fact(n - 1)|int }}{% endif %}{% endmacro %}{{ fact(12) }}",
    "{% macro w() %}[{{ caller() }}]{% endmacro %}{% call w() %}{{ messages|map(attribute='role')|join(',') }}"
    "{% endcall %}",
    "{{ '{}-{:>5}'.format('a', 'b') }} {{ '%s=%03d'|format('x', 7) }} {{ '%(a)s' % {'a': 1} }} {{ 2 ** 100 }}",
    "{{ messages|tojson }} {{ {'k': [1, 2, 'é']}|tojson(indent=2) }} {{ range(1000)|sum }} {{ '-' * 80 }}",
    "{% for x in [[1, [2]], [3]] recursive %}({% if x is iterable %}{{ loop(x) }}{% else %}{{ x }}{% endif %})"
    "{% endfor %}",
    "{{ bos_token }}{% for m in messages %}{{ m.content|upper|replace('I', 'i') }}{{ eos_token }}{% endfor %}",
]


@pytest.mark.parametrize("source", LEGIT, ids=[f"t{i}" for i in range(len(LEGIT))])
def test_ordinary_templates_render_as_plain_jinja2_does(source):
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    special = {"bos_token": "<s>", "eos_token": "</s>"}
    want = env.from_string(source).render(messages=MSGS, add_generation_prompt=True, **special)
    assert ChatTemplate(source, special).render(MSGS) == want


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = write_hf_dir(tmp_path_factory.mktemp("hf") / "m", tiny_weights(vocab=400), hf_config(vocab=400))
    train_bpe_tokenizer_json(d)
    return d


def _with_template(src_dir, dst, template=None, jinja=None):
    import shutil
    shutil.copytree(src_dir, dst)
    tc = json.loads((dst / "tokenizer_config.json").read_text())
    tc.pop("chat_template")
    if template is not None:
        tc["chat_template"] = template
    (dst / "tokenizer_config.json").write_text(json.dumps(tc))
    if jinja is not None:
        (dst / "chat_template.jinja").write_text(jinja)
    return dst


def test_template_errors_name_the_file_they_came_from(hf_dir, tmp_path):
    from hetinfer.loaders import load_checkpoint
    d = _with_template(hf_dir, tmp_path / "a", template="{{ 1 // 0 }}")
    with pytest.raises(ChatTemplateError, match=re.escape(f"chat_template in {d / 'tokenizer_config.json'}")
                       + ".*ZeroDivisionError"):
        ChatTemplate.from_checkpoint(load_checkpoint(d, progress=False)).render(MSGS)
    d = _with_template(hf_dir, tmp_path / "b", jinja="{% for %}")
    with pytest.raises(ChatTemplateError, match=re.escape(str(d / "chat_template.jinja")) + ".*syntax error"):
        ChatTemplate.from_checkpoint(load_checkpoint(d, progress=False))
    g = write_gguf(tmp_path / "t.gguf", tiny_weights())
    ck = load_checkpoint(g, progress=False)
    assert template_origin(ck) == f"GGUF metadata tokenizer.chat_template of {g}"
    with pytest.raises(ChatTemplateError, match=re.escape(f"GGUF metadata tokenizer.chat_template of {g}")):
        ChatTemplate("{{ 'a' * 10**10 }}", origin=template_origin(ck)).render(MSGS)


# ---- max_context and the KV cache ------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0, -1, 1, 1.5, True, "64"])
def test_max_context_that_is_not_a_whole_number_of_at_least_2_is_refused(hf_dir, bad):
    with pytest.raises(ConfigError, match="max_context must be a whole number >= 2"):
        hi.engine.load(hf_dir, max_context=bad, progress=False)


def test_max_context_above_the_model_limit_is_refused(hf_dir):
    with pytest.raises(ConfigError, match=r"max_context 65 is above the context limit .*\(64 tokens"):
        hi.engine.load(hf_dir, max_context=65, progress=False)
    with pytest.raises(ConfigError, match="above the context limit"):
        hi.LLM(str(hf_dir), max_context=10_000)
    model, _ = hi.engine.load(hf_dir, max_context=64, progress=False)
    assert model.max_context == 64


def test_kv_cache_larger_than_host_memory_is_refused_before_allocating(hf_dir, monkeypatch):
    model, _ = hi.engine.load(hf_dir, max_context=64, progress=False)
    with pytest.raises(OutOfMemoryError, match="more than the host has available"):
        kv_cache.plan_budget(model, 16, 64, kv_cache_memory=1 << 60)
    cfg = model.config
    per_block = 2 * cfg.num_hidden_layers * 16 * cfg.num_key_value_heads * cfg.head_dim * 4     # f32 K and V
    monkeypatch.setattr(kv_cache, "host_available_bytes", lambda: 3 * per_block)
    with pytest.raises(OutOfMemoryError, match=r"holds 2 blocks .* needs 4 \(the host has"):
        kv_cache.plan_budget(model, 16, 64)                   # the default budget: 90% of 3 blocks
    monkeypatch.setattr(kv_cache, "host_available_bytes", lambda: 100 * per_block)
    assert kv_cache.plan_budget(model, 16, 64).num_blocks == 90


def test_host_available_memory_is_read():
    import os
    avail = kv_cache.host_available_bytes()
    assert avail is not None and 0 < avail <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


# ---- the command line ---------------------------------------------------------------------------------
def _main(capsys, *argv):
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err.strip().splitlines()[-1] if err.strip() else ""


BAD_FLAGS = [
    ("--temperature", "nan"), ("--temperature", "-1"), ("--temperature", "hot"), ("--top-p", "0"),
    ("--top-p", "inf"), ("--top-p", "abc"), ("--min-p", "nan"), ("--repetition-penalty", "0"),
    ("--presence-penalty", "3"), ("--frequency-penalty", "-inf"), ("--top-k", "-2"), ("--top-k", "1.5"),
    ("--seed", "-1"), ("--seed", "1.5"), ("--seed", str(2**64)), ("-n", "0"), ("-n", "many"),
    ("--max-context", "0"), ("--max-context", "-3"), ("--max-context", "1"), ("--stop", ""), ("--stop-id", "-1"),
    ("--stop-id", "x"), ("--kv-cache-memory", "inf"), ("--kv-cache-memory", "nan"), ("--kv-cache-memory", "-2G"),
    ("--gpu-memory-utilization", "nan"), ("--block-size", "0"), ("--device", "cu da"), ("--device", "cuda:x"),
    ("--dtype", "f64"),
]


@pytest.mark.parametrize("flag,value", BAD_FLAGS)
def test_every_bad_flag_value_is_an_argparse_error(capsys, flag, value):
    rc, last = _main(capsys, "generate", flag, value, "hello")
    assert rc == 2 and "error: argument" in last
    assert flag.lstrip("-").split("-")[0] in last


def test_max_context_above_the_model_limit_on_the_command_line(capsys, hf_dir):
    rc, last = _main(capsys, "generate", "--model", hf_dir, "--max-context", "65", "hello")
    assert rc == 2 and last.startswith("hetinfer: error: max_context 65 is above the context limit")


def test_tokenize_decode_checks_ids_against_the_vocabulary(capsys, hf_dir):
    from hetinfer.loaders import load_checkpoint
    tok = load_checkpoint(hf_dir, progress=False).tokenizer
    v = tok.vocab_size
    for text, why in ((f"5 {v}", f"token id {v} is outside the vocabulary [0, {v})"),
                      ("5,-1", f"token id -1 is outside the vocabulary [0, {v})"),
                      ("5 x", "'x' is not a token id"), ("5 1.5", "'1.5' is not a token id"),
                      ("9" * 400, f"outside the vocabulary [0, {v})")):
        rc, last = _main(capsys, "tokenize", "--model", hf_dir, "--decode", text)
        assert rc == 2 and last.startswith("hetinfer: error: ") and why in last, (text, last)
    assert cli.main(["tokenize", "--model", str(hf_dir), "--decode", "5, 6 7"]) == 0
    assert capsys.readouterr().out == tok.decode([5, 6, 7]) + "\n"


def test_invalid_utf8_from_argv_is_one_clear_error(capsys, hf_dir):
    # what Python makes of argv bytes that are not UTF-8: surrogate escapes
    rc, last = _main(capsys, "tokenize", "--model", hf_dir, b"ab\xffcd".decode("utf-8", "surrogateescape"))
    assert rc == 2 and last == "hetinfer: error: the text is not valid UTF-8 at byte 2"
    p = subprocess.run([sys.executable, "-m", "hetinfer", "generate", "--model", str(hf_dir), b"\xe2\x82x"],
                       capture_output=True, timeout=300)
    err = p.stderr.decode()
    assert p.returncode == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == "hetinfer: error: the prompt is not valid UTF-8 at byte 0"


def test_invalid_utf8_from_stdin_is_one_clear_error(hf_dir):
    p = subprocess.run([sys.executable, "-m", "hetinfer", "tokenize", "--model", str(hf_dir), "-"],
                       input="héllo".encode()[:2] + b"\xfe rest", capture_output=True, timeout=300)
    err = p.stderr.decode()
    assert p.returncode == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == "hetinfer: error: the text read from stdin is not valid UTF-8 at byte 1"


# ---- regressions found by tools/fuzz_inputs.py (each one root cause) ----------------------------------
@pytest.mark.parametrize("name", ["temperature", "top_p", "repetition_penalty", "presence_penalty"])
def test_an_integer_beyond_the_float_range_is_refused(name):
    """10**400: math.isfinite raised OverflowError (sampling._number)."""
    _refused(name, **{name: 10 ** 400})


def test_extreme_values_that_float32_cannot_hold_still_sample(hf_dir):
    """top_k 2**70 overflowed the sampler's int32 row (OverflowError at the first step); a
    temperature of 1e300 became inf and a repetition penalty of 1e-300 became 0 in float32 (the
    penalties op then refused it mid-generation). Clamped where the rows are filled."""
    llm = hi.LLM(str(hf_dir), max_context=64, kv_cache_memory=16 << 20)
    for kw in (dict(top_k=2 ** 70, temperature=1.0, seed=1), dict(temperature=1e300, seed=2),
               dict(repetition_penalty=1e-300), dict(repetition_penalty=1e300, top_p=1e-300, temperature=1.0)):
        out = llm.generate("Hello", SamplingParams(max_tokens=3, ignore_eos=True, **kw))[0]
        assert len(out.token_ids) == 3, kw


@pytest.mark.parametrize("prompt", [None, 1.5, b"Hello", ["a", 1], {1, 2}, "Hello \ud800"])
def test_prompts_of_the_wrong_type_are_one_input_error(hf_dir, prompt):
    """None / a float / ["a", 1] raised TypeError inside LLM.generate; bytes were taken as token
    ids; a lone surrogate reached the tokenizers library (TypeError)."""
    llm = hi.LLM(str(hf_dir), max_context=64, kv_cache_memory=16 << 20)
    with pytest.raises(InputError):
        llm.generate(prompt, SamplingParams(max_tokens=2))


def test_template_that_renders_a_lone_surrogate():
    """'\\ud800' written in a template reached the tokenizer (TypeError: TextInputSequence must be str)."""
    with pytest.raises(ChatTemplateError, match="lone surrogate"):
        ChatTemplate("{{ '\\ud800' }}", origin="T").render(MSGS)


def test_weights_that_do_not_fit_are_an_out_of_memory_error(hf_dir, monkeypatch):
    """numpy's MemoryError ('Unable to allocate ...') while the model converted its weights
    escaped as a traceback; engine.load turns it into an OutOfMemoryError with the numbers."""
    from hetinfer import plugins
    cls = plugins.models()["LlamaForCausalLM"]

    def refuse(*a, **k):
        raise MemoryError("Unable to allocate 512. MiB for an array")
    monkeypatch.setattr(cls, "from_checkpoint", classmethod(lambda c, *a, **k: refuse()))
    with pytest.raises(OutOfMemoryError, match=r"do not fit in host memory .*Unable to allocate .*GiB available"):
        hi.engine.load(hf_dir, progress=False)


@pytest.mark.parametrize("delay", [0.0, 0.2, 0.6, 1.5])
def test_an_interrupt_during_start_up_exits_quietly_with_130(delay):
    """Ctrl-C while the model loads (after Python's own imports: the first progress byte on
    stderr), while kernels build and during the first tokens: exit status 130 and the one line
    "interrupted", never a traceback (a run that finished first exits 0)."""
    import signal
    import subprocess
    import sys
    import time
    p = subprocess.Popen([sys.executable, "-m", "hetinfer", "generate", "-n", "64", "Hello"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = p.stderr.read(1)                     # start-up has begun printing (loading the model)
    time.sleep(delay)
    p.send_signal(signal.SIGINT)
    rest = p.stderr.read()
    p.wait(timeout=120)
    err = (first + rest).decode(errors="replace")
    assert "Traceback" not in err, err
    assert p.returncode in (130, 0), (p.returncode, err)
    if p.returncode == 130:
        assert err.strip().splitlines()[-1].endswith("interrupted"), err
