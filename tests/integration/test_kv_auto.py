"""KV_CACHE_TYPE=auto: the highest-fidelity pair whose context fits, by pyllm plan's own measurements."""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

import pytest

from pyllm.config import EngineConfig
from pyllm.context import Context
from pyllm.errors import KVCacheConfigError
from pyllm.model import Model
from pyllm.plan import AUTO_KV_PAIRS, FREE_MEMORY_HOOK_VAR, choose_kv_types, make_plan, resolve_kv_auto

CLI = [sys.executable, "-c", "import sys; from pyllm.cli import main; sys.exit(main())"]
N_CTX = 8192


@pytest.fixture(scope="module")
def totals(default_model_path) -> dict:
    """pyllm plan's total (weights + KV + compute) of each pair auto tries, at N_CTX."""
    plan = make_plan(str(default_model_path), pairs=AUTO_KV_PAIRS, n_ctx=N_CTX, memory="1GiB")
    return {(r.type_k, r.type_v): r.total_bytes for r in plan.rows}


def _expected(totals: dict, budget: int, pairs=AUTO_KV_PAIRS):
    return next((p for p in pairs if totals[p] <= budget), None)


def test_auto_picks_exactly_what_plan_says_fits(default_model_path, totals):
    values = sorted(set(totals.values()))
    budgets = sorted({b for t in values for b in (t - 1, t)} | {values[-1] + 2**30})
    seen = set()
    for budget in budgets:
        want = _expected(totals, budget)
        if want is None:
            with pytest.raises(KVCacheConfigError, match=r"(?s)no K/V pair fits n_ctx=8,192 .*\| type_k \| type_v \|"):
                choose_kv_types(str(default_model_path), n_ctx=N_CTX, free_memory=budget)
            continue
        c = choose_kv_types(str(default_model_path), n_ctx=N_CTX, free_memory=budget)
        assert (c.type_k, c.type_v) == want, (budget, c.message())
        assert c.total_bytes == totals[want] <= budget and c.n_ctx == N_CTX
        # every pair passed over was a higher-fidelity one that plan says does not fit
        assert [(k, v) for k, v, _ in c.tried] == list(AUTO_KV_PAIRS[:AUTO_KV_PAIRS.index(want)])
        assert all(totals[(k, v)] > budget for k, v, _ in c.tried)
        seen.add(want)
    assert seen == set(AUTO_KV_PAIRS)   # the budgets walked the whole ladder


def test_the_log_line_says_what_and_why(default_model_path, totals, caplog):
    budget = totals[("q8_0", "q8_0")]
    cfg = EngineConfig(model_path=str(default_model_path), n_ctx=N_CTX, kv_cache_type_k="auto",
                       kv_cache_type_v="auto")
    with caplog.at_level(logging.INFO, logger="pyllm"):
        resolved, choice = resolve_kv_auto(cfg, model_path=str(default_model_path), n_gpu_layers=0,
                                           free_memory=budget)
    assert (resolved.kv_cache_type_k, resolved.kv_cache_type_v, resolved.kv_auto) == ("q8_0", "q8_0", False)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("KV cache type auto")]
    assert len(lines) == 1
    f16 = totals[("f16", "f16")] / 2**20
    assert "KV cache type auto: K q8_0 / V q8_0 for n_ctx=8,192" in lines[0]
    assert f"K f16 / V f16 would need {f16:,.2f} MiB" in lines[0] and f"{budget / 2**20:,.2f} MiB free" in lines[0]
    same, none = resolve_kv_auto(resolved, model_path=str(default_model_path), n_gpu_layers=0)
    assert same is resolved and none is None


def test_n_ctx_0_is_the_training_context_and_both_sides_are_named(default_model_path, caplog):
    cfg = EngineConfig(model_path=str(default_model_path), n_ctx=0, kv_cache_type_k="auto", kv_cache_type_v="auto")
    with caplog.at_level(logging.INFO, logger="pyllm"):
        resolved, choice = resolve_kv_auto(cfg, model_path=str(default_model_path), n_gpu_layers=0,
                                           free_memory=2**40)
    assert choice.n_ctx == 32768 and (resolved.kv_cache_type_k, resolved.kv_cache_type_v) == ("f16", "f16")
    assert any("K f16 / V f16 for n_ctx=32,768" in r.getMessage() and "n_ctx=0: the training context"
               in r.getMessage() for r in caplog.records)


