"""The engine core's parts without a model: the scheduler's step plan and the step trace."""
from __future__ import annotations

import threading

from pyllm.sampling import SamplingParams
from pyllm.scheduler import Scheduler
from pyllm.sequence import GREEDY, Request
from pyllm.trace import StepRecord, StepTrace, summarize


def _req(n_prompt: int, pos: int = 0, pending: int = -1) -> Request:
    r = Request(list(range(1, n_prompt + 1)), 8, GREEDY, [], False, n_prompt + 8)
    r._pos, r._pending = pos, pending
    return r


def _scheduler(n_batch: int = 64, n_prefill_generating: int = 16) -> Scheduler:
    return Scheduler(kv=None, n_ctx=1024, n_ctx_share=256, kv_unified=True, n_batch=n_batch,
                     n_prefill_generating=n_prefill_generating, lock=threading.Condition())


def test_plan_puts_generating_sequences_first_and_caps_prompt_tokens_while_they_run():
    s = _scheduler()
    gen1, gen2 = _req(10, pos=10, pending=5), _req(4, pos=4, pending=7)
    long, short = _req(100), _req(3)
    s.active = [long, gen1, short, gen2]
    plan = s.plan()
    assert plan.gen == [gen1, gen2]
    # 16 prompt tokens while others generate, in admission order: the long prompt takes them all
    assert plan.prefill == [(long, 16)] and plan.n_prompt == 16


def test_plan_without_generating_sequences_fills_n_batch():
    s = _scheduler(n_batch=64)
    a, b = _req(40), _req(40, pos=10)
    s.active = [a, b]
    plan = s.plan()
    assert plan.gen == [] and plan.prefill == [(a, 40), (b, 24)]
    assert s.plan(generate=False).prefill == plan.prefill


def test_plan_never_exceeds_n_batch_with_many_generating_sequences():
    s = _scheduler(n_batch=8, n_prefill_generating=16)
    gens = [_req(2, pos=2, pending=1) for _ in range(6)]
    p = _req(50)
    s.active = gens + [p]
    plan = s.plan()
    assert len(plan.gen) == 6 and plan.prefill == [(p, 2)]   # 6 + 2 = n_batch


def test_base_reservation_within_and_beyond_the_share():
    s = _scheduler()
    small, big = _req(10), _req(200)
    big._want = 600
    assert s.base(small) == small._want == 18
    assert s.base(big) == 256                                  # the share
    huge = _req(300)
    huge._want = 900
    assert s.base(huge) == 301                                 # a prompt longer than the share, plus one


def _group(n_prompt: int, n: int, max_tokens: int) -> list[Request]:
    lead = Request(list(range(1, n_prompt + 1)), max_tokens, GREEDY, [], False, n_prompt + max_tokens)
    group = [lead] + [lead.choice(i, GREEDY) for i in range(1, n)]
    for m in group[1:]:
        m.share_prompt()
    return group


def test_a_group_reserves_its_prompt_once():
    s = _scheduler()                                           # n_ctx 1024, share 256
    g = _group(100, 3, 50)
    assert [m._want for m in g] == [150, 50, 50] and [m.index for m in g] == [0, 1, 2]
    assert s.bases(g) == [150, 50, 50]
    # a prompt longer than the share: the lead holds it, every choice gets an equal part of the rest
    g = _group(700, 4, 200)
    assert [s.base(m) for m in g] == [701, 200, 200, 200]     # 1301 > 1024 together
    assert s.bases(g) == [700 + 81, 81, 81, 81]               # (1024 - 700) // 4 = 81 each
    # the lead leaves: a choice takes the prompt's reservation over
    g[1]._reserve = 81
    g[1].become_lead()
    assert (g[1]._want, g[1]._reserve, g[1]._shared) == (900, 781, 0)


def test_plan_skips_choices_waiting_for_their_lead():
    s = _scheduler()
    lead, child = _group(40, 2, 8)
    child._waiting = True
    s.active = [lead, child]
    assert s.plan().prefill == [(lead, 40)]


def test_choice_seeds():
    sp = SamplingParams(temperature=0.7, seed=41)
    assert [sp.for_choice(i).seed for i in range(4)] == [41, 42, 43, 44]
    assert sp.for_choice(0) is sp and sp.for_choice(2).temperature == 0.7
    assert SamplingParams(seed=2**32 - 2).for_choice(1).seed == 0     # never 0xFFFFFFFF (random)
    assert SamplingParams(seed=None).for_choice(3).seed is None
    assert SamplingParams(seed=2**32 - 1).for_choice(3).seed == 2**32 - 1   # LLAMA_DEFAULT_SEED: random for all


def test_step_trace_sums_histograms_and_summary():
    t = StepTrace(maxlen=3)
    recs = [StepRecord(0, 2_000_000, 1_500_000, 4, 0, 4), StepRecord(1, 30_000_000, 29_000_000, 4, 60, 5),
            StepRecord(2, 4_000_000, 3_000_000, 4, 0, 4), StepRecord(3, 600_000, 500_000, 1, 0, 1)]
    for r in recs:
        t.record(r)
    assert t.recent() == recs[1:] and t.recent(1) == recs[-1:]          # the last maxlen steps
    tot = t.totals()
    assert tot["steps"] == 4 and tot["step_gen_tokens_total"] == 13 and tot["step_prompt_tokens_total"] == 60
    assert abs(tot["step_seconds_total"] - 0.0366) < 1e-9
    assert abs(tot["python_seconds_total"] - (0.0366 - 0.034)) < 1e-9
    buckets, total, count = t.histograms()["step_seconds"]
    assert count == 4 and abs(total - 0.0366) < 1e-9
    cum = dict(buckets)
    assert cum["0.001"] == 1 and cum["0.0025"] == 2 and cum["0.005"] == 3 and cum["0.025"] == 3 and cum["0.05"] == 4
    assert cum["+Inf"] == 4
    tok = dict(t.histograms()["step_tokens"][0])
    assert tok["1"] == 1 and tok["4"] == 3 and tok["64"] == 4
    summary = summarize(recs)
    assert summary["steps"] == 4 and summary["wall_ms_median"] == 3.0 and summary["decode_ms_median"] == 2.25
