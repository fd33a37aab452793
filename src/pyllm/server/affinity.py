"""Prefix affinity without a tokenizer: hash chains of a request's prompt, as the request states it.

A replica's prompt cache holds the K/V of prompts it decoded; a request whose prompt starts with one of
them decodes only the rest. A router that knows which replica decoded which prompts can send a
conversation's next turn where its earlier turns are cached. Tokenizing in the router would need the
model's vocabulary and chat template there; instead the router compares what the API requests say,
before any template runs:

- a request's prompt is cut into blocks: one per message
  (chat ``messages``, Anthropic ``messages``, Responses ``input`` items, each serialized as canonical
  JSON), or ``BLOCK_CHARS``-character blocks of a plain ``prompt`` (completions); the settings that shape
  the rendered prompt's head (the path's API family, ``model``, ``tools``, ``system``, ``instructions``)
  are part of the first block, so two requests share no block unless they share their first message;
- block ``i``'s hash covers blocks ``0..i`` (a chain: ``h_i = blake2b(h_{i-1} || block_i)``, 64 bits), so
  one matching hash means the whole prefix up to it matches;
- each chain element carries the prompt characters it covers, the measure of "longest".

The next turn of a conversation repeats the earlier messages and appends new ones, so its chain starts
with the chain of the previous turn: the replica that served that turn matches it. Two requests whose
texts differ only in ways the template would erase (say, key order) are the same block here; two that
render to the same tokens from different JSON (a string vs a list of one text part) are not, which
costs a cache miss, never a wrong answer: routing only chooses where a request runs.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from typing import Any, Iterable, Optional, Sequence

__all__ = ["BLOCK_CHARS", "prefix_chain", "match_chars", "RecentChains"]

BLOCK_CHARS = 256   # characters per block of a plain-text prompt (completions)

# API family by path: the same conversation sent to two APIs renders differently.
_FAMILIES = {
    "/v1/chat/completions": "chat", "/chat/completions": "chat", "/v1/messages": "messages",
    "/v1/responses": "responses", "/responses": "responses",
    "/v1/completions": "completion", "/completions": "completion", "/completion": "completion",
    "/v1/completion": "completion", "/infill": "completion",
}


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def _chain(blocks: Iterable[str]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    prev = b""
    chars = 0
    for block in blocks:
        digest = hashlib.blake2b(prev + block.encode("utf-8", "surrogatepass"), digest_size=8).digest()
        prev = digest
        chars += len(block)
        out.append((int.from_bytes(digest, "big"), chars))
    return out


def prefix_chain(path: str, body: bytes) -> list[tuple[int, int]]:
    """The hash chain of a request's prompt: ``[(hash, prompt_chars_through_this_block), ...]``, the
    first block (with the head) first. ``path``: the request's URL path; ``body``: its raw JSON body. Empty (no affinity,
    the router picks the least-loaded replica) for a path that takes no prompt or a body that is not a
    JSON object; the replica then answers the request as it would any other (a 4xx for a bad body)."""
    family = _FAMILIES.get(path.rstrip("/") or "/")
    if family is None:
        return []
    try:
        req = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return []
    if not isinstance(req, dict):
        return []
    head = _canon([family, req.get("model"), req.get("tools"), req.get("system"), req.get("instructions")])
    if family in ("chat", "messages"):
        items = req.get("messages")
        blocks = [_canon(m) for m in items] if isinstance(items, list) else []
    elif family == "responses":
        items = req.get("input")
        blocks = ([_canon(m) for m in items] if isinstance(items, list)
                  else [_canon({"role": "user", "content": items})] if isinstance(items, str) else [])
    else:
        prompt = req.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]   # one prompt in a list; several prompts are several sequences: no affinity
        if isinstance(prompt, str):
            blocks = [prompt[i:i + BLOCK_CHARS] for i in range(0, len(prompt), BLOCK_CHARS)]
        elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):   # token ids
            step = BLOCK_CHARS // 4
            blocks = [_canon(prompt[i:i + step]) for i in range(0, len(prompt), step)]
        else:
            blocks = []
    if not blocks:
        return []
    # The head joins the first block: a head alone (the same for every request of an API and model) is no
    # shared prompt, so it must not count as a match.
    return _chain([head + blocks[0], *blocks[1:]])


def match_chars(chain: Sequence[Sequence[int]], known) -> int:
    """Prompt characters of the longest prefix of ``chain`` whose hash is in ``known`` (0: none)."""
    best = 0
    for h, chars in chain:
        if h in known:
            best = chars
    return best


class RecentChains:
    """The hashes of the chains a replica was sent, newest last, at most ``capacity`` chains' worth,
    optionally forgotten after ``ttl_s`` seconds. Not thread-safe (one event loop uses it)."""

    def __init__(self, capacity: int = 1024, ttl_s: Optional[float] = None) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity={capacity!r} is out of range; expected an integer >= 1")
        self.capacity = capacity
        self.ttl_s = ttl_s
        self._chains: OrderedDict[int, tuple[float, tuple[int, ...]]] = OrderedDict()   # last hash -> chain
        self._count: dict[int, int] = {}

    def add(self, chain: Sequence[Sequence[int]], now: Optional[float] = None) -> None:
        if not chain:
            return
        key = int(chain[-1][0])
        hashes = tuple(int(h) for h, _ in chain)
        if key in self._chains:
            self._drop(key)
        now = time.monotonic() if now is None else now
        self._chains[key] = (now, hashes)
        for h in hashes:
            self._count[h] = self._count.get(h, 0) + 1
        self.trim(self.capacity, now)

    def trim(self, capacity: int, now: Optional[float] = None) -> None:
        """Keep the newest ``capacity`` chains (and, with a ttl, only those younger than it)."""
        while len(self._chains) > max(0, capacity):
            self._drop(next(iter(self._chains)))
        if self.ttl_s is not None:
            limit = (time.monotonic() if now is None else now) - self.ttl_s
            while self._chains and next(iter(self._chains.values()))[0] < limit:
                self._drop(next(iter(self._chains)))

    def _drop(self, key: int) -> None:
        _, hashes = self._chains.pop(key)
        for h in hashes:
            n = self._count[h] - 1
            if n:
                self._count[h] = n
            else:
                del self._count[h]

    def hashes(self) -> list[int]:
        return list(self._count)

    def __contains__(self, h: int) -> bool:
        return h in self._count

    def __len__(self) -> int:
        return len(self._chains)
