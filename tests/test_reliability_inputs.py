"""Bad and hostile input beyond ``tests/test_bad_input.py``: rows another program wrote,
databases memtree did not prepare, credentials that must not leak, text a database cannot
store, and a scan of the package for pickle, eval and string-built SQL.

Each test names what it feeds memtree and what memtree must answer: a clear error, or the
input stored and handled safely, without harm to other rows or to a running worker. The
table in ``docs/reliability.md`` lists them all.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import sqlalchemy
from sqlalchemy import Engine, inspect, text

import memtree
from memtree import DatabaseError, InvalidJobError, JobStatus, NewJob, Queue
from memtree.worker import Handlers, JobContext, Worker

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "memtree"
MEMTREE = Path(sys.executable).parent / "memtree"
APP = "tests.chaos.chaos_app:handlers"
MAX_MS = 2**63 - 1
MIN_MS = -(2**63)


def insert_raw(engine: Engine, job_id: str, **columns: object) -> None:
    """A row as another program would write it: straight SQL, no memtree in between."""
    row: dict[str, object] = {
        "id": job_id,
        "kind": "work",
        "payload_json": "{}",
        "status": "ready",
        "attempts": 0,
        "max_attempts": 5,
        "available_at_ms": 0,
        "created_at_ms": 0,
        **columns,
    }
    names = ", ".join(row)
    values = ", ".join(f":{name}" for name in row)
    with engine.begin() as conn:
        conn.execute(text(f"INSERT INTO mem_tree_jobs ({names}) VALUES ({values})"), row)


def raw_row(engine: Engine, job_id: str) -> dict[str, Any]:
    with engine.connect() as conn:
        row = conn.execute(text("SELECT * FROM mem_tree_jobs WHERE id = :id"), {"id": job_id})
        return dict(row.mappings().one())


def run_cli(
    *args: str, url: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "MEMTREE_DATABASE_URL"}
    command = [str(MEMTREE)]
    if url is not None:
        command += ["--database-url", url]
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The command failed with exit 1 and one ``Error:`` line, no traceback."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def wait_for(predicate: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


class Running:
    """A worker's run() in a thread (maintenance included), stopped and joined on exit."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.worker.run(install_signal_handlers=False)
        except BaseException as exc:
            self.error = exc

    def __enter__(self) -> Worker:
        self.thread.start()
        return self.worker

    def __exit__(self, *_: object) -> None:
        self.worker.stop()
        self.thread.join(timeout=60)
        assert not self.thread.is_alive(), "the worker did not stop"
        assert self.error is None, f"the worker's loop died: {self.error!r}"


# -- rows written by another program ------------------------------------------------------------


FOREIGN_ROWS: dict[str, dict[str, object]] = {
    "job:paused": {"status": "paused-by-another-program"},
    "job:alien-kind": {"kind": "someone_elses_kind"},
    "job:not-json": {"payload_json": "{not json"},
    "job:nan": {"payload_json": '{"x": NaN}'},
    "job:negative-attempts": {"attempts": -5},
    "job:no-attempts-allowed": {"max_attempts": 0, "payload_json": '{"fail": true}'},
    "job:dawn-of-time": {"available_at_ms": MIN_MS, "created_at_ms": MIN_MS},
    "job:end-of-time": {"available_at_ms": MAX_MS},
    "job:crate-claim-expired": {
        "status": "running",
        "attempts": 1,
        "started_at_ms": MIN_MS,
        "locked_until_ms": MIN_MS,
    },
    "job:lease-until-end-of-time": {
        "status": "running",
        "attempts": 1,
        "started_at_ms": 0,
        "locked_until_ms": MAX_MS,
        "lease_token": "someone-elses-claim",
    },
    "job:running-without-lease": {"status": "running", "attempts": 1},
}


def work_handlers() -> Handlers:
    handlers = Handlers()

    @handlers.register("work")
    def work(ctx: JobContext) -> None:
        if ctx.payload.get("fail"):  # parsing the payload raises for non-JSON and NaN
            raise RuntimeError("asked to fail")

    return handlers


