"""The conformance tests: one test per kernel registered for the device under test
(--hetinfer-device), i.e. per (op, dtype) whose winning kernel is registered for
that device type. Each draws --hetinfer-examples cases with hypothesis and checks
the op against its float64 reference. The plugin (hetinfer.testing.plugin)
parametrizes `hetinfer_kernel_key` and provides the fixtures."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hetinfer import ops, registry
from hetinfer.testing.cases import CASES
from hetinfer.testing.strategies import Case


def test_every_op_has_a_case_builder():
    """Every op in hetinfer.ops.OPS has a conformance case builder."""
    missing = sorted(set(ops.OPS) - set(CASES))
    assert not missing, f"ops with no conformance case builder in hetinfer/testing/cases.py: {missing}"


def test_kernel_conforms(hetinfer_kernel_key, hetinfer_device, hetinfer_examples):
    """The winning kernel for (op, device type, dtype) computes the op's reference."""
    op, dtype = hetinfer_kernel_key
    entry = registry.lookup(op, hetinfer_device.type, dtype)
    build = CASES.get(op)
    if build is None:
        pytest.fail(f"kernel {op}/{hetinfer_device.type}/{dtype} (from {entry.source}) has no conformance "
                    f"case builder; add one to hetinfer/testing/cases.py", pytrace=False)

    @settings(max_examples=hetinfer_examples, deadline=None, print_blob=True,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def check(data):
        case = Case(data, hetinfer_device, dtype)
        build(case)
        try:
            case.run()
        except AssertionError as e:
            raise AssertionError(f"{op}/{hetinfer_device}/{dtype} kernel {entry.fn.__module__}."
                                 f"{entry.fn.__qualname__} from plugin {entry.source!r}: {e}") from None

    # one hypothesis database key per (device type, op, dtype), not one shared by all
    check.hypothesis.inner_test._hypothesis_internal_add_digest = \
        f"{hetinfer_device.type}/{op}/{dtype}".encode()
    check()
