"""Private on-disk caches of compiled kernels: the CPU backend's shared objects (loaded with
ctypes) and the CUDA backend's CUBINs. What is loaded from them runs inside this process, so
the cache is one nobody else can plant:

- The directory is created 0700 (os.makedirs(mode=0o700), then checked, since that mode is
  subject to the umask and an existing directory keeps its own). A directory that is not owned
  by this user, or that group or others may write, is not used: a fresh private directory
  (mkdtemp, removed at exit) takes its place, with a KernelCacheWarning.
- An artifact is written atomically: a temporary file in the same directory, created 0600
  through os.open flags (the process umask is never changed), then os.replace; beside it
  NAME.sha256 holds the sha256 of its bytes, recorded when it was built.
- An artifact is used only when it and its digest file are regular files (a symbolic link is
  never followed: os.lstat, O_NOFOLLOW), owned by this user, not writable by group or others,
  and its bytes hash to the recorded digest. Anything else is rebuilt, with a KernelCacheWarning.

Pure Python: importable without CUDA or a C compiler.
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import os
import secrets
import shutil
import stat
import tempfile
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

DIGEST_SUFFIX = ".sha256"
_DIGEST_MAX = 256                      # bytes a digest file may hold
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class KernelCacheWarning(RuntimeWarning):
    """A kernel cache directory or file was not trusted; it is rebuilt or replaced."""


class _Untrusted(Exception):
    pass


def _warn(message: str) -> None:
    warnings.warn(f"hetinfer kernel cache: {message}", KernelCacheWarning, stacklevel=4)


def _unsafe(st: os.stat_result, what: str) -> str | None:
    """Why a file or directory with this stat must not be trusted, or None."""
    uid = os.geteuid()
    if st.st_uid != uid:
        return f"{what} is owned by uid {st.st_uid}, not by this user (uid {uid})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{what} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _dir_problem(path: Path) -> str | None:
    """Create path 0700 if missing; why it must not be used, or None."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.stat(path)
    except OSError as e:
        return f"the cache directory {path} cannot be created or read ({e.strerror or e})"
    if not stat.S_ISDIR(st.st_mode):
        return f"the cache directory {path} is not a directory"
    return _unsafe(st, f"the cache directory {path}")


_lock = threading.Lock()
_warned: set[tuple[str, str]] = set()
_fallback_root: Path | None = None


def _fallback(path: Path) -> Path:
    """A fresh private directory for this process (one per cache name), removed at exit."""
    global _fallback_root
    if _fallback_root is None:
        _fallback_root = Path(tempfile.mkdtemp(prefix="hetinfer-kernels-"))     # mkdtemp: 0700
        atexit.register(shutil.rmtree, _fallback_root, True)
    sub = _fallback_root / (path.name or "cache")
    sub.mkdir(mode=0o700, exist_ok=True)
    return sub


def private_dir(path) -> Path:
    """path itself when it is (or is now created) a directory private to this user; else a
    fresh private directory, with a KernelCacheWarning (once per path and reason)."""
    path = Path(path)
    why = _dir_problem(path)
    if why is None:
        return path
    with _lock:
        alt = _fallback(path)
        if (str(path), why) not in _warned:
            _warned.add((str(path), why))
            _warn(f"{why}; not using it: kernels are built in {alt} for this process instead")
    return alt


def _check_name(name: str) -> str:
    if not name or "/" in name or name.startswith(".") or "\0" in name:
        raise ValueError(f"a kernel cache entry needs a plain file name, got {name!r}")
    return name


def _read_trusted(path: Path, limit: int | None = None) -> bytes | None:
    """The bytes of path; None when it does not exist; _Untrusted(why) when it must not be used."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if stat.S_ISLNK(st.st_mode):
        raise _Untrusted(f"{path} is a symbolic link (not followed)")
    if not stat.S_ISREG(st.st_mode):
        raise _Untrusted(f"{path} is not a regular file")
    why = _unsafe(st, str(path))
    if why:
        raise _Untrusted(why)
    if limit is not None and st.st_size > limit:
        raise _Untrusted(f"{path} holds {st.st_size} bytes; a digest file holds at most {limit}")
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise _Untrusted(f"{path} cannot be opened ({e.strerror or e})") from None
    with os.fdopen(fd, "rb") as f:
        st2 = os.fstat(f.fileno())        # the file opened is the one checked (no swap in between)
        if (st2.st_dev, st2.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(st2.st_mode):
            raise _Untrusted(f"{path} changed while it was checked")
        why = _unsafe(st2, str(path))
        if why:
            raise _Untrusted(why)
        return f.read() if limit is None else f.read(limit)


def _write_atomic(directory: Path, name: str, data: bytes) -> Path:
    """directory/name = data, atomically; the file is created 0600 (never via the umask)."""
    final = directory / name
    tmp = directory / f".{name}.{os.getpid()}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return final


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class KernelCache:
    """Compiled artifacts by file name under a private directory (see the module docstring).
    root: the configured directory, e.g. ~/.cache/hetinfer/cpu."""

    def __init__(self, root):
        self.root = Path(root)

    def directory(self) -> Path:
        """The directory actually used: root, or a private stand-in when root is not private."""
        return private_dir(self.root)

    @contextmanager
    def _locked(self, directory: Path, exclusive: bool):
        """A lock on directory/.lock so a reader never sees an artifact without its digest
        (a reader of a read-only cache goes without)."""
        try:
            fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT | _NOFOLLOW | _CLOEXEC, 0o600)
        except OSError:
            if exclusive:
                raise
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    def load(self, name: str) -> tuple[Path, bytes] | None:
        """(path, bytes) of a trusted artifact whose digest matches; None when there is none
        (a KernelCacheWarning says why when one exists but is not trusted)."""
        _check_name(name)
        d = self.directory()
        path = d / name
        try:
            with self._locked(d, exclusive=False):
                data = _read_trusted(path)
                if data is None:
                    return None
                recorded = _read_trusted(d / (name + DIGEST_SUFFIX), _DIGEST_MAX)
        except _Untrusted as e:
            _warn(f"{e}; rebuilding it")
            return None
        except OSError as e:
            _warn(f"{path} cannot be read ({e.strerror or e}); rebuilding it")
            return None
        if recorded is None:
            _warn(f"{path} has no recorded digest ({name}{DIGEST_SUFFIX}); rebuilding it")
            return None
        want = recorded.decode("ascii", errors="replace").strip()
        if digest(data) != want:
            _warn(f"{path} does not match the sha256 digest recorded when it was built; rebuilding it")
            return None
        return path, data

    def read(self, name: str) -> bytes | None:
        """The trusted bytes of an artifact, or None (see load)."""
        got = self.load(name)
        return None if got is None else got[1]

    def path(self, name: str) -> Path | None:
        """The path of a trusted artifact, or None (see load)."""
        got = self.load(name)
        return None if got is None else got[0]

    def store(self, name: str, data: bytes) -> Path:
        """Write an artifact and its digest atomically (0600); returns its path."""
        _check_name(name)
        d = self.directory()
        with self._locked(d, exclusive=True):
            path = _write_atomic(d, name, data)
            _write_atomic(d, name + DIGEST_SUFFIX, (digest(data) + "\n").encode("ascii"))
        return path

    def workdir(self) -> tempfile.TemporaryDirectory:
        """A private scratch directory (mkdtemp: 0700) inside the cache for a build."""
        return tempfile.TemporaryDirectory(dir=self.directory(), prefix=".build-")
