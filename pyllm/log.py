"""Route llama.cpp's and ggml's native log messages into Python ``logging``.

Messages go to the ``pyllm.native`` logger (quiet at WARNING unless the application
configures it). Recent WARN/ERROR lines are kept in a small ring buffer so that an
exception can carry llama.cpp's own reason (llama.cpp has no ``error_last()``), and a
thread can capture every line emitted during one native call (``capture()``).
"""
from __future__ import annotations

import collections
import contextlib
import logging
import re
import threading
from typing import Iterator

from pyllm._ffi import ffi, lib

logger = logging.getLogger("pyllm.native")

_LEVELS = {
    int(lib.GGML_LOG_LEVEL_DEBUG): logging.DEBUG,
    int(lib.GGML_LOG_LEVEL_INFO): logging.INFO,
    int(lib.GGML_LOG_LEVEL_WARN): logging.WARNING,
    int(lib.GGML_LOG_LEVEL_ERROR): logging.ERROR,
    int(lib.GGML_LOG_LEVEL_NONE): logging.INFO,
}
_CONT = int(lib.GGML_LOG_LEVEL_CONT)

_recent: collections.deque[str] = collections.deque(maxlen=32)
_local = threading.local()
_installed = False
_install_lock = threading.Lock()


class _LineAssembler:
    """llama.cpp emits partial lines (progress dots, CONT continuations); log whole lines only."""

    def __init__(self) -> None:
        self.level = logging.INFO
        self.parts: list[str] = []

    def feed(self, level: int, text: str) -> list[tuple[int, str]]:
        if level != _CONT:
            self.level = _LEVELS.get(level, logging.INFO)
        self.parts.append(text)
        if not text.endswith("\n"):
            return []
        lines = "".join(self.parts).splitlines()
        self.parts.clear()
        return [(self.level, line) for line in lines if line.strip()]


def _assembler() -> _LineAssembler:
    asm = getattr(_local, "asm", None)
    if asm is None:
        asm = _local.asm = _LineAssembler()
    return asm


def _emit(level: int, line: str) -> None:
    if level >= logging.WARNING:
        _recent.append(line)
    for sink in getattr(_local, "captures", ()):
        sink.append(line)
    if logger.isEnabledFor(level):
        logger.log(level, "%s", line)


def store_callback_error(exc: BaseException) -> None:
    """Keep an exception raised inside a Python callback called from C; raise_pending() re-raises it."""
    if getattr(_local, "pending", None) is None:
        _local.pending = exc


def raise_pending() -> None:
    """Re-raise (once) an exception a Python callback raised while C was running on this thread."""
    exc = getattr(_local, "pending", None)
    if exc is not None:
        _local.pending = None
        raise exc


def _on_callback_error(exc_type, exc_value, tb) -> None:
    # cffi calls this for an exception that escaped a callback, including one raised on entry
    # (a KeyboardInterrupt from Ctrl-C lands wherever Python code runs next, callbacks included).
    store_callback_error(exc_value if exc_value is not None else exc_type())


@ffi.def_extern(onerror=_on_callback_error)
def _pyllm_log_callback(level, text, user_data):  # noqa: ARG001 - signature fixed by ggml_log_callback
    # Runs inside C: an exception cannot cross it, so it is stored and re-raised once C returns.
    try:
        if text == ffi.NULL:
            return
        for lvl, line in _assembler().feed(int(level), ffi.string(text).decode("utf-8", "replace")):
            _emit(lvl, line)
    except BaseException as exc:
        store_callback_error(exc)


def install() -> None:
    """Install the native log callback once per process (idempotent)."""
    global _installed
    with _install_lock:
        if _installed:
            return
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)
        lib.llama_log_set(lib._pyllm_log_callback, ffi.NULL)
        _installed = True


def recent_errors(n: int = 8) -> list[str]:
    """The last native WARN/ERROR lines, oldest first."""
    return list(_recent)[-n:]


def clear_recent() -> None:
    _recent.clear()


@contextlib.contextmanager
def capture() -> Iterator[list[str]]:
    """Collect every native log line this thread emits inside the block (whatever the logger level)."""
    sink: list[str] = []
    stack = getattr(_local, "captures", None)
    if stack is None:
        stack = _local.captures = []
    stack.append(sink)
    try:
        yield sink
    finally:
        stack.remove(sink)


_GENERIC = re.compile(r"failed to load model( from .*)?$|failed to read header$|failed to initialize the context")
_ERRORISH = ("error", "fail", "invalid", "unknown", "not within", "not supported", "not found", "does not", "corrupt", "exceed", "unable", "cannot", "must be",
             "unsupported", "requires", "only supports")


def reason_from(lines: list[str], n: int = 2) -> str:
    """A short reason for an exception from the lines captured during a native call: the first
    specific error lines (the root cause comes first; llama.cpp's wrappers repeat it generically)."""
    errorish = [ln.strip() for ln in lines if any(w in ln.lower() for w in _ERRORISH)]
    specific = [ln for ln in errorish if not _GENERIC.search(ln)]
    picked = specific[:n] or errorish[-n:] or [ln.strip() for ln in lines[-n:]]
    return "; ".join(picked)
