"""The OpenAI-compatible HTTP API over a BatchedEngine.

``create_app(engine)`` builds a FastAPI app around an engine that already exists (tests start it
on a random port); ``create_app(loader=...)`` builds it around one that is still loading (``/health``
answers 503 until it is ready). The engine's own thread runs every llama_decode; the event loop
only submits requests and awaits their pieces, so it never blocks on the model.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import threading
import time
import types
import uuid
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from pyllm.batched import MAX_TOP_LOGPROBS
from pyllm.chat import ChatTemplate, reasoning_parser_for, resolve_template
from pyllm.errors import (BrokenChatTemplateError, ChatTemplateError, ClosedError, ConfigError, ContextFullError,
                          QueueFullError, TokenizeError)
from pyllm.sampling import SamplingParams
import pyllm.server.metrics as _metrics
import pyllm.server.native as native
import pyllm.server.responses as responses
from pyllm.server.native import timings_of
from pyllm.server.cors import CorsPolicy, parse_origins
from pyllm.server.fields import UNLIMITED, FieldError, max_tokens_of, refuse_unsupported, sampling_of
from pyllm.server.schemas import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, Message,
                                  TokenizeRequest)

log = logging.getLogger("pyllm.server")
# One line per request: method, path, status, duration (never the body, the query or the headers).
access_log = logging.getLogger("pyllm.server.access")

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_STOP_STRINGS = 16
_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/tokenize",
              "/detokenize", "/chat/completions", "/completion", "/completions", "/models", "/props", "/slots",
              "/apply-template", "/v1/health", "/chat/completions/input_tokens", "/v1/chat/completions/input_tokens", "/v1/responses",
              "/responses")
# Answered without an API key (llama-server's public endpoints).
_PUBLIC = ("/health", "/v1/health")
_FINISH = {"eog": "stop", "stop": "stop", "max_tokens": "length", "context_full": "length"}
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                405: "invalid_request_error", 413: "invalid_request_error", 500: "server_error",
                501: "not_supported_error", 503: "unavailable_error"}


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None, code: Any = None,
                 type: Optional[str] = None, headers: Optional[dict] = None, extra: Optional[dict] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers
        self.code = code if code is not None else status
        self.type = type or _ERROR_TYPES.get(status, "invalid_request_error")
        self.extra = extra or {}   # more fields of the error object (llama-server's n_prompt_tokens, n_ctx)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code,
                          **self.extra}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class _EventStream(StreamingResponse):
    """Server-sent events whose request is cancelled however the response ends (disconnect included,
    even one before the first event, when the event generator never started)."""

    def __init__(self, events, req, on_cancel: Callable[[], None]) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._req, self._on_cancel = req, on_cancel

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self._req.done:
                self._req.cancel()
                self._on_cancel()


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


# ---------------------------------------------------------------------------------------------
# ASGI guard: auth, body size, request counting. Pure ASGI, so streaming responses are untouched.
# ---------------------------------------------------------------------------------------------
class _Guard:
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
        endpoint = path if path in _ENDPOINTS else "other"
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


def _too_large(n: int, limit: int) -> APIError:
    return APIError(413, f"request body of {n} bytes is larger than the limit of {limit} bytes",
                    code="request_too_large")


# ---------------------------------------------------------------------------------------------
# Request parsing and validation
# ---------------------------------------------------------------------------------------------
async def _read_body(request: Request, limit: int) -> bytes:
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


async def _read_json(request: Request, limit: int) -> Any:
    """The request body as JSON (any JSON value); a 400 for an empty or invalid body."""
    body = await _read_body(request, limit)
    if not body.strip():
        raise APIError(400, "the request body is empty; expected a JSON object")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON (or not valid UTF-8): {exc}") from None


async def _parse(request: Request, model: type[BaseModel], limit: int):
    return _validate(model, await _read_body(request, limit))


def _validate(model: type[BaseModel], body: bytes):
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


def _chat_logprobs(body) -> Optional[int]:
    """Chat: ``logprobs`` (bool) turns them on, ``top_logprobs`` (0-20) asks for alternatives (OpenAI's rules)."""
    if body.logprobs is not None and not isinstance(body.logprobs, bool):
        raise APIError(400, f"logprobs={body.logprobs!r}: expected true or false (top_logprobs sets how many "
                            "alternatives)", param="logprobs")
    top = body.top_logprobs
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise APIError(400, f"top_logprobs={top} is out of range; expected an integer in [0, {MAX_TOP_LOGPROBS}]",
                       param="top_logprobs")
    if top and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    return (top or 0) if body.logprobs else None


def _completion_logprobs(body) -> Optional[int]:
    """Completions: ``logprobs`` is the number of alternatives (0 = the sampled tokens' only)."""
    n = body.logprobs
    if n is None:
        return None
    if isinstance(n, bool) or not 0 <= n <= MAX_TOP_LOGPROBS:
        raise APIError(400, f"logprobs={n!r} is out of range; expected an integer in [0, {MAX_TOP_LOGPROBS}] "
                            "(the alternatives to report per token)", param="logprobs")
    if body.top_logprobs is not None:
        raise APIError(400, "top_logprobs is a chat completions field; /v1/completions takes the count in logprobs",
                       param="top_logprobs")
    return n


def _token_text(piece: bytes) -> str:
    return piece.decode("utf-8", errors="replace")


def _chat_logprob_content(entries) -> list[dict]:
    """OpenAI's chat shape: one {"token", "logprob", "bytes", "top_logprobs"} per token."""
    return [{"token": _token_text(e.piece), "logprob": e.logprob, "bytes": list(e.piece),
             "top_logprobs": [{"token": _token_text(p), "logprob": lp, "bytes": list(p)} for _t, p, lp in e.top]}
            for e in entries]


def _completion_logprobs_obj(entries, offset: int) -> dict:
    """OpenAI's legacy completions shape; ``text_offset`` counts characters from the completion's start
    (``offset``: the characters before these tokens)."""
    tokens, offsets = [], []
    for e in entries:
        text = _token_text(e.piece)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{_token_text(p): lp for _t, p, lp in e.top} for e in entries], "text_offset": offsets}


