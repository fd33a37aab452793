"""llama.cpp's RPC backend through pyllm: `pyllm rpc-server` processes on localhost (random free ports),
the default model split across the local CPU and the servers' devices.

llama.cpp's RPC client aborts the process when a connected server dies or stops answering (it has no
error path); those cases run in a child process, and the test checks that the child ends within a
bounded time with pyllm's message naming the server.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from pyllm import rpc
from pyllm._ffi import lib
from pyllm.config import EngineConfig
from pyllm.engine import Engine, gpu_layers_of, placement_of
from pyllm.model import Model
from pyllm.errors import ConfigError

pytestmark = pytest.mark.skipif(not lib.pyllm_build_rpc(), reason="built with PYLLM_RPC=0")

PROMPT = "The capital of France is"
N_TOKENS = 24


def _env() -> dict:
    return dict(os.environ)


# Children run outside the source tree, whose pyllm/ (no compiled module) would shadow the installed one.
CHILD_CWD = tempfile.gettempdir()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One `pyllm rpc-server` child on a free port, stopped (and reaped) by stop()."""

    def __init__(self, *extra: str) -> None:
        self.port = free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "pyllm.cli", "rpc-server", "--port", str(self.port),
                                      "--threads", "1", *extra], env=_env(), cwd=CHILD_CWD, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rpc-server exited with {self.proc.returncode}: {self.proc.stderr.read()}")
            try:
                rpc.probe(self.endpoint, timeout=2)
                return
            except rpc.RPCError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(timeout=10)
        self.proc.stderr.close()


@pytest.fixture(scope="module")
def servers():
    started = [Server(), Server()]
    yield started
    for s in started:
        s.stop()
    for s in started:
        assert s.proc.returncode is not None  # reaped: no process left behind


def _greedy(config: EngineConfig) -> tuple[list[int], object, list[str]]:
    # Without weight repacking on either side: a remote CPU device never repacks (its buffers are plain
    # CPU buffers), and repacked Q4_K layers run other kernels whose rounding differs; with repacking on
    # locally the two runs agree for ~11 tokens, then part (measured on the default model).
    placement = dataclasses.replace(placement_of(config), repack=False)
    with Model(config.model_path, n_gpu_layers=gpu_layers_of(config), placement=placement) as model, \
            Engine(config, model=model) as eng:
        res = eng.generate(PROMPT, max_tokens=N_TOKENS, ignore_eos=True)
        return list(res.tokens), eng.context.kv_cache_bytes(), list(eng.model.device_names)


@pytest.mark.parametrize("kv", ["f16", "q8_0"])
def test_split_over_cpu_and_two_servers_matches_the_local_run(servers, default_model_path, kv):
    base = dict(model_path=str(default_model_path), n_ctx=512, n_threads=1, kv_cache_type_k=kv, kv_cache_type_v=kv,
                flash_attn="on" if kv != "f16" else "auto")
    local_tokens, local_kv, _ = _greedy(EngineConfig(n_gpu_layers=0, **base))
    # 12 of the model's layers go to the two servers (-ts 1,1), the rest stay on the local CPU.
    split = EngineConfig(n_gpu_layers=12, rpc_servers=",".join(s.endpoint for s in servers), tensor_split=(1, 1), **base)
    tokens, kv_bytes, device_names = _greedy(split)
    assert tokens == local_tokens
    assert [n.split(" ")[0] for n in device_names] and all(s.endpoint in " ".join(device_names) for s in servers)
    remote = {name: b for name, b in kv_bytes.devices.items() if name.startswith("RPC")}
    assert len(remote) == 2 and all(b > 0 for b in remote.values())
    assert {s.endpoint for s in servers} == {name[name.index("[") + 1:-1] for name in remote}
    # The K/V types apply on the remote devices too: the per-device bytes add up to the local total.
    assert kv_bytes.total == local_kv.total == sum(kv_bytes.devices.values())
    assert (kv_bytes.type_k, kv_bytes.type_v) == (kv, kv)


