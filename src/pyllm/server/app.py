"""The OpenAI-compatible HTTP API over a BatchedEngine.

``create_app(engine)`` builds a FastAPI app around an engine that already exists (tests start it
on a random port); ``create_app(loader=...)`` builds it around one that is still loading (``/health``
answers 503 until it is ready). The engine's own thread runs every llama_decode; the event loop
only submits requests and awaits their pieces, so it never blocks on the model.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from typing import Any, Callable, Optional, Sequence

from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException

from pyllm.errors import ConfigError
from pyllm.sampling import SamplingParams
import pyllm.server.admin as admin
import pyllm.server.chat_completions as chat_completions
import pyllm.server.completions as completions
import pyllm.server.messages as messages
import pyllm.server.metrics as _metrics
import pyllm.server.native as native
import pyllm.server.responses as responses
from pyllm.server.cors import parse_origins
from pyllm.server.errors import APIError
from pyllm.server.fields import UNLIMITED, FieldError
from pyllm.server.http import Guard
from pyllm.server.serving import Serving

log = logging.getLogger("pyllm.server")

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024


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
    owns = (loader is not None) if close_engine is None else close_engine
    h = Serving(retry_after_s=retry_after_s, default_max_tokens=default_max_tokens,
                special_in_messages=special_in_messages, default_sampling=default_sampling,
                metrics_endpoint=metrics_endpoint, slots_endpoint=slots_endpoint, jinja=jinja,
                reasoning_format=reasoning_format, reasoning=reasoning, verbose_responses=verbose_responses,
                any_model=any_model, max_body_bytes=max_body_bytes, chat_template=chat_template,
                model_name=model_name, aliases=aliases, tags=tags,
                metrics=_metrics.ServerMetrics(lambda: h.engine, lambda: h.kv))

    if engine is not None:
        h.ready(engine)

    def load() -> None:
        try:
            eng = loader()
            try:
                h.ready(eng)
            except BaseException:
                if owns:
                    eng.close()
                raise
        except BaseException as exc:  # reported through /health and on_load_error, not lost in a thread
            h.load_error = exc
            log.error("start-up failed: %s", exc)
            if on_load_error is not None:
                on_load_error(exc)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if loader is not None:
            h.loader_thread = threading.Thread(target=load, name="pyllm-server-load", daemon=True)
            h.loader_thread.start()
        try:
            yield
        finally:
            if h.loader_thread is not None:
                await asyncio.to_thread(h.loader_thread.join)
            if owns and h.engine is not None:
                # close() cancels what is still running and joins the decode thread: off the event loop.
                await asyncio.to_thread(h.engine.close)
            h.close()

    app = FastAPI(title="pyllm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.pyllm = h
    app.state.metrics = h.metrics
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes, metrics=h.metrics, cors=cors)

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

    # One module per API surface, all on the same request path (h).
    native.register(app, h)
    admin.register(app, h)
    chat_completions.register(app, h)
    responses.register(app, h)
    completions.register(app, h)
    messages.register(app, h)
    return app
