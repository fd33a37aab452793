"""Backend (device) sampling (-bs): the sampler chain runs inside the decode graph; same tokens as the
CPU path for greedy, the same distribution for seeded sampling, and a per-request CPU fallback."""
from __future__ import annotations

import collections
import math

import pytest

from pyllm.batched import BatchedEngine
from pyllm.config import EngineConfig
from pyllm.model import Model
from pyllm.sampling import SamplingParams

@pytest.fixture(scope="module")
def model(default_model_path):
    with Model(default_model_path) as m:
        yield m


PROMPTS = ["The capital of France is", "Once upon a time, in a land far away,", "def fibonacci(n):"]


def _engine(model, path, kv: str, backend: bool, n_parallel: int = 3) -> BatchedEngine:
    cfg = EngineConfig(model_path=str(path), n_ctx=1024, n_parallel=n_parallel, kv_cache_type_k=kv,
                       kv_cache_type_v=kv, backend_sampling=backend)
    return BatchedEngine(cfg, model=model, max_queue=512)


@pytest.mark.parametrize("kv", ["f16", "q8_0"])
def test_greedy_on_the_device_gives_the_cpu_path_tokens(model, default_model_path, kv):
    outs = {}
    for backend in (False, True):
        with _engine(model, default_model_path, kv, backend) as eng:
            reqs = [eng.submit(p, max_tokens=24, cache_prompt=False) for p in PROMPTS]
            outs[backend] = [r.wait(120).tokens for r in reqs]
            s = eng.stats()
            key = "backend_sampling_requests_total" if backend else "cpu_sampling_requests_total"
            assert s[key] == len(PROMPTS), s
    assert outs[True] == outs[False]
    assert all(len(t) == 24 for t in outs[True])


def test_seeded_sampling_on_the_device_is_reproducible(model, default_model_path):
    sp = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=1234)
    with _engine(model, default_model_path, "f16", True) as eng:
        a = eng.submit(PROMPTS[1], max_tokens=24, sampling=sp, cache_prompt=False).wait(120)
        b = eng.submit(PROMPTS[1], max_tokens=24, sampling=sp, cache_prompt=False).wait(120)
        assert eng.stats()["backend_sampling_requests_total"] == 2
    assert a.tokens == b.tokens and len(a.tokens) == 24


def test_chains_the_device_cannot_run_fall_back_to_the_cpu(model, default_model_path):
    with _engine(model, default_model_path, "f16", True) as eng:
        typical = eng.submit(PROMPTS[0], max_tokens=4, sampling=SamplingParams(temperature=0.8, typical_p=0.9, seed=1))
        logprobs = eng.submit(PROMPTS[0], max_tokens=4, logprobs=2)
        greedy = eng.submit(PROMPTS[0], max_tokens=4)
        for r in (typical, logprobs, greedy):
            assert r.wait(120).stop_reason in ("max_tokens", "eog")
        s = eng.stats()
    assert s["cpu_sampling_requests_total"] == 2 and s["backend_sampling_requests_total"] == 1
    assert len(logprobs.logprobs) == len(logprobs.token_ids)


def _first_tokens(eng, n: int, sp: SamplingParams) -> collections.Counter:
    reqs = [eng.submit(PROMPTS[0], max_tokens=1, sampling=SamplingParams(**{**sp.__dict__, "seed": i}))
            for i in range(n)]
    return collections.Counter(r.wait(1800).tokens[0] for r in reqs)   # a hang guard, not a timing


def test_seeded_sampling_on_the_device_has_the_cpu_distribution(model, default_model_path):
    """First tokens of N differently seeded requests, top-k 4 at temperature 1.5, on each path: both
    histograms against the exact top-4 softmax (logprobs of the greedy request), by Pearson's chi-square
    with 3 degrees of freedom at p = 1e-4 (critical value 21.11), so a correct sampler fails 1 run in 10,000."""
    n, k, temp = 300, 4, 1.5
    sp = SamplingParams(temperature=temp, top_k=k)
    with _engine(model, default_model_path, "f16", False, n_parallel=16) as eng:
        ref = eng.submit(PROMPTS[0], max_tokens=1, logprobs=k)
        ref.wait(120)
        cpu = _first_tokens(eng, n, sp)
    top_k = [(t, lp) for t, _, lp in ref.logprobs[0].top]   # log-softmax of the logits: the k most likely
    weights = [math.exp(lp / temp) for _, lp in top_k]   # softmax(logits / T) over the top k
    z = sum(weights)
    expected = {t: w / z for (t, _), w in zip(top_k, weights)}
    with _engine(model, default_model_path, "f16", True, n_parallel=16) as eng:
        dev = _first_tokens(eng, n, sp)
        assert eng.stats()["backend_sampling_requests_total"] == n
    # bins with fewer than 5 expected draws are pooled (the chi-square approximation needs them);
    # critical values at p = 1e-4 for 1..3 degrees of freedom
    big = [t for t, p in expected.items() if n * p >= 5]
    bins = [[t] for t in big] + ([[t for t in expected if t not in big]] if len(big) < len(expected) else [])
    critical = {1: 15.14, 2: 18.42, 3: 21.11}[len(bins) - 1]
    for name, hist in (("cpu", cpu), ("device", dev)):
        assert set(hist) <= set(expected), (name, hist, expected)
        chi2 = 0.0
        for b in bins:
            e = n * sum(expected[t] for t in b)
            chi2 += (sum(hist.get(t, 0) for t in b) - e) ** 2 / e
        assert chi2 < critical, (name, chi2, hist, expected)
