"""Continuous batching: many sequences in one llama.cpp context, decoded by one loop on one thread.

``BatchedEngine`` runs the engine core (``pyllm.core``: the one decode loop; ``pyllm.scheduler``:
admission, KV reservation and the prefill budget; ``pyllm.kvcache``: slots and idle prefix caches;
``pyllm.sequence``: each request's sampling and output) on a background thread that is the only code
touching the context (llama.cpp contexts are not thread-safe). Callers ``submit()`` prompts from any
thread and get a ``Request`` to iterate (blocking or ``async for``), ``cancel()`` or ``wait()`` on.
Each step is ONE ``llama_decode`` batch: the next token of every generating sequence plus prompt
chunks of newly admitted ones (see ``pyllm.scheduler`` for the KV accounting and the budget).
``submit_n()`` asks for several choices of one prompt (OpenAI's ``n``): the prompt is decoded once and
its cells are copied to the other choices' sequences, as llama-server does for ``n_cmpl``.
"""
from __future__ import annotations

import atexit
import os
import concurrent.futures
import logging
import threading
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Optional, Sequence, Union

from pyllm._ffi import lib
from pyllm.config import EngineConfig, check_bool, check_int
from pyllm.context import KVCacheBytes
from pyllm.core import EngineCore
from pyllm.errors import ClosedError, ConfigError, ContextFullError, DecodeError
from pyllm.loading import load_model
from pyllm.model import Model
from pyllm.sampling import SamplingParams
from pyllm.seqstate import load_sequence_file, save_sequence_file
from pyllm.sequence import GREEDY, MAX_TOP_LOGPROBS, GenerationResult, Request, TokenHook, TokenLogprob
from pyllm.trace import StepRecord

logger = logging.getLogger("pyllm")

__all__ = ["MAX_TOP_LOGPROBS", "BatchRun", "BatchedEngine", "Request", "TokenLogprob"]


