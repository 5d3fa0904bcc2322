"""Settings checked when a :class:`memtree.Queue` or :class:`memtree.Worker` is built.

An explicit 0 or a negative value is refused here, never replaced by a default later
(``lease or default`` would turn ``lock_duration_ms=0`` into five minutes). ``None``
is how a caller asks for the default.
"""

from __future__ import annotations

import math

from memtree.errors import ConfigurationError

__all__ = ["positive_int", "seconds"]


def positive_int(name: str, value: object, *, allow_zero: bool = False) -> int:
    """``value`` as an int > 0 (>= 0 with ``allow_zero``), or :class:`ConfigurationError`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationError(f"{name} must be an int, not {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigurationError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, not {value}")
    return value


def seconds(name: str, value: object, *, allow_zero: bool = False) -> float:
    """``value`` as a finite number of seconds > 0 (>= 0 with ``allow_zero``)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigurationError(f"{name} must be a finite number of seconds, not {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigurationError(f"{name} must be {'>= 0' if allow_zero else '> 0'} s, not {value}")
    return float(value)
