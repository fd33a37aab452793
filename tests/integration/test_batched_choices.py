"""Several choices of one prompt (``BatchedEngine.submit_n``, llama-server's ``n_cmpl``) on the real default
model, CPU: the prompt is decoded once and its cells copied to the other choices, each of which samples
with its own chain; unified and split KV."""
from __future__ import annotations

import random
import time

import pytest

from pyllm.batched import BatchedEngine
from pyllm.config import EngineConfig
from pyllm.engine import Engine
from pyllm.errors import ConfigError, ContextFullError, QueueFullError
from pyllm.model import Model
from pyllm.sampling import SamplingParams

WORDS = ("the a cat dog river mountain blue quickly story about when science history music city old new "
         "winter garden letter machine friend").split()
PROMPT = "Once upon a time, in a small village by the sea,"
NEAR_TIE = 0.5
UNIFIED = pytest.mark.parametrize("kv_unified", [True, False], ids=["unified", "split"])


@pytest.fixture(scope="module")
def model(default_model_path):
    with Model(default_model_path) as m:
        yield m


@pytest.fixture(scope="module")
def single(model):
    with Engine(EngineConfig(n_ctx=1024), model=model) as e:
        yield e


def _engine(model, kv_unified: bool, max_queue: int = 8, **kw) -> BatchedEngine:
    cfg = {"n_ctx": 1024, "n_parallel": 4, "kv_unified": kv_unified, **kw}
    return BatchedEngine(EngineConfig(**cfg), model=model, max_queue=max_queue)


def _alone(single: Engine, prompt, max_tokens: int, **kw) -> list[int]:
    single.reset()
    return single.generate(prompt, max_tokens=max_tokens, **kw).tokens


def _same_or_near_tie(single: Engine, prompt: str, ref: list[int], got: list[int]) -> bool:
    """``got`` is the single engine's greedy ``ref``, or leaves it only where the single engine's own top
    two logits are within NEAR_TIE (other sequences in a batch change the CPU kernels' summation order,
    which can flip a near-tie: see test_batched.py)."""
    k = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), None)
    if k is None:
        return len(got) == len(ref)
    single.reset()
    single.ingest(single.model.tokenize_prompt(prompt) + ref[:k])
    logits = single.context.logits(-1)
    return abs(float(logits[ref[k]]) - float(logits[got[k]])) < NEAR_TIE


def _delta(before: dict, after: dict, key: str) -> int:
    return after[key] - before[key]


def _stats_after_step(eng: BatchedEngine) -> dict:
    """stats() once the step that published the last result has ended (its counters are added after it)."""
    eng._call(lambda: None)
    return eng.stats()


def _assert_only_idle_caches(eng: BatchedEngine, lead_seq: int, lead_cells: int) -> None:
    """Every choice has ended: nothing reserved, the lead's slot is the only one holding cells (the other
    choices' copies were freed), and dropping the idle caches empties llama.cpp's memory."""
    s = _stats_after_step(eng)
    assert s["active"] == 0 and s["queued"] == 0 and s["kv_cells_reserved"] == 0
    assert s["kv_cells_used"] == s["kv_cells_cached"] == lead_cells
    positions = eng.seq_positions()
    assert positions[lead_seq] == (0, lead_cells - 1)
    assert all(p == (-1, -1) for i, p in enumerate(positions) if i != lead_seq)
    eng.drop_cache()
    assert eng.stats()["kv_cells_used"] == 0 and all(p == (-1, -1) for p in eng.seq_positions())


