"""The public surface: ``memtree.__all__`` lists exactly what the package exports."""

from __future__ import annotations

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
