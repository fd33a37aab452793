"""Ownership of native handles: idempotent close(), `with` support, use-after-close raises."""
from __future__ import annotations

import weakref
from typing import Any, Callable, Optional

from pyllm._ffi import ffi
from pyllm.errors import ClosedError


class NativeHandle:
    """Owns (or borrows) one native pointer.

    An owned pointer is registered with ``ffi.gc`` only as a safety net for a wrapper that is
    dropped without close(); close() frees it deterministically and exactly once. A borrowed
    pointer (created by other C code) is never freed here.
    """

    _kind = "handle"

    def __init__(self, ptr: Any, free: Optional[Callable[[Any], None]], *, owned: bool = True) -> None:
        if ptr == ffi.NULL:
            raise ValueError(f"cannot wrap a NULL {self._kind}")
        self._owned = owned and free is not None
        self._ptr = ffi.gc(ptr, free) if self._owned else ptr
        self._dependents: "weakref.WeakSet[NativeHandle]" = weakref.WeakSet()

    def add_dependent(self, handle: "NativeHandle") -> None:
        """A handle that uses this one (a context of a model): close() closes it first."""
        self._dependents.add(handle)

    @property
    def closed(self) -> bool:
        return self._ptr is None

    @property
    def ptr(self) -> Any:
        """The raw cffi pointer; raises ClosedError after close()."""
        p = self._ptr
        if p is None:
            raise ClosedError(f"this {self._kind} is closed")
        return p

    @property
    def address(self) -> int:
        """The native address (for C code in the same process)."""
        return int(ffi.cast("uintptr_t", self.ptr))

    @property
    def owned(self) -> bool:
        return self._owned

    def _release(self) -> None:
        for dep in list(getattr(self, "_dependents", ())):
            dep.close()
        p, self._ptr = self._ptr, None
        if p is not None and self._owned:
            ffi.release(p)  # runs the destructor now, and disarms ffi.gc

    def close(self) -> None:
        self._release()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
