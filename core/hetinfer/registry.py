"""The kernel registry: (op, device type, dtype) -> the kernel of highest priority.

Kernels come from plugins' register_kernels hooks and from users' own scripts
through the @kernel decorator. Two kernels of the same key and priority is an
error; the choice is cached and the cache is rebuilt when plugins change."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import plugins
from .dtypes import DType, dtype as to_dtype
from .errors import KernelNotFoundError, RegistrationError


@dataclass(frozen=True)
class KernelEntry:
    op: str
    device_type: str
    dtype: DType
    fn: Callable
    priority: int = 0
    source: str = "user"
    contiguous: bool = False   # the kernel wants contiguous inputs; dispatch copies views

    @classmethod
    def make(cls, op, device_type, dtype, fn, priority=0, source="user", contiguous=False):
        from .op_names import OPS
        if op not in OPS:
            raise RegistrationError(f"cannot register a kernel for unknown op {op!r} "
                                    f"(from {source}); known ops: {', '.join(sorted(OPS))}")
        if not callable(fn):
            raise RegistrationError(f"kernel for {op}/{device_type}/{dtype} from {source} is not callable")
        return cls(op, str(device_type), to_dtype(dtype), fn, int(priority), source, bool(contiguous))

    @property
    def key(self):
        return (self.op, self.device_type, self.dtype.name)


_user: list[KernelEntry] = []
_user_gen = 0
_table_cache: tuple | None = None


def plugin_kernels() -> list[KernelEntry]:
    """KernelEntry objects from every plugin's register_kernels hook."""
    def build():
        out: list = []

        def make_register(source):
            def register(op, device_type, dtype, fn, priority=0, contiguous=False):
                out.append(KernelEntry.make(op, device_type, dtype, fn, priority, source, contiguous))
            return register
        plugins.collect("register_kernels", make_register)
        return out
    return plugins.cached("kernels", build)


def _entries() -> list[KernelEntry]:
    return plugin_kernels() + _user


def _table() -> dict[tuple, list[KernelEntry]]:
    """key -> entries sorted by priority, highest first (cached)."""
    global _table_cache
    entries = _entries()   # may bump the generation by loading plugins
    gen = (plugins.generation(), _user_gen)
    if _table_cache is not None and _table_cache[0] == gen:
        return _table_cache[1]
    table: dict[tuple, list[KernelEntry]] = {}
    for e in entries:
        for other in table.get(e.key, ()):
            if other.priority == e.priority:
                raise RegistrationError(
                    f"two kernels for {e.op}/{e.device_type}/{e.dtype} at priority {e.priority}: "
                    f"from {other.source} and from {e.source}; give one a higher priority")
        table.setdefault(e.key, []).append(e)
    for lst in table.values():
        lst.sort(key=lambda e: -e.priority)
    _table_cache = (gen, table)
    return table


_winners: dict = {}
_winners_gen = None


def lookup(op: str, device_type: str, dtype) -> KernelEntry:
    """The winning kernel for a key, or KernelNotFoundError saying what exists instead.
    Called on every op: a hit costs two dict lookups and a generation check."""
    global _winners_gen
    if not plugins._loaded:
        plugins.load_plugins()
    gen = (plugins.generation(), _user_gen)
    if gen != _winners_gen:
        _winners.clear()
        _winners_gen = gen
    key = (op, device_type, dtype)
    hit = _winners.get(key)
    if hit is not None:
        return hit
    dt = to_dtype(dtype)
    hit = _table().get((op, device_type, dt.name))
    if hit:
        _winners[key] = hit[0]
        return hit[0]
    table = _table()
    for_op = sorted(f"{k[1]}/{k[2]}" for k in table if k[0] == op)
    avail = ", ".join(for_op) if for_op else "none on any device"
    raise KernelNotFoundError(f"no kernel for op {op!r} on device type {device_type!r} with dtype {dt}; "
                              f"registered for {op}: {avail}")


def has_kernel(op: str, device_type: str, dtype) -> bool:
    return (op, device_type, to_dtype(dtype).name) in _table()


def entries() -> list[KernelEntry]:
    """All winning and shadowed kernels, for `hetinfer kernels`."""
    return [e for lst in _table().values() for e in lst]


def register_kernel(op, device_type, dtype, fn, priority=0, contiguous=False) -> KernelEntry:
    """Register a kernel from a user's script. Checks for a clash at once."""
    global _user_gen
    e = KernelEntry.make(op, device_type, dtype, fn, priority, "user", contiguous)
    _user.append(e)
    _user_gen += 1
    try:
        _table()
    except RegistrationError:
        _user.remove(e)
        _user_gen += 1
        raise
    return e


def unregister_kernel(fn_or_entry) -> None:
    """Remove user kernels registered for fn (or that entry); the built-in is used again."""
    global _user_gen
    before = len(_user)
    _user[:] = [e for e in _user if e is not fn_or_entry and e.fn is not fn_or_entry]
    if len(_user) == before:
        raise RegistrationError(f"{fn_or_entry!r} is not a registered user kernel")
    _user_gen += 1


def kernel(op: str, device_type: str, dtype, priority: int = 100, contiguous: bool = False):
    """Decorator: register fn as the kernel for (op, device_type, dtype); the default
    priority 100 overrides built-ins (which register at 0). `unregister_kernel(fn)` undoes it."""
    def deco(fn):
        dtypes = dtype if isinstance(dtype, (list, tuple)) else [dtype]
        for d in dtypes:
            register_kernel(op, device_type, d, fn, priority, contiguous)
        return fn
    return deco
