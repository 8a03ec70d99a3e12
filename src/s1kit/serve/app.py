"""The OpenAI-compatible HTTP API: chat and text completions with per-request thinking budgets.

Responses carry the thinking in ``reasoning`` (vLLM's field since it dropped ``reasoning_content``) and, for older
clients, the same text in ``reasoning_content``; the answer in ``content`` / ``text``, and the thinking-token count
in ``usage.completion_tokens_details.reasoning_tokens``. Errors use OpenAI's shape, ``{"error": {"message", "type",
"param", "code"}}``. ``/metrics`` serves Prometheus metrics, ``/version`` what runs.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Union

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from .. import __version__
from ..engines.base import Completion, Engine, Request
from ..formats import ThinkingFormat, resolve_format
from .metrics import Metrics, RequestCounter
from .schemas import ChatCompletionRequest, CompletionRequest, FieldError
from .worker import Delta, EngineWorker, Job, JobError, Limits

GenerationRequest = Union[ChatCompletionRequest, CompletionRequest]
_DISCONNECT_POLL_S = 0.25  # how often a waiting handler checks whether its client is still there


class _ClientGone(Exception):
    pass


def _printable(text: str | None) -> str | None:
    """``text`` made encodable as UTF-8 (a request's own keys may carry lone surrogates into a message)."""
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


def _error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
                code: str | None = None) -> dict:
    return {"error": {"message": _printable(message), "type": kind, "param": _printable(param), "code": code}}


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> JSONResponse:
    return JSONResponse(_error_body(message, kind, param, code), status_code=status)


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})
_ROLES = frozenset({"system", "developer", "user", "assistant"})


def _where(loc: Any) -> str:
    """A pydantic error location as the request's field path: without the leading ``body`` and without the members
    of union types (``function-after[_utf8(), str]``, ``bool``, ``constrained-int``, a message's role)."""
    parts: list[str] = []
    previous: Any = None
    for part in list(loc)[1:]:
        if isinstance(part, int) or (isinstance(part, str) and part.isidentifier() and part not in _TYPE_TAGS
                                     and not (part in _ROLES and isinstance(previous, int))):
            parts.append(str(part))
        previous = part
    return ".".join(parts)


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return _error(400, "the request body is not valid JSON", code="invalid_json")
    params, msgs = [], []
    for e in errors:
        where = _where(e.get("loc", ()))
        if e.get("type") in ("union_tag_invalid", "union_tag_not_found"):  # a message's role
            tag = str((e.get("ctx") or {}).get("discriminator", "")).strip("'")
            where = f"{where}.{tag}" if where else tag
        cause = (e.get("ctx") or {}).get("error")
        if isinstance(cause, FieldError):  # a check across fields names the one at fault
            where = f"{where}.{cause.param}" if where else cause.param
        params.append(where or None)
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        msgs.append(f"{where}: {msg}" if where and not msg.startswith(where) else msg)
    return _error(422, "; ".join(msgs), param=params[0])


def _usage(completions: list[Completion]) -> dict:
    prompt = sum(c.prompt_tokens for c in completions if c.sample_index == 0)  # a prompt counts once, not per n
    generated = sum(len(c.token_ids) for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated,
            "completion_tokens_details": {"reasoning_tokens": sum(c.thinking_tokens for c in completions)}}


def _finish(c: Completion) -> str:
    return "length" if c.finish_reason == "length" else "stop"


def _reasoning(text: str) -> dict:
    """The thinking under both names: ``reasoning`` (vLLM now) and ``reasoning_content`` (older vLLM, DeepSeek)."""
    return {"reasoning": text, "reasoning_content": text}


def _thinking_stats(c: Completion) -> dict:
    return {"tokens": c.thinking_tokens, "waits_used": c.waits_used, "hit_cap": c.hit_cap,
            "early_exit": c.early_exit, "probe_tokens": c.probe_tokens, "waits_exact": c.waits_exact}


