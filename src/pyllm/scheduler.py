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

Several choices of one prompt (``BatchedEngine.submit_n``, llama-server's ``n_cmpl``): the group is
admitted at once, with a free slot for every choice, or waits whole. Its lead decodes the prompt; the
others wait in their slots until it is done and then get its cells (``KVCache.copy``). In a unified
pool those cells are shared, so the prompt is reserved once, by the lead: another choice reserves only
the cells it generates into (``Request._shared`` prompt cells are not its own); when the lead ends
first, the prompt's reservation passes to a choice still running. When the group's reservations do
not fit the pool together (a prompt longer than the share), every choice gets an equal part of the
cells beside the prompt and grows from there like any sequence. With split streams every choice holds
its own copy.

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
        else the share (at least its own prompt cells and one token); it grows from there (``grow``). A
        choice that shares its lead's prompt counts only the cells beyond it."""
        if not self.kv_unified or req._want <= self.n_ctx_share:
            return req._want
        return max(self.n_ctx_share, req.n_prompt - req._shared + 1)

    def bases(self, members: list["Request"]) -> list[int]:
        """``base`` of each choice of a group (one request: ``[base(req)]``). When they do not fit the pool
        together (a prompt longer than the share), the lead holds the prompt and every choice gets an equal
        part of the cells left beside it (at least one), growing from there."""
        b = [self.base(r) for r in members]
        if self.kv_unified and len(b) > 1 and sum(b) > self.n_ctx:
            lead = members[0]
            prompt = lead.n_prompt - lead._shared
            room = max(1, (self.n_ctx - prompt) // len(b))
            b = [prompt + min(lead._want - prompt, room)] + [min(x, room) for x in b[1:]]
        return b

    def reserved(self) -> int:
        return sum(r._reserve for r in self.active)

    def try_admit(self, req: "Request") -> Optional[list[tuple["Request", Slot, int]]]:
        """A slot for ``req`` and each choice queued with it (``Request.queued_members``), with how many of
        the prompt tokens the lead's slot holds (the others: 0, they get the lead's cells later) and their
        cells reserved (``_reserve`` set, idle caches evicted as needed); None when they must wait."""
        members = req.queued_members()
        free = self.kv.free_slots()
        if len(free) < len(members):
            return None
        slot, keep, entry = self.kv.pick(req, free)
        # the other choices' slots are overwritten by the lead's cells: empty ones first, then the oldest caches
        others = sorted((s for s in free if s is not slot), key=lambda s: (bool(s.cached), s.last_used))
        others = others[:len(members) - 1]
        bases = self.bases(members)
        if self.kv_unified:
            held = self.reserved()
            if held + sum(bases) > self.n_ctx:
                return None  # wait for running sequences to finish (or to stop growing); evict nothing yet
        for s in others:
            self.kv.trim(s, 0)  # cells held by a busy slot must be reserved: drop the cache now
        if self.kv_unified:
            self.kv.make_room(held + sum(bases), exclude=slot)
        if entry is not None:  # a longer prefix in host memory: its cells come back into the slot
            keep = self.kv.restore(slot, entry, keep)
        for m, b in zip(members, bases):
            m._reserve = b
        return [(req, slot, self.kv.trim(slot, keep))] + [(m, s, 0) for m, s in zip(members[1:], others)]

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
            members = waiting.queued_members() if waiting is not None else []
        if members and len(self.kv.free_slots()) >= len(members) and held + sum(self.bases(members)) > self.n_ctx:
            return False
        self.kv.make_room(held)
        r._reserve += 1
        return True

    def n_queued(self) -> int:
        """Requests waiting in the queue, every choice of a group counted (call under ``lock``)."""
        return sum(len(q.queued_members()) for q in self.queue)

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
            if r._pending >= 0 or r._waiting:   # generating, or waiting for its lead's prompt
                continue
            n = min(budget, r.n_prompt - r._pos)
            prefill.append((r, n))
            budget -= n
        return StepPlan(gen, prefill)
