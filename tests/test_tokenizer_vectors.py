"""Tokenizers against llama.cpp's own tokenizer test vectors: models/ggml-vocab-{llama-spm,
llama-bpe,qwen2}.gguf with their .inp / .out files (llama.cpp, MIT licence), taken from the
llama-cpp-python source distribution on PyPI (it vendors llama.cpp).

Set-up: HETINFER_LLAMA_VOCAB_DIR names a folder holding the files; else they are looked for in
~/.cache/hetinfer/llama-cpp-vocab, and fetched there once with `pip download` (the sdist is
about 75 MB; only the three vocabularies, their vectors and llama.cpp's LICENSE are kept).
The test skips when neither works (no network)."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

from hetinfer.loaders.gguf_file import read_gguf
from hetinfer.tokenizer import Tokenizer

VOCABS = ("llama-spm", "llama-bpe", "qwen2")
SDIST = "llama-cpp-python==0.3.36"
SEP = "\n__ggml_vocab_test__\n"


def _have(d: Path) -> bool:
    return all((d / f"ggml-vocab-{v}.gguf{s}").exists() for v in VOCABS for s in ("", ".inp", ".out"))


@pytest.fixture(scope="module")
def vocab_dir() -> Path:
    env = os.environ.get("HETINFER_LLAMA_VOCAB_DIR")
    if env:
        if not _have(Path(env)):
            pytest.fail(f"HETINFER_LLAMA_VOCAB_DIR={env} lacks the ggml-vocab-* files")
        return Path(env)
    d = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hetinfer" / "llama-cpp-vocab"
    if _have(d):
        return d
    with tempfile.TemporaryDirectory() as tmp:
        p = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            SDIST, "-d", tmp], capture_output=True, text=True, timeout=600)
        sd = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if p.returncode != 0 and not sd:
            pytest.skip(f"could not fetch {SDIST} for llama.cpp's vocab test vectors: {p.stderr[-300:]}")
        d.mkdir(parents=True, exist_ok=True)
        want = {f"ggml-vocab-{v}.gguf{s}" for v in VOCABS for s in ("", ".inp", ".out")}
        with tarfile.open(sd[0]) as tf:
            for m in tf.getmembers():
                name = Path(m.name).name
                if (m.name.endswith("vendor/llama.cpp/models/" + name) and name in want) or \
                        m.name.endswith("vendor/llama.cpp/LICENSE"):
                    data = tf.extractfile(m).read()
                    (d / ("LICENSE-llama.cpp" if name == "LICENSE" else name)).write_bytes(data)
    if not _have(d):
        pytest.skip(f"{SDIST} did not hold the ggml-vocab test files")
    return d


@pytest.mark.parametrize("vocab", VOCABS)
def test_llama_cpp_tokenizer_vectors(vocab_dir, vocab):
    path = vocab_dir / f"ggml-vocab-{vocab}.gguf"
    meta, _, _ = read_gguf(path)
    tok = Tokenizer.from_gguf_metadata(meta, path)
    inputs = (vocab_dir / f"ggml-vocab-{vocab}.gguf.inp").read_text(encoding="utf-8").split(SEP)
    if inputs and inputs[-1] == "":
        inputs = inputs[:-1]
    outputs = (vocab_dir / f"ggml-vocab-{vocab}.gguf.out").read_text(encoding="utf-8").split("\n")
    assert len(inputs) >= 40 and len(outputs) >= len(inputs)
    bad = []
    for i, text in enumerate(inputs):
        want = [int(x) for x in outputs[i].split()]
        got = tok.encode(text, add_bos=False)
        if got != want:
            bad.append((i, text, got, want))
    assert not bad, f"{len(bad)} of {len(inputs)} vectors differ, e.g. {bad[:3]}"
