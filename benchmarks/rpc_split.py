"""The network cost of llama.cpp's RPC split on one machine: prompt and decode throughput all-local
against the same model split over two local `pyllm rpc-server` processes (loopback TCP).

    python benchmarks/rpc_split.py [-m MODEL.gguf] [-p 512] [-n 128] [-r 3] [-t THREADS] [--json OUT]

Both runs use `pyllm bench` (llama-bench's pp/tg tests through pyllm's engine) with the same threads;
the split run offloads every layer (-ngl 99) to the two servers half and half (-ts 1,1), each server
getting THREADS CPU threads. On one machine the servers compete with the client for the same cores
and memory bandwidth, so the figure is the protocol's overhead plus that contention, not a forecast
for real remote GPUs; what it shows is the per-token round-trip cost that every split pays.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(threads: int) -> tuple[subprocess.Popen, str]:
    from pyllm import rpc

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pyllm.cli", "rpc-server", "--port", str(port), "-t", str(threads)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            rpc.probe(endpoint, timeout=2)
            return proc, endpoint
        except rpc.RPCError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.1)


def _bench(extra: list[str], args) -> list[dict]:
    cmd = [sys.executable, "-m", "pyllm.cli", "bench", "-p", str(args.p), "-n", str(args.n), "-r", str(args.r),
           "-t", str(args.t), "-o", "json", "--no-progress"] + (["-m", args.model] if args.model else []) + extra
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default=None, help="GGUF model (default: the default model)")
    ap.add_argument("-p", type=int, default=512)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-r", type=int, default=3)
    ap.add_argument("-t", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args()
    local = _bench(["-ngl", "0"], args)
    servers = [_start_server(args.t) for _ in range(2)]
    try:
        split = _bench(["--rpc", ",".join(ep for _, ep in servers), "-ngl", "99", "-ts", "1,1"], args)
    finally:
        for proc, _ in servers:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=10)
    print("| test | all-local t/s | split over 2 RPC servers t/s | ratio |")
    print("| --- | ---: | ---: | ---: |")
    for a, b in zip(local, split):
        name = a.get("test") or a.get("name")
        ta, tb = a.get("avg_ts"), b.get("avg_ts")
        ratio = f"{tb / ta:.2f}" if ta and tb else ""
        print(f"| {name} | {ta:.2f} | {tb:.2f} | {ratio} |" if ta and tb else f"| {name} | {ta} | {tb} | |")
    if args.json:
        Path(args.json).write_text(json.dumps({"local": local, "split": split}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
