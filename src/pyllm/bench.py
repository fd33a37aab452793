"""``pyllm bench``: llama-bench's tests, run through pyllm's own engine.

Semantics follow llama.cpp's llama-bench so the numbers compare: ``pp512`` times prompt
processing of 512 random tokens (in n_batch chunks), ``tg128`` times 128 single-token decodes,
``@ d4096`` pre-fills the KV cache to that depth first (untimed). Each test gets its own context
of ``n_depth + n_prompt + n_gen`` tokens, a warm-up run, then ``repetitions`` timed runs, each
from a clean KV cache. Model load is never timed. Unlike llama-bench, generation runs pyllm's
real per-token path (decode, greedy sample read from the logits, incremental detokenization), so
the binding's Python overhead is part of the figure.
"""
from __future__ import annotations

import csv
import io
import itertools
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from pyllm.batched import BatchedEngine
from pyllm.trace import summarize
from pyllm.config import (DEFAULT_N_BATCH, DEFAULT_N_UBATCH, INT32_MAX, MIN_N_CTX, EngineConfig, check_batch_sizes,
                          check_flash_attn, check_int, check_kv_type, check_n_ctx, check_parallel, check_threads)
from pyllm.context import Context, default_threads, validate_kv_types
from pyllm.engine import GREEDY, Engine, gpu_layers_for
from pyllm.errors import ConfigError, ContextFullError, KVCacheConfigError, PyllmError
from pyllm.model import Model
from pyllm.placement import Placement


@dataclass
class BenchRow:
    model: str
    model_size: int
    model_n_params: int
    backend: str
    n_threads: int
    n_gpu_layers: int
    n_batch: int
    n_ubatch: int
    type_k: str
    type_v: str
    flash_attn: str                   # requested: on | off | auto
    flash_attn_effective: Optional[bool]
    n_prompt: int
    n_gen: int
    n_depth: int
    kv_mib: Optional[float] = None
    samples_ns: list[int] = field(default_factory=list)
    skipped: Optional[str] = None

    @property
    def test(self) -> str:
        name = f"pp{self.n_prompt}" if self.n_prompt else f"tg{self.n_gen}"
        return name + (f" @ d{self.n_depth}" if self.n_depth else "")

    @property
    def samples_ts(self) -> list[float]:
        n = self.n_prompt + self.n_gen
        return [1e9 * n / ns for ns in self.samples_ns]

    @property
    def avg_ts(self) -> float:
        s = self.samples_ts
        return statistics.fmean(s) if s else 0.0

    @property
    def stddev_ts(self) -> float:
        s = self.samples_ts
        return statistics.stdev(s) if len(s) > 1 else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(test=self.test, avg_ts=self.avg_ts, stddev_ts=self.stddev_ts, samples_ts=self.samples_ts)
        return d


@dataclass
class BenchParams:
    model_path: str
    n_prompt: Sequence[int] = (512,)
    n_gen: Sequence[int] = (128,)
    n_depth: Sequence[int] = (0,)
    kv_pairs: Sequence[tuple[str, str]] = (("f16", "f16"),)   # see pyllm.config.kv_pairs
    flash_attn: Sequence[str] = ("auto",)
    n_batch: int = 2048
    n_ubatch: int = 512
    n_threads: Optional[int] = None   # None: the CPUs available (llama-bench: physical cores)
    n_gpu_layers: Optional[int] = None  # None: all where a GPU is visible, else 0
    repetitions: int = 5
    seed: int = 1234
    placement: Optional[Placement] = None   # split mode, tensor split, main GPU, RPC servers

    def __post_init__(self) -> None:
        self.kv_pairs = tuple((check_kv_type("-ctk", k), check_kv_type("-ctv", v)) for k, v in self.kv_pairs)
        self.flash_attn = tuple(check_flash_attn("-fa", fa) for fa in self.flash_attn)
        for flag, values in (("-p", self.n_prompt), ("-n", self.n_gen), ("-d", self.n_depth)):
            for v in values:
                check_int(flag, v, minimum=0)
        check_int("-r", self.repetitions, minimum=1)
        check_batch_sizes(0, self.n_batch, self.n_ubatch)
        check_threads("-t", self.n_threads)

    def tests(self) -> list[tuple[str, str, str, int, int, int]]:
        """(type_k, type_v, fa, n_prompt, n_gen, n_depth) in llama-bench's order: pp tests, then tg."""
        out = []
        for (k, v), fa, d in itertools.product(self.kv_pairs, self.flash_attn, self.n_depth):
            out += [(k, v, fa, p, 0, d) for p in self.n_prompt if p > 0]
            out += [(k, v, fa, 0, g, d) for g in self.n_gen if g > 0]
        return out


