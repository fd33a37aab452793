"""``pyllm plan``: how much context fits in a memory budget, per KV cache type pair.

The model is loaded with llama.cpp's ``no_alloc`` parameter: metadata only, allocations
simulated, so this takes seconds even for a 30 GB file. Every figure is llama.cpp's own
accounting (``llama_get_memory_breakdown``) of the buffers it would allocate for a context of a
given size: weights, KV cache (sliding-window layers, grouped-query attention and MLA included)
and compute buffers.

The flags mean what they mean to ``serve`` and ``BatchedEngine``: ``-c`` is the whole context
(``n_ctx``), shared by the ``-np`` sequences (one pool, or ``n_ctx / n_parallel`` cells each with
split KV), and every context is measured with the ``n_seq_max``, ``kv_unified``, ``n_batch`` and
``n_ubatch`` those would pass. That matters beyond the split: a sliding-window cache holds
``n_swa * n_seq_max + n_ubatch`` cells in a unified pool (``n_swa + n_ubatch`` per stream when
split), up to the full size.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

from pyllm.context import Context, validate_kv_types
from pyllm.errors import ConfigError, PyllmError
from pyllm.config import check_batch_sizes, check_bool, check_int, check_kv_type, label
from pyllm.model import Model
from pyllm.placement import Placement

GRANULE = 256                  # llama.cpp pads n_ctx (split KV: each sequence's n_ctx_seq) to 256 cells
MAX_SEARCH_CTX = 1 << 24       # upper end of the search for the uncapped maximum
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(text: str) -> int:
    """'96GiB', '80 GB', '512MiB' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]+)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"--memory {text!r} is not a size; expected a number with a unit "
                          f"(B, KiB, MiB, GiB, TiB, KB, MB, GB, TB), e.g. 96GiB, or 'gpu'")
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise ConfigError(f"--memory {text!r} must be positive")
    return value


@dataclass
class Measure:
    n_ctx: int
    weights: int
    kv: int
    compute: int
    devices: dict[str, dict] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.compute


@dataclass
class PlanRow:
    type_k: str
    type_v: str
    n_ctx: int                       # the context asked about (-c), as llama.cpp pads it
    kv_bytes_per_token: float        # growth of the KV cache per token of context
    kv_bytes: int                    # KV cache at n_ctx
    weights_bytes: int
    compute_bytes: int               # compute buffers at n_ctx
    total_bytes: int                 # weights + KV + compute at n_ctx
    max_ctx: int                     # largest -c that fits the budget, capped at n_parallel x n_ctx_train
    max_ctx_uncapped: int            # the same without the cap (at most MAX_SEARCH_CTX)
    n_ctx_train: int
    flash_attn: bool
    devices: dict[str, dict] = field(default_factory=dict)
    error: Optional[str] = None


LLAMA_MAX_SEQ = 256


@dataclass
class ConcurrencyRow:
    type_k: str
    type_v: str
    n_ctx: int                       # the context asked about (-c, else n_ctx_train), as llama.cpp pads it
    seq_len: int                     # each sequence's share: n_ctx / n_parallel (llama.cpp's n_ctx_seq when split)
    n_parallel: int                  # -np
    kv_unified: bool
    kv_bytes: int                    # KV cache of -c n_ctx -np n_parallel, as serve allocates it
    total_bytes: int                 # weights + KV + compute of the same context
    fits: bool                       # total_bytes <= budget
    max_seqs: int                    # sequences of seq_len that fit together (at most LLAMA_MAX_SEQ)
    max_seq_len: int                 # longest sequence when n_parallel run together (multiple of 256)
    n_ctx_train: int
    error: Optional[str] = None


@dataclass
class Plan:
    model: str
    model_path: str
    budget: int
    budget_source: str
    n_gpu_layers: int
    rows: list[PlanRow]
    curves: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # "k/v" -> [(n_ctx, total bytes)]
    model_devices: list[str] = field(default_factory=list)   # the split's devices, in order (RPC servers first)
    concurrency: list[ConcurrencyRow] = field(default_factory=list)       # with -np N
    n_parallel: int = 1              # -np: every figure is of contexts with n_seq_max = n_parallel
    kv_unified: bool = True          # one KV pool (False: -no-kvu, n_ctx / n_parallel cells per sequence)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


