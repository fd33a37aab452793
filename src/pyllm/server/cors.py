"""CORS: which browser origins may call the server, with llama-server's ``--cors-origins`` values.

- ``*``: any origin; the request's ``Origin`` is echoed back and credentials are allowed (what
  llama-server does with its default ``*`` and ``--cors-credentials``);
- ``localhost``: only origins whose host is ``localhost``, ``127.0.0.1`` or ``::1`` (any scheme or port);
- a comma-separated list of origins (``https://app.example.com,http://localhost:3000``): exactly those.
  (llama-server sends such a list verbatim as ``Access-Control-Allow-Origin``, which browsers reject;
  here the request's origin is echoed when it is in the list.)

Without ``--cors-origins`` pyllm sends no CORS headers at all (browsers then refuse cross-origin calls),
and an ``OPTIONS`` preflight is answered as any unknown method is. With it, a preflight is answered
200 with an empty body before the API key is checked (browsers send preflights without credentials),
as llama-server does.
"""
from __future__ import annotations

from typing import Optional
from urllib.parse import urlsplit

from pyllm.errors import ConfigError

ALLOW_METHODS = "GET, POST, OPTIONS"   # the methods this server has routes for
ALLOW_HEADERS = "*"
_LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


class CorsPolicy:
    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.any = spec == "*"
        self.localhost = spec == "localhost"
        self.origins = frozenset() if self.any or self.localhost else frozenset(
            o.strip().rstrip("/") for o in spec.split(",") if o.strip())

    def allowed(self, origin: str) -> bool:
        if not origin:
            return False
        if self.any:
            return True
        if self.localhost:
            try:
                host = urlsplit(origin).hostname
            except ValueError:
                return False
            return host in _LOCAL_HOSTS
        return origin.rstrip("/") in self.origins

    def headers(self, origin: Optional[str], *, preflight: bool) -> list[tuple[bytes, bytes]]:
        """The CORS response headers for a request from ``origin`` (names in the case llama-server writes them:
        HTTP does not care, a client that reads them into a plain dict does)."""
        out: list[tuple[bytes, bytes]] = []
        if origin and self.allowed(origin):
            out += [(b"Access-Control-Allow-Origin", origin.encode("latin-1", "replace")), (b"Vary", b"Origin")]
        if preflight:
            out += [(b"Access-Control-Allow-Credentials", b"true"),
                    (b"Access-Control-Allow-Methods", ALLOW_METHODS.encode()),
                    (b"Access-Control-Allow-Headers", ALLOW_HEADERS.encode())]
        return out


def parse_origins(spec: Optional[str]) -> Optional[CorsPolicy]:
    """A CorsPolicy for ``--cors-origins`` (None: no CORS); ConfigError for a value that names no origin."""
    if spec is None:
        return None
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"cors_origins={spec!r} names no origin; expected '*', 'localhost' or a comma-separated "
                          "list such as https://app.example.com,http://localhost:3000")
    spec = spec.strip()
    if spec not in ("*", "localhost"):
        for origin in (o.strip() for o in spec.split(",") if o.strip()):
            parts = urlsplit(origin)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ConfigError(f"cors_origins: {origin!r} is not an origin; expected scheme://host[:port], "
                                  "e.g. https://app.example.com (or '*', or 'localhost')")
    return CorsPolicy(spec)
