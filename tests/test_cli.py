"""``memtree db`` through the real entry point, in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import memtree

MEMTREE = Path(sys.executable).parent / "memtree"


def run(*args: str, url: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "MEMTREE_DATABASE_URL"}
    if url is not None:
        env["MEMTREE_DATABASE_URL"] = url
    return subprocess.run(
        [str(MEMTREE), *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_db_upgrade_current_check_and_downgrade(db_url: str) -> None:
    upgraded = run("db", "upgrade", url=db_url)
    assert upgraded.returncode == 0, upgraded.stderr
    assert "memtree_0007" in upgraded.stdout
    assert "(head)" in run("db", "current", url=db_url).stdout
    checked = run("db", "check", url=db_url)
    assert checked.returncode == 0 and "no drift" in checked.stdout
    down = run("db", "downgrade", "memtree_0002", url=db_url)
    assert down.returncode == 0, down.stderr
    assert run("db", "current", url=db_url).stdout.startswith("memtree_0002 (head is memtree_0007)")
    queue = memtree.Queue(db_url)
    try:
        with pytest.raises(memtree.SchemaOutdatedError):
            queue.count_total()
    finally:
        queue.close()


def test_db_sql_prints_ddl_without_connecting() -> None:
    result = run("--database-url", "postgresql://nobody:pw@127.0.0.1:1/none", "db", "sql")
    assert result.returncode == 0, result.stderr
    assert "CREATE TABLE mem_tree_jobs" in result.stdout
    assert "memtree_alembic_version" in result.stdout


def test_db_history_lists_every_revision() -> None:
    result = run("db", "history")
    assert [line.split(":")[0] for line in result.stdout.splitlines()] == [
        "memtree_0007",
        "memtree_0006",
        "memtree_0005",
        "memtree_0004",
        "memtree_0003",
        "memtree_0002",
        "memtree_0001",
    ]


def test_unreachable_database_is_one_line_without_the_password() -> None:
    result = run("db", "upgrade", url="postgresql://root:hunter2@127.0.0.1:1/db")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "hunter2" not in result.stderr + result.stdout
    assert result.stderr.startswith("Error: database error:")
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_driver_error_reads_the_same_from_a_schema_command_and_a_queue_command() -> None:
    """``db current`` meets the raw driver error, ``status`` the queue's translation of it."""
    url = "postgresql://root@127.0.0.1:1/db"
    schema, queue = run("db", "current", url=url), run("status", url=url)
    assert schema.returncode == queue.returncode == 1
    assert schema.stderr == queue.stderr
    assert schema.stderr.startswith("Error: database error: OperationalError: ")


def test_bad_url_and_unsupported_database_are_one_line_errors() -> None:
    bad = run("db", "upgrade", url="not a url")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    unsupported = run("db", "upgrade", url="oracle://scott@127.0.0.1/test")
    assert unsupported.returncode == 1 and "Traceback" not in unsupported.stderr
    assert "does not support the 'oracle' database" in unsupported.stderr


def test_unknown_revision_is_a_one_line_error(tmp_path: Path) -> None:
    result = run("db", "downgrade", "memtree_9999", url=f"sqlite:///{tmp_path / 'x.db'}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "memtree_9999" in result.stderr


def test_help_works_on_every_command() -> None:
    for args in (
        ["--help"],
        ["db", "--help"],
        ["db", "upgrade", "--help"],
        ["db", "sql", "--help"],
    ):
        result = run(*args)
        assert result.returncode == 0 and "Usage" in result.stdout
