"""pyllm serve end to end: the real default model in a BatchedEngine behind the real app and uvicorn.

The app runs on a random port in a uvicorn thread (one engine for the module); the official
``openai`` client and raw ``httpx`` talk to it over TCP. SIGTERM is tested on a real
``python -m pyllm.server`` process. Outputs are kept short (a few tokens) to keep the run modest.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pyllm.batched import BatchedEngine
from pyllm.config import EngineConfig
from pyllm.sampling import SamplingParams
from pyllm.server import create_app
from .serving import Running as _Running, free_port as _free_port, wait_idle as _wait_idle

N_CTX, N_PARALLEL, MAX_QUEUE = 2048, 4, 4
API_KEY = "s3cret-key"
GREEDY = SamplingParams(temperature=0.0)




@pytest.fixture(scope="module")
def engine(default_model_path):
    config = EngineConfig(model_path=str(default_model_path), n_ctx=N_CTX, n_parallel=N_PARALLEL)
    with BatchedEngine(config, max_queue=MAX_QUEUE) as eng:
        yield eng


@pytest.fixture(scope="module")
def server(engine):
    running = _Running(create_app(engine, aliases=("gemma",)))
    yield running
    running.stop()


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


@pytest.fixture
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)



def _chat_tokens(engine, messages) -> list[int]:
    text = engine.model.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=True)
    return engine.tokenize(text, parse_special=True)


def _sse_lines(response) -> list[str]:
    return [line for line in response.iter_lines() if line]


MESSAGES = [{"role": "user", "content": "Name three primary colors."}]


# ---------------------------------------------------------------------------------------------
# Real generation through the official client
# ---------------------------------------------------------------------------------------------
def test_chat_completion_matches_the_engine_and_counts_usage(oai, engine):
    models = oai.models.list()
    name = models.data[0].id
    assert name == Path(str(engine.model.path)).name
    out = oai.chat.completions.create(model=name, messages=MESSAGES, max_tokens=8, temperature=0)
    tokens = _chat_tokens(engine, MESSAGES)
    expected = engine.generate(tokens, max_tokens=8, sampling=GREEDY)
    choice = out.choices[0]
    assert out.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.message.content == expected.text and expected.text.strip()
    assert out.usage.prompt_tokens == len(tokens)
    assert out.usage.completion_tokens == len(expected.tokens)
    assert out.usage.total_tokens == len(tokens) + len(expected.tokens)
    assert choice.finish_reason == ("length" if len(expected.tokens) == 8 else "stop")
    # An alias names the same model; the second identical prompt reuses the cached prefix.
    again = oai.chat.completions.create(model="gemma", messages=MESSAGES, max_tokens=8, temperature=0)
    assert again.choices[0].message.content == expected.text
    assert 0 < again.usage.prompt_tokens_details.cached_tokens < len(tokens)


def test_chat_streaming_with_usage_ends_with_done(oai, http, engine):
    name = oai.models.list().data[0].id
    stream = oai.chat.completions.create(model=name, messages=MESSAGES, max_tokens=8, temperature=0, stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    expected = engine.generate(_chat_tokens(engine, MESSAGES), max_tokens=8, sampling=GREEDY)
    assert text == expected.text
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length" if len(expected.tokens) == 8 else "stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected.tokens)
    # The wire format itself: server-sent events, the last one [DONE].
    with http.stream("POST", "/v1/chat/completions",
                     json={"messages": MESSAGES, "max_tokens": 4, "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = _sse_lines(r)
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    assert all("usage" not in json.loads(line[6:]) for line in lines[:-1])  # not asked for


def test_completions_text_and_token_prompts(oai, engine):
    name = oai.models.list().data[0].id
    prompt = "The capital of France is"
    expected = engine.generate(prompt, max_tokens=6, sampling=GREEDY)
    out = oai.completions.create(model=name, prompt=prompt, max_tokens=6, temperature=0)
    assert out.choices[0].text == expected.text and out.usage.prompt_tokens == expected.n_prompt
    ids = engine.tokenize(prompt)
    by_ids = oai.completions.create(model=name, prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == expected.text
    streamed = oai.completions.create(model=name, prompt=prompt, max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected.text


def test_chat_logprobs_in_openais_shape(oai, engine):
    name = oai.models.list().data[0].id
    out = oai.chat.completions.create(model=name, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True,
                                      top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens == 6
    assert b"".join(bytes(e.bytes) for e in content).decode() == out.choices[0].message.content
    for e in content:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        # greedy: the sampled token is the most likely one, with the same logprob
        assert e.top_logprobs[0].token == e.token and e.top_logprobs[0].logprob == pytest.approx(e.logprob)
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
    plain = oai.chat.completions.create(model=name, messages=MESSAGES, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None
    # Streamed: each chunk carries its own tokens' entries; together they are the whole text's.
    stream = oai.chat.completions.create(model=name, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True,
                                         stream=True)
    chunks = [c for c in stream if c.choices]
    entries = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    # (the values differ a little from the first request's: this one reuses its cached prompt, and a row
    # decoded in another batch shape gets slightly different logits)
    assert [e.token for e in entries] == [e.token for e in content]
    assert all(e.logprob <= 0 and e.top_logprobs == [] for e in entries)
    for c in chunks:  # a chunk's entries spell its text
        if c.choices[0].delta.content and c.choices[0].logprobs:
            assert "".join(e.token for e in c.choices[0].logprobs.content) == c.choices[0].delta.content


def test_completion_logprobs_in_openais_legacy_shape(http, oai, engine):
    name = oai.models.list().data[0].id
    out = oai.completions.create(model=name, prompt="The capital of France is", max_tokens=5, temperature=0,
                                 logprobs=2)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert "".join(lp.tokens) == out.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    for tok, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) <= 2 and max(top.values()) == pytest.approx(logprob) and top.get(tok) == pytest.approx(logprob)
    streamed = oai.completions.create(model=name, prompt="The capital of France is", max_tokens=5, temperature=0,
                                      logprobs=0, stream=True)
    parts = [c.choices[0].logprobs for c in streamed if c.choices and c.choices[0].logprobs]
    assert [t for p in parts for t in p.tokens] == lp.tokens
    assert [o for p in parts for o in p.text_offset] == lp.text_offset
    assert all(top == {} for p in parts for top in p.top_logprobs)


def test_logprobs_bad_values_are_400(http):
    for body, fragment in (({"logprobs": 2}, "expected true or false"), ({"top_logprobs": 2}, "needs logprobs=true"),
                           ({"logprobs": True, "top_logprobs": 21}, "top_logprobs=21 is out of range")):
        r = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 1, **body})
        assert r.status_code == 400 and fragment in r.json()["error"]["message"], (body, r.text)


def test_stop_strings_and_seeded_sampling(http, engine):
    prompt = "1, 2, 3, 4, 5,"
    full = engine.generate(prompt, max_tokens=12, sampling=GREEDY).text
    assert " 7" in full, full
    r = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 12, "temperature": 0, "stop": " 7"})
    body = r.json()
    assert body["choices"][0]["text"] == full[:full.index(" 7")] and body["choices"][0]["finish_reason"] == "stop"
    sampled = {"prompt": prompt, "max_tokens": 8, "temperature": 1.0, "top_k": 40, "top_p": 0.9, "min_p": 0.01,
               "seed": 1234}
    a, b = (http.post("/v1/completions", json=sampled).json()["choices"][0]["text"] for _ in range(2))
    assert a == b


def test_sixteen_concurrent_streams(server, engine):
    prompts = [f"Write the number {i} in words:" for i in range(16)]
    results: dict[int, list[str]] = {}
    peak = {"active": 0}
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            peak["active"] = max(peak["active"], engine.stats()["active"])
            time.sleep(0.005)

    def one(i):
        with httpx.Client(base_url=server.url, timeout=120) as c:
            with c.stream("POST", "/v1/completions", json={"prompt": prompts[i], "max_tokens": 8, "temperature": 0,
                                                           "stream": True, "stream_options": {"include_usage": True}}) as r:
                results[i] = [r.status_code] + _sse_lines(r)

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    stop.set()
    watcher.join()
    # np=4 + max_queue=4: at most 8 are accepted at once, the rest are answered 503 + Retry-After.
    ok = [i for i, lines in results.items() if lines[0] == 200]
    assert len(results) == 16 and len(ok) >= N_PARALLEL + MAX_QUEUE
    for i in ok:
        lines = results[i][1:]
        assert lines[-1] == "data: [DONE]"
        usage = json.loads(lines[-2][6:])["usage"]
        text = "".join(json.loads(line[6:])["choices"][0]["text"] for line in lines[:-2])
        assert usage["completion_tokens"] > 0 and text
    assert peak["active"] > 1  # they really ran side by side
    _wait_idle(engine)


# ---------------------------------------------------------------------------------------------
# Bad input: 4xx in OpenAI's shape, and the server keeps serving
# ---------------------------------------------------------------------------------------------
BAD = [
    (b"{not json", 400, "not valid JSON"),
    (b'{"messages": []}', 400, "messages is empty"),
    (b'{"messages": "hi"}', 400, "messages"),
    (b'{"messages": [{"role": "wizard", "content": "x"}]}', 400, "messages[0].role"),
    (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}', 400, "max_tokens"),
    (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 1.5}', 400, "max_tokens"),
    (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": "5"}', 400, "max_tokens"),
    (b'{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}', 400, "temperature"),
    (b'{"messages": [{"role": "user", "content": "x"}], "temperature": -1}', 400, "temperature"),
    (b'{"messages": [{"role": "user", "content": "x"}], "n": 99}', 400, "n=99 is out of range"),
    (b'{"messages": [{"role": "user", "content": "x"}], "stop": 5}', 400, "stop"),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, "not valid JSON"),
    (b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, "UTF-8"),
    (b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', 400, "only text parts"),
    (b'{"messages": [{"role": "user", "content": "x"}], "model": "gpt-4"}', 404, "does not exist"),
    (b'{"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"seconds": 1e9}}', 400,
     "may not set seconds"),
    (b"[]", 400, "object"),
    (b"", 400, "empty"),
]


def test_bad_requests_are_4xx_and_the_server_keeps_serving(http, engine):
    for body, status, fragment in BAD:
        r = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert fragment in err["message"] and set(err) == {"message", "type", "param", "code"}, (body, err)
    long_prompt = "hello " * (N_CTX + 100)
    for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": long_prompt}]}),
                       ("/v1/completions", {"prompt": long_prompt})):
        r = http.post(path, json=body)
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    for body, fragment in (({"prompt": [engine.model.n_vocab]}, "outside the vocabulary"), ({"prompt": ""}, "empty"),
                           ({"prompt": ["a", "b"]}, "one per request"), ({"prompt": "x", "logprobs": 21}, "logprobs"),
                           ({"prompt": "x", "logprobs": True}, "logprobs"),
                           ({"prompt": "x", "logprobs": 1, "top_logprobs": 1}, "chat completions field")):
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 400 and fragment in r.json()["error"]["message"], (body, r.text)
    assert http.get("/v1/nothing").status_code == 404
    assert http.get("/v1/chat/completions").status_code == 405
    r = http.post("/detokenize", json={"tokens": [-5]})
    assert r.status_code == 400 and "outside the vocabulary" in r.json()["error"]["message"]
    # A max_tokens larger than the context is capped by it, not an error.
    r = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 10**9, "temperature": 0, "stop": ["\n", "."]})
    assert r.status_code == 200, r.text
    # And after all that, real work still works.
    r = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0
    _wait_idle(engine)


def test_body_size_limit_is_413(engine):
    running = _Running(create_app(engine, max_body_bytes=4096))
    try:
        with httpx.Client(base_url=running.url, timeout=60) as c:
            big = {"prompt": "x" * 10_000, "max_tokens": 1}
            r = c.post("/v1/completions", json=big)
            assert r.status_code == 413 and "larger than the limit of 4096 bytes" in r.json()["error"]["message"]

            def chunked():  # no Content-Length: the limit is enforced while reading
                yield json.dumps(big).encode()

            r = c.post("/v1/completions", content=chunked(), headers={"content-type": "application/json"})
            assert r.status_code == 413
            assert c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1}).status_code == 200
    finally:
        running.stop()


# ---------------------------------------------------------------------------------------------
# Auth, tokenize, metrics, health
# ---------------------------------------------------------------------------------------------
def test_api_key_guards_every_endpoint_but_health(engine):
    running = _Running(create_app(engine, api_key=API_KEY))
    try:
        with httpx.Client(base_url=running.url, timeout=60) as c:
            assert c.get("/health").status_code == 200
            for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/chat/completions"),
                                 ("POST", "/v1/completions"), ("POST", "/tokenize"), ("POST", "/detokenize")):
                for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY},
                                {"Authorization": f"Basic {API_KEY}"}):
                    r = c.request(method, path, headers=headers, json={})
                    assert r.status_code == 401, (path, headers, r.text)
                    assert r.json()["error"]["type"] == "authentication_error"
                    assert r.headers["www-authenticate"] == "Bearer"
            ok = {"Authorization": f"Bearer {API_KEY}"}
            assert c.get("/v1/models", headers=ok).status_code == 200
            assert c.post("/tokenize", headers=ok, json={"content": "Hi"}).status_code == 200
        client = openai.OpenAI(base_url=running.url + "/v1", api_key=API_KEY, max_retries=0)
        out = client.chat.completions.create(model=client.models.list().data[0].id, messages=MESSAGES, max_tokens=2)
        assert out.usage.completion_tokens > 0
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=running.url + "/v1", api_key="nope", max_retries=0).models.list()
    finally:
        running.stop()


def test_tokenize_and_detokenize_follow_llama_server(http, engine):
    text = "Hello world, <start_of_turn>"
    r = http.post("/tokenize", json={"content": text})
    assert r.json() == {"tokens": engine.model.tokenize(text, add_special=False, parse_special=True)}
    r = http.post("/tokenize", json={"content": "Hello world", "add_special": True, "with_pieces": True})
    toks = r.json()["tokens"]
    assert toks[0]["id"] == engine.model.bos and [t["piece"] for t in toks[1:]] == ["Hello", " world"]
    ids = engine.model.tokenize("Hello world", add_special=False)
    assert http.post("/detokenize", json={"tokens": ids}).json() == {"content": "Hello world"}


def _metric(text: str, name: str, **labels) -> float:
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise AssertionError(f"{name} {labels} not in /metrics")


def test_metrics_are_prometheus_text(http, engine):
    before = http.get("/metrics").text
    r = http.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 5, "temperature": 0,
                                           "ignore_eos": True})
    assert r.status_code == 200
    after = http.get("/metrics")
    assert after.headers["content-type"].startswith("text/plain")
    text = after.text
    assert _metric(text, "pyllm_completion_tokens_total") - _metric(before, "pyllm_completion_tokens_total") == 5
    assert _metric(text, "pyllm_http_requests_total", endpoint="/v1/completions", status="200") >= 1
    assert _metric(text, "pyllm_kv_cells_total") == N_CTX
    assert _metric(text, "pyllm_n_parallel") == N_PARALLEL
    kv = engine.kv_cache_bytes()
    assert _metric(text, "pyllm_kv_cache_bytes", cache="k", type="f16") == kv.k
    assert _metric(text, "pyllm_kv_cache_bytes", cache="v", type="f16") == kv.v
    for name in ("pyllm_requests_queued", "pyllm_requests_running", "pyllm_kv_cells_used", "pyllm_tokens_per_second",
                 "pyllm_engine_tokens_generated_total", "pyllm_time_to_first_token_seconds_count"):
        assert _metric(text, name) >= 0
    assert _metric(text, "pyllm_engine_tokens_generated_total") >= 5


def test_kv_cache_usage_ratio_is_the_running_requests_share(http, engine):
    """The 0..1 gauge a router reads: running requests' cells over the pool, idle prefix caches excluded."""

    def idle_ratio() -> float:
        # the engine publishes its KV figures at the end of a step, just after the last request finished
        _wait_idle(engine)
        deadline = time.monotonic() + 10
        while (ratio := _metric(http.get("/metrics").text, "pyllm_kv_cache_usage_ratio")) != 0.0 \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        return ratio

    assert idle_ratio() == 0.0
    body = {"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        # a few events in: the engine publishes its KV figures at the end of a step, so the one that admitted
        # the request may still be running when its first event arrives
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        running = _metric(http.get("/metrics").text, "pyllm_kv_cache_usage_ratio")
        reserved = engine.stats()["kv_cells_reserved"]
    assert 0.0 < running <= 1.0
    assert running >= min(1.0, reserved / N_CTX) - 1e-9 or reserved == 0
    assert idle_ratio() == 0.0
    # a finished request leaves its cells as an idle prefix cache, which the ratio does not count
    assert http.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 4}).status_code == 200
    assert idle_ratio() == 0.0
    assert _metric(http.get("/metrics").text, "pyllm_kv_cells_cached") > 0


