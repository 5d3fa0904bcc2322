"""memtree's Alembic revisions, on the ``memtree`` branch."""
