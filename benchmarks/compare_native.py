#!/usr/bin/env python3
"""pyllm vs llama.cpp itself: the binding's overhead, measured.

Builds llama.cpp's own ``llama-bench`` (and ``llama-perplexity``) from the same vendored tree with
the same options as pyllm's extension (benchmarks/native/CMakeLists.txt), then runs ``llama-bench``
and ``pyllm bench`` alternately, round after round, on the same model and settings, and prints
pyllm/native ratios per KV type and test. A benchmark, not a test: it never fails on noise.

    python3 benchmarks/compare_native.py                      # default model, f16/q8_0/q4_0, pp512 + tg128
    python3 benchmarks/compare_native.py --rounds 5 -r 5 --kv f16,q8_0,q4_0 --out bench-out
    python3 benchmarks/compare_native.py --perplexity          # also llama-perplexity vs pyllm kv-eval (f16, q8_0)
    python3 benchmarks/compare_native.py --perplexity --no-speed   # only that (builds llama-perplexity alone)

Each round runs both sides back to back (the order alternates between rounds), so each round
gives one paired ratio pyllm/native; the table reports the median of the paired ratios (robust to
the noise of a shared machine), their min-max, and both sides' mean t/s.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchlib import DEFAULT_BUILD_DIR, ratio_summary
from benchlib import build_native as _build


# How the comparisons run pyllm: the installed package's CLI, in a fresh interpreter.
PYLLM_CLI = [sys.executable, "-c", "import sys; from pyllm.cli import main; sys.exit(main())"]


def build_native(build_dir: Path, targets: tuple[str, ...] = ("llama-bench", "llama-perplexity")) -> dict[str, Path]:
    """Configure and build llama.cpp's own tools (incremental; ccache where installed)."""
    return _build(build_dir, targets)


