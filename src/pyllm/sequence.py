"""One generation request and what happens to each token it produces.

A :class:`Request` is both the caller's handle (iterate it for text, ``cancel()``, ``wait()``,
``result``) and the engine-side state of one sequence: its prompt, sampler chain (built from
``SamplingParams``; grammars plug in there), stop strings with incremental detokenization
(``TextStream``), logprobs, and ``token_hook``, where an output parser (tool calls, ...) sees every
token and may end the request. ``Request.accept()`` is the per-token output step; the scheduler and
the KV cache never look at text. The caller-facing parts are thread-safe; the rest belongs to the one
thread that runs the engine core.
"""
from __future__ import annotations

import asyncio
import enum
import itertools
import threading
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterator, NamedTuple, Optional

import numpy as np

from pyllm.errors import ContextFullError
from pyllm.sampling import Sampler, SamplingParams, bias_arrays
from pyllm.textstream import TextStream

__all__ = ["GREEDY", "GenerationResult", "MAX_TOP_LOGPROBS", "Request", "StopReason", "TokenHook", "TokenLogprob",
           "check_fits"]

GREEDY = SamplingParams(temperature=0.0)
MAX_TOP_LOGPROBS = 20
_ids = itertools.count(1)


@dataclass(frozen=True)
class Progress:
    """A running request's counts and times so far, in :class:`GenerationResult`'s names and units:
    ``tokens`` (ids generated), ``prompt_ns`` (admission to the first sampled token; before it, to the end
    of the last prompt chunk decoded, 0 while none is), ``gen_ns`` (first to last sampled token),
    ``n_prompt_decoded``, ``n_prompt_cached``, ``n_prompt``, ``n_prompt_processed``."""

    tokens: list
    prompt_ns: int
    gen_ns: int
    n_prompt_decoded: int
    n_prompt_cached: int
    n_prompt: int = 0             # the prompt's tokens
    n_prompt_processed: int = 0   # of them, in the KV cache now (cached ones included)


class StopReason(str, enum.Enum):
    """Why a generation ended; equal to its lower-case string (``StopReason.EOG == "eog"``)."""

    EOG = "eog"                      # an end-of-generation token
    MAX_TOKENS = "max_tokens"
    STOP = "stop"                    # a stop string (or a token hook asked to stop)
    CONTEXT_FULL = "context_full"
    INTERRUPTED = "interrupted"      # Ctrl-C in the thread that runs the engine (Engine)
    CANCELLED = "cancelled"          # the consumer closed the stream, or cancelled the request
    ABORTED = "aborted"              # Context.abort() from another thread; Ctrl-C in the batched engine
    ERROR = "error"                  # the engine ended this request on an error (GenerationResult.error)

    def __str__(self) -> str:
        return self.value


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]
    n_prompt: int
    stop_reason: StopReason
    prompt_ns: int = 0
    gen_ns: int = 0                  # from the first sampled token to the last
    n_prompt_decoded: int = 0        # prompt tokens actually decoded
    n_prompt_cached: int = 0         # prompt tokens whose K/V were reused from the cache instead of decoded
    error: Optional[BaseException] = None  # what ended a generation with stop_reason ERROR
    stop_word: Optional[str] = None  # the stop string that ended it (stop_reason STOP)

    @property
    def n_generated(self) -> int:
        return len(self.tokens)

    @property
    def prompt_seconds(self) -> float:
        return self.prompt_ns / 1e9

    @property
    def gen_seconds(self) -> float:
        return self.gen_ns / 1e9

    @property
    def prompt_tps(self) -> float:
        return self.n_prompt_decoded / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def gen_tps(self) -> float:
        # The first generated token comes from the prompt's logits; the rest each cost one decode.
        n = max(self.n_generated - 1, 0)
        return n / self.gen_seconds if self.gen_seconds > 0 and n else 0.0


def check_fits(n_prompt: int, max_tokens: Optional[int], n_ctx: int, where: str = "") -> None:
    """A prompt plus the tokens asked for must fit the context; nothing is ever silently truncated. A
    prompt that only fills the cache (``max_tokens=0``, as ``Engine.ingest`` and llama-bench's pp test) may
    take every cell; one that generates needs a cell to spare."""
    full = n_prompt > n_ctx if max_tokens == 0 else n_prompt >= n_ctx
    if full or (max_tokens is not None and n_prompt + max_tokens > n_ctx):
        want = n_prompt + (max_tokens or 0)
        raise ContextFullError(
            f"prompt of {n_prompt} tokens + max_tokens={max_tokens} = {want} does not fit in "
            f"{where or f'n_ctx={n_ctx}'}; shorten the prompt, lower max_tokens, or raise n_ctx "
            f"(MAX_CONTEXT_LENGTH / -c)"
        )


