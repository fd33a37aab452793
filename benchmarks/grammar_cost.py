#!/usr/bin/env python3
"""What a JSON-schema grammar costs in decode speed: pyllm serve against llama-server, same request, same build.

Starts both servers on the same model and flags (llama-server built from the pinned tree into
build/native, as serve_load.py does), then, round after round (the order alternating), sends each the
same native /completion request three ways: plain, with a JSON-schema grammar (``json_schema``), and with
``response_format: json_object`` through /v1/chat/completions, greedy, ``ignore_eos`` off. The speed is
each server's own ``timings.predicted_per_second`` (decode tokens per second, the first token excluded,
as llama-server counts it). Prints the medians per server and mode and the grammar/plain ratio of each.
A benchmark, not a test: it never fails on noise. Run it alone on a quiet machine.

    python3 benchmarks/grammar_cost.py                       # default model, 5 rounds
    python3 benchmarks/grammar_cost.py --rounds 9 -n 256 --out bench-out/grammar
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import DEFAULT_BUILD_DIR, build_native  # noqa: E402
from serve_load import PYLLM_CLI, ServerProcess  # noqa: E402

# A nested, realistic schema: the kind agent pipelines send.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string"},
        "address": {"type": "object", "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                                                      "zip": {"type": "string"}},
                    "required": ["street", "city"]},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "address", "tags"],
}
PROMPT = "Here is a JSON record describing a customer of the shop, with name, age, email, address and tags:\n"
MODES = ("plain", "json_schema", "json_object")


def request(url: str, mode: str, n: int) -> float:
    import httpx

    if mode == "json_object":
        body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": n, "temperature": 0,
                "response_format": {"type": "json_object"}}
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=600)
    else:
        body = {"prompt": PROMPT, "n_predict": n, "temperature": 0, "cache_prompt": False}
        if mode == "json_schema":
            body["json_schema"] = SCHEMA
        r = httpx.post(url + "/completion", json=body, timeout=600)
    r.raise_for_status()
    t = r.json()["timings"]
    return float(t["predicted_per_second"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-m", "--model", help="GGUF model (default: pyllm's default model)")
    ap.add_argument("-n", type=int, default=128, help="tokens to generate per request")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("-t", "--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--build-dir", type=Path, default=DEFAULT_BUILD_DIR)
    ap.add_argument("--llama-server", type=Path, help="use this llama-server instead of building one")
    ap.add_argument("--out", type=Path, help="write results.json here")
    args = ap.parse_args()
    if args.model is None:
        from pyllm import default_model

        args.model = str(default_model.path())
    args.model = str(Path(args.model).resolve())
    llama_server = (args.llama_server or build_native(args.build_dir, ("llama-server",))["llama-server"]).resolve()
    common = ["-m", args.model, "-np", "1", "-c", "2048", "-t", str(args.threads), "-fa", "on", "--host", "127.0.0.1"]
    logs = (args.out or Path("build/grammar_cost")).resolve()
    servers = {
        "pyllm": ServerProcess("pyllm", lambda port: [*PYLLM_CLI, "serve", *common, "--port", str(port)],
                               logs / "pyllm.log"),
        "llama-server": ServerProcess("llama-server", lambda port: [str(llama_server), *common, "--port", str(port),
                                                                    "--no-webui", "--jinja"], logs / "llama-server.log"),
    }
    speeds: dict = {s: {m: [] for m in MODES} for s in servers}
    try:
        for s in servers.values():
            s.start()
        for name, s in servers.items():   # warm-up
            for mode in MODES:
                request(s.url, mode, 8)
        for rnd in range(args.rounds):
            order = list(servers) if rnd % 2 == 0 else list(reversed(servers))
            for name in order:
                for mode in MODES:
                    speeds[name][mode].append(request(servers[name].url, mode, args.n))
    finally:
        for s in servers.values():
            s.stop()
    print(f"decode tokens/s (median of {args.rounds} rounds, n={args.n}, greedy, {Path(args.model).name}, "
          f"{args.threads} threads)")
    print("| server | plain | json_schema | json_object (chat) | json_schema / plain | json_object / plain |")
    print("|---|---:|---:|---:|---:|---:|")
    med = {s: {m: statistics.median(v) for m, v in speeds[s].items()} for s in speeds}
    for s in servers:
        m = med[s]
        print(f"| {s} | {m['plain']:.1f} | {m['json_schema']:.1f} | {m['json_object']:.1f} | "
              f"{m['json_schema'] / m['plain']:.3f} | {m['json_object'] / m['plain']:.3f} |")
    print(f"| pyllm / llama-server | {med['pyllm']['plain'] / med['llama-server']['plain']:.3f} | "
          f"{med['pyllm']['json_schema'] / med['llama-server']['json_schema']:.3f} | "
          f"{med['pyllm']['json_object'] / med['llama-server']['json_object']:.3f} | | |")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps({"speeds": speeds, "median": med}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
