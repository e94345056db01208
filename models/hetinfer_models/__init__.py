"""Built-in model architectures, registered through the `register_models` hook."""

from hetinfer import hookimpl

from .llama import LlamaForCausalLM, Qwen2ForCausalLM


@hookimpl
def register_models(register):
    register("LlamaForCausalLM", LlamaForCausalLM)
    register("Qwen2ForCausalLM", Qwen2ForCausalLM)
