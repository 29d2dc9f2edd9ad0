"""The HTTP layer: routes, API keys, body limits and OpenAI-shaped errors. It never touches a
tensor: requests become jobs (jobs.py), the engine thread runs them (runtime/scheduler.py),
their output comes back as deltas (outputs.py) and leaves as OpenAI responses (responses.py)."""

from __future__ import annotations

import asyncio
import hmac
import mimetypes
import os
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ...errors import Gemma4Error
from .jobs import Prepared, chat_messages, check_model, prepare_chat, prepare_completion
from .metrics import Metrics
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from .responses import Completion, gather, stream
from .served import ServedModel

MAX_BODY_BYTES = 8 << 20
PAGE = Path(__file__).parent / "page"
# The chat page holds no secret (the key stays in the browser): it loads without one.
PUBLIC_PATHS = ("/health", "/")
PUBLIC_PREFIX = "/page/"
# Model output is untrusted: even a sanitiser slip cannot run a script the page did not ship.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "media-src 'self' blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
mimetypes.add_type("text/javascript", ".mjs")  # module scripts must come as JavaScript


class PageFiles(StaticFiles):
    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(PAGE_HEADERS)
        return response


def error_response(error: APIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if error.status == 503 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


class Guard:
    """API keys and the body size limit, before any route runs (ASGI middleware, so it also
    bounds bodies sent without a Content-Length)."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        public = scope["path"] in PUBLIC_PATHS or scope["path"].startswith(PUBLIC_PREFIX)
        if self.api_key and not public and not self._authorized(headers):
            return await error_response(APIError(401, "missing or wrong API key: send it as 'Authorization: Bearer KEY'",
                                                 "authentication_error", code="invalid_api_key"))(scope, receive, send)
        # Read the body whole (it is small), refusing it past the limit, then hand it on.
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body or int(headers.get("content-length") or 0) > self.max_body:
                return await error_response(APIError(413, f"the request body is over {self.max_body >> 20} MB",
                                                     code="request_too_large"))(scope, receive, send)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # then whatever comes next: a disconnect
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def _authorized(self, headers: dict[str, str]) -> bool:
        given = headers.get("authorization", "").removeprefix("Bearer ").strip() or headers.get("x-api-key", "")
        return hmac.compare_digest(given.encode(), self.api_key.encode())  # type: ignore[union-attr]


def create_app(served: ServedModel, api_key: str | None = None, metrics: Metrics | None = None, max_body: int = MAX_BODY_BYTES) -> FastAPI:
    app = FastAPI(title="gemma4", summary="An OpenAI-compatible server for Gemma 4", docs_url=None, redoc_url=None)
    app.add_middleware(Guard, api_key=api_key, max_body=max_body)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        if first["type"] == "json_invalid":
            return error_response(APIError(400, f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'malformed')})"))
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"][1:]).lstrip(".")
        return error_response(APIError(400, f"{where or 'body'}: {first['msg']}", param=where or None))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return error_response(APIError(error.status_code, f"{request.method} {request.url.path}: {error.detail}", kind))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        return error_response(APIError(500, f"internal error: {type(error).__name__}: {error}", "server_error"))

    @app.get("/health")
    async def health() -> JSONResponse:
        if served.model is None:
            return error_response(APIError(503, "loading the model", "server_error", code="loading"))
        return JSONResponse({"status": "ok"})

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(PAGE / "index.html", headers=PAGE_HEADERS)

    app.mount("/page", PageFiles(directory=PAGE), name="page")

    @app.get("/props")
    async def props() -> dict[str, Any]:
        """What the chat page shows about the server: the model, its limits, memory in use."""
        model = served.ready
        return {
            "model": served.name,
            "context": model.context,
            "parallel": served.plan["parallel"],
            "modalities": served.modalities,
            "chat": model.chat_format is not None or model.chat_template is not None,  # False: a base model, text completions only
            "memory": {"resident_bytes": _resident_bytes(), "kv_bytes": served.scheduler.cache_bytes(),  # type: ignore[union-attr]
                       "kv_planned_bytes": served.plan["kv_bytes"]},
            "running": served.scheduler.running,  # type: ignore[union-attr]
            "waiting": served.scheduler.waiting,  # type: ignore[union-attr]
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(served)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        check_model(served, name)
        return _model_card(served)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        # Off the event loop: rendering, tokenizing and encoding media take time other streams must not wait for.
        prepared = await asyncio.to_thread(prepare_chat, served, body, asyncio.get_running_loop(), metrics and metrics.record)
        return await _answer(served, prepared, body, request, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        prepared = await asyncio.to_thread(prepare_completion, served, body, asyncio.get_running_loop(), metrics and metrics.record)
        prefix = served.ready.tokenizer.decode(prepared.job.prompt.ids, skip_special=True) if body.echo else ""  # type: ignore[union-attr]
        return await _answer(served, prepared, body, request, chat=False, prefix=prefix)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        model = served.ready
        check_model(served, body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give either prompt or messages", param="prompt")
        if model.tokenizer is None:
            raise APIError(400, "this checkpoint has no tokenizer")
        media: list[dict[str, Any]] = []
        try:
            if body.messages is not None:
                prompt = model.chat_prompt(chat_messages(body.messages))
                tokens = prompt.ids
                media = [{"type": kind, "tokens": n, "description": text} for kind, n, text in prompt.costs]
            else:
                tokens = model.tokenizer.prompt_ids(body.prompt) if body.add_special_tokens else model.tokenizer.encode(body.prompt)  # type: ignore[arg-type]
        except Gemma4Error as e:
            raise APIError(400, str(e), param="messages") from None
        return {"tokens": tokens, "count": len(tokens), "max_model_len": model.context, "media": media}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        model = served.ready
        check_model(served, body.model)
        if model.tokenizer is None:
            raise APIError(400, "this checkpoint has no tokenizer")
        if bad := [t for t in body.tokens if not 0 <= t < model.config.vocab_size]:
            raise APIError(400, f"token id {bad[0]} is not in this model's vocabulary (0..{model.config.vocab_size - 1})", param="tokens")
        return {"prompt": model.tokenizer.decode(body.tokens)}

    if metrics is not None:

        @app.get("/metrics")
        async def prometheus() -> Response:
            return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    return app


def _resident_bytes() -> int | None:
    """This process's resident memory (Linux), for the page's header."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _model_card(served: ServedModel) -> dict[str, Any]:
    card: dict[str, Any] = {"id": served.name, "object": "model", "created": 0, "owned_by": "gemma4"}
    if served.model is not None:
        card |= {"max_model_len": served.model.context, "parallel": served.plan.get("parallel")}
    return card


async def _answer(served: ServedModel, prepared: Prepared, body: Any, request: Request, chat: bool, prefix: str = "") -> Response:
    """Queue the job; answer as a stream or as one object. A client that leaves cancels its job."""
    job = prepared.job
    served.submit(job)
    completion = Completion(chat, prepared.model_name, served.ready.tokenizer, prefix, job.prompt.costs)  # type: ignore[arg-type]
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events():  # noqa: ANN202
            try:
                async for chunk in stream(completion, prepared.bridge, include_usage):
                    yield chunk
            finally:
                served.scheduler.cancel(job)  # type: ignore[union-attr] - a no-op once the job has ended

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    updates, end = await gather(prepared.bridge, request.is_disconnected)
    if end is None:
        served.scheduler.cancel(job)  # type: ignore[union-attr]
        return Response(status_code=499)
    if end.reason == "error":
        raise APIError(500, f"generation failed: {end.error}", "server_error")
    return JSONResponse(completion.whole(updates, end))