@dataclass
class BatchRun:
    """What ``BatchedEngine.run_together`` measured: one result per sequence and the two phases' times."""

    results: list[GenerationResult]
    prompt_ns: int     # every prompt decoded and each sequence's first token sampled
    gen_ns: int        # the lock-step generation after it


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
        self._cond = threading.Condition()
        try:
            self._core = core = EngineCore(model, config, n_parallel=config.n_parallel,
                                           kv_unified=config.kv_unified, lock=self._cond)
        except BaseException:
            if self._owns_model:
                model.close()
            raise
        self.context = core.context
        self.n_parallel = core.n_parallel
        self.kv_unified = core.kv_unified
        self.n_ctx = core.n_ctx
        self.n_ctx_seq = core.n_ctx_seq
        self.n_batch = core.n_batch
        self.n_ubatch = core.n_ubatch
        self.n_ctx_share = core.n_ctx_share
        self._calls: list[tuple[Callable[[], object], concurrent.futures.Future]] = []
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="pyllm-batched", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    # ---- lifetime ----
    def close(self) -> None:
        """Cancel queued and running requests, stop the engine thread, free native memory. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = self._core.closing = True
            self._cond.notify_all()
        lib.pyllm_abort_set(self._core._abort_flag, 1)   # a decode in progress stops at its next graph node
        if threading.current_thread() is not self._thread:
            self._thread.join()
        atexit.unregister(self.close)
        self._core.close()
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
        return self._core.tokenize(text, parse_special=parse_special)

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
        token_hook: Optional[TokenHook] = None,
        preserved_tokens: Sequence[int] = (),
    ) -> Request:
        """Queue a generation; thread-safe. Returns at once with a Request.

        ``prompt``: text (tokenized with BOS, never a second one; ``parse_special=True`` for
        chat-rendered text) or token ids. ``max_tokens``: at most this many tokens (0: the prompt is only
        decoded into the cache); ``None`` generates until end-of-generation or the sequence's limit.
        Beyond ``n_ctx_share`` cells (prompt included) a request in the unified pool runs only while no
        waiting request needs those cells, else it ends as ``context_full`` (see ``pyllm.scheduler``).
        ``ignore_eos``: end-of-generation tokens are never sampled (a -inf logit bias on each, as
        llama.cpp's --ignore-eos). ``cache_prompt``: None for the engine's setting; False: no cached
        prefix is reused and this request's cells are freed, not kept, when it ends.
        ``logprobs``: None, or k in [0, 20]: ``Request.logprobs`` then gets each generated token's
        TokenLogprob with its k most likely alternatives (read from the logits row in the engine thread).
        ``token_hook``: called on the engine thread for each generated token (``pyllm.sequence.TokenHook``).
        ``preserved_tokens``: control-token ids whose text stays in the output (llama-server's
        ``preserved_tokens``, e.g. ``<tool_call>`` for a tool-call parser); other control tokens have no text.
        Raises ConfigError (bad arguments), ContextFullError (can never fit one sequence), QueueFullError
        (``n_parallel + max_queue`` requests unfinished), ClosedError.
        """
        return self._submit(prompt, 1, max_tokens=max_tokens, sampling=sampling, stop=stop, ignore_eos=ignore_eos,
                            parse_special=parse_special, logprobs=logprobs, cache_prompt=cache_prompt,
                            token_hook=token_hook, preserved_tokens=preserved_tokens)[0]

    def submit_n(
        self,
        prompt: Union[str, Sequence[int]],
        n: int,
        *,
        max_tokens: Optional[int] = 128,
        sampling: SamplingParams = GREEDY,
        stop: Union[str, Sequence[str]] = (),
        ignore_eos: bool = False,
        parse_special: bool = False,
        logprobs: Optional[int] = None,
        cache_prompt: Optional[bool] = None,
        token_hook: Optional[TokenHook] = None,
        preserved_tokens: Sequence[int] = (),
    ) -> list[Request]:
        """Queue ``n`` choices of one prompt (OpenAI's ``n``, llama-server's ``n_cmpl``); thread-safe.
        Returns at once with ``n`` Requests, choice ``i`` at index i (``Request.index == i``); each is
        iterated, cancelled and waited on by itself. The keyword arguments are submit()'s, for every choice.

        The prompt is decoded once, by choice 0 (the lead); when it is done its cells are copied to the
        other choices' sequences (``llama_memory_seq_cp``: shared cells in a unified pool, a copy of the
        stream with ``kv_unified=False``) and each samples its first token from the lead's last logits row
        with its own sampler chain, then generates on its own (stop strings, max_tokens, logprobs,
        token_hook, cancellation). Seeds: a set ``sampling.seed`` (or the engine's seed) becomes
        ``(seed + i) % 0xFFFFFFFF`` for choice i, so the choices differ and a run is reproducible
        (``SamplingParams.for_choice``); greedy choices are all the same. The choices are admitted together
        (``n`` free slots, their cells reserved; the prompt once in a unified pool) or wait together.
        Cancelling a choice ends only it and frees only its cells; cancelling the lead while its prompt is
        decoding hands the prompt, decoded so far, to the next choice, which carries on. The prompt is
        counted once in stats() (``prompt_tokens_total``); a copied choice's result reports it as cached
        (``n_prompt_cached``). Choices other than the lead keep no prefix cache when they end (as
        llama-server); they sample on the CPU (no backend sampling: their first token comes from the
        lead's row). ``token_hook`` is called for every choice's tokens (its first argument, the Request,
        tells them apart).

        Raises ConfigError (``n`` not an integer in [1, n_parallel], or submit()'s), ContextFullError (the
        prompt and a cell per choice exceed the pool), QueueFullError (the ``n`` would take the unfinished
        requests beyond ``n_parallel + max_queue``), ClosedError.
        """
        return self._submit(prompt, n, max_tokens=max_tokens, sampling=sampling, stop=stop, ignore_eos=ignore_eos,
                            parse_special=parse_special, logprobs=logprobs, cache_prompt=cache_prompt,
                            token_hook=token_hook, preserved_tokens=preserved_tokens)

    def _submit(self, prompt, n: int, *, max_tokens, sampling, stop, ignore_eos, parse_special, logprobs,
                cache_prompt, token_hook, preserved_tokens=()) -> list[Request]:
        if self._closed:
            raise ClosedError("this BatchedEngine is closed")
        self._core.check_n(n)
        if cache_prompt is not None and not isinstance(cache_prompt, bool):
            raise ConfigError(f"cache_prompt={cache_prompt!r} is not a bool; expected True, False or None")
        req = self._core.make_request(
            prompt, max_tokens=max_tokens, sampling=sampling, stop=stop, ignore_eos=ignore_eos,
            parse_special=parse_special, logprobs=logprobs,
            cache_prompt=self.cache_prompt if cache_prompt is None else cache_prompt, token_hook=token_hook,
            preserved_tokens=preserved_tokens)
        req._wake = self._wake
        reqs = self._core.make_choices(req, n)
        try:
            self._core.enqueue(req, self.max_queue)
        except ClosedError:
            raise ClosedError("this BatchedEngine is closed") from None
        self._wake()
        return reqs

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
        core = self._core
        toks = [core.prompt_tokens(p, False) for p in prompts]
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
        # ignore_eos without the bias: an end-of-generation token is sampled and decoded like any other
        # (llama-batched-bench decodes without looking at the tokens; the plain argmax stays in C).
        reqs = [Request(t, max_tokens, GREEDY, [], True, len(t) + max_tokens - 1) for t in toks]
        with self._cond:
            core.unfinished += n_seq
            core.counters["requests_total"] += n_seq
        try:
            prompt_ns, gen_ns = self._call(lambda: core.run_together(reqs, shared_prompt), timeout=None)
        finally:
            for r in reqs:
                if not r.done:  # the engine closed before the call ran
                    core.finish_unadmitted(r, "cancelled")
        for r in reqs:
            res = r.result
            if res is not None and res.stop_reason == "aborted":
                raise KeyboardInterrupt
            if res is None or res.stop_reason != "max_tokens":
                raise DecodeError(f"run_together: sequence {r.seq_id} ended with "
                                  f"{res.stop_reason if res else 'no result'} after {len(r.token_ids)} tokens"
                                  + (f": {res.error}" if res is not None and res.error else ""))
        return BatchRun([r.result for r in reqs], prompt_ns=prompt_ns, gen_ns=gen_ns)

    # ---- reporting ----
    def stats(self) -> dict:
        """Counters, KV occupancy and the step trace's sums. ``kv_cells_used`` comes from llama.cpp's
        memory API (per sequence ``llama_memory_seq_pos_max + 1``), read by the engine thread after every
        step and state change. ``step_seconds_total`` / ``decode_seconds_total`` / ``python_seconds_total``:
        wall time of the engine's steps, the part inside ``llama_decode``, the rest (``pyllm.trace``)."""
        out = self._core.stats_snapshot()
        out["max_queue"] = self.max_queue
        return out

    def step_trace(self, n: int = 0) -> list[StepRecord]:
        """The last ``n`` engine steps (all kept, up to 4,096, when 0): StepRecord(t_ns, wall_ns,
        decode_ns, n_gen, n_prompt, n_seqs), oldest first."""
        return self._core.trace.recent(n)

    def step_histograms(self) -> dict:
        """Step wall-time and tokens-per-step histograms (``pyllm.trace.StepTrace.histograms``)."""
        return self._core.trace.histograms()

    def seq_positions(self) -> list[tuple[int, int]]:
        """(pos_min, pos_max) of every sequence as llama.cpp's memory reports them ((-1, -1): empty),
        read on the engine thread between two steps."""
        return self._call(self._core.kv.seq_positions)

    def drop_cache(self) -> int:
        """Free the cells of every idle prefix cache; returns how many cells were freed (stats() shows it
        at once)."""
        def drop() -> int:
            freed = self._core.kv.evict_idle()
            self._core.refresh_snapshot()
            return freed

        return self._call(drop)

    # ---- saved sessions (llama-server's slot save / restore / erase) ----
    def save_sequence(self, slot_id: int, path) -> dict:
        """Write slot ``slot_id``'s cached cells and tokens to ``path`` (``pyllm.seqstate`` state file: a
        temporary name, then renamed). Returns ``{"id_slot", "filename", "n_saved", "n_written"}`` (tokens,
        file bytes). The slot must be idle: ConfigError while a request runs in it (save after it ends)."""
        def save():
            slot = self._idle_slot(slot_id, "save")
            if not slot.cached:
                raise ConfigError(f"slot {slot_id} holds no tokens; nothing to save")
            save_sequence_file(self.context, slot.seq, slot.cached, path)
            return {"id_slot": slot_id, "filename": os.path.basename(os.fspath(path)), "n_saved": len(slot.cached),
                    "n_written": os.path.getsize(path)}

        return self._call(save, timeout=None)

    def restore_sequence(self, slot_id: int, path) -> dict:
        """Load a state file from :meth:`save_sequence` into idle slot ``slot_id`` (its cells then serve as
        that slot's prefix cache). A file from another model, KV type, layout or build, truncated or corrupt
        is refused (SequenceStateError / IncompatibleStateError) before llama.cpp reads it; the slot is then
        left as it was. Returns ``{"id_slot", "filename", "n_restored", "n_read"}``."""
        def restore():
            slot = self._idle_slot(slot_id, "restore")
            if slot.seq in self._core.kv.copies_pending:   # a group's copy into or out of it is not applied yet
                self._core.apply_pending_copies()
            tokens = load_sequence_file(self.context, slot.seq, path)
            slot.cached = list(tokens)
            self._core.refresh_snapshot()
            return {"id_slot": slot_id, "filename": os.path.basename(os.fspath(path)), "n_restored": len(tokens),
                    "n_read": os.path.getsize(path)}

        return self._call(restore, timeout=None)

    def erase_sequence(self, slot_id: int) -> dict:
        """Free idle slot ``slot_id``'s cells. Returns ``{"id_slot", "n_erased"}``."""
        def erase():
            slot = self._idle_slot(slot_id, "erase")
            n = self._core.kv.clear(slot)
            self._core.refresh_snapshot()
            return {"id_slot": slot_id, "n_erased": n}

        return self._call(erase)

    def slots(self) -> list[dict]:
        """Per slot: ``id``, ``is_processing``, ``n_cached`` (tokens its cells hold), ``id_task`` (the running
        request's id or -1), read on the engine thread between two steps."""
        def read():
            return [{"id": s.seq, "is_processing": s.req is not None, "n_cached": len(s.cached),
                     "id_task": s.req.id if s.req is not None else -1} for s in self._core.kv.slots]

        return self._call(read)

    def _idle_slot(self, slot_id, action: str):
        check_int("slot id", slot_id, minimum=0, maximum=self.n_parallel - 1, what=f" (n_parallel {self.n_parallel})")
        slot = self._core.kv.slots[slot_id]
        if slot.req is not None:
            raise ConfigError(f"slot {slot_id} is processing a request; {action} it once the request has ended")
        return slot

    # ---- calls into the engine thread ----
    def _wake(self) -> None:
        with self._cond:
            self._core.dirty = True
            self._cond.notify_all()

    def _call(self, fn: Callable[[], object], timeout: Optional[float] = 60.0):
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._core.closing:
                raise ClosedError("this BatchedEngine is closed")
            self._calls.append((fn, fut))
            self._core.dirty = True
            self._cond.notify_all()
        return fut.result(timeout)

    # ---- the engine thread ----
    def _loop(self) -> None:
        core = self._core
        try:
            while True:
                with self._cond:
                    while not core.closing and not core.dirty and not core.active:
                        self._cond.wait()
                    if core.closing:
                        break
                    core.dirty = False
                    calls, self._calls = self._calls, []
                for fn, fut in calls:
                    try:
                        fut.set_result(fn())
                    except BaseException as exc:  # handed to the caller
                        fut.set_exception(exc)
                try:
                    core.step()
                except Exception as exc:  # a bug here must not leave callers waiting forever
                    logger.exception("batched engine step failed; failing the running requests")
                    core.fail_all(exc)
        finally:
            with self._cond:
                core.closing = True
                calls, self._calls = self._calls, []
            for fn, fut in calls:
                fut.set_exception(ClosedError("this BatchedEngine is closed"))
            core.cancel_all()

    def __repr__(self) -> str:
        if self._closed:
            return "<pyllm.BatchedEngine closed>"
        return f"<pyllm.BatchedEngine n_parallel={self.n_parallel} n_ctx={self.n_ctx} unified={self.kv_unified}>"
