"""Continuous batching: many sequences in one llama.cpp context, decoded by one loop on one thread.

``BatchedEngine`` owns a context with ``n_seq_max = n_parallel`` and a background thread that is the
only code touching it (llama.cpp contexts are not thread-safe). Callers ``submit()`` prompts from any
thread and get a ``Request`` to iterate (blocking or ``async for``), ``cancel()`` or ``wait()`` on.

Each loop step makes ONE ``llama_decode`` batch: the next token of every generating sequence plus
prompt chunks of newly admitted ones (at most one ``n_ubatch`` of prompt tokens while others are
generating, so a long prompt does not stall them; up to ``n_batch`` otherwise).

KV accounting (unified KV, the default): the pool has ``n_ctx`` cells shared by all sequences, and
each of the ``n_parallel`` slots has a share of ``n_ctx_share = n_ctx // n_parallel`` of them. A
request is admitted when a slot is free and its cells can be reserved next to the reservations of the
running sequences and the cells held by idle prefix caches (the least recently used idle caches are
evicted to make room): ``n_prompt + max_tokens`` cells when that is within the share, else the share
(or its prompt + 1, for a prompt longer than the share). A sequence that wants more than its share
takes further cells one at a time while they are free and no waiting request needs them; when one
does, the sequence ends there (``context_full``). So one long request runs alone as far as the pool
allows, but it can never keep the other slots' requests waiting for more than one step, and nothing
in the cache is ever truncated. With ``kv_unified=False`` every sequence has its own
``n_ctx / n_parallel`` cells (llama.cpp's split streams) and only a free slot is needed.
"""
from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import itertools
import logging
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Iterator, NamedTuple, Optional, Sequence, Union

import numpy as np

from pyllm._ffi import ffi, lib
from pyllm.config import EngineConfig, check_bool, check_int
from pyllm.context import Context, KVCacheBytes, _install_sigint_bridge
from pyllm.engine import GREEDY, GenerationResult, StopReason, load_model
from pyllm.errors import (
    ClosedError,
    ConfigError,
    ContextFullError,
    DecodeError,
    NoKVSlotError,
    QueueFullError,
    TokenizeError,
    check_decode,
)
from pyllm.model import Model
from pyllm.sampling import Sampler, SamplingParams, argmax_biased, bias_arrays
from pyllm.textstream import TextStream

logger = logging.getLogger("pyllm")

__all__ = ["BatchRun", "BatchedEngine", "Request", "TokenLogprob"]

_ids = itertools.count(1)
MAX_TOP_LOGPROBS = 20


class TokenLogprob(NamedTuple):
    """A generated token's log-probability under the model (log-softmax of its logits row, before the
    sampler's temperature and truncation), and the ``top`` most likely alternatives as
    (token id, piece bytes, logprob), most likely first."""

    token: int
    piece: bytes
    logprob: float
    top: tuple[tuple[int, bytes, float], ...] = ()


class Request:
    """One submitted generation. Iterate it for text pieces (whole UTF-8 characters), from a thread
    (``for``) or from asyncio (``async for``); each iteration starts from the first piece. Leaving an
    iteration early (``break``, an exception in the loop body) cancels the request, as closing
    ``Engine.stream``'s generator does. ``result`` is set once ``done``.
    """

    def __init__(self, tokens: list[int], max_tokens: Optional[int], sampling: SamplingParams,
                 stops: list[str], ignore_eos: bool, reserve: int, logprobs: Optional[int] = None,
                 cache_prompt: bool = True) -> None:
        self.id = next(_ids)
        self.prompt_tokens = tokens
        self.n_prompt = len(tokens)
        self.max_tokens = max_tokens
        self.sampling = sampling
        self.stops = stops
        self.ignore_eos = ignore_eos
        self.cache_prompt = cache_prompt          # reuse a cached prefix, keep the cells as one when done
        self.token_ids: list[int] = []           # generated ids so far (appended by the engine thread)
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
        self._slot: Optional[_Slot] = None
        self._pos = 0                            # tokens of this sequence in the KV cache
        self._pending = -1                       # sampled token to decode next step (-1: prefilling)
        self._sampler: Optional[Sampler] = None
        self._bias = None                        # greedy without a chain: the logit bias as arrays
        self._text: Optional[TextStream] = None
        self._t_admit = 0
        self._t_first = 0
        self._n_cached = 0

    # ---- state ----
    @property
    def done(self) -> bool:
        return self._done

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

    # ---- engine side (engine thread only) ----
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


@dataclass
class BatchRun:
    """What ``BatchedEngine.run_together`` measured: one result per sequence and the two phases' times."""

    results: list[GenerationResult]
    prompt_ns: int     # every prompt decoded and each sequence's first token sampled
    gen_ns: int        # the lock-step generation after it


