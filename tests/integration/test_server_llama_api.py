"""llama-server's own API on pyllm serve: /completion, /props, /slots, /apply-template, input_tokens,
llamacpp: metrics, CORS, X-Api-Key, its flags' settings (-n -1, --no-metrics, --no-slots, --reasoning,
--reasoning-format, --verbose, --any-model) and its error shape for a prompt that does not fit.

One engine with llama-server's split KV (n_ctx / n_parallel cells per slot) on the default model, greedy
where outputs are compared; the same answers must come through the OpenAI routes and the native ones.
"""
from __future__ import annotations

import json
import math
import socket
import threading
import time

import httpx
import pytest

from pyllm.batched import BatchedEngine
from pyllm.config import EngineConfig
from pyllm.errors import ConfigError
from pyllm.server import ServeSettings, create_app
from .serving import Running, free_port, wait_idle

N_CTX, N_PARALLEL = 1024, 2
PROMPT = "The capital of France is"
# A template whose generation prompt opens a <think> block (as DeepSeek-R1's does), and that shows
# enable_thinking, so reasoning settings can be seen in the rendered text.
THINK_TEMPLATE = ("{% for m in messages %}<start_of_turn>{{ m.role }}\n{{ m.content }}<end_of_turn>\n{% endfor %}"
                  "{% if not enable_thinking %}[no-think]{% endif %}"
                  "{% if add_generation_prompt %}<start_of_turn>model\n<think>\n{% endif %}")


@pytest.fixture(scope="module")
def engine(default_model_path):
    config = EngineConfig(model_path=str(default_model_path), n_ctx=N_CTX, n_parallel=N_PARALLEL, kv_unified=False,
                          seed=42)
    with BatchedEngine(config, max_queue=8) as eng:
        yield eng


@pytest.fixture(scope="module")
def server(engine):
    running = Running(create_app(engine, aliases=("a2",), default_sampling={"temperature": 0.5},
                                 cors_origins="localhost", tags=("chat", "small")))
    yield running
    running.stop()


@pytest.fixture
def http(server, engine):
    with httpx.Client(base_url=server.url, timeout=180) as client:
        yield client
    wait_idle(engine)


def _app(engine, **kw):
    return Running(create_app(engine, **kw))


def _sse(response) -> list[dict]:
    return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ") and "[DONE]" not in line]


