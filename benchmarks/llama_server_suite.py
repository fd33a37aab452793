#!/usr/bin/env python3
"""llama-server's own pytest suite (tools/server/tests/unit at the pin) against llama-server and ``pyllm serve``.

The suite starts its server binary from a command line (``LLAMA_SERVER_BIN_PATH``) and asks for models
by Hugging Face repository (``--hf-repo``), which it would download. This script runs a chosen set of the
suite's test files twice, unchanged:

(a) against llama.cpp's own ``llama-server``, built from the vendored tree by benchmarks/native (as
    serve_load.py builds it), through a wrapper that replaces the model a test asks for (``--hf-repo``,
    ``--hf-file``, ``--model-url``) with the local default GGUF (``--model``); every other flag is passed
    as given;
(b) against ``pyllm serve``, through a wrapper that translates llama-server's command line into pyllm's
    flags with the table ``FLAGS`` below. A flag the table does not name is passed on unchanged, so
    pyllm refuses it (an argparse error: the server exits and the test fails) instead of ignoring it.
    The flags the wrapper drops are listed in ``DROPPED`` with the reason each changes nothing.

The suite comes from the pinned sdist that vendor/fetch.py verifies (vendor/fetch.py drops
tools/server/tests/ from vendor/llama.cpp, so it is extracted here on its own), into
build/llama_server_suite/llama.cpp/tools/server/tests with llama.cpp's models/templates beside it (the
tests read ../../../models/templates/*.jinja). Its requirements.txt goes into its own virtual
environment (build/llama_server_suite/venv), made on first use. The suite's session fixture that starts
every preset once to download its model is turned off (llama_server_suite_plugin.py); each test has a
time limit. Slow-marked tests are left out, as the suite's own tests.sh does.

Output: pass/fail/skip counts per test file for both servers and pyllm's failing test ids, printed as a
table and written as JSON (``--out``). Every test starts its own server, so a run of the default set
takes about 15-25 minutes on 2 cores.

    python3 benchmarks/llama_server_suite.py                         # default set, both servers
    python3 benchmarks/llama_server_suite.py --servers pyllm --files test_tokenize,test_basic
    python3 benchmarks/llama_server_suite.py --translate -- --hf-repo x --port 8080 --no-slots   # show argv
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
WORK = ROOT / "build" / "llama_server_suite"
SUITE_SUBDIR = "tools/server/tests"
SERVERS = ("llama-server", "pyllm")
DEFAULT_FILES = ("test_basic", "test_chat_completion", "test_completion", "test_tokenize", "test_security",
                 "test_ctx_shift", "test_ignore_eos", "test_metrics", "test_template", "test_tool_call",
                 "test_compat_anthropic", "test_compat_oai_responses", "test_slot_save")

# ---------------------------------------------------------------------------------------------
# llama-server's command line -> pyllm serve's
# ---------------------------------------------------------------------------------------------
# The model a test asks for by repository or URL: both servers get the local GGUF instead.
MODEL_FLAGS = {"--hf-repo": 1, "-hf": 1, "-hfr": 1, "--hf-file": 1, "-hff": 1, "--model-url": 1, "-mu": 1}

# llama-server flag -> (pyllm flag, number of values). The same meaning on both sides.
FLAGS: dict[str, tuple[str, int]] = {
    "--port": ("--port", 1),
    "--host": ("--host", 1),
    "--temp": ("--temp", 1), "--temperature": ("--temp", 1),
    "--seed": ("--seed", 1), "-s": ("--seed", 1),
    "--model": ("-m", 1), "-m": ("-m", 1),
    "--ctx-size": ("-c", 1), "-c": ("-c", 1),
    "--batch-size": ("-b", 1), "-b": ("-b", 1),
    "--ubatch-size": ("-ub", 1), "-ub": ("-ub", 1),
    "--threads": ("-t", 1), "-t": ("-t", 1),
    "--n-gpu-layers": ("-ngl", 1), "--gpu-layers": ("-ngl", 1), "-ngl": ("-ngl", 1),
    "--parallel": ("-np", 1), "-np": ("-np", 1),
    "--cache-type-k": ("-ctk", 1), "-ctk": ("-ctk", 1),
    "--cache-type-v": ("-ctv", 1), "-ctv": ("-ctv", 1),
    "--flash-attn": ("-fa", 1), "-fa": ("-fa", 1),
    "--n-predict": ("-n", 1), "--predict": ("-n", 1), "-n": ("-n", 1),
    "--api-key": ("--api-key", 1),
    "--alias": ("--alias", 1), "-a": ("--alias", 1),
    "--tags": ("--tags", 1),
    "--metrics": ("--metrics", 0),
    "--slots": ("--slots", 0), "--no-slots": ("--no-slots", 0),
    "--kv-unified": ("--kv-unified", 0), "-kvu": ("--kv-unified", 0),
    "--no-kv-unified": ("--no-kv-unified", 0), "-no-kvu": ("--no-kv-unified", 0),
    "--jinja": ("--jinja", 0), "--no-jinja": ("--no-jinja", 0),
    "--reasoning-format": ("--reasoning-format", 1),
    "--reasoning": ("--reasoning", 1), "-rea": ("--reasoning", 1),
    "--chat-template": ("--chat-template", 1),
    "--chat-template-file": ("--chat-template", 1),   # pyllm's --chat-template takes a .jinja path too
    "--cors-origins": ("--cors-origins", 1),
    "--offline": ("--offline", 0),
    "--verbose": ("--verbose", 0), "-v": ("--verbose", 0),
}

# Flags the wrapper drops, and why that changes nothing on pyllm's side.
DROPPED: dict[str, tuple[int, str]] = {
    "--cont-batching": (0, "pyllm always batches continuously"),
    "-cb": (0, "pyllm always batches continuously"),
    "--no-ui": (0, "pyllm serves no web UI"),
    "--no-webui": (0, "pyllm serves no web UI"),
    "--no-mmproj": (0, "pyllm loads no multimodal projector"),
}


def _arity(flag: str) -> Optional[int]:
    if flag in MODEL_FLAGS:
        return MODEL_FLAGS[flag]
    if flag in FLAGS:
        return FLAGS[flag][1]
    if flag in DROPPED:
        return DROPPED[flag][0]
    return None


def _split(argv: Sequence[str]) -> list[tuple[str, list[str]]]:
    """llama-server's argv as (flag, values). A flag the tables do not know takes the words up to the next
    word that starts with '-' (and is not a number) as its values."""
    out: list[tuple[str, list[str]]] = []
    i = 0
    while i < len(argv):
        flag = argv[i]
        n = _arity(flag)
        if n is None:
            j = i + 1
            while j < len(argv) and not (argv[j].startswith("-") and not _is_number(argv[j])):
                j += 1
            n = j - i - 1
        out.append((flag, list(argv[i + 1:i + 1 + n])))
        i += 1 + n
    return out


def _is_number(word: str) -> bool:
    try:
        float(word)
        return True
    except ValueError:
        return False


def llama_server_argv(argv: Sequence[str], model: str) -> list[str]:
    """llama-server's own command line with the model a test asks for replaced by ``model``."""
    out: list[str] = []
    has_model = False
    for flag, values in _split(argv):
        if flag in MODEL_FLAGS:
            if not has_model:
                out += ["--model", model]
                has_model = True
            continue
        if flag in ("--model", "-m"):
            has_model = True
        out += [flag, *values]
    return out


