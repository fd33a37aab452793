"""Route llama.cpp's and ggml's native log messages into Python ``logging``.

Messages go to the ``pyllm.native`` logger (quiet at WARNING unless the application
configures it). llama.cpp has no ``error_last()``, so a thread can capture every line emitted
during one native call (``capture()``) and an exception carries llama.cpp's own reason from them.
The C callback itself is installed by :mod:`pyllm._runtime`, which feeds :func:`feed`.
"""
from __future__ import annotations

import contextlib
import logging
import re
import threading
from typing import Iterator

from pyllm._ffi import lib

logger = logging.getLogger("pyllm.native")

_LEVELS = {
    int(lib.GGML_LOG_LEVEL_DEBUG): logging.DEBUG,
    int(lib.GGML_LOG_LEVEL_INFO): logging.INFO,
    int(lib.GGML_LOG_LEVEL_WARN): logging.WARNING,
    int(lib.GGML_LOG_LEVEL_ERROR): logging.ERROR,
    int(lib.GGML_LOG_LEVEL_NONE): logging.INFO,
}
_CONT = int(lib.GGML_LOG_LEVEL_CONT)
# llama.cpp WARN lines about a model file that llama.cpp itself corrects on every load, which no setting
# can change: logged at INFO (-vv shows them) so that a plain load stays quiet and real warnings stand out.
_CORRECTED = (
    # llama-vocab.cpp: a token whose text looks like a control token (Gemma 3's '</s>') gets its type fixed
    re.compile(r"control-looking token: .* was not control-type; this is probably a bug in the model"),
)

_local = threading.local()


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
    for sink in getattr(_local, "captures", ()):
        sink.append(line)
    if level == logging.WARNING and any(p.search(line) for p in _CORRECTED):
        level = logging.INFO
    if logger.isEnabledFor(level):
        logger.log(level, "%s", line)


def feed(level: int, text: str) -> None:
    """One native log call (possibly a partial line): log the whole lines it completes."""
    for lvl, line in _assembler().feed(level, text):
        _emit(lvl, line)


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
