"""Test configuration for the hetinfer repository.

- The conformance suite runs on cpu by default: `pytest` (or `pytest tests`) from
  the repository root collects tests/test_conformance.py with --hetinfer-device=cpu.
  `pytest --hetinfer-device=DEV` runs it on DEV instead (the hetinfer pytest plugin
  then collects hetinfer.testing.conformance itself and this repo's copy is skipped).
- `installed_plugins`: the fake plugin distributions under tests/plugins/ built and
  installed for real with pip (into a private --target directory put on sys.path,
  not into the shared environment), then discovered through their entry points.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from hetinfer.testing import plugin as hetinfer_plugin

HERE = Path(__file__).resolve().parent
PLUGIN_SRC = HERE / "plugins"
PLUGIN_DISTS = ("dummy", "broken")
PLUGIN_MODULES = ("hetinfer_dummy", "hetinfer_broken")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    hetinfer_plugin.set_default_device(config, "cpu")


def pytest_ignore_collect(collection_path, config):
    # --hetinfer-device=DEV given: the plugin collects the suite itself; don't run it twice
    if (collection_path.name == "test_conformance.py" and collection_path.parent == HERE
            and hetinfer_plugin.conformance_added(config)):
        return True
    return None


# --- fake plugin distributions ------------------------------------------------------------
def _sources_digest() -> str:
    h = hashlib.sha256()
    for name in PLUGIN_DISTS:
        root = PLUGIN_SRC / name
        for f in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".py", ".toml")
                        and "build" not in p.parts and not any(s.endswith(".egg-info") for s in p.parts)):
            h.update(str(f.relative_to(PLUGIN_SRC)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _pip_install(target: Path, sources: list[Path]) -> None:
    base = [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--disable-pip-version-check",
            "--no-input", "--target", str(target)]
    attempts = [base + ["--no-build-isolation"], base]   # no isolation: setuptools of this venv, offline
    last = None
    for cmd in attempts:
        last = subprocess.run(cmd + [str(s) for s in sources], capture_output=True, text=True, timeout=300)
        if last.returncode == 0:
            return
    raise RuntimeError(f"pip install of the test plugins failed:\n{last.stdout}\n{last.stderr}")


def install_test_plugins(cache_root: Path) -> Path:
    """Build and install tests/plugins/* with pip into cache_root/<digest of sources>,
    once: a later session (or a concurrent one) reuses a finished install."""
    digest = _sources_digest()
    target = cache_root / digest
    if (target / ".complete").exists():
        return target
    cache_root.mkdir(parents=True, exist_ok=True)
    work = cache_root / f"{digest}.tmp{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        # build from copies, so setuptools' build/ and *.egg-info never land in the source tree
        srcs = []
        for name in PLUGIN_DISTS:
            dst = work / "src" / name
            shutil.copytree(PLUGIN_SRC / name, dst,
                            ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
            srcs.append(dst)
        _pip_install(work / "site", srcs)
        (work / "site" / ".complete").write_text(digest)
        try:
            os.rename(work / "site", target)
        except OSError:           # another session finished first
            if not (target / ".complete").exists():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def reload_quietly() -> None:
    """hetinfer.plugins.reload_plugins() without showing the broken plugin's warning."""
    from hetinfer import plugins
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        plugins.reload_plugins()


@pytest.fixture(scope="session")
def test_plugin_site(pytestconfig, tmp_path_factory):
    """The site directory holding the pip-installed hetinfer-dummy and hetinfer-broken."""
    cache = getattr(pytestconfig, "cache", None)
    root = Path(cache.mkdir("hetinfer-test-plugins")) if cache is not None \
        else tmp_path_factory.getbasetemp() / "hetinfer-test-plugins"
    return install_test_plugins(root)


@pytest.fixture(scope="module")
def installed_plugins(test_plugin_site):
    """test_plugin_site on sys.path for one test module, with hetinfer's plugins reloaded
    from entry points; afterwards the plugins are gone again (other modules never see them)."""
    site = test_plugin_site
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    reload_quietly()
    yield site
    sys.path.remove(str(site))
    for mod in PLUGIN_MODULES:
        sys.modules.pop(mod, None)
    importlib.invalidate_caches()
    reload_quietly()


@pytest.fixture
def plugin_env(installed_plugins):
    """Environment for a subprocess that should see the test plugins."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(installed_plugins)] + [p for p in
                                         env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env