def pyllm_argv(argv: Sequence[str], model: str) -> tuple[list[str], list[str]]:
    """``pyllm serve``'s flags for llama-server's command line ``argv``, and notes on what was dropped or
    added. Unknown flags are passed on as given, so pyllm refuses them."""
    out: list[str] = []
    notes: list[str] = []
    seen: set[str] = set()
    has_model = False
    for flag, values in _split(argv):
        if flag in MODEL_FLAGS:
            if not has_model:
                out += ["-m", model]
                has_model = True
                notes.append(f"{flag} {' '.join(values)}: the local model {model}")
            continue
        if flag in DROPPED:
            notes.append(f"{flag} dropped: {DROPPED[flag][1]}")
            continue
        if flag in FLAGS:
            target, _ = FLAGS[flag]
            seen.add(target)
            if target == "-m":
                has_model = True
            out += [target, *values]
            continue
        out += [flag, *values]   # pyllm refuses it
    # llama-server's defaults where pyllm's differ, for the flags the command line leaves out:
    if "--metrics" not in seen:
        out.append("--no-metrics")
        notes.append("--no-metrics added: llama-server serves /metrics only with --metrics")
    if "-np" not in seen and "--kv-unified" not in seen and "--no-kv-unified" not in seen:
        out += ["-np", "4", "--kv-unified"]
        notes.append("-np 4 --kv-unified added: llama-server's automatic slot count")
    elif "--kv-unified" not in seen and "--no-kv-unified" not in seen:
        out.append("--no-kv-unified")
        notes.append("--no-kv-unified added: llama-server splits n_ctx per slot unless -kvu or -np is automatic")
    if "--cors-origins" not in seen:
        out += ["--cors-origins", "*"]
        notes.append("--cors-origins * added: llama-server's default (pyllm sends no CORS headers unless asked)")
    out.append("--any-model")
    notes.append("--any-model added: llama-server answers every model name with its one model")
    if "-c" not in seen:
        out += ["-c", "0"]
        notes.append("-c 0 added: llama-server's default context is the model's training context")
    if not has_model:
        # A command line without a model starts llama-server's router (models loaded on demand, listed from
        # its cache); pyllm has no router, so it serves the local model.
        out += ["-m", model]
        notes.append(f"no model (llama-server's router mode): pyllm serves {model}")
    return out, notes


