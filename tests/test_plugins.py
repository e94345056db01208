"""Plugins: the real entry-point path (fake distributions under tests/plugins/ built
and installed with pip), HETINFER_PLUGINS, kernel priorities and overrides, errors
for missing kernels, in-process plugins, and the conformance pytest plugin itself."""

from __future__ import annotations

import re
import subprocess
import sys
import warnings

import numpy as np
import pytest

import hetinfer
from hetinfer import KernelNotFoundError, RegistrationError, hookimpl, plugins, registry
from hetinfer.device import DeviceType


def reload_quietly():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        plugins.reload_plugins()


def _reload_recording():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plugins.reload_plugins()
        hetinfer.devices()
        registry.entries()
        hetinfer.devices()
    return [w for w in caught if issubclass(w.category, RuntimeWarning)]


@pytest.fixture
def restore_plugins(installed_plugins, monkeypatch):
    """Reload plugins from entry points after the test, with the environment restored."""
    yield
    monkeypatch.undo()
    reload_quietly()


# --- the real entry-point path ---------------------------------------------------------------
def test_dummy_device_is_registered(installed_plugins):
    import hetinfer_dummy
    assert hetinfer_dummy.__file__.startswith(str(installed_plugins))    # the pip-installed copy
    devs = {d.name: d for d in hetinfer.devices()}
    assert devs["dummy"].available and devs["dummy"].source == "dummy" and devs["dummy"].count == 2
    assert not devs["dummyabsent"].available and devs["dummyabsent"].reason == hetinfer_dummy.ABSENT_REASON
    assert devs["cpu"].available
    assert "dummy" in plugins.plugin_names()


def test_dummy_kernel_dispatches(installed_plugins):
    import hetinfer_dummy
    entry = registry.lookup("add", "dummy", "f32")
    assert entry.fn is hetinfer_dummy.add and entry.source == "dummy"
    a = hetinfer.tensor(np.arange(6, dtype=np.float32).reshape(2, 3), device="dummy")
    b = hetinfer.tensor(np.full((2, 3), 0.5, np.float32), device="dummy")
    before = len(hetinfer_dummy.CALLS)
    out = hetinfer.ops.add(a, b)
    assert len(hetinfer_dummy.CALLS) == before + 1
    assert str(out.device) == "dummy:0"
    np.testing.assert_array_equal(out.numpy(), np.arange(6, dtype=np.float32).reshape(2, 3) + 0.5)
    # a strided view goes through dispatch's contiguous copies (the kernel asked for them)
    s = hetinfer.ops.add(a[:, ::2], b[:, 1:])
    np.testing.assert_array_equal(s.numpy(), np.arange(6, dtype=np.float32).reshape(2, 3)[:, ::2] + 0.5)
    # a strided out: dispatch copies the kernel's contiguous result back with the dummy cast kernel
    o = hetinfer.empty((2, 6), "f32", "dummy").fill_(0.0)
    hetinfer.ops.add(a, b, out=o[:, ::2])
    np.testing.assert_array_equal(o.numpy()[:, ::2], np.arange(6, dtype=np.float32).reshape(2, 3) + 0.5)
    np.testing.assert_array_equal(o.numpy()[:, 1::2], np.zeros((2, 3)))
    assert "cast" in [c[0] for c in hetinfer_dummy.CALLS[before:]]
    # cpu kernels are untouched by the dummy plugin
    assert registry.lookup("add", "cpu", "f32").source == "cpu"


def test_broken_plugin_warns_once_and_is_skipped(installed_plugins):
    caught = _reload_recording()
    broken = [w for w in caught if "broken" in str(w.message)]
    assert len(broken) == 1, [str(w.message) for w in caught]
    assert "hetinfer plugin 'broken' skipped: RuntimeError: hetinfer-broken fails to import on purpose" \
        in str(broken[0].message)
    assert "broken" in plugins.errors and "fails to import on purpose" in plugins.errors["broken"]
    assert "broken" not in plugins.plugin_names()
    # everything else works
    assert {"cpu", "dummy"} <= {d.name for d in hetinfer.devices()}
    x = hetinfer.tensor(np.ones((2, 4), np.float32))
    np.testing.assert_allclose(hetinfer.ops.rms_norm(x, hetinfer.tensor(np.ones(4, np.float32))).numpy(),
                               np.ones((2, 4)), rtol=1e-6)


