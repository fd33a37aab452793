"""Prefix affinity: the prompt hash chains (no Ray needed) and PrefixAffinityRouter's choice (Ray's classes,
no Ray instance: the router's queue-length probe is replaced by fixed loads)."""
from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from pyllm.server.affinity import BLOCK_CHARS, RecentChains, match_chars, prefix_chain

SYSTEM = {"role": "system", "content": "You are terse. " * 30}


def chat(*messages, **extra) -> bytes:
    return json.dumps({"model": "m", "messages": list(messages), **extra}).encode()


def test_a_next_turn_extends_the_previous_turns_chain():
    turn1 = [SYSTEM, {"role": "user", "content": "hi"}]
    turn2 = turn1 + [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}]
    c1 = prefix_chain("/v1/chat/completions", chat(*turn1))
    c2 = prefix_chain("/v1/chat/completions", chat(*turn2, temperature=0.2))   # sampling is no part of the prompt
    assert len(c1) == 2 and len(c2) == 4
    assert c2[:2] == c1
    assert [chars for _, chars in c2] == sorted(chars for _, chars in c2)
    assert match_chars(c2, {h for h, _ in c1}) == c1[-1][1]
    # Key order inside a message is no difference; the text is.
    swapped = [dict(reversed(list(m.items()))) for m in turn1]
    assert prefix_chain("/v1/chat/completions", chat(*swapped)) == c1


def test_chains_differ_where_the_rendered_prompt_would():
    base = prefix_chain("/v1/chat/completions", chat(SYSTEM, {"role": "user", "content": "hi"}))
    other_first = prefix_chain("/v1/chat/completions", chat({"role": "system", "content": "x"},
                                                            {"role": "user", "content": "hi"}))
    assert not {h for h, _ in base} & {h for h, _ in other_first}
    # Only the head (API, model, tools) in common is no match at all.
    assert match_chars(other_first, {h for h, _ in base}) == 0
    tools = prefix_chain("/v1/chat/completions", chat(SYSTEM, {"role": "user", "content": "hi"},
                                                      tools=[{"type": "function", "function": {"name": "f"}}]))
    assert match_chars(tools, {h for h, _ in base}) == 0
    model = prefix_chain("/v1/chat/completions", json.dumps({"model": "other", "messages": [SYSTEM]}).encode())
    assert match_chars(model, {h for h, _ in base}) == 0
    # The same messages through another API render another prompt.
    messages = prefix_chain("/v1/messages", chat(SYSTEM, {"role": "user", "content": "hi"}))
    assert match_chars(messages, {h for h, _ in base}) == 0


def test_a_completion_prompt_is_cut_into_blocks():
    text = "a" * (BLOCK_CHARS * 2) + "tail"
    c1 = prefix_chain("/v1/completions", json.dumps({"prompt": text}).encode())
    c2 = prefix_chain("/v1/completions", json.dumps({"prompt": text + " and more text"}).encode())
    assert len(c1) == 3
    assert c2[:2] == c1[:2] and c2[2] != c1[2]   # the partial last block changed
    assert match_chars(c2, {h for h, _ in c1}) == c1[1][1] > BLOCK_CHARS
    # One prompt in a list is the same prompt; token ids are blocks too.
    assert prefix_chain("/v1/completions", json.dumps({"prompt": [text]}).encode()) == c1
    assert prefix_chain("/completion", json.dumps({"prompt": list(range(200))}).encode())


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", b"{not json"), ("/v1/chat/completions", b"[1, 2]"),
    ("/v1/chat/completions", b'{"messages": "not a list"}'), ("/v1/chat/completions", b'{"messages": []}'),
    ("/v1/models", b""), ("/health", b"{}"), ("/v1/completions", b'{"prompt": ["a", "b"]}'),
    ("/v1/completions", b'{"prompt": 7}'), ("/v1/chat/completions", b"\xff\xfe"),
])
def test_no_chain_where_no_prompt_is_stated(path, body):
    assert prefix_chain(path, body) == []


def test_recent_chains_forget_the_oldest_and_expired():
    a = prefix_chain("/v1/chat/completions", chat({"role": "user", "content": "a"}))
    b = prefix_chain("/v1/chat/completions", chat({"role": "user", "content": "b"}))
    c = prefix_chain("/v1/chat/completions", chat({"role": "user", "content": "c"}))
    held = RecentChains(2)
    held.add(a, now=0.0)
    held.add(b, now=1.0)
    held.add(c, now=2.0)
    assert len(held) == 2 and a[0][0] not in held and b[0][0] in held and c[0][0] in held
    # A chain added twice counts once; a shared prefix stays while any chain holding it stays.
    a2 = prefix_chain("/v1/chat/completions", chat({"role": "user", "content": "a"}, {"role": "user", "content": "x"}))
    held = RecentChains(8, ttl_s=10)
    held.add(a, now=0.0)
    held.add(a2, now=5.0)
    held.trim(8, now=12.0)   # a expired, a2 (which starts with a) not
    assert len(held) == 1 and a[0][0] in held
    held.trim(8, now=16.0)
    assert len(held) == 0 and held.hashes() == []
    with pytest.raises(ValueError, match="capacity=0"):
        RecentChains(0)


# ---- the router, with Ray's classes but no Ray instance ----
ray_serve = pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install 'pyllm[ray]')")


def _router(loads: dict, threshold: int = 4):
    from pyllm.server.replicas import PrefixAffinityRouter

    router = PrefixAffinityRouter.__new__(PrefixAffinityRouter)   # no deployment: only the choice is tested
    router.initialize_state(imbalance_threshold=threshold)

    async def probe(replicas, backoff_index):
        return [(r, loads.get(r.replica_id)) for r in replicas]

    router._probe_queue_lens = probe
    return router


