"""benchmarks/sessions.py's own machinery (no model, no timing): the sessions' prompts, reading both servers'
streams, the settings each configuration's server gets, and the report."""
from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import sys
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load():
    """benchmarks/sessions.py as a module (it imports its neighbours as a script does)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("pyllm_sessions_bench", ROOT / "benchmarks" / "sessions.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # its dataclasses look their module up there
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


sessions = _load()


def _sse(*objs) -> bytes:
    return b"".join(b"data: " + json.dumps(o).encode() + b"\n\n" for o in objs)


class FakeServer:
    """A /completion that streams ``max_tokens`` tokens one chunk each and reports prompt_n / cache_n as a
    server with an unbounded prefix cache would: the longest prefix of the prompt that some earlier prompt
    plus its reply (less the last reply token, never decoded) holds. ``repeat_tokens``: the final chunk
    lists every token again (pyllm's shape) instead of none (llama-server's)."""

    def __init__(self, repeat_tokens: bool = False) -> None:
        self.repeat_tokens = repeat_tokens
        self.held: list[list[int]] = []
        self.prompts: list[list[int]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        assert request.url.path == "/completion"
        assert body["cache_prompt"] is True and body["stream"] is True and body["return_tokens"] is True
        assert body["ignore_eos"] is True and body["temperature"] == 0.0
        prompt, n = body["prompt"], body["n_predict"]
        self.prompts.append(prompt)
        cached = max((_common(prompt, h) for h in self.held), default=0)
        cached = min(cached, len(prompt) - 1)  # the last prompt token is always decoded (its logits)
        reply = [50_000 + len(prompt) + k for k in range(n)]
        self.held.append(prompt + reply[:-1])
        chunks = [{"content": f"t{t}", "tokens": [t], "stop": False} for t in reply]
        final = {"content": "", "tokens": reply if self.repeat_tokens else [], "stop": True, "tokens_predicted": n,
                 "id_slot": 0, "timings": {"prompt_n": len(prompt) - cached, "cache_n": cached, "prompt_ms": 1.0}}
        return httpx.Response(200, content=_sse(*chunks, final), headers={"content-type": "text/event-stream"})


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _args(**over):
    return sessions.parse_args([f"--{k.replace('_', '-')}={v}" for k, v in over.items()])


@pytest.mark.parametrize("repeat_tokens", [False, True], ids=["llama-server final chunk", "pyllm final chunk"])
def test_each_turn_sends_the_history_and_reads_the_servers_own_counters(repeat_tokens):
    args = _args(append_tokens=10, max_tokens=4, turns=3)
    corpus = list(range(1000, 3000))
    messages = sessions.user_messages(corpus, 2, 3, 6, seed="t")
    server = FakeServer(repeat_tokens)
    out = asyncio.run(sessions.run_sessions("http://test", messages, 2, args, transport=httpx.MockTransport(server)))
    turns = sorted(out["turns"], key=lambda t: (t.session, t.turn))
    assert [(t.session, t.turn) for t in turns] == [(s, i) for s in range(2) for i in range(3)]
    assert all(t.error is None for t in turns), [t.error for t in turns]
    for t in turns:
        assert t.reply == [50_000 + t.prompt_tokens + k for k in range(4)]  # the tokens, each once
        assert t.n_predicted == 4 and not math.isnan(t.ttft_s) and t.ttft_s <= t.latency_s
    by_session = {s: [t for t in turns if t.session == s] for s in range(2)}
    for s, ts in by_session.items():
        sent = [p for p in server.prompts if p[1:7] == messages[s][0]]
        assert sent[0] == [2] + messages[s][0]
        for i in (1, 2):  # the previous prompt, its reply, the next user message
            assert sent[i] == sent[i - 1] + ts[i - 1].reply + messages[s][i]
        assert [t.prompt_tokens for t in ts] == [7, 17, 27]
        assert [t.appended for t in ts] == [7, 10, 10]
        # turn 0 may share the BOS with the other session's; the fake server holds everything, so each later
        # turn recomputes the last reply token and the message
        assert ts[0].prompt_n + ts[0].cache_n == 7 and ts[0].cache_n <= 1
        assert [t.prompt_n for t in ts[1:]] == [7, 7] and [t.cache_n for t in ts[1:]] == [10, 20]
    summary = sessions.summarize(out["turns"], 3)
    assert summary["length_mismatches"] == 0 and summary["accounting_mismatches"] == 0 and summary["errors"] == []
    assert summary["later"]["recomputed"] == 7 and summary["later"]["appended"] == 10


def test_a_failing_turn_ends_its_session_and_is_reported():
    args = _args(append_tokens=10, max_tokens=4, turns=3)
    calls = []

    def handler(request):
        calls.append(1)
        if len(calls) == 2:
            return httpx.Response(400, json={"error": {"message": "the request exceeds the available context size"}})
        return FakeServer()(request)

    messages = sessions.user_messages(list(range(100, 400)), 1, 3, 6, seed=0)
    out = asyncio.run(sessions.run_sessions("http://test", messages, None, args, transport=httpx.MockTransport(handler)))
    assert [t.turn for t in out["turns"]] == [0, 1] and len(calls) == 2
    assert out["turns"][1].error.startswith("HTTP 400") and "context size" in out["turns"][1].error
    summary = sessions.summarize(out["turns"], 3)
    assert summary["errors"] == [f"session 0 turn 1: {out['turns'][1].error}"]
    assert summary["per_turn"][1]["n"] == 0 and summary["per_turn"][0]["n"] == 1


@pytest.mark.parametrize("final, message", [
    ({"stop": True, "tokens_predicted": 4}, "no timings.prompt_n / cache_n"),
    (None, "without a final chunk"),
    ({"error": {"code": 500, "message": "boom"}}, "boom"),
])
def test_a_stream_without_the_servers_counters_is_an_error_not_a_zero(final, message):
    args = _args(append_tokens=10, max_tokens=4)
    chunks = [{"content": "a", "tokens": [5], "stop": False}] + ([final] if final else [])

    def handler(request):
        return httpx.Response(200, content=_sse(*chunks))

    turn = sessions.Turn(session=0, turn=0, prompt_tokens=3, appended=3, expected=4)

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await sessions.one_turn(client, "http://test", [1, 2, 3], turn, args)

    assert message in asyncio.run(go()).error


def test_user_messages_are_seeded_and_sessions_open_at_distinct_offsets():
    corpus = list(range(5000))
    a = sessions.user_messages(corpus, 8, 4, 50, seed="1/8/0")
    assert a == sessions.user_messages(corpus, 8, 4, 50, seed="1/8/0")
    assert a != sessions.user_messages(corpus, 8, 4, 50, seed="1/8/1")
    assert len(a) == 8 and all(len(s) == 4 and all(len(m) == 50 for m in s) for s in a)
    assert len({s[0][0] for s in a}) == 8
    with pytest.raises(SystemExit, match="raise --corpus-chars"):
        sessions.user_messages(list(range(20)), 4, 2, 30, seed=0)


def test_defaults_quick_and_explicit_flags():
    a = sessions.parse_args([])
    assert (a.np, a.sessions, a.turns, a.append_tokens, a.max_tokens, a.cache_ram) == (2, [4, 8], 6, 200, 16, 2048)
    assert a.ctx == 2560  # 2 slots x (BOS + 6 x 200) = 2402, rounded up to 256
    assert a.configs == ["pyllm", "pyllm-cache", "llama-server"]
    q = sessions.parse_args(["--quick"])
    assert (q.np, q.sessions, q.turns, q.append_tokens, q.max_tokens) == (1, [2, 4], 3, 64, 8)
    q = sessions.parse_args(["--quick", "--turns", "5", "-np", "2", "--sessions", "3"])
    assert (q.np, q.sessions, q.turns, q.append_tokens) == (2, [3], 5, 64)


@pytest.mark.parametrize("argv, message", [
    (["--append-tokens", "16", "--max-tokens", "16"], "--append-tokens=16 must exceed --max-tokens=16"),
    (["--cache-ram", "0"], "--cache-ram=0"),
    (["-c", "1000"], "a session grows to 1201 tokens"),
    (["--configs", "pyllm,vllm"], "expected some of pyllm, pyllm-cache, llama-server"),
    (["--turns", "0"], "--turns=0: expected an integer >= 1"),
    (["--sessions", "0"], "expected positive integers"),
])
def test_bad_settings_are_refused_with_the_value(argv, message, capsys):
    with pytest.raises(SystemExit):
        sessions.parse_args(argv)
    assert message in capsys.readouterr().err


def test_each_configuration_gets_the_same_flags_and_its_own_cache_setting():
    args = sessions.parse_args(["-m", "/m.gguf", "-t", "2", "--pyllm-args=--metrics"])
    llama = Path("/x/llama-server")
    argv = {c: sessions.server_argv("llama-server" if c == "llama-server" else "pyllm",
                                    sessions.server_settings(c, args), llama)(8080) for c in sessions.CONFIGS}

    def flag(c, name):  # the server's flag (pyllm's own command line starts with python -c)
        a = argv[c]
        return a[len(a) - a[::-1].index(name)]

    for c in sessions.CONFIGS:
        assert "--jinja" in argv[c]
        assert [flag(c, f) for f in ("-m", "-np", "-c", "-fa", "-t", "--port")] == ["/m.gguf", "2", "2560", "on", "2", "8080"]
    assert flag("pyllm", "--cache-ram") == "0" and flag("pyllm-cache", "--cache-ram") == "2048"
    assert "--metrics" in argv["pyllm"] and "--metrics" in argv["pyllm-cache"]
    assert argv["llama-server"][0] == str(llama) and "-kvu" in argv["llama-server"]
    assert "--cache-ram" not in argv["llama-server"] and "--metrics" not in argv["llama-server"]  # its default


def _turn(session, turn, ttft_ms, prompt_n, cache_n, **kw):
    t = sessions.Turn(session=session, turn=turn, prompt_tokens=prompt_n + cache_n, appended=kw.pop("appended", 200),
                      expected=16, ttft_s=ttft_ms / 1000, prompt_n=prompt_n, cache_n=cache_n, n_predicted=16,
                      reply=[0] * 16)
    for k, v in kw.items():
        setattr(t, k, v)
    return t


def test_summary_table_and_goal_lines():
    cache = [_turn(s, 0, 100 + s, 185, 1) for s in range(4)] + [_turn(s, 1, 20 + 10 * s, 185, 200) for s in range(4)]
    nocache = [_turn(s, 0, 100, 185, 1) for s in range(4)] + [_turn(s, 1, 200, 385, 0) for s in range(4)]
    llama = [_turn(s, 0, 100, 185, 1) for s in range(4)] + [_turn(s, 1, 25, 186, 199) for s in range(4)]
    results = {"4": {"pyllm": sessions.summarize(nocache, 2), "pyllm-cache": sessions.summarize(cache, 2),
                     "llama-server": sessions.summarize(llama, 2)}}
    s = results["4"]["pyllm-cache"]
    assert s["per_turn"][1]["n"] == 4 and s["per_turn"][1]["recomputed"] == 185
    assert s["per_turn"][1]["ttft_p50_ms"] == pytest.approx(35) and s["per_turn"][1]["ttft_p99_ms"] == pytest.approx(49.7)
    assert s["all"]["n"] == 8
    text = sessions.table(results, list(sessions.CONFIGS))
    lines = text.splitlines()
    assert lines[0].startswith("| S | turn | prompt tokens | appended | recomputed: pyllm / pyllm-cache / llama-server")
    assert len(lines) == 2 + 3  # header, rule, turns 0 and 1, all
    assert lines[3].startswith("| 4 | 1 | 385 | 200 | 385 / 185 / 186 | 200 / 35 / 25 |")
    assert lines[3].endswith(f"| {49.7 / 25:.2f} |")
    assert lines[4].startswith("| 4 | all |")
    goals = sessions.goal_lines(results, list(sessions.CONFIGS))
    assert "S=4 pyllm-cache: turns 1+ recompute 185 prompt tokens on average for 200 appended (0.93x)" in goals[1]
    assert goals[-1].startswith("S=4: TTFT p99 over all turns, pyllm-cache") and "(goal: at most 1.10)" in goals[-1]


def test_problems_name_failed_turns_short_replies_and_counters_that_do_not_add_up():
    turns = [_turn(0, 0, 10, 185, 1), _turn(1, 0, 10, 185, 1, n_predicted=9, reply=[0] * 9),
             _turn(2, 0, 10, 185, 1, prompt_tokens=300), _turn(3, 0, math.nan, -1, -1, error="HTTP 503: busy")]
    r = sessions.summarize(turns, 1)
    assert r["all"]["n"] == 3 and r["length_mismatches"] == 1 and r["accounting_mismatches"] == 1
    notes = sessions.problems({"8": {"pyllm": r}})
    assert any("1 turns failed" in n and "HTTP 503: busy" in n for n in notes)
    assert any("1 replies did not have --max-tokens tokens" in n for n in notes)
    assert any("1 turns where timings.prompt_n + cache_n is not the prompt sent" in n for n in notes)
