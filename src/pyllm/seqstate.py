"""Saved sequences: state files for long sessions, slot file names, and a host-memory prompt cache.

Three pieces the engine and the server build "long sessions" from, none of which runs the decode loop:

- **State files** (:func:`save_sequence_file`, :func:`load_sequence_file`): one sequence's KV state
  (``Context.seq_state_get``) and its token ids, behind a header of pyllm's own that says what the state
  can be restored into. llama-server's ``POST /slots/{id}?action=save|restore`` is the behavioural reference
  (tools/server/server-context.cpp); unlike ``llama_state_seq_save_file``, whose file carries only a magic
  number and a version, a file is refused, before any byte reaches llama.cpp, when it comes from another
  model file, KV cache type, V layout or build, or is truncated or corrupt (a SHA-256 covers all of it).
  A file is written under a temporary name and moved into place with ``os.replace``, so a process killed
  while saving (SIGTERM, a crash) never leaves a half-written file under the requested name.
- **Slot file names** (:func:`check_slot_filename`): llama.cpp's ``fs_validate_filename`` rules, and the
  path must stay inside the ``--slot-save-path`` directory.
- **A prompt cache** (:class:`PromptCache`): sequence states in host memory, least recently used first out
  under a byte budget (``--cache-ram``), found by token-for-token prefix match.

File layout (all integers little-endian)::

    offset  size  field
    0       8     magic b"PYLLMSEQ"
    8       4     format version (FORMAT_VERSION)
    12      4     header length H
    16      H     header: UTF-8 JSON object (see StateFileHeader)
    16+H    32    SHA-256 of the header bytes
    48+H    4*n   token ids, int32 (n = header["n_tokens"])
    ...     S     llama.cpp's sequence state (S = header["state_bytes"]); its SHA-256 is header["payload_sha256"],
                  taken over the token ids and the state together
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
import tempfile
import threading
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional, Sequence, Union

from pyllm.errors import IncompatibleStateError, SequenceStateError, SlotFilenameError

if TYPE_CHECKING:  # the functions take a Context and read a Model; this module never needs their classes
    from pyllm.context import Context
    from pyllm.model import Model

MAGIC = b"PYLLMSEQ"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sII")          # magic, version, header length
_MAX_HEADER = 1 << 20                     # a header is a few hundred bytes; anything larger is not ours
_TOKEN = struct.Struct("<i")
# Bytes the model fingerprint reads from the GGUF file: FINGERPRINT_SAMPLES evenly spaced windows of
# FINGERPRINT_WINDOW bytes, the first at offset 0 (the GGUF header and its metadata) and the last at the end.
FINGERPRINT_SAMPLES = 64
FINGERPRINT_WINDOW = 16 * 1024


# ---- the model a state belongs to ----
_fingerprints: dict[tuple, str] = {}
_fingerprint_lock = threading.Lock()


def model_fingerprint(model: "Model") -> str:
    """A SHA-256 (hex) identifying a model file for saved states: the file's size, llama.cpp's description,
    parameter count and tensor bytes, every GGUF metadata key and value llama.cpp reports, and 64 windows of
    16 KiB read at evenly spaced offsets across the file (1 MiB in all, the start and the end included).

    Cheap (about 1 MiB read, cached per path, size and modification time) and reliable against another model
    file, another quantization or a fine-tune of the same architecture (whose tensor bytes differ wherever a
    window falls). It is not a checksum of the whole file: two files that differ only between the windows get
    the same fingerprint. Raises IncompatibleStateError for a model without a file (``Model.from_address``)."""
    path = Path(model.path)
    try:
        st = path.stat()
    except OSError as exc:
        raise IncompatibleStateError(f"cannot fingerprint model {path}: {exc.strerror or exc}; saved states "
                                     "need the model's GGUF file") from None
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    with _fingerprint_lock:
        hit = _fingerprints.get(key)
    if hit is not None:
        return hit
    h = hashlib.sha256()
    h.update(b"pyllm model fingerprint v1\0")
    meta = model.metadata()
    h.update(json.dumps({"size": st.st_size, "desc": model.desc, "n_params": model.n_params,
                         "tensor_bytes": model.size, "metadata": sorted(meta.items())},
                        sort_keys=True).encode())
    size = st.st_size
    window = min(FINGERPRINT_WINDOW, size)
    last = size - window
    offsets = sorted({round(i * last / (FINGERPRINT_SAMPLES - 1)) for i in range(FINGERPRINT_SAMPLES)}) if last else [0]
    try:
        with open(path, "rb") as fh:
            for off in offsets:
                fh.seek(off)
                h.update(fh.read(window))
    except OSError as exc:
        raise IncompatibleStateError(f"cannot fingerprint model {path}: {exc.strerror or exc}") from None
    digest = h.hexdigest()
    with _fingerprint_lock:
        _fingerprints[key] = digest
    return digest


def _build() -> dict[str, str]:
    from pyllm._ffi import ffi, lib

    return {"pyllm_version": ffi.string(lib.pyllm_build_version()).decode(),
            "llama_cpp_commit": ffi.string(lib.pyllm_build_llama_commit()).decode()}


def _kv_layout(ctx: "Context") -> dict[str, Any]:
    """What a state's bytes depend on besides the model: the K/V types, whether V is stored transposed
    (llama.cpp transposes it without flash attention) and the stream count (split KV: one per sequence)."""
    n_stream = 1 if ctx.n_seq_max == 1 or ctx.n_ctx_seq == ctx.n_ctx else ctx.n_seq_max
    return {"type_k": ctx.type_k, "type_v": ctx.type_v, "v_trans": not ctx.flash_attn, "n_stream": n_stream}


# ---- state files ----
@dataclass(frozen=True)
class StateFileHeader:
    """The header of a state file: what the state can be restored into, and how to check it.

    ``format_version``: FORMAT_VERSION of the writer. ``pyllm_version``, ``llama_cpp_commit``: the build that
    wrote it (llama.cpp's state layout is not stable across commits, so another build is refused).
    ``model_fingerprint``: :func:`model_fingerprint`; ``model_name``, ``model_desc``: for messages only.
    ``type_k``, ``type_v``: the K/V cache types; ``v_trans``: V stored transposed (flash attention off);
    ``n_stream``: KV streams of the context (1 unified, n_seq_max split). ``flags``: the
    LLAMA_STATE_SEQ_FLAGS_* it was taken with. ``n_tokens``: token ids that follow (the sequence's length:
    its last position + 1); ``state_bytes``: length of llama.cpp's state; ``payload_sha256``: SHA-256 of the
    token ids (int32 little-endian) and the state together."""

    format_version: int
    pyllm_version: str
    llama_cpp_commit: str
    model_fingerprint: str
    model_name: str
    model_desc: str
    type_k: str
    type_v: str
    v_trans: bool
    n_stream: int
    flags: int
    n_tokens: int
    state_bytes: int
    payload_sha256: str


def _tokens_bytes(tokens: Sequence[int], n_vocab: int) -> bytes:
    arr = array("i")
    try:
        arr.extend(tokens)
    except (TypeError, OverflowError):
        raise SequenceStateError("tokens must be a sequence of int token ids") from None
    bad = next((t for t in arr if not 0 <= t < n_vocab), None)
    if bad is not None:
        raise SequenceStateError(f"token id {bad} is outside the vocabulary [0, {n_vocab})")
    if arr.itemsize != 4:  # pragma: no cover - every supported platform has a 4-byte C int
        raise SequenceStateError("this platform's C int is not 4 bytes")
    if struct.pack("=i", 1) != struct.pack("<i", 1):  # pragma: no cover - big-endian hosts
        arr.byteswap()
    return arr.tobytes()


def save_sequence_file(ctx: "Context", seq_id: int, tokens: Sequence[int], path: Union[str, os.PathLike], *,
                       flags: int = 0) -> StateFileHeader:
    """Write sequence ``seq_id`` of ``ctx`` and its ``tokens`` (the ids it holds, in order) to ``path``.

    ``tokens`` must describe the sequence: as many ids as its last position + 1, each in the vocabulary
    (checked; SequenceStateError otherwise), as llama-server saves a slot's prompt tokens beside its state.
    The file is written to a temporary name in the same directory, flushed to disk, then moved onto ``path``
    (``os.replace``): a reader sees the old file or the whole new one, and a process killed mid-write leaves
    at most a ``.<name>.*.tmp`` file behind. Returns the header written. OSError (disk full, permission)
    propagates, the temporary file removed."""
    path = Path(os.fspath(path))
    n_tokens = len(tokens)
    first, last = ctx.seq_pos_range(seq_id)
    if last + 1 != n_tokens:
        raise SequenceStateError(f"{n_tokens} tokens given for sequence {seq_id}, which holds positions "
                                 f"{first}..{last} ({last + 1} tokens); expected exactly the ids it holds")
    token_bytes = _tokens_bytes(tokens, ctx.model.n_vocab)
    state = ctx.seq_state_get(seq_id, flags)
    payload = hashlib.sha256(token_bytes)
    payload.update(state)
    header = StateFileHeader(
        format_version=FORMAT_VERSION, **_build(), model_fingerprint=model_fingerprint(ctx.model),
        model_name=ctx.model.path.name, model_desc=ctx.model.desc, **_kv_layout(ctx), flags=flags,
        n_tokens=n_tokens, state_bytes=len(state), payload_sha256=payload.hexdigest())
    head = json.dumps(dataclasses.asdict(header), sort_keys=True).encode()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(_PREFIX.pack(MAGIC, FORMAT_VERSION, len(head)))
            fh.write(head)
            fh.write(hashlib.sha256(head).digest())
            fh.write(token_bytes)
            fh.write(state)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # the rename itself reaches the disk with the directory
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return header


def read_state_file_header(path: Union[str, os.PathLike]) -> StateFileHeader:
    """The checked header of a state file (magic, version, header checksum, fields, the file's length),
    without reading the state itself. SequenceStateError when it is not a complete pyllm state file."""
    path = Path(os.fspath(path))
    try:
        with open(path, "rb") as fh:
            return _read_header(fh, path, os.fstat(fh.fileno()).st_size)[0]
    except OSError as exc:
        raise SequenceStateError(f"state file {path}: {exc.strerror or exc}") from None


def _read_header(fh, path: Path, file_size: int) -> tuple[StateFileHeader, int]:
    def bad(why: str) -> SequenceStateError:
        return SequenceStateError(f"state file {path}: {why}")

    prefix = fh.read(_PREFIX.size)
    if len(prefix) < _PREFIX.size:
        raise bad(f"truncated: {len(prefix)} bytes, shorter than the {_PREFIX.size}-byte prefix"
                  if prefix else "empty (0 bytes)")
    magic, version, head_len = _PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise bad(f"not a pyllm state file (magic {magic!r}, expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise IncompatibleStateError(f"state file {path}: format version {version}; this pyllm reads version "
                                     f"{FORMAT_VERSION}")
    if head_len > _MAX_HEADER:
        raise bad(f"corrupt: header length {head_len} is larger than {_MAX_HEADER}")
    head = fh.read(head_len)
    digest = fh.read(32)
    if len(head) < head_len or len(digest) < 32:
        raise bad("truncated inside its header")
    if hashlib.sha256(head).digest() != digest:
        raise bad("corrupt: the header's checksum does not match")
    try:
        fields = json.loads(head.decode())
        header = StateFileHeader(**fields)
    except (UnicodeDecodeError, ValueError, TypeError) as exc:
        raise bad(f"corrupt header ({exc})") from None
    for name, kind in (("n_tokens", int), ("state_bytes", int), ("flags", int), ("n_stream", int)):
        value = getattr(header, name)
        if isinstance(value, bool) or not isinstance(value, kind) or value < 0:
            raise bad(f"corrupt header: {name}={value!r}")
    data_at = _PREFIX.size + head_len + 32
    expected = data_at + 4 * header.n_tokens + header.state_bytes
    if file_size != expected:
        what = "truncated" if file_size < expected else "has trailing bytes"
        raise bad(f"{what}: {file_size} bytes, the header announces {expected}")
    return header, data_at


def check_state_header(header: StateFileHeader, ctx: "Context", path: Union[str, os.PathLike] = "<state>") -> None:
    """IncompatibleStateError unless a state with this header can be restored into ``ctx``: same build,
    model file (fingerprint), K/V types, V layout and stream count."""
    build = _build()
    problems = []
    if (header.pyllm_version, header.llama_cpp_commit) != (build["pyllm_version"], build["llama_cpp_commit"]):
        problems.append(f"written by pyllm {header.pyllm_version} with llama.cpp {header.llama_cpp_commit}, this is "
                        f"pyllm {build['pyllm_version']} with llama.cpp {build['llama_cpp_commit']} (llama.cpp's "
                        "state layout is only read by the build that wrote it)")
    if header.model_fingerprint != model_fingerprint(ctx.model):
        problems.append(f"saved from model {header.model_name} ({header.model_desc}), not this context's "
                        f"{ctx.model.path.name} ({ctx.model.desc}): the model fingerprints differ")
    layout = _kv_layout(ctx)
    if (header.type_k, header.type_v) != (layout["type_k"], layout["type_v"]):
        problems.append(f"KV cache K {header.type_k} / V {header.type_v}, this context has K {layout['type_k']} / "
                        f"V {layout['type_v']}")
    if header.v_trans != layout["v_trans"]:
        problems.append(f"saved with flash attention {'off' if header.v_trans else 'on'} (V "
                        f"{'transposed' if header.v_trans else 'not transposed'}), this context has it "
                        f"{'off' if layout['v_trans'] else 'on'}")
    if header.n_stream != layout["n_stream"]:
        problems.append(f"saved from a context of {header.n_stream} KV stream(s), this one has {layout['n_stream']} "
                        "(unified vs split KV, kv_unified)")
    if problems:
        raise IncompatibleStateError(f"state file {path} cannot be restored into this context: " + "; ".join(problems))


def load_sequence_file(ctx: "Context", seq_id: int, path: Union[str, os.PathLike], *,
                       flags: Optional[int] = None) -> list[int]:
    """Restore a file from :func:`save_sequence_file` into sequence ``seq_id`` of ``ctx``; returns its tokens.

    Checked before llama.cpp sees a byte: the file is complete (its length is the header's), the header's
    checksum, the build, model fingerprint, K/V types, V layout and stream count (IncompatibleStateError),
    the token ids are in the vocabulary and fit the sequence's share of the context (``n_ctx_seq``), the
    payload's SHA-256. ``flags`` (default: the file's) must equal the file's. Then llama.cpp restores it
    (``Context.seq_state_set``); if it refuses (no free cells for them), SequenceStateError, and sequence
    ``seq_id`` is left empty. A file that fails a check before that leaves the sequence untouched."""
    path = Path(os.fspath(path))
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise SequenceStateError(f"state file {path}: {exc.strerror or exc}") from None
    with fh:
        header, _ = _read_header(fh, path, os.fstat(fh.fileno()).st_size)
        check_state_header(header, ctx, path)
        if flags is not None and flags != header.flags:
            raise IncompatibleStateError(f"state file {path} was saved with flags={header.flags}, asked to restore "
                                         f"with flags={flags}")
        if header.n_tokens > ctx.n_ctx_seq:
            raise SequenceStateError(f"state file {path} holds {header.n_tokens} tokens, more than the "
                                     f"{ctx.n_ctx_seq} positions a sequence of this context may hold (n_ctx_seq)")
        token_bytes = fh.read(4 * header.n_tokens)
        state = fh.read(header.state_bytes)
    if len(token_bytes) != 4 * header.n_tokens or len(state) != header.state_bytes:
        raise SequenceStateError(f"state file {path}: truncated while reading (changed on disk?)")
    payload = hashlib.sha256(token_bytes)
    payload.update(state)
    if payload.hexdigest() != header.payload_sha256:
        raise SequenceStateError(f"state file {path}: corrupt: the token ids and state do not match their SHA-256")
    tokens = array("i")
    tokens.frombytes(token_bytes)
    if struct.pack("=i", 1) != struct.pack("<i", 1):  # pragma: no cover - big-endian hosts
        tokens.byteswap()
    bad = next((t for t in tokens if not 0 <= t < ctx.model.n_vocab), None)
    if bad is not None:
        raise SequenceStateError(f"state file {path}: token id {bad} is outside the vocabulary "
                                 f"[0, {ctx.model.n_vocab})")
    n = ctx.seq_state_set(state, seq_id, header.flags)
    if n != header.n_tokens:
        ctx.seq_clear(seq_id)
        raise SequenceStateError(f"state file {path}: restored {n} positions for {header.n_tokens} tokens; "
                                 f"sequence {seq_id} is now empty")
    return tokens.tolist()


# ---- slot file names ----
_FORBIDDEN = set(':*?"<>|/\\')
MAX_FILENAME_BYTES = 255


def check_slot_filename(filename: Any, slot_save_path: Union[str, os.PathLike]) -> Path:
    """The path of slot file ``filename`` inside directory ``slot_save_path`` (``--slot-save-path``), or
    SlotFilenameError naming what is wrong.

    llama.cpp's ``fs_validate_filename`` rules (common/common.cpp), which llama-server applies to
    ``POST /slots/{id}?action=save|restore``: a non-empty string of at most 255 UTF-8 bytes; no control
    characters (C0, DEL, C1), no ``/ \\ : * ? " < > |`` nor their look-alikes (U+FF0E, U+2215, U+2216), no
    surrogates, U+FFFD or U+FEFF; no leading or trailing space, no trailing ``.``, no ``..`` anywhere, not
    ``.``. And, beyond llama.cpp: the resolved path (symbolic links followed) must stay inside the directory."""
    if not isinstance(filename, str):
        raise SlotFilenameError(f"filename={filename!r} is not a string; expected a file name such as 'chat1.bin'")

    def bad(why: str) -> SlotFilenameError:
        return SlotFilenameError(f"filename={filename!r} {why}; expected a plain file name inside the slot save "
                                 "directory (no path separators, no '..', no control characters)")

    if not filename:
        raise bad("is empty")
    for ch in filename:
        c = ord(ch)
        if 0xD800 <= c <= 0xDFFF:
            raise bad(f"holds a surrogate code point U+{c:04X}")
        if c <= 0x1F or c == 0x7F or 0x80 <= c <= 0x9F:
            raise bad(f"holds the control character U+{c:04X}")
        if c in (0xFF0E, 0x2215, 0x2216, 0xFFFD, 0xFEFF) or ch in _FORBIDDEN:
            raise bad(f"holds the forbidden character {ch!r}" + (" (a path separator)" if ch in "/\\" else ""))
    if len(filename.encode()) > MAX_FILENAME_BYTES:
        raise bad(f"is longer than {MAX_FILENAME_BYTES} bytes")
    if filename[0] == " " or filename[-1] == " " or filename[-1] == ".":
        raise bad("starts or ends with a space, or ends with '.'")
    if ".." in filename:
        raise bad("contains '..'")
    base = Path(os.fspath(slot_save_path))
    if not base.is_dir():
        raise SlotFilenameError(f"slot save path {str(base)!r} is not a directory")
    root = base.resolve()
    target = (root / filename).resolve()
    if target.parent != root:
        raise bad(f"resolves to {target}, outside the slot save directory {root}")
    return target


# ---- the host-memory prompt cache ----
@dataclass(frozen=True)
class CacheEntry:
    """One cached sequence state: the token ids it holds (``tokens``, all of them, from position 0) and
    ``state`` (``Context.seq_state_get``'s bytes, which restore every one of those cells). ``info``: what the
    caller stored beside it (e.g. the K/V types). ``n_bytes``: what it counts against the budget: the state
    plus 4 bytes per token id."""

    key: bytes                       # the token ids, int32 native order: the dict key and the prefix test
    state: bytes
    info: Any = None

    @property
    def tokens(self) -> list[int]:
        a = array("i")
        a.frombytes(self.key)
        return a.tolist()

    @property
    def n_tokens(self) -> int:
        return len(self.key) // 4

    @property
    def n_bytes(self) -> int:
        return len(self.state) + len(self.key)


def _key(tokens: Iterable[int]) -> bytes:
    a = array("i")
    try:
        a.extend(tokens)
    except (TypeError, OverflowError):
        raise ValueError("tokens must be int token ids") from None
    return a.tobytes()


class PromptCache:
    """Sequence states in host memory, keyed by the token ids each holds, least recently used first out.

    ``budget_bytes``: the most the entries may hold together (states + token ids); ``None``: no limit, 0: the
    cache is off (nothing is stored, every lookup misses). :meth:`from_cache_ram` takes ``--cache-ram``'s MiB
    (llama-server's meaning: -1 no limit, 0 off). An entry restores all of its cells, so a lookup only returns
    an entry whose whole token list is a prefix of the query (token for token): two conversations that share a
    system prompt and then differ never get each other's entries; they share an entry of the system prompt
    alone, when one was stored. Thread-safe (one lock); the engine's thread is its only expected writer."""

    def __init__(self, budget_bytes: Optional[int] = None) -> None:
        if budget_bytes is not None and (isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int)
                                         or budget_bytes < 0):
            raise ValueError(f"budget_bytes={budget_bytes!r} is not valid; expected bytes >= 0 (0: off) or None "
                             "(no limit)")
        self.budget_bytes = budget_bytes
        self._entries: "OrderedDict[bytes, CacheEntry]" = OrderedDict()   # least recently used first
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.bytes = 0

    @classmethod
    def from_cache_ram(cls, cache_ram_mib: int) -> "PromptCache":
        """The cache ``--cache-ram N`` (MiB) describes: -1 no limit, 0 off, N > 0 a budget of N MiB."""
        if isinstance(cache_ram_mib, bool) or not isinstance(cache_ram_mib, int) or cache_ram_mib < -1:
            raise ValueError(f"cache_ram_mib={cache_ram_mib!r} is not valid; expected -1 (no limit), 0 (off) or MiB")
        return cls(None if cache_ram_mib == -1 else cache_ram_mib * 2**20)

    @property
    def enabled(self) -> bool:
        return self.budget_bytes != 0

    def put(self, tokens: Sequence[int], state: bytes, info: Any = None) -> bool:
        """Store ``state`` (bytes restoring exactly the cells of ``tokens``) as the most recently used entry,
        replacing an entry of the same tokens; evict least recently used entries until it fits. Returns False,
        storing nothing, when the cache is off or the entry alone is larger than the budget (as llama-server's
        cache skips such prompts)."""
        key = _key(tokens)
        if not key:
            raise ValueError("cannot cache a state of 0 tokens")
        if isinstance(state, (bytearray, memoryview)):
            state = bytes(state)
        if not isinstance(state, bytes) or not state:
            raise ValueError("state must be non-empty bytes (Context.seq_state_get)")
        entry = CacheEntry(key, state, info)
        with self._lock:
            if self.budget_bytes is not None and entry.n_bytes > self.budget_bytes:
                return False
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= old.n_bytes
            if self.budget_bytes is not None:
                while self._entries and self.bytes + entry.n_bytes > self.budget_bytes:
                    _, gone = self._entries.popitem(last=False)
                    self.bytes -= gone.n_bytes
                    self.evictions += 1
            self._entries[key] = entry
            self.bytes += entry.n_bytes
            return True

    def longest_prefix(self, tokens: Sequence[int]) -> tuple[int, Optional[CacheEntry]]:
        """The entry with the most tokens whose whole token list is a prefix of ``tokens`` (token for token;
        the entry may equal ``tokens``), as ``(its n_tokens, entry)``, made the most recently used; ``(0,
        None)`` when there is none. Counts a hit or a miss."""
        query = _key(tokens)
        with self._lock:
            best: Optional[CacheEntry] = None
            if query:
                for key, entry in self._entries.items():
                    if (best is None or len(key) > len(best.key)) and query.startswith(key):
                        best = entry
            if best is None:
                self.misses += 1
                return 0, None
            self._entries.move_to_end(best.key)
            self.hits += 1
            return best.n_tokens, best

    def pop(self, tokens: Sequence[int]) -> Optional[CacheEntry]:
        """Remove and return the entry of exactly ``tokens`` (None if absent)."""
        with self._lock:
            entry = self._entries.pop(_key(tokens), None)
            if entry is not None:
                self.bytes -= entry.n_bytes
            return entry

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, tokens: object) -> bool:
        try:
            return _key(tokens) in self._entries  # type: ignore[arg-type]
        except ValueError:
            return False

    def stats(self) -> dict[str, Optional[int]]:
        """Counters for /metrics and logs: entries, bytes held, budget_bytes (None: no limit), hits, misses,
        evictions (entries dropped to make room)."""
        with self._lock:
            return {"entries": len(self._entries), "bytes": self.bytes, "budget_bytes": self.budget_bytes,
                    "hits": self.hits, "misses": self.misses, "evictions": self.evictions}
