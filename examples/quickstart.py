"""memtree in one file: migrate a SQLite file, enqueue inside a domain transaction, claim, settle.

Run it with ``python examples/quickstart.py [path/to/file.db]``.
"""

from __future__ import annotations

import sys
import zlib

from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import memtree
import memtree.tree
from memtree import JobFailure, JobStatus
from memtree.tree import jobs
from memtree.tree.payloads import Leaf, SourceTarget


class Base(DeclarativeBase):
    pass


class Chunk(Base):
    """The application's own table: the text a memory tree is built from."""

    __tablename__ = "quickstart_chunks"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    text: Mapped[str] = mapped_column(String(2000))
    extracted: Mapped[bool] = mapped_column(default=False)


def main(path: str) -> None:
    engine = memtree.create_engine(f"sqlite:///{path}")
    queue = memtree.tree.queue(engine)  # the memory tree's claim order and retired kinds
    queue.migrate()  # what `memtree db upgrade` does
    Base.metadata.create_all(engine)

    # 1. The app writes its chunks and enqueues their jobs in ONE transaction.
    with Session(engine) as session, session.begin():
        for n, text in enumerate(["the cat sat", "on the mat", "the cat sat"]):
            chunk_id = f"chunk-{zlib.crc32(text.encode()) % 10_000}"
            if session.get(Chunk, chunk_id) is None:
                session.add(Chunk(id=chunk_id, text=text))
            job_id = memtree.enqueue(session, jobs.extract_chunk(chunk_id))
            print(f"enqueue #{n} extract_chunk({chunk_id!r}) -> {job_id or 'deduped'}")

    # 2. A worker claims a batch under a lease and settles each job.
    for job in queue.claim_batch(10, kinds=["extract_chunk"]):
        chunk_id = job.payload["chunk_id"]
        if chunk_id.endswith("7"):
            queue.mark_failed(job, "model said no", JobFailure.transient("llm_busy"))
            print(f"failed  {job.kind} {job.id}: transient, retried after backoff")
            continue
        # The handler's write, its follow-up and the completion commit together.
        with Session(engine) as session, session.begin():
            session.get_one(Chunk, chunk_id).extracted = True
            followup = jobs.append_buffer(Leaf(chunk_id), SourceTarget("quickstart"))
            settled = memtree.mark_done(session, job, [followup])
        print(f"settled {job.kind} {job.id}: {'done' if settled else 'lease lost'}")

    for status in JobStatus:
        print(f"{status.value:>9}: {queue.count_by_status(status)}")
    print(f"database: {path}")
    queue.close()
    engine.dispose()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "memtree-quickstart.db")
