"""pyllm serve's request fields, over HTTP: each field that changes the output is honoured (the same
tokens as the library given the same setting) or refused with a 400 naming it; the pool is shared
fairly; metrics count each event once. The real default model in a BatchedEngine behind uvicorn."""
from __future__ import annotations

import json
import math
import socket
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pyllm.batched import BatchedEngine
from pyllm.config import EngineConfig
from pyllm.sampling import SamplingParams
from pyllm.server import create_app
from .serving import Running as _Running, wait_idle as _wait_idle

N_CTX, N_PARALLEL = 2048, 4
GREEDY = SamplingParams(temperature=0.0)
PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "Name three primary colors."}]



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
# logit_bias: OpenAI's map and llama-server's forms, on the greedy fast path and in the chain
# ---------------------------------------------------------------------------------------------
def test_logit_bias_changes_the_output_as_the_library_does(http, engine):
    first = engine.generate(PROMPT, max_tokens=1).tokens[0]
    piece = engine.model.token_to_piece(first).decode()
    assert engine.model.tokenize(piece, add_special=False) == [first]  # the text form names the same token
    plain = engine.generate(PROMPT, max_tokens=6).text
    banned = engine.generate(PROMPT, max_tokens=6, sampling=SamplingParams(temperature=0.0,
                                                                           logit_bias={first: -math.inf})).text
    assert banned != plain
    for bias in ({str(first): -100}, {str(first): False}, [[first, -100]], [[piece, False]], {piece: -100}):
        out = _complete(http, max_tokens=6, logit_bias=bias)
        assert out["choices"][0]["text"] == banned, bias
    # through the sampler chain (top_k=1 keeps it deterministic), and on the chat endpoint
    out = _complete(http, max_tokens=6, temperature=1.0, top_k=1, seed=3, logit_bias={str(first): -100})
    assert out["choices"][0]["text"] == banned
    forced = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 3, "temperature": 0,
                                                     "logit_bias": {str(first): 100}}).json()
    assert forced["choices"][0]["message"]["content"] == piece * 3


@pytest.mark.parametrize("bias, fragment", [
    ({"999999999": 1}, "outside the vocabulary"),
    ({"5": "x"}, "not a finite number"),
    ({"5": True}, "not a finite number"),
    ([[5]], "expected a [token, bias] pair"),
    ("abc", "expected an object"),
    ({"": 1}, "neither a token id nor text"),
])
def test_bad_logit_bias_is_a_400_naming_it(http, bias, fragment):
    assert fragment in _bad(http, "/v1/completions", {"logit_bias": bias}, "logit_bias")


