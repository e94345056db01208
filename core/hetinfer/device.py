"""Devices: "cpu", "cuda:0" ... and the device types backends register."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from . import plugins
from .errors import DeviceError


@dataclass(frozen=True)
class Device:
    type: str
    index: int = 0

    @classmethod
    def parse(cls, spec) -> "Device":
        if isinstance(spec, Device):
            return spec
        if not isinstance(spec, str) or not spec:
            raise DeviceError(f"expected a device like 'cpu' or 'cuda:0', got {spec!r}")
        name, colon, idx = spec.partition(":")
        if not name.isidentifier():
            raise DeviceError(f"bad device type in {spec!r}; expected e.g. 'cpu' or 'cuda:0'")
        if colon:
            if not idx.isdigit():
                raise DeviceError(f"bad device index in {spec!r}; expected e.g. 'cuda:0'")
            return cls(name, int(idx))
        return cls(name, 0)

    def __str__(self) -> str:
        return self.type if self.type == "cpu" and self.index == 0 else f"{self.type}:{self.index}"


@dataclass
class DeviceType:
    """What a backend registers: one kind of device and how to allocate on it."""
    name: str                                   # "cpu", "cuda"
    available: bool = True
    reason: str = ""                            # why not available
    count: int = 1                              # devices of this type present
    make_allocator: Callable[[Device], object] | None = None
    description: str = ""
    source: str = ""                            # plugin that registered it
    extra: dict = field(default_factory=dict)


_allocators: dict[Device, object] = {}
_allocators_reloads = 0


def device_types() -> dict[str, DeviceType]:
    """Every registered device type by name, available or not (register_devices hooks)."""
    def build():
        out: dict[str, DeviceType] = {}

        def make_register(source):
            def register(dt: DeviceType):
                if not isinstance(dt, DeviceType):
                    raise TypeError(f"register_devices expects DeviceType, got {type(dt).__name__}")
                if dt.name in out and out[dt.name].available:
                    plugins.report(source, f"device type {dt.name!r} already registered by {out[dt.name].source}")
                    return
                dt.source = dt.source or source
                out[dt.name] = dt
            return register
        plugins.collect("register_devices", make_register)
        return out
    return plugins.cached("devices", build)


def get_device_type(device: Device) -> DeviceType:
    types = device_types()
    dt = types.get(device.type)
    if dt is None:
        known = ", ".join(sorted(types)) or "none (install a backend such as hetinfer-cpu)"
        raise DeviceError(f"unknown device {str(device)!r}; registered device types: {known}")
    if not dt.available:
        raise DeviceError(f"device {str(device)!r} is not available: {dt.reason}")
    if device.index >= dt.count:
        raise DeviceError(f"device {str(device)!r} does not exist: {dt.count} {dt.name} device(s) present")
    return dt


def get_allocator(device) -> object:
    """The allocator of a device (one per device, made on first use; made anew after the
    plugins were reloaded)."""
    global _allocators_reloads
    device = Device.parse(device)
    if plugins.reloads != _allocators_reloads:
        _allocators.clear()
        _allocators_reloads = plugins.reloads
    alloc = _allocators.get(device)
    if alloc is None:
        dt = get_device_type(device)
        if dt.make_allocator is None:
            raise DeviceError(f"device type {dt.name!r} registered no allocator")
        alloc = _allocators[device] = dt.make_allocator(device)
    return alloc

