"""benchmarks/serve_load.py's own machinery (no model, no timing): the request mix, the statistics,
and that the server processes it starts are always gone when it is done with them."""
from __future__ import annotations

import importlib.util
import os
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load_benchmarks():
    """benchmarks/serve_load.py as a module (it imports its neighbour benchlib as a script does)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("pyllm_serve_load", ROOT / "benchmarks" / "serve_load.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # its dataclasses look their module up there
        spec.loader.exec_module(mod)
        return mod, sys.modules["benchlib"]
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


serve_load, benchlib = _load_benchmarks()

# A stand-in server: answers GET /health with 200 on the port it is given; optionally ignores SIGTERM
# and starts a child of its own (to check the whole process group goes).
FAKE = textwrap.dedent("""
    import http.server, os, signal, subprocess, sys
    port, mode, pidfile = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    if mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if mode == "crash":
        print("model failed to load", flush=True)
        sys.exit(3)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    open(pidfile, "w").write(f"{os.getpid()} {child.pid}")
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
        def log_message(self, *a):
            pass
    http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent) counts as gone
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _fake(tmp_path, mode: str, grace_s: float = 15.0):
    script = tmp_path / "fake_server.py"
    script.write_text(FAKE)
    pidfile = tmp_path / f"{mode}.pid"
    argv = lambda port: [sys.executable, str(script), str(port), mode, str(pidfile)]  # noqa: E731
    return serve_load.ServerProcess(mode, argv, tmp_path / f"{mode}.log", grace_s=grace_s), pidfile


def _wait_gone(pids, timeout=10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


def test_server_starts_on_a_free_port_and_stop_ends_its_whole_process_group(tmp_path):
    srv, pidfile = _fake(tmp_path, "polite")
    srv.start(timeout_s=30)
    try:
        import httpx

        assert httpx.get(srv.url + "/health").status_code == 200
        pids = [int(x) for x in pidfile.read_text().split()]
        assert all(_alive(p) for p in pids)
    finally:
        srv.stop()
    assert _wait_gone(pids) == []
    assert srv.stop() is None  # idempotent


def test_a_server_that_ignores_sigterm_is_killed_after_the_grace(tmp_path):
    srv, pidfile = _fake(tmp_path, "stubborn", grace_s=0.5)
    srv.start(timeout_s=30)
    pids = [int(x) for x in pidfile.read_text().split()]
    t0 = time.monotonic()
    srv.stop()
    assert time.monotonic() - t0 < 10
    assert _wait_gone(pids) == []


def test_a_server_that_dies_while_starting_is_reported_with_its_log(tmp_path):
    srv, _ = _fake(tmp_path, "crash")
    with pytest.raises(SystemExit, match="exited with status 3(.|\n)*model failed to load"):
        srv.start(timeout_s=30)
    assert srv.proc is None


def test_the_request_mix_is_seeded_and_no_two_prompts_share_a_prefix():
    corpus = list(range(1000, 6000))
    a = serve_load.make_requests(corpus, 2, 40, [16, 64], [8, 32], seed="1/4/0")
    b = serve_load.make_requests(corpus, 2, 40, [16, 64], [8, 32], seed="1/4/0")
    c = serve_load.make_requests(corpus, 2, 40, [16, 64], [8, 32], seed="1/4/1")
    assert [(s.prompt, s.max_tokens, s.seed) for s in a] == [(s.prompt, s.max_tokens, s.seed) for s in b]
    assert [s.prompt for s in a] != [s.prompt for s in c]
    assert {len(s.prompt) for s in a} == {16, 64} and {s.max_tokens for s in a} == {8, 32}
    assert all(s.prompt[0] == 2 for s in a)
    assert len({s.prompt[1] for s in a}) == len(a)  # distinct offsets: no shared prefix past the BOS


def test_a_prompt_longer_than_the_corpus_is_a_clear_error():
    with pytest.raises(SystemExit, match="prompt length 64 is longer than the corpus"):
        serve_load.make_requests(list(range(10)), None, 1, [64], [8], seed=0)


@pytest.mark.parametrize("q", [0, 50, 90, 99, 100])
def test_percentile_is_numpys_linear_percentile(q):
    xs = [0.3, 0.1, 5.0, 2.2, 0.7, 0.9, 1.4]
    assert benchlib.percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))


def test_ratios_are_paired_by_round():
    assert benchlib.ratio_summary([9.0, 12.0, 10.0], [10.0, 12.0, 8.0]) == pytest.approx((1.0, 0.9, 1.25))
    with pytest.raises(ValueError, match="expected pairs"):
        benchlib.paired_ratios([1.0], [1.0, 2.0])


def test_the_table_has_a_row_per_n_and_dashes_for_a_server_not_measured():
    s = {"tokens_per_s": 100.0, "tokens_per_s_rounds": [100.0, 90.0], "ttft_p50_ms": 50.0, "ttft_p99_ms": 80.0,
         "ttft_p99_ms_rounds": [80.0, 70.0], "itl_p50_ms": 10.0, "itl_p99_ms": 20.0}
    t = serve_load.table({"4": {"pyllm": s, "llama-server": dict(s, tokens_per_s_rounds=[100.0, 100.0])},
                          "1": {"pyllm": s}})
    rows = t.splitlines()[2:]
    assert rows[0].startswith("| 1 | 100.0 | - | - |")
    assert rows[1].startswith("| 4 | 100.0 | 100.0 | 0.950 (0.90-1.00) |")
