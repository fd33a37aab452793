"""HTTP plumbing shared by every API surface: the ASGI guard (API key, CORS, body size, request
counting and the access log), request bodies read and validated into 400s that name the field, and
server-sent event streams whose request is cancelled however the response ends."""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from typing import Any, Callable, Optional, Sequence

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError

import pyllm.server.metrics as _metrics
from pyllm.server.cors import CorsPolicy
from pyllm.server.errors import APIError

# One line per request: method, path, status, duration (never the body, the query or the headers).
access_log = logging.getLogger("pyllm.server.access")

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/tokenize",
             "/detokenize", "/chat/completions", "/completion", "/completions", "/models", "/props", "/slots",
             "/apply-template", "/v1/health", "/chat/completions/input_tokens", "/v1/chat/completions/input_tokens",
             "/v1/responses", "/responses", "/v1/messages", "/v1/messages/count_tokens")
# Answered without an API key (llama-server's public endpoints).
_PUBLIC = ("/health", "/v1/health")


class EventStream(StreamingResponse):
    """Server-sent events whose requests are cancelled however the response ends (disconnect included,
    even one before the first event, when the event generator never started). ``req``: one Request or
    the list of a request's choices."""

    def __init__(self, events, req, on_cancel: Callable[[], None]) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._reqs = list(req) if isinstance(req, (list, tuple)) else [req]
        self._on_cancel = on_cancel

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not all(r.done for r in self._reqs):
                for r in self._reqs:
                    r.cancel()
                self._on_cancel()


