#!/usr/bin/env python3
"""Long multi-turn sessions: pyllm serve without and with --cache-ram against llama.cpp's llama-server.

S concurrent conversations (default 2x and 4x -np) each send T turns (default 6) one after another; a
turn's prompt is the previous turn's prompt, the previous reply and a new user message, so every turn
appends about --append-tokens (default 200) tokens to a prompt that keeps growing. With more sessions
than slots, sessions take each other's slots: a server that keeps only what its slots hold recomputes
whole prompts, one with a host-memory prompt cache (--cache-ram) gets the evicted prefix back. Three
configurations, each its own server process on a random free port of 127.0.0.1, all started with the
same -m, -np, -c, -b/-ub, -ctk/-ctv, -fa, -t, -ngl, --jinja and a unified KV pool (serve_load.py's
``server_argv``: pyllm's default, llama-server's -kvu):

- ``pyllm``: ``pyllm serve --cache-ram 0`` (no host tier: only the KV cells of the slots are reused)
- ``pyllm-cache``: ``pyllm serve --cache-ram 2048`` (--cache-ram MiB)
- ``llama-server``: llama-server built from the vendored tree (benchmarks/native), its default --cache-ram

The API: llama-server's native ``/completion`` with the prompt as token ids, ``cache_prompt: true``,
``n_predict`` = --max-tokens (default 16), greedy, ``ignore_eos``, streamed with ``return_tokens``.
Token ids rather than chat messages because that is the path both servers handle identically: the
chat API would put each server's own template engine and a re-tokenization of every reply between the
session and the cache, so the two would not be asked for the same tokens. A user message is a slice of
Python's pydoc topics (tokenized by the first server's /tokenize) at a seeded offset, its own for each
session and turn, the same for every configuration; the reply is the tokens the server generated.

Measured per turn, from each server's own numbers: time to first token (request sent -> first streamed
chunk that carries a generated token), prompt tokens recomputed (``timings.prompt_n``) and reused
(``timings.cache_n``). Reported per configuration, S and turn index: TTFT p50/p99 (pooled over the
sessions of all rounds) and mean tokens recomputed, then the same over all turns; a markdown table
(printed; sessions.md with --out) and every turn's numbers (sessions.json), the exact command, the
servers' command lines and the machine. The issue's goal, reported and never asserted (a benchmark,
not a test): with the cache, the tokens recomputed per turn stay near the tokens appended, not the
whole prompt, and TTFT p99 is at most 1.1x llama-server's.

    python3 benchmarks/sessions.py                         # default model, -np 2, S = 4,8, 6 turns
    python3 benchmarks/sessions.py --quick                 # a smoke run: -np 1, S = 2,4, 3 short turns

Sized (estimated from pp512/tg128 on the default model, not yet timed on a quiet machine) to take 5-10
minutes on 2 cores by default and about a minute with --quick.
    python3 benchmarks/sessions.py --sessions 8,16 -np 4 --turns 8 --out bench-out/sessions
    python3 benchmarks/sessions.py --llama-server build/native/bin/llama-server --configs pyllm-cache,llama-server

Server processes are always stopped when the script ends (serve_load.py's ``ServerProcess``).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from benchlib import DEFAULT_BUILD_DIR, build_native, percentile
from compare_native import cpu_name
from serve_load import PYLLM_CLI, ServerProcess, _ints, _sigterm_as_interrupt, server_argv, tokenize_corpus

CONFIGS = ("pyllm", "pyllm-cache", "llama-server")
QUICK = {"np": 1, "turns": 3, "append_tokens": 64, "max_tokens": 8, "corpus_chars": 60_000}


def config_label(name: str, args: argparse.Namespace) -> str:
    return {"pyllm": "pyllm --cache-ram 0", "pyllm-cache": f"pyllm --cache-ram {args.cache_ram}",
            "llama-server": "llama-server (default --cache-ram)"}[name]


# ---------------------------------------------------------------------------------------------
# Sessions
# ---------------------------------------------------------------------------------------------
def user_messages(corpus: list[int], n_sessions: int, turns: int, length: int, seed) -> list[list[list[int]]]:
    """messages[session][turn]: ``length`` corpus tokens each, at seeded offsets; the sessions open at distinct
    offsets, so they share at most a token or two past BOS (where the text happens to agree) and only a
    session's own history is worth reusing."""
    if length < 1:
        raise ValueError(f"user message length {length}; expected at least 1 token")
    if len(corpus) < length + n_sessions:
        raise SystemExit(f"the corpus has {len(corpus)} tokens; {n_sessions} sessions of {length}-token messages "
                         "need more (raise --corpus-chars)")
    rng = random.Random(str(seed))
    firsts = rng.sample(range(len(corpus) - length + 1), n_sessions)
    out = []
    for s in range(n_sessions):
        offsets = [firsts[s]] + [rng.randrange(len(corpus) - length + 1) for _ in range(turns - 1)]
        out.append([corpus[o:o + length] for o in offsets])
    return out