def test_allowlist_limits_loading(restore_plugins, monkeypatch):
    monkeypatch.setenv("HETINFER_PLUGINS", "cpu")
    caught = _reload_recording()
    assert not caught, [str(w.message) for w in caught]          # broken is not even imported
    assert plugins.errors == {}
    assert plugins.plugin_names() == ["cpu"]
    assert [d.name for d in hetinfer.devices()] == ["cpu"]
    with pytest.raises(hetinfer.DeviceError, match="unknown device 'dummy:0'; registered device types: cpu"):
        hetinfer.empty(2, device="dummy")
    assert registry.lookup("add", "cpu", "f32").source == "cpu"

    monkeypatch.setenv("HETINFER_PLUGINS", " cpu , dummy ")
    caught = _reload_recording()
    assert not caught
    assert sorted(plugins.plugin_names()) == ["cpu", "dummy"]
    assert registry.lookup("add", "dummy", "f32").source == "dummy"


def test_reload_restores_everything(restore_plugins, monkeypatch):
    monkeypatch.setenv("HETINFER_PLUGINS", "dummy")
    plugins.reload_plugins()
    with pytest.raises(KernelNotFoundError):
        registry.lookup("add", "cpu", "f32")
    monkeypatch.delenv("HETINFER_PLUGINS")
    reload_quietly()
    assert registry.lookup("add", "cpu", "f32").source == "cpu"
    assert registry.lookup("add", "dummy", "f32").source == "dummy"


# --- kernels from a user's script ----------------------------------------------------------
def test_user_kernel_overrides_builtin():
    x = hetinfer.tensor(np.arange(1, 7, dtype=np.float32).reshape(2, 3))
    w = hetinfer.tensor(np.ones(3, np.float32))
    builtin = hetinfer.ops.rms_norm(x, w).numpy().copy()
    seen = []

    @hetinfer.kernel("rms_norm", "cpu", "f32")
    def my_rms_norm(x, weight, eps, out):
        seen.append(eps)
        out.numpy()[...] = 42.0

    try:
        assert registry.lookup("rms_norm", "cpu", "f32").fn is my_rms_norm
        assert registry.lookup("rms_norm", "cpu", "f32").priority == 100
        np.testing.assert_array_equal(hetinfer.ops.rms_norm(x, w, eps=1e-5).numpy(), np.full((2, 3), 42.0))
        assert seen == [1e-5]
        # other dtypes keep the built-in
        assert registry.lookup("rms_norm", "cpu", "f16").source == "cpu"
        # the shadowed built-in is still listed
        keyed = [e for e in registry.entries() if e.key == ("rms_norm", "cpu", "f32")]
        assert [e.source for e in keyed] == ["user", "cpu"]
    finally:
        hetinfer.unregister_kernel(my_rms_norm)
    assert registry.lookup("rms_norm", "cpu", "f32").source == "cpu"
    np.testing.assert_array_equal(hetinfer.ops.rms_norm(x, w).numpy(), builtin)
    with pytest.raises(RegistrationError, match="not a registered user kernel"):
        hetinfer.unregister_kernel(my_rms_norm)


def test_decorator_registers_several_dtypes():
    def fake_softmax(x, out):
        out.fill_(0.25)

    hetinfer.kernel("softmax", "cpu", ["f16", "bf16"], priority=7)(fake_softmax)
    try:
        for dt in ("f16", "bf16"):
            assert registry.lookup("softmax", "cpu", dt).fn is fake_softmax
        assert registry.lookup("softmax", "cpu", "f32").source == "cpu"
        y = hetinfer.ops.softmax(hetinfer.tensor(np.ones((2, 4)), "f16"))
        np.testing.assert_array_equal(y.numpy().astype(np.float32), np.full((2, 4), 0.25, np.float32))
    finally:
        hetinfer.unregister_kernel(fake_softmax)
    assert registry.lookup("softmax", "cpu", "f16").source == "cpu"


def test_same_key_same_priority_is_an_error():
    def clash(a, b, out):
        pass

    with pytest.raises(RegistrationError, match=r"two kernels for add/cpu/f32 at priority 0: from cpu and from user"):
        hetinfer.register_kernel("add", "cpu", "f32", clash, priority=0)
    assert registry.lookup("add", "cpu", "f32").source == "cpu"     # rolled back
    hetinfer.register_kernel("add", "cpu", "f32", clash, priority=3)
    try:
        def clash2(a, b, out):
            pass
        with pytest.raises(RegistrationError, match=r"add/cpu/f32 at priority 3"):
            hetinfer.register_kernel("add", "cpu", "f32", clash2, priority=3)
        assert registry.lookup("add", "cpu", "f32").fn is clash
    finally:
        hetinfer.unregister_kernel(clash)