def test_a_worker_gets_through_rows_another_program_wrote(
    wall_queue: Queue, caplog: pytest.LogCaptureFixture
) -> None:
    """Unknown statuses and kinds, payloads that are not JSON, negative attempts, no attempts
    allowed, times at both ends of 64 bits, and running rows the original crate claimed or
    that have no lease: the worker handles or leaves each one, and does every real job."""
    engine = wall_queue.engine
    for job_id, columns in FOREIGN_ROWS.items():
        insert_raw(engine, job_id, **columns)
    real = [i for i in wall_queue.enqueue_many([NewJob("work", {"n": n}) for n in range(20)]) if i]

    def settled() -> bool:
        statuses = {job_id: raw_row(engine, job_id)["status"] for job_id in FOREIGN_ROWS}
        return (
            all(raw_row(engine, i)["status"] == "done" for i in real)
            and statuses["job:crate-claim-expired"] == "done"
            and statuses["job:no-attempts-allowed"] == "failed"
            and raw_row(engine, "job:nan")["attempts"] == 1
            and raw_row(engine, "job:not-json")["attempts"] == 1
        )

    worker = Worker(wall_queue, work_handlers(), gates=(), poll_interval_s=0.05)
    with caplog.at_level(logging.WARNING, logger="memtree"), Running(worker):
        wait_for(settled)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], "the worker never failed to settle or lost a thread"
    rows = {job_id: raw_row(engine, job_id) for job_id in FOREIGN_ROWS}

    assert rows["job:paused"]["status"] == "paused-by-another-program", "left alone"
    assert rows["job:alien-kind"]["status"] == "ready", "not this worker's kind"
    for job_id in ("job:not-json", "job:nan"):
        assert rows[job_id]["status"] == "ready", "retried later, like any failure"
        assert rows[job_id]["last_error"]
    assert "JSONDecodeError" in rows["job:not-json"]["last_error"]
    assert "NaN" in rows["job:nan"]["last_error"]
    assert (rows["job:negative-attempts"]["status"], rows["job:negative-attempts"]["attempts"]) == (
        "done",
        -4,
    )
    assert rows["job:no-attempts-allowed"]["status"] == "failed"
    assert rows["job:dawn-of-time"]["status"] == "done"
    assert (rows["job:end-of-time"]["status"], rows["job:end-of-time"]["attempts"]) == ("ready", 0)
    recovered = rows["job:crate-claim-expired"]
    assert (recovered["status"], recovered["attempts"]) == ("done", 2), "recovered, then run"
    assert rows["job:lease-until-end-of-time"]["status"] == "running", "its lease still holds"
    # A running row without any lease is never recovered (see docs/reliability.md).
    assert rows["job:running-without-lease"]["status"] == "running"
    assert wall_queue.count_total() == len(FOREIGN_ROWS) + len(real), "no row appeared or vanished"


def test_the_cli_reports_a_row_with_an_unknown_status_and_goes_on(
    db_url: str, wall_queue: Queue
) -> None:
    insert_raw(wall_queue.engine, "job:paused", status="paused-by-another-program")
    wall_queue.enqueue(NewJob("work"))
    status = run_cli("status", "--json", url=db_url)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["counts"]["paused-by-another-program"] == 1
    listed = run_cli("jobs", "list", url=db_url)
    assert listed.returncode == 0 and "job:paused" in listed.stdout, listed.stderr
    rows = json.loads(run_cli("jobs", "list", "--json", url=db_url).stdout)
    paused = [row for row in rows if row["id"] == "job:paused"]
    assert paused[0]["unreadable"] == "unknown status 'paused-by-another-program'"
    ready = run_cli("jobs", "list", "--status", "ready", "--json", url=db_url)
    assert ready.returncode == 0 and len(json.loads(ready.stdout)) == 1


def test_a_row_with_the_largest_attempts_does_not_block_other_claims(
    db_url: str, wall_queue: Queue, request: pytest.FixtureRequest
) -> None:
    insert_raw(wall_queue.engine, "job:attempts-max", attempts=2**31 - 1, available_at_ms=0)
    real = wall_queue.enqueue(NewJob("work", available_at_ms=1))
    claimed = wall_queue.claim_batch(10, kinds=["work"])
    assert real in {job.id for job in claimed}