def session_tokens(turns: int, append_tokens: int, bos: bool = True) -> int:
    """Tokens a session holds after its last reply: BOS + turns x (user message + reply)."""
    return int(bos) + turns * append_tokens


@dataclass
class Turn:
    """One turn of one session, as the client saw it and the server reported it."""
    session: int
    turn: int
    prompt_tokens: int                 # the prompt sent (ids)
    appended: int                      # prompt tokens new since the previous turn's prompt (its reply + a user message)
    expected: int                      # the reply length asked for (n_predict)
    ttft_s: float = math.nan           # request sent -> first chunk carrying a generated token
    latency_s: float = math.nan        # request sent -> final chunk
    prompt_n: int = -1                 # the server's timings.prompt_n: prompt tokens recomputed
    cache_n: int = -1                  # the server's timings.cache_n: prompt tokens reused
    prompt_ms: float = math.nan        # the server's timings.prompt_ms
    n_predicted: int = 0
    id_slot: int = -1
    reply: list[int] = field(default_factory=list)
    error: Optional[str] = None


def request_body(prompt: list[int], args: argparse.Namespace) -> dict:
    """Native /completion, the same on both servers: token ids, prompt cache on, greedy, a fixed reply length
    (``ignore_eos``: end-of-generation tokens are never sampled), streamed with each chunk's token ids."""
    return {"prompt": prompt, "n_predict": args.max_tokens, "ignore_eos": True, "cache_prompt": True,
            "temperature": 0.0, "stream": True, "return_tokens": True}


async def one_turn(client, url: str, prompt: list[int], turn: Turn, args: argparse.Namespace) -> Turn:
    """Send one turn and read its stream. The reply is the tokens of the chunks before the final one (a
    final chunk may list all tokens again; llama-server's lists none when streaming); the counters are the
    final chunk's ``timings``."""
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", url + "/completion", json=request_body(prompt, args)) as resp:
            if resp.status_code != 200:
                turn.error = f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}"
                return turn
            final = None
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    turn.error = str(obj["error"])[:300]
                    return turn
                if obj.get("stop"):  # read on to the end of the stream: the request is over for the server too
                    final = obj
                    continue
                if obj.get("tokens") or obj.get("content"):
                    if math.isnan(turn.ttft_s):
                        turn.ttft_s = time.perf_counter() - t0
                    turn.reply.extend(int(t) for t in obj.get("tokens") or ())
            turn.latency_s = time.perf_counter() - t0
    except Exception as exc:  # a failed turn is reported; its session stops (its history is unknown)
        turn.error = f"{type(exc).__name__}: {exc}"
        return turn
    if final is None:
        turn.error = "the stream ended without a final chunk"
        return turn
    timings = final.get("timings") or {}
    if "prompt_n" not in timings or "cache_n" not in timings:
        turn.error = f"the final chunk has no timings.prompt_n / cache_n: {sorted(final)}"
        return turn
    turn.prompt_n, turn.cache_n = int(timings["prompt_n"]), int(timings["cache_n"])
    turn.prompt_ms = float(timings.get("prompt_ms", math.nan))
    turn.n_predicted = int(final.get("tokens_predicted", len(turn.reply)))
    turn.id_slot = int(final.get("id_slot", -1))
    if math.isnan(turn.ttft_s):
        turn.error = "no generated token was streamed"
    return turn


