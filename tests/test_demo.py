"""``memtree demo`` on SQLite: the pipeline ends with every job done and one root per tree,
and what the report says is what the database holds.

The demo's own tables and ``mem_tree_jobs`` are read back here with plain ``sqlite3``,
not through the demo's models or its report code, so a wrong count cannot agree with
itself.
"""

from __future__ import annotations

import io
import json
import os
import sqlite3
import subprocess
import sys
from collections import Counter
from contextlib import closing
from pathlib import Path

import pytest
from rich.console import Console

from memtree.tree import demo
from memtree.tree.demo import DemoError, DemoReport, chunk_id, chunk_text, llm, run_demo
from memtree.tree.demo import run as demo_run

pytestmark = pytest.mark.sqlite

MEMTREE = Path(sys.executable).parent / "memtree"

REPEATED = (
    "The kettle in the back room takes exactly four minutes to boil, which is how long "
    "it takes to water the seedlings on the windowsill and check the thermometer outside."
)

ALLOTMENT = f"""Allotment diary.

Dug over the far bed and found the old brick path under the couch grass. Laid the bricks
along the edge so the barrow has something firm to run on after rain.

Planted garlic cloves in two rows, pointed end up, a hand's width apart. The soil was
cold and heavy, so each clove went in on a pinch of sharp sand.

{REPEATED}

Pigeons stripped the purple sprouting broccoli again. The netting sagged under the frost
and they walked straight in. New hoops go in this weekend, higher and tighter.

Swapped seed potatoes with the plot next door: their Pink Fir Apple for my Charlotte.
Both sets are chitting on egg boxes in the shed, under the south window.

The water trough froze solid twice this week; the tap by the gate is lagged now.
"""

WORKBENCH = f"""Workbench notes.

Sharpened the block plane and flattened the back of the wide chisel on the diamond
plate. The chisel took most of an hour; the plane iron was quicker than expected.

{REPEATED}

Glued up the small shelf for the hall. Three clamps were not enough for the long joint,
so the middle was weighted with the box of old encyclopaedias overnight.

Oiled the shelf twice with thinned linseed, a day apart, and rubbed it back between
coats. The grain came up warm and the knots darkened nicely.

Still to do: fit the hanging plates, find two wall plugs that are not bent, and sweep
the shavings out from under the bench before they reach the kitchen.
"""


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    directory = tmp_path / "corpus"
    directory.mkdir()
    (directory / "allotment.txt").write_text(ALLOTMENT, encoding="utf-8")
    (directory / "workbench.txt").write_text(WORKBENCH, encoding="utf-8")
    (directory / "ignored.md").write_text("not a note", encoding="utf-8")
    return directory


@pytest.fixture(autouse=True)
def deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run takes about a second; a tree that never converges fails in seconds, not minutes."""
    monkeypatch.setattr(demo_run, "DEADLINE_S", 30.0)


@pytest.fixture
def faulty(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the stand-in LLM time out and rate limit often enough to happen on a small corpus."""
    monkeypatch.setattr(llm, "FAIL_ONE_IN", 3)
    monkeypatch.setattr(llm, "DEFER_ONE_IN", 3)


def rows(db: Path, sql: str) -> list[tuple[object, ...]]:
    with closing(sqlite3.connect(db)) as conn:
        return list(conn.execute(sql))


def one(db: Path, sql: str) -> object:
    return rows(db, sql)[0][0]


def run(tmp_path: Path, corpus: Path) -> tuple[DemoReport, Path, str]:
    db = tmp_path / "demo.db"
    out = io.StringIO()
    report = run_demo(str(db), str(corpus), console=Console(file=out, width=120))
    return report, db, out.getvalue()


# -- chunking ------------------------------------------------------------------------------