def test_invalid_utf8_written_by_another_program(
    db_url: str, wall_queue: Queue, request: pytest.FixtureRequest
) -> None:
    """PostgreSQL and MariaDB refuse the bytes when they are written; SQLite stores them,
    and then the row must not stop the claims of every other row."""
    engine = wall_queue.engine
    if db_url.startswith("postgresql"):
        refused = pytest.raises(sqlalchemy.exc.DataError, match="invalid byte sequence")
        with refused, engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO mem_tree_jobs (id, kind, payload_json, status, attempts, "
                    "max_attempts, available_at_ms, created_at_ms) VALUES ('job:bytes', "
                    "'work', convert_from('\\x7b22c328227d'::bytea, 'UTF8'), 'ready', 0, 5, "
                    "0, 0)"
                )
            )
        assert wall_queue.count_total() == 0
        return
    if db_url.startswith("mariadb"):
        # Strict mode (the server's default) refuses them too: a utf8mb4 column checks.
        refused = pytest.raises(sqlalchemy.exc.DBAPIError, match="Incorrect string value")
        with refused, engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO mem_tree_jobs (id, kind, payload_json, status, attempts, "
                    "max_attempts, available_at_ms, created_at_ms) VALUES ('job:bytes', "
                    "'work', X'7B22C328227D', 'ready', 0, 5, 0, 0)"
                )
            )
        assert wall_queue.count_total() == 0
        return
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO mem_tree_jobs (id, kind, payload_json, status, attempts, "
                "max_attempts, available_at_ms, created_at_ms) VALUES ('job:bytes', 'work', "
                "CAST(X'7B22C328227D' AS TEXT), 'ready', 0, 5, 0, 0)"
            )
        )
    real = wall_queue.enqueue(NewJob("work", available_at_ms=1))
    claimed = wall_queue.claim_batch(10, kinds=["work"])
    assert real in {job.id for job in claimed}


# -- text a database cannot store as given ------------------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        lambda: NewJob("kind\ud800"),
        lambda: NewJob("k", dedupe_key="key\udfff"),
        lambda: NewJob("k", {"\ud83d": 1}),
    ],
    ids=["kind", "dedupe_key", "payload_key"],
)
def test_lone_surrogates_in_a_new_job_are_rejected(build: Callable[[], NewJob]) -> None:
    with pytest.raises(InvalidJobError, match="not valid Unicode"):
        build()


HOSTILE_ERRORS = {
    "nul": "upstream said \x00 and hung up",
    "surrogate": "bad byte \udcff from a decoder",
}


@pytest.mark.parametrize("which", sorted(HOSTILE_ERRORS))
def test_error_text_a_database_cannot_store_still_settles(
    db_url: str, queue: Queue, which: str, request: pytest.FixtureRequest
) -> None:
    hostile = HOSTILE_ERRORS[which]
    job_ids = queue.enqueue_many([NewJob("k", {"n": n}) for n in range(3)])
    failed, deferred, typed = (queue.claim_next() for _ in range(3))
    assert failed and deferred and typed
    assert queue.mark_failed(failed, RuntimeError(hostile))
    assert queue.mark_deferred(deferred, queue.now_ms(), hostile)
    assert queue.mark_failed(typed, "x", memtree.JobFailure.unrecoverable(hostile))
    for job_id in job_ids:
        job = queue.get_job(job_id or "")
        assert job is not None and job.status is not JobStatus.RUNNING and job.last_error


