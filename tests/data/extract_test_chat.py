"""Extract the parser cases of llama.cpp's tests/test-chat.cpp into tests/data/test_chat_cases.json.

The facts, not the code: every ``peg_tester(...).test(input)...run()`` case of ``test_template_output_peg_parsers``
(the per-template parser tests: template, request parameters, model output, expected content / reasoning /
tool calls) is recorded exactly as the C++ test builds it. The cases are written in C++ with helpers
(``message_assist_call``, ``special_function_tool`` ...), so rather than re-reading C++ syntax this script
compiles them: it takes test-chat.cpp from the pinned llama.cpp sdist (fetch.py leaves tests/ out of
vendor/llama.cpp), replaces the one line of ``peg_test_builder::run()`` that runs a case with a call that
records it as JSON (messages and tools through llama.cpp's own OpenAI converters), links the result against
the llama-common / llama / ggml libraries of a pyllm build, and runs it from vendor/llama.cpp (where the
test's ``models/templates/...`` paths point). Nothing of llama.cpp is written to the repository: the
generated C++ and the program live in a temporary directory.

    python tests/data/extract_test_chat.py [--sdist PATH] [--build DIR] [--out PATH]

Needs a C++17 compiler and a finished pyllm build (``build/<wheel tag>``, the default is the one found).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LLAMA = ROOT / "vendor" / "llama.cpp"
OUT = Path(__file__).resolve().parent / "test_chat_cases.json"

RUN_LINE = "test_peg_parser(tester_.tmpls_.get(), [this](peg_test_case & t) { t = tc_; }, tester_.detailed_debug_);"

RECORDER = r'''
static common_json g_cases = common_json::array();

static const char * reasoning_name(common_reasoning_format f) { return common_reasoning_format_name(f); }

static const char * tool_choice_name(common_chat_tool_choice c) {
    switch (c) {
        case COMMON_CHAT_TOOL_CHOICE_AUTO:     return "auto";
        case COMMON_CHAT_TOOL_CHOICE_REQUIRED: return "required";
        case COMMON_CHAT_TOOL_CHOICE_NONE:     return "none";
    }
    return "?";
}

static common_json continuation_json(common_chat_continuation c) {
    switch (c) {
        case COMMON_CHAT_CONTINUATION_NONE:      return common_json(nullptr);
        case COMMON_CHAT_CONTINUATION_AUTO:      return common_json(true);
        case COMMON_CHAT_CONTINUATION_REASONING: return common_json("reasoning_content");
        case COMMON_CHAT_CONTINUATION_CONTENT:   return common_json("content");
    }
    return common_json(nullptr);
}

static void record_case(const std::string & template_path, const peg_test_case & tc_in) {
    peg_test_case tc = tc_in;
    // test_peg_parser's own defaults
    if (tc.params.messages.empty()) {
        tc.params.messages = { message_user };
    }
    if (tc.expect.role.empty()) {
        tc.expect.role = "assistant";
    }
    common_json calls = common_json::array();
    for (const auto & c : tc.expect.tool_calls) {
        calls.push_back({{"name", c.name}, {"arguments", c.arguments}, {"id", c.id}});
    }
    common_json params{
        {"messages", common_chat_msgs_to_json_oaicompat(tc.params.messages)},
        {"tools", common_chat_tools_to_json_oaicompat(tc.params.tools)},
        {"tool_choice", tool_choice_name(tc.params.tool_choice)},
        {"parallel_tool_calls", tc.params.parallel_tool_calls},
        {"json_schema", tc.params.json_schema.empty() ? common_json(nullptr) : common_json::parse(tc.params.json_schema)},
        {"grammar", tc.params.grammar},
        {"reasoning_format", reasoning_name(tc.params.reasoning_format)},
        {"enable_thinking", tc.params.enable_thinking},
        {"add_generation_prompt", tc.params.add_generation_prompt},
        {"continue_final_message", continuation_json(tc.params.continue_final_message)},
    };
    g_cases.push_back({
        {"template", template_path},
        {"input", tc.input},
        {"is_partial", tc.is_partial},
        {"expect_reconstruction", tc.expect_reconstruction},
        {"params", params},
        {"expect", {
            {"content", tc.expect.content},
            {"reasoning_content", tc.expect.reasoning_content},
            {"tool_calls", calls},
        }},
    });
}
'''

MAIN = r'''
int main(int argc, char ** argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s OUT.json\n", argv[0]);
        return 2;
    }
    common_log_set_verbosity_thold(-1);
    test_template_output_peg_parsers(false);
    std::ofstream out(argv[1], std::ios::binary);
    out << g_cases.dump();
    return out.good() ? 0 : 1;
}
'''


def find_sdist() -> Path:
    pin = dict(line.split("=", 1) for line in (ROOT / "vendor" / "llama.cpp.pin").read_text().splitlines()
               if "=" in line and not line.lstrip().startswith("#"))
    pin = {k.strip(): v.strip() for k, v in pin.items()}
    path = ROOT / "vendor" / ".cache" / f"{pin['sdist_package'].replace('-', '_')}-{pin['sdist_version']}.tar.gz"
    if not path.is_file():
        # a worktree shares the main checkout's cache through its vendor/llama.cpp link
        alt = LLAMA.resolve().parent / ".cache" / path.name
        if alt.is_file():
            return alt
        raise SystemExit(f"{path} not found: run `python3 vendor/fetch.py` first (it downloads the pinned sdist)")
    return path


def read_test_chat(sdist: Path) -> str:
    with tarfile.open(sdist) as tar:
        for m in tar.getmembers():
            if m.name.endswith("vendor/llama.cpp/tests/test-chat.cpp"):
                return tar.extractfile(m).read().decode("utf-8")
    raise SystemExit(f"{sdist} has no vendor/llama.cpp/tests/test-chat.cpp")


def slice_between(text: str, start: str, end: str) -> str:
    a = text.index(start)
    b = text.index(end, a)
    return text[a:b]


def generate(src: str) -> str:
    if src.count(RUN_LINE) != 1:
        raise SystemExit("test-chat.cpp changed: the line of peg_test_builder::run() that runs a case was not found "
                         "exactly once; update RUN_LINE in this script")
    head = src[:src.index("static void test_msgs_oaicompat_json_conversion")]
    head = head.replace('#include "../tools/server/server-chat.h"\n', "")
    head = head.replace("// Fluent builder for PEG parser tests",
                        RECORDER + "\n// Fluent builder for PEG parser tests", 1)
    head = head.replace(RUN_LINE, "record_case(tester_.template_path(), tc_);")
    cases = slice_between(src, "static void test_lfm2_parser", "static void test_template_generation_prompt")
    return head + cases + MAIN


def find_build(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    dirs = sorted(glob.glob(str(ROOT / "build" / "*" / "llama.cpp" / "common" / "libllama-common.a")))
    if not dirs:
        raise SystemExit("no pyllm build with llama-common found under build/; build the package first")
    return Path(dirs[0]).parents[2]


def compile_and_run(code: str, build: Path, tmp: Path) -> list:
    cpp = tmp / "extract.cpp"
    cpp.write_text(code)
    exe = tmp / "extract"
    libs = [build / "llama.cpp" / "common" / "libllama-common.a",
            build / "llama.cpp" / "common" / "libllama-common-base.a",
            build / "llama.cpp" / "vendor" / "cpp-httplib" / "libcpp-httplib.a",
            build / "llama.cpp" / "src" / "libllama.a"]
    libs += sorted(Path(p) for p in glob.glob(str(build / "llama.cpp" / "ggml" / "src" / "**" / "libggml*.a"),
                                             recursive=True))
    missing = [str(p) for p in libs if not p.is_file()]
    if missing:
        raise SystemExit(f"missing libraries of the build: {', '.join(missing)}")
    inc = [LLAMA / "common", LLAMA / "include", LLAMA / "ggml" / "include", LLAMA / "src", LLAMA / "vendor",
           LLAMA / "tests", build / "llama.cpp" / "common"]
    cmd = [os.environ.get("CXX", "c++"), "-std=c++17", "-O1", "-w", str(cpp), "-o", str(exe)]
    cmd += [f"-I{p}" for p in inc]
    # ggml's archives reference each other: let the linker go round them
    cmd += ["-Wl,--start-group"] + [str(p) for p in libs] + ["-Wl,--end-group", "-fopenmp", "-lpthread", "-ldl"]
    print("compiling test-chat.cpp's cases (a minute or two) ...", file=sys.stderr)
    subprocess.run(cmd, check=True)
    out = tmp / "cases.json"
    subprocess.run([str(exe), str(out)], check=True, cwd=LLAMA)
    return json.loads(out.read_text())


def compact(cases: list, sdist: Path) -> dict:
    """Tools are repeated across cases: keep each definition once, under its name (name#2, #3 ... for a
    second, third definition of the same name)."""
    tools: dict[str, dict] = {}
    for c in cases:
        keys = []
        for t in c["params"].pop("tools") or []:
            name = t["function"]["name"]
            key, n = name, 1
            while key in tools and tools[key] != t:
                n += 1
                key = f"{name}#{n}"
            tools[key] = t
            keys.append(key)
        c["params"]["tools"] = keys
        c["template"] = Path(c["template"]).name
    return {
        "source": f"tests/test-chat.cpp of {sdist.name} (llama.cpp {pin_commit()}), test_template_output_peg_parsers",
        "generated_by": "tests/data/extract_test_chat.py",
        "tools": tools,
        "cases": cases,
    }


def pin_commit() -> str:
    m = re.search(r"^llama_cpp_commit *= *(\S+)", (ROOT / "vendor" / "llama.cpp.pin").read_text(), re.M)
    return m.group(1) if m else "?"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sdist", help="the pinned llama-cpp-python sdist (default: vendor/.cache)")
    ap.add_argument("--build", help="a pyllm build dir (default: the one under build/)")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    sdist = Path(args.sdist) if args.sdist else find_sdist()
    code = generate(read_test_chat(sdist))
    with tempfile.TemporaryDirectory() as tmp:
        cases = compile_and_run(code, find_build(args.build), Path(tmp))
    data = compact(cases, sdist)
    Path(args.out).write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    print(f"{len(cases)} cases of {len({c['template'] for c in cases})} templates -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
