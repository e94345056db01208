"""hetinfer's conformance suite: every backend computes the same function.

A pytest plugin (entry point ``pytest11: hetinfer``) adds two options:

    pytest --hetinfer-device=cpu            # or cuda, cuda:1, mydev ...
    pytest --hetinfer-device=mydev --hetinfer-examples=100

With ``--hetinfer-device`` the conformance tests (``hetinfer.testing.conformance``)
are collected automatically: one test per kernel registered for that device type
(op x dtype), each checked on hypothesis-drawn cases against the float64
references in ``hetinfer.ops.reference``. A device that is absent or unavailable
skips the suite with the reason its backend gave (``hetinfer devices``).

Modules: ``plugin`` (pytest hooks), ``strategies`` (sizes, layouts, inputs,
tolerances), ``cases`` (one case builder per op), ``conformance`` (the tests).
"""