@UNIFIED
def test_greedy_choices_equal_the_single_greedy_run_and_the_prompt_is_decoded_once(model, single, kv_unified):
    n_prompt = len(single.model.tokenize_prompt(PROMPT))
    ref = _alone(single, PROMPT, 24, ignore_eos=True)
    with _engine(model, kv_unified) as eng:
        before = eng.stats()
        reqs = eng.submit_n(PROMPT, 3, max_tokens=24, ignore_eos=True, logprobs=2)
        assert [r.index for r in reqs] == [0, 1, 2]
        res = [r.wait(120) for r in reqs]
        after = _stats_after_step(eng)
        assert [r.stop_reason for r in res] == ["max_tokens"] * 3
        # every choice the same tokens (the same cells, the same batches); the single engine's up to a near-tie
        assert res[0].tokens == res[1].tokens == res[2].tokens
        assert _same_or_near_tie(single, PROMPT, ref, res[0].tokens)
        assert res[0].text == res[1].text == res[2].text
        # the first token of every choice was read from the same logits row (the lead's)
        first = {(r.logprobs[0].token, r.logprobs[0].logprob, r.logprobs[0].top) for r in reqs}
        assert len(first) == 1 and all(len(r.logprobs) == 24 for r in reqs)
        # the prompt was decoded once, by choice 0; the others report it as cached (copied)
        assert _delta(before, after, "step_prompt_tokens_total") == n_prompt
        assert _delta(before, after, "prompt_tokens_total") == n_prompt
        assert _delta(before, after, "prompt_tokens_cached_total") == 0
        assert _delta(before, after, "requests_total") == 3
        assert _delta(before, after, "tokens_generated_total") == 72
        assert (res[0].n_prompt_decoded, res[0].n_prompt_cached) == (n_prompt, 0)
        assert [(r.n_prompt_decoded, r.n_prompt_cached) for r in res[1:]] == [(0, n_prompt)] * 2
        assert len({r.seq_id for r in reqs}) == 3
        # the last sampled token is never decoded: the lead's cache holds the prompt and 23 tokens
        _assert_only_idle_caches(eng, reqs[0].seq_id, n_prompt + 23)

        # again, warm: the lead reuses a cached prefix (counted once) and the copies are made from it
        eng.submit(PROMPT, max_tokens=24, ignore_eos=True).wait(60)
        before = eng.stats()
        res = [r.wait(120) for r in eng.submit_n(PROMPT, 3, max_tokens=24, ignore_eos=True)]
        after = _stats_after_step(eng)
        assert res[0].tokens == res[1].tokens == res[2].tokens
        assert _same_or_near_tie(single, PROMPT, ref, res[0].tokens)
        assert res[0].n_prompt_cached == n_prompt - 1 and res[0].n_prompt_decoded == 1
        assert _delta(before, after, "prompt_tokens_cached_total") == n_prompt - 1
        assert _delta(before, after, "step_prompt_tokens_total") == 1


@UNIFIED
def test_seeded_choices_differ_and_are_reproducible(model, single, kv_unified):
    sp = SamplingParams(temperature=1.2, seed=7)
    with _engine(model, kv_unified) as eng:
        # cache_prompt=False: every run decodes the whole prompt, the same batch, the same logits
        runs = [[r.wait(120).tokens for r in eng.submit_n(PROMPT, 3, max_tokens=24, sampling=sp, cache_prompt=False)]
                for _ in range(2)]
        assert runs[0] == runs[1]                           # reproducible
        assert len({tuple(t) for t in runs[0]}) == 3        # choice i does not repeat choice 0's draws
        # choice i samples as a lone request seeded seed + i would (SamplingParams.for_choice)
        assert [sp.for_choice(i).seed for i in range(3)] == [7, 8, 9]
        for i, tokens in enumerate(runs[0]):
            alone = eng.submit(PROMPT, max_tokens=24, sampling=sp.for_choice(i), cache_prompt=False).wait(60).tokens
            assert alone[0] == tokens[0]                    # the same logits row, the same draw
    # without a seed every chain is seeded at random; the parameters are left as they were
    assert SamplingParams(temperature=1.0).for_choice(2).seed is None
    assert SamplingParams(seed=0xFFFFFFFE).for_choice(3).seed == 2  # never LLAMA_DEFAULT_SEED (random)


def test_n_out_of_range_is_refused_at_submit(model):
    with _engine(model, True, max_queue=1) as eng:
        for bad in (0, -1, 5, True, 1.5, "2"):
            with pytest.raises(ConfigError, match=rf"n={bad!r} is out of range.*n_parallel=4"):
                eng.submit_n(PROMPT, bad, max_tokens=4)
        with pytest.raises(ConfigError, match="max_tokens"):
            eng.submit_n(PROMPT, 2, max_tokens=-1)
        # the group counts as n requests against n_parallel + max_queue (5)
        a = eng.submit_n(PROMPT, 4, max_tokens=200, ignore_eos=True)
        with pytest.raises(QueueFullError, match=r"4 requests unfinished \+ 2 choices"):
            eng.submit_n(PROMPT, 2, max_tokens=4)
        b = eng.submit(PROMPT, max_tokens=4)
        for r in a:
            r.cancel()
        assert [r.wait(60).stop_reason for r in a] == ["cancelled"] * 4
        assert b.wait(60).n_generated == 4
        assert eng.submit_n(PROMPT, 1, max_tokens=3)[0].wait(60).n_generated == 3


def test_a_group_that_can_never_fit_is_refused(model):
    with BatchedEngine(EngineConfig(n_ctx=256, n_parallel=4), model=model) as eng:
        long = [2] + [random.Random(1).randrange(1000, 20000) for _ in range(253)]
        assert eng.submit(long, max_tokens=1).wait(60).n_generated == 1  # alone it fits
        with pytest.raises(ContextFullError, match=r"n=4 choices of a prompt of 254 tokens need at least 258 cells"):
            eng.submit_n(long, 4, max_tokens=1)


