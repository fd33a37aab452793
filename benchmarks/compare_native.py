#!/usr/bin/env python3
"""pyllm vs llama.cpp itself: the binding's overhead, measured.

Builds llama.cpp's own ``llama-bench`` (and ``llama-perplexity``) from the same vendored tree with
the same options as pyllm's extension (benchmarks/native/CMakeLists.txt), then runs ``llama-bench``
and ``pyllm bench`` alternately, round after round, on the same model and settings, and prints
pyllm/native ratios per KV type and test. A benchmark, not a test: it never fails on noise.

    python3 benchmarks/compare_native.py                      # default model, f16/q8_0/q4_0, pp512 + tg128
    python3 benchmarks/compare_native.py --rounds 5 -r 5 --kv f16,q8_0,q4_0 --out bench-out
    python3 benchmarks/compare_native.py --perplexity          # also llama-perplexity vs pyllm kv-eval (f16)

Ratios use the mean over rounds of each side's per-round mean t/s; the table also shows the
spread (min-max over rounds) so that noise is visible.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NATIVE_SRC = ROOT / "benchmarks" / "native"


def build_native(build_dir: Path) -> dict[str, Path]:
    """Configure and build llama-bench and llama-perplexity (incremental; ccache where installed)."""
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    if not (build_dir / "CMakeCache.txt").exists():
        subprocess.run(["cmake", "-S", str(NATIVE_SRC), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release", *gen],
                       check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build_dir), "--target", "llama-bench", "llama-perplexity", "-j",
                    str(os.cpu_count() or 2)], check=True, stdout=subprocess.DEVNULL)
    return {name: build_dir / "bin" / name for name in ("llama-bench", "llama-perplexity")}


def run_json(cmd: list[str]) -> list[dict]:
    # Run outside the source tree: a cwd on sys.path must not shadow the installed pyllm package.
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tempfile.gettempdir())
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    text = proc.stdout
    return json.loads(text[text.index("["):])


def test_name(row: dict) -> str:
    name = f"pp{row['n_prompt']}" if row["n_prompt"] else f"tg{row['n_gen']}"
    return name + (f" @ d{row['n_depth']}" if row.get("n_depth") else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", help="GGUF model (default: pyllm's default model)")
    ap.add_argument("--kv", default="f16,q8_0,q4_0", help="KV types (K = V), comma-separated")
    ap.add_argument("-p", default="512")
    ap.add_argument("-n", default="128")
    ap.add_argument("-d", default="0")
    ap.add_argument("-fa", default="on")
    ap.add_argument("-t", "--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("-ngl", default="99")
    ap.add_argument("-r", "--repetitions", default="5")
    ap.add_argument("--rounds", type=int, default=3, help="alternating native/pyllm rounds")
    ap.add_argument("--build-dir", type=Path, default=ROOT / "build" / "native")
    ap.add_argument("--native-bin", type=Path, help="use this llama-bench instead of building one")
    ap.add_argument("--out", type=Path, help="write native.json, pyllm.json and ratios.md here")
    args = ap.parse_args(argv)

    if args.model is None:
        from pyllm import default_model

        args.model = str(default_model.path())
    args.model = str(Path(args.model).resolve())
    llama_bench = args.native_bin or build_native(args.build_dir)["llama-bench"]
    common = ["-m", args.model, "-p", args.p, "-n", args.n, "-d", args.d, "-fa", args.fa, "-t", str(args.threads),
              "-ngl", args.ngl, "-r", args.repetitions, "-o", "json"]
    native: dict[tuple[str, str], list[float]] = {}
    ours: dict[tuple[str, str], list[float]] = {}
    raw = {"native": [], "pyllm": []}
    for rnd in range(args.rounds):
        for kv in args.kv.split(","):
            kv_args = ["-ctk", kv, "-ctv", kv]
            order = [("native", [str(llama_bench), *common, *kv_args]),
                     ("pyllm", [sys.executable, "-c", "import sys; from pyllm.cli import main; sys.exit(main())", "bench", *common, *kv_args, "--no-progress"])]
            if rnd % 2:
                order.reverse()
            for who, cmd in order:
                rows = run_json(cmd)
                raw[who].extend(rows)
                for row in rows:
                    (native if who == "native" else ours).setdefault((kv, test_name(row)), []).append(row["avg_ts"])
            print(f"round {rnd + 1}/{args.rounds} {kv}: done", file=sys.stderr)

    lines = ["| KV type | test | llama-bench t/s (min-max) | pyllm t/s (min-max) | pyllm/native |",
             "| --- | --- | ---: | ---: | ---: |"]
    for key in native:
        n, o = native[key], ours.get(key, [])
        if not o:
            continue
        ratio = statistics.fmean(o) / statistics.fmean(n)
        lines.append(f"| {key[0]} | {key[1]} | {statistics.fmean(n):.2f} ({min(n):.2f}-{max(n):.2f}) | "
                     f"{statistics.fmean(o):.2f} ({min(o):.2f}-{max(o):.2f}) | {ratio:.3f} |")
    table = "\n".join(lines)
    print(f"model: {args.model}; threads: {args.threads}; -fa {args.fa}; -r {args.repetitions}; rounds: {args.rounds}")
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "native.json").write_text(json.dumps(raw["native"], indent=1))
        (args.out / "pyllm.json").write_text(json.dumps(raw["pyllm"], indent=1))
        (args.out / "ratios.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
