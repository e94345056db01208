"""The kernel conformance suite (hetinfer.testing.conformance) on this repo's default
device, cpu (see conftest.py); `pytest --hetinfer-device=DEV` runs it on DEV."""

from hetinfer.testing.conformance import test_every_op_has_a_case_builder, test_kernel_conforms  # noqa: F401
