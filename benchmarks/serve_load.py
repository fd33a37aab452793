#!/usr/bin/env python3
"""pyllm serve vs llama.cpp's llama-server under the same concurrent streaming load.

Starts ``pyllm serve`` and llama.cpp's own ``llama-server`` (built from the same vendored tree by
benchmarks/native, like compare_native.py's tools) with the same model, -np, -c, -b/-ub, -ctk/-ctv,
-fa, -t, -ngl and a unified KV pool (pyllm's default; llama-server's -kvu), each on a random free port
of 127.0.0.1. Then for each N (1, 4, 8, 16, 32 concurrent clients) and round, it sends the same
seeded mix of requests to both servers, one after the other (the order alternates between rounds and
between N, so the drift of a shared machine hits both): N async httpx clients, each streaming one
/v1/completions request after another from a shared list of N x --requests-per-client requests.

A request is a prompt of token ids (a BOS and a slice of Python's pydoc topics at a seeded offset, so
no two requests share a prefix and no prompt cache helps either side) with ``max_tokens`` and
``ignore_eos`` (llama-server's meaning on both: end-of-generation is never sampled): the output lengths
are fixed, the same on both servers, and checked against ``tokens_predicted``.

Reports, per N and server: aggregate output tokens/s (all output tokens / wall time of the round),
time to first token p50/p99 and inter-token latency p50/p99 per token (requests go to llama-server's
native /completion with return_tokens, so each chunk says which tokens it carries; tokens that arrive
in one chunk count a 0 gap after the first; pooled over the requests of all rounds), the servers' own
mean ms per generated token (their timings), and the ratios pyllm/llama-server (median of the paired
rounds). A benchmark, not a test: it never fails on noise.

    python3 benchmarks/serve_load.py                                   # default model, N = 1,4,8,16,32
    python3 benchmarks/serve_load.py --clients 1,4 --output-lens 16 --prompt-lens 32 --rounds 1
    python3 benchmarks/serve_load.py --out bench-out/serve -ctk q8_0 -ctv q8_0

Both server processes run in their own session (a Ctrl-C in the terminal reaches only this script)
and are always terminated when it ends: normally, on an error, on Ctrl-C or SIGTERM, and (Linux) when
this process dies (PR_SET_PDEATHSIG).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from benchlib import DEFAULT_BUILD_DIR, build_native, percentile, ratio_summary

SERVERS = ("pyllm", "llama-server")
PYLLM_CLI = [sys.executable, "-c", "import sys; from pyllm.cli import main; sys.exit(main())"]


# ---------------------------------------------------------------------------------------------
# Server processes
# ---------------------------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now (the server binds it a moment later; a
    start that loses that race is retried on another port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when this script dies, even by SIGKILL (Linux only)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class ServerProcess:
    """One server on a random free port of 127.0.0.1, its output in ``log_path``. ``stop()`` is idempotent
    and always leaves no process behind (SIGTERM to its process group, SIGKILL after ``grace_s``)."""

    def __init__(self, name: str, argv_for_port, log_path: Path, *, grace_s: float = 15.0) -> None:
        self.name, self.argv_for_port, self.log_path, self.grace_s = name, argv_for_port, log_path, grace_s
        self.proc: Optional[subprocess.Popen] = None
        self.port: Optional[int] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 300.0, tries: int = 3) -> "ServerProcess":
        import httpx

        for attempt in range(tries):
            self.port = free_port()
            argv = self.argv_for_port(self.port)
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "ab") as log:
                log.write(f"\n$ {' '.join(argv)}\n".encode())
                log.flush()
                # Its own session: a Ctrl-C in the terminal reaches this script only, which stops it in order.
                # The cwd is not the source tree, so a pyllm found on sys.path is the one the environment names.
                self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             start_new_session=True, cwd=tempfile.gettempdir(),
                                             preexec_fn=_die_with_parent if sys.platform == "linux" else None)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                time.sleep(0.25)
            rc = self.proc.poll()
            self.stop()
            if rc is None:
                raise SystemExit(f"{self.name} did not answer /health within {timeout_s:.0f} s; its log: "
                                 f"{self.log_path}\n{self.log_tail()}")
            if "address already in use" not in self.log_tail().lower() or attempt == tries - 1:
                raise SystemExit(f"{self.name} exited with status {rc} while starting; its log: {self.log_path}\n"
                                 f"{self.log_tail()}")
        raise AssertionError("unreachable")

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self) -> Optional[int]:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return None if proc is None else proc.returncode
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            return proc.wait(self.grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            return proc.wait()


def server_argv(name: str, args: argparse.Namespace, llama_server: Optional[Path]):
    """The command of one server for a port: the same settings on both, in each one's flags."""
    common = ["-m", args.model, "-np", str(args.np), "-c", str(args.ctx), "-b", str(args.batch),
              "-ub", str(args.ubatch), "-ctk", args.ctk, "-ctv", args.ctv, "-fa", args.fa,
              "-t", str(args.threads), "-ngl", args.ngl, "--host", "127.0.0.1"]
    if name == "pyllm":
        # kv_unified is pyllm's default (one pool); its queue must hold every waiting client.
        return lambda port: [*PYLLM_CLI, "serve", *common, "--port", str(port),
                             "--max-queue", str(max(64, 2 * max(args.clients))), *shlex.split(args.pyllm_args)]
    # -kvu: one KV pool shared by the slots, as pyllm's (llama-server splits n_ctx per slot without it).
    return lambda port: [str(llama_server), *common, "--port", str(port), "-kvu", "--no-webui",
                         *shlex.split(args.llama_server_args)]