class _Api:
    """Request handling shared by the routes: budgets in, the engine worker, OpenAI-shaped responses out."""

    def __init__(self, engine: Engine, model_name: str, fmt: ThinkingFormat, default_thinking: int | None = None,
                 metrics: Metrics | None = None) -> None:
        self.engine, self.model_name, self.fmt = engine, model_name, fmt
        self.default_thinking = default_thinking
        self.metrics = metrics
        self.worker: EngineWorker | None = None
        self.running: dict[str, Job] = {}  # response id and X-Request-Id -> job, while it runs
        self.created = int(time.time())

    async def serve(self, body: GenerationRequest, http: HTTPRequest) -> Any:
        if body.model != self.model_name:
            return _error(404, f"model {body.model!r} does not exist; this server serves {self.model_name!r}",
                          param="model", code="model_not_found")
        if self.worker is None:
            return _error(503, "the server is not ready", "server_error")
        refused = body.refusal(getattr(self.engine, "max_context", None))
        if refused is not None:
            param, message = refused
            return _error(400, message, param=param, code="invalid_value")
        chat = isinstance(body, ChatCompletionRequest)
        policy, sampling = body.policy(self.default_thinking), body.sampling()
        try:
            fmt = body.thinking_format(self.fmt, self.engine.tokenizer)
        except ValueError as e:
            return _error(400, str(e), param="chat_template_kwargs", code="invalid_value")
        limits = Limits(body.completion_limit, body.stop_strings, body.include_stop_str_in_output,
                        body.max_answer_tokens)
        job = Job([Request(p, policy, fmt, sampling) for p in body.prompts()], stream=body.stream, limits=limits)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        ids = [rid] + [i for i in [http.headers.get("x-request-id")] if i and i not in self.running]
        self.running.update((i, job) for i in ids)
        streaming = False
        try:
            self.worker.submit(job)
            # Wait for the first event even when streaming, so that a bad request (e.g. a prompt too long
            # for the context) is answered with its HTTP status instead of an error inside a 200 stream.
            event = await self._next(job, http)
            if isinstance(event, JobError):
                raise event
            if body.stream:
                streaming = True
                return StreamingResponse(self._sse(job, event, body, rid, chat, ids), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                                  "X-Request-Id": ids[-1]})
            while not isinstance(event, list):
                event = await self._next(job, http)
                if isinstance(event, JobError):
                    raise event
            self._finished(job, event, chat)
            return JSONResponse(self._response(event, rid, chat, body.include_reasoning),
                                headers={"X-Request-Id": ids[-1]})
        except JobError as e:
            return _error(e.status, e.message, e.kind)
        except _ClientGone:
            return JSONResponse({}, status_code=499)  # nobody reads it
        finally:
            if not streaming:
                self._done(job, ids)

    def _finished(self, job: Job, completions: list[Completion], chat: bool) -> None:
        if self.metrics is not None:
            self.metrics.finished(job, completions, "chat" if chat else "completions")

    def _done(self, job: Job, ids: list[str]) -> None:
        """The handler is done with ``job``: forget its ids, and stop its work if it still runs."""
        for i in ids:
            self.running.pop(i, None)
        if not job.finished and self.worker is not None:
            self.worker.cancel(job)

    def stop_thinking(self, request_id: str) -> Any:
        """Close the thinking of a running request now (the answer opener and prefix are forced next)."""
        job = self.running.get(request_id)
        if job is None or self.worker is None:
            return _error(404, f"no running request with id {request_id!r}", code="request_not_found")
        self.worker.stop_thinking(job)
        return {"id": request_id, "object": "thinking.stop", "stopped": True}

    async def _next(self, job: Job, http: HTTPRequest | None = None) -> Any:
        """The job's next event; raises ``_ClientGone`` if the client disconnects (``http`` given). A worker that
        stopped without answering the job answers it here: a request never waits for good."""
        while True:
            try:
                return await asyncio.wait_for(job.next_event(), _DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if http is not None and await http.is_disconnected():
                    raise _ClientGone from None
                worker = self.worker
                if (worker is None or not worker.alive) and not job.answered:
                    job.finished = True
                    reason = worker.error if worker is not None and worker.error else "the engine worker stopped"
                    return JobError(500, f"the engine failed: {reason}", "server_error")

    def drain(self, timeout: float) -> None:
        """Shutting down (SIGTERM): refuse new requests, end those still running after ``timeout`` seconds."""
        if self.worker is not None:
            self.worker.drain(timeout)

    def _response(self, completions: list[Completion], rid: str, chat: bool, reasoning: bool = True) -> dict:
        choices = []
        for i, c in enumerate(completions):
            thinking = _reasoning(c.thinking) if reasoning else {}
            if chat:
                choice = {"index": i, "message": {"role": "assistant", "content": c.answer, **thinking}}
            else:
                choice = {"index": i, "text": c.answer, **thinking}
            choices.append({**choice, "logprobs": None, "finish_reason": _finish(c), "thinking": _thinking_stats(c)})
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": self.model_name, "choices": choices, "usage": _usage(completions)}

    async def _sse(self, job: Job, first: Any, body: GenerationRequest, rid: str, chat: bool,
                   ids: list[str]) -> AsyncIterator[str]:
        created = int(time.time())
        head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                "model": self.model_name}

        def chunk(choices: list[dict], **extra: Any) -> str:
            return f"data: {json.dumps({**head, 'choices': choices, **extra}, ensure_ascii=False)}\n\n"

        def delta_choice(d: Delta) -> dict | None:
            thinking = _reasoning(d.reasoning) if d.reasoning and body.include_reasoning else {}
            if not thinking and not d.content:
                return None
            if chat:
                delta = dict(thinking, **({"content": d.content} if d.content else {}))
                return {"index": d.index, "delta": delta, "logprobs": None, "finish_reason": None}
            return {"index": d.index, "text": d.content, **(thinking or _reasoning("") if body.include_reasoning
                                                             else {}), "logprobs": None, "finish_reason": None}

        try:
            if chat:
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for i in range(job.size)])
            event = first
            while True:
                if isinstance(event, Delta):
                    choice = delta_choice(event)
                    if choice is not None:
                        yield chunk([choice])
                elif isinstance(event, JobError):  # after the stream began: report it in the stream
                    yield f"data: {json.dumps(_error_body(event.message, event.kind))}\n\n"
                    break
                else:
                    self._finished(job, event, chat)
                    for i, c in enumerate(event):
                        end = {"delta": {}} if chat else {"text": "", **(_reasoning("") if body.include_reasoning
                                                                            else {})}
                        yield chunk([{"index": i, **end, "logprobs": None, "finish_reason": _finish(c),
                                      "thinking": _thinking_stats(c)}])
                    if body.include_usage:
                        yield chunk([], usage=_usage(event))
                    break
                event = await self._next(job)
            yield "data: [DONE]\n\n"
        finally:  # also when the client went away mid-stream: then its work stops
            self._done(job, ids)