@UNIFIED
def test_cancelling_one_choice_frees_only_its_cells(model, single, kv_unified):
    ref = _alone(single, PROMPT, 32, ignore_eos=True)
    with _engine(model, kv_unified) as eng:
        reqs = eng.submit_n(PROMPT, 3, max_tokens=32, ignore_eos=True)
        for piece in reqs[1]:
            if len(reqs[1].token_ids) >= 3:
                reqs[1].cancel()
        res = [r.wait(120) for r in reqs]
        assert [r.stop_reason for r in res] == ["max_tokens", "cancelled", "max_tokens"]
        assert 3 <= res[1].n_generated < 32 and res[1].tokens == res[0].tokens[:res[1].n_generated]
        assert res[0].tokens == res[2].tokens
        assert _same_or_near_tie(single, PROMPT, ref, res[0].tokens)
        assert eng.seq_positions()[reqs[1].seq_id] == (-1, -1)
        _assert_only_idle_caches(eng, reqs[0].seq_id, len(single.model.tokenize_prompt(PROMPT)) + 31)


@UNIFIED
def test_cancelling_the_lead_mid_prompt_hands_the_prompt_to_the_next_choice(model, single, kv_unified):
    prompt = " ".join(random.Random(5).choice(WORDS) for _ in range(300))
    n_prompt = len(single.model.tokenize_prompt(prompt))
    with _engine(model, kv_unified, n_ctx=2048, n_batch=32, n_ubatch=32) as eng:
        # the reference: the same prompt alone, decoded in the same 32-token chunks
        ref = eng.submit(prompt, max_tokens=12, ignore_eos=True, cache_prompt=False).wait(60).tokens
        before = eng.stats()
        reqs = eng.submit_n(prompt, 3, max_tokens=12, ignore_eos=True)
        lead = reqs[0]
        cut = []

        def cancel_mid_prompt() -> bool:   # on the engine thread, between two steps
            if lead._slot is not None and 0 < lead._pos < lead.n_prompt:
                cut.append(lead._pos)
                lead.cancel()
            return bool(cut) or lead.done or bool(lead.token_ids)

        while not eng._call(cancel_mid_prompt):
            time.sleep(0.001)
        assert cut, "the lead's prompt ended before it could be cancelled mid-way"
        res = [r.wait(120) for r in reqs]
        after = _stats_after_step(eng)
        assert res[0].stop_reason == "cancelled" and res[0].tokens == []
        assert res[1].stop_reason == res[2].stop_reason == "max_tokens"
        assert res[1].tokens == res[2].tokens == ref
        # choice 1 took the lead's slot and what it had decoded; the prompt was still decoded once
        assert reqs[1].seq_id == lead.seq_id
        assert res[1].n_prompt_cached == cut[0] and res[1].n_prompt_decoded == n_prompt - cut[0]
        assert res[2].n_prompt_cached == n_prompt
        assert _delta(before, after, "step_prompt_tokens_total") == n_prompt
        _assert_only_idle_caches(eng, reqs[1].seq_id, n_prompt + 11)


def test_a_queued_group_waits_whole_and_a_cancelled_lead_passes_the_place_on(model, single):
    ref = _alone(single, PROMPT, 8)
    with BatchedEngine(EngineConfig(n_ctx=1024, n_parallel=2), model=model) as eng:
        blocker = eng.submit("The capital of France is", max_tokens=400, ignore_eos=True)
        while not blocker.token_ids:
            time.sleep(0.005)
        reqs = eng.submit_n(PROMPT, 2, max_tokens=8)
        time.sleep(0.2)
        s = eng.stats()
        assert (s["active"], s["queued"]) == (1, 2)       # one slot is free, the group needs two
        assert reqs[0].seq_id is None and reqs[1].seq_id is None
        reqs[0].cancel()
        assert reqs[0].wait(30).stop_reason == "cancelled"
        res = reqs[1].wait(120)                           # now a group of one: it starts in the free slot
        assert res.stop_reason in ("max_tokens", "eog")
        assert _same_or_near_tie(single, PROMPT, ref[:len(res.tokens)], res.tokens)
        assert res.n_prompt_decoded == len(single.model.tokenize_prompt(PROMPT))
        assert not blocker.done
        blocker.cancel()
        assert blocker.wait(30).stop_reason == "cancelled"
        s = eng.stats()
        assert (s["active"], s["queued"], s["kv_cells_reserved"]) == (0, 0, 0)


