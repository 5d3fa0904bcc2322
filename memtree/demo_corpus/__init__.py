"""The demo's built-in corpus: a few short notes, read by ``memtree demo`` as package data."""
