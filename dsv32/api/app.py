"""The FastAPI application: routes, DeepSeek-style errors, API keys and per-key concurrency limits, and the
web playground (``/playground``: one static page calling the chat route)."""

from __future__ import annotations

import hmac
import json
import logging
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from dsv32.api import anthropic_routes, openai_routes, tokenize_routes
from dsv32.api.anthropic_routes import anthropic_error_body, is_anthropic_path
from dsv32.api.errors import APIError
from dsv32.api.service import ServingContext
from dsv32.engine.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

log = logging.getLogger("dsv32.api")
OPEN_PATHS = {"/health", "/metrics", "/openapi.json", "/docs", "/redoc", "/docs/oauth2-redirect", "/",
              "/playground", "/playground/playground.js"}  # fmt: skip
PLAYGROUND = Path(__file__).parent / "playground"  # the web playground's page and script
# pydantic error types that mean "the body is malformed" (400) rather than "a value is invalid" (422)
_MALFORMED = {"json_invalid", "missing", "model_type", "dict_type", "model_attributes_type"}


def _error_response(err: APIError, path: str = "") -> JSONResponse:
    """The error in the shape of the route's API: Anthropic's for the Messages routes (where an invalid
    parameter is a 400, as Anthropic answers), DeepSeek/OpenAI's everywhere else."""
    if is_anthropic_path(path):
        status = 400 if err.status == 422 else err.status
        return JSONResponse(anthropic_error_body(status, err.message), status_code=status)
    return JSONResponse(err.body(), status_code=err.status)


# the branch names pydantic puts in an error's loc for a union field ("stop" -> "str" | "list[str]")
_BRANCHES = {"str": "a string", "int": "an integer", "float": "a number", "bool": "a boolean",
             "list[str]": "a list of strings", "list[int]": "a list of token ids", "dict[str,any]": "an object",
             "list[dict[str,any]]": "a list of objects"}  # fmt: skip


_KINDS = {dict: "an object", list: "an array", str: "a string", bytes: "a non-JSON body", bool: "a boolean"}


def _kind(value: Any) -> str:
    return "null" if value is None else _KINDS.get(type(value), "a number")


def _union_error(errors: list[dict], first: dict) -> dict:
    """A union field's error with the branch names taken out of its loc: when the value failed inside one
    branch (an item of a list), that error; otherwise "expected a string or a list of strings"."""
    loc = list(first.get("loc", ()))
    k = next((i for i, p in enumerate(loc) if p in _BRANCHES), None)
    if k is None:
        return first
    same = [e for e in errors if list(e.get("loc", ()))[:k] == loc[:k] and len(e.get("loc", ())) > k]
    inner = next((e for e in same if len(e["loc"]) > k + 1), None)
    if inner is not None:
        return {**inner, "loc": (*inner["loc"][:k], *inner["loc"][k + 1 :])}
    expected = " or ".join(dict.fromkeys(_BRANCHES[e["loc"][k]] for e in same if e["loc"][k] in _BRANCHES))
    return {**first, "loc": tuple(loc[:k]), "msg": f"expected {expected}", "type": "union_type"}


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = list(exc.errors()) or [{"type": "value_error", "loc": (), "msg": "invalid request"}]

    def malformed(e: dict) -> bool:  # structure problems outrank out-of-range values
        loc = [p for p in e.get("loc", ()) if p != "body"]
        return e.get("type") in _MALFORMED or not loc or loc[0] == "messages"

    first = _union_error(errors, next((e for e in errors if malformed(e)), errors[0]))
    loc = [p for p in first.get("loc", ()) if p != "body"]
    field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or None
    if first.get("type") == "json_invalid":
        where = f" (at character {loc[0]})" if loc else ""
        reason = (first.get("ctx") or {}).get("error") or first.get("msg")
        return APIError(400, f"the request body is not valid JSON: {reason}{where}")
    if not field and first.get("type") == "missing":
        return APIError(400, "the request body is empty: expected a JSON object")
    if not field:
        got = first.get("input")
        hint = " (send it with Content-Type: application/json)" if isinstance(got, (bytes, str)) else ""
        return APIError(400, f"the request body must be a JSON object, got {_kind(got)}{hint}")
    if malformed(first):
        return APIError(400, f"Invalid request: '{field}': {first.get('msg')}", field)
    got = first.get("input")
    shown = (
        json.dumps(got)[:80] if isinstance(got, (int, float, str, bool, type(None))) else type(got).__name__
    )
    return APIError(422, f"Invalid parameter '{field}': {first.get('msg')} (got {shown})", field)


