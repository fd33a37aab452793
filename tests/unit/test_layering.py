"""pyllm's modules import one way, bottom to top: no cycles, not even through imports inside functions."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "pyllm"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in modules and t != name and t != "pyllm"}
        graph[name] = deps
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str]:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        stack.pop()
        state[n] = 2
        return []

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return []


def test_no_import_cycle_among_pyllm_modules():
    assert _cycle(_imports()) == []


@pytest.mark.parametrize("low, high", [("pyllm.model", "pyllm.context"), ("pyllm.devices", "pyllm.model"),
                                       ("pyllm.buildinfo", "pyllm.model"), ("pyllm._runtime", "pyllm.model"),
                                       ("pyllm.config", "pyllm._ffi"), ("pyllm.log", "pyllm._runtime")])
def test_lower_modules_do_not_import_higher_ones(low, high):
    assert high not in _imports()[low]


@pytest.mark.parametrize("module", ["config", "kvtypes"])
def test_config_and_kvtypes_import_no_compiled_code_at_import_time(module):
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    top = {n.module for n in tree.body if isinstance(n, ast.ImportFrom)} | \
          {a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    assert not {m for m in top if m and m.startswith("pyllm._ffi")}
