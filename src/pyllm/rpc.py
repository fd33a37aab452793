"""llama.cpp's RPC backend: remote hosts' devices as if they were local GPUs, and ``pyllm rpc-server``.

The client side (``EngineConfig.rpc_servers``, ``LLAMA_RPC_SERVERS``, ``--rpc``): each server's devices
are added to the model's device list (before the local GPUs, as llama.cpp orders them), so ``-ngl``,
``-ts`` and ``-sm`` place layers and their KV cache on them. The server side (``pyllm rpc-server``)
runs llama.cpp's own server loop (``ggml_backend_rpc_start_server``) in this process.

ggml-rpc has no authentication, no connection timeout, and aborts the whole process when it cannot
connect or when a server goes away mid-request (``GGML_ABORT``: no error code reaches the caller). What
pyllm guards, in Python, before any native call:

* the syntax of every ``host:port`` (ConfigError naming it);
* that each server is reachable and speaks this build's protocol: a TCP connect and the RPC HELLO
  handshake with a timeout (:func:`probe`), so a refused port, an unknown host, a server that does not
  answer (or serves another client: llama.cpp's server takes one client at a time) or a version
  mismatch is an :class:`RPCError` naming ``host:port`` within seconds instead of an abort or a hang;
* once connected, ggml's own sockets get a receive/send timeout and TCP keep-alive
  (:func:`arm_connections`), so a server that stops answering ends the process with a message naming
  it after ``rpc_timeout`` seconds instead of hanging forever.

What cannot be guarded without changing llama.cpp: a server that dies or stalls mid-generation ends
the client process (llama.cpp's RPC client has no error path); pyllm prints which server it was.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

from pyllm.errors import ConfigError, PyllmError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 50052
DEFAULT_TIMEOUT = 120.0      # seconds a connected server may take to answer one RPC command
PROBE_TIMEOUT = 5.0          # seconds for the reachability check (connect + handshake)
MAX_SERVERS = 16             # GGML_RPC_MAX_SERVERS
# The wire protocol of the pinned ggml-rpc (ggml/include/ggml-rpc.h); tests check them against the header.
RPC_PROTO_MAJOR_VERSION = 7
RPC_PROTO_MINOR_VERSION = 0
_CMD_HELLO = 14
_CMD_DEVICE_COUNT = 15
_CONN_CAPS_SIZE = 24


class RPCError(PyllmError, ConnectionError):
    """An RPC server is unreachable, refused the connection, did not answer, or speaks another protocol."""


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


# ---- settings ----
def check_endpoint(source: str, text: Any) -> Endpoint:
    """One ``host:port`` (an IPv4 address or a host name; ggml-rpc speaks IPv4 only)."""
    if not isinstance(text, str):
        raise ConfigError(f"{source}={text!r} is not a host:port string; expected e.g. 192.168.1.10:50052")
    item = text.strip()
    host, sep, port_text = item.rpartition(":")
    if not sep or not host or not port_text:
        raise ConfigError(f"{source}: {item!r} is not host:port; expected e.g. 192.168.1.10:50052 "
                          f"(the port rpc-server listens on, default {DEFAULT_PORT})")
    if host.startswith("[") or ":" in host:
        raise ConfigError(f"{source}: {item!r}: llama.cpp's RPC client connects over IPv4 only; "
                          "expected an IPv4 address or a host name")
    if any(c.isspace() for c in host) or not all(c.isalnum() or c in "-._" for c in host):
        raise ConfigError(f"{source}: {item!r}: {host!r} is not a host name or IPv4 address")
    try:
        port = int(port_text, 10)
    except ValueError:
        raise ConfigError(f"{source}: {item!r}: port {port_text!r} is not an integer; expected 1..65535") from None
    if not 1 <= port <= 65535:
        raise ConfigError(f"{source}: {item!r}: port {port} is out of range; expected 1..65535")
    return Endpoint(host, port)


def check_rpc_servers(source: str, value: Any) -> Optional[tuple[str, ...]]:
    """``host:port,host:port`` (or a sequence of them) -> canonical tuple; None or empty -> None."""
    if value is None:
        return None
    if isinstance(value, str):
        items = [s for s in value.split(",")]
        if not value.strip():
            return None
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ConfigError(f"{source}={value!r} is not valid; expected host:port[,host:port...]")
    if any(isinstance(s, str) and not s.strip() for s in items):
        raise ConfigError(f"{source}={value!r} has an empty entry; expected host:port[,host:port...]")
    eps = [str(check_endpoint(source, s)) for s in items]
    if len(set(eps)) != len(eps):
        raise ConfigError(f"{source}={value!r} names a server twice; expected each host:port once")
    if len(eps) > MAX_SERVERS:
        raise ConfigError(f"{source}: {len(eps)} servers; llama.cpp's RPC backend takes at most {MAX_SERVERS}")
    return tuple(eps) or None


# ---- the reachability check ----
def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionResetError("the server closed the connection")
        buf += chunk
    return buf


def _command(sock: socket.socket, cmd: int, payload: bytes, reply_size: int) -> bytes:
    sock.sendall(struct.pack("<BQ", cmd, len(payload)) + payload)
    size = struct.unpack("<Q", _recv_exact(sock, 8))[0]
    if size != reply_size:
        raise ValueError(f"unexpected reply size {size} (expected {reply_size})")
    return _recv_exact(sock, size)


def probe(endpoint: str, timeout: float = PROBE_TIMEOUT) -> int:
    """Connect to an RPC server, check its protocol version, return how many devices it serves.

    Raises RPCError naming ``host:port`` (refused, unknown host, no answer within ``timeout``, a
    version mismatch, no device). Closes the connection: the server then accepts the next client.
    """
    ep = check_endpoint("rpc server", endpoint)
    deadline = time.monotonic() + timeout
    try:
        addr = socket.gethostbyname(ep.host)
    except OSError as exc:
        raise RPCError(f"RPC server {ep}: cannot resolve host {ep.host!r} ({exc})") from None
    try:
        sock = socket.create_connection((addr, ep.port), timeout=timeout)
    except ConnectionRefusedError:
        raise RPCError(f"RPC server {ep} refused the connection: is `pyllm rpc-server --port {ep.port}` "
                       f"running on {ep.host}?") from None
    except socket.timeout:
        raise RPCError(f"RPC server {ep} did not accept a connection within {timeout:g} s") from None
    except OSError as exc:
        raise RPCError(f"RPC server {ep} is unreachable: {exc.strerror or exc}") from None
    try:
        sock.settimeout(max(deadline - time.monotonic(), 0.1))
        hello = _command(sock, _CMD_HELLO, bytes(_CONN_CAPS_SIZE), 4 + _CONN_CAPS_SIZE)
        major, minor, patch = hello[0], hello[1], hello[2]
        if major != RPC_PROTO_MAJOR_VERSION or minor > RPC_PROTO_MINOR_VERSION:
            raise RPCError(f"RPC server {ep} speaks RPC protocol {major}.{minor}.{patch}; this build of pyllm "
                           f"speaks {RPC_PROTO_MAJOR_VERSION}.{RPC_PROTO_MINOR_VERSION}.x: run the same pyllm "
                           "(llama.cpp pin) on both sides")
        (count,) = struct.unpack("<I", _command(sock, _CMD_DEVICE_COUNT, b"", 4))
    except socket.timeout:
        raise RPCError(f"RPC server {ep} accepted the connection but did not answer the handshake within "
                       f"{timeout:g} s (llama.cpp's rpc-server serves one client at a time: is another "
                       "process connected to it?)") from None
    except (OSError, ValueError) as exc:
        raise RPCError(f"RPC server {ep} broke off the handshake ({exc}); is it a llama.cpp rpc-server?") from None
    finally:
        sock.close()
    if count == 0:
        raise RPCError(f"RPC server {ep} reports no device")
    return int(count)


# ---- the client: devices of each server ----
_lock = threading.Lock()
_registries: dict[str, Any] = {}


def server_devices(endpoints: Sequence[str], *, timeout: float = PROBE_TIMEOUT) -> list:
    """The ``ggml_backend_dev_t`` of every device the servers serve, in order (checked with
    :func:`probe` first). A server's registry is created once per process, as llama.cpp does."""
    from pyllm._ffi import ffi, lib
    from pyllm._runtime import ensure_backend

    if not lib.pyllm_build_rpc():
        raise ConfigError("rpc_servers: this build of pyllm has no RPC backend (it was built with PYLLM_RPC=0); "
                          "rebuild with the default PYLLM_RPC=1")
    ensure_backend()
    out = []
    for ep in endpoints:
        with _lock:
            reg = _registries.get(ep)
        if reg is None:
            probe(ep, timeout)
            lib.pyllm_rpc_fatal_hook(ep.encode())
            reg = lib.pyllm_rpc_add_server(ep.encode())
            if reg == ffi.NULL:
                raise RPCError(f"RPC server {ep} reports no device")
            with _lock:
                _registries[ep] = reg
        out += [lib.ggml_backend_reg_dev_get(reg, i) for i in range(int(lib.ggml_backend_reg_dev_count(reg)))]
    return out