# ---------------------------------------------------------------------------------------------
# /completion
# ---------------------------------------------------------------------------------------------
def test_native_completion_is_the_openai_path_in_llama_servers_shape(http, engine):
    oai = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "temperature": 0}).json()
    r = http.post("/completion", json={"prompt": PROMPT, "n_predict": 8, "temperature": 0, "return_tokens": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["content"] == oai["choices"][0]["text"] and body["stop"] is True
    assert len(body["tokens"]) == body["tokens_predicted"] == 8 and engine.detokenize(body["tokens"]) == body["content"]
    assert body["stop_type"] == "limit" and body["truncated"] is False and body["has_new_line"] == ("\n" in body["content"])
    n_prompt = len(engine.tokenize(PROMPT))
    t = body["timings"]
    assert body["tokens_evaluated"] == n_prompt == t["prompt_n"] + t["cache_n"] and t["predicted_n"] == 8
    assert t["prompt_ms"] > 0 and t["predicted_ms"] > 0
    assert t["predicted_per_second"] == pytest.approx(1e3 / t["predicted_ms"] * 7)   # 7 decode steps for 8 tokens
    assert body["prompt"].startswith("<bos>") and body["prompt"].endswith(PROMPT)
    assert body["generation_settings"]["n_predict"] == 8 and body["generation_settings"]["temperature"] == 0
    # /completions (no /v1) is llama-server's native route; without return_tokens, tokens is empty
    again = http.post("/completions", json={"prompt": PROMPT, "n_predict": 8, "temperature": 0}).json()
    assert again["content"] == body["content"] and again["tokens"] == []


def test_native_stream_carries_tokens_and_ends_with_the_result(http):
    whole = http.post("/completion", json={"prompt": PROMPT, "n_predict": 6, "temperature": 0}).json()
    with http.stream("POST", "/completion", json={"prompt": PROMPT, "n_predict": 6, "temperature": 0, "stream": True,
                                                  "n_probs": 3, "return_tokens": True}) as r:
        assert r.status_code == 200
        events = _sse(r)
    pieces, final = events[:-1], events[-1]
    assert "".join(e["content"] for e in pieces) == whole["content"]
    assert all(e["stop"] is False and e["tokens"] for e in pieces)
    assert sum(len(e["tokens"]) for e in pieces) + len(final.get("completion_probabilities", [])) == 6
    assert all(len(e["completion_probabilities"]) == len(e["tokens"]) for e in pieces)
    # as llama-server's: the final chunk repeats neither the text nor (with return_tokens) the token ids, so a
    # client counting tokens per chunk counts each once
    assert final["stop"] is True and final["content"] == "" and final["tokens"] == []
    assert final["timings"]["predicted_n"] == 6


def test_n_probs_are_the_models_alternatives(http):
    r = http.post("/completion", json={"prompt": PROMPT, "n_predict": 4, "temperature": 0, "n_probs": 5}).json()
    probs = r["completion_probabilities"]
    assert len(probs) == 4 and "".join(p["token"] for p in probs) == r["content"]
    for p in probs:
        assert len(p["top_logprobs"]) == 5 and p["logprob"] <= 0 and bytes(p["bytes"]).decode() == p["token"]
        assert p["top_logprobs"][0]["id"] == p["id"]   # greedy: the sampled token is the most likely one
    assert http.post("/completion", json={"prompt": PROMPT, "n_probs": 21}).status_code == 400
    # the OpenAI routes take logprobs, and still refuse n_probs by name
    err = http.post("/v1/completions", json={"prompt": PROMPT, "n_probs": 2}).json()["error"]
    assert err["param"] == "n_probs"


def test_prompt_forms(http, engine):
    ids = engine.tokenize(PROMPT)
    one = http.post("/completion", json={"prompt": ids, "n_predict": 4, "temperature": 0}).json()
    batch = http.post("/completion", json={"prompt": [ids, PROMPT, {"prompt_string": PROMPT}], "n_predict": 4,
                                           "temperature": 0}).json()
    assert isinstance(batch, list) and [b["index"] for b in batch] == [0, 1, 2]
    assert {b["content"] for b in batch} == {one["content"]}
    # ids and text in one prompt: the text is tokenized where it stands, without a BOS of its own
    mixed = http.post("/completion", json={"prompt": [*ids, " Paris. The capital of Italy is"], "n_predict": 1,
                                           "temperature": 0}).json()
    assert mixed["tokens_evaluated"] == len(ids) + len(engine.model.tokenize(" Paris. The capital of Italy is",
                                                                             add_special=False, parse_special=True))
    for bad, where in (({"prompt_string": "x", "multimodal_data": ["AAAA"]}, "multimodal"), ([ids, 3.5], "float"),
                       ([], "empty"), ([1, 2, [3]], "list")):
        r = http.post("/completion", json={"prompt": bad, "n_predict": 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", (bad, r.text)
    r = http.post("/completion", json={"prompt": [engine.model.n_vocab + 5], "n_predict": 1})
    assert r.status_code == 400 and "vocab" in r.text.lower()


def test_response_fields_ignore_eos_and_verbose(http, engine):
    r = http.post("/completion", json={"prompt": PROMPT, "n_predict": 3, "response_fields": [
        "content", "generation_settings/n_predict", "timings/predicted_n"]}).json()
    assert set(r) == {"content", "generation_settings/n_predict", "timings/predicted_n"}
    assert r["generation_settings/n_predict"] == 3 and r["timings/predicted_n"] == 3
    bias = http.post("/completion", json={"prompt": PROMPT, "n_predict": 2, "ignore_eos": True}).json()
    banned = bias["generation_settings"]["logit_bias"]
    assert {b["token"] for b in banned} == set(engine.model.eog_tokens) and all(b["bias"] is None for b in banned)
    assert http.post("/completion", json={"prompt": PROMPT, "n_predict": 2}).json()["generation_settings"]["logit_bias"] == []
    chat = http.post("/chat/completions", json={"messages": [{"role": "user", "content": "Book"}], "max_tokens": 2,
                                                "verbose": True}).json()
    assert "Book" in chat["__verbose"]["prompt"] and chat["__verbose"]["content"] == chat["choices"][0]["message"]["content"]
    assert "__verbose" not in http.post("/chat/completions", json={"messages": [{"role": "user", "content": "Book"}],
                                                                   "max_tokens": 2}).json()


def test_server_temperature_default_and_seed(http):
    # default_sampling={"temperature": 0.5} (--temp) and the engine's seed (--seed 42) reach every request
    r = http.post("/completion", json={"prompt": PROMPT, "n_predict": 1}).json()
    assert r["generation_settings"]["temperature"] == 0.5
    props = http.get("/props").json()
    assert props["default_generation_settings"]["params"]["seed"] == 42
    assert props["default_generation_settings"]["params"]["temperature"] == 0.5


# ---------------------------------------------------------------------------------------------
# /props, /slots, /models, /apply-template, input_tokens
# ---------------------------------------------------------------------------------------------
def test_props_models_and_aliases(http, engine):
    props = http.get("/props").json()
    assert props["total_slots"] == N_PARALLEL and props["default_generation_settings"]["n_ctx"] == N_CTX // N_PARALLEL
    assert props["model_path"] == str(engine.model.path) and props["build_info"].startswith("b")
    assert props["bos_token"] == "<bos>" and props["modalities"] == {"vision": False, "video": False, "audio": False}
    for path in ("/models", "/v1/models"):
        m = http.get(path).json()["data"][0]
        assert m["aliases"] == ["a2"] and m["tags"] == ["chat", "small"]
    r = http.post("/chat/completions", json={"model": "a2", "messages": [{"role": "user", "content": "x"}],
                                             "max_tokens": 1})
    assert r.status_code == 200 and r.json()["system_fingerprint"] == props["build_info"]
    assert "timings" in r.json()
    assert http.post("/chat/completions", json={"model": "gpt-4", "messages": [{"role": "user", "content": "x"}],
                                                "max_tokens": 1}).status_code == 404


def test_slots_show_the_running_request(http, server, engine):
    idle = http.get("/slots").json()
    assert [s["id"] for s in idle] == list(range(N_PARALLEL)) and not any(s["is_processing"] for s in idle)
    assert all(s["n_ctx"] == N_CTX // N_PARALLEL for s in idle)
    done = threading.Event()
    out = {}

    def long_request():
        with httpx.Client(base_url=server.url, timeout=180) as c:
            out["r"] = c.post("/completion", json={"prompt": PROMPT, "n_predict": 120, "ignore_eos": True})
        done.set()

    threading.Thread(target=long_request, daemon=True).start()
    deadline = time.monotonic() + 60
    busy = []
    while time.monotonic() < deadline and not done.is_set():
        busy = [s for s in http.get("/slots").json() if s["is_processing"]]
        if busy:
            break
        time.sleep(0.05)
    assert len(busy) == 1 and busy[0]["n_prompt_tokens"] == len(engine.tokenize(PROMPT))
    done.wait(180)
    assert out["r"].status_code == 200
    assert not any(s["is_processing"] for s in http.get("/slots").json())


def test_apply_template_and_input_tokens(http, engine):
    messages = [{"role": "user", "content": "Hi there"}]
    text = http.post("/apply-template", json={"messages": messages}).json()["prompt"]
    tmpl_text = engine.model.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=True)
    assert text == tmpl_text and text.endswith("<start_of_turn>model\n")
    without = http.post("/apply-template", json={"messages": messages, "add_generation_prompt": False}).json()["prompt"]
    assert text.startswith(without) and without != text
    n = http.post("/v1/chat/completions/input_tokens", json={"messages": messages}).json()["input_tokens"]
    usage = http.post("/chat/completions", json={"messages": messages, "max_tokens": 1}).json()["usage"]
    assert n == usage["prompt_tokens"] == http.post("/chat/completions/input_tokens",
                                                    json={"messages": messages}).json()["input_tokens"]
    assert http.post("/apply-template", json={"messages": []}).status_code == 400


# ---------------------------------------------------------------------------------------------
# Errors, metrics, CORS, keys
# ---------------------------------------------------------------------------------------------
def test_a_prompt_that_does_not_fit_has_both_error_shapes(http):
    long = "word " * (N_CTX // N_PARALLEL + 10)
    for path, body in (("/completion", {"prompt": long}), ("/v1/completions", {"prompt": long}),
                       ("/chat/completions", {"messages": [{"role": "user", "content": long}]})):
        r = http.post(path, json=body)
        err = r.json()["error"]
        assert r.status_code == 400 and err["type"] == "exceed_context_size_error", (path, err)
        assert err["code"] == "context_length_exceeded" and err["n_ctx"] == N_CTX // N_PARALLEL
        assert err["n_prompt_tokens"] > N_CTX // N_PARALLEL and "exceeds the available context size" in err["message"]


def test_llamacpp_metrics_match_the_timings(engine):
    running = _app(engine)
    try:
        with httpx.Client(base_url=running.url, timeout=180) as http:
            prompt_n = cache_n = predicted_n = 0
            for n in (1, 4, 4):
                t = http.post("/completion", json={"prompt": "the quick brown fox", "n_predict": n}).json()["timings"]
                prompt_n, cache_n, predicted_n = prompt_n + t["prompt_n"], cache_n + t["cache_n"], predicted_n + t["predicted_n"]
            r = http.get("/metrics")
        assert r.status_code == 200 and float(r.headers["Process-Start-Time-Unix"]) > 0
        values, types = {}, {}
        for line in r.text.splitlines():
            if line.startswith("# TYPE llamacpp:"):
                _, _, name, kind = line.split(" ", 3)
                types[name] = kind
            elif line.startswith("llamacpp:"):
                name, value = line.split(" ")
                values[name] = float(value)
        assert values["llamacpp:prompt_tokens_total"] == prompt_n and values["llamacpp:tokens_predicted_total"] == 9
        assert values["llamacpp:prompt_tokens_cached_total"] == cache_n > 0
        assert values["llamacpp:n_decode_total"] > 0 and values["llamacpp:requests_processing"] == 0
        assert types["llamacpp:n_tokens_max"] == "counter" and types["llamacpp:requests_deferred"] == "gauge"
        # the mean number of sequences per engine step, from the step trace
        assert types["llamacpp:n_busy_slots_per_decode"] == "gauge"
        assert values["llamacpp:n_busy_slots_per_decode"] == engine.stats()["step_sequences_total"] / engine.stats()["steps"]
        assert values["llamacpp:n_busy_slots_per_decode"] >= 1.0
        assert "pyllm_http_requests_total" in r.text   # pyllm's own beside llama-server's
    finally:
        running.stop()


def test_disabled_endpoints_cors_and_keys(engine, server):
    locked = _app(engine, api_key="k3y", metrics_endpoint=False, slots_endpoint=False)
    try:
        with httpx.Client(base_url=locked.url, timeout=60) as http:
            assert http.get("/metrics", headers={"X-Api-Key": "k3y"}).status_code == 501
            assert http.get("/slots", headers={"Authorization": "Bearer k3y"}).json()["error"]["type"] == "not_supported_error"
            assert http.get("/props", headers={"X-Api-Key": "wrong"}).status_code == 401
            assert http.get("/props").json()["error"]["type"] == "authentication_error"
            assert http.get("/v1/health").status_code == 200
            # no --cors-origins: no CORS headers, and a preflight is not answered as one
            r = http.options("/completion", headers={"Origin": "http://localhost", "Access-Control-Request-Method": "POST"})
            assert "access-control-allow-origin" not in r.headers and r.status_code != 200
    finally:
        locked.stop()
    with httpx.Client(base_url=server.url, timeout=60) as http:   # cors_origins="localhost"
        for origin, allowed in (("http://localhost:3000", True), ("http://[::1]", True), ("http://evil.com", False),
                                ("http://localhost.evil.com", False)):
            r = http.options("/completions", headers={"Origin": origin, "Access-Control-Request-Method": "POST"})
            assert r.status_code == 200 and r.headers.get("access-control-allow-origin") == (origin if allowed else None)
            assert r.headers["access-control-allow-credentials"] == "true"
        r = http.get("/health", headers={"Origin": "http://127.0.0.1:8000"})
        assert r.headers["access-control-allow-origin"] == "http://127.0.0.1:8000"


def test_any_model_and_reasoning_settings(engine):
    running = _app(engine, any_model=True, chat_template=THINK_TEMPLATE, reasoning="off")
    try:
        with httpx.Client(base_url=running.url, timeout=180) as http:
            text = http.post("/apply-template", json={"messages": [{"role": "user", "content": "Hi"}]}).json()["prompt"]
            assert "[no-think]" in text   # --reasoning off: enable_thinking false unless the request says otherwise
            on = http.post("/apply-template", json={"messages": [{"role": "user", "content": "Hi"}],
                                                   "chat_template_kwargs": {"enable_thinking": True}}).json()["prompt"]
            assert "[no-think]" not in on
            body = {"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6,
                    "temperature": 0, "ignore_eos": True}
            split = http.post("/chat/completions", json=body).json()["choices"][0]["message"]
            whole = http.post("/chat/completions", json={**body, "reasoning_format": "none"}).json()["choices"][0]["message"]
        # The generation prompt opened <think>: with deepseek (the default) the reply is reasoning, with none content.
        assert split["reasoning_content"] == whole["content"] and split["content"] == "" and "reasoning_content" not in whole
    finally:
        running.stop()


def test_n_predict_minus_one_runs_to_the_end_of_the_slot(engine):
    running = _app(engine, default_max_tokens=-1)
    try:
        with httpx.Client(base_url=running.url, timeout=300) as http:
            ids = engine.tokenize("Once upon a time")
            r = http.post("/completion", json={"prompt": ids, "ignore_eos": True, "temperature": 0}).json()
        assert r["timings"]["predicted_n"] == N_CTX // N_PARALLEL - len(ids) and r["truncated"] is True
        assert r["stop_type"] == "limit" and r["generation_settings"]["n_predict"] == -1
    finally:
        running.stop()


def test_several_hosts_bind_each_and_bad_ones_are_refused():
    port = free_port()
    settings = ServeSettings(host="127.0.0.1,localhost", port=port)
    assert settings.hosts == ["127.0.0.1", "localhost"] and settings.is_loopback
    with pytest.raises(ConfigError, match="cannot bind 192.0.2.1"):
        ServeSettings(host="127.0.0.1,192.0.2.1", port=port).bind()
    try:
        socks = ServeSettings(host="127.0.0.1,::1", port=port).bind()
    except ConfigError:   # no IPv6 loopback here
        socks = None
    if socks:
        try:
            assert sorted(s.family for s in socks) == sorted([socket.AF_INET, socket.AF_INET6])
        finally:
            for s in socks:
                s.close()
    assert not ServeSettings(host="127.0.0.1,0.0.0.0").is_loopback
    assert ServeSettings(host="127.0.0.1").bind() is None   # one address: uvicorn binds it


# ---------------------------------------------------------------------------------------------
# OpenAI's Responses API (as llama-server converts it to a chat request)
# ---------------------------------------------------------------------------------------------
def test_responses_api_through_the_chat_path(server, http):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=180)
    messages = [{"role": "system", "content": "Book"}, {"role": "user", "content": "What is the best book"}]
    # cache_prompt false everywhere: a warm prefix can flip this near-tie (see BatchedEngine's determinism notes)
    cold = {"cache_prompt": False}
    chat = http.post("/chat/completions", json={"messages": messages, "max_tokens": 8, "temperature": 0, **cold}).json()
    expected = chat["choices"][0]["message"]["content"]
    res = client.responses.create(model="a2", instructions="Book", input="What is the best book", max_output_tokens=8,
                                  temperature=0, extra_body=cold)
    assert res.id.startswith("resp_") and res.output[0].id.startswith("msg_") and res.output_text == expected
    assert res.usage.input_tokens == chat["usage"]["prompt_tokens"] and res.usage.output_tokens == 8
    assert res.status == "incomplete" and res.incomplete_details.reason == "max_output_tokens"
    again = client.responses.create(model="a2", input=[{"role": "system", "content": "Book"},
                                                       {"role": "user", "content": [{"type": "input_text",
                                                                                     "text": "What is the best book"}]}],
                                    max_output_tokens=8, temperature=0, extra_body=cold)
    assert again.output_text == expected
    stream = client.responses.create(model="a2", input=messages, max_output_tokens=8, temperature=0, stream=True,
                                    extra_body=cold)
    types, text, done = [], "", None
    for ev in stream:
        types.append(ev.type)
        if ev.type == "response.output_text.delta":
            text += ev.delta
        if ev.type == "response.completed":
            done = ev.response
    assert types[:2] == ["response.created", "response.in_progress"] and types[-1] == "response.completed"
    assert text == expected == done.output_text and done.output[0].id.startswith("msg_")
    for body, param in (({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
                        ({"input": "x", "tools": [{"type": "function", "name": "f"}]}, "tools"),
                        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input"),
                        ({"input": [{"type": "function_call", "name": "f"}]}, "input"), ({}, "input"),
                        ({"input": "x", "top_logprobs": 2}, "top_logprobs")):
        r = http.post("/v1/responses", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)


def _tail(prompt: str) -> str:
    return prompt[prompt.index("What is the best book"):]


def test_a_final_assistant_message_is_continued_as_llama_server_prefills_it(engine):
    """llama-server's prefill_assistant and continue_final_message, on pyllm's template and on a Jinja
    template compiled by llama.cpp: the prompt ends with the assistant's text (its parts joined by a blank
    line), no new turn; the conflicting forms are 400s naming the field."""
    from pyllm import chat

    base = [{"role": "system", "content": "Book"}, {"role": "user", "content": "What is the best book"}]
    templates = [None] + (["meta-llama-Llama-3.1-8B-Instruct"] if chat.templates_dir() is not None else [])
    for template in templates:
        server = _app(engine, chat_template=template, verbose_responses=True)
        try:
            def post(**extra):
                return httpx.post(server.url + "/v1/chat/completions", json={"max_tokens": 2, "temperature": 0,
                                                                             **extra}, timeout=120)
            turn = post(messages=base).json()["__verbose"]["prompt"]
            assert not turn.endswith("Whill")
            for extra in ({"messages": base + [{"role": "assistant", "content": "Whill"}]},
                          {"messages": base + [{"role": "assistant", "content": "Whill"}],
                           "continue_final_message": True, "add_generation_prompt": False}):
                r = post(**extra)
                assert r.status_code == 200, r.text
                # the new turn's opening (the generation prompt) and then the assistant's text (compared from the
                # user's message on: llama.cpp's renderer gives Llama 3.1's template today's date, pyllm's its default)
                assert _tail(r.json()["__verbose"]["prompt"]) == _tail(turn) + "Whill", (template, r.json())
            parts = [{"type": "text", "text": "Wh"}, {"type": "text", "text": "ill"}]
            r = post(messages=base + [{"role": "assistant", "content": parts}])
            assert _tail(r.json()["__verbose"]["prompt"]) == _tail(turn) + "Wh\n\nill"
            for extra, param in (
                    ({"messages": base + [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]},
                     "messages"),
                    ({"messages": base + [{"role": "assistant", "content": "Whill"}], "continue_final_message": True},
                     "continue_final_message"),
                    ({"messages": base, "continue_final_message": True, "add_generation_prompt": False},
                     "continue_final_message"),
                    ({"messages": base + [{"role": "assistant", "content": "x"}], "continue_final_message": "all",
                      "add_generation_prompt": False}, "continue_final_message")):
                r = post(**extra)
                assert r.status_code == 400 and r.json()["error"]["param"] == param, (template, extra, r.text)
            # add_generation_prompt false alone: the conversation as it is, no turn opened
            r = post(messages=base, add_generation_prompt=False)
            assert r.status_code == 200 and _tail(turn).startswith(_tail(r.json()["__verbose"]["prompt"]))
            assert len(_tail(r.json()["__verbose"]["prompt"])) < len(_tail(turn))
        finally:
            server.stop()


def test_timings_per_token_in_a_chat_stream(http):
    """llama-server's timings_per_token: each content chunk carries the request's timings so far
    (predicted_n counting up), the usage chunk the final ones; the role chunk none."""
    r = http.post("/v1/chat/completions", json={"max_tokens": 5, "stream": True, "timings_per_token": True,
                                                "stream_options": {"include_usage": True}, "temperature": 0,
                                                "messages": [{"role": "user", "content": "test"}]})
    events = [json.loads(ln[6:]) for ln in r.text.splitlines() if ln.startswith("data: {")]
    assert "timings" not in events[0] and events[0]["choices"][0]["delta"]["role"] == "assistant"
    counts = [e["timings"]["predicted_n"] for e in events[1:] if e["choices"] and e["choices"][0]["delta"].get("content")]
    assert counts and counts == sorted(counts) and counts[-1] <= 5
    usage = events[-1]
    assert usage["choices"] == [] and usage["timings"]["predicted_n"] == usage["usage"]["completion_tokens"]
    assert usage["timings"]["prompt_n"] + usage["timings"]["cache_n"] == usage["usage"]["prompt_tokens"]


def test_response_header_names_have_llama_servers_case(engine):
    """Header names go out as llama-server writes them (Access-Control-Allow-Origin, Process-Start-Time-Unix):
    clients that copy the headers into a plain dict (llama-server's test utilities) look them up so."""
    import http.client

    server = _app(engine, cors_origins="localhost")
    try:
        host, port = server.url.split("//")[1].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("OPTIONS", "/completions", headers={"Origin": "http://localhost:8080",
                                                         "Access-Control-Request-Method": "POST"})
        names = [k for k, _ in conn.getresponse().getheaders()]
        assert "Access-Control-Allow-Origin" in names and "Access-Control-Allow-Credentials" in names, names
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        resp.read()
        names = [k for k, _ in resp.getheaders()]
        assert "Process-Start-Time-Unix" in names and "Content-Type" in names, names
    finally:
        server.stop()


def test_a_reasoning_budget_is_met_where_the_template_does_not_reason(engine, http):
    """reasoning_budget_tokens / Anthropic's thinking.budget_tokens: a template without reasoning produces
    none, so any budget holds and the request is served; a template that reasons gets a 400 naming the
    field (a budget is not implemented), in each API's shape."""
    msgs = [{"role": "user", "content": "Hi"}]
    r = http.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 2, "reasoning_budget_tokens": 8})
    assert r.status_code == 200, r.text
    r = http.post("/v1/messages", json={"model": engine.model.path.name, "max_tokens": 2, "messages": msgs,
                                        "thinking": {"type": "enabled", "budget_tokens": 50}})
    assert r.status_code == 200 and r.json()["type"] == "message", r.text
    r = http.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 2, "reasoning_budget_tokens": -2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "reasoning_budget_tokens"
    running = _app(engine, any_model=True, chat_template=THINK_TEMPLATE)
    try:
        r = httpx.post(running.url + "/v1/chat/completions", timeout=60,
                       json={"messages": msgs, "max_tokens": 2, "reasoning_budget_tokens": 8})
        assert r.status_code == 400 and r.json()["error"]["param"] == "reasoning_budget_tokens", r.text
        r = httpx.post(running.url + "/v1/messages", timeout=60,
                       json={"model": "x", "max_tokens": 2, "messages": msgs,
                             "thinking": {"type": "enabled", "budget_tokens": 50}})
        assert r.status_code == 400 and r.json()["type"] == "error", r.text
        assert "thinking.budget_tokens" in r.json()["error"]["message"]
        # no budget: served
        r = httpx.post(running.url + "/v1/chat/completions", timeout=60, json={"messages": msgs, "max_tokens": 2})
        assert r.status_code == 200
    finally:
        running.stop()


def test_return_progress_reports_each_prompt_chunk(default_model_path):
    """llama-server's return_progress (with timings_per_token): on /completion and /v1/responses streams, a
    prompt_progress event before any prompt token is decoded (processed 0, prompt_ms 0), then one per engine
    step that decoded a part of the prompt (n_batch 32 here: several), never going backwards; then the
    tokens, each chunk with its timings so far."""
    config = EngineConfig(model_path=str(default_model_path), n_ctx=1024, n_parallel=1, n_batch=32, n_ubatch=32)
    with BatchedEngine(config) as eng:
        running = _app(eng)
        try:
            prompt = "the quick brown fox jumps over the lazy dog " * 8
            r = httpx.post(running.url + "/completion", timeout=120, json={
                "prompt": prompt, "n_predict": 4, "stream": True, "timings_per_token": True, "return_progress": True})
            events = [json.loads(ln[6:]) for ln in r.text.splitlines() if ln.startswith("data: ")]
            progress = [e for e in events if "prompt_progress" in e]
            n_prompt = len(eng.model.tokenize(prompt, add_special=True))
            assert len(progress) >= n_prompt // 32, progress
            first = progress[0]
            assert first["prompt_progress"]["processed"] == 0 and first["timings"]["prompt_ms"] == 0.0
            assert first["timings"]["prompt_n"] == 0 and first["timings"]["predicted_n"] == 0
            done = [e["prompt_progress"]["processed"] for e in progress]
            assert done == sorted(done) and len(set(done)) == len(done) and done[-1] < n_prompt
            assert all(e["prompt_progress"]["total"] == n_prompt for e in progress)
            ms = [e["timings"]["prompt_ms"] for e in progress]
            assert ms == sorted(ms) and ms[-1] > 0
            tokens = [e for e in events if e.get("content")]
            assert [e["timings"]["predicted_n"] for e in tokens] == list(range(1, len(tokens) + 1))
            assert events[-1]["stop"] is True and events[-1]["timings"]["prompt_n"] == n_prompt
            # the same through the Responses API: in_progress events carry it
            r = httpx.post(running.url + "/v1/responses", timeout=120, json={
                "input": prompt, "max_output_tokens": 4, "stream": True, "timings_per_token": True,
                "return_progress": True})
            data = [json.loads(ln[6:]) for ln in r.text.splitlines() if ln.startswith("data: ")]
            prog = [d for d in data if "prompt_progress" in d]
            assert len(prog) >= 2 and all(d["type"] == "response.in_progress" for d in prog)
            assert all(d["prompt_progress"]["processed"] >= d["prompt_progress"]["cache"] for d in prog)
            assert any(d["type"] == "response.output_text.delta" and "timings" in d for d in data)
            assert data[-1]["type"] == "response.completed" and "timings" in data[-1]
            r = httpx.post(running.url + "/v1/responses", timeout=60, json={"input": "x", "return_progress": "yes"})
            assert r.status_code == 400 and r.json()["error"]["param"] == "return_progress"
        finally:
            running.stop()