class Planner:
    """Simulated allocations of one model (no_alloc): measure any context size and KV type pair, with the
    parameters ``serve -c N -np n_parallel`` (a ``BatchedEngine``) would create that context with.

    ``n_batch`` / ``n_ubatch``: the -b / -ub flags, or their defaults (2048 / 512); each context takes
    ``min(n_batch, n_ctx)`` and ``min(n_ubatch, n_batch)``, as EngineConfig and llama.cpp do, so a context
    of any size is measured with the batch sizes the same flags would give it."""

    def __init__(self, model_path: str, *, n_gpu_layers: int = 0, n_batch: int = 2048, n_ubatch: int = 512,
                 flash_attn: str = "auto", placement: Optional[Placement] = None, n_parallel: int = 1,
                 kv_unified: bool = True) -> None:
        check_int("n_parallel", n_parallel, minimum=1, maximum=LLAMA_MAX_SEQ)
        check_bool("kv_unified", kv_unified)
        self.model = Model(model_path, n_gpu_layers=n_gpu_layers, use_mmap=False, no_alloc=True, placement=placement)
        self.n_batch, self.n_ubatch, self.flash_attn = n_batch, n_ubatch, flash_attn
        self.n_gpu_layers = n_gpu_layers
        self.n_parallel, self.kv_unified = n_parallel, kv_unified
        # Split streams pad each sequence's n_ctx_seq to 256 cells, so n_ctx moves in steps of 256 x n_parallel.
        self.granule = GRANULE if kv_unified or n_parallel == 1 else GRANULE * n_parallel

    def close(self) -> None:
        self.model.close()

    def __enter__(self) -> "Planner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def measure(self, n_ctx: int, type_k: str, type_v: str, *, n_seq_max: Optional[int] = None,
                kv_unified: Optional[bool] = None) -> tuple[Measure, bool]:
        """A context of ``n_ctx`` cells in all (``n_seq_max`` sequences sharing them, or ``n_ctx /
        n_seq_max`` each with ``kv_unified=False``), as llama.cpp would allocate it; ``None``: the
        planner's ``n_parallel`` / ``kv_unified``."""
        n_seq_max = self.n_parallel if n_seq_max is None else n_seq_max
        kv_unified = self.kv_unified if kv_unified is None else kv_unified
        n_batch = min(self.n_batch, n_ctx)
        with Context(self.model, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=min(self.n_ubatch, n_batch),
                     flash_attn=self.flash_attn, type_k=type_k, type_v=type_v, no_perf=True,
                     n_seq_max=n_seq_max, kv_unified=kv_unified) as ctx:
            rows = ctx.memory_breakdown()
            m = Measure(n_ctx=ctx.n_ctx, weights=sum(r["model"] for r in rows), kv=sum(r["context"] for r in rows),
                        compute=sum(r["compute"] for r in rows),
                        devices={r["name"]: {k: r[k] for k in ("model", "context", "compute")} for r in rows})
            return m, ctx.flash_attn

    def row(self, type_k: str, type_v: str, n_ctx: int, budget: int, curve: Optional[list] = None) -> PlanRow:
        n_train = self.model.n_ctx_train
        n_ctx = n_ctx or n_train
        at, fa = self.measure(n_ctx, type_k, type_v)
        # Two points 16 granules apart give the per-token growth; sliding-window caches stop growing.
        probe_n = at.n_ctx + 16 * self.granule
        probe, _ = self.measure(probe_n, type_k, type_v)
        per_token = (probe.kv - at.kv) / (probe.n_ctx - at.n_ctx)
        total_slope = (probe.total - at.total) / (probe.n_ctx - at.n_ctx)
        if curve is not None:
            curve += [(at.n_ctx, at.total), (probe.n_ctx, probe.total)]
        max_uncapped = self._max_fit(budget, at, total_slope, type_k, type_v, curve)
        if curve is not None and max_uncapped > 0:
            for i in range(1, 8):  # a few more points for the plot, up to the maximum
                n = max(self.granule, max_uncapped * i // 8 // self.granule * self.granule)
                m, _ = self.measure(n, type_k, type_v)
                curve.append((m.n_ctx, m.total))
        return PlanRow(type_k=type_k, type_v=type_v, n_ctx=at.n_ctx, kv_bytes_per_token=per_token, kv_bytes=at.kv,
                       weights_bytes=at.weights, compute_bytes=at.compute, total_bytes=at.total,
                       max_ctx=min(max_uncapped, n_train * self.n_parallel) if n_train > 0 else max_uncapped,
                       max_ctx_uncapped=max_uncapped, n_ctx_train=n_train, flash_attn=fa, devices=at.devices)

    def _max_fit(self, budget: int, at: Measure, slope: float, k: str, v: str, curve: Optional[list]) -> int:
        """Largest multiple of the granule whose simulated total fits the budget."""
        def fits(n: int) -> tuple[bool, int]:
            m, _ = self.measure(n, k, v)
            if curve is not None:
                curve.append((m.n_ctx, m.total))
            return m.total <= budget, m.total

        g = self.granule
        lo_ok, _ = fits(g)
        if not lo_ok:
            return 0
        if slope <= 0:
            guess = MAX_SEARCH_CTX
        else:
            guess = at.n_ctx + (budget - at.total) / slope
        guess = int(max(g, min(MAX_SEARCH_CTX, guess)) // g * g)
        ok, _ = fits(guess)
        lo, hi = (guess, None) if ok else (g, guess)
        if ok:
            # Linear estimates are close: look just above to bracket the answer.
            step = g
            while hi is None:
                n = min(MAX_SEARCH_CTX // g * g, lo + step)
                if n == lo:
                    return lo
                ok2, _ = fits(n)
                if ok2:
                    lo, step = n, step * 4
                else:
                    hi = n
        while hi - lo > g:
            mid = (lo + hi) // 2 // g * g
            if mid in (lo, hi):
                break
            ok, _ = fits(mid)
            lo, hi = (mid, hi) if ok else (lo, mid)
        return lo


    def concurrency(self, type_k: str, type_v: str, n_ctx: int, budget: int) -> "ConcurrencyRow":
        """The context ``-c n_ctx -np n_parallel`` gives (each sequence's share ``seq_len = n_ctx /
        n_parallel``), how many sequences of ``seq_len`` fit the budget together (``-c n * seq_len
        -np n``), and how long each of ``n_parallel`` sequences can be (``-c n_parallel * length``):
        every answer measured by llama.cpp (weights + KV + compute, output buffers of n sequences included)."""
        n_parallel, unified = self.n_parallel, self.kv_unified

        def total(n_seq: int, length: int) -> int:
            m, _ = self.measure(n_seq * length, type_k, type_v, n_seq_max=n_seq)
            return m.total

        m, _ = self.measure(n_ctx or self.model.n_ctx_train, type_k, type_v)
        seq_len = m.n_ctx // n_parallel   # split KV: exactly llama.cpp's n_ctx_seq (a multiple of 256)
        one = total(1, seq_len)
        max_seqs = _largest(lambda n: total(n, seq_len) <= budget, LLAMA_MAX_SEQ,
                            guess=max(1, int(budget / max(1, one)) if one <= budget else 0))
        # lengths in granules: llama.cpp pads each split stream (and the pool) to 256 cells
        at = total(n_parallel, seq_len)
        per_token = max(1, (total(n_parallel, seq_len + GRANULE) - at) // GRANULE)  # per token of each sequence
        guess = max(1, (seq_len + (budget - at) // per_token) // GRANULE)
        units = _largest(lambda u: total(n_parallel, u * GRANULE) <= budget, MAX_SEARCH_CTX // GRANULE // n_parallel,
                         guess=guess)
        return ConcurrencyRow(type_k=type_k, type_v=type_v, n_ctx=m.n_ctx, seq_len=seq_len, n_parallel=n_parallel,
                              kv_unified=unified, kv_bytes=m.kv, total_bytes=m.total, fits=m.total <= budget,
                              max_seqs=max_seqs, max_seq_len=units * GRANULE, n_ctx_train=self.model.n_ctx_train)


def _largest(ok, limit: int, guess: int = 1) -> int:
    """Largest n in [1, limit] with ok(n) (ok is monotone: true up to some n, false after); 0 if none."""
    guess = max(1, min(limit, guess))
    if ok(guess):
        lo, hi, step = guess, None, 1
        while hi is None:
            n = min(limit, lo + step)
            if n == lo:
                return lo
            if ok(n):
                lo, step = n, step * 2
            else:
                hi = n
    else:
        if guess == 1:
            return 0
        lo, hi = 0, guess
        step = 1
        while True:  # gallop down: the linear guess is usually close
            n = max(1, hi - step)
            if ok(n):
                lo = n
                break
            hi = n
            if n == 1:
                return 0
            step *= 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def gpu_budget() -> tuple[int, str]:
    from pyllm.devices import gpus

    found = gpus()
    if not found:
        raise ConfigError("--memory gpu: no GPU is visible to this build (pyllm info shows the backends); "
                          "give the budget as a size, e.g. --memory 96GiB")
    g = found[0]
    return g.free, f"free memory of {g.name} ({g.description})"


def default_budget() -> tuple[int, str]:
    from pyllm.devices import devices, gpus

    if gpus():
        return gpu_budget()
    cpu = [d for d in devices() if d.type == "cpu"]
    if cpu:
        return cpu[0].total, "total memory of the CPU device (system RAM)"
    raise ConfigError("no device reports its memory; give the budget with --memory, e.g. --memory 16GiB")


def make_plan(model_path: str, *, pairs: Sequence[tuple[str, str]] = (("f16", "f16"),), n_ctx: int = 0, memory: Optional[str] = None, n_gpu_layers: int = 0, n_batch: int = 2048,
              n_ubatch: int = 512, flash_attn: str = "auto", curves: bool = False,
              placement: Optional[Placement] = None, n_parallel: int = 1, kv_unified: bool = True) -> Plan:
    """The plan of one model for each K/V pair, of contexts as ``serve -c n_ctx -np n_parallel`` (with
    ``-b n_batch -ub n_ubatch``, and split KV with ``kv_unified=False``) creates them. ``n_parallel`` > 1
    adds the concurrency table: each sequence's share of ``n_ctx``, how many sequences of that length fit
    together, and how long each of ``n_parallel`` sequences can be."""
    if memory is None:
        budget, source = default_budget()
    elif str(memory).strip().lower() == "gpu":
        budget, source = gpu_budget()
    else:
        budget, source = parse_memory(memory), "--memory"
    pairs = [(check_kv_type("-ctk", k), check_kv_type("-ctv", v)) for k, v in pairs]
    check_int("-c", n_ctx, minimum=0, what=" (0 = the model's training context)")
    check_batch_sizes(0, n_batch, n_ubatch)
    check_int("-np", n_parallel, minimum=1, maximum=LLAMA_MAX_SEQ)
    check_bool("kv_unified", kv_unified)
    with Planner(model_path, n_gpu_layers=n_gpu_layers, n_batch=n_batch, n_ubatch=n_ubatch, flash_attn=flash_attn,
                 placement=placement, n_parallel=n_parallel, kv_unified=kv_unified) as planner:
        plan = Plan(model=planner.model.desc, model_path=model_path, budget=budget, budget_source=source,
                    n_gpu_layers=n_gpu_layers, rows=[], model_devices=list(planner.model.device_names),
                    n_parallel=n_parallel, kv_unified=kv_unified)
        for k, v in pairs:
            try:
                validate_kv_types(planner.model, k, v, flash_attn)
            except PyllmError as exc:
                plan.rows.append(PlanRow(k, v, n_ctx, 0, 0, 0, 0, 0, 0, 0, planner.model.n_ctx_train, False,
                                         error=str(exc)))
                if n_parallel > 1:
                    plan.concurrency.append(ConcurrencyRow(
                        type_k=k, type_v=v, n_ctx=n_ctx, seq_len=0, n_parallel=n_parallel, kv_unified=kv_unified,
                        kv_bytes=0, total_bytes=0, fits=False, max_seqs=0, max_seq_len=0,
                        n_ctx_train=planner.model.n_ctx_train, error=str(exc)))
                continue
            curve: Optional[list] = [] if curves else None
            plan.rows.append(planner.row(k, v, n_ctx, budget, curve))
            if curve is not None:
                plan.curves[f"{k}/{v}"] = sorted(set(curve))
            if n_parallel > 1:
                plan.concurrency.append(planner.concurrency(k, v, n_ctx, budget))
        return plan


def _mib(n: float) -> str:
    return f"{n / 2**20:,.2f}"


def format_table(plan: Plan) -> str:
    lines = [
        f"model: {plan.model} ({plan.model_path})",
        f"budget: {plan.budget / 2**30:.2f} GiB ({plan.budget_source}); -ngl {plan.n_gpu_layers}"
        + (f"; -np {plan.n_parallel} ({'one KV pool' if plan.kv_unified else 'split KV'})" if plan.n_parallel > 1 else ""),
        "",
        "| type_k | type_v | KV bytes/token | n_ctx | KV MiB | weights MiB | compute MiB | total MiB | max ctx | max ctx (uncapped) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in plan.rows:
        if r.error:
            lines.append(f"| {r.type_k} | {r.type_v} | {r.error} | | | | | | | |")
            continue
        train = "n_ctx_train" if plan.n_parallel == 1 else f"{plan.n_parallel} x n_ctx_train"
        capped = r.max_ctx == r.n_ctx_train * plan.n_parallel and r.max_ctx_uncapped > r.max_ctx
        cap = f"{r.max_ctx:,}" + (f" ({train})" if capped else "")
        unc = (">= " if r.max_ctx_uncapped >= MAX_SEARCH_CTX else "") + f"{r.max_ctx_uncapped:,}"
        lines.append(f"| {r.type_k} | {r.type_v} | {r.kv_bytes_per_token:,.0f} | {r.n_ctx:,} | {_mib(r.kv_bytes)} | "
                     f"{_mib(r.weights_bytes)} | {_mib(r.compute_bytes)} | {_mib(r.total_bytes)} | {cap} | {unc} |")
    lines += format_devices(plan)
    if plan.concurrency:
        c0 = next((c for c in plan.concurrency if not c.error), plan.concurrency[0])
        n, L = c0.n_parallel, c0.seq_len
        kv = "one KV pool shared by all sequences" if c0.kv_unified else "n_ctx / n_parallel cells each (split KV)"
        lines += [
            "",
            f"concurrent sequences (-c {c0.n_ctx:,} -np {n}: {kv}; {L:,} tokens each):",
            "",
            f"| type_k | type_v | KV MiB per {L:,}-token sequence | sequences of {L:,} tokens that fit | "
            f"total MiB with {n} x {L:,} | longest sequence with {n} at once |",
            "| --- | --- | ---: | ---: | ---: | ---: |",
        ]
        for c in plan.concurrency:
            if c.error:
                lines.append(f"| {c.type_k} | {c.type_v} | {c.error} | | | |")
                continue
            seqs = (">= " if c.max_seqs >= LLAMA_MAX_SEQ else "") + f"{c.max_seqs}"
            total = _mib(c.total_bytes) + ("" if c.fits else " (over budget)")
            longest = f"{c.max_seq_len:,}" + (f" (n_ctx_train {c.n_ctx_train:,})" if c.max_seq_len > c.n_ctx_train > 0 else "")
            lines.append(f"| {c.type_k} | {c.type_v} | {_mib(c.kv_bytes / c.n_parallel)} | {seqs} | {total} | {longest} |")
    return "\n".join(lines)


def format_devices(plan: Plan) -> list[str]:
    """Per device (llama.cpp's buffer types: CPU, CUDA0, RPC0[host:port], ...) at each row's n_ctx, when the
    model is split over more than one."""
    rows = [r for r in plan.rows if not r.error and len(r.devices) > 1]
    if not rows:
        return []
    lines = ["", "per device at n_ctx (MiB; llama.cpp's memory breakdown)"
             + (f"; devices: {', '.join(plan.model_devices)}" if plan.model_devices else ""),
             "| type_k | type_v | device | weights | KV | compute | total |", "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        for name, d in r.devices.items():
            total = d["model"] + d["context"] + d["compute"]
            lines.append(f"| {r.type_k} | {r.type_v} | {name} | {_mib(d['model'])} | {_mib(d['context'])} | "
                         f"{_mib(d['compute'])} | {_mib(total)} |")
    return lines


def plot(plan: Plan, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--plot needs matplotlib: pip install 'pyllm[plot]'") from None
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in plan.rows:
        pts = plan.curves.get(f"{r.type_k}/{r.type_v}")
        if r.error or not pts:
            continue
        xs, ys = zip(*pts)
        line, = ax.plot(xs, [y / 2**30 for y in ys], marker=".", label=f"K {r.type_k} / V {r.type_v}")
        if r.max_ctx_uncapped:
            m = [y for x, y in pts if x == r.max_ctx_uncapped]
            if m:
                ax.plot([r.max_ctx_uncapped], [m[0] / 2**30], "o", color=line.get_color(), markersize=9)
                ax.annotate(f"{r.max_ctx_uncapped:,}", (r.max_ctx_uncapped, m[0] / 2**30), textcoords="offset points",
                            xytext=(4, -12), fontsize=8)
    ax.axhline(plan.budget / 2**30, color="red", linestyle="--", label=f"budget {plan.budget / 2**30:.1f} GiB")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("memory: weights + KV cache + compute (GiB)")
    ax.set_title(plan.model)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- KV_CACHE_TYPE=auto: the highest-fidelity pair that fits, measured as pyllm plan measures ----
# Highest fidelity first. A mixed pair keeps K at the higher precision (attention scores are more sensitive to
# K's error than the output is to V's), so V is quantized first. Without flash attention a quantized V is
# impossible, and quantizing K alone is the only saving left: f16/f16, q8_0/f16, q4_0/f16.
AUTO_KV_PAIRS: tuple[tuple[str, str], ...] = (("f16", "f16"), ("f16", "q8_0"), ("q8_0", "q8_0"), ("q8_0", "q4_0"),
                                              ("q4_0", "q4_0"))
AUTO_KV_PAIRS_NO_FA: tuple[tuple[str, str], ...] = (("f16", "f16"), ("q8_0", "f16"), ("q4_0", "f16"))
AUTO_KV_TYPES = ("f16", "q8_0", "q4_0")
# Test hook: pretend the devices have this much free memory in all (a size such as 4GiB, or bytes). For tests
# and dry runs on machines without the target's memory; it replaces every device reading.
FREE_MEMORY_HOOK_VAR = "PYLLM_AUTO_KV_FREE_MEMORY"


def auto_kv_candidates(type_k: str, type_v: str, flash_attn: str) -> list[tuple[str, str]]:
    """The pairs ``auto`` tries, in order: both sides auto, the ladder above (its no-flash-attention form with
    ``flash_attn`` off); one side given, the other side from f16, q8_0, q4_0 (quantized V left out with
    flash attention off)."""
    k_auto, v_auto = type_k == "auto", type_v == "auto"
    if k_auto and v_auto:
        return list(AUTO_KV_PAIRS_NO_FA if flash_attn == "off" else AUTO_KV_PAIRS)
    if k_auto:
        return [(k, type_v) for k in AUTO_KV_TYPES]
    if v_auto:
        return [(type_k, v) for v in AUTO_KV_TYPES if not (flash_attn == "off" and v != "f16")]
    return [(type_k, type_v)]


@dataclass
class MemoryPool:
    """Where a context's buffers go and what is free there: a device (CUDA0, ...) or the host (``host``)."""

    name: str
    need: int                        # weights + KV + compute bytes llama.cpp would allocate there
    free: int                        # free bytes there now (host: MemAvailable)


@dataclass
class KVAutoChoice:
    """What ``auto`` chose and why: the pair, the context it was measured for, every pair tried before it.

    ``tried``: ``(type_k, type_v, reason)`` for the pairs passed over (higher fidelity first): the memory they
    would need, or the rule that rules them out (MLA, head size, flash attention, no CUDA kernel)."""

    type_k: str
    type_v: str
    n_ctx: int                       # the context measured, as llama.cpp pads it (0 asked: the training context)
    n_parallel: int
    kv_bytes: int                    # KV cache of the chosen pair at n_ctx
    total_bytes: int                 # weights + KV + compute at n_ctx
    pools: list[MemoryPool]
    free_source: str                 # "devices" or the test hook
    tried: list[tuple[str, str, str]] = field(default_factory=list)

    def message(self) -> str:
        """The one log line: ``KV cache type auto: K q8_0 / V q8_0 for n_ctx=32768, ...; K f16 / V f16 would
        need ...``."""
        where = ", ".join(f"{p.name} {_mib(p.need)} of {_mib(p.free)} MiB free" for p in self.pools)
        head = (f"KV cache type auto: K {self.type_k} / V {self.type_v} for n_ctx={self.n_ctx:,}"
                + (f" ({self.n_parallel} sequences)" if self.n_parallel > 1 else "")
                + f": KV {_mib(self.kv_bytes)} MiB, {_mib(self.total_bytes)} MiB in all ({where})")
        if self.tried:
            head += "; " + "; ".join(f"K {k} / V {v} {why}" for k, v, why in self.tried)
        return head


def _gpu_names() -> list[str]:
    from pyllm.devices import devices

    return sorted((d.name for d in devices() if d.type != "cpu"), key=len, reverse=True)


def memory_pools(m: Measure, free_memory: Optional[int] = None, free_source: str = "devices") -> list[MemoryPool]:
    """Split a measured context over the places its buffers go, with what is free there: each device by name
    (llama.cpp's buffer type names start with it: CUDA0, CUDA0_Split, RPC0[host:port]), the rest (CPU,
    CPU_REPACK, CUDA_Host) on the host, whose free memory is MemAvailable. ``free_memory`` (the test hook):
    one pool with everything, that much free."""
    total = m.weights + m.kv + m.compute
    if free_memory is not None:
        return [MemoryPool(free_source, total, free_memory)]
    from pyllm.context import _host_available
    from pyllm.devices import devices

    devs = {d.name: d for d in devices()}
    names = _gpu_names()
    need: dict[str, int] = {}
    for buft, row in m.devices.items():
        dev = next((n for n in names if buft.startswith(n)), "host")
        need[dev] = need.get(dev, 0) + row["model"] + row["context"] + row["compute"]
    if not need:
        need["host"] = total
    cpu = next((d for d in devs.values() if d.type == "cpu"), None)
    return [MemoryPool(name, n, devs[name].free if name in devs else _host_available(cpu.free if cpu else 0))
            for name, n in need.items()]


def _free_memory_hook(free_memory: Optional[int]) -> tuple[Optional[int], str]:
    import os

    if free_memory is not None:
        check_int("free_memory", free_memory, minimum=0, maximum=2**62)
        return free_memory, f"free_memory={free_memory:,} (test hook)"
    raw = os.environ.get(FREE_MEMORY_HOOK_VAR, "").strip()
    if not raw:
        return None, "devices"
    value = int(raw) if raw.isdigit() else parse_memory(raw)
    return value, f"{FREE_MEMORY_HOOK_VAR}={raw} (test hook)"


def choose_kv_types(model_path: str, *, type_k: str = "auto", type_v: str = "auto", n_ctx: int = 0,
                    n_parallel: int = 1, kv_unified: bool = True, n_batch: int = 2048, n_ubatch: int = 512,
                    flash_attn: str = "auto", n_gpu_layers: int = 0, placement: Optional[Placement] = None,
                    free_memory: Optional[int] = None) -> KVAutoChoice:
    """The first pair of :func:`auto_kv_candidates` whose context (``n_ctx`` cells in all, ``n_parallel``
    sequences, as ``serve -c n_ctx -np n_parallel`` creates it; 0: the training context) fits the free memory
    after weights and compute buffers: weights + KV + compute, as llama.cpp accounts them for a context it
    only simulates (the Planner of ``pyllm plan``, no_alloc), at most what is free on every device they go to.

    Pairs the model or settings rule out (MLA needs K = V, a block size that does not divide the head size, a
    quantized V when flash attention resolves off, a CUDA build without that pair's flash-attention kernel)
    are passed over. ``free_memory`` (bytes), else the variable PYLLM_AUTO_KV_FREE_MEMORY, is a test hook
    that replaces the device readings. None fits: KVCacheConfigError with pyllm plan's table of the pairs."""
    from pyllm.buildinfo import compiled_fa_pairs, has_cuda
    from pyllm.errors import KVCacheConfigError
    from pyllm.kvtypes import is_quantized

    type_k = check_kv_type("type_k", type_k, allow_auto=True)
    type_v = check_kv_type("type_v", type_v, allow_auto=True)
    check_int("n_ctx", n_ctx, minimum=0)
    free_memory, free_source = _free_memory_hook(free_memory)
    cuda_pairs = compiled_fa_pairs() if has_cuda() and n_gpu_layers != 0 and flash_attn != "off" else None
    tried: list[tuple[str, str, str]] = []
    failed: list[tuple[str, str]] = []
    with Planner(model_path, n_gpu_layers=n_gpu_layers, n_batch=n_batch, n_ubatch=n_ubatch, flash_attn=flash_attn,
                 placement=placement, n_parallel=n_parallel, kv_unified=kv_unified) as planner:
        n = n_ctx or planner.model.n_ctx_train
        for k, v in auto_kv_candidates(type_k, type_v, flash_attn):
            try:
                validate_kv_types(planner.model, k, v, flash_attn)
            except PyllmError as exc:
                tried.append((k, v, f"ruled out ({exc})"))
                continue
            if cuda_pairs is not None and (k, v) not in cuda_pairs:
                tried.append((k, v, "has no flash-attention kernel in this CUDA build (it would run slowly)"))
                continue
            m, fa = planner.measure(n, k, v)
            if is_quantized(v) and not fa:
                tried.append((k, v, "needs flash attention, which resolves off here"))
                continue
            pools = memory_pools(m, free_memory, free_source)
            over = [p for p in pools if p.need > p.free]
            if not over:
                return KVAutoChoice(type_k=k, type_v=v, n_ctx=m.n_ctx, n_parallel=n_parallel, kv_bytes=m.kv,
                                    total_bytes=m.total, pools=pools, free_source=free_source, tried=tried)
            tried.append((k, v, "would need " + ", ".join(
                f"{_mib(p.need)} MiB (KV {_mib(m.kv)}) on {p.name} {_mib(p.free)} MiB free" for p in over)))
            failed.append((k, v))
        budget = free_memory if free_memory is not None else _total_free(planner, n, failed)
        plan = Plan(model=planner.model.desc, model_path=model_path, budget=budget,
                    budget_source=free_source if free_memory is not None else "free memory of the devices used",
                    n_gpu_layers=n_gpu_layers, rows=[planner.row(k, v, n_ctx, budget) for k, v in failed],
                    model_devices=list(planner.model.device_names), n_parallel=n_parallel, kv_unified=kv_unified)
    reasons = "; ".join(f"K {k} / V {v} {why}" for k, v, why in tried) or "no pair to try"
    raise KVCacheConfigError(
        f"KV cache type auto: no K/V pair fits n_ctx={n:,}" + (f" with {n_parallel} sequences" if n_parallel > 1
                                                               else "")
        + f" in the free memory ({reasons}). Lower {label('n_ctx')}, {label('n_parallel')} or the GPU layers, or "
        "set the types; pyllm plan's table of what fits:\n"
        + (format_table(plan) if plan.rows else "(no pair measured)"))


def _total_free(planner: Planner, n: int, pairs: list[tuple[str, str]]) -> int:
    """For the table of a failed choice: the free memory of the places the first pair's buffers go."""
    if not pairs:
        return 0
    m, _ = planner.measure(n, *pairs[0])
    return sum(p.free for p in memory_pools(m))


def resolve_kv_auto(config, *, model_path: str, n_gpu_layers: int, placement: Optional[Placement] = None,
                    free_memory: Optional[int] = None):
    """``config`` (an EngineConfig) with ``auto`` K/V types replaced by :func:`choose_kv_types`' choice for
    its context (n_ctx, n_parallel, kv_unified, n_batch, n_ubatch, flash_attn), and the choice; unchanged and
    None when neither side is auto. Logs the choice as one INFO line of the ``pyllm`` logger. ``model_path``,
    ``n_gpu_layers`` and ``placement``: as the engine resolves them (pyllm.engine.model_path_of,
    gpu_layers_of, placement_of)."""
    import logging

    if not config.kv_auto:
        return config, None
    choice = choose_kv_types(
        model_path, type_k=config.kv_cache_type_k or "f16", type_v=config.kv_cache_type_v or "f16",
        n_ctx=config.n_ctx, n_parallel=config.n_parallel, kv_unified=config.kv_unified, n_batch=config.n_batch,
        n_ubatch=config.n_ubatch, flash_attn=config.flash_attn, n_gpu_layers=n_gpu_layers, placement=placement,
        free_memory=free_memory)
    msg = choice.message()
    if config.n_ctx == 0:
        msg += " (n_ctx=0: the training context)"
    logging.getLogger("pyllm").info("%s", msg)
    return config.replace(kv_cache_type_k=choice.type_k, kv_cache_type_v=choice.type_v), choice
