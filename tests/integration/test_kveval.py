"""pyllm kv-eval on the real default model: determinism, ordering of quality, clean errors."""
from __future__ import annotations

import pytest

from pyllm import kveval
from pyllm.errors import ConfigError, KVCacheConfigError

N_CTX, CHUNKS = 128, 2


@pytest.fixture(scope="module")
def report(default_model_path):
    return kveval.kv_eval(str(default_model_path), [("f16", "f16"), ("q8_0", "q8_0"), ("q4_0", "q4_0")],
                          n_ctx=N_CTX, n_chunks=CHUNKS)


def test_shape_of_the_report(report):
    assert [(r.type_k, r.type_v) for r in report.results] == [("f16", "f16"), ("f16", "f16"), ("q8_0", "q8_0"),
                                                              ("q4_0", "q4_0")]
    assert report.n_chunks == CHUNKS and report.n_tokens_scored == CHUNKS * (N_CTX - 1 - N_CTX // 2)
    assert "pydoc_data.topics" in report.text_source
    assert all(r.count == report.n_tokens_scored for r in report.results)
    assert 1.0 < report.baseline.ppl < 1000


def test_f16_against_f16_is_exactly_the_baseline(report):
    again = report.results[1]  # evaluated in its own context
    assert again.kl_mean == 0.0 and again.kl_p99 == 0.0
    assert again.top1_agreement == 1.0
    assert again.ppl == report.baseline.ppl


def test_q8_0_is_closer_to_f16_than_q4_0(report):
    q8, q4 = report.results[2], report.results[3]
    assert 0 < q8.kl_mean < q4.kl_mean
    assert q8.top1_agreement >= q4.top1_agreement
    assert q8.kv_mib < report.baseline.kv_mib and q4.kv_mib < q8.kv_mib


def test_results_are_identical_across_runs(default_model_path, report):
    again = kveval.kv_eval(str(default_model_path), [("q8_0", "q8_0")], n_ctx=N_CTX, n_chunks=CHUNKS)
    first = report.results[2]
    assert (again.results[1].ppl, again.results[1].kl_mean, again.results[1].top1_same) == \
           (first.ppl, first.kl_mean, first.top1_same)


def test_formats(report):
    table = kveval.format_table(report)
    assert "| q4_0 | q4_0 |" in table and "top-1 agreement" in table
    assert '"baseline": "f16/f16"' in kveval.format_json(report)


def test_errors(default_model_path, tmp_path):
    with pytest.raises(ConfigError, match=r"tokenizes to \d+ tokens; at least 256"):
        kveval.kv_eval(str(default_model_path), [("q8_0", "q8_0")], text="too short", n_ctx=N_CTX)
    with pytest.raises(ConfigError, match="-ctk='q6_k' is not a KV cache type"):
        kveval.kv_eval(str(default_model_path), [("q6_k", "q6_k")], n_ctx=N_CTX)
    with pytest.raises(KVCacheConfigError, match="requires flash attention"):
        kveval.kv_eval(str(default_model_path), [("f16", "q4_0")], n_ctx=N_CTX, flash_attn="off")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        kveval.read_text_file(str(bad))
