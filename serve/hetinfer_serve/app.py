"""FastAPI routes in OpenAI's / vLLM's shapes, SSE streaming, the API key, the body limit,
the queue cap, the per-request timeout and the Prometheus metrics."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from starlette.exceptions import HTTPException as StarletteHTTPException

from hetinfer.errors import HetinferError, InputError

from .protocol import ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest, APIError, parse

_TIMEOUT = object()                       # put in a request's queue when it runs past the timeout

STATIC = Path(__file__).parent / "static"


@dataclass
class ServeConfig:
    model_name: str = "hetinfer"
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    max_queued: int = 256              # requests waiting beyond the running batch
    request_timeout: float = 600.0


class _EngineCollector:
    """Gauges and counters read from the engine core's stats at scrape time."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        st = self.engine.stats()
        total = st["num_blocks"]
        for name, doc, v in (("running", "requests in the running batch", st["running"]),
                             ("waiting", "requests waiting to be scheduled", st["waiting"]),
                             ("kv_blocks_total", "KV cache blocks", total),
                             ("kv_blocks_used", "KV cache blocks in use", total - st["free_blocks"]),
                             ("kv_cache_usage", "share of KV blocks in use", 1 - st["free_blocks"] / max(total, 1)),
                             ("prefix_cache_hit_rate", "share of prompt blocks found in the prefix cache",
                              st["prefix_hit_rate"])):
            g = GaugeMetricFamily(f"hetinfer_{name}", doc)
            g.add_metric([], float(v))
            yield g
        for name, doc, v in (("preemptions", "sequences preempted", st["preemptions"]),
                             ("prefix_cache_hits", "prompt blocks found in the prefix cache", st["prefix_hits"]),
                             ("prefix_cache_queries", "full prompt blocks looked up", st["prefix_queries"]),
                             ("engine_steps", "engine steps", st["steps"]),
                             ("graph_captures", "step graphs captured", st["graph_captures"]),
                             ("eager_steps", "steps run without a graph (first use of a shape, penalties, "
                                             "logprobs, no graphs)", st["eager_steps"])):
            c = CounterMetricFamily(f"hetinfer_{name}", doc)
            c.add_metric([], float(v))
            yield c
        for name, doc, key in (
                ("core_time_to_first_token_seconds", "time from a request reaching the engine core to its "
                 "first token (the rest of time to first token is HTTP, queues and pipes)", "first_token"),
                ("core_step_seconds", "engine step time", "step"),
                ("core_first_token_step_seconds", "time of the steps that gave some request its first token",
                 "first_step")):
            yield SummaryMetricFamily(f"hetinfer_{name}", doc, count_value=st[f"{key}_count"],
                                      sum_value=st[f"{key}_sum"])


class Metrics:
    def __init__(self, engine):
        self.registry = r = CollectorRegistry()
        r.register(_EngineCollector(engine))
        self.prompt_tokens = Counter("hetinfer_prompt_tokens", "prompt tokens processed", registry=r)
        self.generation_tokens = Counter("hetinfer_generation_tokens", "tokens generated", registry=r)
        self.requests = Counter("hetinfer_requests", "finished requests", ["finish_reason"], registry=r)
        self.aborted = Counter("hetinfer_aborted_sequences", "sequences aborted before they finished "
                               "(client gone, timeout, error)", registry=r)
        lat = (.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120)
        self.ttft = Histogram("hetinfer_time_to_first_token_seconds", "time to first token", buckets=lat,
                              registry=r)
        self.tpot = Histogram("hetinfer_time_per_output_token_seconds", "time per output token after the first",
                              buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5), registry=r)
        self.e2e = Histogram("hetinfer_e2e_request_latency_seconds", "request latency", buckets=lat, registry=r)


