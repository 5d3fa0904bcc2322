"""What a database error means for the worker, read by :mod:`memtree.dberrors`: how long to
back off, and whether a run failed because the database could not be reached."""

from memtree.dberrors import classify_error, is_infrastructure_error

__all__ = ["classify_error", "is_infrastructure_error"]
