"""Replicas of ``pyllm serve`` on Ray Serve, with prefix-affinity routing (``pip install 'pyllm[ray]'``).

Two deployments make one Ray Serve application:

- ``PyllmReplica`` (``num_replicas`` of them): each owns one BatchedEngine, built from the same
  EngineConfig and ServeSettings as ``pyllm serve``, and runs the very app ``create_app`` builds
  (routes, auth, 503 on a full queue, metrics): each request is handed to that ASGI app in-process,
  its response messages streamed back. A client that goes away ends the request as in ``pyllm serve``
  (the app sees ``http.disconnect`` and cancels the engine request). Every response carries
  ``x-pyllm-replica``, the Ray Serve replica id that answered.
- ``PyllmIngress`` (one, no CPU reserved): Ray Serve's HTTP entry. It reads the body, computes the
  prompt's hash chain (pyllm.server.affinity) and forwards method, path, headers and body to a
  replica chosen by ``PrefixAffinityRouter``. Endpoints about one engine (/health, /metrics, /slots)
  answer for the replica the request lands on.

Routing (``PrefixAffinityRouter``, Ray Serve's request-router API): each replica reports through
``record_routing_stats`` the hashes of the prompt chains it holds (the requests it served, at most
``n_parallel`` + its host prompt-cache entries of them: as many distinct prompts as its slots and
``--cache-ram`` tier can keep; an approximation of the engine's cache, not a read of it) and its load
(``queued``, ``active``, ``kv_cells_free``). The router also remembers for ``bridge_s`` seconds where it
sent each chain, which covers the time until the next report. A request goes to the replica whose chains
cover the longest prefix of its own, unless that replica has more than ``imbalance_threshold`` ongoing
requests more than the least-loaded one (Ray's queue-length probe); then, and for prompts no replica
holds, to the least-loaded (fewest ongoing requests, then most free KV cells, ties at random).

Started by ``pyllm serve --replicas N`` (Ray on this machine), or against a running cluster with
``serve run pyllm.server.replicas:build num_replicas=2`` (settings from the environment, and the
``PYLLM_ENV_FILE`` .env file, of the process that runs ``serve run``) or a Ray Serve config file with that ``import_path`` (settings in its
``runtime_env``); the model file must exist at the same path on every node.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from typing import Optional

from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from pyllm.config import EngineConfig
from pyllm.errors import ConfigError
from pyllm.server.affinity import RecentChains, match_chars, prefix_chain
from pyllm.server.run import ServeSettings, app_options, prepare

log = logging.getLogger("pyllm.server")

__all__ = ["PrefixAffinityRouter", "PyllmReplica", "PyllmIngress", "build_app", "build", "serve_replicas"]

REPLICA_HEADER = b"x-pyllm-replica"


class PrefixAffinityRouter(RequestRouter):
    """Longest cached prompt prefix first, unless that replica is much busier than the least-loaded.

    Options (``request_router_kwargs``): ``imbalance_threshold`` (ongoing requests, default 4): how many
    more requests than the least-loaded replica the best-matching one may have and still be chosen;
    ``bridge_s`` (seconds, default 30): how long the router trusts its own record of where it sent a
    prompt, until the replicas' reports (every ``request_routing_stats_period_s``) carry it.

    Each choice probes every candidate's queue length (Ray's ``_probe_queue_lens``, one small RPC per
    replica), so the load it compares is current, not the last report's.
    """

    def initialize_state(self, imbalance_threshold: int = 4, bridge_s: float = 30.0) -> None:
        if isinstance(imbalance_threshold, bool) or not isinstance(imbalance_threshold, int) or imbalance_threshold < 0:
            raise ConfigError(f"imbalance_threshold={imbalance_threshold!r} is out of range; expected an integer >= 0")
        if isinstance(bridge_s, bool) or not isinstance(bridge_s, (int, float)) or not 0 <= bridge_s <= 3600:
            raise ConfigError(f"bridge_s={bridge_s!r} is out of range; expected seconds in [0, 3600]")
        self.imbalance_threshold = imbalance_threshold
        self.bridge_s = float(bridge_s)
        self._sent: dict[ReplicaID, RecentChains] = {}

    def _state(self) -> None:
        if not hasattr(self, "imbalance_threshold"):   # Ray calls initialize_state first; a router built otherwise
            self.initialize_state()

    @staticmethod
    def _chain(pending_request: Optional[PendingRequest]) -> list:
        if pending_request is None or not pending_request.args:
            return []
        arg = pending_request.args[0]
        return arg.get("prefix") or [] if isinstance(arg, dict) else []

    def matched(self, replica: RunningReplica, chain: list) -> int:
        """Prompt characters of ``chain`` this replica holds (its report, or this router's recent record)."""
        if not chain:
            return 0
        reported = set((replica.routing_stats or {}).get("prefix_hashes", ()))
        sent = self._sent.get(replica.replica_id)
        best = match_chars(chain, reported)
        if sent is not None:
            sent.trim(sent.capacity)
            best = max(best, match_chars(chain, sent))
        return best

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> list[list[RunningReplica]]:
        self._state()
        if not candidate_replicas:
            return []
        probed = await self._probe_queue_lens(candidate_replicas, 0)
        load = {r.replica_id: q for r, q in probed if q is not None}
        live = [r for r in candidate_replicas if r.replica_id in load]
        if not live:
            return [candidate_replicas]
        random.shuffle(live)   # equal loads: new conversations spread over the replicas
        by_load = sorted(live, key=lambda r: (load[r.replica_id],
                                              -int((r.routing_stats or {}).get("kv_cells_free", 0))))
        least = by_load[0]
        chain = self._chain(pending_request)
        best, best_chars = None, 0
        for r in by_load:   # the least-loaded of equal matches
            m = self.matched(r, chain)
            if m > best_chars:
                best, best_chars = r, m
        if best is not None and load[best.replica_id] - load[least.replica_id] <= self.imbalance_threshold:
            return [[best]] + [[r] for r in by_load if r is not best]
        return [[r] for r in by_load]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        self._state()
        chain = self._chain(pending_request)
        if chain:
            self._sent.setdefault(replica_id, RecentChains(4096, ttl_s=self.bridge_s)).add(chain)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self._state()
        live = {r.replica_id for r in replicas}
        for rid in [rid for rid in self._sent if rid not in live]:
            del self._sent[rid]


class PyllmReplica:
    """One engine behind the same app as ``pyllm serve``; see the module docstring."""

    async def __init__(self, config: EngineConfig, settings: ServeSettings) -> None:
        from pyllm.batched import BatchedEngine
        from pyllm.server.app import create_app

        self._engine = await asyncio.to_thread(BatchedEngine, config, max_queue=settings.max_queue)
        try:
            self._app = create_app(self._engine, close_engine=True, **app_options(settings))
            self._lifespan = contextlib.AsyncExitStack()
            await self._lifespan.enter_async_context(self._app.router.lifespan_context(self._app))
        except BaseException:
            self._engine.close()
            raise
        self._held = RecentChains(1024)
        try:
            self._id = serve.get_replica_context().replica_id.unique_id.encode()
        except Exception:   # not running as a Ray Serve replica: the header names no replica id
            self._id = b"local"

    async def handle_http(self, request: dict):
        """Run one HTTP request (``method``, ``path``, ``query_string``, ``headers``, ``body``, ``client``,
        ``prefix``) through the app; yields its ASGI response messages."""
        self._held.add(request.get("prefix") or ())
        # spec_version 2.3: Starlette's StreamingResponse then listens for http.disconnect (as under uvicorn)
        # and cancels the stream; from 2.4 on it would wait for a failed send, which never comes here.
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": request["method"], "scheme": "http", "path": request["path"],
                 "raw_path": request.get("raw_path") or request["path"].encode(),
                 "query_string": request.get("query_string", b""),
                 "root_path": "", "headers": request["headers"], "client": request.get("client"),
                 "server": None, "state": {}}
        body = request.get("body", b"")
        disconnected = asyncio.Event()
        sent_body = False

        async def receive() -> dict:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": body, "more_body": False}
            await disconnected.wait()
            return {"type": "http.disconnect"}

        out: asyncio.Queue = asyncio.Queue()

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = dict(message, headers=[*message.get("headers", ()), (REPLICA_HEADER, self._id)])
            await out.put(message)

        task = asyncio.ensure_future(self._app(scope, receive, send))
        task.add_done_callback(lambda _t: out.put_nowait(None))
        try:
            while (message := await out.get()) is not None:
                yield message
            await task   # an exception the app did not answer itself
        finally:
            if not task.done():   # the caller went away: the app sees a disconnect, as under uvicorn
                disconnected.set()
                done, _ = await asyncio.wait({task}, timeout=10)
                if not done:
                    task.cancel()

    def record_routing_stats(self) -> dict:
        """What PrefixAffinityRouter reads: ``prefix_hashes`` (the chains this replica holds, see the module
        docstring; none while its engine holds no cells and no host-cache entry), ``queued``/``active``
        requests and ``kv_cells_free`` (cells holding nothing)."""
        stats = self._engine.stats()
        entries = int(stats.get("prompt_cache_entries", 0))
        if not stats.get("kv_cells_used") and not entries and not stats.get("active") and not stats.get("queued"):
            self._held.trim(0)   # the engine holds no prompt at all (say, after POST /slots/N?action=erase)
        self._held.trim(int(stats.get("n_parallel", 1)) + entries)
        return {"prefix_hashes": self._held.hashes(), "queued": stats.get("queued", 0),
                "active": stats.get("active", 0),
                "kv_cells_free": int(stats["n_ctx"]) - int(stats.get("kv_cells_used", 0))}

    def check_health(self) -> None:
        if self._engine.closed:
            raise RuntimeError("the engine is closed")

    async def __del__(self) -> None:
        lifespan = getattr(self, "_lifespan", None)   # absent when __init__ failed (it closed the engine)
        if lifespan is not None:
            await lifespan.aclose()   # the app's lifespan closes the engine