def test_chunks_stay_inside_paragraphs_and_repeat_with_their_text() -> None:
    pieces = chunk_text(ALLOTMENT)
    assert all(len(piece.split()) <= demo.CHUNK_WORDS for piece in pieces)
    assert " ".join(pieces).split() == ALLOTMENT.split(), "no word lost or invented"
    repeated = chunk_text(REPEATED)
    assert [chunk_id(p) for p in repeated] == [
        chunk_id(p) for p in chunk_text(WORKBENCH) if p in repeated
    ]


# -- the pipeline end to end ---------------------------------------------------------------


def test_every_job_ends_done_and_each_tree_has_one_root(
    tmp_path: Path, corpus: Path, faulty: None
) -> None:
    report, db, _ = run(tmp_path, corpus)

    statuses = Counter(str(status) for (status,) in rows(db, "SELECT status FROM mem_tree_jobs"))
    assert set(statuses) == {"done"}, statuses
    assert report.count("failed") == 0

    trees = {str(t) for (t,) in rows(db, "SELECT id FROM demo_trees")}
    assert trees == {"allotment", "workbench"}
    for tree in trees:
        open_chunks = rows(
            db,
            f"SELECT 'leaf:' || id, 0 FROM demo_chunks "
            f"WHERE tree_id = '{tree}' AND parent_id IS NULL",
        )
        open_summaries = rows(
            db,
            f"SELECT 'summary:' || id, level FROM demo_summaries "
            f"WHERE tree_id = '{tree}' AND parent_id IS NULL",
        )
        parentless = open_chunks + open_summaries
        assert len(parentless) == 1, f"{tree}: {parentless}"
        root, root_level = parentless[0]
        top = one(db, f"SELECT MAX(level) FROM demo_summaries WHERE tree_id = '{tree}'")
        assert root_level == top, f"{tree}: the root is not at the top level"
        assert one(db, f"SELECT root_ref FROM demo_trees WHERE id = '{tree}'") == root
        assert report.trees[tree].root == root
        # Every other node hangs under exactly one summary: the tree is connected.
        nodes = one(db, f"SELECT COUNT(*) FROM demo_chunks WHERE tree_id = '{tree}'")
        summaries = one(db, f"SELECT COUNT(*) FROM demo_summaries WHERE tree_id = '{tree}'")
        children = one(db, f"SELECT SUM(child_count) FROM demo_summaries WHERE tree_id = '{tree}'")
        assert isinstance(nodes, int) and isinstance(summaries, int)
        assert children == nodes + summaries - 1, tree
        # And at the end each tree's buffers hold its root and nothing else.
        held = [
            i
            for (j,) in rows(db, f"SELECT items_json FROM demo_buffers WHERE tree_id = '{tree}'")
            for i in json.loads(str(j))
        ]
        assert held == [root], tree
    assert report.tree_depth >= 1

    assert one(db, "SELECT COUNT(*) FROM demo_chunks WHERE extracted_at_ms IS NULL") == 0
    assert one(db, "SELECT COUNT(*) FROM demo_chunks WHERE entities_json IS NULL") == 0


