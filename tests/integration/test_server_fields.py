"""pyllm serve's request fields, over HTTP: each field that changes the output is honoured (the same
tokens as the library given the same setting) or refused with a 400 naming it; the pool is shared
fairly; metrics count each event once. The real default model in a BatchedEngine behind uvicorn."""
from __future__ import annotations

import json
import math
import socket
import threading
import time

import httpx
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from pyllm.batched import BatchedEngine
from pyllm.config import EngineConfig
from pyllm.sampling import SamplingParams
from pyllm.server import create_app

N_CTX, N_PARALLEL = 2048, 4
GREEDY = SamplingParams(temperature=0.0)
PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "Name three primary colors."}]


class _Running:
    """An app served by uvicorn on a random port, in a thread."""

    def __init__(self, app) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def engine(default_model_path):
    config = EngineConfig(model_path=str(default_model_path), n_ctx=N_CTX, n_parallel=N_PARALLEL)
    with BatchedEngine(config, max_queue=4) as eng:
        yield eng


@pytest.fixture(scope="module")
def server(engine):
    running = _Running(create_app(engine))
    yield running
    running.stop()


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


def _wait_idle(engine, timeout=30.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.stats()["active"] or engine.stats()["queued"]:
        assert time.monotonic() < deadline, f"engine still busy: {engine.stats()}"
        time.sleep(0.02)


def _metric(http, name: str) -> float:
    for fam in text_string_to_metric_families(http.get("/metrics").text):
        for sample in fam.samples:
            if sample.name == name:
                return sample.value
    raise AssertionError(f"{name} not in /metrics")


def _complete(http, **body) -> dict:
    r = http.post("/v1/completions", json={"prompt": PROMPT, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def _bad(http, path: str, body: dict, param: str) -> str:
    base = {"prompt": PROMPT} if path == "/v1/completions" else {"messages": MESSAGES}
    r = http.post(path, json={**base, "max_tokens": 2, **body})
    assert r.status_code == 400, (body, r.text)
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", (body, err)
    return err["message"]


# ---------------------------------------------------------------------------------------------
# Metrics count each event once
# ---------------------------------------------------------------------------------------------
def test_a_disconnect_is_counted_as_one_cancellation(server, http, engine):
    body = {"prompt": "Tell me a very long story about a dragon.", "max_tokens": 500, "ignore_eos": True,
            "temperature": 0}
    for stream in (False, True):
        _wait_idle(engine)
        before = _metric(http, "pyllm_requests_cancelled_total")
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            payload = json.dumps({**body, "stream": stream}).encode()
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
            deadline = time.monotonic() + 10
            while engine.stats()["active"] == 0:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        _wait_idle(engine, timeout=10)
        time.sleep(0.2)  # the handler's clean-up runs after the engine has let the request go
        assert _metric(http, "pyllm_requests_cancelled_total") - before == 1, f"stream={stream}"
