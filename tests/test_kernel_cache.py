"""Kernel caches nobody else can plant (hetinfer.kernel_cache): the CPU backend's compiled
shared objects (int8.build_library, loaded with ctypes) and the CUDA backend's CUBINs
(driver.compile_cubin). A planted library answers 7 where the real one answers 42: a planted
file that is not owned by this user, is writable by others, is a symlink, does not match its
recorded digest or sits in a directory others can write is never loaded (the answer stays 42)
and is rebuilt with a warning; an untampered entry IS loaded (the positive control below), so
each of these tests can fail. The tests run as root and use os.chown to fake another user."""

from __future__ import annotations

import ctypes
import hashlib
import os
import stat
import subprocess

import pytest

from hetinfer import kernel_cache as kc
from hetinfer.kernel_cache import DIGEST_SUFFIX, KernelCache, KernelCacheWarning
from hetinfer_cpu import int8

OTHER_UID = 4242
GOOD = "int hi_answer(void) { return 42; }\n"
EVIL = "int hi_answer(void) { return 7; }\n"
FLAGS = ["-O1"]

needs_cc = pytest.mark.skipif(int8._compiler() is None, reason="no C compiler")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="os.chown to another uid needs root")


def _declare(lib):
    lib.hi_answer.restype = ctypes.c_int
    lib.hi_answer.argtypes = []


def _umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old


@pytest.fixture
def cpu_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "hetinfer" / "cpu"


def _source(tag: str) -> str:
    return GOOD + f"/* {tag} */\n"          # a key of its own per test: no dlopen handle is shared


def _entry(source: str) -> str:
    cc, version = int8._compiler()
    return f"probe_{int8.library_key(source, cc, version, FLAGS)}.so"


def _build(source: str):
    return int8.build_library("probe", source, _declare, flag_sets=(FLAGS,))


def _compile(tmp_path, source: str, name: str) -> bytes:
    src, out = tmp_path / f"{name}.c", tmp_path / f"{name}.so"
    src.write_text(source)
    subprocess.run([int8._compiler()[0], "-O1", "-fPIC", "-shared", str(src), "-o", str(out)], check=True)
    return out.read_bytes()


