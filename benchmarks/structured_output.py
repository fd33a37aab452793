#!/usr/bin/env python3
"""Constrained output, measured: does a JSON schema turned into a grammar give JSON that the schema accepts?

For each schema of tests/data/json_schemas.json (the succeeding cases of llama.cpp's
test-json-schema-to-grammar.cpp and hand-written real-world ones), the grammar comes from llama.cpp's
``json_schema_to_grammar`` (``pyllm.chat_common``, as llama-server's ``json_schema`` field uses it) and the
model generates with it through pyllm's ``BatchedEngine``, once greedy and once sampled (temperature and
seed below). Each output is then checked three ways:

- ``json``: ``json.loads`` accepts it;
- ``schema``: the ``jsonschema`` package validates it against the *original* schema, format assertions on
  (``date``, ``uuid``, ``email`` ... from jsonschema's own checkers; ``time`` and ``date-time`` by RFC 3339
  section 5.6, written here, because jsonschema checks those only with an optional package). The validator
  is the one the schema's ``$schema`` names, else Draft 2020-12, else Draft 7 for a schema that is valid
  only there (the C++ test's tuple cases use Draft 7's ``"items": [...]``);
- ``grammar``: llama.cpp's grammar engine (``grammar_match``) matches the text against the grammar (whole
  and complete for a finished output, an accepted prefix for one cut short): a check of the sampling path.

A schema with a ``pattern`` llama.cpp's converter cannot express (``unsupported_patterns``; llama.cpp
would accept any string there) is refused, as ``pyllm serve`` refuses it with a 400: counted as
"refused", apart from the runs. An output counts as a success only when it ended by itself (``eog``: the grammar was complete and the model
chose to stop) and passes ``json`` and ``schema``. One cut by ``max_tokens`` is a failure of the measure, not
left out: where a grammar leaves the content open (free property names under ``additionalProperties``,
arrays without ``maxItems``, recursion, "any value", strings without ``maxLength``) a small base model can
repeat itself (the same key again and again, ``true, true, ...``, ever deeper ``"children"``, a run of digits
in a string) until ``max_tokens``; the failure list shows the end of such an output so the reason can be read. A schema whose grammar is looser than the schema
(llama.cpp ignores ``number`` bounds, ``multipleOf``, ``uniqueItems``, the ``email`` format, and lengths
beside a ``pattern``, any unanchored or unsupported ``pattern``) fails ``schema`` when the model takes that
freedom, and a few of llama.cpp's pattern grammars admit an unescaped ``"`` inside a string (its own test
expects that grammar for ``"pattern": "^\\"$"``), whose output then fails ``json``; the data file's ``note``
says which.

``--url`` sends the same schemas to a running OpenAI-compatible server instead, as llama-server documents
it (tools/server/README.md, ``response_format``; parsed by ``oaicompat_chat_params_parse``):
``POST /v1/chat/completions`` with ``response_format: {"type": "json_schema", "json_schema": {"name": ...,
"schema": ...}}``, the same prompt as the user message, ``max_tokens``, ``temperature`` and ``seed``;
``finish_reason`` "stop" counts as ended, "length" as cut. An HTTP error is reported with its body. (llama-server
turns an empty schema into ``{"type": "object"}``; the output is still validated against the schema sent.)

    python3 benchmarks/structured_output.py                       # default model, every schema, greedy + sampled
    python3 benchmarks/structured_output.py --only tuple,shape -v # schemas whose name contains a word
    python3 benchmarks/structured_output.py --url http://127.0.0.1:8080 --n-parallel 4
    python3 benchmarks/structured_output.py --out results.json    # every output and verdict as JSON

A measurement, not a test: it exits 0 whatever the pass count (1 only when it could not run). Prints one row
per schema and run, the failures with their reasons, and a summary line.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import jsonschema

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SCHEMAS = ROOT / "tests" / "data" / "json_schemas.json"

PROMPT = "Write one JSON value that conforms to this JSON schema.\nSchema: {schema}\n"
PROMPT_CUE = "JSON:\n"            # the completion prompt ends with it; the chat request leaves it out


# ---------------------------------------------------------------------------------------------
# Data and verdicts
# ---------------------------------------------------------------------------------------------
def load_schemas(path: Path = DEFAULT_SCHEMAS) -> tuple[list[dict], list[dict]]:
    """(schemas, invalid) of a json_schemas.json: entries {"name", "source", "schema", ...}."""
    data = json.loads(Path(path).read_text())
    return data["schemas"], data["invalid"]


def prompt_for(schema: Any, *, cue: bool = True) -> str:
    return PROMPT.format(schema=json.dumps(schema, ensure_ascii=False)) + (PROMPT_CUE if cue else "")


_RFC3339_TIME = re.compile(r"([0-9]{2}):([0-9]{2}):([0-9]{2})(\.[0-9]+)?([Zz]|[+-]([0-9]{2}):([0-9]{2}))\Z")


def _rfc3339_time(text: str) -> bool:
    """RFC 3339 ``full-time``: HH:MM:SS[.frac] then Z or +-HH:MM (leap second 60 allowed)."""
    m = _RFC3339_TIME.match(text)
    if not m:
        return False
    hh, mm, ss = int(m.group(1)), int(m.group(2)), int(m.group(3))
    off_ok = m.group(6) is None or (int(m.group(6)) <= 23 and int(m.group(7)) <= 59)
    return hh <= 23 and mm <= 59 and ss <= 60 and off_ok


def _rfc3339_date_time(text: str) -> bool:
    """RFC 3339 ``date-time``: full-date "T" full-time (T case-insensitive), the date a real calendar day."""
    if len(text) < 11 or text[10] not in "Tt":
        return False
    try:
        datetime.date.fromisoformat(text[:10])
    except ValueError:
        return False
    return re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", text[:10]) is not None and _rfc3339_time(text[11:])


def format_checker() -> jsonschema.FormatChecker:
    """jsonschema's checkers for every format it knows, with ``time`` and ``date-time`` as RFC 3339 has them
    (without the optional rfc3339-validator package jsonschema has no ``date-time`` check and checks ``time``
    as Draft 3's HH:MM:SS, which has no offset)."""
    checker = jsonschema.FormatChecker()
    for name, fn in (("time", _rfc3339_time), ("date-time", _rfc3339_date_time)):
        checker.checks(name)(lambda v, fn=fn: not isinstance(v, str) or fn(v))
    return checker


_FORMATS = format_checker()


def validator_for(schema: Any) -> jsonschema.protocols.Validator:
    """The validator of the draft ``$schema`` names, else Draft 2020-12, else Draft 7 when the schema is
    valid only under Draft 7 (``"items": [...]`` tuples); format assertions on."""
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError:
        if "$schema" in (schema if isinstance(schema, dict) else {}):
            raise
        cls = jsonschema.Draft7Validator
        cls.check_schema(schema)
    return cls(schema, format_checker=_FORMATS)


def schema_errors(schema: Any, value: Any) -> list[str]:
    """jsonschema's messages for ``value`` against ``schema`` ([] when it validates), each with its path."""
    errors = sorted(validator_for(schema).iter_errors(value), key=lambda e: list(e.absolute_path))
    return [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in errors]


@dataclass
class Outcome:
    """One output and its verdict. ``finish``: "eog" (ended by itself) / "max_tokens" / another stop reason /
    "error"; ``ok``: ended, parses, validates."""

    name: str
    source: str
    mode: str
    finish: str
    n_tokens: int
    text: str
    json_ok: bool = False
    schema_ok: bool = False
    grammar_ok: Optional[bool] = None
    reason: str = ""
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.finish == "eog" and self.json_ok and self.schema_ok


def judge(entry: dict, mode: str, finish: str, n_tokens: int, text: str, grammar: Optional[str]) -> Outcome:
    """The verdict on one output (``grammar``: the GBNF it was sampled with, None when not known here)."""
    from pyllm.chat_common import grammar_match

    out = Outcome(entry["name"], entry["source"], mode, finish, n_tokens, text, note=entry.get("note", ""))
    ended = finish == "eog"
    if grammar is not None:
        m = grammar_match(grammar, text)
        out.grammar_ok = m.matched if ended else (m.matched or m.incomplete)
    try:
        value = json.loads(text)
        out.json_ok = True
    except ValueError as e:
        out.reason = f"not JSON ({e})"
        if not ended:
            out.reason = f"cut at {n_tokens} tokens ({finish}), ends {text[-60:]!r}"
        return out
    errors = schema_errors(entry["schema"], value)
    out.schema_ok = not errors
    if errors:
        out.reason = "schema: " + "; ".join(errors[:2]) + (f" (+{len(errors) - 2})" if len(errors) > 2 else "")
    elif not ended:
        out.reason = f"cut at {n_tokens} tokens ({finish}) after a valid value, ends {text[-60:]!r}"
    return out


# ---------------------------------------------------------------------------------------------
# Runners
# ---------------------------------------------------------------------------------------------
@dataclass
class Mode:
    name: str
    temperature: float
    seed: Optional[int]


def run_engine(entries: Sequence[dict], modes: Sequence[Mode], args: argparse.Namespace) -> list[Outcome]:
    """Every (schema, mode) through one BatchedEngine at once; the outcomes in submission order."""
    from pyllm.batched import BatchedEngine
    from pyllm.chat_common import json_schema_to_grammar, unsupported_patterns
    from pyllm.config import EngineConfig
    from pyllm.errors import PyllmError
    from pyllm.sampling import SamplingParams

    jobs, refused = [], []
    for e in entries:
        unsupported = unsupported_patterns(e["schema"])
        if unsupported:   # as pyllm serve refuses it (a 400): the grammar would not honour the pattern
            refused += [Outcome(e["name"], e["source"], m.name, "refused", 0, "", note=e.get("note", ""),
                                reason=f"pattern {unsupported[0]!r} is not supported by llama.cpp's converter")
                        for m in modes]
            continue
        grammar = json_schema_to_grammar(e["schema"])
        for m in modes:
            jobs.append((e, m, grammar))
    cfg = EngineConfig(model_path=args.model, n_parallel=args.n_parallel,
                       n_ctx=args.n_ctx or args.n_parallel * (args.max_prompt_tokens + args.max_tokens))
    outcomes: list[Optional[Outcome]] = [None] * len(jobs)
    with BatchedEngine(cfg, max_queue=len(jobs)) as eng:
        reqs = []
        for i, (e, m, grammar) in enumerate(jobs):
            sp = SamplingParams(temperature=m.temperature, seed=m.seed, grammar=grammar)
            try:
                reqs.append((i, eng.submit(prompt_for(e["schema"]), max_tokens=args.max_tokens, sampling=sp)))
            except PyllmError as exc:
                outcomes[i] = Outcome(e["name"], e["source"], m.name, "error", 0, "", reason=f"submit: {exc}")
        pending, n_done = reqs, 0
        while pending:   # judged as they finish (progress in finishing order), kept in submission order
            for i, req in pending:
                if not req.done:
                    continue
                e, m, grammar = jobs[i]
                res = req.wait()
                finish = str(res.stop_reason)
                if finish == "error":
                    outcomes[i] = Outcome(e["name"], e["source"], m.name, "error", res.n_generated, res.text,
                                          reason=f"engine: {res.error}")
                else:
                    outcomes[i] = judge(e, m.name, finish, res.n_generated, res.text, grammar)
                n_done += 1
                if args.verbose:
                    o = outcomes[i]
                    print(f"[{n_done}/{len(reqs)}] {e['name']} ({m.name}): {finish}, {res.n_generated} tokens, "
                          f"{'ok' if o.ok else 'FAILED: ' + o.reason}", file=sys.stderr, flush=True)
            pending = [(i, req) for i, req in pending if outcomes[i] is None]
            if pending:
                try:
                    pending[0][1].wait(0.5)
                except TimeoutError:
                    pass
    return refused + [o for o in outcomes if o is not None]


def response_format(entry: dict) -> dict:
    """OpenAI's ``response_format`` for a schema; ``json_schema.name`` as OpenAI restricts it
    (``^[a-zA-Z0-9_-]{1,64}$``)."""
    name = re.sub(r"[^a-zA-Z0-9_-]+", "_", entry["name"]).strip("_")[:64] or "schema"
    return {"type": "json_schema", "json_schema": {"name": name, "schema": entry["schema"]}}


async def _run_url(entries: Sequence[dict], modes: Sequence[Mode], args: argparse.Namespace,
                   transport: Any = None) -> list[Outcome]:
    import httpx

    base = args.url.rstrip("/")
    if base.endswith("/v1"):
        base = base[:-3]
    sem = asyncio.Semaphore(args.n_parallel)
    async with httpx.AsyncClient(timeout=args.timeout, transport=transport) as client:
        model = args.server_model
        if model is None:
            r = await client.get(f"{base}/v1/models")
            r.raise_for_status()
            model = r.json()["data"][0]["id"]

        async def one(e: dict, m: Mode) -> Outcome:
            body: dict[str, Any] = {"model": model, "max_tokens": args.max_tokens, "temperature": m.temperature,
                                    "messages": [{"role": "user", "content": prompt_for(e["schema"], cue=False)}],
                                    "response_format": response_format(e)}
            if m.seed is not None:
                body["seed"] = m.seed
            async with sem:
                try:
                    r = await client.post(f"{base}/v1/chat/completions", json=body)
                except httpx.HTTPError as exc:
                    return Outcome(e["name"], e["source"], m.name, "error", 0, "", reason=f"http: {exc!r}")
            if 400 <= r.status_code < 500:   # the server refused the schema: not an output, counted apart
                return Outcome(e["name"], e["source"], m.name, "refused", 0, "",
                               reason=f"HTTP {r.status_code}: {r.text[:300]}")
            if r.status_code != 200:
                return Outcome(e["name"], e["source"], m.name, "error", 0, "",
                               reason=f"HTTP {r.status_code}: {r.text[:300]}")
            try:
                d = r.json()
                choice = d["choices"][0]
                text = choice["message"].get("content") or ""
                fr = choice["finish_reason"]
            except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
                return Outcome(e["name"], e["source"], m.name, "error", 0, "",
                               reason=f"not a chat completion ({exc!r}): {r.text[:300]}")
            finish = {"stop": "eog", "length": "max_tokens"}.get(fr, str(fr))
            n = (d.get("usage") or {}).get("completion_tokens", 0)
            return judge(e, m.name, finish, n, text, None)

        return list(await asyncio.gather(*(one(e, m) for e in entries for m in modes)))


def run_url(entries: Sequence[dict], modes: Sequence[Mode], args: argparse.Namespace,
            transport: Any = None) -> list[Outcome]:
    """Every (schema, mode) as a chat completion request to ``args.url`` (``transport``: httpx's, for tests)."""
    return asyncio.run(_run_url(entries, modes, args, transport))


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "~"


def report(outcomes: Sequence[Outcome], modes: Sequence[Mode], n_schemas: int, where: str) -> str:
    lines = [f"{'schema':<52} {'src':<4} {'mode':<8} {'finish':<10} {'tok':>4} json schema grammar"]
    for o in outcomes:
        g = "-" if o.grammar_ok is None else ("yes" if o.grammar_ok else "NO")
        lines.append(f"{_cut(o.name, 52):<52} {'cpp' if o.source.endswith('.cpp') else 'rw':<4} {o.mode:<8} "
                     f"{o.finish:<10} {o.n_tokens:>4} {'yes' if o.json_ok else 'no':<4} "
                     f"{'yes' if o.schema_ok else 'no':<6} {g}")
    bad = [o for o in outcomes if not o.ok and o.finish != "refused"]
    refused = [o for o in outcomes if o.finish == "refused"]
    if refused:
        lines += ["", f"refused ({len(refused)}):"]
        lines += [f"  {o.name} [{o.mode}]: {o.reason}" for o in refused]
    if bad:
        lines += ["", f"failures ({len(bad)}):"]
        for o in bad:
            lines.append(f"  {o.name} [{o.mode}]: {o.reason}")
            if o.note:
                lines.append(f"      note: {o.note}")
    lines += ["", summary(outcomes, modes, n_schemas, where)]
    return "\n".join(lines)


def summary(outcomes: Sequence[Outcome], modes: Sequence[Mode], n_schemas: int, where: str) -> str:
    refused = sum(o.finish == "refused" for o in outcomes)
    outcomes = [o for o in outcomes if o.finish != "refused"]
    n = len(outcomes)
    finishes: dict[str, int] = {}
    for o in outcomes:
        finishes[o.finish] = finishes.get(o.finish, 0) + 1
    fin = ", ".join(f"{k} {v}" for k, v in sorted(finishes.items(), key=lambda kv: -kv[1]))
    per_mode = "; ".join(f"{m.name} {sum(o.ok for o in outcomes if o.mode == m.name)}/"
                         f"{sum(o.mode == m.name for o in outcomes)}" for m in modes)
    checked = [o for o in outcomes if o.grammar_ok is not None]
    gram = (f"; grammar-consistent {sum(bool(o.grammar_ok) for o in checked)}/{len(checked)}" if checked else "")
    return (f"structured output ({where}): {n_schemas} schemas x {len(modes)} modes; refused {refused} "
            f"(a schema the server answers with a 400); of the {n} runs, "
            f"success (ended, JSON, schema-valid) {sum(o.ok for o in outcomes)}/{n} ({per_mode}); "
            f"valid JSON {sum(o.json_ok for o in outcomes)}/{n}; schema-valid {sum(o.schema_ok for o in outcomes)}/{n}; "
            f"finish: {fin}{gram}")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--schemas", type=Path, default=DEFAULT_SCHEMAS, help="a json_schemas.json (default: tests/data)")
    ap.add_argument("--only", help="comma-separated words; only schemas whose name contains one of them")
    ap.add_argument("--source", choices=("all", "cpp", "real-world"), default="all")
    ap.add_argument("-m", "--model", help="GGUF model (default: pyllm's default model)")
    ap.add_argument("-n", "--max-tokens", type=int, default=512)
    ap.add_argument("--temp", type=float, default=0.8, help="temperature of the sampled run (default 0.8)")
    ap.add_argument("--seed", type=int, default=1234, help="seed of the sampled run (default 1234)")
    ap.add_argument("--modes", default="greedy,sampled", help="greedy, sampled or both (default)")
    ap.add_argument("-np", "--n-parallel", type=int, default=8, help="sequences at once (engine) / concurrent requests (--url)")
    ap.add_argument("-c", "--n-ctx", type=int, default=0,
                    help="engine context (default: n_parallel x (max-prompt-tokens + max-tokens))")
    ap.add_argument("--max-prompt-tokens", type=int, default=768, help="prompt room per sequence for the default -c")
    ap.add_argument("--url", help="an OpenAI-compatible server's base URL; send the schemas there instead")
    ap.add_argument("--server-model", help="the request's model field with --url (default: the first of /v1/models)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per HTTP request with --url")
    ap.add_argument("--out", type=Path, help="write every outcome (text included) as JSON here")
    ap.add_argument("-v", "--verbose", action="store_true", help="progress on stderr")
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)

    entries, _ = load_schemas(args.schemas)
    if args.source != "all":
        entries = [e for e in entries if (e["source"] == "real-world") == (args.source == "real-world")]
    if args.only:
        words = [w.strip().lower() for w in args.only.split(",") if w.strip()]
        entries = [e for e in entries if any(w in e["name"].lower() for w in words)]
    if not entries:
        print("no schema selected", file=sys.stderr)
        return 1
    all_modes = {"greedy": Mode("greedy", 0.0, None), "sampled": Mode("sampled", args.temp, args.seed)}
    try:
        modes = [all_modes[m.strip()] for m in args.modes.split(",") if m.strip()]
    except KeyError as e:
        print(f"--modes: unknown mode {e}; expected greedy, sampled or both", file=sys.stderr)
        return 1
    if args.url:
        where = f"{args.url}, response_format json_schema, max_tokens {args.max_tokens}"
        outcomes = run_url(entries, modes, args)
    else:
        where = (f"pyllm BatchedEngine, {Path(args.model).name if args.model else 'default model'}, "
                 f"max_tokens {args.max_tokens}, -np {args.n_parallel}, sampled: temp {args.temp} seed {args.seed}")
        outcomes = run_engine(entries, modes, args)
    print(report(outcomes, modes, len(entries), where))
    if args.out:
        args.out.write_text(json.dumps([{**asdict(o), "ok": o.ok} for o in outcomes], indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
