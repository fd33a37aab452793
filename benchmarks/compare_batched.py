#!/usr/bin/env python3
"""pyllm bench --batched vs llama.cpp's own llama-batched-bench: the batched engine's overhead, measured.

Builds ``llama-batched-bench`` from the same vendored tree with the same options as pyllm's extension
(benchmarks/native/CMakeLists.txt, shared with compare_native.py), then runs it and ``pyllm bench
--batched`` with the same model, context, batch sizes, threads and rows alternately, round after round,
and prints the pyllm/native ratio of S_PP and S_TG per row (PP, TG, B) and KV type: the median of
the paired rounds and their min-max. A benchmark, not a test: it never fails on noise.

    python3 benchmarks/compare_batched.py                                  # default model, f16, issue's rows
    python3 benchmarks/compare_batched.py --kv f16,q8_0,q4_0 --rounds 5 --out bench-batched
    python3 benchmarks/compare_batched.py -npp 128 -ntg 128 -npl 1,4,8,16,32 -c 32768

Both sides: ``-npp -ntg -npl [-pps] [-kvu] -c -b -ub -fa -t -ngl -ctk -ctv``; rows whose N_KV exceed
the context are left out by both.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import ratio_summary  # noqa: E402
from benchlib import ROOT  # noqa: E402
from compare_native import PYLLM_CLI, build_native, run_json, write_out  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", help="GGUF model (default: pyllm's default model)")
    ap.add_argument("--kv", default="f16", help="KV types (K = V), comma-separated (default f16)")
    ap.add_argument("-npp", default="128,512")
    ap.add_argument("-ntg", default="128")
    ap.add_argument("-npl", default="1,2,4,8,16,32")
    ap.add_argument("-pps", action="store_true", help="shared prompt")
    ap.add_argument("-kvu", action="store_true", help="unified KV cache (default: split, as llama-batched-bench)")
    ap.add_argument("-c", default="0", help="context size (default 0: the model's training context)")
    ap.add_argument("-b", default="2048")
    ap.add_argument("-ub", default="512")
    ap.add_argument("-fa", default="on")
    ap.add_argument("-t", "--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("-ngl", default="99")
    ap.add_argument("--rounds", type=int, default=3, help="alternating native/pyllm rounds")
    ap.add_argument("--build-dir", type=Path, default=ROOT / "build" / "native")
    ap.add_argument("--native-bin", type=Path, help="use this llama-batched-bench instead of building one")
    ap.add_argument("--out", type=Path, help="write native.json, pyllm.json and ratios.md here")
    args = ap.parse_args(argv)

    if args.model is None:
        from pyllm import default_model

        args.model = str(default_model.path())
    args.model = str(Path(args.model).resolve())
    native_bin = args.native_bin or build_native(args.build_dir, ("llama-batched-bench",))["llama-batched-bench"]
    common = ["-m", args.model, "-npp", args.npp, "-ntg", args.ntg, "-npl", args.npl, "-c", args.c, "-b", args.b,
              "-ub", args.ub, "-fa", args.fa, "-t", str(args.threads), "-ngl", args.ngl]
    common += ["-pps"] * args.pps + ["-kvu"] * args.kvu
    header = (f"model: {args.model}; threads: {args.threads}; -c {args.c} -b {args.b} -ub {args.ub} -fa {args.fa} "
              f"-ngl {args.ngl}{' -pps' * args.pps}{' -kvu' * args.kvu}; rounds: {args.rounds}")
    speeds: dict[str, dict[tuple, dict[str, list[float]]]] = {"native": {}, "pyllm": {}}
    raw: dict[str, list[dict]] = {"native": [], "pyllm": []}
    for rnd in range(args.rounds):
        for kv in args.kv.split(","):
            kv_args = ["-ctk", kv, "-ctv", kv]
            order = [("native", [str(native_bin), *common, *kv_args, "--output-format", "jsonl"], True),
                     ("pyllm", [*PYLLM_CLI, "bench", "--batched", *common, *kv_args, "-o", "json", "--no-progress"],
                      False)]
            if rnd % 2:
                order.reverse()
            for who, cmd, jsonl in order:
                rows = run_json(cmd, jsonl=jsonl)
                for row in rows:
                    row.setdefault("type_k", kv)
                    if row.get("skipped"):
                        continue
                    key = (kv, row["pp"], row["tg"], row["pl"])
                    for field in ("speed_pp", "speed_tg"):
                        speeds[who].setdefault(key, {}).setdefault(field, []).append(row[field])
                raw[who].extend(rows)
            print(f"round {rnd + 1}/{args.rounds} {kv}: done", file=sys.stderr)
            if args.out:  # after every step: a run cut short still leaves what it measured
                write_out(args.out, raw, ratio_table(speeds), header)
    table = ratio_table(speeds)
    print(header)
    print(table)
    if args.out:
        write_out(args.out, raw, table, header)
    return 0


def ratio_table(speeds: dict) -> str:
    lines = ["| KV | PP | TG | B | S_PP native | S_PP pyllm | S_PP pyllm/native | S_TG native | S_TG pyllm | "
             "S_TG pyllm/native | S_TG ratio min-max |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for key, nat in speeds["native"].items():
        ours = speeds["pyllm"].get(key)
        if not ours or len(ours["speed_tg"]) != len(nat["speed_tg"]):
            continue
        pp_med, _, _ = ratio_summary(ours["speed_pp"], nat["speed_pp"])
        tg_med, tg_lo, tg_hi = ratio_summary(ours["speed_tg"], nat["speed_tg"])
        mean = statistics.fmean
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {mean(nat['speed_pp']):.2f} | "
                     f"{mean(ours['speed_pp']):.2f} | {pp_med:.3f} | {mean(nat['speed_tg']):.2f} | "
                     f"{mean(ours['speed_tg']):.2f} | {tg_med:.3f} | {tg_lo:.3f}-{tg_hi:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
