"""``memtree demo``: the memory tree's own pipeline, end to end, on a fresh SQLite file.

The demo owns three things and nothing else:

- **Its database.** A SQLite file (``memtree-demo.db`` in the current directory by
  default) that it deletes and rebuilds on every run: memtree's ``mem_tree_jobs`` table
  (migrated as ``memtree db upgrade`` would) plus the demo's own ``demo_*`` tables for
  trees, chunks, summaries and buffers. It refuses to delete a file that holds anything
  else. An explicit PostgreSQL URL runs the demo in a schema of its own,
  ``memtree_demo``, which it drops and recreates; the application's tables are never read.
- **Its handlers.** ``extract_chunk``, ``append_buffer``, ``seal`` and ``flush_stale``
  built on a deterministic stand-in LLM that is slow, sometimes times out and
  sometimes asks to be called later, so the run shows retries, deferrals and dedupe.
- **Its corpus.** A few short notes shipped in ``memtree/tree/demo/notes/``, or any
  directory of ``.txt`` files.

The pipeline is the original's: ingest writes chunks and enqueues ``extract_chunk`` in
the same transaction; extraction appends each leaf to its source tree's level-0
buffer; a buffer holding ``FANOUT`` nodes is sealed into a summary one level up; at the
end ``flush_stale`` seals what is left open until every tree has exactly one root.
Every handler writes through ``ctx.session``, so its writes, its follow-up jobs and its
completion commit together.

:func:`run_demo` does it all and returns a :class:`DemoReport`; ``memtree demo`` calls it.

The modules, by what they do: :mod:`~memtree.tree.demo.corpus`, :mod:`~memtree.tree.demo.llm`
(the stand-in), :mod:`~memtree.tree.demo.handlers`, :mod:`~memtree.tree.demo.database`,
:mod:`~memtree.tree.demo.run` and :mod:`~memtree.tree.demo.report`. The demo runs on the tree's
own queue and worker (:func:`memtree.tree.queue`, :func:`memtree.tree.worker`).
"""

from memtree.tree.demo.corpus import CHUNK_WORDS, chunk_id, chunk_text, load_corpus
from memtree.tree.demo.errors import DemoError
from memtree.tree.demo.handlers import FANOUT, build_handlers
from memtree.tree.demo.report import DemoReport
from memtree.tree.demo.run import DEFAULT_DB, run_demo

__all__ = [
    "CHUNK_WORDS",
    "DEFAULT_DB",
    "FANOUT",
    "DemoError",
    "DemoReport",
    "build_handlers",
    "chunk_id",
    "chunk_text",
    "load_corpus",
    "run_demo",
]