class _Slot:
    """One llama.cpp sequence id and what its cells hold (kept after a request ends, for prefix reuse)."""

    __slots__ = ("seq", "cached", "req", "last_used")

    def __init__(self, seq: int) -> None:
        self.seq = seq
        self.cached: list[int] = []   # tokens whose K/V are in this sequence's cells, in order
        self.req: Optional[Request] = None
        self.last_used = 0


def _common_prefix(a: Sequence[int], b: np.ndarray) -> int:
    m = min(len(a), len(b))
    if m == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:m], dtype=np.int32) != b[:m])
    return int(diff[0]) if len(diff) else m


class BatchedEngine:
    """A model and one context serving ``config.n_parallel`` sequences at once (continuous batching).

    ``BatchedEngine()`` reads the environment (``EngineConfig.from_env()``). ``max_queue``: how many
    requests may wait beyond the ``n_parallel`` running ones before ``submit`` raises QueueFullError.
    ``cache_prompt``: keep a finished sequence's cells as an idle prefix cache for later requests (as
    llama-server does); they are evicted, least recently used first, when cells are needed. A request
    can turn it off for itself (``submit(cache_prompt=False)``).
    """

    def __init__(self, config: Optional[EngineConfig] = None, *, model: Optional[Model] = None,
                 max_queue: int = 64, cache_prompt: bool = True) -> None:
        self.config = config = config if config is not None else EngineConfig.from_env()
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
            raise ConfigError(f"max_queue={max_queue!r} is out of range; expected an integer >= 0")
        if not isinstance(cache_prompt, bool):
            raise ConfigError(f"cache_prompt={cache_prompt!r} is not a bool; expected True or False")
        self.max_queue = max_queue
        self.cache_prompt = cache_prompt
        self._owns_model = model is None
        self.model = model = model if model is not None else load_model(config)
        try:
            # Created on the caller's thread (the main thread installs the Ctrl-C bridge); from here
            # on only the engine thread uses it.
            self.context = Context(
                model, n_ctx=config.n_ctx, n_batch=config.n_batch, n_ubatch=config.n_ubatch,
                n_threads=config.n_threads, n_threads_batch=config.n_threads_batch, flash_attn=config.flash_attn,
                type_k=config.kv_cache_type_k, type_v=config.kv_cache_type_v, offload_kqv=config.offload_kqv,
                n_seq_max=config.n_parallel, kv_unified=config.kv_unified,
            )
        except BaseException:
            if self._owns_model:
                model.close()
            raise
        _install_sigint_bridge()
        ctx = self.context
        self.n_parallel = ctx.n_seq_max
        self.kv_unified = config.kv_unified or self.n_parallel == 1
        self.n_ctx = ctx.n_ctx
        self.n_ctx_seq = ctx.n_ctx_seq
        self.n_batch = ctx.n_batch
        self.n_ubatch = ctx.n_ubatch
        # What one slot may hold while others wait for cells (the unified pool's fair share).
        self.n_ctx_share = self.n_ctx // self.n_parallel if self.kv_unified else self.n_ctx_seq
        self._n_swa = max(1, model.n_swa)
        self._mem = ctx._memory
        self._ctx_ptr = ctx.ptr
        self._vocab = model.vocab_ptr
        self._abort_flag = ctx._abort_flag
        self._abort_flag[0] = 0
        self._batch = ctx._batch._struct
        self._sub = ffi.new("llama_batch *")
        self._piece_buf = ffi.new("char[]", 256)
        self._slots = [_Slot(i) for i in range(self.n_parallel)]
        self._active: list[Request] = []         # admitted, in admission order (engine thread)
        self._step_no = 0
        # Shared with callers, under self._cond:
        self._cond = threading.Condition()
        self._queue: collections.deque[Request] = collections.deque()
        self._calls: list[tuple[Callable[[], object], concurrent.futures.Future]] = []
        self._unfinished = 0
        self._dirty = False
        self._closing = False
        self._closed = False
        self._counters = {"requests_total": 0, "tokens_generated_total": 0, "prompt_tokens_total": 0,
                          "prompt_tokens_cached_total": 0, "steps_total": 0, "swa_cache_misses_total": 0,
                          "interrupted_total": 0}
        self._snapshot = {"kv_cells_used": 0, "kv_cells_reserved": 0, "kv_cells_cached": 0}
        self._thread = threading.Thread(target=self._loop, name="pyllm-batched", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    # ---- lifetime ----
    def close(self) -> None:
        """Cancel queued and running requests, stop the engine thread, free native memory. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = self._closing = True
            self._cond.notify_all()
        lib.pyllm_abort_set(self._abort_flag, 1)   # a decode in progress stops at its next graph node
        if threading.current_thread() is not self._thread:
            self._thread.join()
        atexit.unregister(self.close)
        self.context.close()
        if self._owns_model:
            self.model.close()

    def __enter__(self) -> "BatchedEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    # ---- tokens ----
    def tokenize(self, text: str, *, parse_special: bool = False) -> list[int]:
        """Text to ids as submit() does: BOS added as the model asks, never twice (Model.tokenize_prompt)."""
        if not isinstance(text, str):
            raise TokenizeError(f"cannot tokenize a {type(text).__name__}; expected str")
        return self.model.tokenize_prompt(text, parse_special=parse_special)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.model.detokenize(ids)

    def kv_cache_bytes(self) -> KVCacheBytes:
        return self.context.kv_cache_bytes()

    # ---- submission ----
    def submit(
        self,
        prompt: Union[str, Sequence[int]],
        *,
        max_tokens: Optional[int] = 128,
        sampling: SamplingParams = GREEDY,
        stop: Union[str, Sequence[str]] = (),
        ignore_eos: bool = False,
        parse_special: bool = False,
        logprobs: Optional[int] = None,
        cache_prompt: Optional[bool] = None,
    ) -> Request:
        """Queue a generation; thread-safe. Returns at once with a Request.

        ``prompt``: text (tokenized with BOS, never a second one; ``parse_special=True`` for
        chat-rendered text) or token ids. ``max_tokens``: at most this many tokens (0: the prompt is only
        decoded into the cache); ``None`` generates until end-of-generation or the sequence's limit.
        Beyond ``n_ctx_share`` cells (prompt included) a request in the unified pool runs only while no
        waiting request needs those cells, else it ends as ``context_full`` (see the module's doc).
        ``ignore_eos``: end-of-generation tokens are never sampled (a -inf logit bias on each, as
        llama.cpp's --ignore-eos). ``cache_prompt``: None for the engine's setting; False: no cached
        prefix is reused and this request's cells are freed, not kept, when it ends.
        Raises ConfigError (bad arguments), ContextFullError (can never fit one sequence), QueueFullError
        (``n_parallel + max_queue`` requests unfinished), ClosedError.
        ``logprobs``: None, or k in [0, 20]: ``Request.logprobs`` then gets each generated token's
        TokenLogprob with its k most likely alternatives (read from the logits row in the engine thread).
        """
        if self._closed:
            raise ClosedError("this BatchedEngine is closed")
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0):
            raise ConfigError(f"max_tokens={max_tokens!r} is out of range; expected an integer >= 0 or None")
        if not isinstance(sampling, SamplingParams):
            raise ConfigError(f"sampling={sampling!r} is not a SamplingParams")
        if isinstance(stop, str):
            stop = (stop,)
        try:
            stops = [s for s in stop if s != ""]
        except TypeError:
            raise ConfigError(f"stop={stop!r}: expected a str or a sequence of str") from None
        if any(not isinstance(s, str) for s in stops):
            raise ConfigError(f"stop={list(stop)!r}: stop strings must be str")
        for name, value in (("ignore_eos", ignore_eos), ("parse_special", parse_special)):
            if not isinstance(value, bool):
                raise ConfigError(f"{name}={value!r} is not a bool; expected True or False")
        if cache_prompt is not None and not isinstance(cache_prompt, bool):
            raise ConfigError(f"cache_prompt={cache_prompt!r} is not a bool; expected True, False or None")
        if ignore_eos:
            sampling = sampling.with_banned(self.model.eog_tokens)
        sampling.check_vocab(self.model.n_vocab)
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                     or not 0 <= logprobs <= MAX_TOP_LOGPROBS):
            raise ConfigError(f"logprobs={logprobs!r} is out of range; expected None or an integer in "
                              f"[0, {MAX_TOP_LOGPROBS}] (the alternatives to report per token)")
        tokens = self._prompt_tokens(prompt, parse_special)
        n, limit = len(tokens), self.n_ctx_seq
        if n >= limit or (max_tokens is not None and n + max_tokens > limit):
            want = n + (max_tokens or 0)
            where = f"n_ctx={limit}" if self.kv_unified else f"n_ctx={limit} per sequence (n_ctx {self.n_ctx} / n_parallel {self.n_parallel})"
            raise ContextFullError(
                f"prompt of {n} tokens + max_tokens={max_tokens} = {want} does not fit in "
                f"{where}; shorten the prompt, lower max_tokens, or raise n_ctx (MAX_CONTEXT_LENGTH / -c)"
            )
        if sampling.seed is None and self.config.seed is not None and not sampling.is_plain_greedy:
            sampling = SamplingParams(**{**sampling.__dict__, "seed": self.config.seed})
        want = n + max_tokens if max_tokens is not None else limit
        req = Request(tokens, max_tokens, sampling, stops, ignore_eos, want, logprobs,
                      self.cache_prompt if cache_prompt is None else cache_prompt)
        req._wake = self._wake
        with self._cond:
            if self._closing:
                raise ClosedError("this BatchedEngine is closed")
            if self._unfinished >= self.n_parallel + self.max_queue:
                raise QueueFullError(
                    f"the request queue is full ({self._unfinished} requests unfinished = n_parallel "
                    f"{self.n_parallel} + max_queue {self.max_queue}); retry later"
                )
            self._unfinished += 1
            self._counters["requests_total"] += 1
            self._queue.append(req)
            self._dirty = True
            self._cond.notify_all()
        return req

    async def astream(self, prompt: Union[str, Sequence[int]], **kwargs) -> AsyncIterator[str]:
        """``async for piece in engine.astream(prompt, ...)``: submit() and iterate; leaving early cancels."""
        req = self.submit(prompt, **kwargs)
        async for piece in req:
            yield piece

    def generate(self, prompt: Union[str, Sequence[int]], **kwargs) -> GenerationResult:
        """submit() and wait for the result."""
        return self.submit(prompt, **kwargs).wait()

    def run_together(self, prompts: Sequence[Union[str, Sequence[int]]], max_tokens: int, *,
                     shared_prompt: bool = False) -> "BatchRun":
        """Benchmarking hook with llama-batched-bench's two phases, through this engine's own step code.

        Admits one greedy sequence per prompt at once (at most ``n_parallel``), decodes every prompt
        first (in ``n_batch`` chunks, as one long batch would be; each sequence's first token sampled
        from its prompt's last logits): ``prompt_ns``. Then every sequence generates in lock-step, one
        token each per ``llama_decode``, until each has ``max_tokens`` tokens (end-of-generation is
        ignored): ``gen_ns``, i.e. ``max_tokens - 1`` decodes of ``len(prompts)`` tokens. Runs on the
        engine thread and needs it idle (nothing running); idle prefix caches are dropped first, so
        every prompt is decoded in full. Each sequence holds exactly the cells it fills:
        ``n_prompt + max_tokens - 1`` (the last token is sampled, never decoded).

        ``shared_prompt`` (llama-batched-bench ``-pps``): all prompts are the same; it is decoded once
        for the first sequence and its cells are copied to the others (``llama_memory_seq_cp``), which
        start from its first token. Split KV (``kv_unified=False``) applies the copy with one untimed
        dummy decode, as llama-batched-bench does.
        """
        if self._closed:
            raise ClosedError("this BatchedEngine is closed")
        check_bool("shared_prompt", shared_prompt)
        n_seq = len(prompts)
        check_int("number of prompts", n_seq, minimum=1, maximum=self.n_parallel, what=" (n_parallel)")
        check_int("max_tokens", max_tokens, minimum=2 if shared_prompt else 1,
                  what=" (shared_prompt: the copies start from the first token)" if shared_prompt else "")
        toks = [self._prompt_tokens(p, False) for p in prompts]
        if shared_prompt and any(t != toks[0] for t in toks):
            raise ConfigError("shared_prompt=True needs the same prompt for every sequence")
        n_max = max(len(t) for t in toks)
        per_seq = n_max + max_tokens - 1
        if self.kv_unified:
            need = (n_max if shared_prompt else sum(len(t) for t in toks)) + n_seq * (max_tokens - 1)
            where = f"n_ctx={self.n_ctx}"
        else:
            need, where = per_seq, f"n_ctx={self.n_ctx_seq} per sequence"
        if per_seq > self.n_ctx_seq or need > (self.n_ctx if self.kv_unified else self.n_ctx_seq):
            raise ContextFullError(f"{n_seq} sequences of {n_max} prompt tokens + {max_tokens - 1} decoded need "
                                   f"{need} cells; they do not fit in {where}")
        reqs = [Request(t, max_tokens, GREEDY, [], True, len(t) + max_tokens - 1) for t in toks]
        with self._cond:
            self._unfinished += n_seq
            self._counters["requests_total"] += n_seq
        try:
            return self._call(lambda: self._run_together(reqs, shared_prompt), timeout=None)
        finally:
            for r in reqs:
                if not r.done:  # the engine closed before the call ran
                    self._finish_unadmitted(r, "cancelled")

    def _run_together(self, reqs: list[Request], shared: bool) -> "BatchRun":
        if self._active:
            raise ConfigError(f"run_together needs an idle engine; {len(self._active)} requests are running")
        self._evict_idle()
        try:
            first = reqs[0]
            for r, slot in zip(reqs[:1] if shared else reqs, self._slots):
                self._bind(r, slot, 0)
            t0 = time.perf_counter_ns()
            while any(r._slot is not None and r._pending < 0 for r in reqs):
                self._decode_step(generate=False)
            t1 = time.perf_counter_ns()
            if shared and first._slot is not None:
                n = first.n_prompt
                for r, slot in zip(reqs[1:], self._slots[1:]):
                    lib.llama_memory_seq_cp(self._mem, first._slot.seq, slot.seq, -1, -1)
                    slot.cached = list(first.prompt_tokens)
                    self._bind(r, slot, n)
                    self._on_token(r, first._pending)  # the shared prompt's first token
                if not self.kv_unified and len(reqs) > 1:
                    self._apply_copies(first, n)
                t1 = time.perf_counter_ns()
            while any(r._slot is not None for r in reqs):
                self._decode_step()
            t2 = time.perf_counter_ns()
        finally:
            for r in reqs:
                if r._slot is not None:  # an exception above: nothing of this run stays admitted
                    self._finish(r, "error", free=True)
            self._refresh_snapshot()
        for r in reqs:
            res = r.result
            if res is not None and res.stop_reason == "aborted":
                raise KeyboardInterrupt
            if res is None or res.stop_reason != "max_tokens":
                raise DecodeError(f"run_together: sequence {r.seq_id} ended with "
                                  f"{res.stop_reason if res else 'no result'} after {len(r.token_ids)} tokens"
                                  + (f": {res.error}" if res is not None and res.error else ""))
        return BatchRun([r.result for r in reqs], prompt_ns=t1 - t0, gen_ns=t2 - t1)

    def _apply_copies(self, first: Request, n: int) -> None:
        """Split KV streams copy sequences on the next decode: run one dummy token (llama-batched-bench)."""
        b = self._batch
        b.token[0], b.pos[0], b.n_seq_id[0], b.seq_id[0][0], b.logits[0] = first._pending, n, 1, first._slot.seq, 1
        b.n_tokens = 1
        check_decode(lib.llama_decode(self._ctx_ptr, b[0]), "the dummy token that applies the KV copies")
        lib.llama_memory_seq_rm(self._mem, first._slot.seq, n, -1)

    def _prompt_tokens(self, prompt: Union[str, Sequence[int]], parse_special: bool) -> list[int]:
        if isinstance(prompt, str):
            if prompt == "":
                raise ConfigError("prompt is empty; expected at least one character")
            return self.tokenize(prompt, parse_special=parse_special)
        if isinstance(prompt, (list, tuple, np.ndarray)):
            tokens = [int(t) if isinstance(t, np.integer) else t for t in prompt]
            if not tokens:
                raise ConfigError("prompt is an empty token list; expected at least one token")
            self.model.check_tokens(tokens)
            return tokens
        raise ConfigError(f"prompt must be a str or a list of token ids, got {type(prompt).__name__}")

    # ---- reporting ----
    def stats(self) -> dict:
        """Counters and KV occupancy. ``kv_cells_used`` comes from llama.cpp's memory API (per sequence
        ``llama_memory_seq_pos_max + 1``), read by the engine thread after every step and state change."""
        with self._cond:
            out = {
                "n_parallel": self.n_parallel, "n_ctx": self.n_ctx, "n_ctx_seq": self.n_ctx_seq,
                "n_ctx_share": self.n_ctx_share,
                "kv_unified": self.kv_unified, "active": self._unfinished - len(self._queue),
                "queued": len(self._queue), "max_queue": self.max_queue,
            }
            out.update(self._snapshot)
            out.update(self._counters)
        return out

    def seq_positions(self) -> list[tuple[int, int]]:
        """(pos_min, pos_max) of every sequence as llama.cpp's memory reports them ((-1, -1): empty),
        read on the engine thread between two steps."""
        return self._call(self._seq_positions)

    def drop_cache(self) -> int:
        """Free the cells of every idle prefix cache; returns how many cells were freed (stats() shows it
        at once)."""
        def drop() -> int:
            freed = self._evict_idle()
            self._refresh_snapshot()
            return freed

        return self._call(drop)

    # ---- calls into the engine thread ----
    def _wake(self) -> None:
        with self._cond:
            self._dirty = True
            self._cond.notify_all()

    def _call(self, fn: Callable[[], object], timeout: Optional[float] = 60.0):
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._closing:
                raise ClosedError("this BatchedEngine is closed")
            self._calls.append((fn, fut))
            self._dirty = True
            self._cond.notify_all()
        return fut.result(timeout)

    # ---- the engine thread ----
    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._closing and not self._dirty and not self._active:
                        self._cond.wait()
                    if self._closing:
                        break
                    self._dirty = False
                    calls, self._calls = self._calls, []
                for fn, fut in calls:
                    try:
                        fut.set_result(fn())
                    except BaseException as exc:  # handed to the caller
                        fut.set_exception(exc)
                try:
                    self._step()
                except Exception as exc:  # a bug here must not leave callers waiting forever
                    logger.exception("batched engine step failed; failing the running requests")
                    self._fail_all(exc)
        finally:
            with self._cond:
                self._closing = True
                queued, self._queue = list(self._queue), collections.deque()
                calls, self._calls = self._calls, []
            for fn, fut in calls:
                fut.set_exception(ClosedError("this BatchedEngine is closed"))
            for req in list(self._active):
                self._finish(req, "cancelled", free=True)
            for req in queued:
                self._finish_unadmitted(req, "cancelled")

    def _step(self) -> None:
        if lib.pyllm_sigint_pending():
            self._interrupt()
        for req in [r for r in self._active if r._cancelled]:
            self._finish(req, "cancelled", free=True)
        self._admit()
        if not self._active:
            self._refresh_snapshot()
            return
        self._decode_step()
        self._refresh_snapshot()

    def _admit(self) -> None:
        while True:
            with self._cond:
                while self._queue and self._queue[0]._cancelled:
                    self._finish_unadmitted(self._queue.popleft(), "cancelled")
                # a cancelled request further back is dropped too (it must not wait for a slot)
                for req in [r for r in self._queue if r._cancelled]:
                    self._queue.remove(req)
                    self._finish_unadmitted(req, "cancelled")
                if not self._queue:
                    return
                req = self._queue[0]
            try:
                admitted = self._try_admit(req)
            except Exception as exc:  # this request cannot start: it alone fails, and must not block the queue
                logger.exception("admitting a request failed")
                with self._cond:
                    self._queue.remove(req)
                self._finish_unadmitted(req, "error", error=exc)
                continue
            if not admitted:
                return  # first come, first served: later requests wait behind the head
            with self._cond:
                self._queue.popleft()

    def _base(self, req: Request) -> int:
        """The cells reserved for a request at admission: all it may need when that is within the share,
        else the share (at least its prompt and one token); it grows from there (``_grow``)."""
        if not self.kv_unified or req._want <= self.n_ctx_share:
            return req._want
        return max(self.n_ctx_share, req.n_prompt + 1)

    def _try_admit(self, req: Request) -> bool:
        free = [s for s in self._slots if s.req is None]
        if not free:
            return False
        if req.cache_prompt:
            head = req._arr[:-1]  # the last prompt token is always decoded: its logits give the first token
            slot = max(free, key=lambda s: (_common_prefix(s.cached, head), not s.cached, -s.last_used))
            keep = _common_prefix(slot.cached, head)
        else:  # nothing reused: an empty slot, else the least recently used cache
            slot = min(free, key=lambda s: (bool(s.cached), s.last_used))
            keep = 0
        base = self._base(req)
        if self.kv_unified:
            held = sum(r._reserve for r in self._active)
            if held + base > self.n_ctx:
                return False  # wait for running sequences to finish (or to stop growing); evict nothing yet
            self._make_room(held + base, exclude=slot)
        req._reserve = base
        self._bind(req, slot, self._trim_slot(slot, keep))
        return True

    def _make_room(self, need: int, exclude: Optional[_Slot] = None) -> None:
        """Evict idle prefix caches, least recently used first, until ``need`` reserved cells and the
        remaining caches fit in the pool."""
        idle = sorted((s for s in self._slots if s.req is None and s is not exclude and s.cached),
                      key=lambda s: s.last_used)
        cached = sum(len(s.cached) for s in idle)
        for s in idle:
            if need + cached <= self.n_ctx:
                break
            cached -= self._clear_slot(s)

    def _grow(self, r: Request) -> bool:
        """One more cell for a running sequence that has filled its reservation and may hold more (its
        max_tokens goes beyond its share of the unified pool). Granted while the cell is free and no
        waiting request needs it: a request that waits for cells with a slot free ends the growth, so one
        long request cannot keep the others waiting."""
        if not self.kv_unified or r._reserve >= r._want:
            return False
        held = sum(a._reserve for a in self._active) + 1
        if held > self.n_ctx:
            return False
        with self._cond:
            waiting = next((q for q in self._queue if not q._cancelled), None)
        if waiting is not None and any(s.req is None for s in self._slots) and held + self._base(waiting) > self.n_ctx:
            return False
        self._make_room(held)
        r._reserve += 1
        return True

    def _bind(self, req: Request, slot: _Slot, keep: int) -> None:
        """Admit ``req`` into ``slot`` whose first ``keep`` cached tokens are its prompt's."""
        # What can fail comes first: a request that cannot start must not hold the slot.
        sampler = None if req.sampling.is_plain_greedy else Sampler(req.sampling, self.model.n_vocab)
        bias = bias_arrays(req.sampling) if sampler is None else None
        req._slot, slot.req = slot, req
        req.seq_id = slot.seq
        req._pos = keep
        req._n_cached = keep
        req._t_admit = time.perf_counter_ns()
        req._text = TextStream(req.stops)
        req._sampler, req._bias = sampler, bias
        self._active.append(req)
        with self._cond:
            self._counters["prompt_tokens_total"] += req.n_prompt
            self._counters["prompt_tokens_cached_total"] += keep

    def _trim_slot(self, slot: _Slot, keep: int) -> int:
        """Keep the first ``keep`` cached tokens of a slot; returns how many stay usable."""
        seq = slot.seq
        if keep < len(slot.cached):
            if not lib.llama_memory_seq_rm(self._mem, seq, keep, -1):
                keep = 0
        if keep > 0:
            # A sliding-window cache may no longer hold the window that position `keep` attends to
            # (its cells were reused): then recompute from scratch, as llama-server does.
            pos_min = int(lib.llama_memory_seq_pos_min(self._mem, seq))
            if pos_min < 0 or pos_min > max(0, keep - self._n_swa):
                keep = 0
                with self._cond:
                    self._counters["swa_cache_misses_total"] += 1
        if keep == 0:
            lib.llama_memory_seq_rm(self._mem, seq, -1, -1)
        del slot.cached[keep:]
        return keep

    def _clear_slot(self, slot: _Slot) -> int:
        n = len(slot.cached)
        lib.llama_memory_seq_rm(self._mem, slot.seq, -1, -1)
        slot.cached = []
        return n

    def _evict_idle(self) -> int:
        return sum(self._clear_slot(s) for s in self._slots if s.req is None and s.cached)

    def _decode_step(self, generate: bool = True) -> None:
        """One llama_decode: the generating sequences' next tokens (unless ``generate`` is False, as in
        run_together's prompt phase) and prompt chunks; then each finished row's token is sampled."""
        b, sub = self._batch, self._sub
        rows: list[tuple[Request, int]] = []
        prefill: list[tuple[Request, int]] = []
        i = 0
        gen = [r for r in self._active if r._pending >= 0] if generate else []
        for r in gen:
            b.token[i] = r._pending
            b.pos[i] = r._pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = r._slot.seq
            b.logits[i] = 1
            rows.append((r, i))
            i += 1
        budget = self.n_batch - i
        if gen:
            budget = min(budget, self.n_ubatch)
        for r in self._active:
            if r._pending >= 0 or budget <= 0:
                continue
            n = min(budget, r.n_prompt - r._pos)
            last = r._pos + n == r.n_prompt
            sub.token, sub.pos, sub.n_seq_id = b.token + i, b.pos + i, b.n_seq_id + i
            sub.seq_id, sub.logits = b.seq_id + i, b.logits + i
            chunk = r._arr[r._pos : r._pos + n]
            lib.pyllm_batch_fill(sub, ffi.from_buffer("llama_token[]", chunk), n, r._pos, r._slot.seq, last, -1)
            prefill.append((r, n))
            if last:
                rows.append((r, i + n - 1))
            i += n
            budget -= n
        b.n_tokens = i
        rc = lib.llama_decode(self._ctx_ptr, b[0])
        if rc != 0:
            self._decode_failed(rc, gen, prefill)
            return
        with self._cond:
            self._counters["steps_total"] += 1
        for r in gen:
            r._slot.cached.append(r._pending)
            r._pos += 1
        for r, n in prefill:
            r._slot.cached.extend(r.prompt_tokens[r._pos : r._pos + n])
            r._pos += n
        for r, idx in rows:
            if r.max_tokens == 0:  # the prompt only: decoded into the cache, nothing sampled
                self._finish(r, "max_tokens")
                continue
            try:
                if r._sampler is None and r._bias is not None:
                    token = argmax_biased(lib.llama_get_logits_ith(self._ctx_ptr, idx), self.model.n_vocab, r._bias)
                elif r._sampler is None:
                    token = int(lib.pyllm_argmax_logits(self._ctx_ptr, idx, self.model.n_vocab))
                else:
                    token = int(lib.llama_sampler_sample(r._sampler.ptr, self._ctx_ptr, idx))
                lp = self._logprob(idx, token, r.n_logprobs) if r.n_logprobs is not None else None
                self._on_token(r, token, lp)
            except Exception as exc:
                self._finish(r, "error", free=True, error=exc)

    def _decode_failed(self, rc: int, gen: list[Request], prefill: list[tuple[Request, int]]) -> None:
        # Ubatches that ran before a failure stay in memory: roll every sequence of the batch back.
        for r in gen + [r for r, _ in prefill]:
            lib.llama_memory_seq_rm(self._mem, r._slot.seq, r._pos, -1)
        if rc == 2:
            if self._closing:
                return  # close(): the loop ends and cancels everything
            self._interrupt()
            return
        try:
            check_decode(rc, f"batch of {self._batch.n_tokens} tokens over {len(self._active)} sequences")
        except NoKVSlotError as exc:
            # Fragmented or sliding-window cells: let the youngest sequence go, the rest continue.
            victim = self._active[-1]
            self._finish(victim, "error", free=True, error=exc)
            self._evict_idle()
        except DecodeError as exc:
            self._fail_all(exc)

    def _interrupt(self) -> None:
        """Ctrl-C (or an abort): the running requests end as 'aborted'; the engine stays usable."""
        lib.pyllm_sigint_clear()
        if self._active:
            with self._cond:
                self._counters["interrupted_total"] += 1
        for r in list(self._active):
            self._finish(r, "aborted", free=True)

    def _fail_all(self, exc: BaseException) -> None:
        for r in list(self._active):
            self._finish(r, "error", free=True, error=exc)
        lib.llama_memory_clear(self._mem, True)
        for s in self._slots:
            s.cached = []

    def _piece(self, token: int) -> bytes:
        buf = self._piece_buf
        n = lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        if n < 0:
            self._piece_buf = buf = ffi.new("char[]", -n)
            n = lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        return ffi.unpack(buf, n)

    def _logprob(self, idx: int, token: int, k: int) -> TokenLogprob:
        """The log-softmax of batch row ``idx``'s logits at ``token``, and its top k (engine thread)."""
        n_vocab = self.model.n_vocab
        row = np.frombuffer(ffi.buffer(lib.llama_get_logits_ith(self._ctx_ptr, idx), 4 * n_vocab), dtype=np.float32)
        peak = float(row.max())
        lse = peak + float(np.log(np.exp(row - peak, dtype=np.float64).sum()))
        top: tuple = ()
        if k:
            ids = np.argpartition(row, n_vocab - k)[n_vocab - k:]
            ids = ids[np.argsort(-row[ids], kind="stable")]
            top = tuple((int(t), self._piece(int(t)), float(row[t]) - lse) for t in ids)
        return TokenLogprob(token, self._piece(token), float(row[token]) - lse, top)

    def _on_token(self, r: Request, token: int, lp: Optional[TokenLogprob] = None) -> None:
        if not r._t_first:
            r._t_first = time.perf_counter_ns()
        if r._cancelled:
            self._finish(r, "cancelled", free=True)
            return
        if lib.llama_vocab_is_eog(self._vocab, token) and not r.ignore_eos:
            self._finish(r, "eog")
            return
        if lp is not None:
            r.logprobs.append(lp)
        r.token_ids.append(token)
        with self._cond:
            self._counters["tokens_generated_total"] += 1
        piece = r._text.feed(self._piece(token))
        if piece:
            r._publish(piece)
        if r._text.stopped:
            self._finish(r, "stop")
        elif r.max_tokens is not None and len(r.token_ids) >= r.max_tokens:
            self._finish(r, "max_tokens")
        elif r._pos >= r._reserve and not self._grow(r):
            self._finish(r, "context_full")
        else:
            r._pending = token

    def _finish(self, r: Request, reason: str, *, free: bool = False, error: Optional[BaseException] = None) -> None:
        slot = r._slot
        if slot is not None:
            if free or not r.cache_prompt:
                self._clear_slot(slot)
            slot.req = None
            self._step_no += 1
            slot.last_used = self._step_no
            r._slot = None
        if r in self._active:
            self._active.remove(r)
        if r._sampler is not None:
            r._sampler.close()
            r._sampler = None
        rest = r._text.finish() if r._text is not None and reason not in ("error",) else ""
        if rest:
            r._publish(rest)
        now = time.perf_counter_ns()
        t_first = r._t_first or now
        result = GenerationResult(
            text="".join(r._pieces), tokens=list(r.token_ids), n_prompt=r.n_prompt, stop_reason=StopReason(reason),
            prompt_ns=(t_first - r._t_admit) if r._t_admit else 0, gen_ns=now - t_first if r._t_first else 0,
            n_prompt_decoded=max(0, min(r._pos, r.n_prompt) - r._n_cached), n_prompt_cached=r._n_cached,
            error=error,
        )
        self._refresh_snapshot()
        with self._cond:
            self._unfinished -= 1
            self._dirty = True  # a slot and cells are free: the queue's head may fit now
        r._publish(result=result)

    def _finish_unadmitted(self, r: Request, reason: str, error: Optional[BaseException] = None) -> None:
        with self._cond:
            self._unfinished -= 1
        r._publish(result=GenerationResult(text="", tokens=[], n_prompt=r.n_prompt, stop_reason=StopReason(reason),
                                           error=error))

    def _seq_positions(self) -> list[tuple[int, int]]:
        mem = self._mem
        return [(int(lib.llama_memory_seq_pos_min(mem, s)), int(lib.llama_memory_seq_pos_max(mem, s)))
                for s in range(self.n_parallel)]

    def _refresh_snapshot(self) -> None:
        used = sum(hi + 1 for _, hi in self._seq_positions() if hi >= 0)
        snap = {
            "kv_cells_used": used,
            "kv_cells_reserved": sum(r._reserve for r in self._active),
            "kv_cells_cached": sum(len(s.cached) for s in self._slots if s.req is None),
        }
        with self._cond:
            self._snapshot = snap

    def __repr__(self) -> str:
        if self._closed:
            return "<pyllm.BatchedEngine closed>"
        return f"<pyllm.BatchedEngine n_parallel={self.n_parallel} n_ctx={self.n_ctx} unified={self.kv_unified}>"
