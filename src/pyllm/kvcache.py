"""The KV cells of one context, per sequence: slots, idle prefix caches, eviction.

A context with ``n_seq_max = n_parallel`` has one llama.cpp sequence id per slot. A slot's cells
outlive the request that filled them: an idle slot is a prefix cache that a later request with the
same leading tokens reuses instead of decoding them again (as llama-server's ``cache_prompt``). When
cells are needed the least recently used idle caches are evicted. Everything here goes through
llama.cpp's memory API (``llama_memory_seq_*``); the token lists are this module's record of what
each sequence's cells hold. A host-memory tier (sequence states copied out before eviction) plugs in
at ``clear``/``pick``. Used by the one thread that runs the engine core.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

from pyllm._ffi import lib

if TYPE_CHECKING:
    from pyllm.sequence import Request

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

    def __init__(self, memory, n_parallel: int, n_ctx: int, n_swa: int) -> None:
        self._mem = memory
        self.n_ctx = n_ctx
        self._n_swa = max(1, n_swa)
        self.slots = [Slot(i) for i in range(n_parallel)]
        self._clock = 0
        self.swa_cache_misses = 0

    # ---- choosing ----
    def free_slots(self) -> list[Slot]:
        return [s for s in self.slots if s.req is None]

    def pick(self, req: "Request", free: list[Slot]) -> tuple[Slot, int]:
        """The free slot for ``req`` and how many of its prompt tokens that slot already holds: the
        longest cached prefix (the last prompt token is always decoded, its logits give the first
        token); without ``cache_prompt`` an empty slot, else the least recently used cache."""
        if req.cache_prompt:
            head = req._arr[:-1]
            slot = max(free, key=lambda s: (common_prefix(s.cached, head), not s.cached, -s.last_used))
            return slot, common_prefix(slot.cached, head)
        return min(free, key=lambda s: (bool(s.cached), s.last_used)), 0

    def idle_cells(self, exclude: Optional[Slot] = None) -> int:
        return sum(len(s.cached) for s in self.slots if s.req is None and s is not exclude)

    # ---- changing ----
    def trim(self, slot: Slot, keep: int) -> int:
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
            cached -= self.clear(s)

    def evict_idle(self) -> int:
        """Free every idle prefix cache; returns the cells freed."""
        return sum(self.clear(s) for s in self.slots if s.req is None and s.cached)

    def clear_all(self) -> None:
        """After a fatal decode error: nothing in memory is trusted."""
        lib.llama_memory_clear(self._mem, True)
        for s in self.slots:
            s.cached = []

    def copy(self, src: Slot, dst: Slot) -> None:
        """``dst`` gets ``src``'s cells (``llama_memory_seq_cp``, shared cells, no copy of data in a unified pool)."""
        lib.llama_memory_seq_rm(self._mem, dst.seq, -1, -1)
        lib.llama_memory_seq_cp(self._mem, src.seq, dst.seq, -1, -1)
        dst.cached = list(src.cached)

    # ---- reading ----
    def seq_positions(self) -> list[tuple[int, int]]:
        """(pos_min, pos_max) of every sequence as llama.cpp's memory reports them ((-1, -1): empty)."""
        mem = self._mem
        return [(int(lib.llama_memory_seq_pos_min(mem, s.seq)), int(lib.llama_memory_seq_pos_max(mem, s.seq)))
                for s in self.slots]

    def cells_used(self) -> int:
        return sum(hi + 1 for _, hi in self.seq_positions() if hi >= 0)
