"""A bounded pass of tools/fuzz_inputs.py's corpus of malformed inputs (issue 12) through the Python
API, in-process: a seeded sample of ~100 cases, stratified over the families (GGUF, HF directories,
int8 directories, llama2.c, special paths, chat templates, requests, resources), each run as
load_checkpoint + hetinfer.LLM(...).generate / .chat / SamplingParams(...). Every case must end
normally or in a HetinferError: never another exception, and never a hang (each case runs in a
thread that must finish). The full sweep, through the CLI in subprocesses under time and memory
limits, is `python tools/fuzz_inputs.py`."""

from __future__ import annotations

import importlib.util
import random
import threading
import time
import traceback
from pathlib import Path

import pytest

from hetinfer.errors import HetinferError

TOOL = Path(__file__).resolve().parent.parent / "tools" / "fuzz_inputs.py"
SAMPLE = 100
CASE_TIMEOUT_S = 30


def _tool():
    spec = importlib.util.spec_from_file_location("fuzz_inputs", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    fz = _tool()
    cases = [c for c in fz.build(tmp_path_factory.mktemp("fuzz"), seed=0) if c.get("api")]
    rng = random.Random(12)
    by_family: dict[str, list] = {}
    for c in cases:
        by_family.setdefault(c["family"], []).append(c)
    picked = []
    for fam, cs in sorted(by_family.items()):  # every family, in proportion, at least 4
        k = min(len(cs), max(4, round(SAMPLE * len(cs) / len(cases))))
        picked += rng.sample(cs, k)
    return fz, picked


def _run(fz, case):
    """('ok' | 'error' | 'other', detail) of one case's API path, in a thread that must finish."""
    box = {}

    def target():
        try:
            fz.api_call(case["api"])
            box["r"] = ("ok", "")
        except HetinferError as e:
            box["r"] = ("error", f"{type(e).__name__}: {e}")
        except BaseException as e:  # noqa: BLE001 - what the test is looking for
            box["r"] = ("other", "".join(traceback.format_exception(e))[-2000:])

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(CASE_TIMEOUT_S)
    if t.is_alive():
        return "hang", f"still running after {CASE_TIMEOUT_S} s"
    return box["r"]


def test_corpus_is_large_and_covers_every_family(sample):
    fz, picked = sample
    assert len(picked) >= SAMPLE * 0.9
    assert {c["family"] for c in picked} >= {"gguf", "hf", "int8", "llama2c", "paths", "template", "api", "resources"}


def test_sampled_malformed_inputs_end_in_a_hetinfer_error_or_load(sample):
    fz, picked = sample
    t0 = time.perf_counter()
    bad, seen = [], {"ok": 0, "error": 0}
    for case in picked:
        cls, detail = _run(fz, case)
        if cls in seen:
            seen[cls] += 1
            if cls == "ok" and case["expect"] == "error":
                bad.append(f"{case['id']}: accepted, but it is corrupt")
        else:
            bad.append(f"{case['id']}: {cls}\n{detail}")
        if cls == "error":  # one line (a path with a newline in it aside)
            one = detail.replace(str(case["api"].get("path", "")), "")
            assert "\n" not in one.strip(), f"{case['id']}: a multi-line error: {detail}"
    assert not bad, "\n\n".join(bad)
    assert seen["error"] > seen["ok"] > 0  # mostly refusals; the valid bases load
    assert time.perf_counter() - t0 < 60
