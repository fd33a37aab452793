"""One source of truth for settings: every command honours the environment and .env files the same way."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from pyllm.engine import Engine
from pyllm.sampling import SamplingParams

CLI = [sys.executable, "-c", "import sys; from pyllm.cli import main; sys.exit(main())"]
# Variables of the test runner's own environment that would leak into the commands under test.
_SETTINGS_VARS = ("MODEL_PATH", "KV_CACHE_TYPE", "KV_CACHE_TYPE_K", "KV_CACHE_TYPE_V", "GPU_LAYERS", "FLASH_ATTN",
                  "MAX_CONTEXT_LENGTH", "LLAMA_BATCH_SIZE", "LLAMA_UBATCH_SIZE", "LLAMA_THREADS", "PYLLM_ENV_FILE",
                  "LLAMA_ARG_REPACK")


def _run(args, cwd, **env):
    base = {k: v for k, v in os.environ.items() if k not in _SETTINGS_VARS}
    return subprocess.run(CLI + args, capture_output=True, text=True, cwd=cwd, timeout=300, env={**base, **env})


def test_plan_honours_model_path_gpu_layers_and_kv_cache_type(tmp_path, gqa_model_path):
    out = _run(["plan", "--memory", "1GiB", "--json"], tmp_path, MODEL_PATH=str(gqa_model_path), GPU_LAYERS="0",
               KV_CACHE_TYPE="q8_0", MAX_CONTEXT_LENGTH="1024")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["model_path"] == str(gqa_model_path) and plan["n_gpu_layers"] == 0
    assert [(r["type_k"], r["type_v"], r["n_ctx"]) for r in plan["rows"]] == [("q8_0", "q8_0", 1024)]


def test_bench_honours_model_path_and_kv_cache_type(tmp_path, gqa_model_path):
    out = _run(["bench", "-p", "16", "-n", "4", "-r", "1", "-o", "json"], tmp_path, MODEL_PATH=str(gqa_model_path),
               GPU_LAYERS="0", KV_CACHE_TYPE="q8_0", LLAMA_THREADS="1")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert {(r["type_k"], r["type_v"], r["n_threads"], r["n_gpu_layers"]) for r in rows} == {("q8_0", "q8_0", 1, 0)}
    assert {r["test"] for r in rows} == {"pp16", "tg4"}


def test_kv_eval_honours_the_environment_and_takes_its_own_chunk_size(tmp_path, gqa_model_path):
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    out = _run(["kv-eval", "-f", str(text), "-c", "32", "--chunks", "1", "--json"], tmp_path,
               MODEL_PATH=str(gqa_model_path), KV_CACHE_TYPE_K="q8_0", MAX_CONTEXT_LENGTH="120000")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["n_ctx"] == 32
    assert [(r["type_k"], r["type_v"]) for r in report["results"]] == [("f16", "f16"), ("q8_0", "q8_0")]


def test_env_file_on_the_command_line_loads_and_bad_values_name_it(tmp_path, gqa_model_path):
    good = tmp_path / "seed.env"
    good.write_text(f"MODEL_PATH={gqa_model_path}\nMODEL_CHAT_TEMPLATE=glm4\nKV_CACHE_TYPE=q8_0\n"
                    "MAX_CONTEXT_LENGTH=2048\nLLAMA_BATCH_SIZE=1024\nGPU_LAYERS=0\n")
    for args in (["--env-file", str(good), "plan"], ["plan", "--env-file", str(good)]):
        out = _run(args + ["--memory", "1GiB", "--json"], tmp_path)
        assert out.returncode == 0, out.stderr
        plan = json.loads(out.stdout)
        assert plan["model_path"] == str(gqa_model_path)
        assert [(r["type_k"], r["n_ctx"]) for r in plan["rows"]] == [("q8_0", 2048)]
    bad = tmp_path / "bad.env"
    bad.write_text(f"MODEL_PATH={gqa_model_path}\nGPU_LAYERS=all\n")
    out = _run(["--env-file", str(bad), "plan"], tmp_path)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert lines == [f"pyllm: error: GPU_LAYERS (from {bad})='all' is not an integer; expected an integer in "
                     "[-1, 2147483647]"], out.stderr


@pytest.mark.parametrize("command", ["generate", "bench", "plan", "kv-eval"])
def test_help_names_the_variable_behind_each_flag(tmp_path, command):
    out = _run([command, "--help"], tmp_path)
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    for var in ("MODEL_PATH", "KV_CACHE_TYPE_K", "KV_CACHE_TYPE_V", "GPU_LAYERS", "LLAMA_BATCH_SIZE"):
        assert f"[env {var}]" in text, (command, var)
    assert "PYLLM_ENV_FILE" in text


def test_llama_seed_makes_sampled_generation_reproducible(monkeypatch, default_model_path):
    monkeypatch.setenv("MODEL_PATH", str(default_model_path))
    monkeypatch.setenv("LLAMA_SEED", "7")
    monkeypatch.setenv("MAX_CONTEXT_LENGTH", "512")
    prompt, sampling = "Once upon a time", SamplingParams(temperature=0.8)
    with Engine() as engine:
        first = engine.generate(prompt, max_tokens=24, sampling=sampling)
        engine.reset()
        second = engine.generate(prompt, max_tokens=24, sampling=sampling)
        other = engine.generate(prompt, max_tokens=24, sampling=SamplingParams(temperature=0.8, seed=8))
    assert first.tokens == second.tokens and first.n_generated == 24
    assert other.tokens != first.tokens  # the request's own seed still wins


def test_a_context_below_llama_cpps_256_cells_is_an_error_naming_flag_and_variable(tmp_path, default_model_path):
    # llama.cpp turned -c 4 into 256 cells without a word.
    expected = ["pyllm: error: n_ctx=4 is below 256, the smallest context llama.cpp creates (it allocates the KV cache "
                "in blocks of 256 cells); expected n_ctx (-c, MAX_CONTEXT_LENGTH) >= 256, or 0 for the model's "
                "training context"]
    for args, env in ((["-c", "4"], {}), ([], {"MAX_CONTEXT_LENGTH": "4"})):
        out = _run(["generate", "hi", "-n", "1", *args], tmp_path, MODEL_PATH=str(default_model_path), **env)
        assert out.returncode == 1 and out.stderr.strip().splitlines() == expected, out.stderr


def test_a_context_past_the_training_context_is_a_warning_naming_both(tmp_path, default_model_path):
    # llama.cpp warns "n_ctx_seq > n_ctx_train", but the CLI keeps llama.cpp's own lines quiet.
    out = _run(["generate", "hi", "-n", "1"], tmp_path, MODEL_PATH=str(default_model_path),
               MAX_CONTEXT_LENGTH="40960")
    assert out.returncode == 0, out.stderr
    warnings = [line for line in out.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 1, out.stderr
    assert ("n_ctx=40960 is larger than the 32768 tokens model" in warnings[0]
            and "n_ctx (-c, MAX_CONTEXT_LENGTH) <= 32768" in warnings[0]), warnings


def test_gpu_layers_without_a_gpu_is_one_warning_naming_the_setting(tmp_path, default_model_path):
    from pyllm.devices import devices

    if any(d.type in ("gpu", "igpu") for d in devices()):
        pytest.skip("a GPU is visible: the layers go there")
    out = _run(["bench", "-p", "8", "-n", "2", "-r", "1", "-o", "json", "-ctk", "f16,q8_0"], tmp_path,
               MODEL_PATH=str(default_model_path), GPU_LAYERS="99")
    assert out.returncode == 0, out.stderr
    warnings = [line for line in out.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and "n_gpu_layers=99 (-ngl, GPU_LAYERS)" in warnings[0] \
        and "no GPU device is visible" in warnings[0], out.stderr  # once, though bench builds four engines
    quiet = _run(["generate", "hi", "-n", "1", "-c", "256", "-ngl", "0"], tmp_path, MODEL_PATH=str(default_model_path))
    assert quiet.returncode == 0 and "WARNING" not in quiet.stderr, quiet.stderr


def test_a_missing_model_names_model_path_the_file_and_the_env_file(tmp_path):
    from pyllm.config import EngineConfig
    from pyllm.errors import ModelLoadError

    missing = tmp_path / "models" / "gone.gguf"
    box = tmp_path / "box.env"
    box.write_text(f"MODEL_PATH={missing}\n")
    expected = f"pyllm: error: MODEL_PATH (from {box}): model file not found: {missing}"
    for command in (["generate", "hi"], ["plan"]):
        out = _run(["--env-file", str(box), *command], tmp_path)
        assert out.returncode == 1 and out.stderr.strip().splitlines() == [expected], out.stderr
    out = _run(["generate", "hi", "-m", str(missing)], tmp_path)
    assert out.stderr.strip().splitlines() == [f"pyllm: error: -m: model file not found: {missing}"], out.stderr
    with pytest.raises(ModelLoadError, match="^" + re.escape(expected.removeprefix("pyllm: error: ")) + "$"):
        Engine(EngineConfig.from_env({}, env_file=str(box)))


def test_no_repack_keeps_the_weights_as_stored(tmp_path, default_model_path):
    from pyllm.config import EngineConfig

    def repacked_bytes(env):
        cfg = EngineConfig.from_env({"MODEL_PATH": str(default_model_path), "GPU_LAYERS": "0", **env}, n_ctx=256)
        with Engine(cfg) as engine:
            return sum(r["model"] for r in engine.context.memory_breakdown() if r["name"] == "CPU_REPACK")

    if not repacked_bytes({}):
        pytest.skip("this CPU has no repacked kernels for the model's weight types")
    assert repacked_bytes({"LLAMA_ARG_REPACK": "0"}) == 0
    # llama.cpp's own load log (-vv) lists the buffers it put the weights in.
    for flags, env, repacked in ((["--no-repack"], {}, False), (["-nr"], {}, False),
                                 (["--repack"], {"LLAMA_ARG_REPACK": "0"}, True), ([], {}, True)):
        out = _run(["-vv", "generate", "hi", "-n", "1", "-c", "256", *flags], tmp_path,
                   MODEL_PATH=str(default_model_path), **env)
        assert out.returncode == 0 and ("CPU_REPACK model buffer" in out.stderr) == repacked, (flags, out.stderr)
    out = _run(["generate", "hi", "-n", "1"], tmp_path, MODEL_PATH=str(default_model_path), LLAMA_ARG_REPACK="maybe")
    assert out.stderr.strip().splitlines() == ["pyllm: error: LLAMA_ARG_REPACK='maybe' is not a boolean; expected one "
                                               "of: 1, true, yes, on, 0, false, no, off"], out.stderr