def run_json(cmd: list[str], jsonl: bool = False) -> list[dict]:
    """The rows a tool printed: one JSON array, or (``jsonl``) one JSON object per line."""
    # Run outside the source tree: a cwd on sys.path must not shadow the installed pyllm package.
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tempfile.gettempdir())
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    text = proc.stdout
    if jsonl:
        return [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    return json.loads(text[text.index("["):])


def test_name(row: dict) -> str:
    name = f"pp{row['n_prompt']}" if row["n_prompt"] else f"tg{row['n_gen']}"
    return name + (f" @ d{row['n_depth']}" if row.get("n_depth") else "")


def compare_perplexity(llama_perplexity: Path, args: argparse.Namespace) -> None:
    """Perplexity of the same text, K = V type by type: llama.cpp's llama-perplexity vs pyllm kv-eval (its
    f16 baseline and its pairs), with the CPU both ran on (f16's figure depends on the CPU's SIMD width)."""
    import re

    from pydoc_data.topics import topics

    kv_types = [t.strip() for t in args.ppl_kv.split(",") if t.strip()] or ["f16"]
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "pydoc_topics.txt"
        text.write_text("\n\n".join(topics[k] for k in sorted(topics)), encoding="utf-8")
        common = ["-m", args.model, "-f", str(text), "-c", str(args.ppl_ctx), "--chunks", str(args.ppl_chunks),
                  "-fa", args.fa, "-t", str(args.threads), "-ngl", args.ngl]
        native: dict[str, float] = {}
        features = None
        for kv in kv_types:
            proc = subprocess.run([str(llama_perplexity), *common, "-b", str(args.ppl_ctx), "-ctk", kv, "-ctv", kv],
                                  capture_output=True, text=True)
            log = proc.stdout + proc.stderr
            m = re.search(r"Final estimate: PPL = ([0-9.]+)", log)
            if not m:
                raise SystemExit(f"llama-perplexity gave no estimate:\n{proc.stderr[-2000:]}")
            native[kv] = float(m.group(1))
            features = re.search(r"CPU : ((?:\w+ = \d+ \| ?)+)", log)
        quantized = [kv for kv in kv_types if kv != "f16"] or ["f16"]
        ours = run_json_obj([*PYLLM_CLI, "kv-eval", *common, "-ctk", ",".join(quantized), "--json"])
    ppl = {r["type_k"]: r["ppl"] for r in reversed(ours["results"]) if r["type_k"] == r["type_v"]}
    print(f"machine: {cpu_name()}; llama-perplexity built for: {features.group(1).strip() if features else '?'}")
    for kv in kv_types:
        diff = 100 * (ppl[kv] / native[kv] - 1)
        print(f"perplexity ({kv}/{kv}, pydoc_data.topics, -c {args.ppl_ctx}, {args.ppl_chunks} chunks, -fa {args.fa}): "
              f"llama-perplexity {native[kv]:.4f}, pyllm kv-eval {ppl[kv]:.4f}, difference {diff:+.4f}%")


def cpu_name() -> str:
    """The CPU model as the kernel names it (Linux), else what platform knows."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} CPUs"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_json_obj(cmd: list[str]) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tempfile.gettempdir())
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


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
    ap.add_argument("--build-dir", type=Path, default=DEFAULT_BUILD_DIR)
    ap.add_argument("--native-bin", type=Path, help="use this llama-bench instead of building one")
    ap.add_argument("--out", type=Path, help="write native.json, pyllm.json and ratios.md here")
    ap.add_argument("--perplexity", action="store_true",
                    help="also compare perplexity (--ppl-kv types): llama-perplexity vs pyllm kv-eval (same text, -c, chunks)")
    ap.add_argument("--ppl-ctx", type=int, default=512)
    ap.add_argument("--ppl-chunks", type=int, default=10)
    ap.add_argument("--ppl-kv", default="f16,q8_0", help="K = V types for --perplexity, comma-separated")
    ap.add_argument("--no-speed", action="store_true", help="skip the llama-bench comparison")
    args = ap.parse_args(argv)

    if args.model is None:
        from pyllm import default_model

        args.model = str(default_model.path())
    args.model = str(Path(args.model).resolve())
    # Build only what this run uses (--perplexity --no-speed: llama-perplexity alone).
    targets = tuple(name for name, used in (("llama-bench", not args.no_speed and not args.native_bin),
                                            ("llama-perplexity", args.perplexity)) if used)
    tools = build_native(args.build_dir, targets) if targets else {}
    if args.perplexity:
        compare_perplexity(tools["llama-perplexity"], args)
    if args.no_speed:
        return 0
    llama_bench = args.native_bin or tools["llama-bench"]
    common = ["-m", args.model, "-p", args.p, "-n", args.n, "-d", args.d, "-fa", args.fa, "-t", str(args.threads),
              "-ngl", args.ngl, "-r", args.repetitions, "-o", "json"]
    native: dict[tuple[str, str], list[float]] = {}
    ours: dict[tuple[str, str], list[float]] = {}
    raw = {"native": [], "pyllm": []}
    for rnd in range(args.rounds):
        for kv in args.kv.split(","):
            kv_args = ["-ctk", kv, "-ctv", kv]
            order = [("native", [str(llama_bench), *common, *kv_args]),
                     ("pyllm", [*PYLLM_CLI, "bench", *common, *kv_args, "--no-progress"])]
            if rnd % 2:
                order.reverse()
            for who, cmd in order:
                rows = run_json(cmd)
                raw[who].extend(rows)
                for row in rows:
                    (native if who == "native" else ours).setdefault((kv, test_name(row)), []).append(row["avg_ts"])
            print(f"round {rnd + 1}/{args.rounds} {kv}: done", file=sys.stderr)
            if args.out:  # after every step: a run cut short still leaves what it measured
                write_out(args.out, raw, ratio_table(native, ours))

    table = ratio_table(native, ours)
    print(f"model: {args.model}; threads: {args.threads}; -fa {args.fa}; -r {args.repetitions}; rounds: {args.rounds}")
    print(where(raw))
    print(table)
    if args.out:
        write_out(args.out, raw, table)
    return 0


def where(raw: dict[str, list[dict]]) -> str:
    """What each side ran on, from its own JSON (llama-bench: backends, gpu_info; pyllm: backend)."""
    nat = {(r.get("backends"), r.get("gpu_info"), r.get("n_gpu_layers")) for r in raw["native"]}
    ours = {(r.get("backend"), r.get("n_gpu_layers")) for r in raw["pyllm"]}
    nat_s = ", ".join(f"{b} ({g or 'no GPU'}), -ngl {n}" for b, g, n in sorted(nat, key=str))
    ours_s = ", ".join(f"{b}, -ngl {n}" for b, n in sorted(ours, key=str))
    return f"llama-bench: {nat_s}; pyllm: {ours_s}"


def ratio_table(native: dict, ours: dict) -> str:
    lines = ["| KV type | test | llama-bench t/s (mean) | pyllm t/s (mean) | pyllm/native (median of paired rounds) | min-max |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for key in native:
        n, o = native[key], ours.get(key, [])
        if len(o) != len(n):
            continue
        med, lo, hi = ratio_summary(o, n)
        lines.append(f"| {key[0]} | {key[1]} | {statistics.fmean(n):.2f} | {statistics.fmean(o):.2f} | "
                     f"{med:.3f} | {lo:.3f}-{hi:.3f} |")
    return "\n".join(lines)


def write_out(out: Path, raw: dict[str, list[dict]], table: str, header: str | None = None) -> None:
    """Both sides' raw rows and the ratio table (under ``header``, default: what each side ran on)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "native.json").write_text(json.dumps(raw["native"], indent=1))
    (out / "pyllm.json").write_text(json.dumps(raw["pyllm"], indent=1))
    (out / "ratios.md").write_text((where(raw) if header is None else header) + "\n\n" + table + "\n")


if __name__ == "__main__":
    sys.exit(main())