@pytest.mark.parametrize("which", sorted(HOSTILE_ERRORS))
def test_a_handler_raising_unstorable_text_does_not_strand_its_job(
    db_url: str, queue: Queue, which: str, request: pytest.FixtureRequest
) -> None:
    """Through the worker: the failure must be recorded, not leave the job running until its
    lease expires (and then again, attempt after attempt)."""
    hostile = HOSTILE_ERRORS[which]
    handlers = Handlers()

    @handlers.register("k")
    def k(ctx: JobContext) -> None:
        raise RuntimeError(hostile)

    job_id = queue.enqueue(NewJob("k"))
    Worker(queue, handlers, gates=()).run_until_idle()
    job = queue.get_job(job_id or "")
    assert job is not None and job.status is JobStatus.READY and job.attempts == 1


# -- databases memtree did not prepare ----------------------------------------------------------


def table_names(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names())


SCHEMA_COMMANDS = {
    "worker": ("worker", "--app", APP),
    "status": ("status",),
    "enqueue": ("enqueue", "k"),
}


@pytest.mark.slow
def test_the_cli_on_a_database_without_memtree_schema(db_url: str, engine: Engine) -> None:
    with engine.connect():
        pass  # an empty database: on SQLite an empty file (a missing one is its own error)
    for name, args in SCHEMA_COMMANDS.items():
        error = one_line_error(run_cli(*args, url=db_url))
        assert "no memtree schema" in error and "memtree db upgrade" in error, (name, error)
    assert table_names(engine) == set(), "nothing was created"


@pytest.mark.slow
def test_the_cli_on_an_older_schema_keeps_its_rows(db_url: str, engine: Engine) -> None:
    memtree.migration.upgrade(engine, "memtree_0002")
    insert_raw(engine, "job:old", payload_json='{"old": true}')
    before = raw_row(engine, "job:old")
    for name, args in SCHEMA_COMMANDS.items():
        error = one_line_error(run_cli(*args, url=db_url))
        assert "memtree_0002" in error and "memtree db upgrade" in error, (name, error)
    assert raw_row(engine, "job:old") == before
    assert memtree.migration.current(engine) == "memtree_0002"


@pytest.mark.slow
def test_the_cli_on_a_newer_schema_changes_nothing(db_url: str, engine: Engine) -> None:
    memtree.migration.upgrade(engine)
    with engine.begin() as conn:
        conn.execute(text("UPDATE memtree_alembic_version SET version_num = 'memtree_9999'"))
    insert_raw(engine, "job:future")
    before = raw_row(engine, "job:future")
    for name, args in [*SCHEMA_COMMANDS.items(), ("db upgrade", ("db", "upgrade"))]:
        error = one_line_error(run_cli(*args, url=db_url))
        assert "memtree_9999" in error, (name, error)
    assert raw_row(engine, "job:future") == before
    assert memtree.migration.current(engine) == "memtree_9999"