class _Forward:
    """The ingress's ASGI app: one HTTP request in, the chosen replica's response out."""

    def __init__(self, replicas, max_body_bytes: int) -> None:
        self._replicas = replicas
        self._max_body = max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            if size <= self._max_body:   # past the limit the replica's Guard answers 413 from what it gets
                chunks.append(chunk)
                size += len(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        path = scope["path"]
        request = {"method": scope["method"], "path": path, "raw_path": scope.get("raw_path"),
                   "query_string": scope.get("query_string", b""),
                   "headers": list(scope.get("headers", ())), "body": body, "client": scope.get("client"),
                   "prefix": prefix_chain(path, body) if scope["method"] == "POST" else []}
        gen = self._replicas.options(stream=True).handle_http.remote(request)
        started = sse = finished = False
        try:
            async for message in gen:
                if message["type"] == "http.response.start":
                    started = True
                    sse = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                              for k, v in message.get("headers", ()))
                await send(message)
                if message["type"] == "http.response.body" and not message.get("more_body", False):
                    finished = True
        except Exception as exc:   # the replica died or failed: a clean error, never a hang
            log.warning("replica failed answering %s %s: %s", scope["method"], path, exc)
            if not started:
                from pyllm.server.errors import APIError

                await APIError(503, f"the replica answering this request failed: {type(exc).__name__}",
                               headers={"Retry-After": "1"}).response()(scope, receive, send)
                finished = True
            elif not finished:
                if sse:
                    import json

                    err = {"error": {"message": f"the replica answering this request failed: {type(exc).__name__}",
                                     "type": "unavailable_error", "code": 503}}
                    await send({"type": "http.response.body", "body": f"data: {json.dumps(err)}\n\n".encode(),
                                "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                finished = True
        finally:
            if not finished:
                gen.cancel()


@serve.ingress()
class PyllmIngress:
    def __init__(self, replicas, max_body_bytes: int) -> None:
        self._replicas = replicas
        self._max_body = max_body_bytes

    def __serve_build_asgi_app__(self):
        return _Forward(self._replicas, self._max_body)


ROUTERS = ("prefix-affinity", "power-of-two")


def build_app(config: EngineConfig, settings: ServeSettings, num_replicas: int, *, num_cpus: float = 1,
              num_gpus: float = 0, imbalance_threshold: int = 4, routing_stats_period_s: float = 1.0,
              router: str = "prefix-affinity"):
    """The Ray Serve application: ``num_replicas`` PyllmReplica (``num_cpus``/``num_gpus`` Ray resources
    each) behind one PyllmIngress that routes with PrefixAffinityRouter (``router="power-of-two"``: Ray
    Serve's default router instead, the baseline benchmarks/replicas.py compares against)."""
    if isinstance(num_replicas, bool) or not isinstance(num_replicas, int) or num_replicas < 1:
        raise ConfigError(f"replicas={num_replicas!r} is out of range; expected an integer >= 1")
    if router not in ROUTERS:
        raise ConfigError(f"router={router!r} is not known; expected one of {', '.join(ROUTERS)}")
    if isinstance(imbalance_threshold, bool) or not isinstance(imbalance_threshold, int) or imbalance_threshold < 0:
        raise ConfigError(f"imbalance_threshold={imbalance_threshold!r} is out of range; expected an integer >= 0")
    for name, value in (("num_cpus", num_cpus), ("num_gpus", num_gpus)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(f"{name}={value!r} is out of range; expected a number >= 0")
    per_replica = config.n_parallel + settings.max_queue + 8   # the engine answers 503 itself when full
    routing = {} if router == "power-of-two" else {"request_router_config": RequestRouterConfig(
        request_router_class=PrefixAffinityRouter, request_router_kwargs={"imbalance_threshold": imbalance_threshold},
        request_routing_stats_period_s=routing_stats_period_s)}
    replica = serve.deployment(
        PyllmReplica, name="PyllmReplica", num_replicas=num_replicas, max_ongoing_requests=per_replica,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
        graceful_shutdown_timeout_s=max(settings.grace_s, 1.0), **routing,
    ).bind(config, settings)
    ingress = serve.deployment(PyllmIngress, name="PyllmIngress", num_replicas=1,
                               max_ongoing_requests=num_replicas * per_replica + 64,
                               ray_actor_options={"num_cpus": 0})
    return ingress.bind(replica, settings.max_body_bytes)


def build(args: dict):
    """``serve run pyllm.server.replicas:build num_replicas=2 [num_gpus=1 num_cpus=1 imbalance_threshold=4
    router=prefix-affinity|power-of-two]``
    against a running Ray cluster; engine and server settings from the environment (and
    ``PYLLM_ENV_FILE``), as ``pyllm serve``'s."""
    known = {"num_replicas": int, "num_cpus": float, "num_gpus": float, "imbalance_threshold": int, "router": str}
    unknown = sorted(set(args) - set(known))
    if unknown:
        raise ConfigError(f"unknown argument(s) {', '.join(unknown)}; expected some of {', '.join(known)}")
    kw = {}
    for name, kind in known.items():
        if name in args:
            try:
                kw[name] = kind(args[name])
            except (TypeError, ValueError):
                raise ConfigError(f"{name}={args[name]!r} is not a{'n integer' if kind is int else ' number'}") from None
    config, settings = prepare()
    return build_app(config, settings, kw.pop("num_replicas", 1), **kw)


def serve_replicas(config: Optional[EngineConfig], settings: Optional[ServeSettings], num_replicas: int, *,
                   num_cpus: float = 1, imbalance_threshold: int = 4, router: str = "prefix-affinity") -> int:
    """``pyllm serve --replicas N``: start Ray on this machine, serve N replicas on ``settings``'
    host/port until SIGINT/SIGTERM, then shut Serve and Ray down. One GPU per replica when Ray sees at
    least N GPUs, none otherwise. Returns the exit status (0 after a clean stop)."""
    import os
    import signal
    import threading

    import ray

    config, settings = prepare(config, settings)
    if log.level == logging.NOTSET:   # as pyllm serve: where it listens is shown unless configured otherwise
        log.setLevel(logging.INFO)
    if len(settings.hosts) != 1:
        raise ConfigError(f"host={settings.host!r}: Ray Serve binds one address; give one with --replicas")
    options = dict(num_cpus=num_cpus, imbalance_threshold=imbalance_threshold, router=router)
    app = build_app(config, settings, num_replicas, **options)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        # address="local": always a new Ray instance on this machine, even where RAY_ADDRESS names a cluster
        # (serve run is the way onto a cluster).
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, int(num_replicas * num_cpus + 0.999)),
                 include_dashboard=False, logging_level=logging.WARNING)
        try:
            gpus = ray.cluster_resources().get("GPU", 0)
            if gpus >= num_replicas:
                app = build_app(config, settings, num_replicas, num_gpus=1, **options)
            serve.start(http_options={"host": settings.hosts[0], "port": settings.port})
            serve.run(app, name="pyllm", route_prefix="/", blocking=False)
            log.info("serving %d replica(s) on http://%s:%d", num_replicas, settings.hosts[0], settings.port)
            while not stop.wait(0.5):
                pass
            log.info("stopping the replicas")
        finally:
            with contextlib.suppress(Exception):
                serve.shutdown()
            ray.shutdown()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