# ---------------------------------------------------------------------------------------------
# The output limit: max_tokens, max_completion_tokens, n_predict on both endpoints
# ---------------------------------------------------------------------------------------------
def test_every_limit_alias_is_honoured_on_both_endpoints(http):
    for field in ("max_tokens", "max_completion_tokens", "n_predict"):
        out = _complete(http, ignore_eos=True, **{field: 3})
        assert out["usage"]["completion_tokens"] == 3 and out["choices"][0]["finish_reason"] == "length", field
        r = http.post("/v1/chat/completions", json={"messages": MESSAGES, "temperature": 0, "ignore_eos": True,
                                                    field: 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, (field, r.text)
    same = _complete(http, max_tokens=2, n_predict=2, max_completion_tokens=2, ignore_eos=True)
    assert same["usage"]["completion_tokens"] == 2
    # n_predict 0 (llama-server): the prompt is decoded, nothing generated
    zero = _complete(http, n_predict=0)
    assert zero["usage"]["completion_tokens"] == 0 and zero["choices"][0]["text"] == ""
    msg = _bad(http, "/v1/completions", {"max_tokens": 3, "n_predict": 4}, "n_predict")
    assert "max_tokens=3 and n_predict=4 disagree" in msg
    _bad(http, "/v1/chat/completions", {"max_tokens": None, "max_completion_tokens": 3, "n_predict": 5}, "n_predict")
    _bad(http, "/v1/completions", {"n_predict": -2}, "n_predict")


def test_a_too_long_completion_prompt_names_prompt(http):
    r = http.post("/v1/completions", json={"prompt": "hello " * (N_CTX + 100)})
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "context_length_exceeded" and err["param"] == "prompt", err


# ---------------------------------------------------------------------------------------------
# Sampling fields that reach the chain: typical_p, repeat_last_n; seed -1 is llama-server's "random"
# ---------------------------------------------------------------------------------------------
def test_typical_p_and_repeat_last_n_reach_the_sampler(http, engine):
    base = dict(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=11)
    with_typical = engine.generate(PROMPT, max_tokens=12, sampling=SamplingParams(**base, typical_p=0.2)).text
    without = engine.generate(PROMPT, max_tokens=12, sampling=SamplingParams(**base)).text
    assert with_typical != without  # the setting matters for this prompt and seed
    out = _complete(http, max_tokens=12, typical_p=0.2, **base)
    assert out["choices"][0]["text"] == with_typical
    pen = dict(temperature=0.0, repeat_penalty=1.8)
    short = engine.generate("1, 1, 1, 1, 1, 1,", max_tokens=8, sampling=SamplingParams(**pen, repeat_last_n=2)).text
    long_ = engine.generate("1, 1, 1, 1, 1, 1,", max_tokens=8, sampling=SamplingParams(**pen, repeat_last_n=64)).text
    assert short != long_
    r = http.post("/v1/completions", json={"prompt": "1, 1, 1, 1, 1, 1,", "max_tokens": 8, "repeat_last_n": 2, **pen})
    assert r.json()["choices"][0]["text"] == short
    assert _complete(http, max_tokens=2, seed=-1, temperature=1.0)["usage"]["completion_tokens"] >= 1
    _bad(http, "/v1/completions", {"typical_p": 2.0}, "typical_p")


# ---------------------------------------------------------------------------------------------
# Fields that would change the output and are not implemented: 400 naming them; neutral values pass
# ---------------------------------------------------------------------------------------------
REFUSED = [
    ("mirostat", 2), ("dry_multiplier", 0.8), ("xtc_probability", 0.5), ("top_n_sigma", 1.0),
    ("dynatemp_range", 0.5), ("samplers", ["top_k", "temperature"]), ("min_keep", 5), ("lora", [{"id": 0, "scale": 1}]),
    ("n_indent", 4), ("t_max_predict_ms", 100), ("n_cache_reuse", 256), ("n_probs", 3), ("post_sampling_probs", True),
    ("n_cmpl", 2), ("response_fields", ["content"]), ("return_tokens", True), ("timings_per_token", True),
    ("reasoning_format", "deepseek-legacy"), ("reasoning_budget_tokens", 16), ("parse_tool_calls", True),
    ("best_of", 2), ("prediction", {"type": "content", "content": "x"}), ("audio", {"voice": "alloy"}),
    ("modalities", ["text", "audio"]), ("functions", [{"name": "f"}]), ("function_call", {"name": "f"}),
    ("verbosity", "low"), ("web_search_options", {}), ("continue_final_message", True),
    ("add_generation_prompt", False),
]


# served on chat completions (tests in test_server_llama_api.py), refused on /v1/completions
CHAT_HONOURED = {"timings_per_token", "continue_final_message", "add_generation_prompt",
                 "reasoning_budget_tokens"}   # met where the template does not reason (the default model's)


@pytest.mark.parametrize("path, field, value", [
    (path, field, value) for field, value in REFUSED for path in ("/v1/completions", "/v1/chat/completions")
    if not (path == "/v1/chat/completions" and field in CHAT_HONOURED)])
def test_unimplemented_output_fields_are_400_naming_them(http, path, field, value):
    assert "not supported" in _bad(http, path, {field: value}, field)


def test_forced_tool_calls_without_tools_and_completion_only_fields_are_refused(http):
    for choice in ("required", {"type": "function", "function": {"name": "f"}}):
        _bad(http, "/v1/chat/completions", {"tool_choice": choice}, "tool_choice")
    _bad(http, "/v1/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools")
    _bad(http, "/v1/completions", {"reasoning_effort": "low"}, "reasoning_effort")
    _bad(http, "/v1/completions", {"echo": True}, "echo")


def test_neutral_values_and_bookkeeping_fields_are_accepted(http):
    neutral = {"mirostat": 0, "mirostat_tau": 5.0, "typical_p": 1.0, "dry_multiplier": 0.0, "dry_base": 1.75,
               "xtc_probability": 0, "xtc_threshold": 0.1, "top_n_sigma": -1, "dynatemp_range": 0, "min_keep": 0,
               "n_probs": 0, "grammar": "", "response_format": {"type": "text"}, "reasoning_format": "auto",
               "n_keep": 0, "id_slot": -1, "user": "u1", "metadata": {"k": "v"}, "store": False,
               "service_tier": "auto", "best_of": 1, "modalities": ["text"], "tool_choice": "none",
               "parallel_tool_calls": False, "return_tokens": False, "cache_prompt": True}
    out = _complete(http, max_tokens=2, **neutral)
    assert out["usage"]["completion_tokens"] >= 1
    chat = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2, "temperature": 0,
                                                   "reasoning_effort": "none", "tool_choice": "auto", **neutral})
    assert chat.status_code == 200, chat.text


