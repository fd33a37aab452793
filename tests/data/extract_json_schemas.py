"""Extract the cases of llama.cpp's tests/test-json-schema-to-grammar.cpp into tests/data/json_schemas.json.

The facts, not the code: each ``test({STATUS, "name", <schema>, <grammar>})`` call (raw string literals) of ``test_all``
becomes one entry. A case expected to SUCCEED goes to ``schemas`` with its name, its schema (the JSON text
the C++ test hands ``common_json::parse``, parsed; key order kept) and the grammar the C++ test expects
``json_schema_to_grammar(schema, true)`` to return (``expected_grammar``, trimmed as the test's ``trim()``
does before it compares: no blanks around the text nor at the start of a line; :func:`trim`). A case expected to FAIL goes to ``invalid`` with
the part of llama.cpp's message that names the reason (``error_contains``; read from common/json-schema.cpp
and common/json-schema-to-grammar.cpp of the pinned tree, since the C++ test checks only that it fails).

Entries whose ``source`` is not the C++ test (the hand-written "real-world" schemas and invalid inputs)
are kept as they are in the output file; only the C++ test's entries are replaced, in the test's order,
ahead of the others.

    python tests/data/extract_json_schemas.py [--sdist PATH] [--out PATH]

test-json-schema-to-grammar.cpp is read from the pinned llama-cpp-python sdist (vendor/fetch.py leaves
tests/ out of vendor/llama.cpp), as tests/data/extract_test_chat.py does.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from extract_test_chat import find_sdist, pin_commit  # noqa: E402  (a script beside this one)

OUT = HERE / "json_schemas.json"
SOURCE = "test-json-schema-to-grammar.cpp"

_STR = r'"((?:[^"\\]|\\.)*)"'
_RAW_OR_STR = r'(?:R"""\((.*?)\)"""|' + _STR + r")"
CASE = re.compile(r"test\(\{\s*(SUCCESS|FAILURE),\s*" + _STR + r",\s*" + _RAW_OR_STR + r",\s*" + _RAW_OR_STR
                  + r"\s*\}\);", re.S)

# The reason llama.cpp gives for each expected failure of the C++ test (its message carries this text).
FAILURE_REASONS = {
    "unknown type": "unrecognized type kaboom",                                 # json-schema.cpp
    "invalid type": "type must be a string or an array of strings",             # json-schema.cpp
    "regexp with unbalanced parentheses": "Invalid pattern ^(a$: unbalanced parentheses",  # json-schema-to-grammar.cpp
}


# What the grammar of a case admits beyond its schema, as the C++ test's own expected grammar shows (the
# benchmark prints these beside a failure). Keyed by case name; a case that is gone is an error.
NOTES = {
    "regexp quote": "the pattern's literal '\"' goes into the grammar unescaped (expected grammar: "
                    "root ::= \"\\\"\" (\"\\\"\") \"\\\"\"), so the only output it admits, \"\"\", is not JSON",
    "regexp": "the pattern's '.' becomes dot ::= [^\\x0A\\x0D], which admits an unescaped '\"' or '\\' inside the "
              "JSON string, so an output can be cut short or not be JSON",
    "unanchored regexp": "a pattern without ^...$ is not converted (a warning); the grammar admits any string",
    "regexp with unsupported shorthand": "\\w is not converted (a warning); the grammar admits any string",
    "unsupported regexp in a property": "a lookahead is not converted (a warning); the grammar admits any string for a",
}


def _c_string(text: str) -> str:
    """The value of a C++ string literal's body (the escapes these cases use)."""
    return re.sub(r'\\(["\\nt])', lambda m: {"n": "\n", "t": "\t"}.get(m.group(1), m.group(1)), text)


def trim(text: str) -> str:
    """The C++ test's ``trim()``: blanks (space, newline, CR, tab) stripped around the text, then the spaces
    and tabs at the start of every line."""
    return re.sub(r"(^|\n)[ \t]+", r"\1", text.strip(" \n\r\t"))


def read_test(sdist: Path) -> str:
    with tarfile.open(sdist) as tar:
        for m in tar.getmembers():
            if m.name.endswith("vendor/llama.cpp/tests/" + SOURCE):
                return tar.extractfile(m).read().decode("utf-8")
    raise SystemExit(f"{sdist} has no vendor/llama.cpp/tests/{SOURCE}")


def extract(src: str) -> tuple[list[dict], list[dict]]:
    body = src[src.index("static void test_all"):src.index("int main()")]
    n_calls = body.count("test({")
    ok, bad = [], []
    for m in CASE.finditer(body):
        status, name = m.group(1), _c_string(m.group(2))
        schema_text = m.group(3) if m.group(3) is not None else _c_string(m.group(4))
        grammar = m.group(5) if m.group(5) is not None else _c_string(m.group(6))
        schema = json.loads(schema_text)
        if status == "SUCCESS":
            entry = {"name": name, "source": SOURCE, "schema": schema, "expected_grammar": trim(grammar)}
            if name in NOTES:
                entry["note"] = NOTES[name]
            ok.append(entry)
        else:
            if name not in FAILURE_REASONS:
                raise SystemExit(f"{SOURCE} has a new expected failure {name!r}: add its reason to FAILURE_REASONS")
            bad.append({"name": name, "source": SOURCE, "schema": schema, "error_contains": FAILURE_REASONS[name]})
    gone = set(NOTES) - {e["name"] for e in ok}
    if gone:
        raise SystemExit(f"NOTES names cases {SOURCE} no longer has as expected successes: {sorted(gone)}")
    if len(ok) + len(bad) != n_calls:
        raise SystemExit(f"{SOURCE} has {n_calls} test({{...}}) calls but {len(ok) + len(bad)} were understood; "
                         "update CASE in this script")
    return ok, bad


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sdist", help="the pinned llama-cpp-python sdist (default: vendor/.cache)")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    sdist = Path(args.sdist) if args.sdist else find_sdist()
    ok, bad = extract(read_test(sdist))
    out = Path(args.out)
    old = json.loads(out.read_text()) if out.exists() else {}
    data = {
        "source": f"tests/{SOURCE} of {sdist.name} (llama.cpp {pin_commit()}) and hand-written real-world schemas",
        "generated_by": "tests/data/extract_json_schemas.py (the C++ test's entries; the others are kept as written)",
        "schemas": ok + [e for e in old.get("schemas", []) if e["source"] != SOURCE],
        "invalid": bad + [e for e in old.get("invalid", []) if e["source"] != SOURCE],
    }
    out.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    print(f"{len(ok)} schemas and {len(bad)} expected failures of {SOURCE}, "
          f"{len(data['schemas']) - len(ok)} + {len(data['invalid']) - len(bad)} others -> {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
