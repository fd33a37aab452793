"""A schema-driven fuzz of the HTTP API: request bodies drawn from each endpoint's own request model (its
pydantic JSON schema, so a new field is fuzzed as soon as it exists), with wrong types, out-of-range
numbers and C's integer edges, NUL and lone surrogates, unknown keys, raw bytes, other methods and paths
mixed in; streams read to the end or dropped after the first event. Then every field of every request
model is set, one at a time, to each of a list of values that have bitten servers before.

Whatever comes in: no 5xx, every error in OpenAI's shape, and afterwards nothing left running (the engine's
active and queued requests back to 0, no KV cell reserved, the cells in use only the idle prefix caches)
and the server healthy. The real default model answers; outputs are at most a few tokens, so the whole
file takes 1 to 2 minutes on a 2-core machine. ``PYLLM_FUZZ_EXAMPLES=N`` runs N examples per endpoint
(default 30), ``PYLLM_FUZZ_RANDOM=1`` new draws each run (by default they are derandomized: CI sees the same
ones each time).

Hypothesis rather than schemathesis: the endpoints read and validate their bodies themselves (strict
pydantic, errors in OpenAI's shape), so the app's OpenAPI document has no request schemas to drive it; the
request models' own JSON schema is the same source without a new dependency.
"""
from __future__ import annotations

import json
import os
import threading
import time

import httpx
import pytest
import uvicorn
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from pyllm.batched import BatchedEngine
from pyllm.config import EngineConfig
from pyllm.server import create_app
from pyllm.server.schemas import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from .serving import free_port as _free_port

N_CTX, N_PARALLEL = 512, 2
EXAMPLES = int(os.environ.get("PYLLM_FUZZ_EXAMPLES", "30"))
# No shrinking: on a 2-core machine it can take longer than the fuzz itself (the failing example is printed).
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("PYLLM_FUZZ_RANDOM"),
                database=None, phases=[Phase.explicit, Phase.generate],
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])


# ---------------------------------------------------------------------------------------------
# Strategies: JSON values, and bodies from a JSON schema
# ---------------------------------------------------------------------------------------------
# Text with what C strings, UTF-8 and JSON make special: NUL, a lone surrogate (sent as a \ud800
# escape), control and non-ASCII characters, and the model's control-token text.
TEXT = st.one_of(
    st.text(st.sampled_from("ab \n\t.,\x00\x1f\ud800\ud83d\ude00é中<>{}%"), max_size=12),
    st.text(max_size=8),
    st.sampled_from(["<start_of_turn>", "<end_of_turn>", "<bos>", "user", "{{ 1 }}", "\x00" * 3]),
    st.integers(1, 400).map(lambda n: "hello " * n),   # up to past the context
)
# Small numbers, and the edges of C's integer types (a value that does not fit must be refused, not overflow).
EDGES = [2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64, 10**30, -2**31 - 1, -2**63 - 1]
INTEGER = st.one_of(st.integers(-3, 300), st.sampled_from(EDGES), st.integers())
SCALAR = st.one_of(st.none(), st.booleans(), INTEGER, st.floats(), TEXT)
JSON = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                    max_leaves=6)
# Generation is the slow part: at most a few tokens (the app's default_max_tokens covers a missing one);
# a huge max_tokens (capped by the context) is test_server's.
SMALL_MAX_TOKENS = st.one_of(st.none(), st.integers(-2, 3), JSON.filter(lambda v: not isinstance(v, int)))
OVERRIDES = {"max_tokens": SMALL_MAX_TOKENS, "max_completion_tokens": SMALL_MAX_TOKENS}


