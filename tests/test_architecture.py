"""The package's import graph: no cycles, and layers only import downwards (ARCHITECTURE.md).

Every ``import``/``from ... import`` of a ``crl_exp`` module counts, also those inside functions, so a cycle
cannot hide behind a function-level import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import crl_exp

PACKAGE = Path(crl_exp.__file__).parent
# Lower number = lower layer. tracking is a leaf: it needs nothing but the base modules.
LAYERS = {
    "errors": 0, "structured": 0, "paths": 0, "cache_integrity": 0, "tracking": 0, "stats": 0,
    "tasks": 1,
    "models": 2, "saes": 2, "steering": 2,
    "generation": 3, "kv_cache": 3, "stopping": 3, "reference_likelihood": 3, "episodes": 3, "runtime": 3, "reward_table": 3, "known_answer_design": 3, "first_order": 3,
    "crl": 4,
    "analysis": 5,
    "evaluation": 6,
    "modes": 7,
    "app": 8, "__main__": 8, "sae": 8, "__init__": 8, "config_store": 8,
}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """crl_exp modules that ``path`` imports; ``from pkg import sub`` counts as importing ``pkg.sub`` only."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("crl_exp."):
            base = node.module.removeprefix("crl_exp.")
            subs = {f"{base}.{a.name}" for a in node.names} & modules
            found |= subs if subs and len(subs) == len(node.names) else {base} | subs
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("crl_exp.") for a in node.names if a.name.startswith("crl_exp."))
    return found & modules


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports_of(path, set(modules)) - {name} for name, path in modules.items()}


def layer(module: str) -> int:
    top = module.split(".")[0]
    assert top in LAYERS, f"module {module} is in no layer: add it to ARCHITECTURE.md and LAYERS"
    return LAYERS[top]


def test_no_upward_imports():
    upward = [f"{a} -> {b}" for a, targets in graph().items() for b in targets
              if a.split(".")[0] != b.split(".")[0] and layer(b) > layer(a)]
    assert upward == []


def test_tracking_is_a_leaf():
    bad = [f"{a} -> {b}" for a, targets in graph().items() if a.startswith("tracking") for b in targets
           if not b.startswith("tracking") and layer(b) > 0]
    assert bad == []


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    assert cycles == []