# ---------------------------------------------------------------------------------------------
# cache_prompt: false, per request; BOS; ignore_eos
# ---------------------------------------------------------------------------------------------
def test_cache_prompt_false_reuses_and_keeps_nothing(http, engine):
    _wait_idle(engine)
    engine.drop_cache()
    prompt = "A prompt that is served cold every time, as the client asked."
    for _ in range(2):
        out = _complete(http, prompt=prompt, max_tokens=2, cache_prompt=False)
        assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert _metric(http, "pyllm_kv_cells_cached") == 0
    _complete(http, prompt=prompt, max_tokens=2)
    again = _complete(http, prompt=prompt, max_tokens=2)
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == again["usage"]["prompt_tokens"] - 1


def test_a_prompt_that_starts_with_bos_gets_one(http, engine):
    plain = _complete(http, prompt="Hello world", max_tokens=4)
    with_bos = _complete(http, prompt="<bos>Hello world", max_tokens=4)
    assert with_bos["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"] == len(engine.tokenize("Hello world"))
    assert with_bos["choices"][0]["text"] == plain["choices"][0]["text"]
    toks = http.post("/tokenize", json={"content": "<bos>Hello world", "add_special": True}).json()["tokens"]
    assert toks == engine.tokenize("Hello world") and toks.count(engine.model.bos) == 1


def test_ignore_eos_never_samples_an_end_of_generation_token(http, engine):
    eot = engine.tokenize("<end_of_turn>", parse_special=True)[-1]
    stopped = _complete(http, max_tokens=5, logit_bias={str(eot): 100})
    assert stopped["usage"]["completion_tokens"] == 0 and stopped["choices"][0]["finish_reason"] == "stop"
    forced = _complete(http, max_tokens=5, logit_bias={str(eot): 100}, ignore_eos=True, logprobs=0)
    lp = forced["choices"][0]["logprobs"]
    assert forced["usage"]["completion_tokens"] == 5 and forced["choices"][0]["text"].strip()
    assert "<end_of_turn>" not in lp["tokens"] and "" not in lp["tokens"]


# ---------------------------------------------------------------------------------------------
# One request cannot take the whole pool
# ---------------------------------------------------------------------------------------------
def test_a_huge_max_tokens_does_not_starve_a_short_request(server, http, engine):
    _wait_idle(engine)
    big = {"prompt": "Hello", "max_tokens": 10**9, "ignore_eos": True, "stream": True, "temperature": 0}
    with httpx.Client(base_url=server.url, timeout=120) as c:
        with c.stream("POST", "/v1/completions", json=big) as r:
            lines = r.iter_lines()
            assert [next(lines) for _ in range(4)]  # generating
            t0 = time.monotonic()
            short = http.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 5, "temperature": 0})
            assert short.status_code == 200 and short.json()["usage"]["completion_tokens"] > 0
            assert engine.stats()["active"] >= 1, "the short request waited for the long one to finish"
            assert time.monotonic() - t0 < 60
    _wait_idle(engine)


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