def _plant(directory, name: str, data: bytes, digest: str | None = None):
    """A file as a local attacker (or a stale build) would leave it: private modes, and a
    correct digest unless told otherwise."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / name
    path.write_bytes(data)
    path.chmod(0o600)
    side = directory / (name + DIGEST_SUFFIX)
    side.write_text((digest or hashlib.sha256(data).hexdigest()) + "\n")
    side.chmod(0o600)
    return path


def _assert_rebuilt(path):
    st = os.lstat(path)
    assert stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) == 0o600
    want = (path.parent / (path.name + DIGEST_SUFFIX)).read_text().strip()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == want


@needs_cc
def test_a_trusted_cached_library_is_loaded_as_it_is(cpu_cache, tmp_path):
    """The positive control: an entry owned by this user, 0600, whose digest matches, is used
    without compiling, so the planted code runs (the checks below are what keep it out)."""
    source = _source("control")
    _plant(cpu_cache, _entry(source), _compile(tmp_path, EVIL, "evil"))
    assert _build(source).hi_answer() == 7


@needs_cc
def test_a_fresh_build_is_private_with_its_digest_and_leaves_the_umask_alone(cpu_cache):
    old = os.umask(0)            # the most permissive umask: modes come from os.open / makedirs
    try:
        lib = _build(_source("fresh"))
        assert _umask() == 0
    finally:
        os.umask(old)
    assert lib.hi_answer() == 42
    assert stat.S_IMODE(os.stat(cpu_cache).st_mode) == 0o700
    so = cpu_cache / _entry(_source("fresh"))
    _assert_rebuilt(so)
    assert stat.S_IMODE(os.stat(str(so) + DIGEST_SUFFIX).st_mode) == 0o600
    assert not [p for p in os.listdir(cpu_cache) if p.endswith(".tmp") or p.startswith(".build-")]


def _other_owner(path, tmp_path):
    os.chown(path, OTHER_UID, -1)


def _group_writable(path, tmp_path):
    path.chmod(0o620)


def _other_writable(path, tmp_path):
    path.chmod(0o602)


def _symlink(path, tmp_path):
    target = tmp_path / "elsewhere.so"
    target.write_bytes(path.read_bytes())
    target.chmod(0o600)
    path.unlink()
    path.symlink_to(target)


def _digest_mismatch(path, tmp_path):
    (path.parent / (path.name + DIGEST_SUFFIX)).write_text("0" * 64 + "\n")


def _no_digest(path, tmp_path):
    (path.parent / (path.name + DIGEST_SUFFIX)).unlink()


def _digest_of_other_owner(path, tmp_path):
    os.chown(path.parent / (path.name + DIGEST_SUFFIX), OTHER_UID, -1)


TAMPER = {
    "owned by another user": (_other_owner, "owned by uid 4242"),
    "group-writable file": (_group_writable, "writable by group or others"),
    "other-writable file": (_other_writable, "writable by group or others"),
    "symlink": (_symlink, "symbolic link"),
    "digest mismatch": (_digest_mismatch, "does not match the sha256"),
    "no digest": (_no_digest, "no recorded digest"),
    "digest file of another user": (_digest_of_other_owner, "owned by uid 4242"),
}


@needs_cc
@needs_root
@pytest.mark.parametrize("case", list(TAMPER))
def test_a_tampered_cached_library_is_not_loaded_but_rebuilt_with_a_warning(case, cpu_cache, tmp_path):
    tamper, why = TAMPER[case]
    source = _source(case)
    path = _plant(cpu_cache, _entry(source), _compile(tmp_path, EVIL, "evil"))
    tamper(path, tmp_path)
    with pytest.warns(KernelCacheWarning, match=why):
        lib = _build(source)
    assert lib.hi_answer() == 42
    _assert_rebuilt(path)


def _dir_group_writable(d):
    d.chmod(0o770)


def _dir_other_owner(d):
    os.chown(d, OTHER_UID, -1)


@needs_cc
@needs_root
@pytest.mark.parametrize("tamper,why", [(_dir_group_writable, "writable by group or others"),
                                        (_dir_other_owner, "owned by uid 4242")])
def test_a_cache_directory_others_control_is_not_used(tamper, why, cpu_cache, tmp_path):
    """Even an entry with a matching digest is not loaded from a directory others can write:
    the build goes to a fresh private directory, with a warning, and leaves the planted file."""
    source = _source(why)
    evil = _compile(tmp_path, EVIL, "evil")
    path = _plant(cpu_cache, _entry(source), evil)
    tamper(cpu_cache)
    with pytest.warns(KernelCacheWarning, match=why):
        lib = _build(source)
    assert lib.hi_answer() == 42
    assert path.read_bytes() == evil
    used = KernelCache(cpu_cache).directory()
    assert used != cpu_cache and stat.S_IMODE(os.stat(used).st_mode) == 0o700
    _assert_rebuilt(used / path.name)


def test_a_cache_directory_that_is_a_file_falls_back(tmp_path):
    (tmp_path / "cache").write_text("not a directory")
    with pytest.warns(KernelCacheWarning, match="not a directory|cannot be created"):
        d = kc.private_dir(tmp_path / "cache" / "cuda")
    assert d.is_dir() and stat.S_IMODE(os.stat(d).st_mode) == 0o700


def test_entry_names_are_plain_file_names(tmp_path):
    cache = KernelCache(tmp_path / "c")
    for bad in ("../x.so", "", ".hidden", "a/b"):
        with pytest.raises(ValueError, match="plain file name"):
            cache.store(bad, b"x")


# ---- the CUDA module cache: the same rules, no GPU needed ------------------------------------------
@pytest.fixture
def cuda(tmp_path, monkeypatch):
    from hetinfer_cuda import driver as D
    monkeypatch.setenv("HETINFER_CACHE", str(tmp_path / "hc"))
    compiled = []

    def fake_nvrtc(source, name, options, arch):
        compiled.append(name)
        return b"CUBIN:" + source.encode()

    monkeypatch.setattr(D, "nvrtc_compile", fake_nvrtc)
    return D, compiled


def _cubin_entry(D, source):
    return f"k-sm_90-{D.cache_key(source, (), 'sm_90')[:32]}.cubin"


def test_cuda_cubins_are_cached_privately_and_read_back(cuda):
    D, compiled = cuda
    first = D.compile_cubin("src-a", "k", (), "sm_90")
    hits = D.stats.disk_hits
    assert D.compile_cubin("src-a", "k", (), "sm_90") == first == b"CUBIN:src-a"
    assert compiled == ["k"] and D.stats.disk_hits == hits + 1
    d = D.cache_dir()
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    _assert_rebuilt(d / _cubin_entry(D, "src-a"))


@needs_root
@pytest.mark.parametrize("case", list(TAMPER))
def test_a_tampered_cubin_is_recompiled_with_a_warning(case, cuda, tmp_path):
    D, compiled = cuda
    tamper, why = TAMPER[case]
    path = _plant(D.cache_dir(), _cubin_entry(D, "src-b"), b"PLANTED")
    tamper(path, tmp_path)
    with pytest.warns(KernelCacheWarning, match=why):
        got = D.compile_cubin("src-b", "k", (), "sm_90")
    assert got == b"CUBIN:src-b" and compiled == ["k"]
    _assert_rebuilt(path)


def test_an_untampered_planted_cubin_is_what_is_read(cuda):
    """Positive control for the CUDA cache: a private entry with its digest is a disk hit."""
    D, compiled = cuda
    _plant(D.cache_dir(), _cubin_entry(D, "src-c"), b"PLANTED")
    assert D.compile_cubin("src-c", "k", (), "sm_90") == b"PLANTED" and compiled == []
