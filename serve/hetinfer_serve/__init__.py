"""hetinfer-serve: `hetinfer serve`, an OpenAI-compatible HTTP server on the batching engine.

This module is the plugin (entry point group `hetinfer`): it only registers the `serve`
verb; FastAPI, uvicorn and the model load when the command runs.

    protocol.py          pydantic request models (-> SamplingParams), OpenAI error shape
    engine_core.py       the engine driven by add/abort commands, stepped; its own process's main
    engine_process.py    the client of `hetinfer serve`: the core in a spawned process, pipes
    engine_loop.py       the in-process client: one thread stepping the core (tests, embedding)
    output_processor.py  token ids -> text and events, a queue per request; the clients' base
    app.py               FastAPI routes, SSE, API key, body limit, metrics
    cli.py               the `serve` verb: flags, the engine process, uvicorn, SIGTERM drain
"""

from hetinfer.hookspecs import hookimpl


@hookimpl
def register_commands(register):
    from .cli import configure, run
    register("serve", configure, run, help="serve the OpenAI HTTP API (completions, chat, metrics)")
