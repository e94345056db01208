"""Plugin discovery through pluggy and the `hetinfer` entry-point group.

Entry points load lazily, on first use, so `import hetinfer` stays cheap and
works with no backend installed. HETINFER_PLUGINS="a,b" limits loading to the
named entry points. A plugin that fails to import, or whose hook raises, is
reported once with a warning and skipped; start-up goes on."""

from __future__ import annotations

import os
import warnings
from importlib.metadata import entry_points

import pluggy

from . import hookspecs
from .errors import RegistrationError

GROUP = "hetinfer"


class _PluginManager(pluggy.PluginManager):
    """A PluginManager that counts changes so caches built from hooks know when to rebuild."""
    generation = 0

    def register(self, plugin, name=None):
        result = super().register(plugin, name)
        _PluginManager.generation += 1
        return result

    def unregister(self, plugin=None, name=None):
        result = super().unregister(plugin, name)
        _PluginManager.generation += 1
        return result


pm = _PluginManager(GROUP)
pm.add_hookspecs(hookspecs)

_loaded = False
errors: dict[str, str] = {}          # plugin name -> why it was skipped
_cache: dict[str, tuple[int, object]] = {}
reloads = 0                          # reload_plugins() calls: device allocators are made anew after one


def generation() -> int:
    """Changes whenever a plugin is registered or unregistered: caches built from hooks
    (the device table, the kernel registry) rebuild when it moved. Cheap (no loading)."""
    return _PluginManager.generation


def allowlist() -> set[str] | None:
    raw = os.environ.get("HETINFER_PLUGINS")
    if raw is None:
        return None
    return {p.strip() for p in raw.split(",") if p.strip()}


def report(name: str, why: str) -> None:
    """Say once that a plugin is skipped, and why."""
    if name not in errors:
        errors[name] = why
        warnings.warn(f"hetinfer plugin {name!r} skipped: {why}", RuntimeWarning, stacklevel=3)


def load_plugins() -> None:
    """Load every allowed entry point of the `hetinfer` group (once)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    allowed = allowlist()
    for ep in entry_points(group=GROUP):
        if allowed is not None and ep.name not in allowed:
            continue
        if pm.has_plugin(ep.name):
            continue
        try:
            mod = ep.load()
            pm.register(mod, name=ep.name)
        except Exception as e:  # a broken plugin must not stop start-up
            report(ep.name, f"{type(e).__name__}: {e}")


def reload_plugins() -> None:
    """Forget entry-point plugins and load them again (after HETINFER_PLUGINS changed)."""
    global _loaded, reloads
    for name, plugin in list(pm.list_name_plugin()):
        if plugin is not None and any(ep.name == name for ep in entry_points(group=GROUP)):
            pm.unregister(name=name)
    errors.clear()
    reloads += 1
    _loaded = False
    load_plugins()


def collect(hook_name: str, make_register):
    """Call one hook on every plugin separately, so one failing plugin is skipped."""
    load_plugins()
    hook = getattr(pm.hook, hook_name)
    for impl in reversed(hook.get_hookimpls()):   # registration order
        name = pm.get_name(impl.plugin) or repr(impl.plugin)
        register = make_register(name)
        try:
            impl.function(register=register)
        except RegistrationError:
            raise
        except Exception as e:
            report(name, f"{hook_name} raised {type(e).__name__}: {e}")


def cached(key: str, build):
    """build() once per plugin generation."""
    load_plugins()
    hit = _cache.get(key)
    if hit is not None and hit[0] == _PluginManager.generation:
        return hit[1]
    value = build()
    _cache[key] = (_PluginManager.generation, value)
    return value


def models() -> dict[str, object]:
    """Every registered model architecture: name -> model class."""
    def build():
        out: dict[str, object] = {}

        def make_register(source):
            def register(name: str, cls):
                if name in out:
                    raise RegistrationError(f"model architecture {name!r} registered twice "
                                            f"(second time by plugin {source!r})")
                out[name] = cls
            return register
        collect("register_models", make_register)
        return out
    return cached("models", build)


def plugin_names() -> list[str]:
    load_plugins()
    return [name for name, p in pm.list_name_plugin() if p is not None]


def commands() -> dict[str, tuple]:
    """CLI verbs from every plugin's register_commands hook: name -> (configure, run, help)."""
    def build():
        out: dict[str, tuple] = {}

        def make_register(source):
            def register(name: str, configure, run, help: str = ""):
                if name in out:
                    report(source, f"command {name!r} already registered")
                    return
                out[name] = (configure, run, help)
            return register
        collect("register_commands", make_register)
        return out
    return cached("commands", build)
