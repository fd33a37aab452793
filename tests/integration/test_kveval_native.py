"""pyllm kv-eval against llama.cpp's own llama-perplexity, built from the same vendored tree with the same
options (benchmarks/native): on the same text and settings both must give the same perplexity, for the
f16 baseline and for a quantized pair.

f16's figure depends on the instruction set the CPU kernels were compiled for (with f16 K, the attention's
vector exp, sums and dot products are written separately for AVX-512 and AVX2), so it is compared with
llama-perplexity built and run on this machine, never with a number measured elsewhere. Slow: the first
run builds llama-perplexity (6-17 minutes on 2 cores; incremental after).
"""
from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path

import pytest

from pyllm import kveval
from pyllm.buildinfo import build_info
from pyllm.context import default_threads

ROOT = Path(__file__).resolve().parents[2]
# README's settings (-c 512, one chunk per batch), two chunks instead of ten: 510 tokens scored.
N_CTX, CHUNKS = 512, 2
THREADS = default_threads()
# llama-perplexity prints PPL with 4 decimals (rounding: at most 5e-5). Beyond that the two sides differ
# only in their log-softmax's rounding (float32 exp summed in float64 vs expf summed in double: ~1e-6
# relative, ~2e-5 at PPL 17), so one unit of the last printed digit holds them (measured on an AMD EPYC
# with AVX-512: 3e-5 for f16, 6e-6 for q8_0). A different kernel is far outside it: on these two chunks f16
# moves by 0.09 with flash attention off and by 0.13 in an AVX2-only build, and q8_0 is 0.045 from f16.
PPL_TOLERANCE = 1e-4

pytestmark = pytest.mark.slow


def _benchlib():
    spec = importlib.util.spec_from_file_location("pyllm_benchlib", ROOT / "benchmarks" / "benchlib.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cpu_features(system_info: str) -> str:
    m = re.search(r"CPU : ((?:\w+ = \d+ \| ?)+)", system_info)
    assert m, f"no CPU features in {system_info!r}"
    return m.group(1).strip()


@pytest.fixture(scope="module")
def llama_perplexity() -> Path:
    """llama.cpp's llama-perplexity, built (once; incremental) into build/native, as
    benchmarks/compare_native.py builds it: only this target, so a clean checkout builds the least."""
    benchlib = _benchlib()
    return benchlib.build_native(benchlib.DEFAULT_BUILD_DIR, ["llama-perplexity"])["llama-perplexity"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    text, _ = kveval.default_text()
    path = tmp_path_factory.mktemp("ppl") / "pydoc_topics.txt"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def report(default_model_path, text_file):
    return kveval.kv_eval(str(default_model_path), [("q8_0", "q8_0")], text=text_file.read_text(encoding="utf-8"),
                          n_ctx=N_CTX, n_chunks=CHUNKS, flash_attn="on", n_threads=THREADS, n_gpu_layers=0)


def _native_ppl(exe: Path, model: Path, text: Path, *kv: str) -> tuple[float, str]:
    cmd = [str(exe), "-m", str(model), "-f", str(text), "-c", str(N_CTX), "-b", str(N_CTX), "--chunks", str(CHUNKS),
           "-fa", "on", "-t", str(THREADS), "-ngl", "0", *kv]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", log)
    assert proc.returncode == 0 and m, f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{log[-3000:]}"
    return float(m.group(1)), log


def test_f16_perplexity_equals_llama_perplexity(llama_perplexity, default_model_path, text_file, report):
    native, log = _native_ppl(llama_perplexity, default_model_path, text_file)
    # Both binaries must be compiled for the same CPU features, or f16 may differ for that reason alone.
    assert _cpu_features(build_info()["system_info"]) == _cpu_features(log)
    assert f"calculating perplexity over {CHUNKS} chunks, n_ctx={N_CTX}, batch_size={N_CTX}, n_seq=1" in log
    assert report.n_chunks == CHUNKS and report.n_tokens_scored == CHUNKS * (N_CTX - 1 - N_CTX // 2)
    base = report.baseline
    assert (base.type_k, base.type_v) == ("f16", "f16")
    assert base.ppl == pytest.approx(native, abs=PPL_TOLERANCE)


def test_q8_0_perplexity_equals_llama_perplexity(llama_perplexity, default_model_path, text_file, report):
    native, _ = _native_ppl(llama_perplexity, default_model_path, text_file, "-ctk", "q8_0", "-ctv", "q8_0")
    q8 = report.results[1]
    assert (q8.type_k, q8.type_v) == ("q8_0", "q8_0")
    assert q8.ppl == pytest.approx(native, abs=PPL_TOLERANCE)
    assert q8.ppl != pytest.approx(report.baseline.ppl, abs=PPL_TOLERANCE)  # the pairs are told apart
