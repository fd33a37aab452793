"""Process-wide native start-up, and the plumbing that carries a Python exception out of a C callback.

The bottom of pyllm's layers above ``_ffi``: it depends only on ``_ffi`` and ``log``, and every module
that calls into llama.cpp (buildinfo, devices, model, context) depends on it rather than on each other.
"""
from __future__ import annotations

import logging
import threading

from pyllm import log
from pyllm._ffi import ffi, lib

_local = threading.local()
_backend_lock = threading.Lock()
_backend_ready = False
_log_installed = False


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


def on_callback_error(exc_type, exc_value, tb) -> None:
    # cffi calls this for an exception that escaped a callback, including one raised on entry
    # (a KeyboardInterrupt from Ctrl-C lands wherever Python code runs next, callbacks included).
    store_callback_error(exc_value if exc_value is not None else exc_type())


@ffi.def_extern(onerror=on_callback_error)
def _pyllm_log_callback(level, text, user_data):  # noqa: ARG001 - signature fixed by ggml_log_callback
    # Runs inside C: an exception cannot cross it, so it is stored and re-raised once C returns.
    try:
        if text != ffi.NULL:
            log.feed(int(level), ffi.string(text).decode("utf-8", "replace"))
    except BaseException as exc:
        store_callback_error(exc)


def ensure_backend() -> None:
    """Route native logs to Python, then llama_backend_init, once per process."""
    global _backend_ready, _log_installed
    with _backend_lock:
        if not _log_installed:
            if log.logger.level == logging.NOTSET:
                log.logger.setLevel(logging.WARNING)
            lib.llama_log_set(lib._pyllm_log_callback, ffi.NULL)
            _log_installed = True
        if not _backend_ready:
            lib.llama_backend_init()
            _backend_ready = True