async def run_sessions(url: str, messages: list[list[list[int]]], bos: Optional[int],
                       args: argparse.Namespace, transport=None) -> dict:
    """All sessions at once, each sending its turns one after another (``messages[session][turn]``: the
    user messages); returns the turns and the wall time. ``transport``: an httpx transport (tests)."""
    import httpx

    turns: list[Turn] = []

    async def session(client, sid: int) -> None:
        prompt: list[int] = [bos] if bos is not None else []
        previous = 0  # the previous turn's prompt: this one appends its reply and a user message
        for t, msg in enumerate(messages[sid]):
            prompt = prompt + msg
            turn = Turn(session=sid, turn=t, prompt_tokens=len(prompt), appended=len(prompt) - previous,
                        expected=args.max_tokens)
            turns.append(await one_turn(client, url, prompt, turn, args))
            if turn.error is not None:
                return
            previous = len(prompt)
            prompt = prompt + turn.reply

    # A new connection per turn: a kept-alive one can be closed by the server just as the next turn goes out on
    # it (llama-server did so in a dry run: "Server disconnected without sending a response"), and a POST is
    # not retried. Connecting to 127.0.0.1 costs both servers' TTFT alike, well under a millisecond.
    n = len(messages)
    limits = httpx.Limits(max_connections=n + 2, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(args.request_timeout, connect=10.0),
                                 transport=transport) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(session(client, s) for s in range(n)))
        wall = time.perf_counter() - t0
    return {"wall_s": wall, "turns": turns}


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------
def _mean(xs: Sequence[float]) -> float:
    return statistics.fmean(xs) if xs else math.nan


def summarize(turns: Sequence[Turn], n_turns: int) -> dict:
    """One configuration at one S, over its rounds: per turn index and over all turns, the number of turns
    measured, mean prompt tokens sent / appended / recomputed (prompt_n) / reused (cache_n), and TTFT
    p50/p99 in ms (pooled); plus the problems (failed turns, replies of the wrong length, a server whose
    prompt_n + cache_n is not the prompt it was sent)."""
    ok = [t for t in turns if t.error is None]

    def stats(group: Sequence[Turn]) -> dict:
        ttft = [t.ttft_s for t in group]
        return {"n": len(group), "prompt_tokens": _mean([t.prompt_tokens for t in group]),
                "appended": _mean([t.appended for t in group]), "recomputed": _mean([t.prompt_n for t in group]),
                "cached": _mean([t.cache_n for t in group]),
                "ttft_p50_ms": 1000 * percentile(ttft, 50), "ttft_p99_ms": 1000 * percentile(ttft, 99)}

    return {
        "per_turn": [stats([t for t in ok if t.turn == i]) for i in range(n_turns)],
        "all": stats(ok),
        # turn 0 is a whole new prompt on every server: the cache shows in the later turns
        "later": stats([t for t in ok if t.turn > 0]),
        "turns_sent": len(turns),
        "errors": [f"session {t.session} turn {t.turn}: {t.error}" for t in turns if t.error is not None],
        "length_mismatches": sum(1 for t in ok if t.n_predicted != t.expected or len(t.reply) != t.expected),
        "accounting_mismatches": sum(1 for t in ok if t.prompt_n + t.cache_n != t.prompt_tokens),
    }