def _peer_sockets(endpoints: Iterable[str]) -> list[int]:
    """File descriptors of this process's TCP sockets connected to one of the endpoints (Linux /proc)."""
    wanted = set()
    for ep in endpoints:
        e = check_endpoint("rpc server", ep)
        try:
            wanted.add((socket.gethostbyname(e.host), e.port))
        except OSError:
            continue
    fds = []
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return fds
    for name in names:
        fd = int(name)
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            s = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        try:
            if s.family == socket.AF_INET and s.type == socket.SOCK_STREAM and s.getpeername() in wanted:
                fds.append(fd)
        except OSError:
            pass
        finally:
            s.close()
    return fds


def arm_connections(endpoints: Iterable[str], timeout: float) -> int:
    """Give ggml-rpc's open connections to these servers a receive/send timeout and TCP keep-alive, so
    that a server that stops answering ends the request (llama.cpp then ends the process, naming the
    server) after ``timeout`` seconds instead of blocking forever. Returns how many sockets it armed."""
    if not sys.platform.startswith("linux"):
        return 0
    tv = struct.pack("ll", int(timeout), int((timeout - int(timeout)) * 1e6))
    n = 0
    for fd in _peer_sockets(endpoints):
        s = socket.socket(fileno=os.dup(fd))
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            idle = max(1, min(int(timeout), 60))
            for opt, val in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", max(1, idle // 3)), ("TCP_KEEPCNT", 3),
                             ("TCP_USER_TIMEOUT", int(timeout * 1000))):
                if hasattr(socket, opt):
                    s.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), val)
            n += 1
        except OSError:
            pass
        finally:
            s.close()
    return n


