"""A llama.cpp context: the KV cache (with its data types), decoding, logits, memory accounting."""
from __future__ import annotations

import logging
import os
import signal
import threading
import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from pyllm import _runtime
from pyllm import log as native_log
from pyllm._ffi import ffi, lib
from pyllm._handle import NativeHandle
from pyllm.buildinfo import compiled_fa_pairs, has_cuda
from pyllm.errors import (
    ContextError,
    ContextFullError,
    KVCacheConfigError,
    PyllmError,
    SequenceStateError,
    check_decode,
)
from pyllm.config import (N_CTX_PAD, check_bool, check_flash_attn, check_int, check_kv_type, check_parallel,
                          check_threads, check_v_needs_flash_attn, label)
from pyllm.kvtypes import DEFAULT_KV_CACHE_TYPE, block_size, is_quantized, parse_kv_cache_type
from pyllm.model import Model
from pyllm.sampling import argmax_biased

logger = logging.getLogger("pyllm")

# llama_state_seq_get_data_ext's own header: a magic number and the saved sequence's id (llama-context.cpp,
# io_magic), before the memory's streams; every sequence state starts with these 8 bytes.
SEQ_STATE_MAGIC = 0xAF143CD8
SEQ_STATE_HEADER_BYTES = 8
LLAMA_MAX_SEQ = 256


def seq_state_flags() -> dict[str, int]:
    """The LLAMA_STATE_SEQ_FLAGS_* values this binding accepts, read from the compiled library: ``none`` (every
    cell of the sequence) and ``partial_only`` (the sliding-window / recurrent part alone, what llama-server's
    checkpoints save). ``LLAMA_STATE_SEQ_FLAGS_ON_DEVICE`` is refused (see :meth:`Context.seq_state_get`)."""
    return {"none": int(lib.LLAMA_STATE_SEQ_FLAGS_NONE), "partial_only": int(lib.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY)}


