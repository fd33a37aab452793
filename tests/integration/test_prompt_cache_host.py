"""The host-memory prompt cache (--cache-ram) in the engine: a slot's cells go to host memory before
another prompt takes the slot, and a later prompt that starts with them gets them back instead of
recomputing them; another conversation never gets them."""
from __future__ import annotations

import pytest

from pyllm.batched import BatchedEngine
from pyllm.config import EngineConfig
from pyllm.model import Model

SYSTEM = "You are a careful assistant. Answer in one short sentence, and never invent facts you do not know. "


@pytest.fixture(scope="module")
def model(default_model_path):
    with Model(default_model_path) as m:
        yield m


def _engine(model, path, cache_ram_mib):
    return BatchedEngine(EngineConfig(model_path=str(path), n_ctx=1024, n_parallel=1, cache_ram_mib=cache_ram_mib),
                         model=model)


def test_an_evicted_conversation_comes_back_from_host_memory(model, default_model_path):
    a = model.tokenize_prompt(SYSTEM + "User: What is the capital of France? Assistant:")
    b = model.tokenize_prompt(SYSTEM + "User: Name a prime number larger than ten. Assistant:")
    n_sys = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    assert n_sys >= 16 and len(a) >= 32
    a2 = a + model.tokenize(" Paris. User: And of Italy? Assistant:", add_special=False)

    with _engine(model, default_model_path, 0) as eng:          # no host tier: the device cache only
        assert eng.submit(a, max_tokens=0).wait(120).n_prompt_cached == 0
        warm = eng.submit(a2, max_tokens=12).wait(120)
        assert warm.n_prompt_cached == len(a)
        assert "prompt_cache_hits" not in eng.stats()

    with _engine(model, default_model_path, 64) as eng:
        assert eng.submit(a, max_tokens=0).wait(120).n_prompt_cached == 0
        rb = eng.submit(b, max_tokens=0).wait(120)               # takes the one slot: A goes to host memory
        assert rb.n_prompt_cached == n_sys                      # the shared system prompt only, never A's turn
        s = eng.stats()
        assert s["prompt_cache_saves"] == 1 and s["prompt_cache_entries"] == 1 and s["prompt_cache_bytes"] > 0
        ra2 = eng.submit(a2, max_tokens=12).wait(120)           # A's cells come back from host memory
        s = eng.stats()
        assert ra2.n_prompt_cached == len(a) and ra2.n_prompt_decoded == len(a2) - len(a)
        assert s["prompt_cache_restores"] == 1 and s["prompt_cache_hits"] >= 1
        assert s["prompt_cache_restored_tokens"] == len(a)
        assert ra2.tokens == warm.tokens                         # the same cells as the device cache gave
        # B's conversation was saved when A came back; it returns too, and never gets A's cells
        b2 = eng.submit(b + [b[-1]], max_tokens=2).wait(120)
        assert b2.n_prompt_cached == len(b)


def test_the_library_default_has_no_host_tier(model, default_model_path):
    with BatchedEngine(EngineConfig(model_path=str(default_model_path), n_ctx=512), model=model) as eng:
        assert "prompt_cache_bytes" not in eng.stats()
