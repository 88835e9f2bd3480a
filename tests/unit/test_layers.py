"""The layers of SPEC §2, kept by the imports themselves (read with ``ast``, no import).

From the bottom up: ``wire/`` and the other leaves (config, metrics, logs) import nothing
of the package; ``http/`` (the connection) imports only those; the sources (``hub/``,
``providers/``) import those and, for the hub, ``http/`` types; ``generations`` builds
on the sources; ``web/`` on all of that; ``routes/`` on ``web/``; the composition root
(``cli``) on everything. Nothing imports upward, sources do not import each other, a
provider knows nothing of HTTP, and the pure modules never import asyncio.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "sseserver"

# Rank of each top-level part of the package: a module may import ranks <= its own.
RANKS = {
    "wire": 0,
    "config": 0,
    "metrics": 0,
    "logs": 0,
    "http": 1,
    "hub": 2,
    "providers": 2,
    "generations": 3,
    "web": 4,
    "routes": 5,
    "cli": 6,
    "__init__": 6,
    "__main__": 7,
    "testing": 7,  # the pytest plugin: a server composed as cli does, for client tests
}
# Parts of one rank that must not know each other, and other pairs kept apart.
APART = {("hub", "providers"), ("providers", "hub"), ("providers", "http")}
PURE = ("wire", "config")  # importable without an event loop


def part_of(module: str) -> str:
    """``sseserver.http.stream`` -> ``http``; ``sseserver`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> list[str]:
    """Absolute names of every module ``path`` imports (relative ones resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    out: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            out.append(target)
            out.extend(f"{target}.{alias.name}" for alias in node.names)
    return out


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=[module_name(p) for p in MODULES])
def test_imports_flow_one_way(path: Path) -> None:
    own = part_of(module_name(path))
    assert own in RANKS, f"{own}: a new part of the package needs a rank here"
    for target in imports_of(path):
        if target.split(".")[0] != "sseserver" or target == "sseserver":
            continue
        other = part_of(target)
        if other not in RANKS or other == own:
            continue  # a name imported from a package, or the module's own part
        assert RANKS[other] <= RANKS[own], f"{module_name(path)} imports upward: {target}"
        assert (own, other) not in APART, f"{module_name(path)} must not import {target}"
        assert RANKS[other] < RANKS[own] or own == other, (
            f"{module_name(path)} imports {target}, a part of its own rank"
        )


@pytest.mark.parametrize(
    "path",
    [p for p in MODULES if part_of(module_name(p)) in PURE],
    ids=lambda p: module_name(p),
)
def test_pure_modules_never_import_asyncio(path: Path) -> None:
    assert not any(t.split(".")[0] == "asyncio" for t in imports_of(path)), module_name(path)