def check_seq_state_layout(data, *, n_cells_max: int) -> int:
    """Walk a sequence state as llama.cpp's KV caches write it (llama-kv-cache.cpp ``state_write``: per cache
    the stream count; per stream the cell count, each cell's position, sequence count, optional cell extension
    (M-RoPE, 12 bytes) and sequence ids, the V transposition flag, the layer count, then per layer a type and a
    row size before the rows) and return the number of cells it holds; SequenceStateError when it does not parse
    to exactly its length, or when its cells are not ones llama.cpp could have written for one sequence: a
    sequence count other than 1, a sequence id outside [0, 256), a position outside [0, 2**31 - 1), and (cells
    without an extension) positions that are not one run without holes or repeats ending at the same last
    position in every cache: llama.cpp's own invariant (llama_kv_cache::apply_ubatch keeps every position
    between a sequence's first and last in the cache; a sliding-window cache keeps the run's end).

    llama.cpp itself checks the stream and layer counts, types and row sizes, but takes positions as they come:
    a cell at a negative position or at 2**31 - 1 is out of reach of every later removal (seq_rm covers
    [0, 2**31 - 1)) and stays in the cache for good, and a position far beyond the others makes the next token
    land there. tests/integration/seq_state_fuzz.py found both. ``n_cells_max``: the context's cells."""
    buf = memoryview(data).cast("B")
    size = len(buf)

    def bad(why: str) -> SequenceStateError:
        return SequenceStateError(f"corrupt sequence state ({size} bytes): {why}")

    def u32(off: int) -> int:
        if off + 4 > size:
            raise bad(f"truncated at byte {off}")
        return int.from_bytes(buf[off:off + 4], "little")

    def walk(ext: int) -> int:
        off, n_cells, last = SEQ_STATE_HEADER_BYTES, 0, set()
        while off < size:                                   # one memory (cache) after another
            n_stream = u32(off)
            off += 4
            if not 0 < n_stream <= LLAMA_MAX_SEQ:
                raise bad(f"{n_stream} KV streams")
            for _ in range(n_stream):
                cells = u32(off)
                off += 4
                if cells == 0:
                    continue
                if cells > n_cells_max:
                    raise bad(f"{cells} cells, more than the context's {n_cells_max}")
                stride = 12 + ext
                if off + cells * stride > size:
                    raise bad(f"truncated in the metadata of {cells} cells")
                meta = np.frombuffer(buf[off:off + cells * stride], dtype="<i4").reshape(cells, stride // 4)
                off += cells * stride
                pos, n_seq, seq = meta[:, 0], meta[:, 1], meta[:, -1]
                if (n_seq != 1).any():
                    raise bad("a cell of a one-sequence state with another sequence count than 1")
                if ((pos < 0) | (pos >= 2**31 - 1)).any():
                    raise bad(f"position {int(pos.min() if (pos < 0).any() else pos.max())} outside [0, 2**31 - 1)")
                if ((seq < 0) | (seq >= LLAMA_MAX_SEQ)).any():
                    raise bad("a sequence id outside [0, 256)")
                lo, hi = int(pos.min()), int(pos.max())
                if not ext and (hi - lo + 1 != cells or len(np.unique(pos)) != cells):
                    raise bad(f"{cells} cells at positions {lo}..{hi}: not one run without holes or repeats")
                last.add(hi)
                n_cells += cells
                v_trans, n_layer = u32(off), u32(off + 4)
                off += 8
                if v_trans > 1 or n_layer > 4096:
                    raise bad(f"v_trans={v_trans}, n_layer={n_layer}")
                for side in ("K", "V"):
                    for _ in range(n_layer):
                        off += 4                            # the layer's type (llama.cpp compares it)
                        if side == "V" and v_trans:
                            row = u32(off) * u32(off + 4)   # element size x embedding size
                        else:
                            row = u32(off) | u32(off + 4) << 32
                        off += 8
                        if row > 1 << 32 or off + cells * row > size:
                            raise bad(f"truncated in the {side} rows (row size {row}, {cells} cells)")
                        off += cells * row
        if len(last) > 1 and not ext:
            raise bad(f"the caches end at different positions {sorted(last)}")
        return n_cells

    try:
        return walk(0)
    except SequenceStateError as plain:
        try:
            return walk(12)
        except SequenceStateError:
            raise plain from None


def _native_reason(lines: list[str]) -> str:
    """What llama.cpp logged during a state call, root cause first (its wrappers repeat it generically)."""
    picked = [ln.strip() for ln in lines if ln.strip()][:3]
    return "; ".join(picked) or "llama.cpp gave no reason"


_FA = {"auto": "LLAMA_FLASH_ATTN_TYPE_AUTO", "on": "LLAMA_FLASH_ATTN_TYPE_ENABLED", "off": "LLAMA_FLASH_ATTN_TYPE_DISABLED"}
_MIB = 1024 * 1024
_warned_fa_pairs: set[tuple[str, str]] = set()


def _check_memory(model: Model, n_ctx: int, type_k: int, type_v: int, offload_kqv: bool) -> None:
    """Refuse a KV cache that cannot fit before llama.cpp allocates it: allocation succeeds lazily on
    Linux and the page-touching clear that follows would end in an out-of-memory kill, not an error."""
    if model.no_alloc or n_ctx == 0:
        return
    from pyllm.devices import devices

    need = int(lib.pyllm_kv_bytes_lower_bound(model.ptr, n_ctx, type_k, type_v))
    devs = devices()
    on_gpu = offload_kqv and model.n_gpu_layers != 0 and any(d.type == "gpu" for d in devs)
    pool = [d for d in devs if d.type == ("gpu" if on_gpu else "cpu")]
    if not pool:
        return
    avail = sum(d.free for d in pool) if on_gpu else _host_available(pool[0].free)
    if need > avail:
        where = "GPU memory" if on_gpu else "memory"
        raise ContextError(
            f"n_ctx={n_ctx} needs at least {need / 2**30:.2f} GiB of KV cache, more than the {avail / 2**30:.2f} GiB "
            f"of {where} available; lower n_ctx or use a quantized KV cache type (pyllm plan shows what fits)"
        )


def _host_available(reported_free: int) -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return reported_free


def _install_sigint_bridge() -> None:
    """Let Ctrl-C stop a running llama_decode at its next graph node (see pyllm_sigint_install)."""
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        lib.pyllm_sigint_install()


def default_threads() -> int:
    """Threads when none are given: the CPUs this process may run on (as llama-bench's default on
    machines without SMT), not llama.cpp's fixed 4, which oversubscribes small machines."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


class ConcurrentUseError(PyllmError, RuntimeError):
    """Two threads used one context at once; a context serves one thread at a time."""


@dataclass(frozen=True)
class KVCacheBytes:
    """The KV cache as llama.cpp allocated it.

    ``k`` and ``v`` are llama_kv_cache's own byte counts of its K and V tensors, summed over its caches
    (one, or base + sliding-window); ``n_cells`` has each cache's size. ``devices`` maps buffer type
    (CPU, CUDA0, ...) to the context bytes llama.cpp's memory breakdown reports there.
    """

    k: int
    v: int
    total: int
    type_k: str
    type_v: str
    n_cells: tuple[int, ...] = ()
    devices: dict[str, int] = field(default_factory=dict)

    @property
    def total_mib(self) -> float:
        return self.total / _MIB


def memory_breakdown(ptr) -> list[dict]:
    """llama.cpp's own memory accounting of a context: per buffer type, model/context/compute bytes."""
    n = 16
    while True:
        rows = ffi.new("pyllm_buft_memory[]", n)
        got = int(lib.pyllm_memory_breakdown(ptr, rows, n))
        if got < 0:
            raise ContextError("llama.cpp could not report its memory breakdown")
        if got <= n:
            return [
                {
                    "name": ffi.string(r.name).decode(),
                    "is_host": bool(r.is_host),
                    "model": int(r.model),
                    "context": int(r.context),
                    "compute": int(r.compute),
                }
                for r in (rows[i] for i in range(got))
            ]
        n = got


class Batch(NativeHandle):
    """One reusable llama_batch of up to ``capacity`` tokens for one sequence."""

    _kind = "batch"

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"batch capacity {capacity} must be positive")
        b = ffi.new("llama_batch *", lib.llama_batch_init(capacity, 0, 1))
        self._struct = b
        # The destructor closes over b so the struct outlives the gc safety net that frees its arrays.
        super().__init__(b, lambda _p, b=b: lib.llama_batch_free(b[0]))
        self.capacity = capacity