class _LogprobCursor:
    """Hands a streamed request's token logprobs out with the pieces their tokens produced: call
    ``on_piece()`` once per engine piece, ``take()`` when an event goes out, ``rest()`` at the end (tokens
    whose text was held back, e.g. by a stop string, come last)."""

    def __init__(self, req) -> None:
        self.req, self.piece, self.done, self.pending = req, 0, 0, []

    def on_piece(self) -> None:
        n = self.req.tokens_through_piece(self.piece)
        self.piece += 1
        self.pending.extend(self.req.logprobs[self.done:n])
        self.done = n

    def take(self) -> list:
        out, self.pending = self.pending, []
        return out

    def rest(self) -> list:
        self.pending.extend(self.req.logprobs[self.done:])
        self.done = len(self.req.logprobs)
        return self.take()


def _stops(stop) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or ())
    if len(stops) > MAX_STOP_STRINGS:
        raise APIError(400, f"stop has {len(stops)} strings; at most {MAX_STOP_STRINGS} are accepted", param="stop")
    return [s for s in stops if s]


def _message_dict(i: int, m: Message) -> dict:
    d = m.model_dump(exclude_none=True)
    content = m.content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if part.type != "text" or part.text is None:
                raise APIError(400, f"messages[{i}].content[{j}] has type {part.type!r}; this server accepts "
                                    "only text parts ({'type': 'text', 'text': ...})",
                               param=f"messages[{i}].content[{j}].type")
            texts.append(part.text)
        d["content"] = "".join(texts)
    elif content is None:
        if m.role != "assistant":
            raise APIError(400, f"messages[{i}] (role {m.role!r}) has no content; expected a string",
                           param=f"messages[{i}].content")
        d["content"] = ""
    return d


# ---------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------
class _State:
    def __init__(self) -> None:
        self.engine = None
        self.load_error: Optional[BaseException] = None
        self.kv: Optional[dict] = None
        self.loader_thread: Optional[threading.Thread] = None
        self.template: Optional[ChatTemplate] = None
        self.template_error: Optional[str] = None


def _fingerprint() -> str:
    """``system_fingerprint``: the build serving the request (pyllm's version and the llama.cpp commit)."""
    from pyllm.buildinfo import build_info_line

    return build_info_line()


def _kv_info(engine) -> Optional[dict]:
    """KV bytes per cache and type, read once (they are fixed at allocation)."""
    try:
        fn = getattr(engine, "kv_cache_bytes", None) or engine.context.kv_cache_bytes
        kv = fn()
        return {"k": kv.k, "v": kv.v, "type_k": kv.type_k, "type_v": kv.type_v}
    except Exception as exc:  # metrics must never stop the server from starting
        log.warning("KV cache bytes unavailable for /metrics: %s", exc)
        return None


def _startup_summary(engine, kv: Optional[dict], template: Optional[ChatTemplate], names: Sequence[str]) -> str:
    """One line saying what the server loaded: the model, the context, the KV cache, the chat template."""
    model, ctx = engine.model, engine.context
    mib = 1024 * 1024
    kv_text = (f"K {kv['type_k']} {kv['k'] / mib:.1f} MiB + V {kv['type_v']} {kv['v'] / mib:.1f} MiB"
               if kv else f"K {ctx.type_k} + V {ctx.type_v}")
    return (f"serving {Path(str(model.path)).name} ({model.desc}) as {', '.join(repr(n) for n in names)}: "
            f"n_ctx={engine.n_ctx} ({engine.n_ctx_seq} per sequence), n_parallel={engine.n_parallel}, "
            f"KV cache {kv_text}, flash_attn={'on' if ctx.flash_attn else 'off'}, chat template: "
            + (template.source if template is not None else "none (only /v1/completions works)"))