class Server:
    """The app's state: the engine client (EngineProcess, or EngineLoop in this process), its
    tokenizer, the chat template, the limits."""

    def __init__(self, engine, chat_template, config: ServeConfig):
        self.engine, self.template, self.config = engine, chat_template, config
        self.tokenizer = engine.tokenizer
        self.info = engine.info
        self.metrics = Metrics(engine)
        self.created = int(time.time())
        self._pieces: dict[int, str] = {}

    # --- helpers -------------------------------------------------------------------
    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.config.model_name:
            raise APIError(404, f"the model '{model}' does not exist; this server serves "
                                f"'{self.config.model_name}'", param="model", code="model_not_found")

    def check_ids(self, ids: list[int], what: str = "prompt") -> list[int]:
        vocab = self.info.vocab_size
        for t in ids:
            if not 0 <= t < vocab:
                raise APIError(400, f"'{what}': token id {t} is outside the vocabulary [0, {vocab})", param=what)
        return ids

    def check_fits(self, ids: list[int], max_tokens: int) -> None:
        try:
            self.info.check(len(ids), max_tokens)
        except InputError as e:
            raise APIError(400, str(e), param="prompt" if ids else None, code="context_length_exceeded") from None

    def check_capacity(self, n: int) -> None:
        if self.engine.failed:
            raise APIError(503, f"the engine failed: {self.engine.failed}")
        cap = self.info.max_num_seqs + self.config.max_queued
        if self.engine.num_inflight + n > cap:
            raise APIError(429, f"the server is busy: {self.engine.num_inflight} sequences queued or running "
                                f"(at most {cap}); retry later", code="queue_full")

    def token_text(self, t: int) -> str:
        got = self._pieces.get(t)
        if got is None:
            got = self._pieces[t] = self.tokenizer.decode([t])
        return got

    def format_logprobs(self, entries, chat: bool, offset: int = 0):
        """OpenAI's logprobs object for [(id, logprob, top)] entries; (object, next text offset)."""
        if chat:
            def one(t, lp):
                s = self.token_text(t)
                return {"token": s, "logprob": lp, "bytes": list(s.encode())}
            return {"content": [one(t, lp) | {"top_logprobs": [one(i, x) for i, x in top]}
                                for t, lp, top in entries]}, offset
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t, lp, top in entries:
            s = self.token_text(t)
            out["tokens"].append(s)
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append({self.token_text(i): x for i, x in top})
            out["text_offset"].append(offset)
            offset += len(s)
        return out, offset

    async def run_choices(self, jobs, request: Request, num_logprobs: int | None = None):
        """Submit (index, ids, params) jobs; yield lists of their Events (all that have arrived
        since the last: under load a stream sends several tokens' chunks in one write) until all
        finished. On exit
        (done, error, timeout, cancellation by a client disconnect) unfinished ones are aborted.
        Several choices of one prompt (n > 1): the first runs alone until its prefill is done,
        then the others join and take its full prompt blocks from the prefix cache."""
        base = uuid.uuid4().hex[:12]
        queue: asyncio.Queue = asyncio.Queue()
        rids = {index: f"{base}-{index}" for index, _, _ in jobs}
        later: dict[int, list] = {}                  # first choice of a prompt -> the other choices
        lead: dict[int, int] = {}
        for job in jobs:
            head = lead.setdefault(id(job[1]), job[0])
            if head != job[0]:
                later.setdefault(head, []).append(job)
                continue
            self.engine.submit(rids[job[0]], job[0], job[1], job[2], queue, num_logprobs)
        for ids in {id(j[1]): j[1] for j in jobs}.values():
            self.metrics.prompt_tokens.inc(len(ids))
        left = set(rids)
        t0 = time.perf_counter()
        first: dict[int, float] = {}
        ntok: dict[int, int] = {}
        loop = asyncio.get_running_loop()           # the timeout: one timer per request, not one per wait
        timer = loop.call_at(loop.time() + self.config.request_timeout, queue.put_nowait, _TIMEOUT)
        try:
            while left:
                got = [await queue.get()] if queue.empty() else []
                while not queue.empty():
                    got.append(queue.get_nowait())
                if any(ev is _TIMEOUT for ev in got):
                    raise APIError(408, f"the request ran past the server's timeout "
                                        f"({self.config.request_timeout:g} s)", code="timeout")
                now = time.perf_counter()
                tokens = 0
                for ev in got:
                    for index, ids, params in later.pop(ev.index, ()):     # the prompt is in the cache now
                        self.engine.submit(rids[index], index, ids, params, queue, num_logprobs)
                    if ev.num_tokens:
                        if not first:
                            self.metrics.ttft.observe(now - t0)
                        first.setdefault(ev.index, now)
                        ntok[ev.index] = ntok.get(ev.index, 0) + ev.num_tokens
                        tokens += ev.num_tokens
                    if ev.finished:
                        left.discard(ev.index)
                        if ev.error is None:
                            self.metrics.requests.labels(ev.finish_reason or "stop").inc()
                            n = ntok.get(ev.index, 0)
                            if n > 1:
                                self.metrics.tpot.observe((now - first[ev.index]) / (n - 1))
                if tokens:
                    self.metrics.generation_tokens.inc(tokens)
                yield got
            self.metrics.e2e.observe(time.perf_counter() - t0)
        finally:
            timer.cancel()
            waiting = {j[0] for js in later.values() for j in js}      # never submitted
            left -= waiting
            for index in left:
                self.engine.abort(rids[index])
            if left:
                self.metrics.aborted.inc(len(left))