# -- a read-only SQLite file ---------------------------------------------------------------------


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def read_only_sqlite(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A migrated SQLite file with one job, that not even root can write (chattr +i; a plain
    chmod for other users)."""
    path = tmp_path / "readonly.db"
    queue = Queue(f"sqlite:///{path}")
    queue.migrate()
    queue.enqueue(NewJob("work", {"keep": "me"}))
    queue.close()
    assert not Path(f"{path}-wal").exists(), "everything checkpointed into the file"
    if os.geteuid() == 0:
        locked = subprocess.run(["chattr", "+i", str(path)], capture_output=True)
        if locked.returncode != 0:
            pytest.skip(f"cannot make a file read-only for root here: {locked.stderr!r}")
        unlock = ["chattr", "-i", str(path)]
    else:
        path.chmod(0o444)
        unlock = ["chmod", "644", str(path)]
    try:
        yield path, file_digest(path)
    finally:
        subprocess.run(unlock, check=True)


@pytest.mark.slow
def test_a_read_only_sqlite_file_gets_clear_errors_and_stays_intact(
    read_only_sqlite: tuple[Path, str],
) -> None:
    path, digest = read_only_sqlite
    for url in (f"sqlite:///{path}", f"sqlite:///file:{path}?mode=ro&uri=true"):
        queue = Queue(url)
        try:
            assert queue.count_total() == 1, "reading works"
            with pytest.raises(DatabaseError, match="readonly database"):
                queue.enqueue(NewJob("work"))
            with pytest.raises(DatabaseError, match="readonly database"):
                queue.claim_next()
        finally:
            queue.close()
    url = f"sqlite:///{path}"
    assert "readonly database" in one_line_error(run_cli("enqueue", "work", url=url))
    assert run_cli("status", url=url).returncode == 0
    # The worker does not exit (it backs off and retries every database error), but it says why.
    worker = subprocess.Popen(
        [str(MEMTREE), "--database-url", url, "worker", "--app", APP],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines: list[str] = []
        while not any("readonly database" in line for line in lines):
            assert worker.stderr is not None
            line = worker.stderr.readline()
            assert line, f"the worker exited without saying why: {''.join(lines)}"
            lines.append(line)
    finally:
        worker.terminate()
        worker.communicate(timeout=60)
    assert file_digest(path) == digest, "the file was not touched"
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert conn.execute("SELECT payload_json FROM mem_tree_jobs").fetchall() == [
            ('{"keep":"me"}',)
        ]
    finally:
        conn.close()


# -- credentials that must not leak --------------------------------------------------------------


PASSWORD = "S3cret/p@ss:w%rd"


class PasswordServer(threading.Thread):
    """Speaks just enough of the PostgreSQL protocol to ask for a password and refuse it."""

    def __init__(self) -> None:
        super().__init__(name="password-server", daemon=True)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.passwords: list[str] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn, contextlib.suppress(OSError, ValueError):
                conn.settimeout(10)
                self.refuse(conn)

    @staticmethod
    def read(conn: socket.socket, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = conn.recv(size - len(data))
            if not chunk:
                raise ValueError("closed")
            data += chunk
        return data

    def refuse(self, conn: socket.socket) -> None:
        while True:  # SSL and GSS encryption requests get "N", then comes the startup packet
            length = int.from_bytes(self.read(conn, 4), "big")
            body = self.read(conn, length - 4)
            if int.from_bytes(body[:4], "big") not in (80877103, 80877104):
                break
            conn.sendall(b"N")
        conn.sendall(b"R" + (8).to_bytes(4, "big") + (3).to_bytes(4, "big"))  # cleartext, please
        tag = self.read(conn, 1)
        length = int.from_bytes(self.read(conn, 4), "big")
        body = self.read(conn, length - 4)
        if tag == b"p":
            self.passwords.append(body.rstrip(b"\0").decode())
        fields = b'SFATAL\0VFATAL\0C28P01\0Mpassword authentication failed for user "app"\0\0'
        conn.sendall(b"E" + (len(fields) + 4).to_bytes(4, "big") + fields)

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=10)
        self.sock.close()


@pytest.fixture
def password_server() -> Iterator[PasswordServer]:
    server = PasswordServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def assert_password_hidden(result: subprocess.CompletedProcess[str]) -> None:
    output = result.stdout + result.stderr
    for form in (PASSWORD, quote(PASSWORD, safe=""), quote(PASSWORD)):
        assert form not in output, f"the password leaked: {output}"


@pytest.mark.slow
@pytest.mark.parametrize(
    "args",
    [
        ("db", "upgrade"),
        ("db", "current"),
        ("status", "--json"),
        ("enqueue", "work"),
        ("jobs", "list"),
        ("recover",),
        ("worker", "--app", APP),
    ],
    ids=lambda args: " ".join(args[:2]),
)
def test_a_wrong_password_is_a_clear_error_that_never_shows_the_password(
    password_server: PasswordServer, args: tuple[str, ...]
) -> None:
    url = f"postgresql://app:{quote(PASSWORD, safe='')}@127.0.0.1:{password_server.port}/app"
    result = run_cli(*args, url=url)
    error = one_line_error(result)
    assert "password authentication failed" in error
    assert_password_hidden(result)
    assert PASSWORD in password_server.passwords, "the URL's password was really sent"


@pytest.mark.slow
def test_a_password_in_the_environment_for_an_unknown_role_is_not_shown(
    pg_server_url: str,
) -> None:
    url = sqlalchemy.make_url(pg_server_url).set(username="nobody_here", password=PASSWORD)
    env = {k: v for k, v in os.environ.items() if k != "MEMTREE_DATABASE_URL"}
    env["MEMTREE_DATABASE_URL"] = url.render_as_string(hide_password=False)
    result = subprocess.run(
        [str(MEMTREE), "status"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60
    )
    assert '"nobody_here" does not exist' in one_line_error(result)
    assert_password_hidden(result)


# -- no pickle, no eval, no SQL built from strings -----------------------------------------------


SQL_SINKS = {
    "execute",
    "executemany",
    "executescript",
    "exec_driver_sql",
    "text",
    "literal_column",
    "prefix_with",
    "suffix_with",
    "with_hint",
}
SQL_WORDS = re.compile(
    r"\b(SELECT|INSERT|UPDATE|DELETE|PRAGMA|LISTEN|NOTIFY|DROP|CREATE|ALTER|BEGIN|WHERE|SET)\b"
)
FORBIDDEN_MODULES = {"pickle", "cPickle", "marshal", "shelve", "dill", "cloudpickle"}
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}

#: Statements built from strings that were judged safe, by file and exact source line.
ALLOWED = {
    (
        "memtree/engine.py",
        'cursor.execute(f"PRAGMA {name} = {value}")',
    ): "_set_pragma checks the value is an int or one of the pragma's keywords (tested below)",
    (
        "memtree/wakeup.py",
        'conn.execute(f"LISTEN {NOTIFY_CHANNEL}")',
    ): "a module constant (memtree_jobs); LISTEN takes an identifier, not a parameter",
    (
        "memtree/tree/demo/database.py",
        'conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {PG_SCHEMA} CASCADE")',
    ): "a module constant naming the demo's own schema",
    (
        "memtree/tree/demo/database.py",
        'conn.exec_driver_sql(f"CREATE SCHEMA {PG_SCHEMA}")',
    ): "a module constant naming the demo's own schema",
    (
        "memtree/doctor.py",
        'return exam.conn.exec_driver_sql(f"PRAGMA {name}").scalar()',
    ): "one of _READ_PRAGMAS, checked on the line before; a pragma takes no bound name",
    (
        "memtree/doctor.py",
        '"A WAL grows while checkpoints cannot keep up and keeps its size afterwards. If "',
    ): "advice text the doctor prints for an operator; never run",
    (
        "memtree/doctor.py",
        'advice.append(f"DROP INDEX CONCURRENTLY {name};  '
        "-- not memtree's: it only slows writes\")",
    ): "advice text the doctor prints for an operator; never run",
    (
        "memtree/doctor.py",
        '"A CREATE INDEX CONCURRENTLY that failed leaves its index invalid (one still being "',
    ): "advice text the doctor prints for an operator; never run",
    (
        "memtree/doctor.py",
        '"A queue table changes every row it holds, over and over: let autovacuum run on it "',
    ): "advice text the doctor prints for an operator; never run",
    (
        "memtree/migration.py",
        "return f\"CREATE INDEX {name} ON {table} ({', '.join(MYSQL_STATUS_INDEXES[name])})\"",
    ): "index_ddl: DDL of memtree's own index and table names, printed as advice, never run",
    (
        "memtree/migration.py",
        'return f"CREATE UNIQUE INDEX {name} ON {table} ({MYSQL_DEDUPE_COLUMN})"',
    ): "index_ddl: DDL of memtree's own index and table names, printed as advice, never run",
}


def built_string(node: ast.AST) -> bool:
    """An expression that builds a string at run time: an f-string with a value in it,
    ``%`` or ``+`` on a string, ``.format()`` or ``.join()``."""
    if isinstance(node, ast.JoinedStr):
        return any(isinstance(part, ast.FormattedValue) for part in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod | ast.Add):
        return any(
            isinstance(side, ast.Constant | ast.JoinedStr) and built_or_text(side)
            for side in (node.left, node.right)
        ) or built_string(node.left)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        return node.func.attr in ("format", "join") and isinstance(
            node.func.value, ast.Constant | ast.JoinedStr
        )
    return False


def built_or_text(node: ast.AST) -> bool:
    return isinstance(node, ast.JoinedStr) or (
        isinstance(node, ast.Constant) and isinstance(node.value, str)
    )


def string_parts(node: ast.AST) -> str:
    return " ".join(
        part.value
        for part in ast.walk(node)
        if isinstance(part, ast.Constant) and isinstance(part.value, str)
    )


def scan(source: str, filename: str) -> list[str]:
    """Everything in one module that the package must not do, as ``file:line: what``."""
    findings = []
    tree = ast.parse(source, filename)
    lines = source.splitlines()

    def report(node: ast.AST, what: str) -> None:
        number = getattr(node, "lineno", 0)
        line = lines[number - 1].strip()
        if (filename, line) not in ALLOWED:
            findings.append(f"{filename}:{number}: {what}: {line}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [alias.name for alias in node.names]
            if isinstance(node, ast.ImportFrom) and node.module:
                names.append(node.module)
            if any(name.split(".")[0] in FORBIDDEN_MODULES for name in names):
                report(node, "imports a deserialiser that runs code")
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            if isinstance(func, ast.Name) and name in FORBIDDEN_CALLS:
                report(node, f"calls {name}()")
            if name in SQL_SINKS and node.args and built_string(node.args[0]):
                report(node, f"passes a string built at run time to {name}()")
        if built_string(node) and SQL_WORDS.search(string_parts(node)):
            report(node, "builds SQL text from strings")
    return sorted(set(findings))


def package_sources() -> Iterator[tuple[str, str]]:
    for directory in (PACKAGE, ROOT / "migrations"):
        for path in sorted(directory.rglob("*.py")):
            yield path.relative_to(ROOT).as_posix(), path.read_text()


def test_the_package_has_no_pickle_no_eval_and_no_sql_built_from_strings() -> None:
    findings = [finding for name, source in package_sources() for finding in scan(source, name)]
    assert findings == []


def test_every_allowed_string_built_statement_is_still_there() -> None:
    sources = dict(package_sources())
    for filename, line in ALLOWED:
        assert line in {raw.strip() for raw in sources[filename].splitlines()}, (
            f"{filename} no longer has `{line}`: drop it from ALLOWED"
        )


@pytest.mark.parametrize(
    "snippet",
    [
        'conn.execute(f"SELECT * FROM t WHERE id = {job_id}")',
        "conn.execute(text(\"DELETE FROM t WHERE id = '%s'\" % job_id))",
        'sql = "UPDATE t SET a = {}".format(value)',
        "query = 'SELECT ' + column",
        'conn.exec_driver_sql("; ".join(statements))',
        "import pickle",
        "from marshal import loads",
        "eval(payload)",
        "exec(code)",
    ],
)
def test_the_scan_finds_what_it_forbids(snippet: str) -> None:
    assert scan(snippet, "memtree/example.py"), snippet


@pytest.mark.parametrize(
    "snippet",
    [
        'conn.execute(text("SELECT 1 FROM t WHERE id = :id"), {"id": job_id})',
        "conn.execute(select(jobs).where(jobs.c.id == job_id))",
        'log.info(f"claimed {count} jobs")',
        'raise ValueError(f"kind {kind!r} is retired")',
    ],
)
def test_the_scan_lets_bound_parameters_and_messages_through(snippet: str) -> None:
    assert scan(snippet, "memtree/example.py") == []


def test_the_values_of_the_allowed_pragmas_cannot_carry_sql() -> None:
    with pytest.raises(memtree.ConfigurationError):
        memtree.create_engine("sqlite://", sqlite_synchronous="NORMAL; DROP TABLE mem_tree_jobs")
    with pytest.raises(ValueError):
        memtree.create_engine("sqlite://", sqlite_busy_timeout_ms="1; DROP TABLE x")  # type: ignore[arg-type]
    with pytest.raises(memtree.ConfigurationError):
        memtree.create_engine("sqlite://", sqlite_journal_mode="WAL; DROP TABLE mem_tree_jobs")