class KeyAndLimitMiddleware:
    """API-key check (constant-time) and a per-key cap on in-flight requests (429 beyond it).

    Pure ASGI so the count covers a streamed body until its last byte (or the client's disconnect)."""

    def __init__(self, app, ctx: ServingContext):
        self.app, self.ctx = app, ctx
        self.in_flight: dict[str, int] = {}

    def _key(self, scope) -> str | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip()
        return headers.get("x-api-key")

    async def __call__(self, scope, receive, send):
        # (an open path with a trailing slash only redirects to it: open too, not a 401 where a key is set)
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or scope["path"].rstrip("/") in OPEN_PATHS:
            return await self.app(scope, receive, send)
        key = self._key(scope) or ""
        if self.ctx.api_keys:
            ok = False
            for k in self.ctx.api_keys:  # compare with every key: timing says nothing about which matched
                ok |= hmac.compare_digest(key.encode(), k.encode())
            if not ok:
                shown = f"****{key[-4:]}" if len(key) >= 4 else "(none)"
                err = APIError(401, f"Authentication Fails, your api key: {shown} is invalid")
                resp = _error_response(err, scope["path"])
                return await resp(scope, receive, send)
        limit = self.ctx.max_concurrent_per_key
        if limit is None:
            return await self.app(scope, receive, send)
        if self.in_flight.get(key, 0) >= limit:
            err = APIError(429, f"Rate Limit Reached: at most {limit} concurrent requests per key")
            resp = _error_response(err, scope["path"])
            return await resp(scope, receive, send)
        self.in_flight[key] = self.in_flight.get(key, 0) + 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight[key] -= 1


def create_app(ctx: ServingContext) -> FastAPI:
    app = FastAPI(title="dsv32", description="DeepSeek-compatible API served by dsv32", version="0.1.0")
    app.state.ctx = ctx
    router = APIRouter()
    openai_routes.register(router)
    anthropic_routes.register(router)
    tokenize_routes.register(router)
    app.include_router(router)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": ctx.served_model_name}

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        return ctx.engine.stats()

    @app.get("/metrics")
    async def metrics() -> Response:
        # Prometheus scrapes without an API key, as from vLLM; nothing here names a request or its text
        return Response(ctx.engine.metrics_text(), media_type=METRICS_CONTENT_TYPE)

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/playground")

    @app.get("/playground", include_in_schema=False)
    async def playground() -> FileResponse:
        # the page holds no data: it calls the API routes below with the key its user types in
        return FileResponse(PLAYGROUND / "index.html", media_type="text/html")

    @app.get("/playground/playground.js", include_in_schema=False)
    async def playground_js() -> FileResponse:
        return FileResponse(PLAYGROUND / "playground.js", media_type="text/javascript")

    @app.get("/user/balance")
    async def balance() -> dict[str, Any]:
        # self-hosted: nothing is billed, so the balance never runs out
        return {"is_available": True, "balance_infos": [
            {"currency": "USD", "total_balance": "0.00", "granted_balance": "0.00", "topped_up_balance": "0.00"}]}  # fmt: skip

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(_validation_error(exc), request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if isinstance(exc.__cause__, RecursionError):  # FastAPI's "error parsing the body", by cause
            message = "the request body is not valid JSON: nested too deeply"
        elif isinstance(exc.__cause__, UnicodeDecodeError):
            bad = exc.__cause__
            message = f"the request body is not valid JSON: not UTF-8 ({bad.reason} at byte {bad.start})"
        elif exc.__cause__ is not None and exc.status_code == 400:
            message = f"the request body could not be read as JSON ({type(exc.__cause__).__name__})"
        return _error_response(APIError(exc.status_code, message), request.url.path)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        return _error_response(APIError(500, f"Server Error: {type(exc).__name__}"), request.url.path)

    app.add_middleware(KeyAndLimitMiddleware, ctx=ctx)
    return app
