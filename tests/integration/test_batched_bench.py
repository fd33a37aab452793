"""pyllm bench --batched (llama-batched-bench's rows through the batched engine); plan -np is in test_plan.py."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pyllm.batched import BatchedEngine
from pyllm.bench import BatchedBenchParams, batched_n_kv, run_batched_bench
from pyllm.config import EngineConfig
from pyllm.errors import ConfigError, ContextFullError
from pyllm.model import Model

CLI = [sys.executable, "-c", "import sys; from pyllm.cli import main; sys.exit(main())"]


def _cli(*args, cwd):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=cwd, timeout=600)


# ---- bench --batched ----
def test_cli_batched_rows_and_fields(default_model_path, tmp_path):
    out = _cli("bench", "--batched", "-m", str(default_model_path), "-npp", "8", "-ntg", "4", "-npl", "1,2",
               "-c", "256", "-o", "json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [(r["pp"], r["tg"], r["pl"]) for r in rows] == [(8, 4, 1), (8, 4, 2)]
    for r in rows:
        assert r["skipped"] is None and r["is_pp_shared"] is False and r["kv_unified"] is False
        assert r["n_kv"] == r["pl"] * (8 + 4)                      # N_KV = B * (PP + TG)
        assert r["t_pp"] > 0 and r["t_tg"] > 0 and r["t"] == pytest.approx(r["t_pp"] + r["t_tg"])
        assert r["speed_pp"] == pytest.approx(r["pl"] * 8 / r["t_pp"])
        assert r["speed_tg"] == pytest.approx(r["pl"] * 4 / r["t_tg"])
        assert r["speed"] == pytest.approx(r["pl"] * 12 / r["t"])
        # two split streams of 256 cells (n_ctx / n_seq_max, padded to 256), as llama.cpp sizes them
        assert r["n_kv_max"] == 512 and r["type_k"] == "f16"


def test_cli_batched_markdown_is_llama_batched_bench_table(default_model_path, tmp_path):
    out = _cli("bench", "--batched", "-m", str(default_model_path), "-npp", "8", "-ntg", "2", "-npl", "2",
               "-pps", "-kvu", "-c", "256", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    header = next(line for line in lines if "N_KV" in line)
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "PP", "TG", "B", "N_KV", "T_PP s", "S_PP t/s", "T_TG s", "S_TG t/s", "T s", "S t/s"]
    row = lines[lines.index(header) + 2]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:4] == ["8", "2", "2", str(8 + 2 * 2)]           # shared prompt stored once (unified)
    assert "is_pp_shared = 1, kv_unified = 1" in out.stdout


def test_rows_over_the_context_are_left_out_as_llama_batched_bench(default_model_path):
    params = BatchedBenchParams(model_path=str(default_model_path), n_pp=[100], n_tg=[28], n_pl=[1, 2, 4],
                                kv_unified=True, n_ctx=256)
    rows = run_batched_bench(params)
    assert [r.pl for r in rows] == [1, 2]                           # 4 x 128 > 256 cells
    assert [r.n_kv for r in rows] == [128, 256]


@pytest.mark.parametrize("shared, unified, want", [(False, False, 4 * 12), (False, True, 4 * 12),
                                                   (True, True, 8 + 4 * 4), (True, False, 4 * 8 + 4 * 4)])
def test_n_kv_rule(shared, unified, want):
    assert batched_n_kv(8, 4, 4, shared, unified) == want


def test_bad_lists_are_refused(default_model_path, tmp_path):
    with pytest.raises(ConfigError, match=r"-npl=0 is out of range"):
        BatchedBenchParams(model_path=str(default_model_path), n_pl=[0])
    with pytest.raises(ConfigError, match=r"-ntg is empty"):
        BatchedBenchParams(model_path=str(default_model_path), n_tg=[])
    out = _cli("bench", "-m", str(default_model_path), "-npl", "2", cwd=tmp_path)
    assert out.returncode == 1 and "-npl applies to pyllm bench --batched only" in out.stderr


# ---- the engine hook behind it ----
@pytest.fixture(scope="module")
def model(default_model_path):
    with Model(default_model_path) as m:
        yield m


@pytest.mark.parametrize("unified", [True, False])
def test_run_together_phases_and_shared_prompt(model, unified):
    with BatchedEngine(EngineConfig(n_ctx=1024, n_parallel=3, kv_unified=unified), model=model) as eng:
        prompt = eng.tokenize("The history of the river city is")
        alone = eng.generate(prompt, max_tokens=6).tokens
        run = eng.run_together([prompt] * 3, 6, shared_prompt=True)
        assert run.prompt_ns > 0 and run.gen_ns > 0
        assert [r.tokens for r in run.results] == [alone] * 3       # copies continue the shared prompt
        assert [(r.n_prompt_decoded, r.n_prompt_cached) for r in run.results] == \
            [(len(prompt), 0)] + [(0, len(prompt))] * 2
        other = eng.tokenize("Winter garden letters")
        run = eng.run_together([prompt, other], 4)
        assert [r.stop_reason for r in run.results] == ["max_tokens"] * 2
        assert run.results[0].tokens == alone[:4]
        assert eng.stats()["active"] == 0 and eng.stats()["kv_cells_reserved"] == 0


def test_run_together_refuses_what_does_not_fit(model):
    with BatchedEngine(EngineConfig(n_ctx=512, n_parallel=2), model=model) as eng:
        with pytest.raises(ConfigError, match="number of prompts=3 is out of range"):
            eng.run_together([[2, 3]] * 3, 4)
        with pytest.raises(ContextFullError, match="do not fit in n_ctx=512"):
            eng.run_together([[2] * 300, [3] * 300], 2)
        with pytest.raises(ConfigError, match="same prompt"):
            eng.run_together([[2, 3], [2, 4]], 3, shared_prompt=True)
        # exactly full: 2 x (255 + 2 - 1) = 512 cells (the last token is sampled, never decoded)
        run = eng.run_together([[2] * 255, [3] * 255], 2)
        assert [len(r.tokens) for r in run.results] == [2, 2]
        assert eng.generate("still usable", max_tokens=2).n_generated == 2