def _from_schema(schema: dict, defs: dict) -> st.SearchStrategy:
    if "$ref" in schema:
        return _from_schema(defs[schema["$ref"].rsplit("/", 1)[1]], defs)
    if "anyOf" in schema:
        return st.one_of([_from_schema(s, defs) for s in schema["anyOf"]])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "object":
        props = schema.get("properties", {})
        fields = {k: _field(k, s, defs) for k, s in props.items()}
        required = set(schema.get("required", ()))
        body = st.fixed_dictionaries({k: v for k, v in fields.items() if k in required},
                                     optional={k: v for k, v in fields.items() if k not in required})
        extra = st.dictionaries(TEXT.filter(lambda k: k not in props), JSON, max_size=2)
        return st.tuples(body, extra).map(lambda t: {**t[1], **t[0]})
    if kind == "array":
        return st.lists(_from_schema(schema.get("items", {}), defs), max_size=4)
    return {"string": TEXT, "integer": INTEGER, "number": st.floats(),
            "boolean": st.booleans(), "null": st.none()}.get(kind, JSON)


def _field(name: str, schema: dict, defs: dict) -> st.SearchStrategy:
    if name in OVERRIDES:
        return OVERRIDES[name]
    good = _from_schema(schema, defs)
    # Mostly what the schema says; one time in eight any JSON value at all (a wrong type, a wrong shape).
    return st.integers(0, 7).flatmap(lambda k: JSON if k == 0 else good)


def bodies(model, valid: st.SearchStrategy) -> st.SearchStrategy:
    """Half the time a body drawn from ``model``'s JSON schema (most are refused: one odd field is enough);
    half the time a ``valid`` body with up to three fields drawn from the schema, so requests get through to
    the model too."""
    schema = model.model_json_schema()
    defs = schema.get("$defs", {})
    fields = {k: _field(k, s, defs) for k, s in schema["properties"].items()}
    mutated = st.tuples(valid, st.lists(st.sampled_from(sorted(fields)), max_size=3, unique=True).flatmap(
        lambda keys: st.fixed_dictionaries({k: fields[k] for k in keys}))).map(lambda t: {**t[0], **t[1]})
    return st.one_of(_from_schema(schema, defs), mutated)


PLAIN = st.text(st.sampled_from("abcxyz .,?"), min_size=1, max_size=20)
MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "user"]),
                                           "content": st.one_of(PLAIN, PLAIN, TEXT)}), min_size=1, max_size=3)
TOKEN_IDS = st.lists(st.integers(0, 5000), min_size=1, max_size=8)
CHAT = bodies(ChatCompletionRequest, st.fixed_dictionaries({"messages": MESSAGES, "stream": st.booleans()}))
COMPLETION = bodies(CompletionRequest, st.fixed_dictionaries({"prompt": PLAIN | TEXT | TOKEN_IDS,
                                                              "stream": st.booleans()}))
TOKENIZE = bodies(TokenizeRequest, st.fixed_dictionaries({"content": TEXT}))
DETOKENIZE = bodies(DetokenizeRequest, st.fixed_dictionaries({"tokens": TOKEN_IDS}))


# Not a JSON object at all: garbage bytes, other JSON values, truncated JSON.
RAW = st.one_of(st.binary(max_size=40), JSON.map(lambda v: json.dumps(v).encode()),
                st.just(b'{"messages": [{"role": "user", "content": "hi"'), st.just(b""))


# ---------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(default_model_path):
    config = EngineConfig(model_path=str(default_model_path), n_ctx=N_CTX, n_parallel=N_PARALLEL)
    with BatchedEngine(config, max_queue=8) as eng:
        yield eng


@pytest.fixture(scope="module")
def http(engine):
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine, default_max_tokens=3), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        yield client
    server.should_exit = True
    thread.join(30)


def _check_error(r: httpx.Response, what) -> None:
    body = r.json()
    err = body.get("error") if isinstance(body, dict) else None
    assert isinstance(err, dict) and set(err) == {"message", "type", "param", "code"}, (what, r.text)
    assert err["type"] != "server_error" and isinstance(err["message"], str) and err["message"], (what, r.text)


