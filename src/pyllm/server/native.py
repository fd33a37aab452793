"""llama-server's own endpoints, for its clients: ``/completion`` (and ``/completions``), ``/props``, ``/slots``,
``/apply-template`` and ``/chat/completions/input_tokens``, with llama-server's request and response shapes
(``tools/server`` at the pin: ``server-context.cpp``, ``server-task.cpp``, ``server-common.cpp``).

They go through the same request path as the OpenAI routes (``create_app``'s helpers, passed in as ``h``):
the same validation, prompt limits, engine submission, cancellation on disconnect and metrics. What
differs is the shape: a native completion answers ``content``, ``tokens``, ``stop``, ``stop_type``,
``truncated``, ``timings`` (llama-server's names and units: milliseconds, tokens per second) and
``generation_settings``.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import time
from typing import Any, Optional

from fastapi import FastAPI, Request

from pyllm.errors import ConfigError, SequenceStateError, SlotFilenameError, TokenizeError
from pyllm.seqstate import check_slot_filename
from pyllm.server.constraints import constraint_of
from pyllm.server.fields import UNLIMITED, FieldError, max_tokens_of, refuse_unsupported
from pyllm.server.schemas import ApplyTemplateRequest, NativeCompletionRequest

PROMPT_STRING_KEY = "prompt_string"     # llama-server's {"prompt_string": ..., "multimodal_data": [...]}
MULTIMODAL_KEY = "multimodal_data"
_STOP_TYPE = {"eog": "eos", "stop": "word", "max_tokens": "limit", "context_full": "limit"}
# Native-only fields that the OpenAI routes refuse: honoured here.
NATIVE_FIELDS = frozenset({"n_probs", "return_tokens", "response_fields", "timings_per_token", "return_progress"})


def prompt_progress_of(p) -> dict:
    """llama-server's ``prompt_progress`` (result_prompt_progress): the prompt's tokens (``total``), those a
    cache gave (``cache``), those in the KV cache now, cached included (``processed``), and the time since
    admission (``time_ms``). ``p``: a pyllm.sequence.Progress."""
    return {"total": p.n_prompt, "cache": p.n_prompt_cached, "processed": p.n_prompt_processed,
            "time_ms": p.prompt_ns / 1e6}


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _token_text(piece: bytes) -> str:
    return piece.decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------
# Prompts: llama-server's forms (tokenize_input_prompts in server-common.cpp)
# ---------------------------------------------------------------------------------------------
def _is_token(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def prompt_list(model, prompt: Any, param: str = "prompt") -> list[list[int]]:
    """The token lists of a native ``prompt``: a string; token ids; ids and strings mixed in one prompt
    (strings tokenized where they stand, BOS only before a leading string); ``{"prompt_string": ...}``; or a
    list of those (several prompts; a list holding any integer is one prompt). Raises FieldError (a 400)
    naming what is wrong."""
    if isinstance(prompt, list) and prompt and not any(_is_token(p) for p in prompt):
        subs = [(f"{param}[{i}]", p) for i, p in enumerate(prompt)]
    else:
        subs = [(param, prompt)]
    out = []
    for where, p in subs:
        try:
            tokens = _subprompt(model, p, where)
        except TokenizeError as exc:
            raise FieldError(f"{where}: {exc}", param) from None
        if not tokens:
            raise FieldError(f"{where} is empty; expected text or token ids", param)
        try:
            model.check_tokens(tokens)
        except TokenizeError as exc:
            raise FieldError(f"{where}: {exc}", param) from None
        out.append(tokens)
    if not out:
        raise FieldError(f"{param} is empty; expected text, token ids or a list of prompts", param)
    return out


def _subprompt(model, p: Any, where: str) -> list[int]:
    if isinstance(p, str):
        return model.tokenize_prompt(p, parse_special=True)
    if isinstance(p, dict):
        if MULTIMODAL_KEY in p:
            raise FieldError(f"{where} has {MULTIMODAL_KEY!r}: this server has no multimodal projector, so it takes "
                                "text prompts only", "prompt")
        if set(p) != {PROMPT_STRING_KEY}:
            raise FieldError(f"{where}: a prompt object takes only {PROMPT_STRING_KEY!r} (got keys "
                                f"{', '.join(map(repr, p))})", "prompt")
        return _subprompt(model, p[PROMPT_STRING_KEY], f"{where}.{PROMPT_STRING_KEY}")
    if isinstance(p, list):
        tokens: list[int] = []
        for i, e in enumerate(p):
            if _is_token(e):
                tokens.append(e)
            elif isinstance(e, str):
                tokens += (model.tokenize_prompt(e, parse_special=True) if i == 0 else
                           model.tokenize(e, add_special=False, parse_special=True))
            else:
                raise FieldError(f"{where}[{i}] is a {type(e).__name__}; expected a token id or text",
                               param="prompt")
        return tokens
    raise FieldError(f"{where} is a {type(p).__name__}; expected a string, token ids, ids mixed with strings, "
                        f"{{{PROMPT_STRING_KEY!r}: ...}} or a list of those", "prompt")


# ---------------------------------------------------------------------------------------------
# Response pieces
# ---------------------------------------------------------------------------------------------
def timings_of(result) -> dict:
    """llama-server's ``timings``: prompt tokens decoded (``prompt_n``) and reused (``cache_n``), the time of
    each phase in ms and its speed. The first generated token comes from the prompt's logits, so the
    generation speed counts ``predicted_n - 1`` decode steps over ``predicted_ms`` (0 for one token)."""
    prompt_n = int(result.n_prompt_decoded)
    prompt_ms = result.prompt_ns / 1e6
    predicted_n = len(result.tokens)
    predicted_ms = result.gen_ns / 1e6
    steps = max(predicted_n - 1, 0)
    return {
        "cache_n": int(result.n_prompt_cached),
        "prompt_n": prompt_n,
        "prompt_ms": prompt_ms,
        "prompt_per_token_ms": prompt_ms / prompt_n if prompt_n else 0.0,
        "prompt_per_second": 1e3 * prompt_n / prompt_ms if prompt_ms > 0 else 0.0,
        "predicted_n": predicted_n,
        "predicted_ms": predicted_ms,
        "predicted_per_token_ms": predicted_ms / steps if steps else 0.0,
        "predicted_per_second": 1e3 / predicted_ms * steps if steps and predicted_ms > 0 else 0.0,
    }


def probabilities(entries) -> list[dict]:
    """llama-server's ``completion_probabilities``: each token's id, text, logprob and bytes, and its
    ``top_logprobs`` alternatives (the model's distribution, before sampling)."""
    return [{"id": e.token, "token": _token_text(e.piece), "logprob": e.logprob, "bytes": list(e.piece),
             "top_logprobs": [{"id": t, "token": _token_text(p), "logprob": lp, "bytes": list(p)} for t, p, lp in e.top]}
            for e in entries]


def generation_settings(sampling, *, n_predict: int, stops: list[str], ignore_eos: bool, n_probs: int,
                        cache_prompt: Optional[bool]) -> dict:
    """The sampling a request ran with, in llama-server's names (``logit_bias``: [{token, bias}], a banned
    token's bias null, as llama-server writes -inf)."""
    return {
        "n_predict": n_predict, "seed": -1 if sampling.seed is None else sampling.seed,
        "temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p,
        "min_p": sampling.min_p, "typical_p": sampling.typical_p, "repeat_last_n": sampling.repeat_last_n,
        "repeat_penalty": sampling.repeat_penalty, "stop": list(stops), "ignore_eos": ignore_eos,
        "n_probs": n_probs, "cache_prompt": True if cache_prompt is None else cache_prompt,
        "logit_bias": [{"token": t, "bias": None if math.isinf(b) else b} for t, b in sampling.logit_bias],
    }


def _nested(paths: list[str], obj: dict) -> dict:
    """llama-server's ``response_fields``: ``a/b`` picks obj["a"]["b"]; the key is the path as given."""
    out = {}
    for path in paths:
        cur: Any = obj
        for part in path.split("/"):
            if isinstance(cur, dict) and part in cur:
                cur = cur[part]
            else:
                break
        else:
            out[path] = cur
    return out


# ---------------------------------------------------------------------------------------------
# Routes
# ---------------------------------------------------------------------------------------------
def register(app: FastAPI, h) -> None:
    """Add llama-server's endpoints to ``app``; ``h``: create_app's shared request helpers (and its
    APIError, _EventStream and _parse, so that this module stays below pyllm.server.app)."""
    APIError, _EventStream, _parse = h.APIError, h.EventStream, h.parse

    def native_obj(eng, req, result, *, tokens: list[int], name: str, index: int, settings: dict,
                   truncated: bool, return_tokens: bool, n_probs: Optional[int]) -> dict:
        obj = {
            "index": index, "content": result.text,
            "tokens": list(result.tokens) if return_tokens else [],
            "id_slot": req.seq_id if req.seq_id is not None else -1, "stop": True, "model": name,
            "tokens_predicted": len(result.tokens), "tokens_evaluated": result.n_prompt,
            "generation_settings": settings,
            "prompt": eng.model.detokenize(tokens, unparse_special=True),
            "has_new_line": "\n" in result.text, "truncated": truncated,
            "stop_type": _STOP_TYPE.get(result.stop_reason, "none"),
            "tokens_cached": result.n_prompt + len(result.tokens),
            "timings": timings_of(result),
        }
        if n_probs:
            obj["completion_probabilities"] = probabilities(req.logprobs)
        return obj

    h.native_obj = native_obj

    @app.post("/completion")
    @app.post("/completions")
    async def completion(request: Request):
        t0 = time.perf_counter()
        body = await _parse(request, NativeCompletionRequest, h.max_body_bytes)
        eng = h.engine_or_503()
        name = h.check_model(body.model)
        refuse_unsupported(body, honoured=NATIVE_FIELDS)
        sampling, stops = h.sampling_of(body, eng.model), h.stops(body.stop)
        if body.n not in (None, 1):
            raise APIError(400, f"n={body.n!r}: /completion returns one completion per prompt (n_cmpl is llama-server's "
                                "field for more, not supported here; /v1/completions takes n)", param="n")
        cons = constraint_of(body, chat=False)
        if cons.active:   # llama-server's json_schema / grammar: the grammar from the first token
            sampling = dataclasses.replace(sampling, grammar=cons.plain_grammar())
        n_probs = body.n_probs or 0
        if not 0 <= n_probs <= h.max_top_logprobs:
            raise APIError(400, f"n_probs={n_probs} is out of range; expected an integer in [0, {h.max_top_logprobs}]",
                           param="n_probs")
        if body.logprobs is not None or body.top_logprobs is not None:
            raise APIError(400, "/completion takes n_probs (llama-server's); logprobs is an OpenAI field "
                                "(/v1/completions, /v1/chat/completions)", param="logprobs")
        requested = max_tokens_of(body)
        prompts = await asyncio.to_thread(prompt_list, eng.model, body.prompt)
        if body.stream and len(prompts) > 1:
            raise APIError(400, f"prompt holds {len(prompts)} prompts; a streamed request takes one", param="prompt")
        runs = []
        try:
            for tokens in prompts:
                max_tokens, capped = h.cap(eng, len(tokens), requested, "prompt")
                req = h.submit(eng, tokens, max_tokens, sampling, stops, body, n_probs if n_probs else None)
                req.report_progress = bool(body.stream and getattr(body, "return_progress", False))
                runs.append((tokens, req, capped))
        except BaseException:
            for _, req, _ in runs:
                req.cancel()
            raise
        n_predict = -1 if requested in (None, UNLIMITED) and h.default_max_tokens is None else (
            requested if requested not in (None, UNLIMITED) else h.default_max_tokens)

        def settings_of(req) -> dict:
            return generation_settings(req.sampling, n_predict=n_predict, stops=stops, ignore_eos=bool(body.ignore_eos),
                                       n_probs=n_probs, cache_prompt=body.cache_prompt)

        def finish(i: int, tokens, req, capped) -> dict:
            result = req.result
            truncated = result.stop_reason == "context_full" or (result.stop_reason == "max_tokens" and capped)
            obj = native_obj(eng, req, result, tokens=tokens, name=name, index=i, settings=settings_of(req),
                             truncated=truncated, return_tokens=bool(body.return_tokens), n_probs=n_probs)
            if body.verbose or h.verbose:
                obj["__verbose"] = dict(obj)
            return _nested(body.response_fields, obj) if body.response_fields else obj

        if body.stream:
            tokens, req, capped = runs[0]

            timings_per_token = bool(getattr(body, "timings_per_token", False))

            async def events():
                piece_no = done = 0
                first = True
                if getattr(body, "return_progress", False):   # llama-server's: one event per prompt chunk decoded
                    async for p in req.prompt_progress():
                        ev = {"index": 0, "content": "", "tokens": [], "stop": False,
                              "id_slot": req.seq_id if req.seq_id is not None else -1, "tokens_predicted": 0,
                              "tokens_evaluated": len(tokens), "prompt_progress": prompt_progress_of(p)}
                        if timings_per_token:
                            ev["timings"] = timings_of(p)
                        yield _sse(ev)
                async for piece in req:
                    if first:
                        h.metrics.ttft.observe(time.perf_counter() - t0)
                        first = False
                    n = req.tokens_through_piece(piece_no)
                    piece_no += 1
                    chunk = {"index": 0, "content": piece, "tokens": list(req.token_ids[done:n]), "stop": False,
                             "id_slot": req.seq_id if req.seq_id is not None else -1,
                             "tokens_predicted": n, "tokens_evaluated": len(tokens)}
                    if n_probs:
                        chunk["completion_probabilities"] = probabilities(req.logprobs[done:n])
                    if timings_per_token:   # llama-server's: the request's timings so far on every chunk
                        chunk["timings"] = timings_of(req.progress())
                    done = n
                    yield _sse(chunk)
                result = req.result
                h.record(result, t0, req)
                err = h.failure(result)
                if err is not None:
                    yield _sse(err.body())
                    return
                final = finish(0, tokens, req, capped)
                # the text and the token ids went out in the chunks (llama-server's final chunk carries neither)
                final["content"], final["tokens"] = "", []
                if n_probs:
                    final["completion_probabilities"] = probabilities(req.logprobs[done:])
                yield _sse(final)

            return _EventStream(events(), req, h.metrics.cancelled.inc)

        out = []
        try:
            for i, (tokens, req, capped) in enumerate(runs):
                await h.collect(request, req, t0)
                result = req.result
                h.record(result, t0, req)
                if (err := h.failure(result)) is not None:
                    raise err
                out.append(finish(i, tokens, req, capped))
        finally:
            for _, req, _ in runs:
                if not req.done:
                    req.cancel()
        return out if len(out) > 1 else out[0]

    @app.get("/props")
    async def props():
        eng = h.engine_or_503()
        tmpl = h.state.template
        model = eng.model
        return {
            "default_generation_settings": {"n_ctx": int(eng.n_ctx_seq), "params": h.default_params()},
            "total_slots": int(eng.n_parallel),
            "model_alias": h.names[0], "model_path": str(model.path),
            "modalities": {"vision": False, "video": False, "audio": False},
            "endpoint_slots": h.slots_endpoint, "endpoint_metrics": h.metrics_endpoint, "endpoint_props": False,
            "chat_template": (tmpl.text if tmpl.text is not None else tmpl.builtin) if tmpl is not None else "",
            "bos_token": h.special_text(model, model.bos), "eos_token": h.special_text(model, model.eos),
            "build_info": h.build_info,
            "is_sleeping": False,
        }

    @app.get("/slots")
    async def slots():
        if not h.slots_endpoint:
            raise APIError(501, "this server does not serve /slots (started with --no-slots)")
        eng = h.engine_or_503()
        busy = {r.seq_id: r for r in list(h.inflight) if r.seq_id is not None and not r.done}
        out = []
        for i in range(int(eng.n_parallel)):
            r = busy.get(i)
            slot = {"id": i, "id_task": r.id if r is not None else -1, "n_ctx": int(eng.n_ctx_seq),
                    "is_processing": r is not None}
            if r is not None:
                slot["n_prompt_tokens"] = r.n_prompt
                slot["n_decoded"] = len(r.token_ids)
            out.append(slot)
        return out

    def _slot_call(fn, *args):
        """An engine slot action; its refusals (a busy slot, a foreign or corrupt file) as 400s."""
        try:
            return fn(*args)
        except (ConfigError, SequenceStateError) as exc:
            raise APIError(400, str(exc)) from None

    @app.post("/slots/{slot_id}")
    async def slot_action(slot_id: str, request: Request, action: str = ""):
        """llama-server's saved sessions: ``?action=save|restore`` with ``{"filename": NAME}`` (a plain name
        inside --slot-save-path), ``?action=erase``. 501 without --slot-save-path, as llama-server."""
        eng = h.engine_or_503()
        try:
            sid = int(slot_id)
        except ValueError:
            raise APIError(400, f"slot id {slot_id!r} is not an integer; expected 0..{eng.n_parallel - 1}") from None
        if not 0 <= sid < int(eng.n_parallel):
            raise APIError(400, f"slot id {sid} is out of range; expected 0..{eng.n_parallel - 1}")
        if action not in ("save", "restore", "erase"):
            raise APIError(400, f"action={action!r} is not valid; expected save, restore or erase", param="action")
        if action == "erase":
            return await asyncio.to_thread(_slot_call, eng.erase_sequence, sid)
        save_dir = getattr(eng.config, "slot_save_path", None)
        if not save_dir:
            raise APIError(501, "this server saves no slots: start it with --slot-save-path DIR")
        try:
            body = json.loads(await request.body() or b"{}")
        except ValueError:
            raise APIError(400, "the body is not JSON; expected {\"filename\": NAME}") from None
        filename = body.get("filename") if isinstance(body, dict) else None
        try:
            path = check_slot_filename(filename, save_dir)
        except SlotFilenameError as exc:
            raise APIError(400, str(exc), param="filename") from None
        t0 = time.perf_counter()
        fn = eng.save_sequence if action == "save" else eng.restore_sequence
        out = await asyncio.to_thread(_slot_call, fn, sid, path)
        ms = (time.perf_counter() - t0) * 1000
        out["timings"] = {"save_ms" if action == "save" else "restore_ms": ms}
        return out

    @app.post("/apply-template")
    async def apply_template(request: Request):
        body = await _parse(request, ApplyTemplateRequest, h.max_body_bytes)
        eng = h.engine_or_503()
        text = await h.render_text(eng, body)
        return {"prompt": text}

    @app.post("/chat/completions/input_tokens")
    @app.post("/v1/chat/completions/input_tokens")
    async def input_tokens(request: Request):
        body = await _parse(request, ApplyTemplateRequest, h.max_body_bytes)
        eng = h.engine_or_503()
        prompt = await h.render_prompt(eng, body)
        return {"input_tokens": len(prompt.tokens)}
