"""The KV cells of one context, per sequence: slots, idle prefix caches, eviction.

A context with ``n_seq_max = n_parallel`` has one llama.cpp sequence id per slot. A slot's cells
outlive the request that filled them: an idle slot is a prefix cache that a later request with the
same leading tokens reuses instead of decoding them again (as llama-server's ``cache_prompt``). When
cells are needed the least recently used idle caches are evicted. Everything here goes through
llama.cpp's memory API (``llama_memory_seq_*``); the token lists are this module's record of what
each sequence's cells hold. Used by the one thread that runs the engine core.

Host-memory tier (``--cache-ram``, llama-server's prompt cache): with a ``PromptCache``, a slot's cells
are copied to host memory (``llama_state_seq_get_data_ext``) before they are dropped (an idle cache
evicted, or a slot's suffix cut for another prompt), keyed by the tokens they hold; a request whose
prompt starts with a cached entry's tokens (token for token, the whole entry) has that state restored
into a free slot (``llama_state_seq_set_data_ext``) when it covers more of the prompt than any slot on
the device, and decodes only the rest.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

from pyllm._ffi import lib
from pyllm.errors import PyllmError
from pyllm.seqstate import CacheEntry, PromptCache

if TYPE_CHECKING:
    from pyllm.context import Context
    from pyllm.sequence import Request

logger = logging.getLogger("pyllm")

__all__ = ["KVCache", "Slot", "common_prefix"]


class Slot:
    """One llama.cpp sequence id and what its cells hold (kept after a request ends, for prefix reuse)."""

    __slots__ = ("seq", "cached", "req", "last_used")

    def __init__(self, seq: int) -> None:
        self.seq = seq
        self.cached: list[int] = []   # tokens whose K/V are in this sequence's cells, in order
        self.req: Optional["Request"] = None
        self.last_used = 0

    def __repr__(self) -> str:
        return f"<Slot {self.seq} cached={len(self.cached)} {'busy' if self.req else 'idle'}>"


def common_prefix(a: Sequence[int], b: np.ndarray) -> int:
    """Length of the common prefix of a token list and an int32 array."""
    m = min(len(a), len(b))
    if m == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:m], dtype=np.int32) != b[:m])
    return int(diff[0]) if len(diff) else m


class KVCache:
    """Slots of one context and their cells. ``n_ctx``: cells in the (unified) pool; ``n_swa``: the
    model's sliding window (1 without one), which limits how far a cached prefix can be cut back."""

    def __init__(self, context: "Context", n_parallel: int, n_ctx: int, n_swa: int,
                 host: Optional[PromptCache] = None, host_min_tokens: int = 32) -> None:
        self._ctx = context
        self._mem = context._memory
        self.n_ctx = n_ctx
        self._n_swa = max(1, n_swa)
        self.slots = [Slot(i) for i in range(n_parallel)]
        self._clock = 0
        self.swa_cache_misses = 0
        self.host = host if host is not None and host.enabled else None
        self.host_min_tokens = host_min_tokens   # shorter prefixes are cheaper to recompute than to copy
        self.host_saves = 0
        self.host_restores = 0
        self.host_restored_tokens = 0
        # Split streams (kv_unified=False) copy a sequence's cells to another stream at the next
        # llama_decode (llama_kv_cache::update, before the batch is placed); until then neither stream's
        # buffer may be written by anything else (a state restore), or the copy would carry or overwrite it.
        self.split_streams = False
        self.copies_pending: set[int] = set()   # sequence ids of both ends of copies not yet applied

    # ---- choosing ----
    def free_slots(self) -> list[Slot]:
        return [s for s in self.slots if s.req is None]

    def pick(self, req: "Request", free: list[Slot]) -> tuple[Slot, int, Optional[CacheEntry]]:
        """The free slot for ``req``, how many of its prompt tokens can be reused, and the host entry to
        restore into that slot first (None: the slot's own cells). The longest cached prefix wins, on the
        device or in host memory (the last prompt token is always decoded, its logits give the first
        token); without ``cache_prompt`` an empty slot, else the least recently used cache."""
        if not req.cache_prompt:
            return min(free, key=lambda s: (bool(s.cached), s.last_used)), 0, None
        head = req._arr[:-1]
        slot = max(free, key=lambda s: (common_prefix(s.cached, head), not s.cached, -s.last_used))
        keep = common_prefix(slot.cached, head)
        if self.host is not None and req.n_prompt - 1 > keep:
            n, entry = self.host.longest_prefix(req.prompt_tokens)
            n = min(n, req.n_prompt - 1)
            targets = [s for s in free if s.seq not in self.copies_pending]
            if entry is not None and n > keep and targets:
                target = min(targets, key=lambda s: (bool(s.cached), s.last_used))
                return target, n, entry
        return slot, keep, None

    def idle_cells(self, exclude: Optional[Slot] = None) -> int:
        return sum(len(s.cached) for s in self.slots if s.req is None and s is not exclude)

    # ---- changing ----
    def save(self, slot: Slot) -> None:
        """Copy a slot's cells to the host tier before they are dropped (nothing without one, for a short
        prefix, or when that exact entry is there already)."""
        if self.host is None or len(slot.cached) < self.host_min_tokens or slot.cached in self.host:
            return
        try:
            state = self._ctx.seq_state_get(slot.seq)
        except PyllmError as exc:
            logger.warning("prompt cache: could not copy sequence %d (%d tokens) to host memory: %s",
                           slot.seq, len(slot.cached), exc)
            return
        if self.host.put(slot.cached, state, info=len(slot.cached)):
            self.host_saves += 1

    def restore(self, slot: Slot, entry: CacheEntry, keep: int) -> int:
        """Replace a slot's cells with a host entry's (what the slot held is saved first); returns how many
        of them the request reuses (0 when llama.cpp refuses the state)."""
        self.save(slot)
        self.clear(slot)
        try:
            n = self._ctx.seq_state_set(entry.state, slot.seq)
        except PyllmError as exc:
            logger.warning("prompt cache: restoring %d tokens into sequence %d failed: %s", entry.n_tokens,
                           slot.seq, exc)
            self.clear(slot)
            return 0
        if n != entry.n_tokens:
            self.clear(slot)
            return 0
        slot.cached = entry.tokens
        self.host_restores += 1
        self.host_restored_tokens += min(keep, n)
        return min(keep, n)

    def trim(self, slot: Slot, keep: int) -> int:
        """Keep the first ``keep`` cached tokens of a slot; returns how many stay usable."""
        seq = slot.seq
        if keep < len(slot.cached):
            self.save(slot)  # another prompt takes this slot: its whole prefix goes to the host tier first
            if not lib.llama_memory_seq_rm(self._mem, seq, keep, -1):
                keep = 0
        if keep > 0:
            # A sliding-window cache may no longer hold the window that position `keep` attends to
            # (its cells were reused): then recompute from scratch, as llama-server does.
            pos_min = int(lib.llama_memory_seq_pos_min(self._mem, seq))
            if pos_min < 0 or pos_min > max(0, keep - self._n_swa):
                keep = 0
                self.swa_cache_misses += 1
        if keep == 0:
            lib.llama_memory_seq_rm(self._mem, seq, -1, -1)
        del slot.cached[keep:]
        return keep

    def clear(self, slot: Slot) -> int:
        """Free every cell of a slot; returns how many it held."""
        n = len(slot.cached)
        lib.llama_memory_seq_rm(self._mem, slot.seq, -1, -1)
        slot.cached = []
        return n

    def release(self, slot: Slot, keep_cells: bool) -> None:
        """A request leaves its slot; its cells stay as an idle prefix cache unless ``keep_cells`` is False."""
        if not keep_cells:
            self.clear(slot)
        slot.req = None
        self._clock += 1
        slot.last_used = self._clock

    def make_room(self, need: int, exclude: Optional[Slot] = None) -> None:
        """Evict idle prefix caches, least recently used first, until ``need`` reserved cells and the
        remaining caches fit in the pool."""
        idle = sorted((s for s in self.slots if s.req is None and s is not exclude and s.cached),
                      key=lambda s: s.last_used)
        cached = sum(len(s.cached) for s in idle)
        for s in idle:
            if need + cached <= self.n_ctx:
                break
            cached -= self.evict(s)

    def evict(self, slot: Slot) -> int:
        """Drop an idle cache from the device (to the host tier when there is one); returns its cells."""
        self.save(slot)
        return self.clear(slot)

    def evict_idle(self) -> int:
        """Free every idle prefix cache; returns the cells freed."""
        return sum(self.evict(s) for s in self.slots if s.req is None and s.cached)

    def host_stats(self) -> dict:
        """The host tier's counters (``prompt_cache_*``), empty without one."""
        if self.host is None:
            return {}
        h = self.host.stats()
        return {"prompt_cache_entries": h["entries"], "prompt_cache_bytes": h["bytes"],
                "prompt_cache_budget_bytes": h["budget_bytes"], "prompt_cache_hits": h["hits"],
                "prompt_cache_misses": h["misses"], "prompt_cache_evictions": h["evictions"],
                "prompt_cache_saves": self.host_saves, "prompt_cache_restores": self.host_restores,
                "prompt_cache_restored_tokens": self.host_restored_tokens}

    def clear_all(self) -> None:
        """After a fatal decode error: nothing in memory is trusted."""
        lib.llama_memory_clear(self._mem, True)
        for s in self.slots:
            s.cached = []

    def copy(self, src: Slot, dst: Slot) -> None:
        """``dst`` gets ``src``'s cells (``llama_memory_seq_cp``, shared cells, no copy of data in a unified
        pool; with split streams the whole stream is copied at the next llama_decode: ``copies_pending``)."""
        lib.llama_memory_seq_rm(self._mem, dst.seq, -1, -1)
        lib.llama_memory_seq_cp(self._mem, src.seq, dst.seq, -1, -1)
        dst.cached = list(src.cached)
        if self.split_streams:
            self.copies_pending.update((src.seq, dst.seq))

    # ---- reading ----
    def seq_positions(self) -> list[tuple[int, int]]:
        """(pos_min, pos_max) of every sequence as llama.cpp's memory reports them ((-1, -1): empty)."""
        mem = self._mem
        return [(int(lib.llama_memory_seq_pos_min(mem, s.seq)), int(lib.llama_memory_seq_pos_max(mem, s.seq)))
                for s in self.slots]

    def cells_used(self) -> int:
        return sum(hi + 1 for _, hi in self.seq_positions() if hi >= 0)
