"""pytest plugin (entry point ``pytest11: hetinfer``): run hetinfer's conformance
suite against a device with one flag.

    pytest --hetinfer-device=cuda              # collects hetinfer.testing.conformance
    pytest --hetinfer-device=mydev --hetinfer-examples=200

Without --hetinfer-device nothing is added to the run. The suite has one test per
(op, dtype) whose winning kernel is registered for the device's type; a device
that is unknown or unavailable skips it with the reason from hetinfer.devices().

A project may make a device the default for its own runs from its conftest.py
(`set_default_device(config, "cpu")` in pytest_configure) and collect the suite
through a test module of its own (`from hetinfer.testing.conformance import *`);
the suite is then not added a second time."""

from __future__ import annotations

from pathlib import Path

import pytest

CONFORMANCE_MODULE = "hetinfer.testing.conformance"
CONFORMANCE_PATH = Path(__file__).with_name("conformance.py")

_added = pytest.StashKey[bool]()
_defaulted = pytest.StashKey[bool]()


def pytest_addoption(parser):
    group = parser.getgroup("hetinfer", "hetinfer conformance suite")
    group.addoption("--hetinfer-device", action="store", default=None, metavar="DEV",
                    help="run hetinfer's kernel conformance suite on device DEV (cpu, cuda, cuda:1, "
                         "or a third-party device type); collects it automatically")
    group.addoption("--hetinfer-examples", action="store", type=int, default=30, metavar="N",
                    help="hypothesis examples per kernel in the conformance suite (default 30)")


def set_default_device(config, device: str) -> None:
    """From a project's pytest_configure: use `device` when --hetinfer-device was not
    given. The suite is then collected only through the project's own test module."""
    if config.option.hetinfer_device is None:
        config.option.hetinfer_device = device
        config.stash[_defaulted] = True


def conformance_added(config) -> bool:
    """Whether this plugin put the conformance module on the command line (so a
    project's own module re-exporting it should not be collected again)."""
    return config.stash.get(_added, False)


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    config.addinivalue_line("markers", "hetinfer_conformance: hetinfer kernel conformance test")
    device = config.option.hetinfer_device
    if device is None or config.stash.get(_defaulted, False):
        return
    from hetinfer.device import Device
    from hetinfer.errors import DeviceError
    try:
        Device.parse(device)
    except DeviceError as e:
        raise pytest.UsageError(f"--hetinfer-device: {e}") from None
    if config.option.pyargs:
        arg = CONFORMANCE_MODULE
        present = arg in config.args
    else:
        arg = str(CONFORMANCE_PATH)
        present = any(_same_file(a, CONFORMANCE_PATH, config) for a in config.args)
    if not present:
        config.args.append(arg)
    config.stash[_added] = True


def _same_file(arg: str, path: Path, config) -> bool:
    p = Path(arg.split("::", 1)[0])
    if not p.is_absolute():
        p = config.invocation_params.dir / p
    try:
        return p.resolve() == path.resolve()
    except OSError:
        return False


def _device_status(spec):
    """(Device, None) when the device can run kernels, else (Device or None, why not)."""
    from hetinfer.device import Device, get_device_type
    from hetinfer.errors import DeviceError
    try:
        dev = Device.parse(spec)
        get_device_type(dev)
        return dev, None
    except DeviceError as e:
        return None, str(e)


def _kernel_keys(device_type: str) -> list[tuple[str, str]]:
    """(op, dtype) of every key with a kernel for device_type, in OPS then dtype order."""
    from hetinfer import dtypes as D
    from hetinfer import registry
    from hetinfer.ops import OPS
    keys = {(e.op, e.dtype.name) for e in registry.entries() if e.device_type == device_type}
    op_order = {op: i for i, op in enumerate(OPS)}
    dt_order = {d.name: i for i, d in enumerate(D.ALL)}
    return sorted(keys, key=lambda k: (op_order.get(k[0], len(op_order)), k[0], dt_order.get(k[1], 99)))


def pytest_generate_tests(metafunc):
    if "hetinfer_kernel_key" not in metafunc.fixturenames:
        return
    spec = metafunc.config.option.hetinfer_device
    if spec is None:
        params = [pytest.param(None, id="no-device",
                               marks=pytest.mark.skip(reason="no --hetinfer-device given"))]
    else:
        dev, why = _device_status(spec)
        if dev is None:
            params = [pytest.param(None, id=f"{spec}-unavailable", marks=pytest.mark.skip(reason=why))]
        else:
            keys = _kernel_keys(dev.type)
            params = [pytest.param(k, id=f"{k[0]}-{k[1]}") for k in keys] or \
                     [pytest.param(None, id=f"{dev.type}-no-kernels")]
    metafunc.parametrize("hetinfer_kernel_key", params, indirect=True)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "hetinfer_kernel_key" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.hetinfer_conformance)


@pytest.fixture(scope="session")
def hetinfer_device(pytestconfig):
    """The hetinfer.Device under test (--hetinfer-device); skips when absent."""
    spec = pytestconfig.option.hetinfer_device
    if spec is None:
        pytest.skip("no --hetinfer-device given")
    dev, why = _device_status(spec)
    if dev is None:
        pytest.skip(why)
    return dev


@pytest.fixture(scope="session")
def hetinfer_examples(pytestconfig) -> int:
    """Hypothesis examples per kernel (--hetinfer-examples)."""
    return max(1, int(pytestconfig.option.hetinfer_examples))


@pytest.fixture
def hetinfer_kernel_key(request, hetinfer_device):
    """(op, dtype name) of the kernel under test; parametrized by pytest_generate_tests."""
    key = getattr(request, "param", None)
    if key is None:
        pytest.fail(f"no kernels are registered for device type {hetinfer_device.type!r}; "
                    f"its backend registered the device but no kernels", pytrace=False)
    return key
