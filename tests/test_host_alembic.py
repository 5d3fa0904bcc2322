"""A host application's own Alembic project next to memtree, driven by the real commands.

Each test builds a project of its own in a temporary directory: an ``alembic.ini``, the
``env.py`` and script template of ``tests/host_app`` (which use the filter
``docs/migrations.md`` gives, ``memtree.migration.host_include_object``) and a
``versions/`` directory. The venv's ``alembic`` and ``memtree`` commands run in
subprocesses, on SQLite and PostgreSQL (``db_url``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from sqlalchemy import create_engine, inspect, text

from memtree import migration

BIN = Path(sys.executable).parent
HOST_APP = Path(__file__).resolve().parent / "host_app"
HEAD = migration.head_revision()


def make_project(root: Path, db_url: str, *, memtree_revisions: bool, own_revision: bool) -> Path:
    """A host project at ``root``: memtree's revisions in its history or not, with or
    without its first revision (``host_0001``, which creates ``host_orders``)."""
    shutil.copytree(
        HOST_APP, root / "migrations", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    if not own_revision:
        for revision in (root / "migrations" / "versions").glob("*.py"):
            revision.unlink()
    locations = ["%(here)s/migrations/versions"]
    if memtree_revisions:
        locations.append(migration.version_location().replace("%", "%%"))
    ini = [
        "[alembic]",
        "script_location = %(here)s/migrations",
        # Alembic >= 1.16 reads path_separator, older ones version_path_separator.
        "path_separator = os",
        "version_path_separator = os",
        f"version_locations = {os.pathsep.join(locations)}",
        f"sqlalchemy.url = {db_url.replace('%', '%%')}",
    ]
    (root / "alembic.ini").write_text("\n".join(ini) + "\n")
    return root


def alembic(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "alembic"), *args], cwd=project, capture_output=True, text=True, timeout=120
    )


def memtree(db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "MEMTREE_DATABASE_URL"}
    return subprocess.run(
        [str(BIN / "memtree"), "--database-url", db_url, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"{result.args}\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def one_line_failure(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, f"{result.args}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr


def new_revisions(project: Path, before: set[Path]) -> list[Path]:
    return sorted(set((project / "migrations" / "versions").glob("*.py")) - before)


def memtree_revision_files() -> set[str]:
    return {path.name for path in Path(migration.version_location()).glob("*.py")}


def test_host_autogenerate_and_check_leave_memtrees_own_tables_alone(
    db_url: str, tmp_path: Path
) -> None:
    """memtree in its own version table; the host's autogenerate drops neither of its tables."""
    project = make_project(tmp_path, db_url, memtree_revisions=False, own_revision=True)
    ok(memtree(db_url, "db", "upgrade"))
    ok(alembic(project, "upgrade", "head"))

    assert "No new upgrade operations detected" in ok(alembic(project, "check"))
    before = set((project / "migrations" / "versions").glob("*.py"))
    ok(alembic(project, "revision", "--autogenerate", "-m", "nothing new"))
    (script,) = new_revisions(project, before)
    generated = script.read_text()
    assert "drop_table" not in generated
    assert "mem_tree_jobs" not in generated
    assert migration.VERSION_TABLE not in generated
    assert "op." not in generated  # an empty revision: no operation at all

    ok(alembic(project, "upgrade", "head"))
    assert "No new upgrade operations detected" in ok(alembic(project, "check"))
    assert f"{HEAD} (head)" in ok(memtree(db_url, "db", "current"))
    ok(memtree(db_url, "db", "check"))


def test_a_dropped_memtree_version_table_is_mended_by_memtree_db_stamp(
    db_url: str, tmp_path: Path
) -> None:
    """The state an unfiltered host autogenerate leaves: refused naming the one command that
    mends it, and after that command everything works again."""
    project = make_project(tmp_path, db_url, memtree_revisions=False, own_revision=True)
    ok(memtree(db_url, "db", "upgrade"))
    ok(alembic(project, "upgrade", "head"))
    ok(memtree(db_url, "enqueue", "extract_chunk", "--payload", '{"chunk_id": "c1"}'))
    engine = create_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(text(f"DROP TABLE {migration.VERSION_TABLE}"))

        for command in (["status"], ["db", "upgrade"], ["db", "check"]):
            assert "run `memtree db stamp`" in one_line_failure(memtree(db_url, *command))
        assert "run `memtree db stamp`" in ok(memtree(db_url, "db", "current"))

        assert f"stamped {HEAD}" in ok(memtree(db_url, "db", "stamp"))
        ok(memtree(db_url, "db", "check"))
        assert f"{HEAD} (head)" in ok(memtree(db_url, "db", "current"))
        assert '"ready": 1' in ok(memtree(db_url, "status", "--json"))
        ok(memtree(db_url, "db", "upgrade"))
        assert "nothing to stamp" in ok(memtree(db_url, "db", "stamp"))
        assert "No new upgrade operations detected" in ok(alembic(project, "check"))
        with engine.connect() as conn:
            assert {"host_orders", "mem_tree_jobs", migration.VERSION_TABLE} <= set(
                inspect(conn).get_table_names()
            )
    finally:
        engine.dispose()


def test_host_history_makes_its_revisions_in_its_own_directory_with_head_and_version_path(
    db_url: str, tmp_path: Path
) -> None:
    """memtree's revisions in the host's ``version_locations``: the documented commands."""
    project = make_project(tmp_path, db_url, memtree_revisions=True, own_revision=False)
    memtree_files = memtree_revision_files()
    ok(alembic(project, "upgrade", "heads"))

    # The host's first revision: a new branch, so its directory and label are given.
    ok(
        alembic(
            project,
            "revision",
            "-m",
            "start the app's history",
            "--head",
            "base",
            "--branch-label",
            "app",
            "--version-path",
            "migrations/versions",  # relative to the project, where alembic runs
        )
    )
    (first,) = new_revisions(project, set())
    assert "down_revision: str | None = None" in first.read_text()
    assert "branch_labels: str | Sequence[str] | None = ('app',)" in first.read_text()
    ok(alembic(project, "upgrade", "heads"))

    # Two heads now: a plain revision is refused, --head app@head picks the branch and,
    # with it, the directory.
    refused = alembic(project, "revision", "-m", "x")
    assert refused.returncode != 0
    assert "Multiple heads are present" in refused.stdout + refused.stderr
    ok(alembic(project, "revision", "--autogenerate", "-m", "orders", "--head", "app@head"))
    (second,) = new_revisions(project, {first})
    generated = second.read_text()
    assert "op.create_table('host_orders'" in generated
    assert "mem_tree_jobs" not in generated
    assert migration.VERSION_TABLE not in generated
    assert f"down_revision: str | None = '{first.name.split('_')[0]}'" in generated
    assert memtree_revision_files() == memtree_files

    ok(alembic(project, "upgrade", "heads"))
    assert "No new upgrade operations detected" in ok(alembic(project, "check"))
    heads = ok(alembic(project, "heads"))
    assert f"{HEAD} (memtree) (head)" in heads
    assert "(app) (head)" in heads
    assert f"{HEAD} (head)" in ok(memtree(db_url, "db", "current"))
    ok(memtree(db_url, "db", "check"))
