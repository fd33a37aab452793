"""OpenAI's response shapes that several API surfaces share: logprobs in the chat and the legacy
completions forms, and the cursor that hands a streamed request's logprobs out with its pieces."""
from __future__ import annotations

from typing import Optional

from pyllm.sequence import MAX_TOP_LOGPROBS
from pyllm.server.errors import APIError

MAX_STOP_STRINGS = 16


def chat_logprobs(body) -> Optional[int]:
    """Chat: ``logprobs`` (bool) turns them on, ``top_logprobs`` (0-20) asks for alternatives (OpenAI's rules)."""
    if body.logprobs is not None and not isinstance(body.logprobs, bool):
        raise APIError(400, f"logprobs={body.logprobs!r}: expected true or false (top_logprobs sets how many "
                            "alternatives)", param="logprobs")
    top = body.top_logprobs
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise APIError(400, f"top_logprobs={top} is out of range; expected an integer in [0, {MAX_TOP_LOGPROBS}]",
                       param="top_logprobs")
    if top and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    return (top or 0) if body.logprobs else None


def completion_logprobs(body) -> Optional[int]:
    """Completions: ``logprobs`` is the number of alternatives (0 = the sampled tokens' only)."""
    n = body.logprobs
    if n is None:
        return None
    if isinstance(n, bool) or not 0 <= n <= MAX_TOP_LOGPROBS:
        raise APIError(400, f"logprobs={n!r} is out of range; expected an integer in [0, {MAX_TOP_LOGPROBS}] "
                            "(the alternatives to report per token)", param="logprobs")
    if body.top_logprobs is not None:
        raise APIError(400, "top_logprobs is a chat completions field; /v1/completions takes the count in logprobs",
                       param="top_logprobs")
    return n


def token_text(piece: bytes) -> str:
    return piece.decode("utf-8", errors="replace")


def chat_logprob_content(entries) -> list[dict]:
    """OpenAI's chat shape: one {"token", "logprob", "bytes", "top_logprobs"} per token."""
    return [{"token": token_text(e.piece), "logprob": e.logprob, "bytes": list(e.piece),
             "top_logprobs": [{"token": token_text(p), "logprob": lp, "bytes": list(p)} for _t, p, lp in e.top]}
            for e in entries]


def completion_logprobs_obj(entries, offset: int) -> dict:
    """OpenAI's legacy completions shape; ``text_offset`` counts characters from the completion's start
    (``offset``: the characters before these tokens)."""
    tokens, offsets = [], []
    for e in entries:
        text = token_text(e.piece)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{token_text(p): lp for _t, p, lp in e.top} for e in entries], "text_offset": offsets}


class LogprobCursor:
    """Hands a streamed request's token logprobs out with the pieces their tokens produced: call
    ``on_piece()`` once per engine piece, ``take()`` when an event goes out, ``rest()`` at the end (tokens
    whose text was held back, e.g. by a stop string, come last)."""

    def __init__(self, req) -> None:
        self.req, self.piece, self.done, self.pending = req, 0, 0, []

    def on_piece(self) -> None:
        n = self.req.tokens_through_piece(self.piece)
        self.piece += 1
        self.pending.extend(self.req.logprobs[self.done:n])
        self.done = n

    def take(self) -> list:
        out, self.pending = self.pending, []
        return out

    def rest(self) -> list:
        self.pending.extend(self.req.logprobs[self.done:])
        self.done = len(self.req.logprobs)
        return self.take()


def stops_of(stop) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or ())
    if len(stops) > MAX_STOP_STRINGS:
        raise APIError(400, f"stop has {len(stops)} strings; at most {MAX_STOP_STRINGS} are accepted", param="stop")
    return [s for s in stops if s]
