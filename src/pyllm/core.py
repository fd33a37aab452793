"""The engine core: the one decode loop of pyllm, without threads.

``EngineCore.step()`` = schedule (``Scheduler``: admission, reservation, prefill budget), build ONE
``llama_decode`` batch (every generating sequence's next token plus prompt chunks), decode, sample
each finished row (the request's sampler chain, or an in-place argmax for plain greedy), and hand the
token to its request's output step (``Request.accept``: detokenization, stop strings, logprobs, the
token hook). Every step is recorded in the step trace (``pyllm.trace``).

Both engines drive this loop: ``BatchedEngine`` on its own thread, ``Engine`` (one slot) on the
caller's thread. All methods except ``enqueue``/``stats_snapshot`` belong to the thread that calls
``step()``.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Optional, Sequence, Union

import numpy as np

from pyllm import _runtime
from pyllm._ffi import ffi, lib
from pyllm.config import EngineConfig
from pyllm.context import Context, _install_sigint_bridge
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
from pyllm.kvcache import KVCache
from pyllm.model import Model
from pyllm.sampling import Sampler, SamplingParams, argmax_biased
from pyllm.scheduler import Scheduler
from pyllm.seqstate import PromptCache
from pyllm.sequence import MAX_TOP_LOGPROBS, Request, TokenHook, TokenLogprob, check_fits
from pyllm.trace import StepRecord, StepTrace

logger = logging.getLogger("pyllm")

__all__ = ["EngineCore"]


class EngineCore:
    """A context with ``n_parallel`` sequences and the loop that decodes them.

    ``lock``: guards the waiting queue, counters and snapshot shared with other threads.
    ``sigint_reason``: the stop reason of requests running when Ctrl-C aborts a decode ('aborted' in
    the batched engine's thread; 'interrupted' where the caller's thread runs the loop).
    """

    def __init__(self, model: Model, config: EngineConfig, *, n_parallel: int, kv_unified: bool,
                 lock: threading.Condition, sigint_reason: str = "aborted") -> None:
        self.model = model
        self.config = config
        # Created on the caller's thread (the main thread installs the Ctrl-C bridge).
        self.context = ctx = Context(
            model, n_ctx=config.n_ctx, n_batch=config.n_batch, n_ubatch=config.n_ubatch,
            n_threads=config.n_threads, n_threads_batch=config.n_threads_batch, flash_attn=config.flash_attn,
            type_k=config.kv_cache_type_k, type_v=config.kv_cache_type_v, offload_kqv=config.offload_kqv,
            n_seq_max=n_parallel, kv_unified=kv_unified,
        )
        _install_sigint_bridge()
        self.sigint_reason = sigint_reason
        self.n_parallel = ctx.n_seq_max
        self.kv_unified = kv_unified or self.n_parallel == 1
        self.n_ctx = ctx.n_ctx
        self.n_ctx_seq = ctx.n_ctx_seq
        self.n_batch = ctx.n_batch
        self.n_ubatch = ctx.n_ubatch
        # What one slot may hold while others wait for cells (the unified pool's fair share).
        self.n_ctx_share = self.n_ctx // self.n_parallel if self.kv_unified else self.n_ctx_seq
        self.n_vocab = model.n_vocab
        self._mem = ctx._memory
        self._ctx_ptr = ctx.ptr
        self._vocab = model.vocab_ptr
        self._abort_flag = ctx._abort_flag
        self._abort_flag[0] = 0
        self._batch = ctx._batch._struct
        self._sub = ffi.new("llama_batch *")
        self._piece_buf = ffi.new("char[]", 256)
        self.lock = lock
        cache_ram = getattr(config, "cache_ram_mib", None)
        host = PromptCache.from_cache_ram(cache_ram) if cache_ram else None   # None or 0: no host tier
        self.kv = KVCache(ctx, self.n_parallel, self.n_ctx, model.n_swa, host=host)
        self.kv.split_streams = not self.kv_unified
        self.scheduler = Scheduler(self.kv, n_ctx=self.n_ctx, n_ctx_share=self.n_ctx_share,
                                   kv_unified=self.kv_unified, n_batch=self.n_batch,
                                   n_prefill_generating=self.n_ubatch, lock=lock)
        self.trace = StepTrace()
        self.unfinished = 0                      # submitted, not yet finished (under lock)
        self.counters = {"requests_total": 0, "tokens_generated_total": 0, "prompt_tokens_total": 0,
                         "prompt_tokens_cached_total": 0, "steps_total": 0, "interrupted_total": 0,
                         "backend_sampling_requests_total": 0, "cpu_sampling_requests_total": 0}
        self.snapshot = {"kv_cells_used": 0, "kv_cells_reserved": 0, "kv_cells_cached": 0}
        self.closing = False
        self.dirty = False   # under lock: something changed (a submission, a free slot) that admission must see
        self.backend_sampling = bool(getattr(config, "backend_sampling", False))

    @property
    def active(self) -> list[Request]:
        return self.scheduler.active

    @property
    def queue(self):
        return self.scheduler.queue

    def close(self) -> None:
        self.context.close()

    # ---- requests ----
    def tokenize(self, text: str, *, parse_special: bool = False) -> list[int]:
        """Text to ids: BOS added as the model asks, never twice (Model.tokenize_prompt)."""
        if not isinstance(text, str):
            raise TokenizeError(f"cannot tokenize a {type(text).__name__}; expected str")
        return self.model.tokenize_prompt(text, parse_special=parse_special)

    def prompt_tokens(self, prompt: Union[str, Sequence[int]], parse_special: bool = False) -> list[int]:
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

    def make_request(self, prompt: Union[str, Sequence[int]], *, max_tokens: Optional[int], sampling: SamplingParams,
                     stop: Union[str, Sequence[str]], ignore_eos: bool, parse_special: bool,
                     logprobs: Optional[int], cache_prompt: bool, token_hook: Optional[TokenHook] = None,
                     preserved_tokens: Sequence[int] = ()) -> Request:
        """Validate a generation's arguments (ConfigError / ContextFullError naming the bad value) and
        build its Request; nothing is queued yet."""
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
        if token_hook is not None and not callable(token_hook):
            raise ConfigError(f"token_hook={token_hook!r} is not callable")
        try:
            preserved = frozenset(preserved_tokens)
        except TypeError:
            raise ConfigError(f"preserved_tokens={preserved_tokens!r}: expected a collection of token ids") from None
        if preserved:
            self.model.check_tokens(list(preserved))
        if ignore_eos:
            sampling = sampling.with_banned(self.model.eog_tokens)
        sampling.check_vocab(self.n_vocab)
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                     or not 0 <= logprobs <= MAX_TOP_LOGPROBS):
            raise ConfigError(f"logprobs={logprobs!r} is out of range; expected None or an integer in "
                              f"[0, {MAX_TOP_LOGPROBS}] (the alternatives to report per token)")
        tokens = self.prompt_tokens(prompt, parse_special)
        limit = self.n_ctx_seq
        where = "" if self.kv_unified else \
            f"n_ctx={limit} per sequence (n_ctx {self.n_ctx} / n_parallel {self.n_parallel})"
        check_fits(len(tokens), max_tokens, limit, where)
        if sampling.seed is None and self.config.seed is not None and not sampling.is_plain_greedy:
            sampling = SamplingParams(**{**sampling.__dict__, "seed": self.config.seed})
        want = len(tokens) + max_tokens if max_tokens is not None else limit
        req = Request(tokens, max_tokens, sampling, stops, ignore_eos, want, logprobs, cache_prompt, token_hook)
        req.preserved_tokens = preserved
        return req

    def check_n(self, n: int) -> None:
        """ConfigError unless ``n`` choices of one prompt can run here: 1 <= n <= n_parallel."""
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.n_parallel:
            raise ConfigError(f"n={n!r} is out of range; expected an integer in [1, n_parallel={self.n_parallel}] "
                              f"(every choice of a prompt runs in its own slot; raise n_parallel / -np for more)")

    def make_choices(self, req: Request, n: int) -> list[Request]:
        """``n`` choices of ``req``'s prompt (``req`` is choice 0, the lead): the same arguments, each its
        own sampler seed (``SamplingParams.for_choice``). The prompt is decoded once, by the lead; in a
        unified pool the others reserve only the cells they generate into. ContextFullError when the group
        could never be admitted (the prompt, and one cell for each choice, exceed the pool)."""
        self.check_n(n)
        if n == 1:
            return [req]
        group = [req] + [req.choice(i, req.sampling.for_choice(i)) for i in range(1, n)]
        for m in group:
            m._group = group
        if self.kv_unified:
            for m in group[1:]:
                m.share_prompt()
            need = sum(self.scheduler.bases(group))
            if need > self.n_ctx:
                raise ContextFullError(
                    f"n={n} choices of a prompt of {req.n_prompt} tokens need at least {need} cells at once "
                    f"(the prompt once + one per choice); they do not fit in n_ctx={self.n_ctx}; shorten the "
                    f"prompt, lower n, or raise n_ctx (-c)")
        return group

    def enqueue(self, req: Request, max_queue: Optional[int]) -> None:
        """Queue ``req`` and the choices of its group, if any (any thread); QueueFullError when they would
        take the unfinished requests beyond ``n_parallel + max_queue``."""
        n = len(req.queued_members())
        with self.lock:
            if self.closing:
                raise ClosedError("this engine is closed")
            if max_queue is not None and self.unfinished + n > self.n_parallel + max_queue:
                raise QueueFullError(
                    f"the request queue is full ({self.unfinished} requests unfinished"
                    + (f" + {n} choices" if n > 1 else "")
                    + f"; at most n_parallel {self.n_parallel} + max_queue {max_queue}); retry later"
                )
            self.unfinished += n
            self.counters["requests_total"] += n
            self.scheduler.queue.append(req)
            self.dirty = True
            self.lock.notify_all()

    # ---- the loop ----
    def step(self) -> None:
        """One step: Ctrl-C and cancellations, admissions, one decode, the sampled tokens' outputs."""
        if lib.pyllm_sigint_pending():
            self.interrupt()
        for req in [r for r in self.active if r._cancelled]:
            self.finish(req, "cancelled", free=True)
        self.admit()
        if self.active:
            self.decode_step()
        self.refresh_snapshot()
        _runtime.raise_pending()

    def admit(self) -> None:
        q = self.scheduler.queue
        while True:
            with self.lock:
                self._drop_cancelled_queued()
                if not q:
                    return
                req = q[0]
                members = req.queued_members()
            try:
                admitted = self.scheduler.try_admit(req)
                if admitted is not None:
                    self._bind_group(admitted)
            except Exception as exc:  # this request cannot start: it alone fails, and must not block the queue
                logger.exception("admitting a request failed")
                with self.lock:
                    q.remove(req)
                for m in members:
                    if not m.done:
                        self.finish_unadmitted(m, "error", error=exc)
                continue
            if admitted is None:
                return  # first come, first served: later requests wait behind the head
            with self.lock:
                q.popleft()

    def _drop_cancelled_queued(self) -> None:
        """(under lock) A cancelled request anywhere in the queue is dropped: it must not wait for a slot. A
        group whose lead was cancelled queues on behind its next choice."""
        q = self.scheduler.queue
        for req in [r for r in q if any(m._cancelled for m in r.queued_members())]:
            members = req.queued_members()
            live = [m for m in members if not m._cancelled]
            i = q.index(req)
            if live:
                q[i] = live[0]
                live[0].become_lead()
            else:
                del q[i]
            for m in members:
                if m._cancelled:
                    self.finish_unadmitted(m, "cancelled")

    def _bind_group(self, admitted: list[tuple[Request, "object", int]]) -> None:
        """Bind the lead and the choices that wait for its prompt; if one cannot start, none runs."""
        bound: list[Request] = []
        try:
            for i, (m, slot, keep) in enumerate(admitted):
                m._waiting = i > 0
                self.bind(m, slot, keep)
                bound.append(m)
        except Exception as exc:
            for m in bound:
                self.finish(m, "error", free=True, error=exc)
            raise

    def bind(self, req: Request, slot, keep: int) -> None:
        req.start(slot, keep, self.n_vocab, self.model)
        self.scheduler.active.append(req)
        # a choice's first token is sampled on the CPU from its lead's logits row
        on_device = self.backend_sampling and req._group is None and self._attach_sampler(req)
        with self.lock:
            if not req._waiting:   # a group's prompt is counted once, by its lead
                self.counters["prompt_tokens_total"] += req.n_prompt
                self.counters["prompt_tokens_cached_total"] += keep
            self.counters["backend_sampling_requests_total" if on_device else "cpu_sampling_requests_total"] += 1

    def _attach_sampler(self, req: Request) -> bool:
        """Backend sampling: the request's chain (a greedy chain for plain greedy) runs in the decode graph
        when llama.cpp can run every sampler of it there and nothing needs the logits row (logprobs);
        otherwise it samples on the CPU (the fallback, per request, counted in stats())."""
        if req.n_logprobs is not None or not req.sampling.backend_capable:
            return False
        if req._sampler is None:
            req._sampler, req._bias = Sampler(req.sampling, self.n_vocab), None
        if not lib.llama_set_sampler(self._ctx_ptr, req._slot.seq, req._sampler.ptr):
            return False
        req._on_device = True
        return True

    def decode_step(self, generate: bool = True) -> None:
        """One llama_decode of the scheduler's plan; then each finished row's token is sampled."""
        t0 = time.perf_counter_ns()
        plan = self.scheduler.plan(generate)
        b, sub = self._batch, self._sub
        rows: list[tuple[Request, int]] = []
        leads: list[tuple[Request, int]] = []   # groups whose prompt ends in this batch
        i = 0
        for r in plan.gen:
            b.token[i] = r._pending
            b.pos[i] = r._pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = r._slot.seq
            b.logits[i] = 1
            rows.append((r, i))
            i += 1
        for r, n in plan.prefill:
            last = r._pos + n == r.n_prompt
            sub.token, sub.pos, sub.n_seq_id = b.token + i, b.pos + i, b.n_seq_id + i
            sub.seq_id, sub.logits = b.seq_id + i, b.logits + i
            chunk = r._arr[r._pos: r._pos + n]
            lib.pyllm_batch_fill(sub, ffi.from_buffer("llama_token[]", chunk), n, r._pos, r._slot.seq, last, -1)
            if last:
                rows.append((r, i + n - 1))
                if r._group is not None:
                    leads.append((r, i + n - 1))
            i += n
        if i == 0:
            return
        b.n_tokens = i
        td = time.perf_counter_ns()
        rc = lib.llama_decode(self._ctx_ptr, b[0])
        decode_ns = time.perf_counter_ns() - td
        self.kv.copies_pending.clear()   # applied at the start of any decode, even one that fails
        if rc != 0:
            self._decode_failed(rc, plan)
            # Ctrl-C that landed in a Python callback during the decode (the log callback) is re-raised
            # here, after the batch was rolled back; only the main thread ever gets one.
            _runtime.raise_pending()
            return
        for r in plan.gen:
            r._slot.cached.append(r._pending)
            r._pos += 1
        t_prefill = time.perf_counter_ns()
        for r, n in plan.prefill:
            r._slot.cached.extend(r.prompt_tokens[r._pos: r._pos + n])
            r._pos += n
            r._t_prefill = t_prefill
            if r.report_progress and r._pos < r.n_prompt:
                r._publish()   # wakes prompt_progress(); the last chunk's wake-up is its first token
        for lead, idx in leads:
            rows.extend((c, idx) for c in self._start_choices(lead))
        n_gen = 0
        ctx_ptr, n_vocab = self._ctx_ptr, self.n_vocab
        for r, idx in rows:
            if r.max_tokens == 0:  # the prompt only: decoded into the cache, nothing sampled
                self.finish(r, "max_tokens")
                continue
            try:
                if r._on_device:
                    token = int(lib.llama_get_sampled_token_ith(ctx_ptr, idx))
                    if token == lib.LLAMA_TOKEN_NULL:
                        raise DecodeError(f"backend sampling gave no token for batch row {idx}")
                    lib.llama_sampler_accept(r._sampler.ptr, token)
                elif r._sampler is None and r._bias is not None:
                    token = argmax_biased(lib.llama_get_logits_ith(ctx_ptr, idx), n_vocab, r._bias)
                elif r._sampler is None:
                    token = int(lib.pyllm_argmax_logits(ctx_ptr, idx, n_vocab))
                elif r._sampler._grammar is not None:   # the checked path: GrammarError, never an abort
                    token = r._sampler.sample(self.context, idx)
                else:
                    token = int(lib.llama_sampler_sample(r._sampler.ptr, ctx_ptr, idx))
                lp = self.logprob(idx, token, r.n_logprobs) if r.n_logprobs is not None else None
                before = len(r.token_ids)
                reason = r.accept(token, self.piece(token, token in r.preserved_tokens), bool(lib.llama_vocab_is_eog(self._vocab, token)), lp)
                n_gen += len(r.token_ids) - before
                if reason is None and r._pos - r._shared >= r._reserve and not self.scheduler.grow(r):
                    reason = "context_full"
                if reason is not None:
                    self.finish(r, reason, free=reason == "cancelled")
            except Exception as exc:
                self.finish(r, "error", free=True, error=exc)
        with self.lock:
            self.counters["steps_total"] += 1
            self.counters["tokens_generated_total"] += n_gen
        self.trace.record(StepRecord(t0, time.perf_counter_ns() - t0, decode_ns, len(plan.gen), plan.n_prompt,
                                     len(plan.gen) + len(plan.prefill)))

    def _start_choices(self, lead: Request) -> list[Request]:
        """The lead's prompt is done: the choices waiting for it get its cells (llama_memory_seq_cp; with
        split streams llama.cpp copies the stream at the next decode, before that batch is placed) and
        sample their first token from the lead's logits row (llama-server's copy_state_to)."""
        started = []
        for c in lead._group:
            if c._waiting and c._slot is not None:
                self.kv.copy(lead._slot, c._slot)
                c._waiting, c._copied = False, True
                c._pos = c._n_cached = lead._pos
                started.append(c)
        return started

    def _decode_failed(self, rc: int, plan) -> None:
        # Ubatches that ran before a failure stay in memory: roll every sequence of the batch back.
        for r in plan.gen + [r for r, _ in plan.prefill]:
            lib.llama_memory_seq_rm(self._mem, r._slot.seq, r._pos, -1)
        if rc == 2:
            if self.closing:
                return  # close(): the loop ends and cancels everything
            self.interrupt()
            return
        try:
            check_decode(rc, f"batch of {self._batch.n_tokens} tokens over {len(self.active)} sequences")
        except NoKVSlotError as exc:
            # Fragmented or sliding-window cells: let the youngest sequence of the batch go, the rest continue.
            self.finish(next(r for r in reversed(self.active) if not r._waiting), "error", free=True, error=exc)
            self.kv.evict_idle()
        except DecodeError as exc:
            self.fail_all(exc)

    def interrupt(self, reason: Optional[str] = None) -> None:
        """Ctrl-C (or an abort): the running requests end ('aborted', or ``sigint_reason``); the engine
        stays usable. Their cells are freed (a decode may have stopped half-way)."""
        lib.pyllm_sigint_clear()
        self._abort_flag[0] = 0
        if self.active:
            with self.lock:
                self.counters["interrupted_total"] += 1
        for r in list(self.active):
            self.finish(r, reason or self.sigint_reason, free=True)

    def fail_all(self, exc: BaseException) -> None:
        for r in list(self.active):
            self.finish(r, "error", free=True, error=exc)
        self.kv.clear_all()

    def finish(self, r: Request, reason: str, *, free: bool = False, error: Optional[BaseException] = None) -> None:
        """End a running request (nothing when it has ended already: a group's choices end together).

        One of several choices: its cells are dropped (the lead's copy; llama-server keeps only the
        parent's cells too) unless it decoded the prompt itself. A lead that ends while its prompt is still
        being decoded: when it was cancelled, the next waiting choice takes its slot and goes on with the
        prompt; on any other end (error, abort, Ctrl-C) the waiting choices end with it, for the same reason.
        A lead that ends after its prompt passes the prompt's reservation to a choice still running."""
        if r._done:
            return
        waiting: list[Request] = []
        if r._group is not None and not r._waiting:
            waiting = [m for m in r._group if m._waiting and m._slot is not None]
            heir = next((m for m in waiting if not m._cancelled), None) if reason == "cancelled" else None
            if heir is not None:
                self._take_over(r, heir)
                waiting = []
            elif not waiting and self.kv_unified and r._shared == 0:
                survivor = next((m for m in r._group if m is not r and m._slot is not None), None)
                if survivor is not None:
                    survivor.become_lead()
        slot = r._slot
        if r._on_device:  # detach the chain before it is freed
            lib.llama_set_sampler(self._ctx_ptr, slot.seq if slot is not None else r.seq_id, ffi.NULL)
            r._on_device = False
        if slot is not None:
            self.kv.release(slot, keep_cells=not free and r.cache_prompt and not r._copied)
            r._slot = None
        if r in self.active:
            self.active.remove(r)
        r._pending = -1
        r._waiting = False
        self.refresh_snapshot()  # before the result is published: a caller that waited sees stats() after it
        with self.lock:
            self.unfinished -= 1
            self.dirty = True    # a slot and cells are free: the queue's head may fit now
        r.finish(reason, error)
        for m in waiting:
            self.finish(m, reason, free=True, error=error)

    def _take_over(self, lead: Request, heir: Request) -> None:
        """A lead cancelled during its prompt: ``heir`` takes its slot, with the prompt cells decoded so far
        (counted as cached for it), and decodes the rest; the heir's own slot, still empty, is freed."""
        slot = lead._slot
        self.kv.release(heir._slot, keep_cells=False)
        heir._slot, slot.req, lead._slot = slot, heir, None
        heir.seq_id = slot.seq
        heir._pos = heir._n_cached = lead._pos
        heir.become_lead()

    def finish_unadmitted(self, r: Request, reason: str, error: Optional[BaseException] = None) -> None:
        if r._done:
            return
        with self.lock:
            self.unfinished -= 1
        r.finish(reason, error)

    def cancel_all(self) -> None:
        """Close: everything running or queued ends as 'cancelled'."""
        with self.lock:
            self.closing = True
            queued = [m for q in self.scheduler.queue for m in q.queued_members()]
            self.scheduler.queue.clear()
        for req in list(self.active):
            self.finish(req, "cancelled", free=True)
        for req in queued:
            self.finish_unadmitted(req, "cancelled")

    # ---- tokens and logits ----
    def piece(self, token: int, special: bool = False) -> bytes:
        """The token's text as bytes; a control token is empty unless ``special`` (then its own text)."""
        buf = self._piece_buf
        n = lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        if n < 0:
            self._piece_buf = buf = ffi.new("char[]", -n)
            n = lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        return ffi.unpack(buf, n)

    def logprob(self, idx: int, token: int, k: int) -> TokenLogprob:
        """The log-softmax of batch row ``idx``'s logits at ``token``, and its top k."""
        n_vocab = self.n_vocab
        row = np.frombuffer(ffi.buffer(lib.llama_get_logits_ith(self._ctx_ptr, idx), 4 * n_vocab), dtype=np.float32)
        peak = float(row.max())
        lse = peak + float(np.log(np.exp(row - peak, dtype=np.float64).sum()))
        top: tuple = ()
        if k:
            ids = np.argpartition(row, n_vocab - k)[n_vocab - k:]
            ids = ids[np.argsort(-row[ids], kind="stable")]
            top = tuple((int(t), self.piece(int(t)), float(row[t]) - lse) for t in ids)
        return TokenLogprob(token, self.piece(token), float(row[token]) - lse, top)

    # ---- reporting ----
    def refresh_snapshot(self) -> None:
        snap = {
            "kv_cells_used": self.kv.cells_used(),
            "kv_cells_reserved": self.scheduler.reserved(),
            "kv_cells_cached": self.kv.idle_cells(),
        }
        with self.lock:
            self.snapshot = snap

    def stats_snapshot(self) -> dict:
        """Counters, KV occupancy and the step trace's sums (any thread)."""
        with self.lock:
            out = {
                "n_parallel": self.n_parallel, "n_ctx": self.n_ctx, "n_ctx_seq": self.n_ctx_seq,
                "n_ctx_share": self.n_ctx_share, "kv_unified": self.kv_unified,
                "active": self.unfinished - self.scheduler.n_queued(), "queued": self.scheduler.n_queued(),
            }
            out.update(self.snapshot)
            out.update(self.counters)
        out["swa_cache_misses_total"] = self.kv.swa_cache_misses
        out.update(self.kv.host_stats())
        out.update(self.trace.totals())
        return out

    # ---- llama-batched-bench's two phases ----
    def run_together(self, reqs: list[Request], shared: bool) -> tuple[int, int]:
        """Admit ``reqs`` at once (every prompt decoded first, then lock-step generation); returns
        (prompt_ns, gen_ns). See BatchedEngine.run_together."""
        if self.active:
            raise ConfigError(f"run_together needs an idle engine; {len(self.active)} requests are running")
        self.kv.evict_idle()
        slots = self.kv.slots
        try:
            first = reqs[0]
            for r, slot in zip(reqs[:1] if shared else reqs, slots):
                self.bind(r, slot, 0)
            t0 = time.perf_counter_ns()
            while any(r._slot is not None and r._pending < 0 for r in reqs):
                self.decode_step(generate=False)
            t1 = time.perf_counter_ns()
            if shared and first._slot is not None:
                n = first.n_prompt
                for r, slot in zip(reqs[1:], slots[1:]):
                    self.kv.copy(first._slot, slot)
                    self.bind(r, slot, n)
                    reason = r.accept(first._pending, self.piece(first._pending), False)  # the shared first token
                    with self.lock:
                        self.counters["tokens_generated_total"] += 1
                    if reason is not None:
                        self.finish(r, reason)
                if not self.kv_unified and len(reqs) > 1:
                    self._apply_copies(first, n)
                t1 = time.perf_counter_ns()
            while any(r._slot is not None for r in reqs):
                self.decode_step()
            t2 = time.perf_counter_ns()
        finally:
            for r in reqs:
                if r._slot is not None:  # an exception above: nothing of this run stays admitted
                    self.finish(r, "error", free=True)
            self.refresh_snapshot()
        return t1 - t0, t2 - t1

    def _apply_copies(self, first: Request, n: int) -> None:
        """Split KV streams copy sequences on the next decode: run one dummy token (llama-batched-bench)."""
        b = self._batch
        b.token[0], b.pos[0], b.n_seq_id[0], b.seq_id[0][0], b.logits[0] = first._pending, n, 1, first._slot.seq, 1
        b.n_tokens = 1
        rc = lib.llama_decode(self._ctx_ptr, b[0])
        self.kv.copies_pending.clear()
        check_decode(rc, "the dummy token that applies the KV copies")
        lib.llama_memory_seq_rm(self._mem, first._slot.seq, n, -1)

    def apply_pending_copies(self) -> None:
        """Split streams: apply the KV copies still pending (``KVCache.copies_pending``) now, with one token
        decoded into a pending sequence past its cells and removed again, so that a state can be written
        into one of those streams (a saved session restored into an idle slot between two steps)."""
        if not self.kv.copies_pending:
            return
        slot = self.kv.slots[min(self.kv.copies_pending)]
        n = len(slot.cached)
        b = self._batch
        b.token[0], b.pos[0], b.n_seq_id[0], b.seq_id[0][0], b.logits[0] = 0, n, 1, slot.seq, 1
        b.n_tokens = 1
        rc = lib.llama_decode(self._ctx_ptr, b[0])
        self.kv.copies_pending.clear()
        lib.llama_memory_seq_rm(self._mem, slot.seq, n, -1)
        check_decode(rc, "the token that applies pending KV copies")
