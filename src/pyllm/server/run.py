"""Run the server: settings from flags and the environment, uvicorn, graceful shutdown."""
from __future__ import annotations

import contextlib
import ipaddress
import logging
import signal
import threading
from dataclasses import dataclass, field
from typing import Mapping, Optional

from pyllm.config import INT32_MAX, EngineConfig, Environment, check_bool, check_int, check_seconds, default_cache_ram_mib
from pyllm.errors import ConfigError
from pyllm.server.app import DEFAULT_MAX_BODY_BYTES, create_app

log = logging.getLogger("pyllm.server")

SERVER_ENV_VARS: dict[str, str] = {
    "HOST": "address to bind (default 127.0.0.1: this machine only)",
    "PORT": "TCP port (default 8080)",
    "PYLLM_API_KEY": "require 'Authorization: Bearer <key>' on every endpoint but /health",
    "PYLLM_SHUTDOWN_GRACE": "seconds running requests may finish after SIGTERM (default 30)",
    "PYLLM_MAX_BODY_BYTES": f"largest request body in bytes (default {DEFAULT_MAX_BODY_BYTES})",
    "PYLLM_MAX_QUEUE": "requests that may wait for a free sequence before 503 (default 64)",
    "PYLLM_DEFAULT_MAX_TOKENS": "max_tokens of requests that give none; -1: as many as the context holds, as "
                                "llama-server's -n -1 (default: n_ctx / n_parallel - prompt)",
    "PYLLM_SPECIAL_IN_MESSAGES": "1: parse control tokens written in message text, as llama-server does "
                                 "(default 0: message text is plain text; only the template's markup is special)",
}

# (variable, field, minimum, maximum) of the integer settings.
_INT_SETTINGS = (("PORT", "port", 0, 65535), ("PYLLM_MAX_BODY_BYTES", "max_body_bytes", 1024, INT32_MAX),
                 ("PYLLM_MAX_QUEUE", "max_queue", 0, 1_000_000),
                 ("PYLLM_DEFAULT_MAX_TOKENS", "default_max_tokens", -1, INT32_MAX))


@dataclass
class ServeSettings:
    """How the server listens; the engine's own settings stay in EngineConfig."""

    host: str = "127.0.0.1"
    port: int = 8080
    api_key: Optional[str] = field(default=None, repr=False)
    model_name: Optional[str] = None
    aliases: tuple = ()
    grace_s: float = 30.0
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_queue: int = 64
    default_max_tokens: Optional[int] = None
    log_level: str = "info"
    special_in_messages: bool = False
    default_temperature: Optional[float] = None   # --temp: for requests without a temperature
    metrics: bool = True                          # --no-metrics: /metrics answers 501 (llama-server's default)
    slots: bool = True                            # --no-slots: /slots answers 501
    cors_origins: Optional[str] = None            # --cors-origins: None sends no CORS headers
    tags: tuple = ()
    jinja: bool = True                            # --no-jinja: llama.cpp's built-in chat formats
    reasoning_format: str = "deepseek"            # --reasoning-format: deepseek (auto) or none
    reasoning: str = "auto"                       # --reasoning: on | off | auto (enable_thinking's default)
    verbose_responses: bool = False               # --verbose: '__verbose' in every completion response
    any_model: bool = False                       # --any-model: requests may name any model (llama-server's way)

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host.strip():
            raise ConfigError(f"host={self.host!r} is not an address; expected e.g. 127.0.0.1 or 0.0.0.0")
        if self.api_key is not None and not self.api_key.strip():
            self.api_key = None
        self.grace_s = check_seconds("grace", self.grace_s, maximum=3600, allow_zero=True)
        self.special_in_messages = check_bool("special_in_messages", self.special_in_messages)
        for name in ("metrics", "slots", "jinja", "verbose_responses", "any_model"):
            setattr(self, name, check_bool(name, getattr(self, name)))
        if self.reasoning_format == "auto":
            self.reasoning_format = "deepseek"
        if self.reasoning_format not in ("deepseek", "none"):
            raise ConfigError(f"reasoning_format={self.reasoning_format!r} is not supported; expected auto, deepseek "
                              "or none")
        if self.reasoning not in ("on", "off", "auto"):
            raise ConfigError(f"reasoning={self.reasoning!r} is not valid; expected on, off or auto")
        if self.default_temperature is not None:
            from pyllm.sampling import SamplingParams

            SamplingParams(temperature=self.default_temperature)   # the same range as a request's
        if self.cors_origins is not None:
            from pyllm.server.cors import parse_origins

            parse_origins(self.cors_origins)
        for _var, name, minimum, maximum in _INT_SETTINGS:
            if getattr(self, name) is not None or name != "default_max_tokens":
                check_int(name, getattr(self, name), minimum=minimum, maximum=maximum)
        if self.default_max_tokens == 0:
            raise ConfigError("default_max_tokens=0 is out of range; expected -1 (as many as the context holds) or "
                              "an integer >= 1")

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None, **overrides) -> "ServeSettings":
        """HOST, PORT, PYLLM_API_KEY, ... (from the environment and a .env file, as every setting); keyword
        arguments (flags) that are not None win. Errors name the variable and the file it came from."""
        env = env if isinstance(env, Environment) else Environment(env)
        kw: dict = {}
        for var, name, minimum, maximum in _INT_SETTINGS:
            raw = env.get(var)
            if raw is not None and raw.strip():
                kw[name] = check_int(env.source(var), raw, minimum=minimum, maximum=maximum, text=True)
        if (host := env.get("HOST")) is not None and host.strip():
            kw["host"] = host.strip()
        if (key := env.get("PYLLM_API_KEY")) is not None:
            kw["api_key"] = key
        if (grace := env.get("PYLLM_SHUTDOWN_GRACE")) is not None and grace.strip():
            kw["grace_s"] = check_seconds(env.source("PYLLM_SHUTDOWN_GRACE"), grace, maximum=3600, allow_zero=True)
        if (special := env.get("PYLLM_SPECIAL_IN_MESSAGES")) is not None and special.strip():
            kw["special_in_messages"] = check_bool(env.source("PYLLM_SPECIAL_IN_MESSAGES"), special)
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)

    @property
    def hosts(self) -> list[str]:
        """The addresses to bind: ``host`` is one, or several separated by commas (llama-server's --host)."""
        return [h.strip() for h in self.host.split(",") if h.strip()]

    @property
    def is_loopback(self) -> bool:
        def loopback(host: str) -> bool:
            if host == "localhost":
                return True
            try:
                return ipaddress.ip_address(host.strip("[]")).is_loopback
            except ValueError:
                return False

        return all(loopback(h) for h in self.hosts)

    def bind(self) -> Optional[list]:
        """Listening sockets when several addresses are given (uvicorn binds one host itself); None for one."""
        if len(self.hosts) < 2:
            return None
        import socket

        socks = []
        try:
            for host in self.hosts:
                addr = host.strip("[]")
                family = socket.AF_INET6 if ":" in addr else socket.AF_INET
                sock = socket.socket(family, socket.SOCK_STREAM)
                socks.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    sock.bind((addr, self.port))
                except OSError as exc:
                    raise ConfigError(f"host={self.host!r}: cannot bind {host} port {self.port}: {exc.strerror or exc}") from None
                sock.listen(2048)
                sock.set_inheritable(True)
        except BaseException:
            for sock in socks:
                sock.close()
            raise
        return socks


