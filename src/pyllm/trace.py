"""The step trace: what each engine step cost and what it carried.

Per step: wall time (from planning the batch to the last sampled token published), the time inside
``llama_decode`` (on the CPU backend the whole graph; on a GPU the launch, with the wait moving into
the first ``llama_get_logits_ith``, i.e. into "Python"), generated tokens (one per generating
sequence), prompt tokens and sequences in the batch. ``StepTrace`` keeps the last ``maxlen`` steps,
running sums and fixed-bucket histograms (Prometheus-style cumulative buckets) for ``/metrics``.
"""
from __future__ import annotations

import collections
import threading
from typing import NamedTuple

__all__ = ["STEP_SECONDS_BUCKETS", "STEP_TOKENS_BUCKETS", "StepRecord", "StepTrace", "summarize"]

STEP_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
STEP_TOKENS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class StepRecord(NamedTuple):
    t_ns: int          # perf_counter_ns at the start of the step
    wall_ns: int
    decode_ns: int     # inside llama_decode
    n_gen: int         # generated tokens decoded (one per generating sequence)
    n_prompt: int      # prompt tokens decoded
    n_seqs: int        # sequences in the batch

    @property
    def python_ns(self) -> int:
        return self.wall_ns - self.decode_ns


class _Histogram:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)   # the last one is +Inf
        self.sum = 0.0

    def observe(self, v: float) -> None:
        i = 0
        for b in self.bounds:
            if v <= b:
                break
            i += 1
        self.counts[i] += 1
        self.sum += v

    def cumulative(self) -> list[tuple[str, int]]:
        out, acc = [], 0
        for b, c in zip(self.bounds + ("+Inf",), self.counts):
            acc += c
            out.append((str(b), acc))
        return out


class StepTrace:
    """Thread-safe: the engine thread records, anyone reads."""

    def __init__(self, maxlen: int = 4096) -> None:
        self._lock = threading.Lock()
        self._recent: collections.deque[StepRecord] = collections.deque(maxlen=maxlen)
        self.steps = 0
        self.wall_ns = 0
        self.decode_ns = 0
        self.gen_tokens = 0
        self.prompt_tokens = 0
        self.seqs = 0
        self._seconds = _Histogram(STEP_SECONDS_BUCKETS)
        self._tokens = _Histogram(STEP_TOKENS_BUCKETS)

    def record(self, rec: StepRecord) -> None:
        with self._lock:
            self._recent.append(rec)
            self.steps += 1
            self.wall_ns += rec.wall_ns
            self.decode_ns += rec.decode_ns
            self.gen_tokens += rec.n_gen
            self.prompt_tokens += rec.n_prompt
            self.seqs += rec.n_seqs
            self._seconds.observe(rec.wall_ns / 1e9)
            self._tokens.observe(rec.n_gen + rec.n_prompt)

    def recent(self, n: int = 0) -> list[StepRecord]:
        """The last ``n`` steps (all kept when 0), oldest first."""
        with self._lock:
            items = list(self._recent)
        return items[-n:] if n else items

    def totals(self) -> dict:
        """Running sums: steps, seconds (wall, in llama_decode, in Python), tokens, sequences (summed over
        the steps: over ``steps`` it is the mean number of sequences per llama_decode)."""
        with self._lock:
            return {"steps": self.steps, "step_seconds_total": self.wall_ns / 1e9,
                    "decode_seconds_total": self.decode_ns / 1e9,
                    "python_seconds_total": (self.wall_ns - self.decode_ns) / 1e9,
                    "step_gen_tokens_total": self.gen_tokens, "step_prompt_tokens_total": self.prompt_tokens,
                    "step_sequences_total": self.seqs}

    def histograms(self) -> dict:
        """``{"step_seconds": (buckets, sum, count), "step_tokens": ...}`` with cumulative buckets."""
        with self._lock:
            return {name: (h.cumulative(), h.sum, sum(h.counts))
                    for name, h in (("step_seconds", self._seconds), ("step_tokens", self._tokens))}


def summarize(records: list[StepRecord]) -> dict:
    """Medians and means of a list of steps (for ``bench --batched -v`` and README's trace table)."""
    if not records:
        return {"steps": 0}
    import statistics  # noqa: PLC0415 - only for reports

    def med(xs):
        return statistics.median(xs)

    wall = [r.wall_ns / 1e6 for r in records]
    dec = [r.decode_ns / 1e6 for r in records]
    py = [r.python_ns / 1e6 for r in records]
    return {
        "steps": len(records),
        "wall_ms_median": med(wall), "decode_ms_median": med(dec), "python_ms_median": med(py),
        "wall_ms_mean": sum(wall) / len(wall), "python_share": sum(py) / max(sum(wall), 1e-12),
        "gen_tokens_mean": sum(r.n_gen for r in records) / len(records),
        "prompt_tokens_mean": sum(r.n_prompt for r in records) / len(records),
        "seqs_mean": sum(r.n_seqs for r in records) / len(records),
    }