def test_health_is_503_while_the_model_loads(engine):
    release = threading.Event()

    def loader():
        release.wait(30)
        return engine

    running = _Running(create_app(loader=loader, close_engine=False))
    try:
        with httpx.Client(base_url=running.url, timeout=30) as c:
            r = c.get("/health")
            assert r.status_code == 503 and r.json()["error"]["message"] == "Loading model"
            assert c.post("/v1/completions", json={"prompt": "Hi"}).status_code == 503
            release.set()
            deadline = time.monotonic() + 30
            while c.get("/health").status_code != 200:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            assert c.get("/health").json() == {"status": "ok"}
    finally:
        release.set()
        running.stop()
    assert not engine.closed  # close_engine=False: the app did not close what it was lent


# ---------------------------------------------------------------------------------------------
# Load and faults
# ---------------------------------------------------------------------------------------------
def test_full_queue_answers_503_with_retry_after(http, engine):
    _wait_idle(engine)
    held = [engine.submit("Tell me a long story.", max_tokens=200, ignore_eos=True)
            for _ in range(N_PARALLEL + MAX_QUEUE)]
    try:
        r = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2})
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        assert r.json()["error"]["code"] == "queue_full"
        s = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "stream": True})
        assert s.status_code == 503 and "retry-after" in s.headers
    finally:
        for req in held:
            req.cancel()
    _wait_idle(engine)
    assert http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200


