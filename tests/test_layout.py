"""The package's rooms keep their order: a lower layer never imports a higher one, and no module
imports one that imports it back (ARCHITECTURE.md draws the layers)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "fusemoe_ckpt"

# Lowest first. A module may import its own layer and the ones below it.
LAYERS = [
    {"errors", "interrupts", "sizes", "naming", "version", "cycles", "memory", "libc"},
    {"reading"},
    {"rules"},
    {"plan"},
    {"write"},
    {"hub"},
    {"commands"},
    {"batch"},
    {"cli", "__init__", "__main__"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts)


def layer_of(module: str) -> int:
    room = module.split(".")[0]
    for rank, rooms in enumerate(LAYERS):
        if room in rooms:
            return rank
    raise AssertionError(f"{module}: in no layer of LAYERS; add its room to the test and to ARCHITECTURE.md")


def imports_of(path: Path) -> set[str]:
    """The package modules `path` imports, at the top or inside functions."""
    module = module_name(path)
    package = module.rpartition(".")[0]  # "" for a top-level module; "plan" for plan/x.py and plan/__init__.py
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".") if package else []
            base = base[: len(base) - (node.level - 1)]
            target = ".".join([*base, node.module] if node.module else base)
            if node.module:
                found.add(_existing(target) or target)
            for alias in node.names if not node.module else ():
                # `from . import x`: the module x, or a name defined by the package's __init__.
                name = f"{target}.{alias.name}".lstrip(".")
                found.add(_existing(name) or f"{target}.__init__".lstrip("."))
        elif isinstance(node, ast.ImportFrom | ast.Import):
            modules = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            for name in modules:
                if name and name.startswith("fusemoe_ckpt."):
                    found.add(name.removeprefix("fusemoe_ckpt."))
    found.discard("")
    return {name for name in found if name != module}


def _existing(name: str) -> str | None:
    """`name` if it is a module of the package, its package if it is a subpackage, else None."""
    path = PACKAGE.joinpath(*name.split("."))
    if path.with_suffix(".py").exists():
        return name
    if (path / "__init__.py").exists():
        return f"{name}.__init__"
    return None


def all_modules() -> dict[str, set[str]]:
    return {module_name(path): imports_of(path) for path in sorted(PACKAGE.rglob("*.py"))}


def test_no_layer_imports_a_higher_one():
    upward = [
        f"{module} imports {target}"
        for module, targets in all_modules().items()
        for target in sorted(targets)
        if layer_of(target) > layer_of(module)
    ]
    assert upward == []


def test_no_import_cycle():
    graph = all_modules()
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        for target in sorted(graph.get(module, ())):
            if target in path:
                cycles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target in graph and target not in done:
                visit(target, [*path, target])
        done.add(module)

    done: set[str] = set()
    for module in graph:
        if module not in done:
            visit(module, [module])
    assert cycles == []


def test_the_layer_check_sees_imports():
    """The checks above would pass vacuously if imports were not found: they are."""
    graph = all_modules()
    assert "write.output" in graph["commands.convert"]
    assert "reading.source" in graph["plan.conversion"]
    assert "hub.download" in graph["commands.convert"]  # imported inside a function


def test_every_json_document_is_read_by_the_one_parser():
    """`json.load`/`json.loads` appear only in reading/json_document.py: every other module reads its
    documents through it, so none takes NaN or recurses without bound (ARCHITECTURE.md, reading/)."""
    readers = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Attribute)
                and node.attr in ("load", "loads")
                and isinstance(node.value, ast.Name)
                and node.value.id == "json"
            ):
                readers.append(f"{module_name(path)}:{node.lineno}")
    assert [r for r in readers if not r.startswith("reading.json_document:")] == []
    assert readers, "the check found no json.loads at all, not even the parser's own"
