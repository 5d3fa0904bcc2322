"""Child processes: a worker under test runs in a process of its own.

The protocol is lines on stdout and stdin. A child sets itself up, prints ``READY``,
waits for ``GO`` on stdin, works, and prints ``RESULT {json}``. A long-running worker
(the latency workload) prints ``DONE <seq> <epoch seconds>`` as each job starts and
stops when it reads ``STOP`` (or stdin closes).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# -- the child's side ----------------------------------------------------------------------

_out_lock = threading.Lock()


def say(line: str) -> None:
    with _out_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def ready_and_wait() -> None:
    """Tell the parent we are set up, and block until it says go."""
    say("READY")
    line = sys.stdin.readline()
    if line.strip() != "GO":
        raise SystemExit(f"expected GO, got {line!r}")


def result(payload: dict[str, Any]) -> None:
    say("RESULT " + json.dumps(payload))


def on_stop(callback: Callable[[], object]) -> threading.Thread:
    """Call ``callback`` once the parent says STOP or closes stdin."""

    def wait() -> None:
        for line in sys.stdin:
            if line.strip() == "STOP":
                break
        callback()

    thread = threading.Thread(target=wait, name="bench-stop", daemon=True)
    thread.start()
    return thread


def rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


# -- the parent's side ---------------------------------------------------------------------


class ChildError(RuntimeError):
    pass


_profiled = itertools.count(1)


def _command(role: str, spec: dict[str, Any]) -> list[str]:
    """The child's command line; under ``MEMTREE_BENCH_PYSPY=DIR`` memtree's children run
    under ``py-spy record`` (raw collapsed stacks, all threads, into DIR; more py-spy
    options in ``MEMTREE_BENCH_PYSPY_ARGS``, e.g. ``--gil`` for CPU time only)."""
    command = [sys.executable, "-m", "benchmarks.child", role, json.dumps(spec)]
    profile_dir = os.environ.get("MEMTREE_BENCH_PYSPY")
    if not profile_dir or not role.startswith("memtree-"):
        return command
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    Path(profile_dir).mkdir(parents=True, exist_ok=True)
    out = Path(profile_dir) / f"{role}-{spec.get('backend', '')}-{next(_profiled)}.txt"
    rate = os.environ.get("MEMTREE_BENCH_PYSPY_RATE", "250")
    record = [py_spy, "record", "--nonblocking", "-r", rate, "-f", "raw", "-o", str(out)]
    extra = os.environ.get("MEMTREE_BENCH_PYSPY_ARGS", "").split()  # e.g. "--gil" or "--idle"
    return [*record, *extra, "--", *command]


class Child:
    """One ``python -m benchmarks.child ROLE SPEC`` process and its line protocol."""

    def __init__(self, role: str, spec: dict[str, Any]) -> None:
        self.role = role
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            _command(role, spec),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            cwd=Path(__file__).resolve().parent.parent,
            env=env,
        )
        self._buffer = b""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr_tail(self, limit: int = 3000) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-limit:]

    def readline(self, timeout: float) -> str:
        """The next stdout line; a ChildError when the child dies or stays silent."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChildError(f"{self.role}: no answer in {timeout:.0f}s\n{self.stderr_tail()}")
            readable, _, _ = select.select([fd], [], [], left)
            if not readable:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                self.proc.wait(timeout=10)
                raise ChildError(
                    f"{self.role} exited with {self.proc.returncode}:\n{self.stderr_tail()}"
                )
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def expect(self, word: str, timeout: float) -> str:
        while True:
            line = self.readline(timeout)
            if line.startswith(word):
                return line[len(word) :].strip()

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write((line + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise ChildError(f"{self.role} is gone:\n{self.stderr_tail()}") from None

    def result(self, timeout: float) -> dict[str, Any]:
        payload: dict[str, Any] = json.loads(self.expect("RESULT", timeout))
        return payload

    def close(self, timeout: float = 30.0) -> None:
        """Let it exit; kill it if it does not (only this child, by its own pid)."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()


def run_together(role: str, specs: list[dict[str, Any]], *, timeout: float) -> list[dict[str, Any]]:
    """Start one child per spec, wait until all are set up, start them at once, and
    collect their results."""
    children = [Child(role, spec) for spec in specs]
    try:
        for child in children:
            child.expect("READY", 120)
        for child in children:
            child.send("GO")
        return [child.result(timeout) for child in children]
    finally:
        for child in children:
            child.close()
