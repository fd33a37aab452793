"""pyllm bench on the real default model: rows, skipped combinations, output formats."""
from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import pytest

from pyllm import bench
from pyllm.config import kv_pairs
from pyllm.errors import ConfigError


@pytest.fixture(scope="module")
def rows(default_model_path):
    params = bench.BenchParams(model_path=str(default_model_path), n_prompt=[32], n_gen=[8], n_depth=[0, 64],
                               kv_pairs=kv_pairs(["f16", "q8_0"], ["q8_0"]), flash_attn=["on", "off"], repetitions=2)
    return bench.run_bench(params)


def test_matrix_order_and_names(rows):
    assert [(r.type_k, r.type_v, r.flash_attn, r.test) for r in rows][:4] == [
        ("f16", "q8_0", "on", "pp32"), ("f16", "q8_0", "on", "tg8"),
        ("f16", "q8_0", "on", "pp32 @ d64"), ("f16", "q8_0", "on", "tg8 @ d64")]
    assert len(rows) == 2 * 2 * 2 * 2


def test_runnable_rows_have_timings_and_kv_size(rows):
    ran = [r for r in rows if r.flash_attn == "on"]
    assert ran and all(r.skipped is None for r in ran)
    for r in ran:
        assert len(r.samples_ns) == 2 and all(ns > 0 for ns in r.samples_ns)
        assert r.avg_ts > 0 and r.kv_mib > 0 and r.flash_attn_effective is True
        assert r.model.startswith("gemma3") and r.n_threads >= 1


def test_quantized_v_without_flash_attention_is_a_skipped_row(rows):
    skipped = [r for r in rows if r.flash_attn == "off"]
    assert len(skipped) == 8
    assert all("requires flash attention" in r.skipped and not r.samples_ns for r in skipped)


def test_kv_size_follows_the_type(rows):
    kv = {r.type_k: r.kv_mib for r in rows if r.test == "pp32" and r.flash_attn == "on"}
    assert kv["q8_0"] < kv["f16"]


def test_formats(rows):
    md = bench.format_markdown(rows)
    assert md.splitlines()[0].startswith("| model") and "± " in md and "skipped" in md
    data = json.loads(bench.format_json(rows))
    assert data[0]["test"] == "pp32" and data[0]["avg_ts"] > 0
    table = list(csv.DictReader(io.StringIO(bench.format_csv(rows))))
    assert len(table) == len(rows) and table[0]["type_v"] == "q8_0"


def test_bad_parameters():
    with pytest.raises(ConfigError, match="-ctk='q6_k' is not a KV cache type"):
        bench.BenchParams(model_path="x", kv_pairs=[("q6_k", "f16")])
    with pytest.raises(ConfigError, match="-fa='maybe' is not valid"):
        bench.BenchParams(model_path="x", flash_attn=["maybe"])
    with pytest.raises(ConfigError, match="-r=0 is out of range"):
        bench.BenchParams(model_path="x", repetitions=0)


def test_cli_json_is_quiet_and_parses(default_model_path, tmp_path):
    out = subprocess.run([sys.executable, "-c", "import sys; from pyllm.cli import main; sys.exit(main())", "bench",
                          "-m", str(default_model_path), "-p", "16", "-n", "4", "-r", "1", "-o", "json"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    assert [r["test"] for r in json.loads(out.stdout)] == ["pp16", "tg4"]
    assert out.stderr == ""


def test_a_prompt_test_that_fills_the_context_exactly_runs(default_model_path):
    """pp512 gets n_ctx = 512 (llama-bench's sizing): the prompt takes every cell and generates nothing."""
    params = bench.BenchParams(model_path=str(default_model_path), n_prompt=[512], n_gen=[0], repetitions=1)
    (row,) = bench.run_bench(params)
    assert row.skipped is None and row.test == "pp512"
    assert len(row.samples_ns) == 1 and row.samples_ns[0] > 0
