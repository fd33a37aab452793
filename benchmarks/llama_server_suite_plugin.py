"""A pytest plugin for llama-server's suite as benchmarks/llama_server_suite.py runs it (``-p`` on its path).

- The suite's session fixture starts every server preset once, online, so that each downloads its model;
  here every model is the local GGUF the wrapper injects, so that start-up round is skipped.
- Each test gets ``PYLLM_SUITE_TEST_TIMEOUT`` seconds (SIGALRM): a server that hangs fails its test
  instead of stalling the run (the suite's own per-request limit is 600 s).
"""
from __future__ import annotations

import os
import signal

import pytest


def pytest_sessionstart(session) -> None:
    import utils  # the suite's utils.py, importable once its conftest has loaded

    utils.ServerPreset.load_all = staticmethod(lambda: None)


class TestTimeout(Exception):
    pass


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    limit = int(os.environ.get("PYLLM_SUITE_TEST_TIMEOUT", "0") or 0)

    def expired(signum, frame):
        raise TestTimeout(f"the test ran longer than {limit} s (PYLLM_SUITE_TEST_TIMEOUT)")

    if limit > 0:
        old = signal.signal(signal.SIGALRM, expired)
        signal.alarm(limit)
    try:
        yield
    finally:
        if limit > 0:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