def test_bad_registrations():
    with pytest.raises(RegistrationError, match=r"unknown op 'convolve'.*known ops: .*add"):
        hetinfer.register_kernel("convolve", "cpu", "f32", lambda **kw: None)
    with pytest.raises(RegistrationError, match="not callable"):
        hetinfer.register_kernel("add", "cpu", "f32", "not a function", priority=5)
    with pytest.raises(hetinfer.DTypeError, match="unknown dtype 'f12'"):
        hetinfer.register_kernel("add", "cpu", "f12", lambda **kw: None, priority=5)


def test_missing_kernel_error_names_everything(installed_plugins):
    with pytest.raises(KernelNotFoundError) as info:
        registry.lookup("add", "dummy", "f16")
    msg = str(info.value)
    for part in ("'add'", "'dummy'", "f16", "cpu/f32", "cpu/bf16", "dummy/f32"):
        assert part in msg, msg
    a = hetinfer.tensor(np.ones(3), "f16", device="dummy")
    with pytest.raises(KernelNotFoundError, match=r"no kernel for op 'rms_norm' on device type 'dummy' "
                                                  r"with dtype f16; registered for rms_norm: cpu/bf16"):
        hetinfer.ops.rms_norm(a, hetinfer.tensor(np.ones(3), "f16", device="dummy"))
    with pytest.raises(KernelNotFoundError, match=r"'add' on device type 'nodev'.*registered for add:"):
        registry.lookup("add", "nodev", "f32")


# --- plugins registered in-process -----------------------------------------------------------
class InProcessBackend:
    """A plugin object in the style of llm's tests: hooks as methods."""

    def __init__(self):
        self.calls = 0

    @hookimpl
    def register_devices(self, register):
        register(DeviceType("inproc", available=True, count=1, make_allocator=_cpu_allocator(),
                            description="in-process test device"))

    @hookimpl
    def register_kernels(self, register):
        register("add", "cpu", "f32", self.add, priority=10)
        register("add", "inproc", "f32", self.add)

    def add(self, a, b, out):
        self.calls += 1
        out.numpy()[...] = -1.0


def _cpu_allocator():
    from hetinfer_cpu.allocator import CPUAllocator
    return CPUAllocator


def test_in_process_plugin_changes_and_restores_the_table():
    backend = InProcessBackend()
    a = hetinfer.tensor(np.ones(4, np.float32))
    plugins.pm.register(backend, name="test-inproc")
    try:
        assert registry.lookup("add", "cpu", "f32").source == "test-inproc"
        assert "inproc" in {d.name for d in hetinfer.devices()}
        np.testing.assert_array_equal(hetinfer.ops.add(a, a).numpy(), np.full(4, -1.0))
        b = hetinfer.tensor(np.ones(4, np.float32), device="inproc")
        np.testing.assert_array_equal(hetinfer.ops.add(b, b).numpy(), np.full(4, -1.0))
        assert backend.calls == 2
    finally:
        plugins.pm.unregister(name="test-inproc")
    assert registry.lookup("add", "cpu", "f32").source == "cpu"
    assert "inproc" not in {d.name for d in hetinfer.devices()}
    np.testing.assert_array_equal(hetinfer.ops.add(a, a).numpy(), np.full(4, 2.0))
    with pytest.raises(KernelNotFoundError):
        registry.lookup("add", "inproc", "f32")


class RaisingHooks:
    @hookimpl
    def register_kernels(self, register):
        raise ValueError("kernel table exploded")


def test_plugin_whose_hook_raises_is_skipped():
    plugins.pm.register(RaisingHooks(), name="test-raising")
    try:
        with pytest.warns(RuntimeWarning, match=r"plugin 'test-raising' skipped: register_kernels raised "
                                                r"ValueError: kernel table exploded"):
            entry = registry.lookup("add", "cpu", "f32")
        assert entry.source == "cpu"
        assert "kernel table exploded" in plugins.errors["test-raising"]
        x = hetinfer.tensor(np.ones(3, np.float32))
        np.testing.assert_array_equal(hetinfer.ops.add(x, x).numpy(), np.full(3, 2.0))
    finally:
        plugins.pm.unregister(name="test-raising")
        plugins.errors.pop("test-raising", None)


class ClashingHooks:
    @hookimpl
    def register_kernels(self, register):
        register("add", "cpu", "f32", lambda a, b, out: None)       # priority 0, like the built-in