async def _read_json(request: Request, limit: int):
    size, chunks = 0, []
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body is over the limit of {limit} bytes", code="body_too_large")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks) or b"null")
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None


class Guard:
    """Pure ASGI middleware (streaming-safe): the Bearer API key on every route but /health
    and the page, and an early 413 from Content-Length."""

    OPEN = {"/health", "/", "/favicon.ico"}

    def __init__(self, app, config: ServeConfig):
        self.app, self.config = app, config

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.config.api_key and scope["path"] not in self.OPEN:
            auth = headers.get(b"authorization", b"").decode("latin-1").strip()
            token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode("utf-8", "replace"), self.config.api_key.encode()):
                why = "a wrong API key" if token else "no API key (send Authorization: Bearer KEY)"
                err = APIError(401, f"the request has {why}", code="invalid_api_key")
                return await JSONResponse(err.body(), err.status,
                                          headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        cl = headers.get(b"content-length")
        if cl is not None:
            try:
                n = int(cl)
            except ValueError:
                n = -1
            if n < 0 or n > self.config.max_body_bytes:
                err = (APIError(413, f"the request body is over the limit of {self.config.max_body_bytes} bytes",
                                code="body_too_large") if n > 0 else APIError(400, "bad Content-Length"))
                return await JSONResponse(err.body(), err.status)(scope, receive, send)
        return await self.app(scope, receive, send)


def merge_events(batch: list) -> list:
    """The events that waited together, one per choice (texts and logprobs joined): under load
    a client gets one chunk of several tokens rather than a chunk per token, as from vLLM."""
    out, last = [], {}
    for ev in batch:
        m = last.get(ev.index)
        if m is not None and not m.finished and ev.error is None:
            m.text += ev.text
            m.num_tokens += ev.num_tokens
            m.finished, m.finish_reason = ev.finished, ev.finish_reason
            if ev.logprobs:
                m.logprobs = (m.logprobs or []) + ev.logprobs
            continue
        out.append(ev)
        last[ev.index] = ev
    return out


_JSON = json.JSONEncoder(ensure_ascii=False)         # one encoder (json.dumps makes one per call)


def _sse(obj) -> bytes:
    return b"data: " + _JSON.encode(obj).encode() + b"\n\n"


def chunk_head(cid: str, obj: str, created: int, model: str) -> str:
    """The part of a stream's chunks that never changes, up to its choice's index."""
    head = _JSON.encode({"id": cid, "object": obj, "created": created, "model": model})
    return f'data: {head[:-1]}, "choices": [{{"index": '


def text_chunk(head: str, chat: bool, index: int, text: str, finish: str | None) -> bytes:
    """_sse() of a chunk with text and no logprobs, byte for byte, with only the text encoded
    (the hot path of streaming: a chunk per token per client)."""
    body = f'"delta": {{"content": {_JSON.encode(text)}}}' if chat else f'"text": {_JSON.encode(text)}'
    reason = "null" if finish is None else _JSON.encode(finish)
    return f'{head}{index}, {body}, "logprobs": null, "finish_reason": {reason}}}]}}\n\n'.encode()


def create_app(server: Server, lifespan=None) -> FastAPI:
    app = FastAPI(title="hetinfer", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(Guard, config=server.config)
    cfg = server.config

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return JSONResponse(e.body(), e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        msg = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return JSONResponse(APIError(e.status_code, msg).body(), e.status_code)

    @app.exception_handler(HetinferError)
    async def _hetinfer_error(request, e):
        return JSONResponse(APIError(400, str(e)).body(), 400)

    @app.exception_handler(Exception)
    async def _bug(request, e):            # a server bug, never user input
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}: {e}").body(), 500)

    @app.get("/health")
    async def health():
        if server.engine.failed:
            return JSONResponse({"status": "failed", "error": server.engine.failed}, 503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": server.created,
                                            "owned_by": "hetinfer", "max_model_len": server.info.max_context}]}

    @app.get("/")
    async def page():
        f = STATIC / "index.html"
        if not f.exists():
            raise APIError(404, "no chat page in this build")
        return HTMLResponse(f.read_text())

    @app.post("/tokenize")
    async def tokenize(request: Request):
        req = parse(TokenizeRequest, await _read_json(request, cfg.max_body_bytes))
        server.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of 'prompt' and 'messages'", param="prompt")
        tok = server.tokenizer
        if req.messages is not None:
            text = server.template.render([{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                                           for m in req.messages],
                                          add_generation_prompt=req.add_generation_prompt)
            ids = tok.encode(text, add_bos=False)
        else:
            ids = tok.encode(req.prompt, add_bos=None if req.add_special_tokens else False)
        return {"tokens": ids, "count": len(ids), "max_model_len": server.info.max_context}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        req = parse(DetokenizeRequest, await _read_json(request, cfg.max_body_bytes))
        server.check_model(req.model)
        return {"prompt": server.tokenizer.decode(server.check_ids(req.tokens, "tokens"))}

    async def _respond(request, req, prompts, chat: bool, echo_texts=None):
        n = req.n
        nlp = req.num_logprobs()
        jobs = []
        for p, ids in enumerate(prompts):
            default = 16 if not chat else max(server.info.max_context - len(ids), 1)
            for j in range(n):
                params = req.to_sampling_params(default, seed_offset=j)
                server.check_fits(ids, params.max_tokens)
                jobs.append((p * n + j, ids, params))
        server.check_capacity(len(jobs))
        cid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        num_prompt = sum(len(ids) for ids in prompts)

        def usage(completion):
            return {"prompt_tokens": num_prompt, "completion_tokens": completion,
                    "total_tokens": num_prompt + completion}

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            chunk_obj = "chat.completion.chunk" if chat else "text_completion"

            offsets = {i: len(echo_texts[i // n]) if echo_texts else 0 for i, _, _ in jobs}

            head = chunk_head(cid, chunk_obj, created, cfg.model_name)

            def chunk(index, text=None, finish=None, role=False, lps=None):
                if text and not lps and not role:            # the common chunk
                    return text_chunk(head, chat, index, text, finish)
                logprobs = None
                if lps:
                    logprobs, offsets[index] = server.format_logprobs(lps, chat, offsets[index])
                if chat:
                    delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
                else:
                    choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
                return _sse({"id": cid, "object": chunk_obj, "created": created, "model": cfg.model_name,
                             "choices": [choice]})

            async def events():
                completion = 0
                try:
                    for index, _, _ in jobs:
                        if chat:
                            yield chunk(index, role=True)
                        elif echo_texts is not None:
                            yield chunk(index, echo_texts[index // n])
                    async for batch in server.run_choices(jobs, request, nlp):
                        out = []                  # the batch's chunks in one write
                        for ev in merge_events(batch):
                            completion += ev.num_tokens
                            if ev.error is not None:
                                status = 503 if server.engine.failed else 400
                                out.append(_sse(APIError(status, ev.error).body()))
                            elif ev.text or ev.finished or ev.logprobs:
                                out.append(chunk(ev.index, ev.text, ev.finish_reason if ev.finished else None,
                                                 lps=ev.logprobs))
                        if out:
                            yield b"".join(out)
                except APIError as e:          # e.g. the timeout
                    yield _sse(e.body())
                if include_usage:
                    yield _sse({"id": cid, "object": chunk_obj, "created": created, "model": cfg.model_name,
                                "choices": [], "usage": usage(completion)})
                yield b"data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        texts = {i: [] if echo_texts is None else [echo_texts[i // n]] for i, _, _ in jobs}
        reasons, completion = {}, 0
        lps = {i: [] for i, _, _ in jobs}

        async def collect():
            nonlocal completion
            async for batch in server.run_choices(jobs, request, nlp):
                for ev in batch:
                    if ev.error is not None:
                        raise APIError(503 if server.engine.failed else 400, ev.error)
                    completion += ev.num_tokens
                    texts[ev.index].append(ev.text)
                    lps[ev.index].extend(ev.logprobs or [])
                    if ev.finished:
                        reasons[ev.index] = ev.finish_reason

        async def disconnected():
            while True:
                msg = await request.receive()
                if msg["type"] == "http.disconnect":
                    return

        work, watch = asyncio.ensure_future(collect()), asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (work, watch):
                if not t.done():
                    t.cancel()
        if not work.done() or work.cancelled():      # the client left: its sequences were aborted
            try:
                await work
            except BaseException:
                pass
            return Response(status_code=499)
        work.result()                                # raises the request's APIError, if any
        choices = []
        for i, _, _ in jobs:
            text = "".join(texts[i])
            logprobs = None
            if nlp is not None:
                logprobs = server.format_logprobs(lps[i], chat, len(echo_texts[i // n]) if echo_texts else 0)[0]
            body = {"index": i, "logprobs": logprobs, "finish_reason": reasons.get(i, "stop")}
            if chat:
                body["message"] = {"role": "assistant", "content": text}
            else:
                body["text"] = text
            choices.append(body)
        return {"id": cid, "object": obj, "created": created, "model": cfg.model_name, "choices": choices,
                "usage": usage(completion)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = parse(CompletionRequest, await _read_json(request, cfg.max_body_bytes))
        server.check_model(req.model)
        p = req.prompt
        if isinstance(p, str):
            p = [p]
        if not p:
            raise APIError(400, "'prompt' is empty", param="prompt")
        if isinstance(p[0], int):
            p = [p]
        prompts = []
        for x in p:
            if isinstance(x, str):
                if not x:
                    raise APIError(400, "'prompt' is an empty string", param="prompt")
                prompts.append(server.tokenizer.encode(x))
            else:
                if not x:
                    raise APIError(400, "'prompt' has an empty list of token ids", param="prompt")
                prompts.append(server.check_ids(list(x)))
        echo = None
        if req.echo:
            echo = [x if isinstance(x, str) else server.tokenizer.decode(x) for x in p]
        return await _respond(request, req, prompts, chat=False, echo_texts=echo)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = parse(ChatRequest, await _read_json(request, cfg.max_body_bytes))
        server.check_model(req.model)
        text = server.template.render(req.dict_messages(), add_generation_prompt=req.add_generation_prompt)
        ids = server.tokenizer.encode(text, add_bos=False)
        return await _respond(request, req, [ids], chat=True)

    return app