def validate_kv_types(model: Model, type_k: str, type_v: str, flash_attn: str) -> None:
    """Check what llama.cpp would refuse (or abort on) for these K/V types with this model, before calling it."""
    type_k, type_v = check_kv_type("type_k", type_k), check_kv_type("type_v", type_v)
    check_v_needs_flash_attn(type_v, flash_attn)
    if model.requires_equal_kv_types and type_k != type_v:
        raise KVCacheConfigError(
            f"model {model.path.name} ({model.architecture}, MLA) requires equal K and V cache types, "
            f"got K={type_k} V={type_v}; use one type for both (e.g. KV_CACHE_TYPE={type_k})"
        )
    if flash_attn == "off":
        return
    heads_k, heads_v = model.head_sizes()
    for side, name, heads in (("K", type_k, heads_k), ("V", type_v, heads_v)):
        if not is_quantized(name):
            continue
        blck = block_size(parse_kv_cache_type(name))
        bad = sorted({h for h in heads if h % blck})
        if bad:
            raise KVCacheConfigError(
                f"{side} cache type {name} has block size {blck}, which does not divide the model's "
                f"{side} head size {bad[0]}; use a type whose block divides it (f16, bf16, f32)"
            )


def warn_missing_fa_kernel(type_k: str, type_v: str) -> None:
    """CUDA builds compile flash-attention kernels for a set of K/V pairs only; others run slowly."""
    if not has_cuda():
        return
    pairs = compiled_fa_pairs()
    if (type_k, type_v) in pairs or (type_k, type_v) in _warned_fa_pairs:
        return
    _warned_fa_pairs.add((type_k, type_v))
    warnings.warn(
        f"this CUDA build has no flash-attention kernel for K={type_k} V={type_v} "
        f"(compiled: {', '.join('-'.join(p) for p in pairs)}); it will run slowly. Rebuild with "
        f"PYLLM_CUDA_FA_QUANTS='{type_k}-{type_v}' (or 'all') to add it.",
        RuntimeWarning,
        stacklevel=3,
    )


