"""Tensor parallelism on CUDA: the NCCL communicator (hetinfer_cuda.comm) through CuPy.

- one GPU: a one-rank NcclCommunicator (the unique-id bootstrap, allReduce / allGather on the
  backend's stream with raw device pointers, the strided gather along a dim) and the ops at
  world size 1;
- two GPUs (skipped with fewer): `mpirun -n 2` runs the collectives against their references
  and `hetinfer generate --device cuda --tensor-parallel 2` in f16 / bf16 against one GPU."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys

import hetinfer as hi
import numpy as np
import pytest
from hetinfer import devices

pytestmark = pytest.mark.cuda


def _cuda_count() -> int:
    d = {x.name: x for x in devices()}.get("cuda")
    return d.count if d is not None and d.available else 0


def _nccl():
    try:
        from cupy.cuda import nccl
        nccl.get_version()
        return nccl
    except Exception:
        return None


needs_gpu = pytest.mark.skipif(_cuda_count() < 1, reason="needs a CUDA GPU")


class _OneRank:            # a process group of one whose "MPI" broadcast is the identity
    rank, world_size, is_root = 0, 1, True

    class mpi:
        @staticmethod
        def bcast(obj, root=0):
            return obj


@needs_gpu
@pytest.mark.parametrize("dt", ["f32", "f16", "bf16"])
def test_nccl_one_rank(dt):
    if _nccl() is None:
        pytest.skip("cupy.cuda.nccl is not usable here (CuPy without NCCL)")
    from hetinfer_cuda import comm
    from hetinfer_cuda.driver import get_device
    c = comm.NCCLCommunicator(_OneRank())
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 8, 5)).astype(hi.dtype(dt).np)
    x = hi.tensor(a, dt, "cuda")
    out = hi.empty(a.shape, dt, "cuda")
    dev = get_device(0)
    c.all_reduce(dev, x, out)
    assert np.array_equal(out.numpy(), a)
    c.all_reduce(dev, out, out)                                        # in place
    assert np.array_equal(out.numpy(), a)
    for dim in (0, 1, 2):
        g = hi.empty(a.shape, dt, "cuda")
        comm.gather(c, dev, x, dim, g, 1)
        assert np.array_equal(g.numpy(), a), dim
    # the ops at world size 1 (copies)
    assert np.array_equal(hi.ops.all_reduce(x, out=hi.empty(a.shape, dt, "cuda")).numpy(), a)
    assert np.array_equal(hi.ops.all_gather(x, dim=1).numpy(), a)


MPIRUN = shutil.which("mpirun") or shutil.which("mpiexec")
two_gpus = pytest.mark.skipif(_cuda_count() < 2 or MPIRUN is None or importlib.util.find_spec("mpi4py") is None
                              or _nccl() is None,
                              reason="needs 2 CUDA GPUs, mpirun, mpi4py and cupy.cuda.nccl")

COLLECTIVES = """
import numpy as np
import hetinfer as hi
from hetinfer import distributed, ops
from hetinfer.ops import reference as R
g = distributed.init(2)
dev = f"cuda:{g.rank}"
for dt, tol in (("f32", 1e-6), ("f16", 2e-3), ("bf16", 1e-2)):
    xs = [np.random.default_rng(r).standard_normal((4, 6, 8)).astype(hi.dtype(dt).np) for r in range(2)]
    x = hi.tensor(xs[g.rank], dt, dev)
    got = ops.all_reduce(x, out=hi.empty(x.shape, dt, dev)).numpy().astype(np.float64)
    assert np.allclose(got, R.all_reduce(xs), rtol=tol, atol=4 * tol), dt
    for dim in (0, 1, 2):
        assert np.array_equal(ops.all_gather(x, dim=dim).numpy().astype(np.float64), R.all_gather(xs, dim)), dim
print(f"rank {g.rank}: nccl collectives OK")
"""


def _env():
    import os
    return dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")


@two_gpus
def test_nccl_collectives_two_gpus(tmp_path):
    path = tmp_path / "coll.py"
    path.write_text(COLLECTIVES)
    p = subprocess.run([MPIRUN, "--oversubscribe", "-n", "2", sys.executable, path], check=False, capture_output=True,
                       text=True, env=_env(), timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("nccl collectives OK") == 2


@two_gpus
@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_generate_two_gpus_same_greedy_text(tmp_path, dtype):
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from tiny_models import make_tiny
    d, _ = make_tiny(tmp_path, "llama3-gqa-scaled-tied")
    argv = [sys.executable, "-m", "hetinfer", "generate", "--model", str(d), "--device", "cuda", "--dtype", dtype,
            "w5 w6 w7", "-n", "24", "--temperature", "0"]
    one = subprocess.run(argv, check=False, capture_output=True, text=True, env=_env(), timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([MPIRUN, "--oversubscribe", "-n", "2", *argv, "--tensor-parallel", "2"],
                         capture_output=True, text=True, env=_env(), timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout == one.stdout
