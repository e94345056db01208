"""The process group for tensor parallelism: this process's rank, the world size, and one
communicator per device type (MPI through mpi4py on CPU, NCCL through CuPy on CUDA, or a
third-party backend's), made on first use by the factory the backend registered.

World size 1 is the default and needs nothing (no mpi4py, no MPI): every collective is then
an identity or a copy. A run of N ranks is N processes started by `mpirun -n N` (one a
GPU); `init(N)` joins MPI's COMM_WORLD. mpi4py is imported only here and only when a world
larger than one is asked for, so `import hetinfer` never loads it.

    from hetinfer import distributed
    g = distributed.init(2)        # under mpirun -n 2
    g.rank, g.world_size
    g.communicator("cpu")          # what the all_reduce / all_gather kernels use"""

from __future__ import annotations

import os
import shutil
import sys
import traceback

import numpy as np

from .errors import ConfigError

# device type -> factory(group) -> communicator; backends register theirs (register_kernels)
_FACTORIES: dict = {}


def register_communicator(device_type: str, factory) -> None:
    """A backend's communicator for its device type: factory(group) -> an object whose methods
    its all_reduce / all_gather kernels call. The latest registration wins."""
    _FACTORIES[device_type] = factory


class ProcessGroup:
    def __init__(self, rank: int = 0, world_size: int = 1, mpi_comm=None):
        self.rank, self.world_size, self.mpi = int(rank), int(world_size), mpi_comm
        self._comms: dict = {}

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def communicator(self, device_type: str):
        """The communicator of one device type, made once (collectively: every rank asks)."""
        c = self._comms.get(device_type)
        if c is None:
            f = _FACTORIES.get(device_type)
            if f is None:
                raise ConfigError(f"no communicator for device type {device_type!r} at world size "
                                  f"{self.world_size}; registered: {', '.join(sorted(_FACTORIES)) or 'none'}")
            c = self._comms[device_type] = f(self)
        return c

    # --- host-side control messages (MPI on the host, whatever the device) -------------
    def broadcast_array(self, arr: np.ndarray | None, dtype=np.int32) -> np.ndarray:
        """Rank 0's 1-D array on every rank (its length first, then the data)."""
        if self.world_size == 1:
            return arr
        n = np.array([arr.size if self.is_root else 0], np.int64)
        self.mpi.Bcast(n, root=0)
        buf = np.ascontiguousarray(arr, dtype) if self.is_root else np.empty(int(n[0]), dtype)
        self.mpi.Bcast(buf, root=0)
        return buf

    def min_int(self, v: int) -> int:
        """The smallest of every rank's v (e.g. KV blocks that fit on every rank)."""
        if self.world_size == 1:
            return int(v)
        from mpi4py import MPI
        return int(self.mpi.allreduce(int(v), op=MPI.MIN))

    def abort(self, message: str, code: int = 1) -> None:
        """Print one clear error and stop every rank (MPI Abort), never a hang."""
        print(f"error (rank {self.rank} of {self.world_size}): {message}", file=sys.stderr, flush=True)
        if self.world_size > 1:
            self.mpi.Abort(code)
        raise SystemExit(code)


_group = ProcessGroup()


def group() -> ProcessGroup:
    """The current process group (world size 1 unless init() made a larger one)."""
    return _group


def set_group(g: ProcessGroup) -> ProcessGroup:
    global _group
    _group = g
    return g


def mpi_world_size() -> int:
    """The size of the MPI job this process is a rank of (1 when not under mpirun), read from
    the launcher's environment, without importing mpi4py."""
    for key in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS"):
        v = os.environ.get(key)
        if v and v.isdigit():
            return int(v)
    return 1


def init(world_size: int) -> ProcessGroup:
    """Join the MPI job as one of world_size ranks (world_size 1: the default group)."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"tensor_parallel must be a whole number >= 1, got {world_size!r}")
    if world_size == 1:
        return _group
    if _group.world_size == world_size:
        return _group
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise ConfigError("tensor parallelism needs mpi4py (pip install mpi4py) and an MPI library "
                          "(Debian: apt-get install openmpi-bin)") from e
    comm = MPI.COMM_WORLD
    if comm.size != world_size:
        raise ConfigError(f"tensor_parallel={world_size} but this MPI job has {comm.size} rank(s); "
                          f"start it with mpirun -n {world_size}")
    g = set_group(ProcessGroup(comm.rank, comm.size, comm))
    _abort_on_uncaught(g)
    return g


def _abort_on_uncaught(g: ProcessGroup) -> None:
    """An uncaught exception on any rank: print it once, then MPI Abort (no rank is left
    waiting in a collective)."""
    def hook(kind, value, tb):
        traceback.print_exception(kind, value, tb)
        g.abort(f"{kind.__name__}: {value}")
    sys.excepthook = hook


def local_rank() -> int:
    """This process's rank among those of its host (0 when not under a launcher)."""
    for key in ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK", "LOCAL_RANK"):
        v = os.environ.get(key)
        if v and v.isdigit():
            return int(v)
    return 0


def rank_device(device):
    """At world size N > 1 a device type without an index ("cuda") means this rank's own
    device on its host (cuda:<local rank>); anything else is kept as given."""
    if _group.world_size > 1 and isinstance(device, str) and device not in ("cpu",) and ":" not in device:
        return f"{device}:{local_rank()}"
    return device


# --- launching ------------------------------------------------------------------------
def find_launcher() -> str | None:
    return shutil.which("mpirun") or shutil.which("mpiexec")


def launch_command(world_size: int, argv: list[str], launcher: str | None = None) -> list[str]:
    """The mpirun command line that runs argv as world_size ranks on this host (Open MPI's
    root and oversubscription flags added where they apply)."""
    launcher = launcher or find_launcher()
    if launcher is None:
        raise ConfigError(f"--tensor-parallel {world_size} needs mpirun or mpiexec on PATH (Debian: "
                          "apt-get install openmpi-bin), or start the ranks yourself: "
                          f"mpirun -n {world_size} python -m hetinfer ...")
    cmd = [launcher]
    import subprocess
    try:
        ver = subprocess.run([launcher, "--version"], check=False, capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        ver = ""
    if "Open MPI" in ver or "OpenRTE" in ver:
        cmd += ["--oversubscribe"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd += ["--allow-run-as-root"]
    return cmd + ["-n", str(world_size)] + list(argv)


def relaunch(world_size: int, argv: list[str]) -> None:
    """Replace this process with `mpirun -n world_size argv` (never returns)."""
    cmd = launch_command(world_size, argv)
    os.environ["HETINFER_TP_LAUNCHED"] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvp(cmd[0], cmd)


def ensure_ranks(world_size: int, argv: list[str] | None) -> ProcessGroup:
    """world_size 1: the default group. Under mpirun: join it. Otherwise re-launch argv
    through mpirun (argv None: refuse with the command to use)."""
    if world_size == 1 or mpi_world_size() > 1 or os.environ.get("HETINFER_TP_LAUNCHED"):
        return init(world_size)
    if argv is None:
        raise ConfigError(f"tensor_parallel={world_size}: start this program under "
                          f"mpirun -n {world_size} (one process a rank)")
    relaunch(world_size, argv)
    raise AssertionError("unreachable")