def test_tensor_split_longer_than_the_device_list_is_refused(servers, default_model_path):
    cfg = EngineConfig(model_path=str(default_model_path), n_ctx=256, rpc_servers=servers[0].endpoint,
                       tensor_split=(1, 1, 1))
    with pytest.raises(ConfigError, match=r"-ts.*3 values.*1 device"):
        Engine(cfg)
    with pytest.raises(ConfigError, match=r"-mg.*=4 is out of range"):
        Engine(cfg.replace(tensor_split=None, main_gpu=4))


def test_a_refused_port_is_a_clear_error_naming_it(default_model_path):
    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(rpc.RPCError, match=f"127.0.0.1:{port} refused the connection"):
        Engine(EngineConfig(model_path=str(default_model_path), rpc_servers=f"127.0.0.1:{port}"))
    assert time.monotonic() - t0 < 5


def test_a_server_that_does_not_answer_is_a_clear_error_within_the_timeout(default_model_path):
    server = Server()
    try:
        server.proc.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(rpc.RPCError, match=f"{server.endpoint} accepted the connection but did not answer"):
            Engine(EngineConfig(model_path=str(default_model_path), rpc_servers=server.endpoint, rpc_timeout=1.5))
        assert time.monotonic() - t0 < 5
    finally:
        server.stop()


CHILD = textwrap.dedent("""
    import sys
    from pyllm.config import EngineConfig
    from pyllm.engine import Engine
    cfg = EngineConfig(model_path=sys.argv[1], n_ctx=4096, n_threads=1, n_gpu_layers=99, rpc_servers=sys.argv[2],
                       rpc_timeout=float(sys.argv[3]))
    with Engine(cfg) as eng:
        for i, piece in enumerate(eng.stream("Once upon a time", max_tokens=4000, ignore_eos=True)):
            if i == 2:
                print("GENERATING", flush=True)
    print("FINISHED", flush=True)
""")


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_a_server_lost_mid_generation_ends_the_process_naming_it(default_model_path, how):
    server = Server()
    try:
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(default_model_path), server.endpoint, "2"],
                                 env=_env(), cwd=CHILD_CWD, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "GENERATING"
        t0 = time.monotonic()
        if how == "kill":
            server.proc.kill()
        else:
            server.proc.send_signal(signal.SIGSTOP)   # stops answering; the socket stays open
        try:
            out, err = child.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
            pytest.fail("the client hung after its RPC server went away")
        elapsed = time.monotonic() - t0
        assert "FINISHED" not in out
        assert child.returncode == -signal.SIGABRT
        assert f"pyllm: the connection to an RPC server ({server.endpoint}) failed or was lost" in err
        assert elapsed < 15
    finally:
        server.stop()


def test_rpc_server_refuses_a_public_bind_without_allow_remote():
    r = subprocess.run([sys.executable, "-m", "pyllm.cli", "rpc-server", "--host", "0.0.0.0", "--port",
                        str(free_port())], env=_env(), cwd=CHILD_CWD, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "'0.0.0.0' is not a loopback address" in r.stderr and "--allow-remote" in r.stderr


def test_rpc_server_with_allow_remote_warns_once():
    server = Server("--host", "0.0.0.0", "--allow-remote")
    try:
        server.proc.kill()
        server.proc.wait(timeout=10)
        lines = [ln for ln in server.proc.stderr.read().splitlines() if "WARNING" in ln]
        assert len(lines) == 1 and "without authentication" in lines[0]
    finally:
        server.stop()


def test_plan_reports_the_remote_devices(servers, default_model_path):
    from pyllm import plan
    from pyllm.placement import Placement

    result = plan.make_plan(str(default_model_path), pairs=[("q8_0", "q8_0")], n_ctx=1024, memory="8GiB",
                            n_gpu_layers=99, placement=Placement(rpc_servers=(servers[0].endpoint,)))
    row = result.rows[0]
    assert row.error is None
    remote = [name for name in row.devices if servers[0].endpoint in name]
    assert remote and row.devices[remote[0]]["model"] > 0 and row.devices[remote[0]]["context"] > 0
    assert any(servers[0].endpoint in d for d in result.model_devices)
    assert "per device" in plan.format_table(result)