def skip_reason(type_k: str, type_v: str, fa: str, model: Model) -> Optional[str]:
    try:
        validate_kv_types(model, type_k, type_v, fa)
    except KVCacheConfigError as exc:
        return str(exc)
    return None


def _setup(params) -> tuple[int, int, np.random.Generator]:
    """What both benchmarks settle first: threads, -ngl and the random tokens' source."""
    return (params.n_threads or default_threads(), gpu_layers_for(params.n_gpu_layers, params.placement),
            np.random.default_rng(params.seed))


def backend_of(model: Model) -> str:
    """The devices the model's layers run on, as the benchmarks label them (``CPU``, ``CUDA0``,
    ``RPC0[host:port],CPU``): read from llama.cpp's placement of the weights (a small context's memory
    breakdown), not from the backends the build happens to have compiled in."""
    with Context(model, n_ctx=MIN_N_CTX, n_batch=32, n_ubatch=32) as ctx:
        return ",".join(ctx.weight_devices())


def run_bench(params: BenchParams, progress: Optional[Callable[[str], None]] = None) -> list[BenchRow]:
    """Run every test of the matrix; impossible combinations come back as skipped rows."""
    threads, ngl, rng = _setup(params)
    rows: list[BenchRow] = []
    with Model(params.model_path, n_gpu_layers=ngl, placement=params.placement) as model:
        backend = backend_of(model)
        n_vocab = model.n_vocab
        first = [model.bos] if model.add_bos else []

        def random_tokens(n: int, with_bos: bool) -> list[int]:
            toks = rng.integers(0, n_vocab, size=n).tolist()
            if with_bos and first and toks:
                toks[0] = first[0]
            return toks

        for k, v, fa, n_prompt, n_gen, n_depth in params.tests():
            row = BenchRow(model=model.desc, model_size=model.size, model_n_params=model.n_params, backend=backend,
                           n_threads=threads, n_gpu_layers=ngl, n_batch=params.n_batch,
                           n_ubatch=params.n_ubatch, type_k=k, type_v=v, flash_attn=fa, flash_attn_effective=None,
                           n_prompt=n_prompt, n_gen=n_gen, n_depth=n_depth)
            rows.append(row)
            if progress:
                progress(f"{k}/{v} fa={fa} {row.test}")
            reason = skip_reason(k, v, fa, model)
            if reason:
                row.skipped = reason
                continue
            n_ctx = n_depth + n_prompt + n_gen + (1 if n_gen else 0)
            # llama.cpp pads the context to MIN_N_CTX cells anyway; the batch stays capped by what the test uses
            cfg = EngineConfig(model_path=params.model_path, n_ctx=max(n_ctx, MIN_N_CTX),
                               n_batch=min(params.n_batch, n_ctx), n_ubatch=min(params.n_ubatch, params.n_batch, n_ctx),
                               n_threads=threads, n_threads_batch=threads, flash_attn=fa, kv_cache_type_k=k,
                               kv_cache_type_v=v, n_gpu_layers=ngl)
            try:
                engine = Engine(cfg, model=model)
            except PyllmError as exc:
                row.skipped = str(exc)
                continue
            with engine:
                row.kv_mib = engine.kv_cache_bytes().total_mib
                row.flash_attn_effective = engine.context.flash_attn
                depth = random_tokens(n_depth, True)
                if n_prompt:
                    prompt = random_tokens(n_prompt, not depth)
                    run = lambda: _time_prompt(engine, depth, prompt)  # noqa: E731
                    run()  # warm-up: a full prompt run, as llama-bench
                else:
                    start = depth or random_tokens(1, True)
                    run = lambda: _time_gen(engine, start, n_gen)  # noqa: E731
                    _time_gen(engine, start, 1)  # warm-up: one token, as llama-bench
                for _ in range(params.repetitions):
                    row.samples_ns.append(run())
    return rows


