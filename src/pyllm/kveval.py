"""``pyllm kv-eval``: what a quantized KV cache costs in quality, measured against f16.

The text is split into chunks of ``n_ctx`` tokens exactly as llama.cpp's ``llama-perplexity``
does: each chunk is evaluated in a fresh context (its first token replaced by BOS when the model
adds one), and the second half of each chunk is scored. Per K/V pair we report perplexity, the
KL divergence of its next-token distributions from the f16/f16 baseline's (mean and 99th
percentile), how often both pick the same top-1 token, and the KV cache size.

Memory: the baseline's log-probabilities are held for one chunk at a time (n_ctx/2 rows of
n_vocab floats), never for the whole text.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from pyllm.context import Context, validate_kv_types
from pyllm.errors import ConfigError
from pyllm.config import check_int, check_kv_type
from pyllm.model import Model

BASELINE = ("f16", "f16")
ROW_BLOCK = 32  # rows of n_vocab processed at once (bounds the temporary memory)


def default_text() -> tuple[str, str]:
    """Text every Python installation ships: the pydoc topics (pydoc_data.topics)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics)), "pydoc_data.topics (ships with Python)"


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float32, the normaliser summed in float64 (as llama-perplexity does)."""
    x = logits - logits.max(axis=-1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=-1, keepdims=True, dtype=np.float64)).astype(np.float32)
    return x


@dataclass
class PairResult:
    type_k: str
    type_v: str
    kv_mib: float
    nll_sum: float = 0.0
    count: int = 0
    top1_same: int = 0
    kl: list[float] = field(default_factory=list)
    error: Optional[str] = None

    @property
    def ppl(self) -> float:
        return math.exp(self.nll_sum / self.count) if self.count else float("nan")

    @property
    def kl_mean(self) -> float:
        return float(np.mean(self.kl)) if self.kl else float("nan")

    @property
    def kl_p99(self) -> float:
        return float(np.percentile(self.kl, 99)) if self.kl else float("nan")

    @property
    def top1_agreement(self) -> float:
        return self.top1_same / self.count if self.count else float("nan")


@dataclass
class EvalReport:
    model: str
    text_source: str
    n_ctx: int
    n_chunks: int
    n_tokens_scored: int
    results: list[PairResult]

    @property
    def baseline(self) -> PairResult:
        return self.results[0]

    def as_dict(self) -> dict:
        base = self.baseline.ppl
        rows = []
        for r in self.results:
            d = {k: v for k, v in asdict(r).items() if k not in ("kl", "nll_sum")}
            d.update(ppl=r.ppl, ppl_delta=r.ppl - base, ppl_delta_pct=100 * (r.ppl / base - 1), kl_mean=r.kl_mean,
                     kl_p99=r.kl_p99, top1_agreement=r.top1_agreement)
            rows.append(d)
        return {"model": self.model, "text_source": self.text_source, "n_ctx": self.n_ctx, "n_chunks": self.n_chunks,
                "n_tokens_scored": self.n_tokens_scored, "baseline": "f16/f16", "results": rows}


def kv_eval(
    model_path: str,
    pairs: Sequence[tuple[str, str]],
    *,
    text: Optional[str] = None,
    text_source: str = "",
    n_ctx: int = 512,
    n_chunks: int = 10,
    flash_attn: str = "auto",
    n_threads: Optional[int] = None,
    n_gpu_layers: int = 0,
    progress: Optional[Callable[[int, int], None]] = None,
) -> EvalReport:
    if check_int("-c", n_ctx, minimum=16, what=" (an even number of tokens per chunk)") % 2:
        raise ConfigError(f"-c={n_ctx} is odd; expected an even number of tokens per chunk (at least 16)")
    check_int("--chunks", n_chunks, minimum=1)
    wanted = [BASELINE]  # a requested f16/f16 is evaluated again in its own context: a determinism check
    requested: list[tuple[str, str]] = []
    for k, v in pairs:
        ck, cv = check_kv_type("-ctk", k), check_kv_type("-ctv", v)
        if (ck, cv) not in requested:
            requested.append((ck, cv))
    wanted += requested
    if text is None:
        text, text_source = default_text()

    with Model(model_path, n_gpu_layers=n_gpu_layers) as model:
        for k, v in wanted:
            validate_kv_types(model, k, v, flash_attn)  # an impossible pair is an error before any work
        tokens = model.tokenize(text, add_special=True)
        if len(tokens) < 2 * n_ctx:
            raise ConfigError(f"the text tokenizes to {len(tokens)} tokens; at least {2 * n_ctx} (2 x n_ctx) are "
                              f"needed for one chunk of n_ctx={n_ctx}: give a longer text or a smaller -c")
        n_chunk = min(n_chunks, len(tokens) // n_ctx)
        first = n_ctx // 2
        bos = model.bos if model.add_bos else None
        contexts: list[Context] = []
        try:
            for k, v in wanted:
                contexts.append(Context(model, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(512, n_ctx), type_k=k,
                                        type_v=v, flash_attn=flash_attn, n_threads=n_threads))
            results = [PairResult(k, v, ctx.kv_cache_bytes().total_mib) for (k, v), ctx in zip(wanted, contexts)]
            for i in range(n_chunk):
                chunk = tokens[i * n_ctx:(i + 1) * n_ctx]
                if bos is not None:
                    chunk[0] = bos
                targets = np.asarray(chunk[first + 1:], dtype=np.int64)       # n_ctx - 1 - first scored tokens
                base_lp = _chunk_logprobs(contexts[0], chunk, first)          # (n_ctx - first, n_vocab), float32
                _score(results[0], base_lp, None, targets)
                base_top1 = base_lp[:-1].argmax(axis=1)
                for res, ctx in zip(results[1:], contexts[1:]):
                    _score(res, _chunk_logprobs(ctx, chunk, first), (base_lp, base_top1), targets)
                del base_lp
                if progress:
                    progress(i + 1, n_chunk)
        finally:
            for ctx in contexts:
                ctx.close()
        return EvalReport(model=model.desc, text_source=text_source, n_ctx=n_ctx, n_chunks=n_chunk,
                          n_tokens_scored=results[0].count, results=results)


def _chunk_logprobs(ctx: Context, chunk: list[int], first: int) -> np.ndarray:
    ctx.clear()
    n_out = ctx.decode(chunk, logits="all", output_from=first)
    logits = ctx.all_logits(n_out)                       # zero-copy view into llama.cpp's buffer
    out = np.empty(logits.shape, dtype=np.float32)
    for s in range(0, n_out, ROW_BLOCK):
        out[s:s + ROW_BLOCK] = log_softmax(logits[s:s + ROW_BLOCK])
    return out


def _score(res: PairResult, lp: np.ndarray, base: Optional[tuple[np.ndarray, np.ndarray]], targets: np.ndarray) -> None:
    rows = lp[:-1]                                        # row j predicts token first + j + 1
    idx = np.arange(len(targets))
    res.nll_sum += float(-rows[idx, targets].astype(np.float64).sum())
    res.count += len(targets)
    if base is None:
        res.top1_same += len(targets)
        res.kl.extend([0.0] * len(targets))
        return
    base_lp, base_top1 = base
    base_rows = base_lp[:-1]
    res.top1_same += int((rows.argmax(axis=1) == base_top1).sum())
    for s in range(0, len(rows), ROW_BLOCK):
        b = base_rows[s:s + ROW_BLOCK]
        q = rows[s:s + ROW_BLOCK]
        kl = (np.exp(b) * (b - q)).sum(axis=1, dtype=np.float64)
        res.kl.extend(np.maximum(kl, 0.0).tolist())


def format_table(report: EvalReport) -> str:
    d = report.as_dict()
    lines = [
        f"model: {d['model']}; text: {d['text_source']}; n_ctx={d['n_ctx']}, {d['n_chunks']} chunks, "
        f"{d['n_tokens_scored']} tokens scored; baseline f16/f16",
        "",
        "| type_k | type_v | KV MiB | PPL | ΔPPL vs f16 | mean KLD | KLD p99 | top-1 agreement |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in d["results"]:
        lines.append(f"| {r['type_k']} | {r['type_v']} | {r['kv_mib']:.2f} | {r['ppl']:.4f} | "
                     f"{r['ppl_delta']:+.4f} ({r['ppl_delta_pct']:+.2f}%) | {r['kl_mean']:.6f} | {r['kl_p99']:.6f} | "
                     f"{100 * r['top1_agreement']:.2f}% |")
    return "\n".join(lines)


def format_json(report: EvalReport) -> str:
    return json.dumps(report.as_dict(), indent=2)


def read_text_file(path: str) -> str:
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"-f {path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"-f {path}: is a directory, expected a text file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"-f {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
