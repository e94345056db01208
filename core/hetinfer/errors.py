"""Every error hetinfer raises on purpose is a HetinferError: one clear message,
naming what was wrong and what was expected."""


class HetinferError(Exception):
    """Base class of all hetinfer errors."""


class ShapeError(HetinferError, ValueError):
    """A tensor's shape does not match what an op expects."""


class DTypeError(HetinferError, TypeError):
    """A dtype is unknown or not supported where it was used."""


class DeviceError(HetinferError, RuntimeError):
    """A device is unknown, absent, or tensors live on different devices."""


class KernelNotFoundError(HetinferError, LookupError):
    """No kernel is registered for (op, device type, dtype)."""


class RegistrationError(HetinferError, ValueError):
    """A kernel, device or model could not be registered (e.g. duplicate key)."""


class PluginError(HetinferError, RuntimeError):
    """A plugin failed to load or misbehaved."""


class LoadError(HetinferError, ValueError):
    """A weight or tokenizer file is missing, truncated, corrupt or unsupported."""


class ConfigError(HetinferError, ValueError):
    """A model config is missing a field, contradicts the weights, or names an
    unknown architecture."""


class OutOfMemoryError(HetinferError, MemoryError):
    """A device allocator could not satisfy a request."""


class InputError(HetinferError, ValueError):
    """Bad user input: empty prompt, prompt longer than the context, bad
    sampling parameters."""


class ChatTemplateError(InputError):
    """A chat template failed to compile or render (a syntax error, an error raised inside it,
    or past its budget); the message names the template's source and the cause."""