# ---- the server ----
def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind_host(host: str, allow_remote: bool) -> str:
    """The address rpc-server binds: an IPv4 address; a non-loopback one only with ``allow_remote``."""
    h = host.strip() if isinstance(host, str) else host
    if h == "localhost":
        h = "127.0.0.1"
    try:
        addr = ipaddress.ip_address(h)
    except (ValueError, TypeError):
        raise ConfigError(f"--host {host!r} is not an IPv4 address; expected e.g. 127.0.0.1 "
                          "(llama.cpp's rpc-server binds IPv4 addresses only)") from None
    if addr.version != 4:
        raise ConfigError(f"--host {host!r} is IPv6; llama.cpp's rpc-server binds IPv4 addresses only")
    if not addr.is_loopback and not allow_remote:
        raise ConfigError(
            f"--host {host!r} is not a loopback address: llama.cpp's RPC server has no authentication and "
            "anyone who reaches the port can allocate memory and run computations on this machine's devices. Bind 127.0.0.1 and reach it over an SSH/WireGuard tunnel, or pass --allow-remote on a "
            "private network you trust.")
    return str(addr)


def serve(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *, threads: Optional[int] = None,
          cache: bool = False, allow_remote: bool = False) -> int:
    """Run llama.cpp's RPC server in this process until it is killed. Returns 1 only if it could not
    start (the port is taken, ...). Validates everything before any native call."""
    import signal

    from pyllm._ffi import ffi, lib
    from pyllm._runtime import ensure_backend

    bind = check_bind_host(host, allow_remote)
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"--port {port!r} is out of range; expected an integer in [1, 65535]")
    n_threads = threads if threads is not None else max(1, (os.cpu_count() or 2) // 2)
    if isinstance(n_threads, bool) or not isinstance(n_threads, int) or not 1 <= n_threads <= 1024:
        raise ConfigError(f"--threads {n_threads!r} is out of range; expected an integer in [1, 1024]")
    if not lib.pyllm_build_rpc():
        raise ConfigError("this build of pyllm has no RPC backend (built with PYLLM_RPC=0)")
    if not is_loopback(bind):
        print(f"pyllm rpc-server: WARNING: listening on {bind}:{port} without authentication; anyone who can "
              "reach this port can use this machine's devices. Use a private network or an SSH/WireGuard tunnel.",
              file=sys.stderr, flush=True)
    cache_dir = None
    if cache:
        base = os.environ.get("LLAMA_CACHE") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "llama.cpp")
        cache_dir = os.path.join(base, "rpc")
        try:
            os.makedirs(cache_dir, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"--cache: cannot create the cache folder {cache_dir}: {exc.strerror or exc}") from None
    # Check the port is free first: llama.cpp's own bind failure gives no reason.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((bind, port))
        except OSError as exc:
            raise ConfigError(f"rpc-server cannot listen on {bind}:{port}: {exc.strerror or exc}") from None
    ensure_backend()
    # The server loop never returns to Python: let SIGINT/SIGTERM end the process as C programs do.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    sys.stdout.flush()
    rc = int(lib.pyllm_rpc_serve(f"{bind}:{port}".encode(), cache_dir.encode() if cache_dir else ffi.NULL, n_threads))
    return 1 if rc else 0
