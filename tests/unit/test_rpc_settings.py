"""Split and RPC settings: parsed once (pyllm.config SETTINGS), bad values named before any native call."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from pyllm import rpc
from pyllm.config import EngineConfig
from pyllm.errors import ConfigError

HEADER = Path(__file__).resolve().parents[2] / "vendor" / "llama.cpp" / "ggml" / "include" / "ggml-rpc.h"


def test_protocol_constants_match_the_pinned_header():
    text = HEADER.read_text()
    major = int(re.search(r"RPC_PROTO_MAJOR_VERSION\s+(\d+)", text).group(1))
    minor = int(re.search(r"RPC_PROTO_MINOR_VERSION\s+(\d+)", text).group(1))
    servers = int(re.search(r"GGML_RPC_MAX_SERVERS\s+(\d+)", text).group(1))
    assert (rpc.RPC_PROTO_MAJOR_VERSION, rpc.RPC_PROTO_MINOR_VERSION, rpc.MAX_SERVERS) == (major, minor, servers)


def test_settings_from_the_environment():
    cfg = EngineConfig.from_env({"LLAMA_SPLIT_MODE": "Row", "LLAMA_TENSOR_SPLIT": "3,1", "LLAMA_MAIN_GPU": "1",
                                 "LLAMA_RPC_SERVERS": "10.0.0.2:50052, gpu-box:6000", "LLAMA_RPC_TIMEOUT": "2.5"})
    assert cfg.split_mode == "row" and cfg.tensor_split == (3.0, 1.0) and cfg.main_gpu == 1
    assert cfg.rpc_servers == ("10.0.0.2:50052", "gpu-box:6000") and cfg.rpc_timeout == 2.5


def test_defaults():
    cfg = EngineConfig()
    assert (cfg.split_mode, cfg.tensor_split, cfg.main_gpu, cfg.rpc_servers) == ("layer", None, 0, None)


@pytest.mark.parametrize("var, value, words", [
    ("LLAMA_SPLIT_MODE", "rows", "none, layer, row"),
    ("LLAMA_TENSOR_SPLIT", "3,-1", "negative"),
    ("LLAMA_TENSOR_SPLIT", "0,0", "all zeros"),
    ("LLAMA_TENSOR_SPLIT", "3,x", "not a number"),
    ("LLAMA_TENSOR_SPLIT", "1,nan", "not a number"),
    ("LLAMA_MAIN_GPU", "-1", "out of range"),
    ("LLAMA_RPC_SERVERS", "10.0.0.2", "not host:port"),
    ("LLAMA_RPC_SERVERS", "10.0.0.2:0", "out of range"),
    ("LLAMA_RPC_SERVERS", "10.0.0.2:70000", "out of range"),
    ("LLAMA_RPC_SERVERS", "10.0.0.2:http", "not an integer"),
    ("LLAMA_RPC_SERVERS", "[::1]:50052", "IPv4"),
    ("LLAMA_RPC_SERVERS", "a:1,,b:2", "empty entry"),
    ("LLAMA_RPC_SERVERS", "a:1,a:1", "twice"),
    ("LLAMA_RPC_SERVERS", "bad host:1", "not a host name"),
    ("LLAMA_RPC_TIMEOUT", "0", "out of range"),
    ("LLAMA_RPC_TIMEOUT", "soon", "not a number"),
])
def test_bad_values_name_the_variable(var, value, words):
    with pytest.raises(ConfigError) as exc:
        EngineConfig.from_env({var: value})
    assert var in str(exc.value) and words in str(exc.value)


def test_too_many_servers():
    many = ",".join(f"h{i}:1" for i in range(rpc.MAX_SERVERS + 1))
    with pytest.raises(ConfigError, match="at most 16"):
        EngineConfig(rpc_servers=many)


@pytest.mark.parametrize("argv, flag", [
    (["-sm", "diagonal"], "-sm"), (["-ts", "1,-2"], "-ts"), (["--rpc", "localhost"], "--rpc"),
    (["-mg", "x"], "-mg"), (["--rpc-timeout", "-3"], "--rpc-timeout"),
])
def test_bad_flags_name_the_flag(argv, flag, capsys):
    from pyllm.cli import main

    assert main(["generate", "hi", *argv]) == 1
    err = capsys.readouterr().err
    assert "pyllm: error:" in err and flag in err


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "::1", "example.com"])
def test_rpc_server_refuses_a_non_loopback_bind_without_allow_remote(host):
    with pytest.raises(ConfigError) as exc:
        rpc.check_bind_host(host, allow_remote=False)
    assert repr(host) in str(exc.value)


def test_rpc_server_binds_loopback_and_remote_only_when_allowed():
    assert rpc.check_bind_host("127.0.0.1", False) == "127.0.0.1"
    assert rpc.check_bind_host("localhost", False) == "127.0.0.1"
    assert rpc.check_bind_host("0.0.0.0", True) == "0.0.0.0"
