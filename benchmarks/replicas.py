#!/usr/bin/env python3
"""Replicas on Ray Serve: prefix-affinity routing against Ray Serve's default router (issue 23).

S concurrent conversations (default 8) each send T turns (default 6) one after another through the
OpenAI chat API, streamed, greedy, ``ignore_eos``, ``max_tokens`` = --max-tokens. Every conversation
starts with the same long system prompt (--system-chars of Python's pydoc topics: agents share one),
then its own first question; each turn appends the previous reply and a new user message (a slice of
pydoc topics at a seeded offset, --user-chars characters, the same for every configuration). Each
configuration is its own ``pyllm serve`` process on a random free port of 127.0.0.1, with the same -m,
-np, -c, -t and --cache-ram:

- ``serve``: plain ``pyllm serve`` (one engine, no Ray): the baseline of the single-replica overhead
- ``replicas-1``: ``pyllm serve --replicas 1`` (one engine behind Ray Serve)
- ``power-of-two``: ``--replicas R --replica-router power-of-two`` (Ray Serve's default router)
- ``affinity``: ``--replicas R`` (pyllm's PrefixAffinityRouter)

Measured per turn from the servers' own numbers: time to first token (request sent -> first streamed
chunk with content), ``usage.prompt_tokens`` and ``usage.prompt_tokens_details.cached_tokens``
(``stream_options.include_usage``); the replica that answered (``x-pyllm-replica``). Reported per
configuration: prefix-cache hit rate (cached / prompt tokens, turns after the first), prompt tokens
recomputed per later turn (prompt - cached) against the tokens a turn appends (its prompt minus the
previous turn's prompt), TTFT p50/p99, aggregate generated tokens/s (all turns' completion tokens over the
run's wall time), and how many conversations stayed on one replica. The issue's goals are printed, never
asserted: with affinity the recomputed tokens per turn near the appended ones and TTFT p99 below
power-of-two's; replicas-1 within 5% of serve's tokens/s.

    python3 benchmarks/replicas.py                                  # default model, R = 2, -np 2, S = 8, 6 turns
    python3 benchmarks/replicas.py --quick                          # a smoke run: S = 2, 2 turns, 4 tokens
    python3 benchmarks/replicas.py --configs power-of-two,affinity --out bench-out/replicas

Needs ``pip install 'pyllm[ray]'``. Not yet timed on a quiet machine; no figures in the README come from it.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

from benchlib import percentile
from serve_load import PYLLM_CLI, ServerProcess, _sigterm_as_interrupt

CONFIGS = ("serve", "replicas-1", "power-of-two", "affinity")


@dataclass
class Turn:
    config: str
    conversation: int
    turn: int
    ttft_s: float
    total_s: float
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    replica: str


def corpus_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def user_texts(text: str, sessions: int, turns: int, chars: int, seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    return [[text[(o := rng.randrange(0, len(text) - chars)):o + chars] for _ in range(turns)]
            for _ in range(sessions)]


def server_argv(config: str, args: argparse.Namespace):
    common = ["-m", args.model, "-np", str(args.np), "-c", str(args.ctx), "-t", str(args.threads),
              "--cache-ram", str(args.cache_ram), "--host", "127.0.0.1", "--max-queue", str(max(64, 2 * args.sessions))]
    extra = {"serve": [], "replicas-1": ["--replicas", "1"],
             "power-of-two": ["--replicas", str(args.replicas), "--replica-router", "power-of-two"],
             "affinity": ["--replicas", str(args.replicas)]}[config]
    return lambda port: [*PYLLM_CLI, "serve", *common, *extra, "--port", str(port)]


def wait_replicas(url: str, n: int, timeout_s: float = 300.0) -> None:
    """/health answers once one replica is up: wait until ``n`` distinct replicas have answered."""
    import httpx

    if n <= 1:
        return
    seen: set = set()
    deadline = time.monotonic() + timeout_s
    while len(seen) < n:
        if time.monotonic() > deadline:
            raise SystemExit(f"only {len(seen)} of {n} replicas answered /health within {timeout_s:.0f} s")
        r = httpx.get(url + "/health", timeout=10)
        if r.status_code == 200:
            seen.add(r.headers.get("x-pyllm-replica"))
        time.sleep(0.1)


def conversation(url: str, config: str, i: int, system: str, users: Sequence[str], args) -> list[Turn]:
    import httpx

    messages = [{"role": "system", "content": system}]
    out = []
    with httpx.Client(timeout=600) as client:
        for t, text in enumerate(users):
            messages.append({"role": "user", "content": text})
            body = {"messages": messages, "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True,
                    "stream": True, "stream_options": {"include_usage": True}}
            t0 = time.perf_counter()
            ttft, reply, usage = None, [], None
            with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    raise SystemExit(f"{config}: HTTP {r.status_code}: {r.read()[:500]!r}")
                replica = r.headers.get("x-pyllm-replica", "")
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    for c in chunk.get("choices", ()):
                        piece = (c.get("delta") or {}).get("content")
                        if piece:
                            if ttft is None:
                                ttft = time.perf_counter() - t0
                            reply.append(piece)
                    if chunk.get("usage"):
                        usage = chunk["usage"]
            total = time.perf_counter() - t0
            if usage is None:
                raise SystemExit(f"{config}: a stream ended without usage")
            messages.append({"role": "assistant", "content": "".join(reply)})
            out.append(Turn(config, i, t, ttft if ttft is not None else total, total, usage["prompt_tokens"],
                            usage.get("prompt_tokens_details", {}).get("cached_tokens", 0),
                            usage["completion_tokens"], replica))
    return out


def run_config(config: str, args, system: str, users: list[list[str]], log_dir: Path) -> tuple[list[Turn], float]:
    server = ServerProcess(config, server_argv(config, args), log_dir / f"{config}.log", grace_s=60.0)
    server.start()
    try:
        wait_replicas(server.url, {"serve": 1, "replicas-1": 1}.get(config, args.replicas))
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(len(users)) as pool:
            futures = [pool.submit(conversation, server.url, config, i, system, u, args) for i, u in enumerate(users)]
            turns = [t for f in futures for t in f.result()]
        return turns, time.perf_counter() - t0
    finally:
        server.stop()


def summarize(turns: list[Turn], wall_s: float) -> dict:
    later = [t for t in turns if t.turn > 0]
    prev = {(t.conversation, t.turn): t for t in turns}
    appended = [t.prompt_tokens - prev[(t.conversation, t.turn - 1)].prompt_tokens for t in later]
    ttft = sorted(t.ttft_s for t in turns)
    by_conv: dict = {}
    for t in turns:
        by_conv.setdefault(t.conversation, set()).add(t.replica)
    return {
        "turns": len(turns),
        "hit_rate": (sum(t.cached_tokens for t in later) / max(1, sum(t.prompt_tokens for t in later))) if later else None,
        "recomputed_per_turn": statistics.mean(t.prompt_tokens - t.cached_tokens for t in later) if later else None,
        "appended_per_turn": statistics.mean(appended) if appended else None,
        "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
        "tokens_per_s": sum(t.completion_tokens for t in turns) / wall_s if wall_s > 0 else None,
        "one_replica_conversations": sum(1 for reps in by_conv.values() if len(reps) == 1),
        "conversations": len(by_conv), "wall_s": wall_s,
    }


def _f(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(results: dict) -> str:
    rows = ["| config | hit rate | recomputed / turn | appended / turn | TTFT p50 (s) | TTFT p99 (s) | tok/s | "
            "conversations on one replica |", "|---|---|---|---|---|---|---|---|"]
    for name, s in results.items():
        rows.append(f"| {name} | {_f(s['hit_rate'], '.1%')} | {_f(s['recomputed_per_turn'], '.0f')} | "
                    f"{_f(s['appended_per_turn'], '.0f')} | {_f(s['ttft_p50_s'], '.3f')} | {_f(s['ttft_p99_s'], '.3f')} | "
                    f"{_f(s['tokens_per_s'], '.1f')} | {s['one_replica_conversations']}/{s['conversations']} |")
    return "\n".join(rows)


def goals(results: dict) -> list[str]:
    out = []
    a, p = results.get("affinity"), results.get("power-of-two")
    if a and a["recomputed_per_turn"] is not None and a["appended_per_turn"]:
        out.append(f"affinity recomputes {a['recomputed_per_turn'] / a['appended_per_turn']:.2f}x the appended tokens "
                   "per turn (goal: close to 1)")
    if a and p:
        out.append(f"TTFT p99: affinity {a['ttft_p99_s']:.3f} s, power-of-two {p['ttft_p99_s']:.3f} s (goal: affinity lower)")
    s, r1 = results.get("serve"), results.get("replicas-1")
    if s and r1 and s["tokens_per_s"]:
        out.append(f"replicas-1 / serve tokens/s: {r1['tokens_per_s'] / s['tokens_per_s']:.3f} (goal: >= 0.95)")
    return out


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", help="GGUF model (default: the default model)")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("-np", "--np", type=int, default=2, help="sequences per engine")
    ap.add_argument("-c", "--ctx", type=int, default=8192, help="n_ctx per engine")
    ap.add_argument("-t", "--threads", type=int, default=1, help="threads per engine (2 replicas on 2 cores: 1)")
    ap.add_argument("--cache-ram", type=int, default=2048, help="MiB of host prompt cache per engine")
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--system-chars", type=int, default=6000, help="characters of the shared system prompt")
    ap.add_argument("--user-chars", type=int, default=600, help="characters of each user message")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="S = 2, 2 turns, 4 tokens, short prompts")
    ap.add_argument("--out", type=Path, help="directory for replicas.json, replicas.md and the server logs")
    args = ap.parse_args(argv)
    if args.quick:
        args.sessions, args.turns, args.max_tokens, args.system_chars, args.user_chars = 2, 2, 4, 800, 200
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in args.configs if c not in CONFIGS]
    if bad:
        ap.error(f"--configs: {', '.join(bad)} not known; expected some of {', '.join(CONFIGS)}")
    for name in ("replicas", "np", "ctx", "threads", "sessions", "turns", "max_tokens", "system_chars", "user_chars"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')}={getattr(args, name)} is out of range; expected >= 1")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    import signal

    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    if args.model is None:
        from pyllm import default_model

        args.model = str(default_model.path())
    text = corpus_text()
    system = text[:args.system_chars]
    users = user_texts(text[args.system_chars:], args.sessions, args.turns, args.user_chars, args.seed)
    log_dir = args.out or Path("bench-out") / "replicas"
    log_dir.mkdir(parents=True, exist_ok=True)
    results, raw = {}, []
    for config in args.configs:
        print(f"{config}: {args.sessions} conversations x {args.turns} turns ...", file=sys.stderr, flush=True)
        turns, wall = run_config(config, args, system, users, log_dir)
        results[config] = summarize(turns, wall)
        raw += [asdict(t) for t in turns]
    command = " ".join(["python3", "benchmarks/replicas.py", *(argv if argv is not None else sys.argv[1:])])
    report = "\n".join([f"`{command}`", "", table(results), "", *[f"- {g}" for g in goals(results)]])
    print(report)
    if args.out is not None:
        (args.out / "replicas.md").write_text(report + "\n")
        (args.out / "replicas.json").write_text(json.dumps({"args": {k: v for k, v in vars(args).items()
                                                                     if k != "out"}, "results": results,
                                                            "turns": raw}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