class _BearerAuth:
    """ASGI middleware: ``/v1/*`` needs ``Authorization: Bearer KEY``, checked before routing and parsing."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not secrets.compare_digest(token.strip(), self.key):
                response = _error(401, "invalid or missing API key (send the header 'Authorization: Bearer KEY')",
                                  code="invalid_api_key")
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


def create_app(engine: Engine, model_name: str = "smollm2-135m", api_key: str | None = None,
               format: str | ThinkingFormat = "auto", default_thinking_budget: int | None = None) -> FastAPI:
    """The FastAPI app serving ``engine`` as ``model_name``; ``api_key`` makes ``/v1/*`` need a bearer token; ``format``
    (``auto``: from the model's tokenizer and chat template) is resolved against the engine's tokenizer;
    ``default_thinking_budget`` caps the thinking of requests that name no thinking budget (default: no cap, the
    context window bounds it)."""
    if default_thinking_budget is not None and (isinstance(default_thinking_budget, bool) or not isinstance(
            default_thinking_budget, int) or default_thinking_budget < 0):
        raise ValueError(f"default_thinking_budget must be an integer >= 0, got {default_thinking_budget!r}")
    fmt = resolve_format(engine.tokenizer, format)
    metrics = Metrics(lambda: api.worker)
    api = _Api(engine, model_name, fmt, default_thinking_budget, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        api.worker = EngineWorker(engine)
        app.state.worker = api.worker
        app.state.drain = api.drain
        try:
            yield
        finally:  # the worker refuses new jobs (503) and answers those it holds as it closes
            await asyncio.to_thread(api.worker.close)
            api.worker = None

    app = FastAPI(title="s1kit", description="OpenAI-compatible API with per-request thinking budgets",
                  lifespan=lifespan)

    if api_key is not None:
        app.add_middleware(_BearerAuth, api_key=api_key)
    app.add_middleware(RequestCounter, metrics=metrics)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_: HTTPRequest, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc)

    @app.exception_handler(HTTPException)
    async def on_http_error(_: HTTPRequest, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.get("/health")
    async def health() -> Any:
        """Liveness and the engine worker's counters (requests, running, completed, cancelled, tokens): 200 with
        ``status: ok`` while requests are served, else 503 with ``starting``, ``draining`` (shutting down) or
        ``error`` (the engine failed beyond repair; ``error`` says how)."""
        w = api.worker
        stats = dict(w.stats, queued=w.queued) if w else {}
        status = w.status if w else "starting"
        extra = {k: v for k, v in (("error", w and w.error), ("last_error", w and w.last_error)) if v}
        return JSONResponse({"status": status, "model": model_name, **extra, **stats},
                            status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    async def prometheus_metrics() -> Any:
        """Prometheus metrics: requests by endpoint and status, prompt / completion / thinking tokens, finished
        choices by finish reason, requests running and waiting, time to first token and request latency."""
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/version")
    async def version() -> dict:
        """The s1kit version, the served model, the engine and the thinking format."""
        return {"version": __version__, "model": model_name, "engine": type(engine).__name__, "format": fmt.name,
                "max_context": getattr(engine, "max_context", None), "default_thinking_budget": default_thinking_budget}

    @app.get("/v1/models")
    async def models() -> dict:
        """The one model this server serves."""
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": api.created,
                                            "owned_by": "s1kit"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http: HTTPRequest) -> Any:
        """Chat completion; ``message.reasoning`` (and, the same, ``reasoning_content``) holds the thinking."""
        return await api.serve(body, http)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest) -> Any:
        """Text completion of a prompt sent as a user message; ``reasoning`` (and ``reasoning_content``) holds the
        thinking."""
        return await api.serve(body, http)

    @app.post("/v1/requests/{request_id}/stop_thinking")
    async def stop_thinking(request_id: str) -> Any:
        """Stop a running request's thinking now: its answer opener and answer prefix are forced at its next step,
        exactly as at its thinking cap. ``request_id`` is the response's ``id`` (the first streamed chunk has it)
        or the ``X-Request-Id`` header the client sent."""
        return api.stop_thinking(request_id)

    return app


def make_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, drain_timeout: float = 30.0,
                **uvicorn_options: Any) -> Any:
    """A uvicorn server for ``app`` that shuts down gracefully: on SIGTERM or Ctrl-C it stops taking connections and
    requests, lets the requests in flight finish for up to ``drain_timeout`` seconds, then ends the rest with an
    OpenAI-shaped 503 (a stream gets it as its last event, then ``[DONE]``). A second Ctrl-C exits at once."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # uvicorn's own handler, but the signal is not raised again once the server stopped: a graceful
            # shutdown exits with status 0 (uvicorn.run swallows the KeyboardInterrupt of a Ctrl-C the same way)
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
                return
            drain = getattr(app.state, "drain", None)
            if drain is not None and not self.should_exit:
                drain(drain_timeout)
            self.should_exit = True

    options = {"log_level": "warning", **uvicorn_options}
    # uvicorn cancels what still runs after its own timeout: ours ends first, so every request gets its answer
    config = uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=int(drain_timeout) + 10, **options)
    return DrainingServer(config)
