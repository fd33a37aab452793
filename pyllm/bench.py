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

from pyllm.config import EngineConfig, check_batch_sizes, check_flash_attn, check_int, check_kv_type, check_threads
from pyllm.context import default_threads, validate_kv_types
from pyllm.devices import resolve_gpu_layers
from pyllm.engine import GREEDY, Engine
from pyllm.errors import KVCacheConfigError, PyllmError
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


def run_bench(params: BenchParams, progress: Optional[Callable[[str], None]] = None) -> list[BenchRow]:
    """Run every test of the matrix; impossible combinations come back as skipped rows."""
    from pyllm.buildinfo import build_info

    backend = ",".join(b for b in build_info()["backends"] if b != "CPU") or "CPU"
    threads = params.n_threads or default_threads()
    ngl = resolve_gpu_layers(params.n_gpu_layers)
    rng = np.random.default_rng(params.seed)
    rows: list[BenchRow] = []
    if params.n_gpu_layers is None and params.placement is not None and params.placement.rpc_servers:
        ngl = 99  # the rule of pyllm.engine.gpu_layers_of: with RPC servers, every layer is offloaded
    with Model(params.model_path, n_gpu_layers=ngl, placement=params.placement) as model:
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
            cfg = EngineConfig(model_path=params.model_path, n_ctx=n_ctx, n_batch=min(params.n_batch, n_ctx),
                               n_ubatch=min(params.n_ubatch, params.n_batch, n_ctx), n_threads=threads,
                               n_threads_batch=threads, flash_attn=fa, kv_cache_type_k=k, kv_cache_type_v=v,
                               n_gpu_layers=ngl)
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


def format_csv(rows: Iterable[BenchRow]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(r.as_dict())
    return buf.getvalue()


def format_json(rows: Iterable[BenchRow]) -> str:
    return json.dumps([r.as_dict() for r in rows], indent=2)


FORMATS = {"md": format_markdown, "csv": format_csv, "json": format_json}