# ---------------------------------------------------------------------------------------------
# The load
# ---------------------------------------------------------------------------------------------
@dataclass
class Spec:
    prompt: list[int]
    max_tokens: int
    seed: int


@dataclass
class Sample:
    ttft_s: float = math.nan
    gaps_s: list[float] = field(default_factory=list)
    n_tokens: int = 0
    expected: int = 0
    error: Optional[str] = None
    server_ms_per_token: float = math.nan   # the server's own timings.predicted_per_token_ms


def make_requests(corpus: list[int], bos: Optional[int], n: int, prompt_lens: Sequence[int],
                  output_lens: Sequence[int], seed) -> list[Spec]:
    """n requests drawn from the length mix with a seeded generator: the same list for both servers.
    Each prompt is BOS + a corpus slice at its own offset (no two share a prefix)."""
    rng = random.Random(seed)
    specs = []
    for _ in range(n):
        p, o = rng.choice(prompt_lens), rng.choice(output_lens)
        body = p - (bos is not None)
        if body > len(corpus):
            raise SystemExit(f"prompt length {p} is longer than the corpus ({len(corpus)} tokens)")
        start = rng.randrange(0, len(corpus) - body + 1)
        specs.append(Spec(([bos] if bos is not None else []) + corpus[start:start + body], o, rng.randrange(2**31)))
    return specs


def request_body(spec: Spec, args: argparse.Namespace) -> dict:
    """llama-server's native /completion with ``return_tokens``: every streamed chunk lists the token ids it
    carries, so inter-token latency is measured per token, not per chunk. ``ignore_eos`` has llama-server's
    meaning on both servers (end-of-generation tokens are never sampled), so both generate n_predict tokens."""
    return {"prompt": spec.prompt, "n_predict": spec.max_tokens, "ignore_eos": True, "stream": True,
            "return_tokens": True, "cache_prompt": False, "temperature": args.temperature, "top_k": args.top_k,
            "top_p": args.top_p, "min_p": args.min_p, "seed": spec.seed}


async def one_request(client, url: str, spec: Spec, args: argparse.Namespace) -> Sample:
    """One streamed request. Per token: the first token of a chunk gets the gap since the previous chunk,
    the others of the same chunk 0 (they arrived together); the server's own ``timings`` are kept too."""
    s = Sample(expected=spec.max_tokens)
    t0 = time.perf_counter()
    last = None
    n_tok = 0
    try:
        async with client.stream("POST", url + "/completion", json=request_body(spec, args)) as resp:
            if resp.status_code != 200:
                s.error = f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}"
                return s
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    s.error = str(obj["error"])[:300]
                    return s
                now = time.perf_counter()
                k = len(obj.get("tokens") or ())
                if k:
                    n_tok += k
                    if last is None:
                        s.ttft_s = now - t0
                        s.gaps_s.extend([0.0] * (k - 1))
                    else:
                        s.gaps_s.extend([now - last] + [0.0] * (k - 1))
                    last = now
                if obj.get("stop"):
                    s.n_tokens = int(obj.get("tokens_predicted") or n_tok)
                    timings = obj.get("timings") or {}
                    if timings.get("predicted_per_token_ms") is not None:
                        s.server_ms_per_token = float(timings["predicted_per_token_ms"])
    except Exception as exc:  # one failed request is reported, the run goes on
        s.error = f"{type(exc).__name__}: {exc}"
        return s
    if not s.n_tokens:
        s.n_tokens = n_tok
    return s


