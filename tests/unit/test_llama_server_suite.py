"""benchmarks/llama_server_suite.py's translation of llama-server's command line into pyllm serve's flags
(no model, no server): every flag it emits is one pyllm serve takes, and a flag it does not know reaches
pyllm, whose parser refuses it instead of dropping it."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from pyllm.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
MODEL = "/models/local.gguf"


def _load():
    spec = importlib.util.spec_from_file_location("pyllm_llama_server_suite", ROOT / "benchmarks" / "llama_server_suite.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


suite = _load()

# What the suite's utils.py passes for its tinyllama2 preset (tools/server/tests/utils.py at the pin).
PRESET = ["--port", "8080", "--temp", "0.8", "--seed", "42", "--host", "127.0.0.1", "--offline",
          "--hf-repo", "ggml-org/test-model-stories260K", "--batch-size", "32", "--no-slots", "--alias", "tinyllama-2",
          "--ctx-size", "512", "--parallel", "2", "--n-predict", "64", "--no-jinja"]


def _serve_args(argv):
    return build_parser().parse_args(["serve", *argv])


def test_preset_translates_to_flags_pyllm_serve_takes():
    out, notes = suite.pyllm_argv(PRESET, MODEL)
    assert "--hf-repo" not in out and out[out.index("-m") + 1] == MODEL
    args = _serve_args(out)   # argparse exits on any flag pyllm serve lacks
    assert (args.port, args.temp, args.seed, args.n_batch, args.n_ctx, args.n_parallel, args.n_predict) == \
        (8080, 0.8, "42", "32", "512", "2", 64)
    assert args.slots is False and args.jinja is False and args.offline and args.alias == ["tinyllama-2"]
    # llama-server's defaults where pyllm's differ: metrics off, a split KV with an explicit -np, CORS for any origin
    assert args.metrics is False and args.kv_unified == "0" and args.cors_origins == "*" and args.any_model
    assert any("--no-metrics" in n for n in notes) and any("--hf-repo" in n for n in notes)


def test_every_translated_flag_exists_in_pyllm_serve():
    for flag, (target, n) in suite.FLAGS.items():
        argv = [flag] + (["1"] if n else [])
        out, _ = suite.pyllm_argv(argv, MODEL)
        value = {"--reasoning-format": "none", "--reasoning": "off", "--cors-origins": "*", "-fa": "on",
                 "-ctk": "q8_0", "-ctv": "q8_0", "--host": "127.0.0.1", "-m": MODEL, "--alias": "x", "--tags": "x",
                 "--chat-template": "chatml", "--api-key": "k"}.get(target)
        if value is not None:
            out[out.index(target) + 1] = value
        _serve_args(out)


@pytest.mark.parametrize("flag", [["--lora", "a.gguf"], ["--context-shift"],
                                  ["--embedding"], ["--spec-type", "ngram"], ["--media-path", "../tools"]])
def test_flags_pyllm_cannot_honour_reach_it_and_are_refused(flag, capsys):
    out, _ = suite.pyllm_argv(PRESET + flag, MODEL)
    i = out.index(flag[0])
    assert out[i:i + len(flag)] == flag   # passed on as given
    with pytest.raises(SystemExit) as exc:
        _serve_args(out)
    assert exc.value.code == 2 and flag[0] in capsys.readouterr().err


def test_router_mode_and_defaults_are_said():
    out, notes = suite.pyllm_argv(["--port", "1"], MODEL)
    args = _serve_args(out)
    assert args.model_path == MODEL and args.n_parallel == "4" and args.kv_unified == "1" and args.n_ctx == "0"
    assert any("router" in n for n in notes)


def test_llama_server_gets_its_own_flags_and_the_local_model():
    out = suite.llama_server_argv(PRESET + ["--hf-file", "x.gguf", "--slot-save-path", "/tmp"], MODEL)
    assert out.count("--model") == 1 and out[out.index("--model") + 1] == MODEL
    assert "--hf-repo" not in out and "--hf-file" not in out and out[-2:] == ["--slot-save-path", "/tmp"]


def test_junit_counts_per_file(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text('<testsuites><testsuite>'
                   '<testcase classname="unit.test_basic" name="test_a"/>'
                   '<testcase classname="unit.test_basic" name="test_b"><failure message="assert 1 == 2"/></testcase>'
                   '<testcase classname="unit.test_basic" name="test_c"><skipped/></testcase>'
                   '<testcase classname="unit.test_tokenize" name="test_d"><error message="boom"/></testcase>'
                   '</testsuite></testsuites>')
    r = suite.parse_junit(xml)
    assert r["files"] == {"test_basic": {"passed": 1, "failed": 1, "skipped": 1},
                          "test_tokenize": {"passed": 0, "failed": 1, "skipped": 0}}
    assert [f["id"] for f in r["failing"]] == ["unit/test_basic.py::test_b", "unit/test_tokenize.py::test_d"]
