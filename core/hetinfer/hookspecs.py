"""The hooks a hetinfer plugin may implement. Built-in backends and models use
these same hooks. Each takes a `register` callback and returns nothing."""

import pluggy

hookspec = pluggy.HookspecMarker("hetinfer")
hookimpl = pluggy.HookimplMarker("hetinfer")


@hookspec
def register_devices(register):
    """Register device types: register(DeviceType(name=..., available=..., make_allocator=...))."""


@hookspec
def register_kernels(register):
    """Register kernels: register(op, device_type, dtype, fn, priority=0, contiguous=False)."""


@hookspec
def register_models(register):
    """Register model architectures: register("LlamaForCausalLM", model_class)."""


@hookspec
def register_commands(register):
    """Add `hetinfer` verbs: register(name, configure, run, help="") with configure(argparse parser) and run(args) -> exit code."""