def test_plugin_clashing_with_builtin_is_an_error():
    plugins.pm.register(ClashingHooks(), name="test-clash")
    try:
        with pytest.raises(RegistrationError, match=r"add/cpu/f32 at priority 0: from (cpu and from test-clash"
                                                     r"|test-clash and from cpu)"):
            registry.lookup("add", "cpu", "f32")
    finally:
        plugins.pm.unregister(name="test-clash")
    assert registry.lookup("add", "cpu", "f32").source == "cpu"


# --- the conformance pytest plugin ----------------------------------------------------------
def _pytest(tmp_path, env, *args):
    (tmp_path / "test_nothing.py").write_text("def test_nothing():\n    pass\n")
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *args]
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    return res.returncode, res.stdout + res.stderr


def test_conformance_not_collected_without_flag(tmp_path, plugin_env):
    rc, out = _pytest(tmp_path, plugin_env)
    assert rc == 0, out
    assert "1 passed" in out and "conformance" not in out


def test_conformance_on_absent_device_is_skipped(tmp_path, plugin_env):
    rc, out = _pytest(tmp_path, plugin_env, "--hetinfer-device=dummyabsent")
    assert rc == 0, out
    assert "device 'dummyabsent:0' is not available: no dummy accelerator in this machine" in out, out
    assert "2 passed, 1 skipped" in out, out         # test_nothing + every-op check; the suite skipped


def test_conformance_on_unknown_device_is_skipped(tmp_path, plugin_env):
    rc, out = _pytest(tmp_path, plugin_env, "--hetinfer-device=nosuchdevice")
    assert rc == 0, out
    assert "unknown device 'nosuchdevice:0'" in out, out


def test_conformance_runs_on_a_third_party_device(tmp_path, plugin_env):
    """`pytest --hetinfer-device=dummy` runs the suite against the dummy backend's one kernel."""
    rc, out = _pytest(tmp_path, plugin_env, "--hetinfer-device=dummy", "--hetinfer-examples=15", "-rA")
    for kernel in ("add-f32", "cast-f32", "cast-f16", "cast-bf16"):
        assert re.search(rf"PASSED \S*::test_kernel_conforms\[{kernel}\]", out), out
    assert "test_kernel_conforms[rms_norm" not in out, out
    assert rc == 0, out


def test_conformance_flag_rejects_malformed_device(tmp_path, plugin_env):
    rc, out = _pytest(tmp_path, plugin_env, "--hetinfer-device=cuda:x")
    assert rc != 0 and "--hetinfer-device: bad device index" in out, out


# --- the `hetinfer kernels` / `hetinfer devices` commands --------------------------------------
def _cli(env, *args):
    res = subprocess.run([sys.executable, "-m", "hetinfer", *args], env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout, res.stderr


def _row(text, first):
    rows = [line.split() for line in text.splitlines() if line.split()[:1] == [first]]
    assert len(rows) == 1, text
    return rows[0]


def test_cli_kernels_table(plugin_env):
    out, _ = _cli(plugin_env, "kernels")
    header = _row(out, "op")
    assert {"cpu/f32", "cpu/f16", "cpu/bf16", "cpu/i8", "dummy/f32"} <= set(header), out
    add = dict(zip(header[1:], _row(out, "add")[1:]))
    assert add["dummy/f32"] == "dummy" and add["cpu/f32"] == "cpu", out
    rms = dict(zip(header[1:], _row(out, "rms_norm")[1:]))
    assert rms["dummy/f32"] == "-" and rms["cpu/i8"] == "-" and rms["cpu/bf16"] == "cpu", out
    assert dict(zip(header[1:], _row(out, "matmul")[1:]))["cpu/i8"] == "cpu", out
    for op in hetinfer.ops.OPS:
        _row(out, op)


def test_cli_kernels_respects_allowlist(plugin_env):
    out, err = _cli(dict(plugin_env, HETINFER_PLUGINS="cpu"), "kernels")
    assert "dummy" not in out and "broken" not in err, out + err
    assert "cpu/f32" in _row(out, "op")


def test_cli_devices(plugin_env):
    out, err = _cli(plugin_env, "devices")
    assert "available" in " ".join(_row(out, "cpu")), out
    dummy = " ".join(_row(out, "dummy"))
    assert "available (2)" in dummy and "unavailable" not in dummy, out
    absent = " ".join(_row(out, "dummyabsent"))
    assert "unavailable" in absent and "no dummy accelerator in this machine" in absent, out
    assert "broken" in out + err and "fails to import on purpose" in out + err, out + err
