"""Tensor, dtype and device basics: views without copies, zero-copy host access,
memory-mapped arrays, the dtype table, device parsing and device errors.

The "dummy" device (tests/plugins/dummy) stands in for an accelerator: its memory is
not host memory, so .numpy() copies and views are read through the allocator."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hetinfer
from hetinfer import Device, DeviceError, DTypeError, HetinferError, ShapeError

DTYPES = [("f32", np.float32), ("f16", np.float16), ("bf16", ml_dtypes.bfloat16),
          ("i8", np.int8), ("i32", np.int32), ("i64", np.int64)]


@pytest.fixture(params=["cpu", "dummy"])
def device(request):
    if request.param == "dummy":
        request.getfixturevalue("installed_plugins")
    return request.param


# --- dtypes ------------------------------------------------------------------------------
@pytest.mark.parametrize("name,np_dtype", DTYPES, ids=[d[0] for d in DTYPES])
def test_dtype_table(name, np_dtype):
    dt = hetinfer.dtype(name)
    assert dt is getattr(hetinfer, name)
    assert dt.name == name and str(dt) == name
    assert dt.np == np.dtype(np_dtype)
    assert hetinfer.dtype(np.dtype(np_dtype)) is dt
    assert hetinfer.dtype(np_dtype) is dt
    assert hetinfer.dtype(dt) is dt
    assert dt.itemsize == np.dtype(np_dtype).itemsize
    assert dt.is_float == (name in ("f32", "f16", "bf16"))


@pytest.mark.parametrize("name,np_dtype", DTYPES, ids=[d[0] for d in DTYPES])
def test_dtype_round_trip(name, np_dtype, device):
    a = (np.arange(-6, 6).reshape(3, 4) * 3).astype(np_dtype)
    for t in (hetinfer.tensor(a, device=device), hetinfer.tensor(a.astype(np.float64), name, device)):
        assert t.dtype is hetinfer.dtype(name)
        assert t.shape == (3, 4) and t.nbytes == a.nbytes
        back = t.numpy()
        assert back.dtype == np.dtype(np_dtype)
        np.testing.assert_array_equal(back.astype(np.float64), a.astype(np.float64))


def test_bf16_rounds_like_ml_dtypes():
    x = np.array([1.0 + 2**-9, 1.0 + 3 * 2**-9, 3.14159, -1e-3, 65504.0], np.float32)
    t = hetinfer.tensor(x, "bf16")
    assert t.numpy().dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(t.numpy(), x.astype(ml_dtypes.bfloat16))


@pytest.mark.parametrize("alias,name", [("float32", "f32"), ("fp32", "f32"), ("float", "f32"),
                                        ("float16", "f16"), ("half", "f16"), ("bfloat16", "bf16"),
                                        ("int8", "i8"), ("int32", "i32"), ("int64", "i64"),
                                        ("FLOAT16", "f16")])
def test_dtype_aliases(alias, name):
    assert hetinfer.dtype(alias) is hetinfer.dtype(name)


@pytest.mark.parametrize("bad", ["f8", "float64", "complex", "", np.float64, np.complex64, np.bool_, object()])
def test_unknown_dtype(bad):
    with pytest.raises(DTypeError, match=r"f32.*f16.*bf16.*i8.*i32.*i64"):
        hetinfer.dtype(bad)


def test_tensor_of_unsupported_numpy_dtype():
    with pytest.raises(DTypeError, match="bool"):
        hetinfer.tensor(np.array([True, False]))
    t = hetinfer.tensor([1.5, 2.5])                       # float64 data becomes f32
    assert t.dtype is hetinfer.f32


# --- devices -------------------------------------------------------------------------------
@pytest.mark.parametrize("spec,type_,index", [("cpu", "cpu", 0), ("cuda", "cuda", 0), ("cuda:0", "cuda", 0),
                                              ("cuda:1", "cuda", 1), ("mydev:12", "mydev", 12)])
def test_device_parse(spec, type_, index):
    d = Device.parse(spec)
    assert (d.type, d.index) == (type_, index)
    assert Device.parse(d) is d
    assert Device.parse(str(d)) == d


def test_device_str():
    assert str(Device.parse("cpu")) == "cpu"
    assert str(Device.parse("cuda")) == "cuda:0"
    assert str(Device.parse("cuda:3")) == "cuda:3"


@pytest.mark.parametrize("bad", ["", "cuda:x", "cuda:-1", "cuda:1.5", None, 3, 1.0])
def test_device_parse_errors(bad):
    with pytest.raises(DeviceError, match=r"cuda:0|device"):
        Device.parse(bad)


@pytest.mark.parametrize("bad", ["cuda:", ":1", "cu da"])
def test_device_parse_rejects_malformed(bad):
    try:
        Device.parse(bad)
    except DeviceError:
        return
    raise AssertionError(f"Device.parse({bad!r}) accepted a malformed device")


def test_unknown_device():
    with pytest.raises(DeviceError, match=r"unknown device 'tpu:0'; registered device types: .*cpu"):
        hetinfer.empty((2,), device="tpu")
    with pytest.raises(DeviceError, match="unknown device"):
        hetinfer.tensor([1.0], device="nosuchdevice:3")


def test_absent_device(installed_plugins):
    import hetinfer_dummy
    names = {d.name: d for d in hetinfer.devices()}
    assert names["dummyabsent"].available is False
    with pytest.raises(DeviceError, match=rf"dummyabsent.*not available: {hetinfer_dummy.ABSENT_REASON}"):
        hetinfer.empty((2,), device="dummyabsent")


def test_device_index_out_of_range(installed_plugins):
    hetinfer.empty((2,), device="dummy:1")                 # the dummy backend has two devices
    with pytest.raises(DeviceError, match=r"'dummy:2' does not exist: 2 dummy device\(s\) present"):
        hetinfer.empty((2,), device="dummy:2")
    with pytest.raises(DeviceError, match=r"does not exist: 1 cpu device"):
        hetinfer.empty((2,), device="cpu:1")


def test_device_error_names_the_index():
    with pytest.raises(DeviceError, match=r"'cpu:1'"):
        hetinfer.empty((2,), device="cpu:1")


# --- views ---------------------------------------------------------------------------------
def _arange(shape, device="cpu"):
    a = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    return a, hetinfer.tensor(a, device=device)


@st.composite
def basic_index(draw, shape):
    """A basic index (ints, slices with any step, None, Ellipsis) leaving at least one axis."""
    n_axes = draw(st.integers(0, len(shape)))
    idx, kept = [], len(shape) - n_axes
    for n in shape[:n_axes]:
        if n == 0 or draw(st.booleans()):
            bound = st.none() | st.integers(-n - 2, n + 2)
            step = st.none() | st.integers(-3, 3).filter(bool)
            idx.append(slice(draw(bound), draw(bound), draw(step)))
            kept += 1
        else:
            idx.append(draw(st.integers(-n, n - 1)))
    if kept == 0:                                           # keep the result an array, not a 0-d
        idx[-1] = slice(None)
    if draw(st.booleans()):
        idx.insert(draw(st.integers(0, len(idx))), None)
    if draw(st.booleans()) and n_axes < len(shape):
        idx.append(Ellipsis)
    return tuple(idx)


@st.composite
def shape_and_indices(draw):
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=4)))
    first = draw(basic_index(shape))
    second_shape = np.empty(shape)[first].shape
    second = draw(basic_index(second_shape))
    return shape, first, second


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=shape_and_indices())
def test_indexing_matches_numpy(device, case):
    shape, first, second = case
    a, t = _arange(shape, device)
    v = t[first]
    assert v.shape == a[first].shape
    np.testing.assert_array_equal(v.numpy(), a[first])
    w = v[second]                                           # a view of a view
    np.testing.assert_array_equal(w.numpy(), a[first][second])
    if device == "cpu" and v.numel:
        assert np.shares_memory(v.numpy(), t.numpy())       # no copy
    assert v.buffer is t.buffer


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_permute_and_transpose_match_numpy(device, data):
    shape = tuple(data.draw(st.lists(st.integers(1, 5), min_size=2, max_size=4), label="shape"))
    perm = tuple(data.draw(st.permutations(range(len(shape))), label="perm"))
    a, t = _arange(shape, device)
    p = t.permute(*perm)
    np.testing.assert_array_equal(p.numpy(), a.transpose(perm))
    ax = data.draw(st.tuples(st.integers(-len(shape), len(shape) - 1), st.integers(-len(shape), len(shape) - 1)),
                   label="axes")
    np.testing.assert_array_equal(t.transpose(*ax).numpy(), np.swapaxes(a, *ax))
    np.testing.assert_array_equal(p.contiguous().numpy(), a.transpose(perm))
    assert p.contiguous().is_contiguous


def test_view_facts():
    a, t = _arange((4, 6))
    assert (t.ndim, t.numel, t.nbytes, len(t)) == (2, 24, 96, 4)
    assert t.is_contiguous and t.strides == (6, 1)
    s = t[1:3, ::2]
    assert s.shape == (2, 3) and s.strides == (6, 2) and s.offset == 6 and not s.is_contiguous
    assert t[1:3].is_contiguous and t[1:3].offset == 6
    assert t.transpose().shape == (6, 4) and t.transpose().strides == (1, 6)


def test_view_and_reshape():
    a, t = _arange((4, 6))
    np.testing.assert_array_equal(t.view(3, 8).numpy(), a.reshape(3, 8))
    np.testing.assert_array_equal(t.reshape((2, -1, 3)).numpy(), a.reshape(2, -1, 3))
    np.testing.assert_array_equal(t[2:].view(-1).numpy(), a[2:].reshape(-1))
    assert t.view(24).buffer is t.buffer


@pytest.mark.parametrize("make", [lambda t: t.transpose(), lambda t: t[:, 1:5]],
                         ids=["transposed", "column-slice"])
def test_view_of_non_contiguous_raises(make):
    _, t = _arange((4, 6))
    v = make(t)
    with pytest.raises(ShapeError, match=r"contiguous"):
        v.view(-1)
    with pytest.raises(ShapeError, match=r"contiguous"):
        v.reshape(v.numel)
    np.testing.assert_array_equal(v.contiguous().view(-1).numpy(), make(np.arange(24.0).reshape(4, 6)).reshape(-1))


def _factorizations(n):
    return [(n,), (1, n)] + [(d, n // d) for d in range(2, n + 1) if n % d == 0] + \
           [(d, e, n // (d * e)) for d in range(1, n + 1) if n % d == 0
            for e in range(1, n // d + 1) if (n // d) % e == 0]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_view_of_strided_tensor_matches_numpy(device, data):
    """view/reshape of a strided view: works exactly when numpy can reshape without a copy."""
    shape = tuple(data.draw(st.lists(st.integers(1, 5), min_size=1, max_size=3), label="shape"))
    a, t = _arange(shape, device)
    idx = data.draw(basic_index(shape), label="index")
    if data.draw(st.booleans(), label="transpose?") and a[idx].ndim >= 2:
        av, tv = np.swapaxes(a[idx], -1, -2), t[idx].transpose()
    else:
        av, tv = a[idx], t[idx]
    target = data.draw(st.sampled_from(_factorizations(av.size) if av.size else [(0,)]), label="target")
    try:
        expected = av.reshape(target, copy=False)
    except ValueError:
        with pytest.raises(ShapeError, match=r"contiguous"):
            tv.view(*target)
        return
    got = tv.view(*target)
    assert got.shape == expected.shape and got.buffer is t.buffer
    np.testing.assert_array_equal(got.numpy(), expected)


@pytest.mark.parametrize("shape,match", [((5, 5), r"cannot view \(4, 6\) \(24 elements\) as \(5, 5\)"),
                                         ((-1, -1), r"only one -1"), ((7, -1), r"cannot view")])
def test_view_bad_shape(shape, match):
    _, t = _arange((4, 6))
    with pytest.raises(ShapeError, match=match):
        t.view(*shape)


@pytest.mark.parametrize("idx", [(0, 0, 0), 7, (slice(None), 9), (1, 2, 3)])
def test_bad_index(idx):
    _, t = _arange((4, 6))
    with pytest.raises(ShapeError, match=r"index|bad"):
        t[idx]


def test_zero_dim_index():
    a, t = _arange((3, 4))
    assert t[1, 2].shape == ()
    assert float(t[1, 2].numpy()) == a[1, 2]
    assert float(t[1][2].numpy()) == a[1, 2]


def test_fancy_index_is_refused():
    a, t = _arange((6,))
    with pytest.raises(ShapeError):
        v = t[[1]]
        assert float(v.numpy()[0]) == a[1]                # if it is allowed at all, it must be right


@pytest.mark.parametrize("call", [lambda t: t.permute(0, 0), lambda t: t.permute(0), lambda t: t.transpose(0, 5)],
                         ids=["repeated", "too-few", "out-of-range"])
def test_bad_axes_raise_shape_error(call):
    _, t = _arange((3, 4))
    with pytest.raises(ShapeError):
        call(t)


def test_fancy_indices_needing_copies_are_refused():
    _, t = _arange((4, 6))
    with pytest.raises(ShapeError, match=r"copy|basic indexing"):
        t[[0, 2]]
    with pytest.raises(ShapeError, match=r"copy|basic indexing"):
        t[np.array([True, False, True, False])]


# --- data movement -----------------------------------------------------------------------
def test_numpy_is_zero_copy_on_cpu():
    a, t = _arange((3, 4))
    n = t.numpy()
    assert np.shares_memory(n, t.numpy())
    n[1, 2] = -5.0
    assert t.numpy()[1, 2] == -5.0
    col = t[:, 1]                                          # a strided view writes through too
    col.numpy()[...] = 7.0
    np.testing.assert_array_equal(t.numpy()[:, 1], np.full(3, 7.0, np.float32))
    assert a[1, 2] != -5.0                                  # tensor() copied its input


def test_numpy_copies_on_non_host_device(installed_plugins):
    a, t = _arange((3, 4), "dummy")
    n = t.numpy()
    n[...] = 0
    np.testing.assert_array_equal(t.numpy(), a)
    np.testing.assert_array_equal(t[::-1, 1::2].numpy(), a[::-1, 1::2])


def test_to_same_device_is_identity(device):
    _, t = _arange((2, 3), device)
    assert t.to(device) is t
    assert t.to(Device.parse(device)) is t
    assert t.contiguous() is t


def test_to_other_device_and_back(installed_plugins):
    a, t = _arange((3, 5))
    view = t[1:, ::2]
    d = view.to("dummy")
    assert str(d.device) == "dummy:0" and d.shape == (2, 3) and d.is_contiguous
    np.testing.assert_array_equal(d.numpy(), a[1:, ::2])
    back = d.to("cpu")
    assert back.device == Device.parse("cpu")
    np.testing.assert_array_equal(back.numpy(), a[1:, ::2])
    np.testing.assert_array_equal(hetinfer.tensor(a, device="dummy:1").to("dummy").numpy(), a)


def test_from_numpy_wraps_without_copy():
    a = np.arange(12, dtype=np.float16).reshape(3, 4)
    t = hetinfer.from_numpy(a)
    assert np.shares_memory(t.numpy(), a)
    assert t.buffer.owned is False
    a[0, 0] = 9
    assert t.numpy()[0, 0] == 9
    t2 = hetinfer.from_numpy(a.T)                           # not C-contiguous: copied once
    np.testing.assert_array_equal(t2.numpy(), a.T)


def test_from_numpy_memmap(tmp_path):
    path = tmp_path / "weights.bin"
    np.arange(64, dtype=np.float32).tofile(path)
    mm = np.memmap(path, dtype=np.float32, mode="r+", shape=(8, 8))
    t = hetinfer.from_numpy(mm)
    assert np.shares_memory(t.numpy(), mm)
    assert t[2:4].numpy().base is not None and np.shares_memory(t[2:4].numpy(), mm)
    mm[3, 3] = -1.0
    assert t.numpy()[3, 3] == -1.0
    ro = np.memmap(path, dtype=ml_dtypes.bfloat16, mode="r", shape=(16, 8))
    tb = hetinfer.from_numpy(ro)
    assert tb.dtype is hetinfer.bf16 and np.shares_memory(tb.numpy(), ro)


def test_from_numpy_needs_host_memory(installed_plugins):
    with pytest.raises(DeviceError, match=r"from_numpy needs a host-memory device, not dummy:0"):
        hetinfer.from_numpy(np.zeros(3, np.float32), "dummy")


def test_copy_and_fill(device):
    a, t = _arange((3, 4), device)
    t.fill_(2.5)
    np.testing.assert_array_equal(t.numpy(), np.full((3, 4), 2.5, np.float32))
    t.copy_(a)
    np.testing.assert_array_equal(t.numpy(), a)
    with pytest.raises(ShapeError, match=r"copy_: source shape \(4, 3\) != destination shape \(3, 4\)"):
        t.copy_(a.T)
    t[1:].fill_(-1.0)                                         # contiguous view of the tensor
    np.testing.assert_array_equal(t.numpy()[1:], -1.0)
    np.testing.assert_array_equal(t.numpy()[0], a[0])


def test_zero_dim_tensor():
    t = hetinfer.empty((), "f16")
    t.fill_(3.0)
    assert t.shape == () and t.numel == 1 and float(t.numpy()) == 3.0


def test_tensor_of_scalar_is_zero_dim():
    assert hetinfer.tensor(np.float32(2.0)).shape == ()
    assert hetinfer.tensor(2.0).shape == ()


def test_empty_bad_shape():
    with pytest.raises(ShapeError, match=r"non-negative integers"):
        hetinfer.empty((2, -1))
    with pytest.raises(ShapeError, match=r"non-negative integers"):
        hetinfer.empty((2.5,))
    assert hetinfer.empty(3).shape == (3,)
    assert hetinfer.empty((0, 4)).numel == 0


def test_every_error_is_a_hetinfer_error():
    for cls in (ShapeError, DTypeError, DeviceError, hetinfer.KernelNotFoundError, hetinfer.RegistrationError,
                hetinfer.PluginError, hetinfer.LoadError, hetinfer.ConfigError, hetinfer.OutOfMemoryError,
                hetinfer.InputError):
        assert issubclass(cls, HetinferError)