def test_the_report_is_what_the_database_holds(tmp_path: Path, corpus: Path, faulty: None) -> None:
    report, db, output = run(tmp_path, corpus)

    # Repeated paragraph: the same chunk ids, so their extract jobs were deduped.
    read = [piece for text in (ALLOTMENT, WORKBENCH) for piece in chunk_text(text)]
    distinct = {chunk_id(piece) for piece in read}
    assert report.pieces == len(read)
    assert report.chunks == len(distinct) == one(db, "SELECT COUNT(*) FROM demo_chunks")
    assert report.duplicate_chunks == len(read) - len(distinct) >= 1
    assert one(db, "SELECT COUNT(*) FROM mem_tree_jobs WHERE kind = 'extract_chunk'") == len(
        distinct
    )
    assert report.suppressed_duplicates >= 1

    # Seal requests the handlers made, against the seal rows the queue kept.
    requests = one(db, "SELECT SUM(seal_requests) FROM demo_buffers")
    seals = one(db, "SELECT COUNT(*) FROM mem_tree_jobs WHERE kind = 'seal'")
    assert isinstance(requests, int) and isinstance(seals, int)
    assert report.seal_requests == requests
    assert report.suppressed_seals == requests - seals >= 0

    # Retries: each timeout the stand-in raised is one extra attempt of one extract job.
    extra_attempts = one(db, "SELECT SUM(attempts - 1) FROM mem_tree_jobs WHERE status = 'done'")
    retried = one(
        db, "SELECT COUNT(*) FROM mem_tree_jobs WHERE kind = 'extract_chunk' AND attempts > 1"
    )
    assert report.transient_failures >= 1, "the faulty stand-in never timed out"
    assert report.retries == report.transient_failures == extra_attempts == retried

    # Deferrals: counted by the handlers, and recorded on the chunks that were deferred.
    assert report.deferrals >= 1, "the faulty stand-in never rate limited"
    assert report.deferrals == one(db, "SELECT SUM(deferrals) FROM demo_chunks")
    assert one(db, "SELECT MAX(deferrals) FROM demo_chunks") == 1, "deferred only on first sight"

    jobs: dict[str, dict[str, int]] = {}
    for kind, status, count in rows(
        db, "SELECT kind, status, COUNT(*) FROM mem_tree_jobs GROUP BY kind, status"
    ):
        assert isinstance(count, int)
        jobs.setdefault(str(kind), {})[str(status)] = count
    assert report.jobs == jobs
    assert report.total_jobs == one(db, "SELECT COUNT(*) FROM mem_tree_jobs")
    assert report.summaries == one(db, "SELECT COUNT(*) FROM demo_summaries")
    assert report.tree_depth == one(db, "SELECT MAX(level) FROM demo_summaries")
    assert report.throughput > 0

    assert str(db) in output
    assert "jobs by kind and status" in output
    assert f"sqlite:///{db} status" in output


def test_a_rerun_starts_from_a_fresh_file(tmp_path: Path, corpus: Path) -> None:
    db = tmp_path / "demo.db"
    first = run_demo(str(db), str(corpus), quiet=True)
    second = run_demo(str(db), str(corpus), quiet=True)
    assert second.chunks == first.chunks
    assert second.jobs["extract_chunk"] == {"done": first.chunks}
    assert one(db, "SELECT COUNT(*) FROM demo_trees") == 2


def test_the_demo_will_not_delete_a_database_it_did_not_make(tmp_path: Path, corpus: Path) -> None:
    app = tmp_path / "app.db"
    with closing(sqlite3.connect(app)) as conn:
        conn.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY)")
        conn.commit()
    with pytest.raises(DemoError, match="orders"):
        run_demo(str(app), str(corpus), quiet=True)
    assert rows(app, "SELECT name FROM sqlite_master WHERE type = 'table'") == [("orders",)]

    text = tmp_path / "notes.db"
    text.write_text("not a database")
    with pytest.raises(DemoError, match="not a SQLite database"):
        run_demo(str(text), str(corpus), quiet=True)
    assert text.read_text() == "not a database"


def test_an_empty_corpus_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DemoError, match=r"no \.txt files"):
        run_demo(str(tmp_path / "d.db"), str(tmp_path), quiet=True)


# -- the command ---------------------------------------------------------------------------


def test_memtree_demo_runs_the_built_in_corpus(tmp_path: Path) -> None:
    db = tmp_path / "d.db"
    env = {k: v for k, v in os.environ.items() if k != "MEMTREE_DATABASE_URL"}
    result = subprocess.run(
        [str(MEMTREE), "demo", "--db", str(db)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert f"database: {db}" in result.stdout
    assert "jobs by kind and status" in result.stdout
    assert "Traceback" not in result.stderr
    statuses = {str(s) for (s,) in rows(db, "SELECT DISTINCT status FROM mem_tree_jobs")}
    assert statuses == {"done"}
    assert not (tmp_path / demo.DEFAULT_DB).exists(), "--db was not honoured"
