"""Incremental detokenization: token bytes in, whole UTF-8 characters out, stop strings held back.

Linear in the output: each byte is decoded once, and only the last ``len(longest stop) - 1``
characters are held back (and searched) while a stop string might still be forming.
"""
from __future__ import annotations

import codecs
from typing import Optional, Sequence


class TextStream:
    def __init__(self, stops: Sequence[str] = ()) -> None:
        self.stops = [s for s in stops if s]
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._hold = max((len(s) for s in self.stops), default=1) - 1
        self._pending = ""
        self.stopped = False
        self.stop_word: Optional[str] = None   # the stop string that ended the text (the earliest in it)

    def feed(self, data: bytes) -> str:
        """Add a token's bytes; return the text that is now safe to emit ('' if none).

        After a stop string appears, ``stopped`` is True and the text before it is returned.
        """
        if self.stopped:
            return ""
        pending = self._pending + self._decoder.decode(data)
        if self.stops:
            found = [(i, s) for s in self.stops if (i := pending.find(s)) >= 0]
            hit = min(found)[0] if found else -1
            if hit >= 0:
                self.stop_word = next(s for i, s in found if i == hit)
                self.stopped = True
                self._pending = ""
                return pending[:hit]
        if len(pending) <= self._hold:
            self._pending = pending
            return ""
        cut = len(pending) - self._hold
        self._pending = pending[cut:]
        return pending[:cut]

    def finish(self) -> str:
        """Flush what is held back (an incomplete trailing character becomes U+FFFD)."""
        if self.stopped:
            return ""
        rest = self._pending + self._decoder.decode(b"", final=True)
        self._pending = ""
        return rest