def _uvicorn_server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, except that after a graceful SIGTERM/SIGINT the process exits 0.

        uvicorn re-raises the captured signal once it has shut down (so the default handler kills the
        process with it); a service manager then sees a crash instead of the clean stop it asked for.
        """

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            originals = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in originals.items():
                    signal.signal(sig, handler)

    return Server


def app_options(settings: ServeSettings) -> dict:
    """create_app's keyword arguments from the server settings (all but the engine and its lifetime):
    ``pyllm serve`` and each Ray Serve replica (pyllm.server.replicas) build the same app from them."""
    return dict(
        api_key=settings.api_key, model_name=settings.model_name, aliases=settings.aliases,
        max_body_bytes=settings.max_body_bytes, default_max_tokens=settings.default_max_tokens,
        special_in_messages=settings.special_in_messages,
        default_sampling={"temperature": settings.default_temperature} if settings.default_temperature is not None
        else None,
        metrics_endpoint=settings.metrics, slots_endpoint=settings.slots, cors_origins=settings.cors_origins,
        tags=settings.tags, jinja=settings.jinja, reasoning_format=settings.reasoning_format,
        reasoning=settings.reasoning, verbose_responses=settings.verbose_responses, any_model=settings.any_model,
    )


def prepare(config: Optional[EngineConfig] = None,
            settings: Optional[ServeSettings] = None) -> tuple[EngineConfig, ServeSettings]:
    """The engine config and settings a server runs with: from the environment where not given; the
    host-memory prompt cache on by default (llama-server's --cache-ram); a warning when a non-loopback
    address is served without an API key."""
    config = config if config is not None else EngineConfig.from_env()
    if config.cache_ram_mib is None:  # the server keeps prompts in host memory by default, as llama-server
        config = config.replace(cache_ram_mib=default_cache_ram_mib())
    settings = settings if settings is not None else ServeSettings.from_env()
    if not settings.is_loopback and settings.api_key is None:
        log.warning("serving on %s without an API key: anyone who can reach this address can use the model "
                    "(set PYLLM_API_KEY)", settings.host)
    return config, settings


def serve(config: Optional[EngineConfig] = None, settings: Optional[ServeSettings] = None) -> int:
    """Serve until SIGTERM/SIGINT; return the exit status (0 after a graceful stop).

    The port opens at once; the model loads in a thread meanwhile (/health answers 503 until it is
    ready). On SIGTERM: no new connections, running requests get ``settings.grace_s`` seconds to
    finish, then they are cancelled and the engine is closed.
    """
    from pyllm.batched import BatchedEngine

    config, settings = prepare(config, settings)
    if log.level == logging.NOTSET:   # what was loaded and one line per request: shown unless configured otherwise
        log.setLevel(logging.INFO)
    failed: list[BaseException] = []
    holder: dict = {}

    def load_failed(exc: BaseException) -> None:
        failed.append(exc)
        if "server" in holder:
            holder["server"].should_exit = True

    app = create_app(loader=lambda: BatchedEngine(config, max_queue=settings.max_queue), close_engine=True,
                     on_load_error=load_failed, **app_options(settings))
    import uvicorn

    ucfg = uvicorn.Config(app, host=settings.host, port=settings.port, lifespan="on",
                          timeout_graceful_shutdown=settings.grace_s, log_level=settings.log_level,
                          access_log=False, server_header=False,   # pyllm.server.access logs each request
                          # h11 sends header names in the case the app gives them (llama-server's
                          # Access-Control-Allow-Origin ...; see http._header_case); httptools lowercases them
                          http="h11")
    server = holder["server"] = _uvicorn_server_class()(ucfg)
    server.run(sockets=settings.bind())
    if failed:
        raise failed[0]
    return 0 if server.started else 1