def test_flash_attention_off_keeps_v_unquantized(default_model_path):
    plan = make_plan(str(default_model_path), pairs=[("f16", "f16"), ("q8_0", "f16"), ("q4_0", "f16")],
                     n_ctx=N_CTX, memory="1GiB", flash_attn="off")
    t = {(r.type_k, r.type_v): r.total_bytes for r in plan.rows}
    c = choose_kv_types(str(default_model_path), n_ctx=N_CTX, flash_attn="off", free_memory=t[("q8_0", "f16")])
    assert (c.type_k, c.type_v) == ("q8_0", "f16")


def test_one_side_given_the_other_auto(default_model_path, totals):
    c = choose_kv_types(str(default_model_path), type_k="q8_0", type_v="auto", n_ctx=N_CTX,
                        free_memory=totals[("q8_0", "q4_0")])
    assert (c.type_k, c.type_v) == ("q8_0", "q4_0")
    assert [(k, v) for k, v, _ in c.tried] == [("q8_0", "f16"), ("q8_0", "q8_0")]


def test_parallel_sequences_are_measured_as_serve_creates_them(default_model_path):
    plan = make_plan(str(default_model_path), pairs=AUTO_KV_PAIRS, n_ctx=N_CTX, memory="1GiB", n_parallel=4,
                     kv_unified=False)
    t = {(r.type_k, r.type_v): r.total_bytes for r in plan.rows}
    c = choose_kv_types(str(default_model_path), n_ctx=N_CTX, n_parallel=4, kv_unified=False,
                        free_memory=t[("q4_0", "q4_0")])
    assert (c.type_k, c.type_v, c.total_bytes) == ("q4_0", "q4_0", t[("q4_0", "q4_0")])


def test_mla_models_never_get_a_mixed_pair(mla_model_path):
    plan = make_plan(str(mla_model_path), pairs=[("f16", "f16"), ("q8_0", "q8_0")], n_ctx=2048, memory="1GiB")
    t = {(r.type_k, r.type_v): r.total_bytes for r in plan.rows}
    c = choose_kv_types(str(mla_model_path), n_ctx=2048, free_memory=t[("q8_0", "q8_0")])
    assert (c.type_k, c.type_v) == ("q8_0", "q8_0")
    ruled = {(k, v) for k, v, why in c.tried if "requires equal K and V cache types" in why}
    assert ruled == {("f16", "q8_0")}


def test_the_real_path_reads_the_devices(default_model_path, monkeypatch):
    monkeypatch.delenv(FREE_MEMORY_HOOK_VAR, raising=False)
    c = choose_kv_types(str(default_model_path), n_ctx=4096)
    assert (c.type_k, c.type_v, c.free_source) == ("f16", "f16", "devices")   # 24 GiB: f16 fits
    (pool,) = c.pools
    with open("/proc/meminfo") as fh:
        avail = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable:"))
    assert pool.name == "host" and pool.need == c.total_bytes and abs(pool.free - avail) < 0.2 * avail


def test_the_hook_variable_and_a_bad_value(default_model_path, totals, monkeypatch):
    monkeypatch.setenv(FREE_MEMORY_HOOK_VAR, str(totals[("q4_0", "q4_0")]))
    c = choose_kv_types(str(default_model_path), n_ctx=N_CTX)
    assert (c.type_k, c.type_v) == ("q4_0", "q4_0") and FREE_MEMORY_HOOK_VAR in c.free_source
    monkeypatch.setenv(FREE_MEMORY_HOOK_VAR, "lots")
    with pytest.raises(Exception, match="'lots' is not a size"):
        choose_kv_types(str(default_model_path), n_ctx=N_CTX)