def test_client_disconnect_cancels_and_frees_kv_cells(server, http, engine):
    _wait_idle(engine)
    engine.drop_cache()  # idle prefix caches of earlier tests out of the way: 0 cells used
    assert engine.stats()["kv_cells_used"] == 0
    body = {"prompt": "Tell me a very long story about a dragon.", "max_tokens": 1000, "ignore_eos": True,
            "stream": True, "temperature": 0}
    with httpx.Client(base_url=server.url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(10)]
            assert all(line.startswith("data: ") or not line for line in got)
            during = _metric(http.get("/metrics").text, "pyllm_kv_cells_used")
            assert during > 10 and engine.stats()["active"] == 1
        # Leaving the block closes the connection mid-stream.
    s = _wait_idle(engine, timeout=10)
    assert s["tokens_generated_total"] > 0
    after = _metric(http.get("/metrics").text, "pyllm_kv_cells_used")
    assert after == 0, "a cancelled request's cells are freed, not kept as a prefix cache"
    assert _metric(http.get("/metrics").text, "pyllm_requests_cancelled_total") >= 1

    # A non-streaming request whose client goes away is cancelled too (long before 1000 tokens).
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        payload = json.dumps({**body, "stream": False}).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
        deadline = time.monotonic() + 10
        while engine.stats()["active"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    t0 = time.monotonic()
    _wait_idle(engine, timeout=10)
    assert time.monotonic() - t0 < 5 and engine.stats()["kv_cells_used"] == 0


def _start_server(tmp_path, default_model_path, *extra, **env):
    port = _free_port()
    cmd = [sys.executable, "-m", "pyllm.server", "--port", str(port), "-c", "1024", "-np", "2", *extra]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "MODEL_PATH": str(default_model_path), **env})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.communicate()[0]
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server did not become healthy"
        time.sleep(0.1)