def sse(obj: Any) -> str:
    """One server-sent event carrying ``obj`` as compact JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


# ---------------------------------------------------------------------------------------------
# ASGI guard: auth, body size, request counting. Pure ASGI, so streaming responses are untouched.
# ---------------------------------------------------------------------------------------------
class Guard:
    def __init__(self, app, *, api_key: Optional[str], max_body_bytes: int, metrics: _metrics.ServerMetrics,
                 cors: Optional[CorsPolicy] = None):
        self.app = app
        self._key_digest = hashlib.sha256(api_key.encode()).digest() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self.cors = cors

    async def _reject(self, send, err: APIError, endpoint: str) -> None:
        self.metrics.requests.labels(endpoint, str(err.status)).inc()
        resp = err.response()
        if endpoint.startswith("/v1/messages"):   # Anthropic's clients read Anthropic's error shape
            kind = {401: "authentication_error", 413: "request_too_large"}.get(err.status, "invalid_request_error")
            resp = JSONResponse({"type": "error", "error": {"type": kind, "message": err.message}},
                                status_code=err.status, headers=err.headers)
        await send({"type": "http.response.start", "status": err.status, "headers": resp.raw_headers})
        await send({"type": "http.response.body", "body": resp.body})

    def _authorized(self, headers: dict) -> bool:
        """``Authorization: Bearer <key>``, or Anthropic's ``X-Api-Key: <key>`` (llama-server takes both)."""
        auth = headers.get(b"authorization")
        if auth is not None:
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer":
                return False
        else:
            token = headers.get(b"x-api-key")
            if token is None:
                return False
        # Digests of equal length: the comparison time says nothing about the key's length or content.
        return hmac.compare_digest(hashlib.sha256(token.strip()).digest(), self._key_digest)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status: dict = {}

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message = {**message, "headers": [(_header_case(k), v) for k, v in message.get("headers", ())]}
            await send(message)

        try:
            await self._guarded(scope, receive, counting_send)
        finally:
            path = scope.get("path", "")
            # 499: the client went away before any response (nginx's code).
            access_log.info("%s %s %d %.3fs", scope.get("method", "?"), path if path.isprintable() else ascii(path),
                            status.get("code", 499), time.perf_counter() - t0)

    async def _guarded(self, scope, receive, send) -> None:
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"
        headers = dict(scope.get("headers") or ())
        if self.cors is not None:
            origin = headers.get(b"origin", b"").decode("latin-1")
            preflight = scope.get("method") == "OPTIONS"
            extra = self.cors.headers(origin, preflight=preflight)
            if preflight:   # before the key check: browsers send preflights without credentials
                self.metrics.requests.labels(endpoint, "200").inc()
                await send({"type": "http.response.start", "status": 200,
                            "headers": [*extra, (b"content-length", b"0")]})
                await send({"type": "http.response.body", "body": b""})
                return
            if extra:
                inner_send = send

                async def send(message):   # noqa: F811 - the CORS headers on every response
                    if message["type"] == "http.response.start":
                        message = {**message, "headers": [*message.get("headers", ()), *extra]}
                    await inner_send(message)
        if self._key_digest is not None and path not in _PUBLIC and not self._authorized(headers):
            err = APIError(401, "missing or invalid API key: send the header 'Authorization: Bearer <key>' "
                                "(or 'X-Api-Key: <key>')",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            await self._reject(send, err, endpoint)
            return
        length = headers.get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                n = -1
            if n < 0:
                await self._reject(send, APIError(400, f"Content-Length {length!r} is not a byte count"), endpoint)
                return
            if n > self.max_body_bytes:
                await self._reject(send, _too_large(n, self.max_body_bytes), endpoint)
                return
        status = {}

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.requests.labels(endpoint, str(status.get("code", 499))).inc()


def _header_case(name: bytes) -> bytes:
    """A response header name in the canonical case llama-server sends (``Access-Control-Allow-Origin``,
    ``Content-Type``): HTTP names are case-insensitive, but clients that copy headers into a plain dict
    (llama-server's own test utilities do) look them up by that case. Starlette writes them in lower case,
    and uvicorn sends names as given."""
    return b"-".join(part[:1].upper() + part[1:] for part in name.split(b"-"))


def _too_large(n: int, limit: int) -> APIError:
    return APIError(413, f"request body of {n} bytes is larger than the limit of {limit} bytes",
                    code="request_too_large")


# ---------------------------------------------------------------------------------------------
# Request parsing and validation
# ---------------------------------------------------------------------------------------------
async def read_body(request: Request, limit: int) -> bytes:
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise _too_large(n, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _loc(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not (isinstance(part, str) and (part in ("str", "int", "bool", "list", "float", "none")
                                             or part.startswith(("list[", "function-", "literal[")))):
            out += f".{part}" if out else str(part)
    return out


async def read_json(request: Request, limit: int) -> Any:
    """The request body as JSON (any JSON value); a 400 for an empty or invalid body."""
    body = await read_body(request, limit)
    if not body.strip():
        raise APIError(400, "the request body is empty; expected a JSON object")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON (or not valid UTF-8): {exc}") from None


async def parse(request: Request, model: type[BaseModel], limit: int):
    return validate(model, await read_body(request, limit))


def validate(model: type[BaseModel], body: bytes):
    if not body.strip():
        raise APIError(400, "the request body is empty; expected a JSON object")
    try:
        return model.model_validate_json(body, strict=True)
    except ValidationError as exc:
        errs = exc.errors(include_url=False)
        first = errs[0]
        if first["type"] == "json_invalid":
            raise APIError(400, f"the request body is not valid JSON (or not valid UTF-8): {first['msg']}") from None
        # A union reports one error per branch; the field's name and the shortest reason are enough.
        param = _loc(first["loc"])
        same = [e for e in errs if _loc(e["loc"]) == param] or [first]
        reasons = "; or ".join(dict.fromkeys(e["msg"] for e in same))
        given = first.get("input")
        shown = repr(given) if not isinstance(given, (dict, list)) or len(repr(given)) < 80 else type(given).__name__
        where = f"field '{param}'" if param else "the request body"
        raise APIError(400, f"{where}: {reasons} (got {shown})", param=param or None) from None