async def run_load(url: str, specs: list[Spec], n_clients: int, args: argparse.Namespace) -> dict:
    """N clients, each streaming one request after another from the shared list, until it is empty."""
    import httpx

    queue = list(reversed(specs))
    samples: list[Sample] = []

    async def client_loop(client) -> None:
        while queue:
            samples.append(await one_request(client, url, queue.pop(), args))

    limits = httpx.Limits(max_connections=n_clients + 2, max_keepalive_connections=n_clients + 2)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(args.request_timeout, connect=10.0)) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(n_clients)))
        wall = time.perf_counter() - t0
    ok = [s for s in samples if s.error is None]
    return {
        "wall_s": wall,
        "output_tokens": sum(s.n_tokens for s in ok),
        "tokens_per_s": sum(s.n_tokens for s in ok) / wall if wall > 0 else math.nan,
        "ttft_s": [s.ttft_s for s in ok if not math.isnan(s.ttft_s)],
        "gaps_s": [g for s in ok for g in s.gaps_s],
        "server_ms_per_token": [s.server_ms_per_token for s in ok if not math.isnan(s.server_ms_per_token)],
        "errors": [s.error for s in samples if s.error is not None],
        "length_mismatches": sum(1 for s in ok if s.n_tokens != s.expected),
        "requests": len(samples),
    }


def tokenize_corpus(url: str, max_chars: int) -> tuple[list[int], Optional[int]]:
    """Python's pydoc topics as token ids (through the server's /tokenize), and the BOS id (or None)."""
    import httpx
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))[:max_chars]
    corpus = httpx.post(url + "/tokenize", json={"content": text, "add_special": False}, timeout=120).json()["tokens"]
    with_bos = httpx.post(url + "/tokenize", json={"content": "a", "add_special": True}, timeout=30).json()["tokens"]
    plain = httpx.post(url + "/tokenize", json={"content": "a", "add_special": False}, timeout=30).json()["tokens"]
    bos = with_bos[0] if len(with_bos) > len(plain) else None
    return corpus, bos


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------
def summarize(rounds: list[dict]) -> dict:
    """One server at one N, over its rounds: mean tokens/s; pooled TTFT and inter-token percentiles."""
    ttft = [t for r in rounds for t in r["ttft_s"]]
    gaps = [g for r in rounds for g in r["gaps_s"]]
    return {
        "tokens_per_s": statistics.fmean(r["tokens_per_s"] for r in rounds),
        "tokens_per_s_rounds": [r["tokens_per_s"] for r in rounds],
        "ttft_p50_ms": 1000 * percentile(ttft, 50), "ttft_p99_ms": 1000 * percentile(ttft, 99),
        "ttft_p99_ms_rounds": [1000 * percentile(r["ttft_s"], 99) for r in rounds],
        "itl_p50_ms": 1000 * percentile(gaps, 50), "itl_p99_ms": 1000 * percentile(gaps, 99),
        "server_ms_per_token_mean": (statistics.fmean(x for r in rounds for x in r.get("server_ms_per_token", ()))
                                     if any(r.get("server_ms_per_token") for r in rounds) else math.nan),
        "requests": sum(r["requests"] for r in rounds),
        "errors": [e for r in rounds for e in r["errors"]],
        "length_mismatches": sum(r["length_mismatches"] for r in rounds),
    }