def test_a_context_is_never_created_with_auto(default_model_path):
    with Model(default_model_path) as m:
        with pytest.raises(KVCacheConfigError, match="auto chooses one K/V pair before an engine loads"):
            Context(m, n_ctx=512, type_k="auto")


def _run(args, tmp_path, **env):
    return subprocess.run(CLI + args, capture_output=True, text=True, cwd=tmp_path, timeout=600,
                          env={**os.environ, **env})


def test_generate_with_kv_cache_type_auto(default_model_path, totals, tmp_path):
    budget = totals[("q8_0", "q8_0")]
    out = _run(["generate", "-c", str(N_CTX), "-n", "2", "--temp", "0", "Hi"], tmp_path, KV_CACHE_TYPE="auto",
               MODEL_PATH=str(default_model_path), **{FREE_MEMORY_HOOK_VAR: str(budget)})
    assert out.returncode == 0, out.stderr
    assert re.search(r"KV cache type auto: K q8_0 / V q8_0 for n_ctx=8,192: .*K f16 / V f16 would need", out.stderr)
    assert "KV cache: K q8_0 / V q8_0" in out.stderr
    bad = _run(["generate", "-c", str(N_CTX), "-ctk", "auto", "-ctv", "auto", "-n", "2", "Hi"], tmp_path,
               MODEL_PATH=str(default_model_path), **{FREE_MEMORY_HOOK_VAR: "1MiB"})
    assert bad.returncode == 1 and "pyllm: error: KV cache type auto: no K/V pair fits" in bad.stderr
    assert "| q4_0 | q4_0 |" in bad.stderr and "Traceback" not in bad.stderr


def test_list_commands_compare_the_pairs_auto_tries(default_model_path, tmp_path):
    listed = _run(["plan", "--memory", "1GiB", "-c", "4096"], tmp_path, KV_CACHE_TYPE="auto",
                  MODEL_PATH=str(default_model_path))
    assert listed.returncode == 0, listed.stderr
    rows = re.findall(r"^\| (\w+) \| (\w+) \| [\d,]+ \| 4,096 \|", listed.stdout, re.M)
    assert rows == [("f16", "f16"), ("f16", "q8_0"), ("q8_0", "q8_0"), ("q8_0", "q4_0"), ("q4_0", "q4_0")]
    one = _run(["plan", "--memory", "1GiB", "-c", "4096", "-ctk", "q8_0", "-ctv", "auto", "-fa", "off"], tmp_path,
               MODEL_PATH=str(default_model_path))
    assert one.returncode == 0, one.stderr
    assert re.findall(r"^\| (\w+) \| (\w+) \| [\d,]+ \| 4,096 \|", one.stdout, re.M) == [("q8_0", "f16")]
    mixed = _run(["plan", "-ctk", "auto,q8_0"], tmp_path, MODEL_PATH=str(default_model_path))
    assert mixed.returncode == 1 and "auto chooses one K/V pair before an engine loads" in mixed.stderr


def test_serve_resolves_auto_and_checks_the_session_flags_before_loading(default_model_path, tmp_path):
    out = _run(["serve", "-c", "4096", "--port", "0"], tmp_path, KV_CACHE_TYPE="auto",
               MODEL_PATH=str(default_model_path), **{FREE_MEMORY_HOOK_VAR: "1MiB"})
    assert out.returncode == 1 and "pyllm: error: KV cache type auto: no K/V pair fits n_ctx=4,096" in out.stderr
    out = _run(["serve", "--cache-ram", "10000000", "--port", "0"], tmp_path, MODEL_PATH=str(default_model_path))
    assert out.returncode == 1
    assert re.search(r"pyllm: error: -cram=\d+ MiB is more than this machine's physical memory", out.stderr)
    out = _run(["serve", "--slot-save-path", str(tmp_path / "nope"), "--port", "0"], tmp_path,
               MODEL_PATH=str(default_model_path))
    assert out.returncode == 1 and "--slot-save-path=" in out.stderr and "does not exist" in out.stderr