def test_sigterm_lets_running_requests_finish_then_exits_0(tmp_path, default_model_path):
    proc, url = _start_server(tmp_path, default_model_path, "--grace", "60")
    try:
        lines: list[str] = []
        started = threading.Event()

        def stream():
            with httpx.stream("POST", url + "/v1/completions", timeout=120,
                              json={"prompt": "Count: 1, 2, 3,", "max_tokens": 48, "ignore_eos": True,
                                    "temperature": 0, "stream": True}) as r:
                for line in r.iter_lines():
                    if line:
                        lines.append(line)
                        started.set()

        t = threading.Thread(target=stream)
        t.start()
        assert started.wait(60)
        proc.send_signal(signal.SIGTERM)
        t.join(120)
        assert lines[-1] == "data: [DONE]", lines[-3:]
        assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_after_the_grace_period_cancels_and_exits_0(tmp_path, default_model_path):
    proc, url = _start_server(tmp_path, default_model_path, "--grace", "0.5")
    try:
        got: list[str] = []
        started = threading.Event()

        def stream():
            try:
                with httpx.stream("POST", url + "/v1/completions", timeout=120,
                                  json={"prompt": "Tell me a story.", "max_tokens": 900, "ignore_eos": True,
                                        "stream": True}) as r:
                    for line in r.iter_lines():
                        got.append(line)
                        started.set()
            except httpx.HTTPError:
                pass  # cut off by the shutdown: expected

        t = threading.Thread(target=stream)
        t.start()
        assert started.wait(60)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert time.monotonic() - t0 < 20, "the grace period was not honoured"
        t.join(30)
        assert "data: [DONE]" not in got  # 900 tokens cannot finish in half a second
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_rejects_bad_settings_in_one_line(tmp_path, default_model_path):
    for args, env, fragment in ((["--port", "70000"], {}, "port=70000"), ([], {"PORT": "http"}, "PORT='http'"),
                                ([], {"LLAMA_PARALLEL": "0"}, "LLAMA_PARALLEL")):
        out = subprocess.run([sys.executable, "-m", "pyllm.server", *args], cwd=tmp_path, capture_output=True,
                             text=True, timeout=120, env={**os.environ, "MODEL_PATH": str(default_model_path), **env})
        assert out.returncode != 0 and fragment in out.stderr, (args, env, out.stderr)
