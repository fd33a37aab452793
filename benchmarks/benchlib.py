"""What the comparison scripts of benchmarks/ share: building llama.cpp's own tools from the vendored
tree (benchmarks/native), and the statistics of paired measurements (pyllm / native per round).

Imported by compare_native.py and serve_load.py, which run as scripts (their folder is on sys.path).
"""
from __future__ import annotations

import math
import os
import shutil
import statistics
import subprocess
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
NATIVE_SRC = ROOT / "benchmarks" / "native"
DEFAULT_BUILD_DIR = ROOT / "build" / "native"


def build_native(build_dir: Path, targets: Sequence[str]) -> dict[str, Path]:
    """Configure (once) and build ``targets`` of benchmarks/native (incremental; ccache where installed);
    return each target's executable."""
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    if not (build_dir / "CMakeCache.txt").exists():
        subprocess.run(["cmake", "-S", str(NATIVE_SRC), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release", *gen],
                       check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build_dir), "--target", *targets, "-j", str(os.cpu_count() or 2)],
                   check=True, stdout=subprocess.DEVNULL)
    return {name: build_dir / "bin" / name for name in targets}


def paired_ratios(ours: Sequence[float], native: Sequence[float]) -> list[float]:
    """ours[i] / native[i] for each round measured on both sides (rounds are paired, so the drift of a
    shared machine hits both sides of one ratio alike)."""
    if len(ours) != len(native):
        raise ValueError(f"{len(ours)} measurements of ours against {len(native)} native ones; expected pairs")
    return [a / b if b else math.nan for a, b in zip(ours, native)]


def ratio_summary(ours: Sequence[float], native: Sequence[float]) -> tuple[float, float, float]:
    """(median, min, max) of the paired ratios ours/native."""
    ratios = paired_ratios(ours, native)
    if not ratios:
        return math.nan, math.nan, math.nan
    return statistics.median(ratios), min(ratios), max(ratios)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between order statistics (numpy's default);
    NaN for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"q={q!r} is out of range; expected a percentile in [0, 100]")
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
