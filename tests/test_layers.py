"""The memory tree is an application on top of the queue: the generic core never imports it.

Read from the source (``ast``), so an import inside a function or under ``TYPE_CHECKING``
counts as much as one at the top. Only the CLI may reach up: ``memtree demo`` and the
operations commands run the tree's queue and worker.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "memtree"
#: Modules outside memtree/tree/ allowed to import it.
ALLOWED = {PACKAGE / "cli.py"}


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, as dotted names (``from a import b`` gives ``a`` and
    ``a.b``, since ``b`` may be a submodule)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: memtree imports absolutely"
            module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def core_modules() -> list[Path]:
    tree = PACKAGE / "tree"
    every = [*PACKAGE.rglob("*.py"), *(ROOT / "migrations").rglob("*.py")]
    return sorted(p for p in every if tree not in p.parents and p not in ALLOWED)


def test_the_core_never_imports_the_tree() -> None:
    modules = core_modules()
    assert PACKAGE / "__init__.py" in modules and PACKAGE / "queue.py" in modules
    offenders = {
        str(path.relative_to(ROOT)): sorted(
            name for name in imported_modules(path) if name.split(".")[:2] == ["memtree", "tree"]
        )
        for path in modules
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def test_the_scan_sees_an_import_of_the_tree(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from memtree import tree\n"
        "def f():\n    import memtree.tree.jobs\n"
    )
    assert {"memtree.tree", "memtree.tree.jobs"} <= imported_modules(source)