class Context(NativeHandle):
    """A context of a model: KV cache of n_ctx cells with the requested K/V data types.

    It keeps its model alive; closing the model closes it first. One thread at a time.
    """

    _kind = "context"

    def __init__(
        self,
        model: Model,
        *,
        n_ctx: int = 4096,
        n_batch: int = 2048,
        n_ubatch: int = 512,
        n_threads: Optional[int] = None,
        n_threads_batch: Optional[int] = None,
        flash_attn: str = "auto",
        type_k: Optional[str] = None,
        type_v: Optional[str] = None,
        offload_kqv: bool = True,
        no_perf: bool = True,
        swa_full: bool = False,
        n_seq_max: int = 1,
        kv_unified: bool = True,
    ) -> None:
        model.ptr  # raises ClosedError on a closed model
        flash_attn = check_flash_attn("flash_attn", flash_attn)
        check_int("n_ctx", n_ctx, minimum=0)
        check_int("n_batch", n_batch, minimum=1)
        check_int("n_ubatch", n_ubatch, minimum=1)
        check_threads("n_threads", n_threads)
        check_threads("n_threads_batch", n_threads_batch)
        check_int("n_seq_max", n_seq_max, minimum=1, maximum=256)  # LLAMA_MAX_SEQ
        check_bool("kv_unified", kv_unified)
        if model.vocab_only:
            raise ContextError(f"model {model.path.name} was loaded vocab_only; load its weights to create a context")
        check_parallel(n_seq_max, n_batch, n_ctx or model.n_ctx_train)
        self.type_k = check_kv_type("type_k", type_k or DEFAULT_KV_CACHE_TYPE)
        self.type_v = check_kv_type("type_v", type_v or DEFAULT_KV_CACHE_TYPE)
        validate_kv_types(model, self.type_k, self.type_v, flash_attn)
        warn_missing_fa_kernel(self.type_k, self.type_v)
        # Abort through a C-level flag: the callback runs between graph nodes and never enters Python.
        self._abort_flag = ffi.new("int *", 0)
        params = self._params(n_ctx=n_ctx, n_batch=n_batch, n_ubatch=min(n_ubatch, n_batch), n_seq_max=n_seq_max,
                              n_threads=n_threads or default_threads(), n_threads_batch=n_threads_batch,
                              flash_attn=flash_attn, offload_kqv=offload_kqv, no_perf=no_perf, swa_full=swa_full,
                              kv_unified=kv_unified)
        _check_memory(model, n_ctx, params.type_k, params.type_v, offload_kqv)
        _install_sigint_bridge()
        super().__init__(self._create(model, params), lib.llama_free)
        self.model = model
        model.add_dependent(self)
        self._init_state()
        self._report_size(n_ctx)
        if type_k is not None:
            logger.info("KV cache K type set to: %s", self.type_k)
        if type_v is not None:
            logger.info("KV cache V type set to: %s", self.type_v)
        logger.info("flash attention: %s (requested %s); KV cache: %.2f MiB for %d tokens",
                    "on" if self.flash_attn else "off", flash_attn, self.kv_cache_bytes().total_mib, self.n_ctx)

    def _report_size(self, n_ctx: int) -> None:
        """Say what llama.cpp made of n_ctx: rounded up to its block of cells (INFO), or longer per sequence
        than the model was trained for (a WARNING, as llama.cpp's own, which the CLI keeps quiet). Not for
        the contexts of a model loaded no_alloc: pyllm plan measures sizes it does not run."""
        if self.model.no_alloc:
            return
        if n_ctx and self.n_ctx != n_ctx:
            logger.info("n_ctx=%d rounded up to %d by llama.cpp (it allocates the KV cache in blocks of %d cells%s)",
                        n_ctx, self.n_ctx, N_CTX_PAD, ", per sequence" if self.n_ctx_seq != self.n_ctx else "")
        n_train = self.model.n_ctx_train
        if 0 < n_train < self.n_ctx_seq:
            per_seq = f" ({self.n_ctx_seq} per sequence)" if self.n_ctx_seq != self.n_ctx else ""
            logger.warning("n_ctx=%d%s is larger than the %d tokens model %s was trained on (n_ctx_train); "
                           "output past %d tokens may degrade. Set %s <= %d, or 0 for the training context",
                           n_ctx or self.n_ctx, per_seq, n_train, self.model.path.name, n_train, label("n_ctx"),
                           n_train)

    def _params(self, *, flash_attn: str, n_threads: int, n_threads_batch: Optional[int], **fields):
        params = lib.llama_context_default_params()
        kv_unified = fields.pop("kv_unified")
        for name, value in fields.items():
            setattr(params, name, value)
        if params.n_seq_max > 1:  # one sequence: llama.cpp's default layout, as before
            params.kv_unified = kv_unified
        params.n_threads = n_threads
        params.n_threads_batch = n_threads_batch or n_threads
        params.flash_attn_type = getattr(lib, _FA[flash_attn])
        params.type_k = parse_kv_cache_type(self.type_k)
        params.type_v = parse_kv_cache_type(self.type_v)
        params.abort_callback = lib.pyllm_abort_callback
        params.abort_callback_data = self._abort_flag
        return params

    def _create(self, model: Model, params):
        with native_log.capture() as lines:
            ptr = lib.llama_init_from_model(model.ptr, params)
        try:
            _runtime.raise_pending()
        except BaseException:
            if ptr != ffi.NULL:
                lib.llama_free(ptr)
            raise
        if ptr == ffi.NULL:
            reason = native_log.reason_from(lines) or "llama.cpp gave no reason"
            if "bad_alloc" in reason or "failed to allocate" in reason:
                reason += " (out of memory: lower n_ctx or use a quantized KV cache type)"
            raise ContextError(f"cannot create a context (n_ctx={params.n_ctx}, K={self.type_k}, V={self.type_v}): {reason}")
        return ptr

    def _init_state(self) -> None:
        p = self._ptr
        self.n_ctx = int(lib.llama_n_ctx(p))
        self.n_batch = int(lib.llama_n_batch(p))
        self.n_ubatch = int(lib.llama_n_ubatch(p))
        self.n_seq_max = int(lib.llama_n_seq_max(p))
        self.n_ctx_seq = int(lib.llama_n_ctx_seq(p))  # positions one sequence may hold
        self.n_vocab = self.model.n_vocab
        self.flash_attn = bool(lib.pyllm_context_flash_attn(p))
        self._batch = Batch(self.n_batch)
        self._memory = lib.llama_get_memory(p)
        self._busy = threading.Lock()
        self.n_past = 0  # tokens of sequence 0 in the KV cache, kept by decode()

    @classmethod
    def from_address(cls, model: Model, address: int, *, owned: bool = False) -> "Context":
        """Wrap a ``llama_context *`` created by other C code for ``model``; by default never freed here."""
        self = cls.__new__(cls)
        NativeHandle.__init__(self, ffi.cast("struct llama_context *", address), lib.llama_free, owned=owned)
        self.model = model
        model.add_dependent(self)
        self.type_k = self.type_v = "unknown"
        self._abort_flag = ffi.new("int *", 0)
        self._init_state()
        return self

    def close(self) -> None:
        """Free the context (and its batch). Idempotent."""
        batch = getattr(self, "_batch", None)
        acquired = self._busy.acquire(blocking=False)
        if not acquired and self._ptr is not None:
            raise ConcurrentUseError("cannot close a context while another thread is decoding with it")
        try:
            self._release()
            if batch is not None:
                batch.close()
        finally:
            if acquired:
                self._busy.release()

    # ---- memory accounting ----
    def memory_breakdown(self) -> list[dict]:
        return memory_breakdown(self.ptr)

    def weight_devices(self) -> list[str]:
        """The devices the model's layers run on (``CPU``, ``CUDA0``, ``RPC0[host:port]``), as llama.cpp
        placed their weights; see :func:`pyllm.devices.weight_devices`."""
        from pyllm.devices import weight_devices

        return weight_devices(self.memory_breakdown(), self.model.n_gpu_layers, self.model.n_layer)

    def kv_cache_bytes(self) -> KVCacheBytes:
        """K and V cache bytes as llama.cpp allocated them (sliding-window and MLA layouts included)."""
        devices = {r["name"]: r["context"] for r in self.memory_breakdown() if r["context"]}
        n = 4
        while True:
            caches = ffi.new("pyllm_kv_cache_bytes[]", n)
            got = int(lib.pyllm_context_kv_bytes(self.ptr, caches, n))
            if got <= n:
                break
            n = got
        caches = [caches[i] for i in range(got)]
        k, v = sum(int(c.k) for c in caches), sum(int(c.v) for c in caches)
        return KVCacheBytes(k=k, v=v, total=k + v, type_k=self.type_k, type_v=self.type_v,
                            n_cells=tuple(int(c.n_cells) for c in caches), devices=devices)

    # ---- decoding ----
    def _enter(self):
        p = self.ptr
        if not self._busy.acquire(blocking=False):
            raise ConcurrentUseError("this context is in use by another thread; use one context per thread")
        return p

    def decode(self, tokens: Sequence[int], *, logits: str = "last", output_from: int = 0) -> int:
        """Append tokens to sequence 0 in n_batch chunks; returns the number of output rows.

        ``logits``: 'last' (the last token's), 'all' (every token from index ``output_from`` on; then
        the tokens must fit one n_batch, since each llama_decode call replaces the outputs) or 'none'.
        """
        n = len(tokens)
        if n == 0:
            raise ValueError("cannot decode an empty token list")
        if logits not in ("last", "all", "none"):
            raise ValueError(f"logits={logits!r} is not valid; expected 'last', 'all' or 'none'")
        if logits == "all" and n > self.n_batch:
            raise ValueError(f"logits='all' for {n} tokens needs n_batch >= {n} (this context has n_batch={self.n_batch})")
        if not 0 <= output_from < max(n, 1):
            raise ValueError(f"output_from={output_from} is out of range; expected 0 <= output_from < {n}")
        if self.n_past + n > self.n_ctx:
            raise ContextFullError(f"{n} tokens after {self.n_past} do not fit in n_ctx={self.n_ctx}")
        self.model.check_tokens(tokens)
        arr = np.ascontiguousarray(tokens, dtype=np.int32)
        p = self._enter()
        ok = False
        try:
            self._abort_flag[0] = 0
            lib.pyllm_sigint_clear()
            b = self._batch._struct
            step = self.n_batch
            for start in range(0, n, step):
                chunk = arr[start : start + step]
                last = start + len(chunk) >= n
                lib.pyllm_batch_fill(b, ffi.from_buffer("llama_token[]", chunk), len(chunk), self.n_past, 0,
                                     last and logits == "last", output_from if logits == "all" else -1)
                rc = lib.llama_decode(p, b[0])
                if rc != 0:
                    _runtime.raise_pending()  # a callback's exception (e.g. Ctrl-C) explains the abort
                    check_decode(rc, f"at position {self.n_past}")
                self.n_past += len(chunk)
            _runtime.raise_pending()
            ok = True
        finally:
            if not ok:  # failed, aborted or interrupted (even between C and our count): follow llama.cpp
                self._resync_after_failure()
            self._busy.release()
        return {"last": 1, "all": n - output_from, "none": 0}[logits]

    def decode_one(self, token: int) -> None:
        """Append one token (with logits): the per-token generation step."""
        if not 0 <= token < self.n_vocab:
            self.model.check_tokens((token,))
        if self.n_past >= self.n_ctx:
            raise ContextFullError(f"context full: n_ctx={self.n_ctx} tokens")
        p = self._enter()
        ok = False
        try:
            rc = lib.pyllm_decode_one(p, self._batch._struct, token, self.n_past, 0)
            if rc != 0:
                _runtime.raise_pending()
                check_decode(rc, f"at position {self.n_past}")
            self.n_past += 1
            ok = True
        finally:
            if not ok:
                self._resync_after_failure()
            self._busy.release()

    def _resync_after_failure(self) -> None:
        # After an abort or fatal error, processed ubatches stay in memory: follow llama.cpp's state.
        self.n_past = int(lib.llama_memory_seq_pos_max(self._memory, 0)) + 1
        lib.pyllm_sigint_clear()

    def synchronize(self) -> None:
        """Wait for queued GPU work (a no-op on the CPU backend)."""
        lib.llama_synchronize(self.ptr)

    def abort(self) -> None:
        """Ask a running decode (in another thread) to stop at the next graph node."""
        lib.pyllm_abort_set(self._abort_flag, 1)

    def argmax(self, idx: int = -1, bias=None) -> int:
        """The token with the largest logit in output row idx (greedy), read in place; ``bias``: a logit
        bias as ``pyllm.sampling.bias_arrays`` gives it, added first (the row is left as it was)."""
        if bias is not None:
            ptr = lib.llama_get_logits_ith(self.ptr, idx)
            t = -1 if ptr == ffi.NULL else argmax_biased(ptr, self.n_vocab, bias)
        else:
            t = int(lib.pyllm_argmax_logits(self.ptr, idx, self.n_vocab))
        if t < 0:
            raise PyllmError(f"no logits for output {idx}: decode with logits first")
        return t

    def logits(self, idx: int = -1) -> np.ndarray:
        """Zero-copy float32 view of the logits of output row idx (valid until the next decode)."""
        ptr = lib.llama_get_logits_ith(self.ptr, idx)
        if ptr == ffi.NULL:
            raise PyllmError(f"no logits for output {idx}: decode with logits first")
        return np.frombuffer(ffi.buffer(ptr, 4 * self.n_vocab), dtype=np.float32)

    def all_logits(self, n_outputs: int) -> np.ndarray:
        """Zero-copy (n_outputs, n_vocab) view of every output row of the last decode(logits='all')."""
        ptr = lib.llama_get_logits(self.ptr)
        if ptr == ffi.NULL:
            raise PyllmError("no logits: decode with logits first")
        return np.frombuffer(ffi.buffer(ptr, 4 * self.n_vocab * n_outputs), dtype=np.float32).reshape(n_outputs, self.n_vocab)

    def clear(self) -> None:
        """Empty the KV cache (data included)."""
        self.ptr  # raises ClosedError after close()
        lib.llama_memory_clear(self._memory, True)
        self.n_past = 0

    def truncate(self, n_keep: int) -> None:
        """Keep the first n_keep tokens of the sequence, drop the rest."""
        if not 0 <= n_keep <= self.n_past:
            raise ValueError(f"n_keep={n_keep} is out of range; expected 0 <= n_keep <= {self.n_past}")
        self.ptr  # raises ClosedError after close()
        if not lib.llama_memory_seq_rm(self._memory, 0, n_keep, -1):
            self.clear()
            return
        self.n_past = n_keep

    def state_size(self) -> int:
        return int(lib.llama_state_get_size(self.ptr))

    # ---- one sequence's state (llama_state_seq_*_ext) ----
    def _check_seq_args(self, seq_id: int, flags: int) -> None:
        self.ptr  # raises ClosedError after close()
        if isinstance(seq_id, bool) or not isinstance(seq_id, int) or not 0 <= seq_id < self.n_seq_max:
            raise SequenceStateError(f"seq_id={seq_id!r} is out of range; this context holds n_seq_max="
                                     f"{self.n_seq_max} sequences: expected an integer 0 <= seq_id < {self.n_seq_max}")
        known = seq_state_flags()
        if isinstance(flags, bool) or not isinstance(flags, int) or flags not in known.values():
            on_device = isinstance(flags, int) and flags & int(lib.LLAMA_STATE_SEQ_FLAGS_ON_DEVICE)
            why = (" (LLAMA_STATE_SEQ_FLAGS_ON_DEVICE is refused: its bytes only point at copies kept on the device, "
                   "and llama.cpp aborts the process when such bytes are stale or from another sequence)"
                   if on_device else "")
            raise SequenceStateError(f"flags={flags!r} is not a sequence-state flag this binding accepts{why}; "
                                     "expected " + " or ".join(f"{v} ({k})" for k, v in known.items()))

    def seq_state_size(self, seq_id: int = 0, flags: int = 0) -> int:
        """Bytes :meth:`seq_state_get` returns for sequence ``seq_id`` now (llama_state_seq_get_size_ext): its
        cells' positions and K/V rows, in the cache's own types, plus a small header. Grows with the tokens the
        sequence holds (with a sliding window, only the cells still inside it). Raises SequenceStateError for a
        bad ``seq_id``/``flags``, ClosedError after close()."""
        self._check_seq_args(seq_id, flags)
        p = self._enter()
        try:
            with native_log.capture() as lines:
                n = int(lib.llama_state_seq_get_size_ext(p, seq_id, flags))
        finally:
            self._busy.release()
        if n == 0:
            raise SequenceStateError(f"llama.cpp could not size the state of sequence {seq_id}: "
                                     f"{_native_reason(lines)}")
        return n

    def seq_state_get(self, seq_id: int = 0, flags: int = 0) -> bytes:
        """A copy of sequence ``seq_id``'s KV state in host memory (llama_state_seq_get_data_ext), for
        :meth:`seq_state_set` on a context of the same model file, K/V types, flash-attention setting (the V
        layout) and KV layout (unified or split streams), in this build. ``flags``: 0 (every cell) or
        ``seq_state_flags()["partial_only"]`` (the sliding-window part only); restore with the same flags.
        LLAMA_STATE_SEQ_FLAGS_ON_DEVICE is refused (its restore aborts the process on stale bytes)."""
        self._check_seq_args(seq_id, flags)
        p = self._enter()
        try:
            with native_log.capture() as lines:
                size = int(lib.llama_state_seq_get_size_ext(p, seq_id, flags))
                buf = ffi.new("uint8_t[]", size) if size else None
                n = int(lib.llama_state_seq_get_data_ext(p, buf, size, seq_id, flags)) if size else 0
        finally:
            self._busy.release()
        if n == 0 or n != size:
            raise SequenceStateError(f"llama.cpp could not copy the state of sequence {seq_id} ({n} of {size} "
                                     f"bytes): {_native_reason(lines)}")
        return ffi.buffer(buf, n)[:]

    def seq_state_set(self, data, seq_id: int = 0, flags: int = 0) -> int:
        """Restore a state from :meth:`seq_state_get` into sequence ``seq_id`` (llama_state_seq_set_data_ext),
        replacing what it held; returns the tokens it now holds (its last position + 1). ``data``: bytes-like.

        Checked here first: the context is open, ``seq_id``/``flags`` are valid, ``data`` is not empty, starts
        with llama.cpp's sequence-state header (magic number, a saved sequence id below 256) and walks as a KV
        cache state to exactly its length with cells llama.cpp could have written (:func:`check_seq_state_layout`;
        skipped for recurrent and hybrid models, whose states have another layout). llama.cpp checks the rest
        (stream count, K/V types and row sizes per layer, V transposition, free cells) and refuses, never aborts,
        on a mismatch or truncation (tests/integration/seq_state_fuzz.py truncates and corrupts states to hold
        this). A state llama.cpp refuses raises SequenceStateError with its reason and leaves sequence ``seq_id``
        EMPTY (the message says so); one refused by the checks here leaves it as it was. Bytes that pass every
        check but were altered (a flipped bit in a K row) load as they are: use
        :func:`pyllm.seqstate.load_sequence_file`, whose files carry a checksum, for data from outside."""
        self._check_seq_args(seq_id, flags)
        if isinstance(data, str) or not isinstance(data, (bytes, bytearray, memoryview)):
            raise SequenceStateError(f"sequence state must be bytes-like (bytes, bytearray, memoryview), "
                                     f"got {type(data).__name__}")
        view = memoryview(data).cast("B") if isinstance(data, memoryview) else data
        if len(view) == 0:
            raise SequenceStateError("sequence state is empty (0 bytes); expected bytes from Context.seq_state_get")
        if len(view) < SEQ_STATE_HEADER_BYTES:
            raise SequenceStateError(f"sequence state is truncated: {len(view)} bytes, shorter than llama.cpp's "
                                     f"{SEQ_STATE_HEADER_BYTES}-byte header")
        magic = int.from_bytes(bytes(view[:4]), "little")
        saved_seq = int.from_bytes(bytes(view[4:8]), "little", signed=True)
        if magic != SEQ_STATE_MAGIC:
            raise SequenceStateError(f"not a llama.cpp sequence state: magic 0x{magic:08x}, expected "
                                     f"0x{SEQ_STATE_MAGIC:08x}")
        if not 0 <= saved_seq < LLAMA_MAX_SEQ:
            raise SequenceStateError(f"corrupt sequence state: saved sequence id {saved_seq} is outside "
                                     f"[0, {LLAMA_MAX_SEQ})")
        if not (lib.llama_model_is_recurrent(self.model.ptr) or lib.llama_model_is_hybrid(self.model.ptr)):
            check_seq_state_layout(view, n_cells_max=self.n_ctx)   # recurrent states have another layout
        src = ffi.from_buffer("uint8_t[]", view)
        p = self._enter()
        try:
            with native_log.capture() as lines:
                n = int(lib.llama_state_seq_set_data_ext(p, src, len(view), seq_id, flags))
            if n != len(view):
                # A refusal may come before or after llama.cpp removed the sequence's cells (it removes them
                # once the header parses), and a partial read (bytes left over) is a failure as in llama-server:
                # either way the sequence ends empty, one state for every failure.
                lib.llama_memory_seq_rm(self._memory, seq_id, -1, -1)
            n_tokens = int(lib.llama_memory_seq_pos_max(self._memory, seq_id)) + 1
            if seq_id == 0:
                self.n_past = n_tokens
        finally:
            self._busy.release()
        if n == 0:
            raise SequenceStateError(f"llama.cpp refused the state for sequence {seq_id} ({len(view)} bytes), "
                                     f"which is now empty: {_native_reason(lines)}")
        if n != len(view):
            raise SequenceStateError(f"sequence state has {len(view) - n} bytes after the {n} llama.cpp read "
                                     f"(corrupt or not one state); sequence {seq_id} is now empty")
        return n_tokens

    def seq_clear(self, seq_id: int = 0) -> None:
        """Remove every cell of sequence ``seq_id`` (llama_memory_seq_rm over all positions)."""
        self._check_seq_args(seq_id, 0)
        lib.llama_memory_seq_rm(self._memory, seq_id, -1, -1)
        if seq_id == 0:
            self.n_past = 0

    def seq_pos_range(self, seq_id: int = 0) -> tuple[int, int]:
        """(first, last) position sequence ``seq_id`` holds in the KV cache (llama_memory_seq_pos_min/max),
        (-1, -1) when it is empty. With a sliding window, ``first`` moves up as old cells leave the window."""
        self._check_seq_args(seq_id, 0)
        return (int(lib.llama_memory_seq_pos_min(self._memory, seq_id)),
                int(lib.llama_memory_seq_pos_max(self._memory, seq_id)))

    def perf(self) -> dict:
        d = lib.llama_perf_context(self.ptr)
        return {"t_p_eval_ms": d.t_p_eval_ms, "t_eval_ms": d.t_eval_ms, "n_p_eval": d.n_p_eval, "n_eval": d.n_eval}

    def __repr__(self) -> str:
        if self.closed:
            return "<pyllm.Context closed>"
        return f"<pyllm.Context n_ctx={self.n_ctx} K={self.type_k} V={self.type_v} fa={self.flash_attn}>"
