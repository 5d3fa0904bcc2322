"""Starting and stopping fleet worker processes (see :mod:`tests.fleet.fleet_worker`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def launch(config: dict[str, Any], log_dir: Path) -> subprocess.Popen[str]:
    """A fleet worker process for ``config``, started and past its imports."""
    log_dir.mkdir(parents=True, exist_ok=True)
    index = len(list(log_dir.glob("worker-*.log")))
    log_path = log_dir / f"worker-{index}.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log_path, "w") as log:  # the child keeps its own descriptor
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.fleet.fleet_worker", json.dumps(config)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
    assert process.stdout is not None
    line = process.stdout.readline()
    if line.strip() != "ready":
        process.kill()
        process.wait()
        _close(process)
        raise AssertionError(f"worker did not start: {log_path.read_text()[-2000:]}")
    return process


def stop(process: subprocess.Popen[str], timeout: float = 20.0) -> int:
    """SIGTERM, and wait for a graceful exit; its return code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError("worker did not stop on SIGTERM") from None
    finally:
        _close(process)


def kill(process: subprocess.Popen[str]) -> None:
    """SIGKILL, and wait until the process is gone."""
    process.kill()
    process.wait()
    _close(process)


def _close(process: subprocess.Popen[str]) -> None:
    if process.stdout is not None:
        process.stdout.close()