def _fmt(x: float, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def table(results: dict, configs: Sequence[str]) -> str:
    """The markdown table: one row per S and turn index (then 'all'), each configuration's mean tokens
    recomputed and TTFT p50/p99, and the TTFT p99 ratio pyllm-cache / llama-server where both ran."""
    names = " / ".join(configs)
    ratio = "pyllm-cache" in configs and "llama-server" in configs
    head = (f"| S | turn | prompt tokens | appended | recomputed: {names} | TTFT p50 ms: {names} | "
            f"TTFT p99 ms: {names} |" + (" TTFT p99 pyllm-cache / llama-server |" if ratio else ""))
    lines = [head, "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if ratio else "")]
    for s_key in sorted(results, key=int):
        by = results[s_key]
        ref = next(by[c] for c in configs if c in by)
        rows = [(str(i), i) for i in range(len(ref["per_turn"]))] + [("all", None)]
        for label, i in rows:
            def row(c: str) -> Optional[dict]:
                if c not in by:
                    return None
                return by[c]["all"] if i is None else by[c]["per_turn"][i]

            cells = {c: row(c) for c in configs}

            def join(key: str, spec: str) -> str:
                return " / ".join("-" if cells[c] is None else _fmt(cells[c][key], spec) for c in configs)

            base = next(cell for cell in cells.values() if cell is not None)
            line = (f"| {s_key} | {label} | {_fmt(base['prompt_tokens'], '.0f')} | {_fmt(base['appended'], '.0f')} | "
                    f"{join('recomputed', '.0f')} | {join('ttft_p50_ms', '.0f')} | {join('ttft_p99_ms', '.0f')} |")
            if ratio:
                p, q = cells["pyllm-cache"], cells["llama-server"]
                r = p["ttft_p99_ms"] / q["ttft_p99_ms"] if p and q and q["ttft_p99_ms"] else math.nan
                line += f" {_fmt(r, '.2f')} |"
            lines.append(line)
    return "\n".join(lines)


def goal_lines(results: dict, configs: Sequence[str]) -> list[str]:
    """The issue's goal, as measured (reported, not asserted)."""
    out = []
    for s_key in sorted(results, key=int):
        by = results[s_key]
        for c in configs:
            if c not in by or by[c]["later"]["n"] == 0:
                continue
            later = by[c]["later"]
            out.append(f"S={s_key} {c}: turns 1+ recompute {later['recomputed']:.0f} prompt tokens on average for "
                       f"{later['appended']:.0f} appended ({later['recomputed'] / later['appended']:.2f}x) of "
                       f"{later['prompt_tokens']:.0f} in the prompt")
        if "pyllm-cache" in by and "llama-server" in by:
            p, q = by["pyllm-cache"]["all"]["ttft_p99_ms"], by["llama-server"]["all"]["ttft_p99_ms"]
            if q and not math.isnan(p) and not math.isnan(q):
                out.append(f"S={s_key}: TTFT p99 over all turns, pyllm-cache {p:.0f} ms / llama-server {q:.0f} ms = "
                           f"{p / q:.2f} (goal: at most 1.10)")
    return out


def problems(results: dict) -> list[str]:
    out = []
    for s_key in sorted(results, key=int):
        for c, r in results[s_key].items():
            if r["errors"]:
                out.append(f"S={s_key} {c}: {len(r['errors'])} turns failed (their sessions stopped), e.g. {r['errors'][0]}")
            if r["length_mismatches"]:
                out.append(f"S={s_key} {c}: {r['length_mismatches']} replies did not have --max-tokens tokens "
                           "(ignore_eos not honoured?)")
            if r["accounting_mismatches"]:
                out.append(f"S={s_key} {c}: {r['accounting_mismatches']} turns where timings.prompt_n + cache_n is not "
                           "the prompt sent")
    return out


# ---------------------------------------------------------------------------------------------
# The machine and the settings
# ---------------------------------------------------------------------------------------------
def machine(llama_server: Optional[Path]) -> dict:
    """What ran it: CPU, memory, OS, Python, this pyllm build (``pyllm info --json``) and llama-server's
    ``--version``."""
    out: dict = {"cpu": cpu_name(), "affinity_cpus": len(os.sched_getaffinity(0)), "os": platform.platform(),
                 "python": platform.python_version()}
    try:
        kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal:"))
        out["memory_gib"] = round(kib / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        out["memory_gib"] = None
    try:
        proc = subprocess.run([*PYLLM_CLI, "info", "--json"], capture_output=True, text=True, timeout=120,
                              cwd=tempfile.gettempdir())
        info = json.loads(proc.stdout)
        out["pyllm"] = {k: info.get(k) for k in ("version", "llama_cpp_commit", "backends", "gpu_devices")}
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        out["pyllm"] = f"pyllm info --json failed: {exc}"
    if llama_server is not None:
        try:
            proc = subprocess.run([str(llama_server), "--version"], capture_output=True, text=True, timeout=60)
            text = (proc.stdout + proc.stderr).strip().splitlines()
            out["llama_server"] = next((line for line in text if line.startswith("version")), " ".join(text[:2]))
        except (OSError, subprocess.SubprocessError) as exc:
            out["llama_server"] = f"{llama_server} --version failed: {exc}"
    return out


def describe_machine(m: dict) -> str:
    p = m.get("pyllm")
    build = (f"pyllm {p['version']} (llama.cpp {p['llama_cpp_commit']}, backends {','.join(p['backends'] or [])}"
             + (f", GPUs {'; '.join(p['gpu_devices'])}" if p.get("gpu_devices") else ", no GPU") + ")"
             if isinstance(p, dict) else str(p))
    return (f"{m['cpu']} ({m['affinity_cpus']} usable), {m['memory_gib']} GiB RAM, {m['os']}, Python {m['python']}; "
            f"{build}" + (f"; llama-server {m['llama_server']}" if m.get("llama_server") else ""))


def describe(meta: dict) -> str:
    u = meta["append_tokens"] - meta["max_tokens"]
    return (f"model {Path(meta['model']).name}; -np {meta['np']} -c {meta['ctx']} -b {meta['batch']} -ub {meta['ubatch']} "
            f"-ctk {meta['ctk']} -ctv {meta['ctv']} -fa {meta['fa']} -t {meta['threads']} -ngl {meta['ngl']}, "
            f"unified KV, --jinja; S = {','.join(map(str, meta['sessions']))} concurrent sessions of {meta['turns']} "
            f"turns, each appending {meta['append_tokens']} tokens (the previous reply of {meta['max_tokens']} "
            f"greedy tokens, ignore_eos, and a {u}-token user message) to a prompt of token ids sent to /completion "
            f"with cache_prompt; {meta['rounds']} round(s) per S, configurations in rotating order; TTFT pooled "
            f"over the rounds' sessions; 'recomputed' is each server's timings.prompt_n"
            + "".join(f"; {k.replace('_', '-')}: {meta[k]!r}" for k in ("pyllm_args", "llama_server_args") if meta.get(k)))


def report(meta: dict, results: dict) -> str:
    configs = list(meta["configs"])
    lines = [f"$ {meta['command']}", "", f"machine: {describe_machine(meta['machine'])}", ""]
    lines += [f"- {c}: {config_label(c, argparse.Namespace(**meta))}: `{meta['server_commands'].get(c, '?')}`"
              for c in configs]
    lines += ["", describe(meta), "", table(results, configs), ""]
    lines += [f"- {g}" for g in goal_lines(results, configs)]
    notes = problems(results)
    if notes:
        lines += ["", "Problems:"] + [f"- {p}" for p in notes]
    return "\n".join(lines) + "\n"


def write_out(out: Path, meta: dict, results: dict, raw: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "sessions.json").write_text(json.dumps({"settings": meta, "results": results, "raw": raw}, indent=1))
    (out / "sessions.md").write_text(report(meta, results))


def _configs(text: str) -> list[str]:
    names = [c.strip() for c in text.split(",") if c.strip()]
    bad = [c for c in names if c not in CONFIGS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: expected some of {', '.join(CONFIGS)} (comma-separated)")
    return list(dict.fromkeys(names))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", help="GGUF model (default: pyllm's default model)")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: -np 1 (S = 2,4), 3 turns, 64 appended tokens, replies of "
                         "8 tokens, a shorter corpus; flags given explicitly still win")
    ap.add_argument("--sessions", type=_ints, help="concurrent sessions S, comma-separated (default: 2x and 4x -np)")
    ap.add_argument("-np", "--parallel", dest="np", type=int, help="slots of every server (default 2)")
    ap.add_argument("--turns", type=int, help="turns per session (default 6)")
    ap.add_argument("--append-tokens", type=int,
                    help="tokens a turn appends: the previous reply plus a user message (default 200)")
    ap.add_argument("--max-tokens", type=int, help="reply length in tokens (n_predict, greedy, ignore_eos; default 16)")
    ap.add_argument("--cache-ram", type=int, default=2048,
                    help="MiB of host prompt cache for the pyllm-cache configuration (default 2048; -1 = no limit)")
    ap.add_argument("--configs", type=_configs, default=list(CONFIGS),
                    help=f"configurations to run (default: {','.join(CONFIGS)})")
    ap.add_argument("--rounds", type=int, default=1, help="rounds per S, new sessions each (default 1)")
    ap.add_argument("--seed", type=int, default=1234, help="seed of the user messages")
    ap.add_argument("-c", "--ctx-size", dest="ctx", type=int,
                    help="KV cells of every server, one pool (default: -np x a whole session, rounded up to 256)")
    ap.add_argument("-b", "--batch-size", dest="batch", type=int, default=2048)
    ap.add_argument("-ub", "--ubatch-size", dest="ubatch", type=int, default=512)
    ap.add_argument("-ctk", default="f16")
    ap.add_argument("-ctv", default="f16")
    ap.add_argument("-fa", default="on", choices=("on", "off", "auto"))
    ap.add_argument("-t", "--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("-ngl", default="99")
    ap.add_argument("--build-dir", type=Path, default=DEFAULT_BUILD_DIR)
    ap.add_argument("--llama-server", type=Path, help="use this llama-server instead of building one")
    ap.add_argument("--pyllm-args", default="", help="more flags for both pyllm configurations (one string)")
    ap.add_argument("--llama-server-args", default="", help="more flags for llama-server (one string)")
    ap.add_argument("--out", type=Path, help="write sessions.md, sessions.json and the servers' logs here")
    ap.add_argument("--request-timeout", type=float, default=600.0, help="seconds one turn may take")
    ap.add_argument("--corpus-chars", type=int, help="characters of pydoc topics to tokenize (default 400000)")
    args = ap.parse_args(argv)
    defaults = {"np": 2, "turns": 6, "append_tokens": 200, "max_tokens": 16, "corpus_chars": 400_000}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, QUICK[name] if args.quick else value)
    for name in ("np", "turns", "append_tokens", "max_tokens", "rounds", "batch", "ubatch", "threads",
                 "corpus_chars"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')}={getattr(args, name)}: expected an integer >= 1")
    if args.append_tokens <= args.max_tokens:
        ap.error(f"--append-tokens={args.append_tokens} must exceed --max-tokens={args.max_tokens}: a turn appends "
                 "the reply and a user message of at least one token")
    if args.cache_ram == 0 or args.cache_ram < -1:
        ap.error(f"--cache-ram={args.cache_ram}: expected MiB >= 1 or -1 (no limit); the pyllm configuration "
                 "is the one without a cache")
    if args.request_timeout <= 0:
        ap.error(f"--request-timeout={args.request_timeout}: expected seconds > 0")
    args.sessions = args.sessions or [2 * args.np, 4 * args.np]
    whole = session_tokens(args.turns, args.append_tokens)
    if args.ctx is None:
        args.ctx = -(-args.np * whole // 256) * 256
    elif args.ctx < whole:
        ap.error(f"-c {args.ctx}: a session grows to {whole} tokens (BOS + --turns x --append-tokens); "
                 f"expected -c >= {whole}, or -np x that ({args.np * whole}) for every slot to hold one")
    args.batch = min(args.batch, args.ctx)
    args.ubatch = min(args.ubatch, args.batch)
    return args


def server_settings(name: str, args: argparse.Namespace) -> argparse.Namespace:
    """serve_load.server_argv's settings for one configuration: the shared flags, --jinja, the cache flag,
    and a request queue that holds every session (``clients``)."""
    ns = argparse.Namespace(**vars(args))
    ns.clients = args.sessions
    if name == "llama-server":
        ns.llama_server_args = f"--jinja {args.llama_server_args}".strip()
    else:
        cram = 0 if name == "pyllm" else args.cache_ram
        ns.pyllm_args = f"--jinja --cache-ram {cram} {args.pyllm_args}".strip()
    return ns


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python3", sys.argv[0] if argv is None else "benchmarks/sessions.py",
                          *(sys.argv[1:] if argv is None else argv)])
    if args.model is None:
        from pyllm import default_model

        args.model = str(default_model.path())
    args.model = str(Path(args.model).resolve())
    llama_server = None
    if "llama-server" in args.configs:
        llama_server = args.llama_server or build_native(args.build_dir, ["llama-server"])["llama-server"]
        if not Path(llama_server).is_file():
            raise SystemExit(f"--llama-server {llama_server}: no such file")
    logs = (args.out or Path(tempfile.mkdtemp(prefix="sessions-"))) / "logs"
    meta = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    meta.update(command=command, llama_server=str(llama_server) if llama_server else None,
                machine=machine(llama_server), server_commands={})
    servers = {c: ServerProcess(c, server_argv("llama-server" if c == "llama-server" else "pyllm",
                                               server_settings(c, args), llama_server), logs / f"{c}.log")
               for c in args.configs}
    print(f"$ {command}\nmachine: {describe_machine(meta['machine'])}", file=sys.stderr)
    results: dict[str, dict] = {}
    raw: dict[str, dict] = {}
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        for c, s in servers.items():
            s.start()
            meta["server_commands"][c] = shlex.join(s.argv_for_port(s.port))
            print(f"{c}: {s.url} (log {s.log_path}): {meta['server_commands'][c]}", file=sys.stderr)
        corpus, bos = tokenize_corpus(servers[args.configs[0]].url, args.corpus_chars)
        u = args.append_tokens - args.max_tokens
        for s in servers.values():  # warm-up: the first decodes of each server are not measured
            asyncio.run(run_sessions(s.url, user_messages(corpus, 1, 1, min(u, 32), "warm-up"), bos, args))
        for i, n in enumerate(args.sessions):
            per: dict[str, list[Turn]] = {c: [] for c in args.configs}
            walls: dict[str, list[float]] = {c: [] for c in args.configs}
            for rnd in range(args.rounds):
                messages = user_messages(corpus, n, args.turns, u, seed=f"{args.seed}/{n}/{rnd}")
                k = (i + rnd) % len(args.configs)
                for c in args.configs[k:] + args.configs[:k]:
                    r = asyncio.run(run_sessions(servers[c].url, messages, bos, args))
                    per[c] += r["turns"]
                    walls[c].append(r["wall_s"])
                    raw.setdefault(str(n), {}).setdefault(c, []).append(
                        {"wall_s": r["wall_s"], "turns": [asdict(t) for t in r["turns"]]})
                    ok = [t for t in r["turns"] if t.error is None]
                    fails = len(r["turns"]) - len(ok)
                    print(f"S={n} round {rnd + 1}/{args.rounds} {c}: {len(ok)} turns in {r['wall_s']:.1f} s, "
                          f"{sum(t.prompt_n for t in ok)} prompt tokens recomputed"
                          + (f", {fails} failed" if fails else ""), file=sys.stderr)
            results[str(n)] = {c: summarize(per[c], args.turns) | {"wall_s": walls[c]} for c in args.configs}
            if args.out:  # after every S: a run cut short still leaves what it measured
                write_out(args.out, meta, results, raw)
    except KeyboardInterrupt:
        print("interrupted: stopping the servers; what was measured so far follows", file=sys.stderr)
        interrupted = True
    else:
        interrupted = False
    finally:
        for s in servers.values():
            s.stop()
    if results:
        print(report(meta, results))
    for p in problems(results):
        print(f"warning: {p}", file=sys.stderr)
    if args.out and results:
        write_out(args.out, meta, results, raw)
        print(f"wrote {args.out / 'sessions.md'} and {args.out / 'sessions.json'}", file=sys.stderr)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
