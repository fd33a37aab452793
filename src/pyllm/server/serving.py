"""The shared request path of every API surface: the server's state (the engine, its chat template, the
names it answers to), and the steps a request goes through whatever API it came by: model name, chat
template, tokens, sampling, constraint and output parser (:meth:`Serving.start_chat`, the one
engine-request builder of every conversing API), submission, the output limit, results, usage and
metrics, cancellation when the client goes away, and server-sent events.

The API modules (chat_completions, completions, messages, responses, native, admin) read a request in
their own shape, call these steps, and write the answer in their own shape. ``create_app``
(pyllm.server.app) builds one :class:`Serving` and wires the modules to it.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
import threading
import time
import types
from pathlib import Path
from typing import Any, AsyncIterator, Optional, Sequence, Union

from fastapi import Request

from pyllm.batched import MAX_TOP_LOGPROBS
from pyllm.chat import ChatTemplate, _special_text, reasoning_parser_for, render_safely
from pyllm.errors import (BrokenChatTemplateError, ChatTemplateError, ClosedError, ConfigError, ContextFullError,
                          GrammarError, QueueFullError, TokenizeError)
from pyllm.sampling import SamplingParams
import pyllm.server.metrics as _metrics
import pyllm.server.native as native
from pyllm.server.constraints import Constraint, constraint_of
from pyllm.server.errors import APIError
from pyllm.server.fields import UNLIMITED, max_tokens_of, refuse_unsupported, sampling_of
from pyllm.server.http import EventStream, parse, read_json, sse, validate
from pyllm.server.replies import CommonReply, PlainReply, ReasoningReply, Reply
from pyllm.server.schemas import Message
from pyllm.server.shapes import chat_logprobs, stops_of

log = logging.getLogger("pyllm.server")

FINISH = {"eog": "stop", "stop": "stop", "max_tokens": "length", "context_full": "length"}


async def merge(gens: list) -> AsyncIterator[str]:
    """The events of several async generators as they come (each one's events stay in order)."""
    if len(gens) == 1:
        async for ev in gens[0]:
            yield ev
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(g) -> None:
        try:
            async for ev in g:
                await queue.put(ev)
        finally:
            await queue.put(done)

    tasks = [asyncio.ensure_future(pump(g)) for g in gens]
    try:
        left = len(tasks)
        while left:
            ev = await queue.get()
            if ev is done:
                left -= 1
            else:
                yield ev
        for t in tasks:
            t.result()
    finally:
        for t in tasks:
            t.cancel()


def message_dict(i: int, m: Message, *, joiner: str = "") -> dict:
    """A chat message as the template takes it: text parts joined (by ``joiner``), a missing assistant
    content ""."""
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
        d["content"] = joiner.join(texts)
    elif content is None:
        if m.role != "assistant":
            raise APIError(400, f"messages[{i}] (role {m.role!r}) has no content; expected a string",
                           param=f"messages[{i}].content")
        d["content"] = ""
    return d


def check_tool_history(messages: list[dict]) -> None:
    """A ``tool`` message answers a call of an earlier assistant message: one with ``tool_calls``, and when
    it names ``tool_call_id``, a call with that id. 400 naming the message otherwise."""
    ids: set = set()
    calls_seen = False
    for i, m in enumerate(messages):
        if m.get("role") == "assistant" and m.get("tool_calls"):
            calls = m["tool_calls"]
            if not isinstance(calls, list):
                raise APIError(400, f"messages[{i}].tool_calls is a {type(calls).__name__}; expected a list",
                               param=f"messages[{i}].tool_calls")
            calls_seen = True
            ids.update(c.get("id") for c in calls if isinstance(c, dict) and c.get("id"))
        elif m.get("role") == "tool":
            if not calls_seen:
                raise APIError(400, f"messages[{i}] is a tool result but no earlier assistant message has tool_calls",
                               param=f"messages[{i}]")
            tid = m.get("tool_call_id")
            if tid is not None and ids and tid not in ids:
                raise APIError(400, f"messages[{i}].tool_call_id={tid!r} matches no earlier tool call (ids: "
                                    f"{', '.join(sorted(map(str, ids)))})", param=f"messages[{i}].tool_call_id")


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


class Serving:
    """One server's state and its shared request steps (see the module docstring). Built by create_app;
    the API modules get it as ``h``."""

    APIError = APIError
    EventStream = EventStream
    max_top_logprobs = MAX_TOP_LOGPROBS
    special_text = staticmethod(_special_text)

    def __init__(self, *, retry_after_s: int, default_max_tokens: Optional[int], special_in_messages: bool,
                 default_sampling: dict, metrics_endpoint: bool, slots_endpoint: bool, jinja: bool,
                 reasoning_format: str, reasoning: str, verbose_responses: bool, any_model: bool,
                 max_body_bytes: int, chat_template: Optional[str], model_name: Optional[str],
                 aliases: Sequence[str], tags: Sequence[str], metrics: _metrics.ServerMetrics) -> None:
        self.engine = None
        self.load_error: Optional[BaseException] = None
        self.kv: Optional[dict] = None
        self.loader_thread: Optional[threading.Thread] = None
        self.template: Optional[ChatTemplate] = None
        self.template_error: Optional[str] = None
        # llama.cpp's compiled copy of a Jinja template (pyllm.chat_common): tool calls and constraints.
        self.common = None
        self.common_lock = threading.Lock()
        self.retry_after_s = retry_after_s
        self.default_max_tokens = default_max_tokens
        self.special_in_messages = special_in_messages
        self.default_sampling = default_sampling
        self.metrics_endpoint = metrics_endpoint
        self.slots_endpoint = slots_endpoint
        self.jinja = jinja
        self.reasoning_format = reasoning_format
        self.reasoning = reasoning
        self.verbose = verbose_responses
        self.any_model = any_model
        self.max_body_bytes = max_body_bytes
        self.chat_template = chat_template
        self.model_name = model_name
        self.aliases = list(aliases)
        self.tags = list(tags)
        self.metrics = metrics
        self.names: list[str] = []
        self.inflight: set = set()   # submitted requests not yet finished (GET /slots reads their slots)
        self.created = int(time.time())
        from pyllm.buildinfo import build_info_line

        # system_fingerprint: the build serving the request (pyllm's version and the llama.cpp commit)
        self.fingerprint = self.build_info = build_info_line()

    @property
    def state(self) -> "Serving":   # what native.py and responses.py read as h.state
        return self

    # ---- request bodies ----
    parse = staticmethod(parse)
    validate = staticmethod(validate)
    stops = staticmethod(stops_of)

    async def read_json(self, request: Request) -> Any:
        return await read_json(request, self.max_body_bytes)

    def sampling_of(self, body, model) -> SamplingParams:
        return sampling_of(body, model, self.default_sampling)

    # ---- the engine and the names ----
    def engine_or_503(self):
        if self.engine is None:
            if self.load_error is not None:
                raise APIError(503, f"the server failed to start: {self.load_error}")
            raise APIError(503, "Loading model", headers={"Retry-After": str(self.retry_after_s)})
        return self.engine

    def chat_template_of(self, eng) -> ChatTemplate:
        if self.template is None:
            raise APIError(400, f"this server has no usable chat template, so only /v1/completions works: "
                                f"{self.template_error}", param="messages")
        return self.template

    def check_model(self, name: Optional[str]) -> str:
        if name is not None and name not in self.names and not self.any_model:
            raise APIError(404, f"model {name!r} does not exist; this server serves: {', '.join(self.names)}",
                           param="model", code="model_not_found")
        return self.names[0]

    # ---- limits and submission ----
    def cap(self, eng, n_prompt: int, requested: Optional[int], param: str) -> tuple[int, bool]:
        """max_tokens capped by the context (``param``: the field that holds the prompt). Unasked, a
        request gets its fair share of the KV pool (n_ctx / n_parallel, prompt included), so n_parallel
        such requests run at once; ``default_max_tokens`` sets another default. An explicit one (or
        n_predict -1) is honoured as far as the engine lets one sequence grow: up to the context while
        no other request needs the cells, capped at the share when others wait (BatchedEngine's
        admission), so it never starves the other slots. Returns (max_tokens, whether the context and
        not the request's own limit ends it)."""
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
            requested = self.default_max_tokens
        if requested is None:
            share = int(s.get("n_ctx", n_seq)) // max(1, int(s.get("n_parallel", 1))) - n_prompt
            requested = share if share >= 1 else room
        elif requested == UNLIMITED:
            requested = room
        return min(requested, room), (requested > room if explicit else requested >= room)

    def submit(self, eng, tokens: list[int], max_tokens: int, sampling: SamplingParams, stops: list[str],
               body, logprobs: Optional[int] = None, preserved_tokens: Sequence[int] = ()):
        with self._engine_errors():
            req = eng.submit(tokens, max_tokens=max_tokens, sampling=sampling, stop=stops,
                             ignore_eos=bool(body.ignore_eos), logprobs=logprobs, cache_prompt=body.cache_prompt,
                             **({"preserved_tokens": preserved_tokens} if preserved_tokens else {}))
        self.inflight.add(req)
        return req

    @contextlib.contextmanager
    def _engine_errors(self):
        """The engine's refusals of a submission as API errors (503 busy or closing, 400 otherwise)."""
        try:
            yield
        except QueueFullError as exc:
            self.metrics.rejected.inc()
            raise APIError(503, f"the server is busy: {exc}", code="queue_full",
                           headers={"Retry-After": str(self.retry_after_s)}) from None
        except ContextFullError as exc:
            raise APIError(400, str(exc), code="context_length_exceeded") from None
        except ClosedError:
            raise APIError(503, "the server is shutting down", headers={"Retry-After": str(self.retry_after_s)}) from None
        except (ConfigError, TokenizeError) as exc:
            raise APIError(400, str(exc)) from None

    # ---- results ----
    @staticmethod
    def usage(result) -> dict:
        n_gen = len(result.tokens)
        return {"prompt_tokens": result.n_prompt, "completion_tokens": n_gen,
                "total_tokens": result.n_prompt + n_gen,
                "prompt_tokens_details": {"cached_tokens": int(getattr(result, "n_prompt_cached", 0) or 0)}}

    def record(self, result, t0: float, req=None) -> None:
        self.inflight.difference_update([r for r in list(self.inflight) if r.done])
        m = self.metrics
        m.llamacpp.record(result)
        if req is not None:
            m.observe_tokens(getattr(req, "token_ns", ()))
        m.prompt_tokens.inc(result.n_prompt)
        m.cached_prompt_tokens.inc(int(getattr(result, "n_prompt_cached", 0) or 0))
        m.completion_tokens.inc(len(result.tokens))
        m.duration.observe(time.perf_counter() - t0)

    @staticmethod
    def failure(result) -> Optional[APIError]:
        if result.stop_reason in FINISH:
            return None
        detail = f": {result.error}" if getattr(result, "error", None) else ""
        if result.stop_reason == "cancelled":
            return APIError(503, "the request was cancelled (the server is shutting down)", code="cancelled")
        return APIError(500, f"generation failed ({result.stop_reason}){detail}", code=result.stop_reason)

    @staticmethod
    async def _watch_disconnect(request: Request) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def collect(self, request: Request, req, t0: float) -> list[str]:
        """All pieces of a request; a client that goes away cancels it (its KV cells are freed)."""
        return (await self.collect_all(request, [req], t0))[0]

    async def collect_all(self, request: Request, reqs: list, t0: float) -> list[list[str]]:
        """All pieces of each request (the choices of one HTTP request); a client that goes away cancels
        them all (their KV cells are freed)."""
        pieces: list[list[str]] = [[] for _ in reqs]
        counted = []
        first = []

        def cancel() -> None:  # the disconnect and the clean-up below both get here: one cancellation
            for r in reqs:
                r.cancel()
            if not counted:
                counted.append(True)
                self.metrics.cancelled.inc()

        async def consume(i: int, r) -> None:
            async for piece in r:
                if not first:
                    first.append(True)
                    self.metrics.ttft.observe(time.perf_counter() - t0)
                pieces[i].append(piece)

        task = asyncio.ensure_future(asyncio.gather(*(consume(i, r) for i, r in enumerate(reqs))))
        watch = asyncio.ensure_future(self._watch_disconnect(request))
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
            if not all(r.done for r in reqs):
                cancel()

    async def finished(self, request: Request, req, t0: float):
        """The result of a non-streamed request (a client that goes away cancels it)."""
        return (await self.finished_all(request, [req], t0))[0]

    async def finished_all(self, request: Request, reqs: list, t0: float) -> list:
        """The results of a non-streamed request's choices; the first failure is raised."""
        await self.collect_all(request, reqs, t0)
        results = []
        for r in reqs:
            result = r.result
            self.record(result, t0, r)
            results.append(result)
        for result in results:
            if (err := self.failure(result)) is not None:
                raise err
        return results

    def merged_usage(self, results: list) -> dict:
        """One usage for the choices of a request: the prompt counted once, the completions summed."""
        use = self.usage(results[0])
        n_gen = sum(len(r.tokens) for r in results)
        use["completion_tokens"] = n_gen
        use["total_tokens"] = use["prompt_tokens"] + n_gen
        return use

    async def stream_choices(self, reqs: list, t0: float, *, include_usage: bool, start, events_of, flush,
                             finish_event, usage_event):
        """The server-sent events of a streamed request's choices, as they come (each choice's in order):
        ``start(i)`` events, then per piece ``events_of(i, piece)``, then ``flush(i)`` (text held back), then
        ``finish_event(i, result)`` (an object) or the choice's error; after every choice the
        ``usage_event(results)`` object when asked for and nothing failed, then [DONE]. The first piece of
        any choice is the request's time to first token."""
        first: list = []
        failed: list = []

        async def one(i: int, req):
            for ev in start(i):
                yield ev
            async for piece in req:
                if not first:
                    first.append(True)
                    self.metrics.ttft.observe(time.perf_counter() - t0)
                for ev in events_of(i, piece):
                    yield ev
            for ev in flush(i):
                yield ev
            result = req.result
            self.record(result, t0, req)
            err = self.failure(result)
            if err is not None:
                failed.append(err)
                yield sse(err.body())
                return
            yield sse(finish_event(i, result))

        async for ev in merge([one(i, r) for i, r in enumerate(reqs)]):
            yield ev
        if include_usage and not failed:
            yield sse(usage_event([r.result for r in reqs]))
        yield "data: [DONE]\n\n"

    def default_params(self) -> dict:
        """The sampling of a request that sets nothing (llama-server's /props default_generation_settings)."""
        eng = self.engine
        base = SamplingParams(**self.default_sampling)
        seed = eng.config.seed if eng is not None and eng.config.seed is not None else base.seed
        return native.generation_settings(SamplingParams(**{**self.default_sampling, "seed": seed}),
                                          n_predict=self.default_max_tokens or -1, stops=[], ignore_eos=False,
                                          n_probs=0, cache_prompt=None)

    def verbose_of(self, eng, req, result, tokens, name, body, stops, requested, capped) -> dict:
        """llama-server's ``__verbose``: the native /completion result of this request (its prompt as text)."""
        n_predict = -1 if requested in (None, UNLIMITED) else requested
        settings = native.generation_settings(req.sampling, n_predict=n_predict, stops=stops,
                                              ignore_eos=bool(body.ignore_eos), n_probs=0, cache_prompt=body.cache_prompt)
        truncated = result.stop_reason == "context_full" or (result.stop_reason == "max_tokens" and capped)
        return self.native_obj(eng, req, result, tokens=tokens, name=name, index=0, settings=settings,
                               truncated=truncated, return_tokens=True, n_probs=None)

    # ---- the chat template ----
    def template_kwargs(self, body) -> dict:
        """chat_template_kwargs with reasoning_effort and enable_thinking, as llama-server passes them."""
        kwargs = dict(body.chat_template_kwargs or {})
        if body.reasoning_effort == "none":  # as llama-server: "none" turns thinking off, others reach the template
            kwargs["enable_thinking"] = False
        elif body.reasoning_effort:
            kwargs["reasoning_effort"] = body.reasoning_effort
        # As llama-server: enable_thinking is always passed (true unless the client or --reasoning off turns it off).
        kwargs.setdefault("enable_thinking", self.reasoning != "off")
        # As llama-server (llama.cpp's common_chat_extra_context): today's date for templates that print it
        # (Llama 3.x's "Today Date: ", FireFunction's "Today is "), where Hugging Face's rendering would
        # fall back to the template's own default date.
        now = datetime.datetime.now()
        kwargs.setdefault("date_string", now.strftime("%d %b %Y"))
        kwargs.setdefault("datetime", now.strftime("%b %d %Y"))
        reserved = sorted(set(kwargs) & {"messages", "tools", "add_generation_prompt", "seconds", "max_chars"})
        if reserved:  # the render's own arguments (its time and size limits included) are not the client's
            raise APIError(400, f"chat_template_kwargs may not set {', '.join(reserved)}",
                           param="chat_template_kwargs")
        return kwargs

    def messages_of(self, body) -> list[dict]:
        if not body.messages:
            raise APIError(400, "messages is empty; expected at least one message", param="messages")
        last = len(body.messages) - 1
        # A final assistant message is the text the reply continues (prefill): its parts are joined by a
        # blank line, as llama.cpp's common_chat_msg::render_content joins them.
        messages = [message_dict(i, m, joiner="\n\n" if i == last and m.role == "assistant" else "")
                    for i, m in enumerate(body.messages)]
        check_tool_history(messages)
        return messages

    @staticmethod
    def reasoning_budget_of(body) -> Optional[tuple[str, int]]:
        """llama-server's reasoning budget (``reasoning_budget_tokens``, or ``thinking_budget_tokens`` as the
        Anthropic API's ``thinking.budget_tokens`` arrives): (field, tokens), or None when unset or -1 (no
        limit). The budget is met by construction where the chat template does not reason (no reasoning
        is produced, so none can run over); with a template that reasons it is refused (not implemented)."""
        for name in ("reasoning_budget_tokens", "thinking_budget_tokens"):
            value = getattr(body, name, None)
            if value is None or value == -1:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise APIError(400, f"{name}={value!r}; expected a number of tokens >= 0, or -1 for no limit",
                               param=name)
            return name, value
        return None

    @staticmethod
    def continuation_of(body, messages: list[dict]) -> Union[bool, str, None]:
        """llama-server's rule for continuing the last message (``oaicompat_chat_params_parse``): the request's
        ``continue_final_message`` (true / "content" / "reasoning_content"; false / "none" / absent: no), or,
        as llama-server's default ``prefill_assistant``, a conversation that ends with an assistant message:
        the reply continues that message's text instead of starting a new turn. 400 for two assistant
        messages at the end, for continuing with ``add_generation_prompt`` true, for continuing a message
        that is not the assistant's or that holds tool calls."""
        value = getattr(body, "continue_final_message", None)
        if value is not None and value not in (True, False, "content", "reasoning_content", "none"):
            raise APIError(400, f"continue_final_message={value!r}; expected true, false, 'content', "
                                "'reasoning_content' or 'none'", param="continue_final_message")
        cont = None if value in (None, False, "none") else value
        add_generation_prompt = getattr(body, "add_generation_prompt", True)
        last = messages[-1]
        if cont is None and last.get("role") == "assistant":
            if len(messages) >= 2 and messages[-2].get("role") == "assistant":
                raise APIError(400, "messages ends with 2 assistant messages; at most one (the message the reply "
                                    "continues) may end the list", param="messages")
            cont, add_generation_prompt = True, False
        if cont is None:
            return None
        if add_generation_prompt:
            raise APIError(400, "continue_final_message and add_generation_prompt are both true; continuing the "
                                "last message adds no generation prompt (send add_generation_prompt: false)",
                           param="continue_final_message")
        if last.get("role") != "assistant":
            raise APIError(400, f"continue_final_message needs the last message to be the assistant's; it is "
                                f"{last.get('role')!r}", param="continue_final_message")
        if last.get("tool_calls"):
            raise APIError(400, "the last assistant message holds tool calls; a message with tool calls cannot be "
                                "continued", param="messages")
        return cont

    async def render_continued(self, eng, body, messages: list[dict]):
        """The prompt of a conversation whose last (assistant) message the reply continues, with pyllm's
        template: the earlier messages with the generation prompt, then that message's text (text parts
        joined by a blank line, as llama.cpp's ``render_content``) as plain text. (A Jinja template compiled
        by llama.cpp continues through llama.cpp instead: :meth:`render_common`.)"""
        from pyllm.chat import ChatPrompt

        content = messages[-1].get("content") or ""
        tmpl = self.chat_template_of(eng)
        kwargs = self.template_kwargs(body)

        def render():
            prompt = tmpl.render_prompt(messages[:-1], eng.model, add_generation_prompt=True, tools=body.tools,
                                        special_in_messages=self.special_in_messages, **kwargs)
            ids = eng.model.tokenize(content, add_special=False, parse_special=self.special_in_messages)
            after = list(eng.model.special_frame()[1])
            head = prompt.tokens[:len(prompt.tokens) - len(after)] if after else prompt.tokens
            return ChatPrompt(prompt.text + content, head + ids + after, prompt.generation_prompt + content)

        return await self._rendering(render)

    async def render_chat(self, eng, body, *, add_generation_prompt: bool = True, text_only: bool = False):
        """The conversation of a chat request (or /apply-template's) rendered by the server's template: a
        ChatPrompt (text and tokens), or with ``text_only`` the prompt text."""
        messages = self.messages_of(body)
        tmpl = self.chat_template_of(eng)
        kwargs = self.template_kwargs(body)

        def render():
            if text_only:
                return tmpl.render(messages, add_generation_prompt=add_generation_prompt, tools=body.tools, **kwargs)
            # Message text is plain text to the tokenizer: only the template's markup becomes control tokens.
            return tmpl.render_prompt(messages, eng.model, add_generation_prompt=add_generation_prompt,
                                      tools=body.tools, special_in_messages=self.special_in_messages, **kwargs)

        return await self._rendering(render)

    async def _rendering(self, render):
        try:
            return await asyncio.to_thread(render)
        except BrokenChatTemplateError as exc:   # the server's template failed, whatever the messages were
            log.error("chat template failed: %s", exc)
            raise APIError(500, str(exc), code="chat_template_failed") from None
        except (ChatTemplateError, TokenizeError) as exc:
            raise APIError(400, str(exc), param="messages") from None

    async def render_text(self, eng, body) -> str:
        return await self.render_chat(eng, body, add_generation_prompt=body.add_generation_prompt, text_only=True)

    async def render_prompt(self, eng, body):
        return await self.render_chat(eng, body, add_generation_prompt=body.add_generation_prompt)

    def _common_or_400(self, cons: Constraint):
        """llama.cpp's compiled template, for a request with tools (400 when it cannot serve them)."""
        what = "tools" if cons.uses_tools else None
        if self.common is None:
            if what is None:
                return None
            why = ("the server runs with --no-jinja" if not self.jinja else
                   f"the server's chat template is {self.template.source if self.template else 'missing'}, not a "
                   "Jinja template")
            raise APIError(400, f"tools need a Jinja chat template that supports them: {why}; start the server with "
                                "one that does (--chat-template NAME, `pyllm info --chat-templates`)", param="tools")
        if what is not None and not self.common.caps.get("supports_tools", False):
            raise APIError(400, f"the chat template {self.template.source} does not support tools (llama.cpp finds no "
                                "tool support in it: the tools would never reach the model); start the server with a "
                                "template that does (--chat-template NAME)", param="tools")
        return self.common

    async def render_common(self, eng, body, cons: Constraint, reasoning_format: str, *,
                            continuation: Union[bool, str, None] = None, add_generation_prompt: bool = True):
        """The prompt (a ChatPrompt) and llama.cpp's ChatParams for a request with tools or a constraint,
        rendered by llama.cpp's compiled template exactly as llama-server renders it, tokenized so that
        message text stays plain text (pyllm.chat.render_safely)."""
        messages = self.messages_of(body)
        kwargs = self.template_kwargs(body)
        enable_thinking = kwargs.pop("enable_thinking", True)
        if not isinstance(enable_thinking, bool):
            raise APIError(400, f"chat_template_kwargs.enable_thinking={enable_thinking!r}: expected true or false",
                           param="chat_template_kwargs")
        common = self.common

        def render(msgs, tools, template_kwargs):
            with self.common_lock:
                params = common.apply(msgs, tools=tools, tool_choice=cons.tool_choice,
                                      parallel_tool_calls=cons.parallel_tool_calls, json_schema=cons.json_schema,
                                      grammar=cons.grammar or None, enable_thinking=enable_thinking,
                                      reasoning_format="none" if reasoning_format == "none" else "auto",
                                      chat_template_kwargs=template_kwargs or None,
                                      continue_final_message=continuation,
                                      add_generation_prompt=add_generation_prompt and not continuation)
            return params.prompt, params.generation_prompt, params

        def run():
            return render_safely(render, eng.model, messages, cons.tools, kwargs,
                                 special_in_messages=self.special_in_messages, source=self.template.source)

        return await self._rendering(run)

    # ---- the one engine-request builder of the conversing APIs ----
    async def start_chat(self, body, *, n: int = 1, honoured: frozenset = frozenset()) -> types.SimpleNamespace:
        """A chat request (ChatCompletionRequest) checked, rendered and submitted: :meth:`prepare_chat`'s
        fields and ``req`` (the first choice), ``reqs`` (all ``n`` choices), ``capped``. Every API that
        converses (chat completions, messages, responses) starts here, so a field is read once."""
        c = await self.prepare_chat(body, honoured=honoured)
        max_tokens, c.capped = self.cap(c.eng, len(c.tokens), c.requested, "messages")
        c.reqs = self.submit_n(c.eng, n, c.tokens, max_tokens, c.sampling, c.stops, body, c.n_logprobs, c.preserved)
        c.req = c.reqs[0]
        return c

    async def prepare_chat(self, body, *, honoured: frozenset = frozenset()) -> types.SimpleNamespace:
        """A chat request checked and rendered, nothing submitted: ``eng``, ``name``, ``tokens`` (the
        prompt), ``sampling`` (grammar included), ``stops``, ``preserved`` (token ids whose text stays in the
        output), ``reply`` (a factory of one pyllm.server.replies.Reply per choice), ``requested``,
        ``n_logprobs``, ``constraint``."""
        eng = self.engine_or_503()
        name = self.check_model(body.model)
        # ``honoured``: fields of fields.REFUSED that the calling API implements itself
        refuse_unsupported(body, honoured=frozenset({"continue_final_message", "add_generation_prompt",
                                                     "reasoning_budget_tokens", "thinking_budget_tokens"}) | honoured)
        budget = self.reasoning_budget_of(body)
        cons = constraint_of(body, chat=True)
        messages = self.messages_of(body)
        add_generation_prompt = getattr(body, "add_generation_prompt", True)
        continuation = self.continuation_of(body, messages)
        sampling, stops, n_logprobs = self.sampling_of(body, eng.model), stops_of(body.stop), chat_logprobs(body)
        requested = max_tokens_of(body)
        fmt = getattr(body, "reasoning_format", None) or self.reasoning_format
        preserved: list[int] = []
        # llama.cpp's compiled template renders tools, constraints and continued messages, as in llama-server
        common = self._common_or_400(cons) if cons.active or continuation else None
        if common is not None:
            prompt, params = await self.render_common(eng, body, cons, fmt, continuation=continuation,
                                                      add_generation_prompt=add_generation_prompt)
            try:
                grammar = params.grammar_sampling(eng.model)
            except GrammarError as exc:
                raise APIError(400, f"the chat template's tool-call grammar cannot be used: {exc}", param="tools") from None
            if grammar:
                sampling = dataclasses.replace(sampling, **grammar)
            stops = stops + [s for s in params.additional_stops if s not in stops]
            for text in params.preserved_tokens:
                ids = eng.model.tokenize(text, add_special=False, parse_special=True)
                if len(ids) == 1:
                    preserved.append(ids[0])

            reasons = bool(params.supports_thinking) and fmt != "none"

            def reply() -> Reply:
                return CommonReply(params.make_parser())
        else:
            if continuation:
                prompt = await self.render_continued(eng, body, messages)
            else:
                prompt = await self.render_chat(eng, body, add_generation_prompt=add_generation_prompt)
            if cons.active:   # a schema or grammar without llama.cpp's template: the grammar as it is
                sampling = dataclasses.replace(sampling, grammar=cons.plain_grammar())
            template = self.template

            reasons = fmt != "none" and reasoning_parser_for(prompt, template) is not None

            def reply() -> Reply:
                p = reasoning_parser_for(prompt, template) if fmt != "none" else None
                return ReasoningReply(p) if p is not None else PlainReply()
        if budget is not None and reasons:
            name_ = budget[0]
            raise APIError(400, f"{name_}={budget[1]} is not supported by this server: a reasoning budget is not "
                                f"implemented, and the chat template {self.template.source} reasons", param=name_)
        tokens = prompt.tokens
        if not tokens:
            raise APIError(400, "the chat template rendered an empty prompt", param="messages")
        return types.SimpleNamespace(eng=eng, name=name, reply=reply, tokens=tokens, stops=stops,
                                     sampling=sampling, preserved=preserved, requested=requested,
                                     n_logprobs=n_logprobs, constraint=cons)

    def check_n(self, eng, n: Any) -> int:
        """``n``: the number of choices (1 when absent); 400 naming ``n`` outside [1, n_parallel]."""
        if n is None:
            return 1
        limit = int(eng.n_parallel)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= limit:
            raise APIError(400, f"n={n!r} is out of range; expected an integer in [1, {limit}] (the choices of one "
                                f"request run at once, one per slot: n_parallel={limit}, -np)", param="n")
        return n

    def submit_n(self, eng, n: int, tokens, max_tokens, sampling, stops, body, n_logprobs, preserved) -> list:
        """Submit ``n`` choices of one prompt (see BatchedEngine.submit_n where the engine has it: the prompt
        is decoded once); a failure cancels the ones already submitted."""
        if n == 1:
            return [self.submit(eng, tokens, max_tokens, sampling, stops, body, n_logprobs, preserved)]
        submit_n = getattr(eng, "submit_n", None)
        if submit_n is not None:
            with self._engine_errors():
                reqs = submit_n(tokens, n, max_tokens=max_tokens, sampling=sampling, stop=stops,
                                ignore_eos=bool(body.ignore_eos), logprobs=n_logprobs, cache_prompt=body.cache_prompt,
                                **({"preserved_tokens": preserved} if preserved else {}))
            self.inflight.update(reqs)
            return list(reqs)
        raise APIError(400, f"n={n} is not supported by this engine (it has no submit_n)", param="n")

    # ---- start-up ----
    def ready(self, eng) -> None:
        """Take ``eng`` into service: its chat template resolved and compiled (pyllm's and llama.cpp's), the
        names it answers to, one start-up line."""
        from pyllm.chat import resolve_template

        self.kv = _kv_info(eng)
        model = eng.model
        # Resolved and compiled once: the template comes from the server's configuration, never from a
        # request, so one that is named but unusable stops the start-up instead of failing every request.
        spec = self.chat_template or eng.config.chat_template
        try:
            own = None if (spec or self.jinja) else model.chat_template()
            # --no-jinja: llama.cpp's built-in formats render the model's own template (llama_chat_apply_template
            # recognises the format from the template text), as llama-server --no-jinja does.
            template = (ChatTemplate(source=f"llama.cpp's built-in format for the template of {model.path.name} "
                                            "(--no-jinja)", builtin=own) if own is not None
                        else resolve_template(spec, model))
        except ChatTemplateError as exc:
            if spec:
                raise
            self.template_error = str(exc)   # a model without any template: /v1/completions still works
            log.warning("chat completions are unavailable: %s", exc)
        else:
            template.check()
            self.template = template
            if self.jinja and template.is_jinja and template.text:
                from pyllm.chat_common import ChatTemplates

                # llama.cpp's Jinja engine compiles it too, for tool calls and constraints; a template it
                # cannot compile leaves them unavailable (a 400 naming why) and everything else working.
                try:
                    self.common = ChatTemplates(template.text, bos_token=template.bos_token or "",
                                                eos_token=template.eos_token or "", name=template.source)
                except ChatTemplateError as exc:
                    log.warning("tool calls and constraints through the chat template are unavailable: %s", exc)
        path = Path(str(getattr(eng.model, "path", "model")))
        ids = [self.model_name or path.name, path.name, path.stem, *self.aliases]
        self.names[:] = list(dict.fromkeys(n for n in ids if n))
        log.info("%s", _startup_summary(eng, self.kv, self.template, self.names))
        self.engine = eng

    def close(self) -> None:
        if self.common is not None:
            self.common.close()
            self.common = None


__all__ = ["FINISH", "Serving", "check_tool_history", "merge", "message_dict"]