# ---------------------------------------------------------------------------------------------
# The suite, its environment and the wrappers
# ---------------------------------------------------------------------------------------------
def _fetch_module():
    spec = importlib.util.spec_from_file_location("pyllm_vendor_fetch", ROOT / "vendor" / "fetch.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _sdist(fetch, pin: dict, given: Optional[Path]) -> Path:
    """The pinned sdist, verified: --sdist, vendor/.cache, the .cache beside the tree vendor/llama.cpp points
    to (a worktree's symlink), else downloaded by vendor/fetch.py."""
    name = fetch.sdist_name(pin)
    candidates = [given] if given else [ROOT / "vendor" / ".cache" / name,
                                        (ROOT / "vendor" / "llama.cpp").resolve().parent / ".cache" / name]
    for path in candidates:
        if path is not None and path.is_file():
            fetch.verify(path, pin["sdist_sha256"])
            return path
    if given:
        raise SystemExit(f"--sdist {given}: no such file")
    return fetch.download(pin)


def prepare_suite(sdist: Optional[Path] = None) -> Path:
    """The suite's tests folder (extracted once per pinned sdist)."""
    fetch = _fetch_module()
    pin = fetch.read_pin()
    root = WORK / "llama.cpp"
    tests = root / SUITE_SUBDIR
    stamp = WORK / ".extracted"
    if not (stamp.exists() and stamp.read_text().strip() == pin["sdist_sha256"] and tests.is_dir()):
        path = _sdist(fetch, pin, sdist)
        prefix = f"{fetch.sdist_name(pin)[:-len('.tar.gz')]}/vendor/llama.cpp/{SUITE_SUBDIR}/"
        if root.exists():
            shutil.rmtree(root)
        with tarfile.open(path, "r:gz") as tar:
            members = []
            for m in tar.getmembers():
                if m.name.startswith(prefix) and (m.isfile() or m.isdir()):
                    m.name = SUITE_SUBDIR + "/" + m.name[len(prefix):]
                    members.append(m)
            if not members:
                raise SystemExit(f"{path} has no {SUITE_SUBDIR}")
            tar.extractall(root, members=members, filter="data")
        stamp.write_text(pin["sdist_sha256"] + "\n")
    models = root / "models"
    if not models.exists():
        models.symlink_to((ROOT / "vendor" / "llama.cpp" / "models").resolve())
    return tests


def prepare_venv(tests: Path) -> Path:
    """A virtual environment with the suite's requirements.txt (made once; again when the file changes)."""
    venv = WORK / "venv"
    req = tests / "requirements.txt"
    digest = hashlib.sha256(req.read_bytes()).hexdigest()
    stamp = venv / ".requirements.sha256"
    python = venv / "bin" / "python"
    if not (stamp.exists() and stamp.read_text().strip() == digest and python.exists()):
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-r", str(req)], check=True)
        stamp.write_text(digest + "\n")
    return python


def _pyllm_pythonpath() -> str:
    spec = importlib.util.find_spec("pyllm")
    if spec is None or not spec.origin:
        raise SystemExit("pyllm is not importable by this Python; run this script with the Python that has it")
    return str(Path(spec.origin).resolve().parents[1])


def write_wrapper(kind: str, target: str, model: str, pyllm_src: Optional[Path] = None) -> Path:
    """An executable that the suite starts as its server: it translates the command line and execs ``target``
    (llama-server's path, or this Python for pyllm). Each start is logged to wrappers.log."""
    bin_dir = WORK / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / kind
    env = {"PYTHONPATH": str(pyllm_src.resolve()) if pyllm_src else _pyllm_pythonpath()} if kind == "pyllm" else {}
    path.write_text(
        f"#!{sys.executable}\n"
        "# Written by benchmarks/llama_server_suite.py: llama-server's command line -> the server under test.\n"
        "import importlib.util, os, sys\n"
        f"spec = importlib.util.spec_from_file_location('llama_server_suite', {str(Path(__file__).resolve())!r})\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        f"mod.exec_server({kind!r}, {target!r}, {model!r}, sys.argv[1:], {env!r})\n")
    path.chmod(0o755)
    return path


def exec_server(kind: str, target: str, model: str, argv: list[str], env: dict) -> None:
    if kind == "pyllm":
        args, notes = pyllm_argv(argv, model)
        cmd = [target, "-m", "pyllm.server", *args]
    else:
        cmd, notes = [target, *llama_server_argv(argv, model)], []
    with open(WORK / "wrappers.log", "a") as log:
        log.write(f"{kind}: {shlex.join(argv)}\n  -> {shlex.join(cmd)}\n" + "".join(f"  note: {n}\n" for n in notes))
    sys.stdout.flush()
    os.execve(cmd[0], cmd, {**os.environ, **env})


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# Running and reporting
# ---------------------------------------------------------------------------------------------
def run_suite(kind: str, wrapper: Path, python: Path, tests: Path, files: Sequence[str], *, per_test_s: int,
              extra: Sequence[str], log_dir: Path) -> dict:
    junit = log_dir / f"{kind}.junit.xml"
    log = log_dir / f"{kind}.log"
    cache = WORK / "llama_cache"
    cache.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DEBUG", "DEBUG_EXTERNAL", "SLOW_TESTS")}
    env.update({"LLAMA_SERVER_BIN_PATH": str(wrapper), "PORT": str(free_port()), "LLAMA_CACHE": str(cache),
                "PYTHONPATH": str(HERE), "PYLLM_SUITE_TEST_TIMEOUT": str(per_test_s),
                "PYTHONDONTWRITEBYTECODE": "1"})
    cmd = [str(python), "-m", "pytest", "-p", "llama_server_suite_plugin", "-m", "not slow", "-q", "-rN",
           "-o", "cache_dir=" + str(WORK / ".pytest_cache"), f"--junitxml={junit}",
           *[f"unit/{f}.py" for f in files], *extra]
    t0 = time.monotonic()
    with open(log, "w") as fh:
        fh.write(f"$ {shlex.join(cmd)}\n")
        fh.flush()
        proc = subprocess.run(cmd, cwd=tests, env=env, stdout=fh, stderr=subprocess.STDOUT)
    elapsed = time.monotonic() - t0
    return {"junit": str(junit), "log": str(log), "exit_status": proc.returncode, "seconds": round(elapsed, 1),
            **parse_junit(junit)}


def parse_junit(path: Path) -> dict:
    """Per test file: passed/failed/skipped counts (errors count as failed), and the failing test ids."""
    files: dict[str, dict] = {}
    failing: list[dict] = []
    if not path.exists():
        return {"files": files, "failing": failing}
    for case in ET.parse(path).getroot().iter("testcase"):
        module = case.get("classname", "").split(".")
        fname = next((p for p in module if p.startswith("test_")), module[-1])
        test_id = f"unit/{fname}.py::{case.get('name')}"
        counts = files.setdefault(fname, {"passed": 0, "failed": 0, "skipped": 0})
        bad = case.find("failure")
        if bad is None:
            bad = case.find("error")
        if bad is not None:
            counts["failed"] += 1
            reason = (bad.get("message") or "").strip().splitlines()
            failing.append({"id": test_id, "reason": reason[0][:300] if reason else bad.tag})
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return {"files": files, "failing": failing}


def table(results: dict, files: Sequence[str]) -> str:
    kinds = [k for k in SERVERS if k in results]
    head = "| file | " + " | ".join(f"{k} pass/fail/skip" for k in kinds) + " |"
    lines = [head, "|---|" + "---|" * len(kinds)]
    totals = {k: [0, 0, 0] for k in kinds}
    for f in files:
        cells = []
        for k in kinds:
            c = results[k]["files"].get(f)
            if c is None:
                cells.append("not run")
                continue
            cells.append(f"{c['passed']}/{c['failed']}/{c['skipped']}")
            for i, key in enumerate(("passed", "failed", "skipped")):
                totals[k][i] += c[key]
        lines.append(f"| {f} | " + " | ".join(cells) + " |")
    lines.append("| **total** | " + " | ".join("/".join(map(str, totals[k])) for k in kinds) + " |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--servers", default=",".join(SERVERS), help="llama-server,pyllm (default both)")
    ap.add_argument("--files", default=",".join(DEFAULT_FILES),
                    help="test files of tools/server/tests/unit, without .py (missing ones are skipped)")
    ap.add_argument("--model", help="the GGUF both servers load (default: pyllm's default model)")
    ap.add_argument("--llama-server", type=Path, help="use this llama-server instead of building one")
    ap.add_argument("--sdist", type=Path, help="a local copy of the pinned llama-cpp-python sdist")
    ap.add_argument("--pyllm-src", type=Path,
                    help="run pyllm from this folder holding the pyllm package (e.g. an older checkout's src/, its "
                         "compiled extension included) instead of the one this Python imports")
    ap.add_argument("--per-test-timeout", type=int, default=180, help="seconds one test may take (default 180)")
    ap.add_argument("--out", type=Path, default=WORK / "report.json", help="the JSON report")
    ap.add_argument("--pytest-args", default="", help="more pytest arguments (one string), e.g. '-k props'")
    ap.add_argument("--reuse", type=Path,
                    help="a report of an earlier run: the servers this run leaves out (--servers) are taken from it, "
                         "so that a pyllm run is compared with a llama-server run made before")
    ap.add_argument("--translate", action="store_true",
                    help="print pyllm's command line for the llama-server flags after -- and exit")
    ap.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    model = args.model
    if model is None:
        from pyllm import default_model

        model = str(default_model.path())
    if args.translate:
        out, notes = pyllm_argv(args.rest, model)
        print(shlex.join(["pyllm", "serve", *out]))
        for n in notes:
            print(f"  note: {n}")
        return 0
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    for s in servers:
        if s not in SERVERS:
            raise SystemExit(f"--servers: {s!r} is not one of {', '.join(SERVERS)}")
    tests = prepare_suite(args.sdist)
    files = []
    for f in (x.strip().removesuffix(".py") for x in args.files.split(",") if x.strip()):
        if (tests / "unit" / f"{f}.py").exists():
            files.append(f)
        else:
            print(f"note: {f}.py is not in this pin's suite; skipped", file=sys.stderr)
    python = prepare_venv(tests)
    args.out = args.out.resolve()
    log_dir = args.out.parent
    log_dir.mkdir(parents=True, exist_ok=True)
    (WORK / "wrappers.log").write_text("")
    results: dict = {}
    for kind in servers:
        if kind == "llama-server":
            exe = args.llama_server
            if exe is None:
                sys.path.insert(0, str(HERE))
                from benchlib import DEFAULT_BUILD_DIR, build_native

                exe = build_native(DEFAULT_BUILD_DIR, ["llama-server"])["llama-server"]
            wrapper = write_wrapper(kind, str(Path(exe).resolve()), model)
        else:
            wrapper = write_wrapper(kind, sys.executable, model, args.pyllm_src)
        print(f"running {len(files)} files against {kind} ...", file=sys.stderr, flush=True)
        results[kind] = run_suite(kind, wrapper, python, tests, files, per_test_s=args.per_test_timeout,
                                  extra=shlex.split(args.pytest_args), log_dir=log_dir)
        print(f"  {kind}: {results[kind]['seconds']} s, log {results[kind]['log']}", file=sys.stderr, flush=True)
    if args.reuse:
        earlier = json.loads(args.reuse.read_text())
        for kind, res in earlier.get("servers", {}).items():
            if kind not in results:
                results[kind] = {**res, "reused_from": str(args.reuse)}
    results = {k: results[k] for k in SERVERS if k in results}
    report = {"model": model, "files": files, "servers": results,
              "translation": {"flags": {k: v[0] for k, v in FLAGS.items()},
                              "model_flags": sorted(MODEL_FLAGS), "dropped": {k: v[1] for k, v in DROPPED.items()}}}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(results, files))
    if "pyllm" in results:
        print(f"\npyllm's failing tests ({len(results['pyllm']['failing'])}):")
        for f in results["pyllm"]["failing"]:
            print(f"  {f['id']}: {f['reason'][:160]}")
    print(f"\nreport: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
