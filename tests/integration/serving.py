"""What the HTTP tests share: an app served by uvicorn on a free port, in a thread (not a test module)."""
from __future__ import annotations

import socket
import threading
import time

import uvicorn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """An app served by uvicorn on a random port, in a thread, with the HTTP implementation ``pyllm serve``
    uses (h11); ``url``, ``stop()``."""

    def __init__(self, app) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    http="h11"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def wait_idle(engine, timeout: float = 30.0) -> dict:
    """Poll ``engine.stats()`` until nothing runs or waits (AssertionError after ``timeout`` s); the stats."""
    deadline = time.monotonic() + timeout
    while True:
        s = engine.stats()
        if s["active"] == 0 and s["queued"] == 0:
            return s
        assert time.monotonic() < deadline, f"engine still busy: {s}"
        time.sleep(0.02)