def table(results: dict) -> str:
    """The markdown table: per N, both servers and the ratios pyllm/llama-server (median of paired rounds);
    '-' where a server was not measured."""
    lines = ["| N | pyllm tok/s | llama-server tok/s | tok/s ratio (min-max) | TTFT p50 ms pyllm / llama | "
             "TTFT p99 ms pyllm / llama | TTFT p99 ratio (min-max) | ITL p50 ms pyllm / llama | "
             "ITL p99 ms pyllm / llama |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]

    def cell(s: Optional[dict], key: str, fmt: str) -> str:
        return "-" if s is None else format(s[key], fmt)

    def ratio(p: Optional[dict], q: Optional[dict], key: str) -> str:
        if p is None or q is None:
            return "-"
        med, lo, hi = ratio_summary(p[key], q[key])
        return f"{med:.3f} ({lo:.2f}-{hi:.2f})"

    for n, by in sorted(results.items(), key=lambda kv: int(kv[0])):
        p, q = by.get("pyllm"), by.get("llama-server")

        def pair(key: str, fmt: str) -> str:
            return f"{cell(p, key, fmt)} / {cell(q, key, fmt)}"

        lines.append(f"| {n} | {cell(p, 'tokens_per_s', '.1f')} | {cell(q, 'tokens_per_s', '.1f')} | "
                     f"{ratio(p, q, 'tokens_per_s_rounds')} | {pair('ttft_p50_ms', '.0f')} | {pair('ttft_p99_ms', '.0f')} | "
                     f"{ratio(p, q, 'ttft_p99_ms_rounds')} | {pair('itl_p50_ms', '.1f')} | {pair('itl_p99_ms', '.1f')} |")
    return "\n".join(lines)


def problems(results: dict) -> list[str]:
    out = []
    for n, by in sorted(results.items(), key=lambda kv: int(kv[0])):
        for name, s in by.items():
            if s["errors"]:
                out.append(f"N={n} {name}: {len(s['errors'])} of {s['requests']} requests failed, e.g. {s['errors'][0]}")
            if s["length_mismatches"]:
                out.append(f"N={n} {name}: {s['length_mismatches']} responses did not have max_tokens tokens "
                           "(ignore_eos not honoured?)")
    return out


def write_out(out: Path, meta: dict, results: dict, raw: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_load.json").write_text(json.dumps({"settings": meta, "results": results, "rounds": raw}, indent=1))
    notes = "\n".join(f"- {p}" for p in problems(results))
    (out / "serve_load.md").write_text(describe(meta) + "\n\n" + table(results) + "\n" + (f"\n{notes}\n" if notes else ""))


def describe(meta: dict) -> str:
    return (f"model {Path(meta['model']).name}; -np {meta['np']} -c {meta['ctx']} -b {meta['batch']} -ub {meta['ubatch']} "
            f"-ctk {meta['ctk']} -ctv {meta['ctv']} -fa {meta['fa']} -t {meta['threads']} -ngl {meta['ngl']}, "
            f"unified KV; {meta['requests_per_client']} requests per client, prompt lengths {meta['prompt_lens']}, "
            f"output lengths {meta['output_lens']} (ignore_eos), temperature {meta['temperature']}; "
            f"{meta['rounds']} alternating rounds per N; ratios are pyllm/llama-server, median of paired rounds"
            + "".join(f"; {k.replace('_', '-')}: {meta[k]!r}" for k in ("pyllm_args", "llama_server_args") if meta.get(k)))


# ---------------------------------------------------------------------------------------------
def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers, e.g. 1,4,8")
    return values


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", help="GGUF model (default: pyllm's default model)")
    ap.add_argument("--clients", type=_ints, default=[1, 4, 8, 16, 32], help="concurrent clients N (default 1,4,8,16,32)")
    ap.add_argument("--requests-per-client", type=int, default=4, help="requests per N = N x this (default 4)")
    ap.add_argument("--prompt-lens", type=_ints, default=[32, 128, 512], help="prompt lengths in tokens, drawn uniformly")
    ap.add_argument("--output-lens", type=_ints, default=[32, 64, 128], help="output lengths in tokens, drawn uniformly")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per N (default 3)")
    ap.add_argument("--seed", type=int, default=1234, help="seed of the request mix")
    ap.add_argument("-np", "--parallel", dest="np", type=int, help="sequences at once, both servers (default: the largest N)")
    ap.add_argument("-c", "--ctx-size", dest="ctx", type=int,
                    help="context (KV cells, one pool) of both servers (default: -np x (longest prompt + output), "
                         "rounded up to 256)")
    ap.add_argument("-b", "--batch-size", dest="batch", type=int, default=2048)
    ap.add_argument("-ub", "--ubatch-size", dest="ubatch", type=int, default=512)
    ap.add_argument("-ctk", default="f16")
    ap.add_argument("-ctv", default="f16")
    ap.add_argument("-fa", default="on", choices=("on", "off", "auto"))
    ap.add_argument("-t", "--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("-ngl", default="99")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-k", type=int, default=40)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--min-p", type=float, default=0.05)
    ap.add_argument("--servers", default=",".join(SERVERS), help="which servers to measure (default: both)")
    ap.add_argument("--build-dir", type=Path, default=DEFAULT_BUILD_DIR)
    ap.add_argument("--llama-server", type=Path, help="use this llama-server instead of building one")
    ap.add_argument("--pyllm-args", default="", help="more flags for pyllm serve (one string)")
    ap.add_argument("--llama-server-args", default="",
                    help="more flags for llama-server (one string), e.g. '--cache-ram 0' (its defaults otherwise)")
    ap.add_argument("--out", type=Path, help="write serve_load.md, serve_load.json and the servers' logs here")
    ap.add_argument("--request-timeout", type=float, default=600.0, help="seconds one request may take")
    ap.add_argument("--corpus-chars", type=int, default=400_000, help="characters of pydoc topics to tokenize")
    args = ap.parse_args(argv)
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    bad = [s for s in args.servers if s not in SERVERS]
    if bad or not args.servers:
        ap.error(f"--servers {','.join(args.servers)!r}: expected some of {', '.join(SERVERS)}")
    for name in ("requests_per_client", "rounds", "batch", "ubatch", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')}={getattr(args, name)}: expected an integer >= 1")
    args.np = args.np or max(args.clients)
    if args.ctx is None:
        need = args.np * (max(args.prompt_lens) + max(args.output_lens))
        args.ctx = -(-need // 256) * 256
    args.batch = min(args.batch, args.ctx)
    args.ubatch = min(args.ubatch, args.batch)
    return args


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.model is None:
        from pyllm import default_model

        args.model = str(default_model.path())
    args.model = str(Path(args.model).resolve())
    llama_server = None
    if "llama-server" in args.servers:
        llama_server = args.llama_server or build_native(args.build_dir, ["llama-server"])["llama-server"]
    logs = (args.out or Path(tempfile.mkdtemp(prefix="serve_load-"))) / "logs"
    meta = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    meta["llama_server"] = str(llama_server) if llama_server else None
    results: dict[str, dict] = {}
    raw: dict[str, dict] = {}
    servers = {name: ServerProcess(name, server_argv(name, args, llama_server), logs / f"{name}.log")
               for name in args.servers}
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        for name in args.servers:
            servers[name].start()
            print(f"{name}: {servers[name].url} (log {servers[name].log_path})", file=sys.stderr)
        corpus, bos = tokenize_corpus(servers[args.servers[0]].url, args.corpus_chars)
        for name in args.servers:  # warm-up: the first decode of each server is not measured
            asyncio.run(run_load(servers[name].url, make_requests(corpus, bos, 2, [32], [8], 0), 2, args))
        for i, n in enumerate(args.clients):
            per_server: dict[str, list[dict]] = {name: [] for name in args.servers}
            for rnd in range(args.rounds):
                specs = make_requests(corpus, bos, n * args.requests_per_client, args.prompt_lens, args.output_lens,
                                      seed=f"{args.seed}/{n}/{rnd}")
                order = list(args.servers) if (rnd + i) % 2 == 0 else list(reversed(args.servers))
                for name in order:
                    r = asyncio.run(run_load(servers[name].url, specs, n, args))
                    per_server[name].append(r)
                    raw.setdefault(str(n), {}).setdefault(name, []).append(
                        {k: v for k, v in r.items() if k not in ("ttft_s", "gaps_s")}
                        | {"ttft_p99_ms": 1000 * percentile(r["ttft_s"], 99)})
                    print(f"N={n} round {rnd + 1}/{args.rounds} {name}: {r['tokens_per_s']:.1f} tok/s"
                          + (f", {len(r['errors'])} errors" if r["errors"] else ""), file=sys.stderr)
            results[str(n)] = {name: summarize(rs) for name, rs in per_server.items()}
            if args.out:  # after every N: a run cut short still leaves what it measured
                write_out(args.out, meta, results, raw)
    except KeyboardInterrupt:
        print("interrupted: stopping the servers", file=sys.stderr)
        return 130
    finally:
        for s in servers.values():
            s.stop()
    print(describe(meta))
    print(table(results))
    for p in problems(results):
        print(f"warning: {p}", file=sys.stderr)
    if args.out:
        write_out(args.out, meta, results, raw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
