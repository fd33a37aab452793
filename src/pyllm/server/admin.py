"""The endpoints around generation: ``/health``, ``/metrics``, ``/v1/models`` (also ``/models``),
``/tokenize`` and ``/detokenize`` (llama-server's shapes)."""
from __future__ import annotations

import asyncio

from fastapi import FastAPI, Request
from fastapi.responses import Response

import pyllm.server.metrics as _metrics
from pyllm.errors import TokenizeError
from pyllm.server.errors import APIError
from pyllm.server.schemas import DetokenizeRequest, TokenizeRequest
from pyllm.server.serving import Serving


def register(app: FastAPI, h: Serving) -> None:
    @app.get("/health")
    @app.get("/v1/health")
    async def health():
        h.engine_or_503()
        return {"status": "ok"}

    @app.get("/metrics")
    async def get_metrics():
        if not h.metrics_endpoint:
            raise APIError(501, "this server does not serve /metrics (started with --no-metrics)")
        return Response(h.metrics.render(), media_type=_metrics.CONTENT_TYPE,
                        headers={"Process-Start-Time-Unix": str(int(h.metrics.started))})

    @app.get("/v1/models")
    @app.get("/models")
    async def models():
        eng = h.engine_or_503()
        m = eng.model
        meta = {"n_ctx": int(eng.n_ctx), "n_ctx_train": m.n_ctx_train, "n_params": m.n_params, "size": m.size,
                "n_embd": m.n_embd, "n_vocab": m.n_vocab}
        # aliases: the names the server was given (-a); requests may also name the file or its stem.
        given = [n for n in (h.model_name, *h.aliases) if n]
        return {"object": "list", "data": [{"id": h.names[0], "object": "model", "created": h.created,
                                            "owned_by": "pyllm", "aliases": given, "tags": h.tags, "meta": meta}]}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await h.parse(request, TokenizeRequest, h.max_body_bytes)
        eng = h.engine_or_503()
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
        body = await h.parse(request, DetokenizeRequest, h.max_body_bytes)
        eng = h.engine_or_503()
        try:
            return {"content": eng.model.detokenize(body.tokens)}
        except TokenizeError as exc:
            raise APIError(400, str(exc), param="tokens") from None
