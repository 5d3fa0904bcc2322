"""A claiming process for the concurrency tests: ``python -m tests.claimers URL THREADS OUT``.

Each thread claims small batches until the queue stays empty, settles each job done,
and the process writes every (job id, lease token) it settled to OUT, one per line.
"""

from __future__ import annotations

import sys
import threading
import time

from memtree import Queue


def work(queue: Queue, settled: list[str], lock: threading.Lock) -> None:
    idle_since: float | None = None
    while True:
        batch = queue.claim_batch(5)
        if not batch:
            idle_since = idle_since or time.monotonic()
            if time.monotonic() - idle_since > 1.0:
                return
            time.sleep(0.01)
            continue
        idle_since = None
        for job in batch:
            if queue.mark_done(job):
                with lock:
                    settled.append(f"{job.id} {job.lease_token}")


def main(url: str, threads: int, out: str) -> None:
    queue = Queue(url)
    settled: list[str] = []
    lock = threading.Lock()
    workers = [threading.Thread(target=work, args=(queue, settled, lock)) for _ in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    queue.close()
    with open(out, "w") as handle:
        handle.write("\n".join(settled))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
