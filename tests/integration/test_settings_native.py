"""Settings llama.cpp would abort on are ConfigErrors naming the flag and the variable; the rest work.

Each example builds a real engine on the default model in a subprocess, so a native abort (GGML_ASSERT,
exit 134 / SIGABRT) is seen as such instead of ending pytest.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

CHILD = r"""
import json, sys
from pyllm.config import EngineConfig
from pyllm.errors import ConfigError
kw = json.loads(sys.argv[1])
try:
    cfg = EngineConfig.from_env(n_threads=1, kv_unified=kw["kv_unified"])
    if cfg.n_parallel > 1 or kw["batched"]:
        from pyllm.batched import BatchedEngine
        with BatchedEngine(cfg) as eng:
            reqs = [eng.submit("Once upon a time", max_tokens=2) for _ in range(eng.n_parallel)]
            print(json.dumps({"ok": [str(r.wait().stop_reason) for r in reqs]}))
    else:
        from pyllm.engine import Engine
        with Engine(cfg) as eng:
            print(json.dumps({"ok": [str(eng.generate("Once upon a time", max_tokens=2).stop_reason)]}))
except ConfigError as exc:
    print(json.dumps({"config_error": str(exc)}))
"""

# The variables each setting is read from, and the flag a message must name with it.
VARS = {"n_ctx": ("MAX_CONTEXT_LENGTH", "-c"), "n_batch": ("LLAMA_BATCH_SIZE", "-b"),
        "n_ubatch": ("LLAMA_UBATCH_SIZE", "-ub"), "n_parallel": ("LLAMA_PARALLEL", "-np")}


def _run(default_model_path, values: dict, kv_unified: bool, batched: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in {var for var, _ in VARS.values()} | {"PYLLM_ENV_FILE"}}
    env.update({VARS[k][0]: str(v) for k, v in values.items()}, MODEL_PATH=str(default_model_path), GPU_LAYERS="0")
    return subprocess.run([sys.executable, "-c", CHILD, json.dumps({"kv_unified": kv_unified, "batched": batched})],
                          capture_output=True, text=True, timeout=120, env=env)


@st.composite
def small_settings(draw) -> dict:
    """Small numbers around the edges that matter: llama.cpp's 256-cell block (4 and 255 are below it, 257
    and 300 are rounded up), n_parallel against n_batch and n_ubatch, each inside and just past its bound."""
    past = lambda: draw(st.integers(0, 9)) == 0  # noqa: E731 - one time in ten, one past the bound
    n_ctx = draw(st.sampled_from([4, 255] + [256, 257, 300, 512] * 3))
    n_batch = n_ctx + 1 if past() else draw(st.one_of(st.integers(1, 8), st.integers(1, n_ctx)))
    n_ubatch = n_batch + 1 if past() else draw(st.one_of(st.integers(1, min(n_batch, 8)), st.integers(1, n_batch)))
    n_parallel = draw(st.sampled_from([1, 2, 3, 4, 8, 16]))
    return {"n_ctx": n_ctx, "n_batch": n_batch, "n_ubatch": n_ubatch, "n_parallel": n_parallel}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=small_settings(), kv_unified=st.booleans(), batched=st.booleans())
def test_any_small_settings_either_work_or_are_refused_by_name(default_model_path, values, kv_unified, batched):
    n_parallel = values["n_parallel"]
    out = _run(default_model_path, values, kv_unified, batched)
    aborted = out.returncode in (134, -signal.SIGABRT) or "GGML_ASSERT" in out.stderr
    assert not aborted and out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if "config_error" in result:
        msg = result["config_error"]
        event(f"refused: {msg.split(' is ')[0].split('=')[0]}")
        named = re.findall(r"\((-\w+), (\w+)\)", msg)
        assert named and all((var, flag) in VARS.values() for flag, var in named), msg
    else:
        event("works")
        assert len(result["ok"]) == (n_parallel if n_parallel > 1 or batched else 1)
        assert set(result["ok"]) <= {"max_tokens", "eog"}, result


def test_serve_parallel_over_the_batch_is_refused_before_llama_cpp(default_model_path, tmp_path):
    # The reported case: `pyllm serve -np 4 -b 2` ended in GGML_ASSERT(n_outputs_max <= ...), exit 134.
    cli = [sys.executable, "-c", "import sys; from pyllm.cli import main; sys.exit(main())"]
    out = subprocess.run(cli + ["serve", "-m", str(default_model_path), "-np", "4", "-b", "2", "--port", "0"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 1, out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == [
        "pyllm: error: n_parallel=4 is larger than n_batch=2; llama.cpp needs a batch row for every sequence: "
        "expected n_parallel (-np, LLAMA_PARALLEL) <= n_batch (-b, LLAMA_BATCH_SIZE)"]


def test_a_context_with_more_sequences_than_batch_rows_is_refused(default_model_path):
    from pyllm.context import Context
    from pyllm.errors import ConfigError
    from pyllm.model import Model

    with Model(default_model_path) as model:
        with pytest.raises(ConfigError, match=r"n_parallel=4 is larger than n_batch=2; .*\(-np, LLAMA_PARALLEL\)"):
            Context(model, n_ctx=256, n_batch=2, n_ubatch=2, n_seq_max=4)
        # llama.cpp caps n_batch by n_ctx (before padding it to 256 cells): 32 sequences, 16 rows
        with pytest.raises(ConfigError, match=r"n_batch=16 \(n_batch=512 capped by n_ctx=16\)"):
            Context(model, n_ctx=16, n_batch=512, n_ubatch=16, n_seq_max=32)
