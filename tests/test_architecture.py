"""The import graph is the architecture: core <- port <- adapters; core <- port <- layers <- database <- api/cli/ui."""

from __future__ import annotations

import ast
from pathlib import Path

import stateline

SRC = Path(stateline.__file__).parent

CORE = {"stateline.errors", "stateline.clock", "stateline.codec", "stateline.types"}
PORT = {"stateline.store", "stateline.store.protocol"}
ADAPTERS = {"stateline.store.memory", "stateline.store.sqlite", "stateline.store.postgres", "stateline.store.redis"}
LAYERS = {
    "stateline.docs", "stateline.streams", "stateline.cases", "stateline.runs", "stateline.runtime",
    "stateline.locks", "stateline.audit", "stateline.gates", "stateline.sync", "stateline.sweeper",
}  # fmt: skip


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("stateline"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("stateline"):
            if node.module == "stateline":  # `from stateline import codec` names a module
                out.update(f"stateline.{a.name}" for a in node.names)
            else:
                out.add(node.module)
    return out


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in SRC.rglob("*.py")}


def _layer_of(module: str) -> str:
    for name, group in (("core", CORE), ("port", PORT), ("adapter", ADAPTERS), ("layer", LAYERS)):
        if module in group or any(module.startswith(g + ".") for g in group if g not in PORT):
            return name
    return "top"


ALLOWED = {
    "core": {"core"},
    "port": {"core", "port"},
    "adapter": {"core", "port"},
    "layer": {"core", "port", "layer"},
}


def test_every_module_respects_the_layering() -> None:
    graph = _graph()
    assert "stateline.store.protocol" in graph
    violations = []
    for module, imports in graph.items():
        kind = _layer_of(module)
        if kind == "top":
            continue
        for imported in imports:
            target = _layer_of(imported)
            if target not in ALLOWED[kind]:
                violations.append(f"{module} ({kind}) imports {imported} ({target})")
    assert violations == []


def test_nothing_but_the_database_module_and_the_top_names_adapters() -> None:
    graph = _graph()
    for module, imports in graph.items():
        if _layer_of(module) in {"layer", "core", "port"}:
            assert not imports & ADAPTERS, module


def test_public_names_are_sorted_and_importable() -> None:
    # isort-style order, as ruff's RUF022 keeps it: CONSTANTS, then Classes, then functions
    def order(name: str) -> tuple[int, str]:
        return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)

    assert stateline.__all__ == sorted(stateline.__all__, key=order)
    for name in stateline.__all__:
        assert hasattr(stateline, name), name