class TokenLogprob(NamedTuple):
    """A generated token's log-probability under the model (log-softmax of its logits row, before the
    sampler's temperature and truncation), and the ``top`` most likely alternatives as
    (token id, piece bytes, logprob), most likely first."""

    token: int
    piece: bytes
    logprob: float
    top: tuple[tuple[int, bytes, float], ...] = ()


#: Called on the engine thread for every generated token after detokenization, with the text it
#: published ('' when held back, e.g. half a UTF-8 character or a possible stop string). Return a
#: StopReason (or its string) to end the request after this token, None to go on. Output parsers
#: (tool calls, reasoning) plug in here; a hook that raises ends its request with stop_reason 'error'.
TokenHook = Callable[["Request", int, str], Optional[str]]


class Request:
    """One submitted generation. Iterate it for text pieces (whole UTF-8 characters), from a thread
    (``for``) or from asyncio (``async for``); each iteration starts from the first piece. Leaving an
    iteration early (``break``, an exception in the loop body) cancels the request, as closing
    ``Engine.stream``'s generator does. ``result`` is set once ``done``.
    """

    def __init__(self, tokens: list[int], max_tokens: Optional[int], sampling: SamplingParams,
                 stops: list[str], ignore_eos: bool, reserve: int, logprobs: Optional[int] = None,
                 cache_prompt: bool = True, token_hook: Optional[TokenHook] = None) -> None:
        self.id = next(_ids)
        self.prompt_tokens = tokens
        self.n_prompt = len(tokens)
        self.max_tokens = max_tokens
        self.sampling = sampling
        self.stops = stops
        self.ignore_eos = ignore_eos
        self.cache_prompt = cache_prompt          # reuse a cached prefix, keep the cells as one when done
        self.token_hook = token_hook
        # Control tokens whose text stays in the output (llama-server's preserved_tokens: <tool_call> ...,
        # which a tool-call parser reads); other control tokens have no text.
        self.preserved_tokens: frozenset[int] = frozenset()
        self.token_ids: list[int] = []           # generated ids so far (appended by the engine thread)
        self.token_ns: list[int] = []            # perf_counter_ns when each token was sampled
        # Wake the request's waiters after every engine step that decodes a part of its prompt, so
        # prompt_progress() can report each one (llama-server's return_progress); off: no extra wake-ups.
        self.report_progress = False
        self.n_logprobs = logprobs                # None: none; k: each token's logprob and its top k alternatives
        self.logprobs: list[TokenLogprob] = []   # one per token_ids entry when n_logprobs is not None
        self.seq_id: Optional[int] = None        # llama.cpp sequence (slot) once admitted
        self.result: Optional[GenerationResult] = None
        self._pieces: list[str] = []
        self._piece_tokens: list[int] = []       # len(token_ids) when each piece was published
        self._cond = threading.Condition()
        self._done = False
        self._cancelled = False
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._wake: Callable[[], None] = lambda: None
        # Owned by the engine thread:
        self._want = reserve                     # cells this sequence may occupy at most (prompt + max_tokens)
        self._reserve = reserve                  # cells held for it now (admission; grows towards _want)
        self._arr = np.asarray(tokens, dtype=np.int32)
        self._slot: Any = None                   # its pyllm.kvcache.Slot once admitted
        self._pos = 0                            # tokens of this sequence in the KV cache
        self._pending = -1                       # sampled token to decode next step (-1: prefilling)
        self._sampler: Optional[Sampler] = None
        self._bias = None                        # greedy without a chain: the logit bias as arrays
        self._on_device = False                  # its chain runs in the decode graph (backend sampling)
        self._text: Optional[TextStream] = None
        self._t_admit = 0
        self._t_first = 0
        self._t_prefill = 0                      # perf_counter_ns at the end of the last prompt chunk's decode
        self._n_cached = 0
        # Several choices of one prompt (BatchedEngine.submit_n): every choice's list, in choice order
        # (None for a lone request). The lead decodes the prompt; the others wait, admitted, until its
        # prompt is done, then get its cells (llama_memory_seq_cp) and sample from its last logits row.
        self.index = 0                           # this choice's place in its group (OpenAI choices[].index)
        self._group: Optional[list["Request"]] = None
        self._waiting = False                    # admitted, waiting for the lead's prompt
        self._copied = False                     # its cells are a copy of the lead's (dropped when it ends)
        self._shared = 0                         # prompt cells the lead's reservation counts for it (unified KV)

    # ---- state ----
    @property
    def done(self) -> bool:
        return self._done

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def progress(self) -> "Progress":
        """The request so far (see :class:`Progress`): what :meth:`finish` reports, measured up to the last
        sampled token (or, before the first, the last prompt chunk). Safe to read from any thread
        (llama-server's ``timings_per_token`` and ``return_progress``)."""
        t_admit, t_first, t_prefill = self._t_admit, self._t_first, self._t_prefill
        stamps = list(self.token_ns)
        last = stamps[-1] if stamps else t_first
        end = t_first or t_prefill
        processed = min(self._pos, self.n_prompt) if t_admit else 0
        return Progress(
            tokens=list(self.token_ids[:len(stamps)]),
            prompt_ns=(end - t_admit) if t_admit and end else 0,
            gen_ns=(last - t_first) if t_first and last else 0,
            n_prompt_decoded=max(0, processed - self._n_cached) if t_admit else 0,
            n_prompt_cached=self._n_cached, n_prompt=self.n_prompt, n_prompt_processed=processed)

    async def prompt_progress(self) -> AsyncIterator["Progress"]:
        """Snapshots of the prompt's processing, from asyncio: one at once (nothing decoded yet, or what a
        cache gave), then one after each engine step that decoded a part of the prompt, until the first
        token is sampled or the request ends. Set ``report_progress`` before submitting, or only the first
        and last states are seen."""
        loop = asyncio.get_running_loop()
        seen = None
        while True:
            fut = None
            with self._cond:
                over = bool(self._t_first) or self._done
                state = (self._pos, self._t_admit, self._t_prefill)
                if not over and state == seen:
                    fut = loop.create_future()
                    self._waiters.append((loop, fut))
            if fut is not None:
                await fut
                continue
            if over:
                return
            seen = state
            yield self.progress()

    @property
    def n_prompt_cached(self) -> int:
        """Prompt tokens whose K/V came from a cache (known once the request is admitted; 0 before)."""
        return self._n_cached

    def cancel(self) -> None:
        """Stop this request: thread-safe and idempotent. Its KV cells are freed at the engine's next
        step (between two decodes); iteration then ends and ``result.stop_reason`` is 'cancelled'."""
        with self._cond:
            if self._done or self._cancelled:
                return
            self._cancelled = True
        self._wake()

    def wait(self, timeout: Optional[float] = None) -> GenerationResult:
        """Block until the request is done; its GenerationResult. TimeoutError after ``timeout`` s."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._done, timeout):
                raise TimeoutError(f"request {self.id} not done after {timeout} s")
        assert self.result is not None
        return self.result

    # ---- iteration ----
    def __iter__(self) -> Iterator[str]:
        i = 0
        completed = False
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: i < len(self._pieces) or self._done)
                    chunk = self._pieces[i:]
                    finished = self._done
                i += len(chunk)
                yield from chunk
                if finished and i >= len(self._pieces):
                    completed = True
                    return
        finally:
            if not completed:
                self.cancel()

    def __aiter__(self) -> AsyncIterator[str]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        i = 0
        completed = False
        try:
            while True:
                fut = None
                with self._cond:
                    chunk = self._pieces[i:]
                    if not chunk:
                        if self._done:
                            completed = True
                            return
                        fut = loop.create_future()
                        self._waiters.append((loop, fut))
                if fut is not None:
                    await fut
                    continue
                i += len(chunk)
                for piece in chunk:
                    yield piece
        finally:
            if not completed:
                self.cancel()

    async def aresult(self) -> GenerationResult:
        """Await the GenerationResult from asyncio without blocking the event loop."""
        loop = asyncio.get_running_loop()
        while True:
            with self._cond:
                if self._done:
                    assert self.result is not None
                    return self.result
                fut = loop.create_future()
                self._waiters.append((loop, fut))
            await fut

    def tokens_through_piece(self, i: int) -> int:
        """How many tokens had been generated when piece ``i`` (0-based, in iteration order) was
        published: piece i's text comes from ``token_ids[tokens_through_piece(i - 1):tokens_through_piece(i)]``
        (a piece may span several tokens; a token held back, e.g. half a UTF-8 character, joins the next)."""
        with self._cond:
            return self._piece_tokens[i]

    def pieces_so_far(self) -> list[str]:
        """The text pieces published so far (a copy)."""
        with self._cond:
            return list(self._pieces)

    # ---- engine side (the thread that runs the core) ----
    def choice(self, index: int, sampling: SamplingParams) -> "Request":
        """Another choice of this request's prompt: the same arguments, its own ``sampling`` (seed); it
        shares the lead's prompt cells in a unified KV pool (``shared``: reserved once, by the lead)."""
        c = Request(self.prompt_tokens, self.max_tokens, sampling, self.stops, self.ignore_eos, self._want,
                    self.n_logprobs, self.cache_prompt, self.token_hook)
        c.index = index
        c._wake = self._wake
        c.preserved_tokens = self.preserved_tokens
        return c

    def share_prompt(self) -> None:
        """A choice that is not the lead: its reservation counts only the cells beyond the prompt."""
        self._shared = self.n_prompt
        self._want -= self.n_prompt

    def become_lead(self) -> None:
        """This choice decodes (or holds) the prompt itself from now on: it reserves the prompt's cells too."""
        self._want += self._shared
        self._reserve += self._shared
        self._shared = 0
        self._waiting = False

    def queued_members(self) -> list["Request"]:
        """The choices that queue behind this one (the lead of its group in the queue): itself and every
        choice not yet done, in choice order."""
        if self._group is None:
            return [self]
        return [m for m in self._group if not m._done]

    def start(self, slot: Any, keep: int, n_vocab: int, model: Any = None) -> None:
        """Bind to ``slot`` whose first ``keep`` cached tokens are this prompt's; build the sampler chain
        (``model``: for a grammar, which needs the vocabulary). What can fail (the chain) comes first, so a
        request that cannot start holds nothing."""
        sampler = None if self.sampling.is_plain_greedy else Sampler(self.sampling, n_vocab, model=model)
        self._bias = bias_arrays(self.sampling) if sampler is None else None
        self._sampler = sampler
        self._slot, slot.req = slot, self
        self.seq_id = slot.seq
        self._pos = keep
        self._n_cached = keep
        self._t_admit = time.perf_counter_ns()
        self._text = TextStream(self.stops)

    def accept(self, token: int, piece: bytes, is_eog: bool, lp: Optional[TokenLogprob] = None) -> Optional[str]:
        """The output step for one sampled token: end-of-generation, logprobs, detokenization, stop
        strings, the token hook, max_tokens. Returns why the request ends now, or None to go on (the
        token is then decoded next step)."""
        now = time.perf_counter_ns()
        if not self._t_first:
            self._t_first = now
        if self._cancelled:
            return "cancelled"
        if is_eog and not self.ignore_eos:
            return "eog"
        if lp is not None:
            self.logprobs.append(lp)
        self.token_ids.append(token)
        self.token_ns.append(now)
        text = self._text.feed(piece)
        if text:
            self._publish(text)
        if self._text.stopped:
            return "stop"
        if self.token_hook is not None:
            reason = self.token_hook(self, token, text)
            if reason is not None:
                return str(StopReason(reason))
        if self.max_tokens is not None and len(self.token_ids) >= self.max_tokens:
            return "max_tokens"
        self._pending = token
        return None

    def finish(self, reason: str, error: Optional[BaseException] = None) -> GenerationResult:
        """End on the engine thread: close the sampler, flush held-back text, publish the result."""
        if self._sampler is not None:
            self._sampler.close()
            self._sampler = None
        rest = self._text.finish() if self._text is not None and reason != "error" else ""
        if rest:
            self._publish(rest)
        now = time.perf_counter_ns()
        t_first = self._t_first or now
        result = GenerationResult(
            text="".join(self._pieces), tokens=list(self.token_ids), n_prompt=self.n_prompt,
            stop_reason=StopReason(reason),
            prompt_ns=(t_first - self._t_admit) if self._t_admit else 0, gen_ns=now - t_first if self._t_first else 0,
            n_prompt_decoded=max(0, min(self._pos, self.n_prompt) - self._n_cached) if self._t_admit else 0,
            n_prompt_cached=self._n_cached, error=error,
            stop_word=self._text.stop_word if self._text is not None else None,
        )
        self._publish(result=result)
        return result

    def _publish(self, piece: str = "", *, result: Optional[GenerationResult] = None) -> None:
        with self._cond:
            if piece:
                self._pieces.append(piece)
                self._piece_tokens.append(len(self.token_ids))
            if result is not None:
                self.result = result
                self._done = True
            self._cond.notify_all()
            waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            try:
                loop.call_soon_threadsafe(_resolve, fut)
            except RuntimeError:  # that event loop is closed: nobody is waiting any more
                pass

    def __repr__(self) -> str:
        state = self.result.stop_reason if self.result else ("cancelling" if self._cancelled else "running")
        return f"<pyllm.Request {self.id} n_prompt={self.n_prompt} generated={len(self.token_ids)} {state}>"


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)
