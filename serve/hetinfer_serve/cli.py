"""The `serve` verb: its flags, the engine process, uvicorn, and draining on SIGTERM."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from contextlib import asynccontextmanager
from pathlib import Path


def _seconds(text: str) -> float:
    """An argparse type: a finite number of seconds > 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < v < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds > 0, got {text}")
    return v


def configure(s: argparse.ArgumentParser) -> None:
    from hetinfer.cli import engine_args, model_args, whole_number
    model_args(s)
    g = s.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    g.add_argument("--port", type=whole_number(0, 65535), default=8000, help="port (default 8000)")
    g.add_argument("--api-key", default=os.environ.get("HETINFER_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every route but /health "
                        "(default: $HETINFER_API_KEY; none = open)")
    g.add_argument("--served-model-name", default=None,
                   help="the model id clients send and /v1/models lists (default: the model file's stem)")
    g.add_argument("--max-body-bytes", type=whole_number(1024), default=1 << 20, help="request body limit (default 1 MiB)")
    g.add_argument("--max-queued", type=whole_number(0), default=256,
                   help="sequences that may wait beyond the running batch; more get 429 (default 256)")
    g.add_argument("--request-timeout", type=_seconds, default=600.0,
                   help="seconds a request may take before it is aborted (default 600)")
    g.add_argument("--grace", type=_seconds, default=30.0,
                   help="seconds SIGTERM lets in-flight requests finish (default 30)")
    engine_args(s)


def _model_name(args) -> str:
    if args.served_model_name:
        return args.served_model_name
    from hetinfer.engine import default_model_path
    p = Path(args.model) if args.model else default_model_path()
    name = p.name if p.is_dir() else p.stem
    return name.split(".")[0] if not args.model else name


def run(args) -> int:
    import uvicorn

    from hetinfer.chat_template import ChatTemplate
    from hetinfer.engine import default_model_path
    from hetinfer.loaders import load_checkpoint

    from .app import ServeConfig, Server, create_app
    from .engine_process import EngineProcess

    engine = EngineProcess(args)          # the model loads in the engine process meanwhile
    print(f"hetinfer serve: loading the model in the engine process (pid {engine.pid})", flush=True)
    try:
        ckpt = load_checkpoint(args.model or default_model_path(), progress=False)   # tokenizer, template
        template = ChatTemplate.from_checkpoint(ckpt)
        info = engine.wait_ready(ckpt.tokenizer)
    except BaseException:
        engine.shutdown()
        raise
    config = ServeConfig(model_name=_model_name(args), api_key=args.api_key or None,
                         max_body_bytes=args.max_body_bytes, max_queued=args.max_queued,
                         request_timeout=args.request_timeout)
    server = Server(engine, template, config)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.shutdown()

    app = create_app(server, lifespan=lifespan)

    class _Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                print(info.budget_line, flush=True)
                auth = "API key required" if config.api_key else "no API key"
                print(f"hetinfer serve: {config.model_name} on http://{args.host}:{args.port} ({auth})", flush=True)

        def handle_exit(self, sig, frame):      # drain and exit 0 (uvicorn would re-raise the signal)
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            else:
                if not self.should_exit:
                    print(f"hetinfer serve: {signal.Signals(sig).name}: finishing in-flight requests "
                          f"(grace {args.grace:g} s)", flush=True)
                self.should_exit = True

    cfg = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", lifespan="on",
                         timeout_graceful_shutdown=args.grace, access_log=False)
    srv = _Server(cfg)
    try:
        srv.run()
    finally:
        engine.shutdown()
    if not srv.started:
        print(f"hetinfer serve: could not start on {args.host}:{args.port}", file=sys.stderr)
        return 1
    print("hetinfer serve: stopped", flush=True)
    return 0
