"""The public surface: ``memtree.__all__`` lists exactly what the package exports."""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

import memtree


def test_all_is_sorted_and_complete() -> None:
    public = {
        name
        for name, value in vars(memtree).items()
        if not name.startswith("_") and getattr(value, "__module__", "").startswith("memtree")
    }
    constants = {name for name in vars(memtree) if name.isupper() and not name.startswith("_")}
    assert set(memtree.__all__) == public | constants
    assert memtree.__all__ == sorted(memtree.__all__, key=lambda n: (not n.isupper(), n))


def test_every_error_derives_from_memtree_error() -> None:
    from memtree import errors

    for name in errors.__all__:
        assert issubclass(getattr(errors, name), memtree.MemtreeError)


ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PYTHON_BLOCK = re.compile(r"```python\n(.*?)```", re.S)
IMPORT = re.compile(r"from (memtree(?:\.\w+)*) import \(?([\w\s,]+?)\)?(?:\n\n|\n(?!\s)|$)")
ATTRIBUTE = re.compile(r"(?<![\w.])memtree\.(\w+)(?:\.(\w+))?")


def names_the_docs_use() -> set[tuple[str, str]]:
    """Every ``(module, name)`` a Python example in the README or docs imports or reaches for."""
    used: set[tuple[str, str]] = set()
    for page in DOCS:
        text = "\n\n".join(PYTHON_BLOCK.findall(page.read_text()))
        for module, names in IMPORT.findall(text):
            for name in re.split(r"[\s,]+", names):
                if name and not name.startswith("#"):
                    used.add((module, name))
        for first, second in ATTRIBUTE.findall(text):
            if importlib.util.find_spec(f"memtree.{first}") is not None:
                if second:
                    used.add((f"memtree.{first}", second))
            else:
                used.add(("memtree", first))
    return used


def test_every_name_the_docs_use_exists_and_the_root_exports_it() -> None:
    used = names_the_docs_use()
    assert ("memtree", "Worker") in used, "the scan found the README's own imports"
    missing = sorted(
        f"{module}.{name}"
        for module, name in used
        if not hasattr(importlib.import_module(module), name)
        and importlib.util.find_spec(f"{module}.{name}") is None
    )
    assert missing == []
    from_root = sorted(
        name
        for module, name in used
        if module == "memtree" and importlib.util.find_spec(f"memtree.{name}") is None
    )
    assert [name for name in from_root if name not in memtree.__all__] == []


def test_the_worker_api_is_importable_from_the_package_root() -> None:
    from memtree import worker

    for name in ("Worker", "Defer", "Handlers", "JobContext", "Gate"):
        assert getattr(memtree, name) is getattr(worker, name)
        assert name in memtree.__all__


def test_the_tree_exports_its_wing_and_the_root_none_of_it() -> None:
    """``memtree.tree.__all__`` is sorted and complete; the root re-exports none of it."""
    import memtree.tree

    names = {name for name in vars(memtree.tree) if not name.startswith("_")}
    public = {
        name
        for name in names
        if name.isupper()
        or getattr(getattr(memtree.tree, name), "__module__", "").startswith("memtree.tree")
    }
    # The submodules a user reaches for by name (jobs, payloads) are exported too.
    modules = {"jobs", "payloads"}
    assert set(memtree.tree.__all__) == public | modules
    assert memtree.tree.__all__ == sorted(memtree.tree.__all__, key=lambda n: (not n.isupper(), n))
    assert not set(memtree.tree.__all__) & set(memtree.__all__)