def _replica(name: str, chains=(), kv_free: int = 0):
    hashes = [h for chain in chains for h, _ in chain]
    return SimpleNamespace(replica_id=name, routing_stats={"prefix_hashes": hashes, "kv_cells_free": kv_free})


def _choose(router, replicas, body: bytes):
    request = SimpleNamespace(args=[{"prefix": prefix_chain("/v1/chat/completions", body)}])
    return [[r.replica_id for r in rank] for rank in asyncio.run(router.choose_replicas(replicas, request))]


def test_router_sends_a_prompt_to_the_replica_holding_its_longest_prefix():
    turn1 = [SYSTEM, {"role": "user", "content": "hi"}]
    turn2 = turn1 + [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}]
    system_only = [SYSTEM, {"role": "user", "content": "another question"}]
    held1 = prefix_chain("/v1/chat/completions", chat(*turn1))
    held_sys = prefix_chain("/v1/chat/completions", chat(*system_only))
    a, b, c = _replica("a"), _replica("b", [held_sys]), _replica("c", [held1])
    assert _choose(_router({"a": 0, "b": 0, "c": 3}), [a, b, c], chat(*turn2))[0] == ["c"]
    # Too much busier than the least-loaded: the least-loaded gets it.
    assert _choose(_router({"a": 0, "b": 1, "c": 5}), [a, b, c], chat(*turn2))[0] == ["a"]
    assert _choose(_router({"a": 0, "b": 1, "c": 5}, threshold=5), [a, b, c], chat(*turn2))[0] == ["c"]
    # Every replica stays a candidate, least-loaded next.
    assert _choose(_router({"a": 2, "b": 1, "c": 0}), [a, b, c], chat(*turn2)) == [["c"], ["b"], ["a"]]
    # A prompt nobody holds: the least-loaded, then the one with the most free KV cells.
    fresh = chat({"role": "user", "content": "new"})
    assert _choose(_router({"a": 1, "b": 0, "c": 1}), [a, b, c], fresh)[0] == ["b"]
    roomy = [_replica("a", kv_free=10), _replica("b", kv_free=500)]
    assert _choose(_router({"a": 0, "b": 0}), roomy, fresh)[0] == ["b"]
    # A replica that did not answer the probe is not chosen.
    assert _choose(_router({"a": 0, "b": 0}), [a, c], chat(*turn2))[0] == ["a"]


def test_router_remembers_where_it_sent_a_prompt_until_the_reports_carry_it():
    turn1 = [SYSTEM, {"role": "user", "content": "hi"}]
    turn2 = turn1 + [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}]
    router = _router({"a": 0, "b": 0})
    a, b = _replica("a"), _replica("b")
    request = SimpleNamespace(args=[{"prefix": prefix_chain("/v1/chat/completions", chat(*turn1))}])
    router.on_request_routed(request, "b", None)
    for _ in range(10):
        assert _choose(router, [a, b], chat(*turn2))[0] == ["b"]


def test_bad_router_and_deployment_settings_are_refused_before_ray_starts():
    from pyllm.errors import ConfigError
    from pyllm.server.replicas import PrefixAffinityRouter, build, build_app

    router = PrefixAffinityRouter.__new__(PrefixAffinityRouter)
    with pytest.raises(ConfigError, match="imbalance_threshold=-1"):
        router.initialize_state(imbalance_threshold=-1)
    with pytest.raises(TypeError):   # an option the router does not know is refused, not ignored
        router.initialize_state(imbalance_treshold=2)
    for kwargs, message in (({"num_replicas": 0}, "replicas=0"), ({"router": "random"}, "router='random'"),
                            ({"imbalance_threshold": -2}, "imbalance_threshold=-2"), ({"num_gpus": -1}, "num_gpus=-1")):
        kwargs = {"num_replicas": 2, **kwargs}
        with pytest.raises(ConfigError, match=message):
            build_app(None, None, kwargs.pop("num_replicas"), **kwargs)
    with pytest.raises(ConfigError, match="unknown argument.*replicas"):
        build({"replicas": "2"})
    with pytest.raises(ConfigError, match="num_replicas='two' is not an integer"):
        build({"num_replicas": "two"})


def test_a_replica_reports_at_most_what_its_engine_can_hold():
    from pyllm.server.replicas import PyllmReplica

    class Engine:
        def __init__(self):
            self.numbers = {"n_parallel": 2, "n_ctx": 1000, "kv_cells_used": 300, "active": 0, "queued": 0}

        def stats(self):
            return dict(self.numbers)

    class Bare(PyllmReplica):   # its engine replaced: only the report is tested, nothing to shut down
        def __del__(self):
            pass

    replica = Bare.__new__(Bare)
    replica._engine, replica._held = Engine(), RecentChains(1024)
    chains = [prefix_chain("/v1/chat/completions", chat({"role": "user", "content": f"q{i}"})) for i in range(5)]
    for chain in chains:
        replica._held.add(chain)
    report = replica.record_routing_stats()
    # n_parallel slots, no host tier: the 2 newest prompts.
    assert set(report["prefix_hashes"]) == {chains[3][0][0], chains[4][0][0]}
    assert report["kv_cells_free"] == 700 and report["active"] == 0 and report["queued"] == 0
    for chain in chains:
        replica._held.add(chain)
    replica._engine.numbers["prompt_cache_entries"] = 2   # the host tier holds 2 more
    assert len(replica.record_routing_stats()["prefix_hashes"]) == 4
    # An engine with no cells in use and no host entries holds no prompt: nothing is reported.
    replica._engine.numbers.update(kv_cells_used=0, prompt_cache_entries=0)
    assert replica.record_routing_stats()["prefix_hashes"] == []
