"""``pyllm serve --replicas 2`` on a real local Ray (2 CPUs): two replicas of a small synthetic model
answer concurrent streams, a conversation's turns stay on one replica (prefix affinity), replicas
answer as ``pyllm serve`` does (auth, errors, metrics, 503 when full, cancellation on disconnect), a killed replica's
stream ends with an error event while the other streams on and Ray replaces it, and SIGINT leaves no
Ray process behind.

One Ray instance (the command's) serves the whole module; skipped where ``ray[serve]`` is not installed."""
from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install 'pyllm[ray]')")
httpx = pytest.importorskip("httpx")

from .serving import free_port  # noqa: E402

CLI = [sys.executable, "-c", "import sys; from pyllm.cli import main; sys.exit(main())"]
TEMPLATE = ("{% for m in messages %}<start_of_turn>{{ m.role }}\n{{ m.content }}<end_of_turn>\n{% endfor %}"
            "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
KEY = "test-key-replicas"
N_PARALLEL, MAX_QUEUE = 2, 2   # a replica admits 4 requests; a 5th gets 503
SYSTEM = "You are a careful assistant. " * 20   # a long shared head, as agents send


def _marked(marker: str) -> list[int]:
    """Processes whose environment carries ``marker`` (the command, Ray's daemons and workers inherit it)."""
    found = []
    needle = f"PYLLM_REPLICAS_TEST={marker}".encode()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if needle in env.split(b"\0"):
            found.append(int(pid))
    return found


class Replicas:
    def __init__(self, model: Path, tmp: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.marker = uuid.uuid4().hex
        env = dict(os.environ, PYLLM_REPLICAS_TEST=self.marker, PYLLM_API_KEY=KEY,
                   RAY_USAGE_STATS_ENABLED="0", RAY_DEDUP_LOGS="0")
        self.log = open(tmp / "serve.log", "w+")
        self.proc = subprocess.Popen(
            CLI + ["serve", "--replicas", "2", "-m", str(model), "-c", "4096", "-np", str(N_PARALLEL), "-t", "1",
                   "--port", str(self.port), "--cache-ram", "0", "--max-queue", str(MAX_QUEUE)],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=tmp)
        self.stopped = False

    def wait_ready(self, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"pyllm serve --replicas exited with {self.proc.returncode}:\n{self.output()}")
            try:
                seen = set()
                for _ in range(8):   # both replicas answer /health
                    r = httpx.get(self.url + "/health", timeout=5)
                    if r.status_code != 200:
                        break
                    seen.add(r.headers.get("x-pyllm-replica"))
                if len(seen) == 2:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise AssertionError(f"the replicas were not ready within {timeout} s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-6000:]

    def stop(self, timeout: float = 90.0) -> int:
        if not self.stopped:
            self.stopped = True
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"pyllm serve --replicas did not stop within {timeout} s:\n{self.output()}")
        return self.proc.returncode


@pytest.fixture(scope="module")
def replicas(synthetic, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("replicas")
    model = synthetic.write_llama(tmp / "chat.gguf", n_embd=64, n_layer=2, n_head=4, n_head_kv=2,
                                  chat_template=TEMPLATE)
    server = Replicas(model, tmp)
    try:
        server.wait_ready()
        yield server
    finally:
        if not server.stopped:
            server.stop()
        leftover = _marked(server.marker)
        for pid in leftover:   # never leave them running after a failure
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def _headers() -> dict:
    return {"Authorization": f"Bearer {KEY}"}


def _chat(url: str, messages: list, max_tokens: int = 8, stream: bool = False) -> httpx.Response:
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    return httpx.post(url + "/v1/chat/completions", json=body, headers=_headers(), timeout=120)


def test_concurrent_streams_are_answered_by_both_replicas(replicas):
    def stream(i: int) -> tuple[str, dict]:
        body = {"messages": [{"role": "user", "content": f"conversation {i}: {uuid.uuid4().hex}"}],
                "max_tokens": 16, "temperature": 0, "stream": True, "ignore_eos": True,
                "stream_options": {"include_usage": True}}
        with httpx.stream("POST", replicas.url + "/v1/chat/completions", json=body, headers=_headers(),
                          timeout=120) as r:
            assert r.status_code == 200, r.read()
            assert r.headers["content-type"].startswith("text/event-stream")
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        events = [json.loads(line[len("data: "):]) for line in lines[:-1]]
        assert [c["choices"][0]["finish_reason"] for c in events if c["choices"]][-1] == "length"
        return r.headers["x-pyllm-replica"], events[-1]["usage"]

    with concurrent.futures.ThreadPoolExecutor(4) as pool:   # fits one replica: no 503 however they are routed
        results = list(pool.map(stream, range(4)))
    for _replica, usage in results:
        assert usage["completion_tokens"] == 16, usage
    # New conversations have no cached prefix: they go to the least-loaded replica, ties at random.
    seen = {rep for rep, _ in results}
    for i in range(20):
        if len(seen) == 2:
            break
        r = _chat(replicas.url, [{"role": "user", "content": f"spread {i} {uuid.uuid4().hex}"}], max_tokens=1)
        assert r.status_code == 200, r.text
        seen.add(r.headers["x-pyllm-replica"])
    assert len(seen) == 2, f"every request went to {seen}"


def test_a_conversation_stays_on_one_replica(replicas):
    for conversation in range(3):
        messages = [{"role": "system", "content": SYSTEM + f"(conversation {conversation} {uuid.uuid4().hex})"}]
        where = []
        for turn in range(4):
            messages.append({"role": "user", "content": f"turn {turn}: tell me more"})
            r = _chat(replicas.url, messages)
            assert r.status_code == 200, r.text
            where.append(r.headers["x-pyllm-replica"])
            messages.append({"role": "assistant", "content": r.json()["choices"][0]["message"]["content"]})
            if turn > 0:   # this turn's prompt starts with the previous turn's: its replica reused it
                assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0, r.json()["usage"]
        assert len(set(where)) == 1, f"conversation {conversation}'s turns went to {where}"


def test_replicas_answer_as_pyllm_serve_does(replicas):
    r = httpx.post(replicas.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]},
                   timeout=30)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.post(replicas.url + "/v1/chat/completions", content=b"{not json", headers=_headers(), timeout=30)
    assert r.status_code == 400 and "error" in r.json()
    r = httpx.post(replicas.url + "/v1/chat/completions", headers=_headers(), timeout=30,
                   json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "n": "two"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    r = httpx.get(replicas.url + "/v1/models", headers=_headers(), timeout=30)
    assert r.status_code == 200 and r.json()["data"][0]["id"] == "chat.gguf"
    r = httpx.get(replicas.url + "/metrics", headers=_headers(), timeout=30)
    assert r.status_code == 200 and "llamacpp:requests_processing" in r.text


def test_a_full_replica_answers_503_with_retry_after_and_the_others_complete(replicas):
    n = 3 * (N_PARALLEL + MAX_QUEUE)   # the two replicas admit 2 * (n_parallel + max_queue) at most

    def request(i: int) -> httpx.Response:
        body = {"messages": [{"role": "user", "content": f"flood {i} {uuid.uuid4().hex}"}], "max_tokens": 1000,
                "temperature": 0, "ignore_eos": True}
        return httpx.post(replicas.url + "/v1/chat/completions", json=body, headers=_headers(), timeout=120)

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        answers = list(pool.map(request, range(n)))
    full = [r for r in answers if r.status_code == 503]
    done = [r for r in answers if r.status_code == 200]
    assert len(full) + len(done) == n, [(r.status_code, r.text[:200]) for r in answers]
    assert len(full) >= n - 2 * (N_PARALLEL + MAX_QUEUE), f"{len(full)} of {n} requests were refused"
    assert done, "every request was refused"
    for r in full:
        error = r.json()["error"]   # the engine's own refusal, as pyllm serve answers it
        assert r.headers.get("retry-after") and error["code"] == "queue_full", r.text
        assert f"max_queue {MAX_QUEUE}" in error["message"], r.text
    for r in done:
        assert r.json()["usage"]["completion_tokens"] == 1000


def _cancelled(text: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("pyllm_requests_cancelled_total"))


def test_a_stream_the_client_abandons_is_cancelled(replicas):
    body = {"messages": [{"role": "user", "content": f"long {uuid.uuid4().hex}"}], "max_tokens": 1900,
            "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", replicas.url + "/v1/chat/completions", json=body, headers=_headers(), timeout=60) as r:
        assert r.status_code == 200
        replica = r.headers["x-pyllm-replica"]
        for n, _line in enumerate(r.iter_lines()):
            if n >= 4:
                break
    # The replica that streamed it counts the request as cancelled by the disconnect, and goes idle.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        r = httpx.get(replicas.url + "/metrics", headers=_headers(), timeout=30)
        if r.headers["x-pyllm-replica"] == replica and _cancelled(r.text) >= 1:
            slots = httpx.get(replicas.url + "/slots", headers=_headers(), timeout=30)
            if slots.headers["x-pyllm-replica"] == replica:
                assert not any(s["is_processing"] for s in slots.json())
            return
        time.sleep(0.3)
    pytest.fail(f"replica {replica} did not count the abandoned stream as cancelled within 60 s")


def _replica_processes(marker: str) -> list[int]:
    out = []
    for pid in _marked(marker):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"PyllmReplica" in title:
            out.append(pid)
    return out


def test_a_killed_replica_ends_its_streams_with_an_error_and_is_replaced(replicas):
    victims = _replica_processes(replicas.marker)
    assert len(victims) == 2, f"expected 2 replica processes, found {victims}"
    before = set()
    for _ in range(20):
        before.add(httpx.get(replicas.url + "/health", timeout=10).headers["x-pyllm-replica"])
    streams = []
    for i in range(2):   # the second goes to the other replica: the first one is busier
        body = {"messages": [{"role": "user", "content": f"doomed {i} {uuid.uuid4().hex}"}], "max_tokens": 1900,
                "temperature": 0, "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
        cm = httpx.stream("POST", replicas.url + "/v1/chat/completions", json=body, headers=_headers(), timeout=60)
        r = cm.__enter__()
        assert r.status_code == 200
        lines = r.iter_lines()
        first = [next(lines) for _ in range(3)]
        streams.append((cm, r, lines, first))
    assert len({r.headers["x-pyllm-replica"] for _, r, _, _ in streams}) == 2
    os.kill(victims[0], signal.SIGKILL)
    ends = []
    t0 = time.monotonic()
    for cm, r, lines, first in streams:
        rest = [line for line in lines if line.startswith("data: ")]
        cm.__exit__(None, None, None)
        ends.append(rest)
    assert time.monotonic() - t0 < 60, "a stream hung after its replica was killed"
    errors = [rest for rest in ends if rest and '"error"' in rest[-1]]
    complete = [rest for rest in ends if rest and rest[-1] == "data: [DONE]"]
    assert len(errors) == 1 and len(complete) == 1, [rest[-2:] for rest in ends]
    usage = json.loads(complete[0][-2][len("data: "):])["usage"]
    assert usage["completion_tokens"] == 1900, usage
    # Ray starts a new replica in the killed one's place; requests keep being answered meanwhile.
    deadline = time.monotonic() + 180
    after: set = set()
    while time.monotonic() < deadline:
        r = httpx.get(replicas.url + "/health", timeout=30)
        if r.status_code == 503:   # routed to the dead replica before Ray noticed: a clean error, not a hang
            assert r.json()["error"]["type"] == "unavailable_error", r.text
            time.sleep(0.5)
            continue
        assert r.status_code == 200, r.text
        after.add(r.headers["x-pyllm-replica"])
        if len(after - before) >= 1 and len(after) >= 2:
            break
        time.sleep(0.5)
    assert after - before, f"no new replica answered within 180 s (before {before}, after {after})"
    r = _chat(replicas.url, [{"role": "user", "content": "still there?"}], max_tokens=2)
    assert r.status_code == 200, r.text


def test_sigint_stops_serve_and_ray_leaves_no_process(replicas):
    assert _marked(replicas.marker), "no Ray process carries the test's marker: the check below would prove nothing"
    assert replicas.stop() == 0, replicas.output()
    deadline = time.monotonic() + 30
    while (left := _marked(replicas.marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes left after shutdown: {left}"