def _exchange(http: httpx.Client, method: str, path: str, content: bytes, hang_up: bool, what) -> None:
    headers = {"content-type": "application/json"}
    with http.stream(method, path, content=content, headers=headers) as r:
        assert r.status_code < 500, (what, r.status_code, r.read())
        if r.status_code >= 400:
            r.read()
            _check_error(r, what)
            return
        if not r.headers.get("content-type", "").startswith("text/event-stream"):
            r.read()
            if path != "/metrics":
                assert isinstance(r.json(), dict), (what, r.text)
            return
        lines = r.iter_lines()
        events = []
        for line in lines:
            if not line:
                continue
            assert line.startswith("data: "), (what, line)
            events.append(line[6:])
            if hang_up:   # the client goes away mid-stream: its request is cancelled
                return
        assert events and events[-1] == "[DONE]", (what, events[-3:])
        for ev in events[:-1]:
            obj = json.loads(ev)
            assert "error" not in obj, (what, ev)


def _post(http, path, body, raw, hang_up):
    content = raw if raw is not None else json.dumps(body, ensure_ascii=True).encode()
    _exchange(http, "POST", path, content, hang_up, (path, body if raw is None else raw))


# ---------------------------------------------------------------------------------------------
# The fuzz, one endpoint at a time; then nothing may be left running
# ---------------------------------------------------------------------------------------------
@FUZZ
@given(body=CHAT, raw=st.one_of(st.none(), st.none(), st.none(), RAW),
       hang_up=st.booleans())
def test_fuzz_chat_completions(http, body, raw, hang_up):
    _post(http, "/v1/chat/completions", body, raw, hang_up)


@FUZZ
@given(body=COMPLETION, raw=st.one_of(st.none(), st.none(), st.none(), RAW), hang_up=st.booleans())
def test_fuzz_completions(http, body, raw, hang_up):
    _post(http, "/v1/completions", body, raw, hang_up)


@FUZZ
@given(path=st.sampled_from(["/tokenize", "/detokenize"]), data=st.data(),
       raw=st.one_of(st.none(), st.none(), st.none(), RAW))
def test_fuzz_tokenize_and_detokenize(http, path, data, raw):
    body = data.draw(TOKENIZE if path == "/tokenize" else DETOKENIZE)
    _post(http, path, body, raw, False)


@FUZZ
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
       path=st.one_of(st.sampled_from(["/v1/models", "/health", "/metrics", "/v1/chat/completions", "/tokenize"]),
                      st.text(st.sampled_from("/v1abc%.?&=#"), max_size=12).map(lambda p: "/" + p)),
       content=RAW)
def test_fuzz_methods_and_paths(http, method, path, content):
    _exchange(http, method, path, content, False, (method, path, content))


# Every field of every request model, one at a time, set to each value that has bitten servers before.
SPECIAL = [None, True, 0, -1, 2**31, 2**63, 2**64, -2**63 - 1, 1e308, "", "\x00", "\ud800", [None], {"": 1}]
BASES = {"/v1/chat/completions": (ChatCompletionRequest, {"messages": [{"role": "user", "content": "Hi"}],
                                                         "max_tokens": 1}),
         "/v1/completions": (CompletionRequest, {"prompt": "Hi", "max_tokens": 1}),
         "/tokenize": (TokenizeRequest, {"content": "Hi"}), "/detokenize": (DetokenizeRequest, {"tokens": [1, 2]})}


@pytest.mark.parametrize("path", sorted(BASES))
def test_every_field_with_every_special_value(http, path):
    model, base = BASES[path]
    for field in model.model_json_schema()["properties"]:
        for value in SPECIAL:
            if field in OVERRIDES and isinstance(value, int) and not isinstance(value, bool) and value > 3:
                continue   # a huge max_tokens generates up to the context: test_server checks it is capped
            _post(http, path, {**base, field: value}, None, False)


def test_after_the_fuzz_nothing_is_left_running_and_the_server_is_healthy(http, engine):
    deadline = time.monotonic() + 30
    while True:
        s = engine.stats()
        if s["active"] == 0 and s["queued"] == 0 and s["kv_cells_reserved"] == 0:
            break
        assert time.monotonic() < deadline, f"requests left running after the fuzz: {s}"
        time.sleep(0.05)
    assert s["kv_cells_used"] == s["kv_cells_cached"], s   # what is in use is idle prefix caches only
    assert http.get("/health").json() == {"status": "ok"}
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0
    r = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "stream": True})
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
