"""hetinfer-serve: `hetinfer serve`, an OpenAI-compatible HTTP server on the batching engine.

This module is the plugin (entry point group `hetinfer`): it only registers the `serve`
verb; FastAPI, uvicorn and the model load when the command runs.

    protocol.py     pydantic request models (-> SamplingParams), OpenAI error shape
    engine_loop.py  one thread stepping the engine; a queue per request; abort
    app.py          FastAPI routes, SSE, API key, body limit, metrics
    cli.py          the `serve` verb: flags, load, uvicorn, SIGTERM drain
"""

from hetinfer.hookspecs import hookimpl


@hookimpl
def register_commands(register):
    from .cli import configure, run
    register("serve", configure, run, help="serve the OpenAI HTTP API (completions, chat, metrics)")
