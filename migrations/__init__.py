"""memtree's Alembic environment (installed as ``memtree.migrations``)."""