def _time_prompt(engine: Engine, depth: list[int], prompt: list[int]) -> int:
    engine.reset()
    if depth:
        engine.ingest(depth)
    t0 = time.perf_counter_ns()
    engine.ingest(depth + prompt)  # decodes only the prompt: the depth is the cached prefix
    engine.context.synchronize()
    return time.perf_counter_ns() - t0


def _time_gen(engine: Engine, start: list[int], n_gen: int) -> int:
    engine.reset()
    # n_gen + 1 tokens sampled = n_gen single-token decodes, the count llama-bench times.
    result = engine.generate(start, max_tokens=n_gen + 1, sampling=GREEDY, ignore_eos=True)
    if result.n_generated != n_gen + 1:
        raise PyllmError(f"generation stopped early ({result.stop_reason}) after {result.n_generated} tokens")
    return result.gen_ns


# ---- output ----
def _size(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def _params(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n < 1e9 else f"{n / 1e9:.2f} B"


MD_FIELDS = ("model", "size", "params", "backend", "threads", "type_k", "type_v", "fa", "test", "t/s", "KV MiB")


def _md_values(r: BenchRow) -> list[str]:
    ts = "skipped: " + r.skipped if r.skipped else f"{r.avg_ts:.2f} ± {r.stddev_ts:.2f}"
    kv = f"{r.kv_mib:.2f}" if r.kv_mib is not None else "-"
    return [r.model, _size(r.model_size), _params(r.model_n_params), r.backend, str(r.n_threads), r.type_k,
            r.type_v, r.flash_attn, r.test, ts, kv]


def format_markdown(rows: Iterable[BenchRow]) -> str:
    table = [list(MD_FIELDS)] + [_md_values(r) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(MD_FIELDS))]
    right = {"size", "params", "threads", "t/s", "KV MiB", "test"}
    out = []
    for n, row in enumerate(table):
        cells = [c.rjust(w) if MD_FIELDS[i] in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        out.append("| " + " | ".join(cells) + " |")
        if n == 0:
            out.append("| " + " | ".join(("-" * (w - 1) + ":") if MD_FIELDS[i] in right else "-" * w
                                         for i, w in enumerate(widths)) + " |")
    return "\n".join(out)


CSV_FIELDS = ("model", "model_size", "model_n_params", "backend", "n_threads", "n_gpu_layers", "n_batch", "n_ubatch",
              "type_k", "type_v", "flash_attn", "flash_attn_effective", "test", "n_prompt", "n_gen", "n_depth",
              "avg_ts", "stddev_ts", "kv_mib", "skipped")


def format_csv(rows: Iterable[BenchRow], fields: Sequence[str] = CSV_FIELDS) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(r.as_dict())
    return buf.getvalue()


def format_json(rows: Iterable) -> str:
    return json.dumps([r.as_dict() for r in rows], indent=2)


FORMATS = {"md": format_markdown, "csv": format_csv, "json": format_json}



# ---- batched: llama-batched-bench's table through the batched engine ----
@dataclass
class BatchedBenchRow:
    """One row of llama-batched-bench: PP prompt tokens and TG generated tokens in each of PL sequences.

    Keys as llama-batched-bench's JSONL output (``--output-format jsonl``), plus what pyllm adds."""

    model: str
    backend: str
    type_k: str
    type_v: str
    flash_attn: str                   # requested: on | off | auto
    flash_attn_effective: bool
    kv_unified: bool
    n_kv_max: int
    n_batch: int
    n_ubatch: int
    is_pp_shared: bool
    n_gpu_layers: int
    n_threads: int
    n_threads_batch: int
    pp: int
    tg: int
    pl: int
    n_kv: int
    t_pp: float = 0.0                 # seconds: every prompt decoded (first tokens sampled)
    t_tg: float = 0.0                 # seconds: tg lock-step decodes of pl tokens, each sampled
    skipped: Optional[str] = None
    # The step trace of the tg phase (pyllm.trace), medians over its steps, milliseconds: a step's wall
    # time, the part inside llama_decode, the rest (batch building, sampling, detokenizing).
    tg_step_ms: float = 0.0
    tg_decode_ms: float = 0.0
    tg_python_ms: float = 0.0

    @property
    def n_pp_decoded(self) -> int:
        return self.pp if self.is_pp_shared else self.pl * self.pp

    @property
    def t(self) -> float:
        return self.t_pp + self.t_tg

    @property
    def speed_pp(self) -> float:
        return self.n_pp_decoded / self.t_pp if self.t_pp else 0.0

    @property
    def speed_tg(self) -> float:
        return self.pl * self.tg / self.t_tg if self.t_tg else 0.0

    @property
    def speed(self) -> float:
        return (self.n_pp_decoded + self.pl * self.tg) / self.t if self.t else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(t=self.t, speed_pp=self.speed_pp, speed_tg=self.speed_tg, speed=self.speed)
        return d


def batched_n_kv(pp: int, tg: int, pl: int, shared: bool, kv_unified: bool) -> int:
    """KV cells a row fills, llama-batched-bench's ``n_ctx_req`` (its N_KV column): a shared prompt is
    stored once in a unified cache, once per sequence in split streams."""
    return ((pp if kv_unified else pl * pp) + pl * tg) if shared else pl * (pp + tg)


@dataclass
class BatchedBenchParams:
    model_path: str
    n_pp: Sequence[int] = (128, 512)
    n_tg: Sequence[int] = (128,)
    n_pl: Sequence[int] = (1, 2, 4, 8, 16, 32)
    shared_prompt: bool = False               # -pps
    kv_unified: bool = False                  # -kvu (llama-batched-bench's default: split streams)
    n_ctx: int = 0                            # -c; 0: the model's training context (llama-batched-bench)
    kv_pairs: Sequence[tuple[str, str]] = (("f16", "f16"),)
    flash_attn: Sequence[str] = ("auto",)
    n_batch: Optional[int] = None             # None: min(2048, n_ctx), as EngineConfig
    n_ubatch: Optional[int] = None            # None: min(512, n_batch)
    n_threads: Optional[int] = None
    n_gpu_layers: Optional[int] = None
    placement: Optional[Placement] = None   # split mode, tensor split, main GPU, RPC servers
    seed: int = 1234

    def __post_init__(self) -> None:
        self.kv_pairs = tuple((check_kv_type("-ctk", k), check_kv_type("-ctv", v)) for k, v in self.kv_pairs)
        self.flash_attn = tuple(check_flash_attn("-fa", fa) for fa in self.flash_attn)
        if self.n_batch is None:
            self.n_batch = min(DEFAULT_N_BATCH, self.n_ctx) if isinstance(self.n_ctx, int) and self.n_ctx else DEFAULT_N_BATCH
        if self.n_ubatch is None:
            self.n_ubatch = min(DEFAULT_N_UBATCH, self.n_batch)
        for flag, values in (("-npp", self.n_pp), ("-ntg", self.n_tg), ("-npl", self.n_pl)):
            if not values:
                raise ConfigError(f"{flag} is empty; expected a comma-separated list of integers")
            for v in values:
                check_int(flag, v, minimum=1, maximum=256 if flag == "-npl" else INT32_MAX)
        check_n_ctx(self.n_ctx)
        check_batch_sizes(self.n_ctx, self.n_batch, self.n_ubatch)
        check_parallel(max(self.n_pl), self.n_batch, self.n_ctx, name="-npl")
        check_threads("-t", self.n_threads)

    def rows(self) -> list[tuple[int, int, int]]:
        """(pp, tg, pl) in llama-batched-bench's order."""
        return list(itertools.product(self.n_pp, self.n_tg, self.n_pl))


def run_batched_bench(params: BatchedBenchParams, progress: Optional[Callable[[str], None]] = None
                      ) -> list[BatchedBenchRow]:
    """llama-batched-bench's rows through BatchedEngine.run_together (its step code, greedy sampling,
    detokenization). One engine per K/V pair and -fa value with ``n_parallel = max(-npl)`` and the
    context ``-c``; rows whose N_KV exceed that context are left out, as llama-batched-bench does."""
    threads, ngl, rng = _setup(params)
    out: list[BatchedBenchRow] = []
    with Model(params.model_path, n_gpu_layers=ngl, placement=params.placement) as model:
        backend = backend_of(model)
        for (k, v), fa in itertools.product(params.kv_pairs, params.flash_attn):
            cfg = EngineConfig(model_path=params.model_path, n_ctx=params.n_ctx, n_batch=params.n_batch,
                               n_ubatch=params.n_ubatch, n_threads=threads, n_threads_batch=threads, flash_attn=fa,
                               kv_cache_type_k=k, kv_cache_type_v=v, n_gpu_layers=ngl,
                               n_parallel=max(params.n_pl), kv_unified=params.kv_unified)
            base = dict(model=model.desc, backend=backend, type_k=k, type_v=v, flash_attn=fa,
                        flash_attn_effective=False, kv_unified=params.kv_unified, n_kv_max=0,
                        n_batch=params.n_batch, n_ubatch=params.n_ubatch, is_pp_shared=params.shared_prompt,
                        n_gpu_layers=ngl, n_threads=threads, n_threads_batch=threads)
            reason = skip_reason(k, v, fa, model)
            try:
                engine = None if reason else BatchedEngine(cfg, model=model, max_queue=0, cache_prompt=False)
            except PyllmError as exc:
                reason = str(exc)
            if engine is None:
                out += [BatchedBenchRow(**base, pp=pp, tg=tg, pl=pl, n_kv=0, skipped=reason)
                        for pp, tg, pl in params.rows()]
                continue
            with engine:
                base.update(n_kv_max=engine.n_ctx, n_batch=engine.n_batch, n_ubatch=engine.n_ubatch,
                            flash_attn_effective=engine.context.flash_attn)
                # warm-up, as llama-batched-bench: 16 random tokens in one sequence
                engine.run_together([rng.integers(0, model.n_vocab, 16).tolist()], 1)
                for pp, tg, pl in params.rows():
                    n_kv = batched_n_kv(pp, tg, pl, params.shared_prompt, engine.kv_unified)
                    if n_kv > engine.n_ctx:
                        continue
                    if progress:
                        progress(f"{k}/{v} fa={fa} pp={pp} tg={tg} pl={pl}")
                    row = BatchedBenchRow(**base, pp=pp, tg=tg, pl=pl, n_kv=n_kv)
                    out.append(row)
                    n_prompts = 1 if params.shared_prompt else pl
                    prompts = [rng.integers(0, model.n_vocab, pp).tolist() for _ in range(n_prompts)]
                    if params.shared_prompt:
                        prompts *= pl
                    try:
                        # tg + 1 tokens: the first comes from the prompt's logits, then tg decodes
                        run = engine.run_together(prompts, tg + 1, shared_prompt=params.shared_prompt)
                    except ContextFullError as exc:  # split streams too small for one sequence
                        row.skipped = str(exc)
                        continue
                    row.t_pp, row.t_tg = run.prompt_ns / 1e9, run.gen_ns / 1e9
                    steps = [r for r in engine.step_trace(tg) if r.n_prompt == 0]
                    if steps:
                        trace = summarize(steps)
                        row.tg_step_ms = trace["wall_ms_median"]
                        row.tg_decode_ms = trace["decode_ms_median"]
                        row.tg_python_ms = trace["python_ms_median"]
    return out


def format_batched_markdown(rows: Iterable[BatchedBenchRow]) -> str:
    """llama-batched-bench's table, one per engine (K/V pair and -fa), each under its settings line."""
    out: list[str] = []
    key = None
    for r in rows:
        k = (r.type_k, r.type_v, r.flash_attn)
        if k != key:
            key = k
            if out:
                out.append("")
            out.append(f"model: {r.model}; backend: {r.backend}; K {r.type_k} / V {r.type_v}")
            out.append(f"n_kv_max = {r.n_kv_max}, n_batch = {r.n_batch}, n_ubatch = {r.n_ubatch}, "
                       f"flash_attn = {r.flash_attn} ({'on' if r.flash_attn_effective else 'off'}), "
                       f"is_pp_shared = {int(r.is_pp_shared)}, kv_unified = {int(r.kv_unified)}, "
                       f"n_gpu_layers = {r.n_gpu_layers}, n_threads = {r.n_threads}, "
                       f"n_threads_batch = {r.n_threads_batch}")
            out.append("")
            out.append("|%6s | %6s | %4s | %6s | %8s | %8s | %8s | %8s | %8s | %8s |"
                       % ("PP", "TG", "B", "N_KV", "T_PP s", "S_PP t/s", "T_TG s", "S_TG t/s", "T s", "S t/s"))
            out.append("|%6s-|-%6s-|-%4s-|-%6s-|-%8s-|-%8s-|-%8s-|-%8s-|-%8s-|-%8s-|"
                       % ("------", "------", "----", "------", "--------", "--------", "--------", "--------",
                          "--------", "--------"))
        if r.skipped:
            out.append(f"|%6d | %6d | %4d | skipped: {r.skipped} |" % (r.pp, r.tg, r.pl))
        else:
            out.append("|%6d | %6d | %4d | %6d | %8.3f | %8.2f | %8.3f | %8.2f | %8.3f | %8.2f |"
                       % (r.pp, r.tg, r.pl, r.n_kv, r.t_pp, r.speed_pp, r.t_tg, r.speed_tg, r.t, r.speed))
    return "\n".join(out)


BATCHED_CSV_FIELDS = ("model", "backend", "type_k", "type_v", "flash_attn", "flash_attn_effective", "kv_unified",
                      "n_kv_max", "n_batch", "n_ubatch", "is_pp_shared", "n_gpu_layers", "n_threads", "pp", "tg",
                      "pl", "n_kv", "t_pp", "speed_pp", "t_tg", "speed_tg", "t", "speed", "skipped")


def format_batched_csv(rows: Iterable[BatchedBenchRow]) -> str:
    return format_csv(rows, BATCHED_CSV_FIELDS)


BATCHED_FORMATS = {"md": format_batched_markdown, "csv": format_batched_csv, "json": format_json}


def format_batched_trace(rows: Iterable[BatchedBenchRow]) -> str:
    """Where a tg step's time goes, per row (``bench --batched -v``): medians of the step trace."""
    lines = ["|    PP |     TG |    B | step ms | llama_decode ms | Python ms | Python share |",
             "|-------|--------|------|---------|-----------------|-----------|--------------|"]
    for r in rows:
        if r.skipped or not r.tg_step_ms:
            continue
        lines.append(f"| {r.pp:5d} | {r.tg:6d} | {r.pl:4d} | {r.tg_step_ms:7.3f} | {r.tg_decode_ms:15.3f} | "
                     f"{r.tg_python_ms:9.3f} | {r.tg_python_ms / r.tg_step_ms:11.1%} |")
    return "\n".join(lines)
