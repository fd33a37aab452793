"""Which requests run, with how many cells, and how many prompt tokens each adds this step.

Admission (first come, first served): the head of the queue starts when a slot is free and its cells
can be reserved next to the reservations of the running sequences and the cells held by idle prefix
caches (the KV cache evicts the least recently used idle caches to make room).

KV reservation (unified KV, the default): the pool has ``n_ctx`` cells shared by all sequences, and
each of the ``n_parallel`` slots has a share of ``n_ctx_share = n_ctx // n_parallel`` of them. A
request reserves ``n_prompt + max_tokens`` cells when that is within the share, else the share (or
its prompt + 1, for a prompt longer than the share). A sequence that wants more than its share takes
further cells one at a time while they are free and no waiting request needs them; when one does, the
sequence ends there (``context_full``). So one long request runs alone as far as the pool allows,
but it never keeps the other slots' requests waiting for more than one step, and nothing in the cache
is ever truncated. With ``kv_unified=False`` every sequence has its own ``n_ctx / n_parallel`` cells
(llama.cpp's split streams) and only a free slot is needed.

Step plan: every generating sequence's next token first (running requests first, as vLLM's
scheduler), then prompt chunks in admission order, up to ``n_batch`` tokens in all; while any
sequence is generating, prompt tokens are capped by ``n_prefill_generating`` (default ``n_ubatch``)
so a long prompt does not stall the streams.
"""
from __future__ import annotations

import collections
import threading
from typing import TYPE_CHECKING, Optional

from pyllm.kvcache import KVCache, Slot

if TYPE_CHECKING:
    from pyllm.sequence import Request

__all__ = ["Scheduler", "StepPlan"]


class StepPlan:
    """One step's batch: the generating requests (one token each) and prompt chunks ``(request, n)``."""

    __slots__ = ("gen", "prefill")

    def __init__(self, gen: list["Request"], prefill: list[tuple["Request", int]]) -> None:
        self.gen = gen
        self.prefill = prefill

    @property
    def n_prompt(self) -> int:
        return sum(n for _, n in self.prefill)

    def __bool__(self) -> bool:
        return bool(self.gen or self.prefill)


class Scheduler:
    """The waiting queue (shared with submitting threads under ``lock``) and the running requests
    (engine thread only)."""

    def __init__(self, kv: KVCache, *, n_ctx: int, n_ctx_share: int, kv_unified: bool, n_batch: int,
                 n_prefill_generating: int, lock: threading.Condition) -> None:
        self.kv = kv
        self.n_ctx = n_ctx
        self.n_ctx_share = n_ctx_share
        self.kv_unified = kv_unified
        self.n_batch = n_batch
        self.n_prefill_generating = n_prefill_generating
        self.lock = lock
        self.queue: collections.deque["Request"] = collections.deque()   # under lock
        self.active: list["Request"] = []                                # admitted, in admission order

    # ---- reservation ----
    def base(self, req: "Request") -> int:
        """The cells reserved for a request at admission: all it may need when that is within the share,
        else the share (at least its prompt and one token); it grows from there (``grow``)."""
        if not self.kv_unified or req._want <= self.n_ctx_share:
            return req._want
        return max(self.n_ctx_share, req.n_prompt + 1)

    def reserved(self) -> int:
        return sum(r._reserve for r in self.active)

    def try_admit(self, req: "Request") -> Optional[tuple[Slot, int]]:
        """A slot for ``req`` and how many of its prompt tokens it holds, with its cells reserved
        (``req._reserve`` set, idle caches evicted as needed); None when it must wait."""
        free = self.kv.free_slots()
        if not free:
            return None
        slot, keep, entry = self.kv.pick(req, free)
        base = self.base(req)
        if self.kv_unified:
            held = self.reserved()
            if held + base > self.n_ctx:
                return None  # wait for running sequences to finish (or to stop growing); evict nothing yet
            self.kv.make_room(held + base, exclude=slot)
        if entry is not None:  # a longer prefix in host memory: its cells come back into the slot
            keep = self.kv.restore(slot, entry, keep)
        req._reserve = base
        return slot, self.kv.trim(slot, keep)

    def grow(self, r: "Request") -> bool:
        """One more cell for a running sequence that has filled its reservation and may hold more (its
        max_tokens goes beyond its share of the unified pool). Granted while the cell is free and no
        waiting request needs it: a request that waits for cells with a slot free ends the growth, so one
        long request cannot keep the others waiting."""
        if not self.kv_unified or r._reserve >= r._want:
            return False
        held = self.reserved() + 1
        if held > self.n_ctx:
            return False
        with self.lock:
            waiting = next((q for q in self.queue if not q._cancelled), None)
        if waiting is not None and self.kv.free_slots() and held + self.base(waiting) > self.n_ctx:
            return False
        self.kv.make_room(held)
        r._reserve += 1
        return True

    # ---- the step ----
    def plan(self, generate: bool = True) -> StepPlan:
        """This step's batch: each generating sequence's next token (unless ``generate`` is False, as in
        run_together's prompt phase), then prompt chunks under the budget."""
        gen = [r for r in self.active if r._pending >= 0] if generate else []
        budget = self.n_batch - len(gen)
        if gen:
            budget = min(budget, self.n_prefill_generating)
        prefill = []
        for r in self.active:
            if budget <= 0:
                break
            if r._pending >= 0:
                continue
            n = min(budget, r.n_prompt - r._pos)
            prefill.append((r, n))
            budget -= n
        return StepPlan(gen, prefill)
