"""The layout rules of DESIGN.md, checked on the source: no import circles, layers that only look down.

Every import counts, including those inside functions and under ``TYPE_CHECKING``: a lazy import
hides a circle from Python, not from the reader who has to understand both modules together.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "trainer_core"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    if node.level == 0:
        bases = [node.module or ""]
    else:
        package = module if is_package else module.rsplit(".", 1)[0]
        for _ in range(node.level - 1):
            package = package.rsplit(".", 1)[0]
        bases = [f"{package}.{node.module}" if node.module else package]
    # `from . import x` may name a submodule
    return bases + [f"{bases[0]}.{alias.name}" for alias in node.names]


def import_graph() -> dict[str, set[str]]:
    """trainer_core module -> the trainer_core modules it imports anywhere in its source."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                targets.update(_resolve(name, path.name == "__init__.py", node))
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_data_modules_import_no_circle():
    graph = import_graph()
    data = {
        m: {t for t in ts if t.startswith("trainer_core.data.")}
        for m, ts in graph.items()
        if m.startswith("trainer_core.data.")
    }
    assert _cycles(data) == []


def test_no_module_of_trainer_core_is_part_of_an_import_circle():
    graph = {m: {t for t in ts if not t.endswith("__init__")} for m, ts in import_graph().items()}
    # a package's __init__ imports its own submodules by design; circles through it are not real
    graph = {
        m: {t for t in ts if not (m == t.rsplit(".", 1)[0] or t == m.rsplit(".", 1)[0])} for m, ts in graph.items()
    }
    assert _cycles(graph) == []


def test_families_never_import_the_training_loop():
    """Media types and data types sit below both families/ and train/, so a family never reaches up."""
    graph = import_graph()
    offenders = {
        m: sorted(t for t in ts if t.startswith("trainer_core.train"))
        for m, ts in graph.items()
        if m.startswith("trainer_core.families")
    }
    assert {m: ts for m, ts in offenders.items() if ts} == {}


def test_each_family_is_one_module_a_newcomer_can_find():
    from trainer_core.families import get_family_class

    for family, module in [
        ("lumina2", "trainer_core.families.lumina2"),
        ("kandinsky5-image", "trainer_core.families.kandinsky5_image"),
        ("kandinsky5-video", "trainer_core.families.kandinsky5_video"),
    ]:
        assert get_family_class(family).__module__ == module


def test_the_trainer_core_never_imports_comfyui():
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ([node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            )
            for n in names:
                assert n.split(".")[0] not in {"comfy", "comfy_api", "folder_paths", "server", "nodes"}, (path, n)