def test_a_long_prompt_group_shares_the_pool(model):
    """Unified KV: a prompt longer than the share is reserved once. 4 copies of it would need 4 x 300
    cells and could never be admitted; shared, the group runs in 512: each choice starts with an equal
    part of the 212 cells beside the prompt ((512 - 300) // 4 = 53) and grows into the cells of those that
    end. No decode fails for want of cells (that would end a choice with 'error')."""
    prompt = [2] + [random.Random(2).randrange(1000, 20000) for _ in range(299)]
    with BatchedEngine(EngineConfig(n_ctx=512, n_parallel=4), model=model) as eng:
        reqs = eng.submit_n(prompt, 4, max_tokens=100, ignore_eos=True)
        peak = 0
        while not all(r.done for r in reqs):
            peak = max(peak, eng.stats()["kv_cells_reserved"])
            time.sleep(0.02)
        res = [r.wait(300) for r in reqs]
        reasons = [r.stop_reason for r in res]
        assert set(reasons) <= {"max_tokens", "context_full"} and "context_full" in reasons, reasons
        assert 300 < peak <= 512
        assert min(r.n_generated for r in res) >= 53 and sum(r.n_generated for r in res) > 4 * 53
        s = _stats_after_step(eng)
        assert s["kv_cells_reserved"] == 0 and s["kv_cells_used"] == s["kv_cells_cached"]


def test_split_streams_restore_waits_for_a_pending_copy(model, single, tmp_path):
    """Split KV copies a stream at the next decode. A group that ends in the step its prompt finished
    leaves its copies pending; a saved session restored into one of those slots must not be overwritten
    by them (the engine applies them first)."""
    other = "The history of science is a story about"
    ref = _alone(single, other + " music", 16)
    with _engine(model, False) as eng:
        eng.submit(other, max_tokens=1).wait(60)
        src = next(s["id"] for s in eng.slots() if s["n_cached"])
        eng.save_sequence(src, tmp_path / "other.bin")
        eng.erase_sequence(src)
        reqs = eng.submit_n(PROMPT, 2, max_tokens=1)
        assert [r.wait(60).n_generated for r in reqs] == [1, 1]
        assert eng._call(lambda: set(eng._core.kv.copies_pending)) == {reqs[0].seq_id, reqs[1].seq_id}
        eng.restore_sequence(reqs[1].seq_id, tmp_path / "other.bin")
        assert eng._call(lambda: set(eng._core.kv.copies_pending)) == set()
        res = eng.submit(other + " music", max_tokens=16).wait(60)
        assert res.n_prompt_cached > 0 and _same_or_near_tie(single, other + " music", ref, res.tokens)


def test_choices_sample_on_the_cpu_beside_a_request_sampled_on_the_device(model, single):
    """With backend sampling a choice still reads its first token from the lead's logits row, so a group
    samples on the CPU (counted per choice), in the same batches as a request whose chain runs on the device."""
    ref = _alone(single, PROMPT, 16, ignore_eos=True)
    with BatchedEngine(EngineConfig(n_ctx=1024, n_parallel=4, backend_sampling=True), model=model) as eng:
        other = eng.submit("The capital of France is", max_tokens=40, ignore_eos=True, cache_prompt=False)
        reqs = eng.submit_n(PROMPT, 3, max_tokens=16, ignore_eos=True)
        res = [r.wait(120) for r in reqs]
        assert other.wait(120).n_generated == 40
        s = _stats_after_step(eng)
        assert (s["backend_sampling_requests_total"], s["cpu_sampling_requests_total"]) == (1, 3)
        assert res[0].tokens == res[1].tokens == res[2].tokens
        assert _same_or_near_tie(single, PROMPT, ref, res[0].tokens)


def test_close_ends_every_choice_running_waiting_or_queued(model):
    eng = BatchedEngine(EngineConfig(n_ctx=2048, n_parallel=3), model=model, max_queue=4)
    long_prompt = " ".join(random.Random(4).choice(WORDS) for _ in range(600))
    running = eng.submit_n(PROMPT, 2, max_tokens=400, ignore_eos=True)
    prefilling = eng.submit(long_prompt, max_tokens=200)
    queued = eng.submit_n(long_prompt, 3, max_tokens=8)
    while not running[1].token_ids:
        time.sleep(0.005)
    t0 = time.monotonic()
    eng.close()
    assert time.monotonic() - t0 < 5.0
    assert all(r.done and r.result.stop_reason == "cancelled" for r in running + [prefilling] + queued)
    assert all(r.seq_id is None for r in queued)
    assert not model.closed