def _ctx_per_sequence(engine) -> int:
    """Tokens one request may occupy: the whole context if unified, else the sequence's share."""
    s = engine.stats()
    for key in ("n_ctx_seq", "n_ctx_per_seq"):
        if s.get(key):
            return int(s[key])
    return int(engine.n_ctx)


def create_app(
    engine=None,
    *,
    loader: Optional[Callable[[], Any]] = None,
    api_key: Optional[str] = None,
    model_name: Optional[str] = None,
    aliases: Sequence[str] = (),
    chat_template: Optional[str] = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    retry_after_s: int = 1,
    default_max_tokens: Optional[int] = None,
    close_engine: Optional[bool] = None,
    on_load_error: Optional[Callable[[BaseException], None]] = None,
    special_in_messages: bool = False,
    default_sampling: Optional[dict] = None,
    metrics_endpoint: bool = True,
    slots_endpoint: bool = True,
    cors_origins: Optional[str] = None,
    tags: Sequence[str] = (),
    jinja: bool = True,
    reasoning_format: str = "deepseek",
    reasoning: str = "auto",
    verbose_responses: bool = False,
    any_model: bool = False,
) -> FastAPI:
    """An OpenAI-compatible app serving ``engine`` (a pyllm.batched.BatchedEngine).

    ``loader``: instead of ``engine``, a callable that builds it; it runs in a thread when the app
    starts, and /health answers 503 until it returns. ``api_key``: every endpoint but /health then
    requires ``Authorization: Bearer <api_key>``. ``model_name``/``aliases``: the ids /v1/models lists
    and requests may name (default: the model file's name and its stem). ``close_engine``: close the
    engine at shutdown (default: only an engine the app loaded itself). ``default_max_tokens``: for
    requests without max_tokens (default: the request's share of the KV pool, n_ctx / n_parallel; -1: as
    many as the context holds, llama-server's -n -1).
    ``special_in_messages``: tokenize message text with special-token parsing, as llama-server does, so a
    client can write control tokens such as ``<end_of_turn>`` in a message (default False: message text is
    plain text and only the chat template's own markup becomes control tokens; see ChatTemplate.render_prompt).

    llama-server's settings (``pyllm serve``'s flags of the same names): ``default_sampling`` (``--temp``: the
    sampling of requests that leave it out), ``metrics_endpoint``/``slots_endpoint`` (False: /metrics, /slots
    answer 501), ``cors_origins`` (see pyllm.server.cors; None: no CORS headers), ``tags`` (listed by
    /v1/models), ``jinja`` (False: the model's template goes through llama.cpp's built-in formats),
    ``reasoning_format`` (``deepseek``: <think> text in reasoning_content; ``none``: left in content),
    ``reasoning`` (``on``/``off``: enable_thinking's default; ``auto``: true unless a request turns it off),
    ``verbose_responses`` (every completion carries ``__verbose``, the native result with the prompt),
    ``any_model`` (a request may name any model, as llama-server answers every name with its one model;
    default: a name that is not the served model or an alias is a 404).
    """
    if (engine is None) == (loader is None):
        raise ConfigError("create_app needs exactly one of engine= (a BatchedEngine) or loader= (a callable)")
    if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes < 1024:
        raise ConfigError(f"max_body_bytes={max_body_bytes!r} is out of range; expected an integer >= 1024")
    if default_max_tokens is not None and (isinstance(default_max_tokens, bool) or not isinstance(default_max_tokens, int)
                                           or (default_max_tokens < 1 and default_max_tokens != UNLIMITED)):
        raise ConfigError(f"default_max_tokens={default_max_tokens!r} is out of range; expected an integer >= 1, or -1 "
                          "(as many as the context holds)")
    for flag_name, flag in (("special_in_messages", special_in_messages), ("metrics_endpoint", metrics_endpoint),
                            ("slots_endpoint", slots_endpoint), ("jinja", jinja), ("verbose_responses", verbose_responses),
                            ("any_model", any_model)):
        if not isinstance(flag, bool):
            raise ConfigError(f"{flag_name}={flag!r} is not a bool; expected True or False")
    if reasoning_format not in ("deepseek", "auto", "none"):
        raise ConfigError(f"reasoning_format={reasoning_format!r} is not supported; expected deepseek, auto or none")
    if reasoning not in ("on", "off", "auto"):
        raise ConfigError(f"reasoning={reasoning!r} is not valid; expected on, off or auto")
    default_sampling = dict(default_sampling or {})
    SamplingParams(**default_sampling)   # checked now, not on every request
    cors = parse_origins(cors_origins)
    tags = list(dict.fromkeys(tags))
    state = _State()
    owns = (loader is not None) if close_engine is None else close_engine
    created = int(time.time())
    names: list[str] = []

    def ready(eng) -> None:
        state.kv = _kv_info(eng)
        model = eng.model
        # Resolved and compiled once: the template comes from the server's configuration, never from a
        # request, so one that is named but unusable stops the start-up instead of failing every request.
        spec = chat_template or eng.config.chat_template
        try:
            own = None if (spec or jinja) else model.chat_template()
            # --no-jinja: llama.cpp's built-in formats render the model's own template (llama_chat_apply_template
            # recognises the format from the template text), as llama-server --no-jinja does.
            template = (ChatTemplate(source=f"llama.cpp's built-in format for the template of {model.path.name} "
                                            "(--no-jinja)", builtin=own) if own is not None
                        else resolve_template(spec, model))
        except ChatTemplateError as exc:
            if spec:
                raise
            state.template_error = str(exc)   # a model without any template: /v1/completions still works
            log.warning("chat completions are unavailable: %s", exc)
        else:
            template.check()
            state.template = template
        path = Path(str(getattr(eng.model, "path", "model")))
        ids = [model_name or path.name, path.name, path.stem, *aliases]
        names[:] = list(dict.fromkeys(n for n in ids if n))
        log.info("%s", _startup_summary(eng, state.kv, state.template, names))
        state.engine = eng

    if engine is not None:
        ready(engine)

    def load() -> None:
        try:
            eng = loader()
            try:
                ready(eng)
            except BaseException:
                if owns:
                    eng.close()
                raise
        except BaseException as exc:  # reported through /health and on_load_error, not lost in a thread
            state.load_error = exc
            log.error("start-up failed: %s", exc)
            if on_load_error is not None:
                on_load_error(exc)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if loader is not None:
            state.loader_thread = threading.Thread(target=load, name="pyllm-server-load", daemon=True)
            state.loader_thread.start()
        try:
            yield
        finally:
            if state.loader_thread is not None:
                await asyncio.to_thread(state.loader_thread.join)
            if owns and state.engine is not None:
                # close() cancels what is still running and joins the decode thread: off the event loop.
                await asyncio.to_thread(state.engine.close)

    metrics = _metrics.ServerMetrics(lambda: state.engine, lambda: state.kv)
    app = FastAPI(title="pyllm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.pyllm = state
    app.state.metrics = metrics
    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=max_body_bytes, metrics=metrics, cors=cors)
    inflight: set = set()   # submitted requests not yet finished (GET /slots reads their slots)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(FieldError)
    async def _field_error(request: Request, exc: FieldError):
        return APIError(400, exc.message, param=exc.param or None).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        msg = {404: f"no endpoint {request.method} {request.url.path}",
               405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code, exc.detail)
        return APIError(exc.status_code, str(msg)).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error answering %s %s", request.method, request.url.path)
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}").response()

    def engine_or_503():
        if state.engine is None:
            if state.load_error is not None:
                raise APIError(503, f"the server failed to start: {state.load_error}")
            raise APIError(503, "Loading model", headers={"Retry-After": str(retry_after_s)})
        return state.engine

    def chat_template_of(eng) -> ChatTemplate:
        if state.template is None:
            raise APIError(400, f"this server has no usable chat template, so only /v1/completions works: "
                                f"{state.template_error}", param="messages")
        return state.template

    def check_model(name: Optional[str]) -> str:
        if name is not None and name not in names and not any_model:
            raise APIError(404, f"model {name!r} does not exist; this server serves: {', '.join(names)}",
                           param="model", code="model_not_found")
        return names[0]

    def cap_tokens(eng, n_prompt: int, requested: Optional[int], param: str) -> int:
        return cap(eng, n_prompt, requested, param)[0]

    def cap(eng, n_prompt: int, requested: Optional[int], param: str) -> tuple[int, bool]:
        """max_tokens capped by the context (``param``: the field that holds the prompt). Unasked, a
        request gets its fair share of the KV pool (n_ctx / n_parallel, prompt included), so n_parallel
        such requests run at once; ``default_max_tokens`` sets another default. An explicit one (or
        n_predict -1) is honoured as far as the engine lets one sequence grow: up to the context while
        no other request needs the cells, capped at the share when others wait (BatchedEngine's
        admission), so it never starves the other slots."""
        s = eng.stats()
        n_seq = int(s.get("n_ctx_seq") or eng.n_ctx)
        room = n_seq - n_prompt
        if room < 1:
            # llama-server's error type and fields beside OpenAI's code, so either kind of client finds them.
            raise APIError(400, f"the request exceeds the available context size: the prompt has {n_prompt} tokens; "
                                f"a request fits at most {n_seq - 1} (context of {n_seq} tokens per sequence; raise "
                                "-c / MAX_CONTEXT_LENGTH)", param=param, code="context_length_exceeded",
                           type="exceed_context_size_error", extra={"n_prompt_tokens": n_prompt, "n_ctx": n_seq})
        explicit = requested is not None and requested != UNLIMITED
        if requested is None:
            requested = default_max_tokens
        if requested is None:
            share = int(s.get("n_ctx", n_seq)) // max(1, int(s.get("n_parallel", 1))) - n_prompt
            requested = share if share >= 1 else room
        elif requested == UNLIMITED:
            requested = room
        # capped: the context, not the request's own limit, ends the generation there (llama-server's truncated)
        return min(requested, room), (requested > room if explicit else requested >= room)

    def submit(eng, tokens: list[int], max_tokens: int, sampling: SamplingParams, stops: list[str],
               body, logprobs: Optional[int] = None):
        try:
            req = eng.submit(tokens, max_tokens=max_tokens, sampling=sampling, stop=stops,
                             ignore_eos=bool(body.ignore_eos), logprobs=logprobs, cache_prompt=body.cache_prompt)
            inflight.add(req)
            return req
        except QueueFullError as exc:
            metrics.rejected.inc()
            raise APIError(503, f"the server is busy: {exc}", code="queue_full",
                           headers={"Retry-After": str(retry_after_s)}) from None
        except ContextFullError as exc:
            raise APIError(400, str(exc), code="context_length_exceeded") from None
        except ClosedError:
            raise APIError(503, "the server is shutting down", headers={"Retry-After": str(retry_after_s)}) from None
        except (ConfigError, TokenizeError) as exc:
            raise APIError(400, str(exc)) from None

    def usage(result) -> dict:
        n_gen = len(result.tokens)
        return {"prompt_tokens": result.n_prompt, "completion_tokens": n_gen,
                "total_tokens": result.n_prompt + n_gen,
                "prompt_tokens_details": {"cached_tokens": int(getattr(result, "n_prompt_cached", 0) or 0)}}

    def record(result, t0: float, req=None) -> None:
        inflight.difference_update([r for r in list(inflight) if r.done])
        metrics.llamacpp.record(result)
        if req is not None:
            metrics.observe_tokens(getattr(req, "token_ns", ()))
        metrics.prompt_tokens.inc(result.n_prompt)
        metrics.cached_prompt_tokens.inc(int(getattr(result, "n_prompt_cached", 0) or 0))
        metrics.completion_tokens.inc(len(result.tokens))
        metrics.duration.observe(time.perf_counter() - t0)

    def failure(result) -> Optional[APIError]:
        if result.stop_reason in _FINISH:
            return None
        detail = f": {result.error}" if getattr(result, "error", None) else ""
        if result.stop_reason == "cancelled":
            return APIError(503, "the request was cancelled (the server is shutting down)", code="cancelled")
        return APIError(500, f"generation failed ({result.stop_reason}){detail}", code=result.stop_reason)

    async def watch_disconnect(request: Request) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def collect(request: Request, req, t0: float) -> list[str]:
        """All pieces of a request; a client that goes away cancels it (its KV cells are freed)."""
        pieces: list[str] = []
        counted = []

        def cancel() -> None:  # the disconnect and the clean-up below both get here: one cancellation
            req.cancel()
            if not counted:
                counted.append(True)
                metrics.cancelled.inc()

        async def consume() -> None:
            async for piece in req:
                if not pieces:
                    metrics.ttft.observe(time.perf_counter() - t0)
                pieces.append(piece)

        task = asyncio.ensure_future(consume())
        watch = asyncio.ensure_future(watch_disconnect(request))
        try:
            done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
            if task not in done:
                cancel()
                task.cancel()
                raise APIError(499, "client disconnected")
            task.result()
            return pieces
        finally:
            watch.cancel()
            if not req.done:
                cancel()

    async def finished(request: Request, req, t0: float):
        """The result of a non-streamed request (a client that goes away cancels it)."""
        await collect(request, req, t0)
        result = req.result
        record(result, t0, req)
        if (err := failure(result)) is not None:
            raise err
        return result

    async def sse(req, t0: float, include_usage: bool, events_of, finish_event, usage_event, flush=lambda: ()):
        """The server-sent events of a streamed request: each piece's events, the finish event (or the
        error), the usage when asked for, then [DONE]."""
        first = True
        async for piece in req:
            if first:
                metrics.ttft.observe(time.perf_counter() - t0)
                first = False
            for ev in events_of(piece):
                yield ev
        for ev in flush():
            yield ev
        result = req.result
        record(result, t0, req)
        err = failure(result)
        if err is not None:
            yield _sse(err.body())
        else:
            yield _sse(finish_event(_FINISH[result.stop_reason]))
            if include_usage:
                yield _sse(usage_event(usage(result)))
        yield "data: [DONE]\n\n"

    def split(parser, text: str) -> tuple[Optional[str], str]:
        if parser is None:
            return None, text
        parts = parser.feed(text) + parser.finish()
        reasoning = "".join(t for k, t in parts if k == "reasoning")
        return (reasoning or None), "".join(t for k, t in parts if k != "reasoning")

    fingerprint = _fingerprint()

    def default_params() -> dict:
        """The sampling of a request that sets nothing (llama-server's /props default_generation_settings)."""
        eng = state.engine
        base = SamplingParams(**default_sampling)
        seed = eng.config.seed if eng is not None and eng.config.seed is not None else base.seed
        return native.generation_settings(SamplingParams(**{**default_sampling, "seed": seed}),
                                          n_predict=default_max_tokens or -1, stops=[], ignore_eos=False, n_probs=0,
                                          cache_prompt=None)

    def verbose_of(eng, req, result, tokens, name, body, stops, requested, capped) -> dict:
        """llama-server's ``__verbose``: the native /completion result of this request (its prompt as text)."""
        n_predict = -1 if requested in (None, UNLIMITED) else requested
        settings = native.generation_settings(req.sampling, n_predict=n_predict, stops=stops,
                                              ignore_eos=bool(body.ignore_eos), n_probs=0, cache_prompt=body.cache_prompt)
        truncated = result.stop_reason == "context_full" or (result.stop_reason == "max_tokens" and capped)
        return h.native_obj(eng, req, result, tokens=tokens, name=name, index=0, settings=settings,
                            truncated=truncated, return_tokens=True, n_probs=None)

    async def render_text(eng, body) -> str:
        return await render_chat(eng, body, add_generation_prompt=body.add_generation_prompt, text_only=True)

    async def render_prompt(eng, body):
        return await render_chat(eng, body, add_generation_prompt=body.add_generation_prompt)

    from pyllm.chat import _special_text

    h = types.SimpleNamespace(
        engine_or_503=engine_or_503, check_model=check_model, cap=cap, submit=submit, collect=collect, record=record,
        failure=failure, stops=_stops, sampling_of=lambda body, model: sampling_of(body, model, default_sampling),
        names=names, state=state, metrics=metrics, inflight=inflight, max_body_bytes=max_body_bytes,
        default_max_tokens=default_max_tokens, default_params=default_params, slots_endpoint=slots_endpoint,
        metrics_endpoint=metrics_endpoint, verbose=verbose_responses, build_info=fingerprint,
        max_top_logprobs=MAX_TOP_LOGPROBS, special_text=_special_text, render_text=render_text,
        render_prompt=render_prompt, APIError=APIError, EventStream=_EventStream, parse=_parse, validate=_validate,
        read_json=lambda request: _read_json(request, max_body_bytes))
    native.register(app, h)

    # ---- endpoints ----
    @app.get("/health")
    @app.get("/v1/health")
    async def health():
        engine_or_503()
        return {"status": "ok"}

    @app.get("/metrics")
    async def get_metrics():
        if not metrics_endpoint:
            raise APIError(501, "this server does not serve /metrics (started with --no-metrics)")
        return Response(metrics.render(), media_type=_metrics.CONTENT_TYPE,
                        headers={"Process-Start-Time-Unix": str(int(metrics.started))})

    @app.get("/v1/models")
    @app.get("/models")
    async def models():
        eng = engine_or_503()
        m = eng.model
        meta = {"n_ctx": int(eng.n_ctx), "n_ctx_train": m.n_ctx_train, "n_params": m.n_params, "size": m.size,
                "n_embd": m.n_embd, "n_vocab": m.n_vocab}
        # aliases: the names the server was given (-a); requests may also name the file or its stem.
        given = [n for n in (model_name, *aliases) if n]
        return {"object": "list", "data": [{"id": names[0], "object": "model", "created": created,
                                            "owned_by": "pyllm", "aliases": given, "tags": tags, "meta": meta}]}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await _parse(request, TokenizeRequest, max_body_bytes)
        eng = engine_or_503()
        try:
            tokens = await asyncio.to_thread(eng.model.tokenize_prompt, body.content, add_special=body.add_special,
                                             parse_special=body.parse_special)
        except TokenizeError as exc:
            raise APIError(400, str(exc), param="content") from None
        if body.with_pieces:
            # llama-server's shape: a piece that is not whole UTF-8 (a byte token) is its list of byte values.
            out = []
            for t in tokens:
                raw = eng.model.token_to_piece(t, special=True)
                try:
                    out.append({"id": t, "piece": raw.decode("utf-8")})
                except UnicodeDecodeError:
                    out.append({"id": t, "piece": list(raw)})
            return {"tokens": out}
        return {"tokens": tokens}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await _parse(request, DetokenizeRequest, max_body_bytes)
        eng = engine_or_503()
        try:
            return {"content": eng.model.detokenize(body.tokens)}
        except TokenizeError as exc:
            raise APIError(400, str(exc), param="tokens") from None

    def template_kwargs(body) -> dict:
        """chat_template_kwargs with reasoning_effort and enable_thinking, as llama-server passes them."""
        kwargs = dict(body.chat_template_kwargs or {})
        if body.reasoning_effort == "none":  # as llama-server: "none" turns thinking off, others reach the template
            kwargs["enable_thinking"] = False
        elif body.reasoning_effort:
            kwargs["reasoning_effort"] = body.reasoning_effort
        # As llama-server: enable_thinking is always passed (true unless the client or --reasoning off turns it off).
        kwargs.setdefault("enable_thinking", reasoning != "off")
        reserved = sorted(set(kwargs) & {"messages", "tools", "add_generation_prompt", "seconds", "max_chars"})
        if reserved:  # the render's own arguments (its time and size limits included) are not the client's
            raise APIError(400, f"chat_template_kwargs may not set {', '.join(reserved)}",
                           param="chat_template_kwargs")
        return kwargs

    async def render_chat(eng, body, *, add_generation_prompt: bool = True, text_only: bool = False):
        """The conversation of a chat request (or /apply-template's) rendered by the server's template: a
        ChatPrompt (text and tokens), or with ``text_only`` the prompt text."""
        if not body.messages:
            raise APIError(400, "messages is empty; expected at least one message", param="messages")
        messages = [_message_dict(i, m) for i, m in enumerate(body.messages)]
        tmpl = chat_template_of(eng)
        kwargs = template_kwargs(body)

        def render():
            if text_only:
                return tmpl.render(messages, add_generation_prompt=add_generation_prompt, tools=body.tools, **kwargs)
            # Message text is plain text to the tokenizer: only the template's markup becomes control tokens.
            return tmpl.render_prompt(messages, eng.model, add_generation_prompt=add_generation_prompt,
                                      tools=body.tools, special_in_messages=special_in_messages, **kwargs)

        try:
            return await asyncio.to_thread(render)
        except BrokenChatTemplateError as exc:   # the server's template failed, whatever the messages were
            log.error("chat template failed: %s", exc)
            raise APIError(500, str(exc), code="chat_template_failed") from None
        except (ChatTemplateError, TokenizeError) as exc:
            raise APIError(400, str(exc), param="messages") from None

    async def start_chat(body) -> types.SimpleNamespace:
        """A chat request (ChatCompletionRequest) checked, rendered and submitted: ``eng``, ``name``, ``req``,
        ``parser`` (the reasoning split, or None), ``tokens``, ``stops``, ``requested``, ``capped``,
        ``n_logprobs``. Every API that converses (chat completions, responses) starts here."""
        eng = engine_or_503()
        name = check_model(body.model)
        refuse_unsupported(body)
        sampling, stops, n_logprobs = sampling_of(body, eng.model, default_sampling), _stops(body.stop), \
            _chat_logprobs(body)
        requested = max_tokens_of(body)
        fmt = getattr(body, "reasoning_format", None) or reasoning_format
        prompt = await render_chat(eng, body)
        tokens = prompt.tokens
        if not tokens:
            raise APIError(400, "the chat template rendered an empty prompt", param="messages")
        max_tokens, capped = cap(eng, len(tokens), requested, "messages")
        parser = reasoning_parser_for(prompt, state.template) if fmt != "none" else None
        req = submit(eng, tokens, max_tokens, sampling, stops, body, n_logprobs)
        return types.SimpleNamespace(eng=eng, name=name, req=req, parser=parser, tokens=tokens, stops=stops,
                                     requested=requested, capped=capped, n_logprobs=n_logprobs)

    @app.post("/v1/chat/completions")
    @app.post("/chat/completions")
    async def chat_completions(request: Request):
        t0 = time.perf_counter()
        body = await _parse(request, ChatCompletionRequest, max_body_bytes)
        c = await start_chat(body)
        eng, name, req, parser, tokens, stops, n_logprobs = c.eng, c.name, c.req, c.parser, c.tokens, c.stops, c.n_logprobs
        cid, created_at = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(delta: dict, finish: Optional[str] = None, entries=None) -> dict:
            lp = {"content": _chat_logprob_content(entries)} if entries is not None else None
            return {"id": cid, "object": "chat.completion.chunk", "created": created_at, "model": name,
                    "system_fingerprint": fingerprint,
                    "choices": [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}]}

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            cursor = _LogprobCursor(req) if n_logprobs is not None else None

            def deltas(parts) -> list[str]:
                return [_sse(chunk({"reasoning_content" if kind == "reasoning" else "content": text},
                                   entries=cursor.take() if cursor else None))
                        for kind, text in parts if text]

            def piece_events(piece: str) -> list[str]:
                if cursor:
                    cursor.on_piece()
                return deltas(parser.feed(piece) if parser else [("content", piece)])

            async def events():
                # content null in the first chunk, as llama-server sends it (the role alone)
                yield _sse(chunk({"role": "assistant", "content": None}))
                async for ev in sse(req, t0, include_usage, piece_events,
                                    lambda finish: chunk({}, finish, entries=(cursor.rest() or None) if cursor else None),
                                    lambda use: {"id": cid, "object": "chat.completion.chunk", "created": created_at,
                                                 "model": name, "system_fingerprint": fingerprint, "choices": [],
                                                 "usage": use, "timings": timings_of(req.result)},
                                    flush=lambda: deltas(parser.finish()) if parser is not None else ()):
                    yield ev

            # The client going away (or shutdown's grace running out) cancels the sequence: KV cells freed.
            return _EventStream(events(), req, metrics.cancelled.inc)

        result = await finished(request, req, t0)
        reasoning, content = split(parser, result.text)
        message = {"role": "assistant", "content": content}
        if reasoning is not None:
            message["reasoning_content"] = reasoning
        lp = {"content": _chat_logprob_content(req.logprobs)} if n_logprobs is not None else None
        out = {"id": cid, "object": "chat.completion", "created": created_at, "model": name,
               "system_fingerprint": fingerprint,
               "choices": [{"index": 0, "message": message, "logprobs": lp,
                            "finish_reason": _FINISH[result.stop_reason]}],
               "usage": usage(result), "timings": timings_of(result)}
        if body.verbose or verbose_responses:
            out["__verbose"] = verbose_of(eng, req, result, tokens, name, body, stops, c.requested, c.capped)
        return out

    h.start_chat, h.finished, h.split, h.usage, h.fingerprint = start_chat, finished, split, usage, fingerprint
    responses.register(app, h)

    @app.post("/v1/completions")
    async def completions(request: Request):
        t0 = time.perf_counter()
        body = await _parse(request, CompletionRequest, max_body_bytes)
        eng = engine_or_503()
        name = check_model(body.model)
        refuse_unsupported(body, also={"reasoning_effort": "a completion has no chat template to pass it to"})
        sampling, stops, n_logprobs = (sampling_of(body, eng.model, default_sampling), _stops(body.stop),
                                       _completion_logprobs(body))
        requested = max_tokens_of(body)
        if body.echo:
            raise APIError(400, "echo=true is not supported by this server", param="echo")
        if body.suffix:
            raise APIError(400, "suffix is not supported by this server", param="suffix")
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise APIError(400, f"prompt is a batch of {len(prompt)} prompts; this server takes one per request",
                               param="prompt")
            prompt = prompt[0]
        if len(prompt) == 0:
            raise APIError(400, "prompt is empty; expected text or a list of token ids", param="prompt")
        if isinstance(prompt, str):
            try:
                tokens = await asyncio.to_thread(eng.model.tokenize_prompt, prompt, parse_special=True)
            except TokenizeError as exc:
                raise APIError(400, str(exc), param="prompt") from None
        else:
            tokens = list(prompt)
            try:
                eng.model.check_tokens(tokens)
            except TokenizeError as exc:
                raise APIError(400, str(exc), param="prompt") from None
        max_tokens, capped = cap(eng, len(tokens), requested, "prompt")
        req = submit(eng, tokens, max_tokens, sampling, stops, body, n_logprobs)
        cid, created_at = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        text_offset = [0]

        def choice(text: str, finish: Optional[str], entries=None) -> dict:
            lp = None
            if entries is not None:
                lp = _completion_logprobs_obj(entries, text_offset[0])
                text_offset[0] += sum(len(t) for t in lp["tokens"])
            return {"text": text, "index": 0, "logprobs": lp, "finish_reason": finish}

        def obj(choices: list, **extra) -> dict:
            return {"id": cid, "object": "text_completion", "created": created_at, "model": name,
                    "system_fingerprint": fingerprint, "choices": choices, **extra}

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            cursor = _LogprobCursor(req) if n_logprobs is not None else None

            def piece_events(piece: str) -> list[str]:
                if cursor:
                    cursor.on_piece()
                return [_sse(obj([choice(piece, None, cursor.take() if cursor else None)]))]

            events = sse(req, t0, include_usage, piece_events,
                         lambda finish: obj([choice("", finish, (cursor.rest() or None) if cursor else None)]),
                         lambda use: obj([], usage=use, timings=timings_of(req.result)))

            # The client going away (or shutdown's grace running out) cancels the sequence: KV cells freed.
            return _EventStream(events, req, metrics.cancelled.inc)

        result = await finished(request, req, t0)
        out = obj([choice(result.text, _FINISH[result.stop_reason], req.logprobs if n_logprobs is not None else None)],
                  usage=usage(result), timings=timings_of(result))
        if body.verbose or verbose_responses:
            out["__verbose"] = verbose_of(eng, req, result, tokens, name, body, stops, requested, capped)
        return out

    return app
