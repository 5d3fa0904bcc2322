"""The producer: the worker's loop, and the one owner of its claims.

One thread runs it. Each turn it checks the SQLite file, extends the leases of running
jobs (the heartbeat), tells running jobs that were asked to stop, runs upkeep on its
intervals, and then, in one transaction, settles the completer's waiting batch and
claims exactly as many jobs as it has free slots and gate permits. Claimed jobs go to
the executor of their handler (threads for ``def``, the event loop for ``async def``);
executors report back through :meth:`Producer.finished`. It never builds a statement:
it calls store/settle functions inside :meth:`Queue.transaction`, where driver errors
are translated.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import exc as sa_exc

from memtree import maintenance, tracing, wakeup
from memtree.errors import DatabaseError, DatabaseFileChangedError, MemtreeError
from memtree.limits import Gate, Limit, RateLimit
from memtree.queue import ClaimGroup, Queue
from memtree.redact import scrub
from memtree.types import Job
from memtree.worker.completer import Completer, Finished, retrying
from memtree.worker.context import AsyncJobContext, JobContext
from memtree.worker.dbfile import DatabaseFile
from memtree.worker.faults import classify_error
from memtree.worker.outcome import Chain, Run

if TYPE_CHECKING:
    from memtree.worker.aio import AsyncExecutor
    from memtree.worker.executor import ThreadExecutor
    from memtree.worker.worker import Worker

__all__ = ["ClaimPlan", "Group", "Producer"]

log = logging.getLogger("memtree.worker")


@dataclass(frozen=True, eq=False)
class Group:
    """Kinds claimed together: those of one gate and rate limit (or of neither)."""

    gate: Gate | None
    kinds: tuple[str, ...]
    #: The fleet-wide limit its claims go through: a global gate, a rate limit, or both.
    limit: Limit | None

    @property
    def local_gate(self) -> Gate | None:
        """The gate counted here, in memory: a process gate."""
        return self.gate if self.gate is not None and not self.gate.is_global else None


#: Per claim group: the group, its cap.
ClaimPlan = list[tuple[Group, int]]


class Producer:
    """Claims, dispatches and watches the runs of one :class:`~memtree.worker.Worker`."""

    def __init__(self, worker: Worker, completer: Completer, stopping: threading.Event) -> None:
        self.worker = worker
        self.queue = worker.queue
        self.completer = completer
        self.concurrency = worker.concurrency
        self.lock_duration_ms = worker.lock_duration_ms
        self.threads: ThreadExecutor | None = None
        self.aio: AsyncExecutor | None = None
        self._async_kinds = worker.async_kinds
        self._gate_of: dict[str, Gate] = {}
        for gate in worker.gates:
            for kind in gate.kinds:
                self._gate_of[kind] = gate
        rate_of = {kind: rate for rate in worker.rate_limits for kind in rate.kinds}
        order = {kind: i for i, kind in enumerate(self.queue.claim_order)}
        # Claim groups: the handled kinds of each (gate, rate limit) pair, the ungated
        # kinds last; a group with a global gate or a rate limit claims through it.
        members: dict[tuple[Gate | None, RateLimit | None], list[str]] = {}
        for kind in worker.handlers:
            members.setdefault((self._gate_of.get(kind), rate_of.get(kind)), []).append(kind)
        groups: list[Group] = []
        for (kinds_gate, rate), kinds in members.items():
            fleet = kinds_gate if kinds_gate is not None and kinds_gate.is_global else None
            limit = Limit(fleet, rate) if fleet is not None or rate is not None else None
            groups.append(Group(kinds_gate, tuple(kinds), limit))
        groups.sort(key=lambda g: min(order.get(k, len(order)) for k in g.kinds))
        self._groups = groups
        self._group_of = {kind: group for group in groups for kind in group.kinds}
        #: Per limited group, the monotonic time before which its limit is known full.
        self._blocked: dict[int, float] = {}
        #: Per group, how often a permit of it may have freed (see _unblock): a claim's
        #: "full" answer is stale when this moved while the claim ran.
        self._unblocks: list[int] = [0] * len(groups)
        #: Kinds whose global permits freed here since the last claim: notified with it.
        self._freed: set[str] = set()
        #: Per group with a global gate, this worker's runs of it that ended since its
        #: limit was found full, and how many make a claim worth a transaction: a quarter
        #: of what the worker could run of it, as for its slots, so a full gate is
        #: claimed from in batches rather than one permit per claim.
        self._returned = [0] * len(groups)
        self._batch_of = [self._gate_batch(group) for group in groups]

        self._lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = stopping
        self._running: dict[str, Run] = {}
        self._gate_busy: dict[str, int] = {gate.name: 0 for gate in worker.gates}
        self._database_file = DatabaseFile.of(self.queue.engine)
        self.database_lost: DatabaseFileChangedError | None = None
        # A busy worker claims once this many slots are free (see _claim_plan).
        self._claim_batch = max(1, self.concurrency // 4)
        self._next_heartbeat = 0.0
        self.registered = False
        self._started_ms: int | None = None
        self._next_cancel_check = 0.0
        self.listener: wakeup.Listener | None = None

    # -- what executors call -----------------------------------------------------------

    def new_run(self, job: Job, traced: bool) -> Run:
        """The record of a claim this worker will run, with its handler's context."""
        context: JobContext
        if job.kind in self._async_kinds:
            assert self.aio is not None
            context = self.aio.context(job)
        else:
            context = JobContext(job, self.queue, self.worker.session_factory)
        return Run(job, context, self._gate_of.get(job.kind), traced)

    def claimed(self, job: Job, now_ms: int) -> None:
        if self.worker.metrics is not None:
            self.worker.metrics.on_claimed(job, now_ms)

    def follower_kinds(self, run: Run, chain: Chain) -> tuple[str, ...]:
        """The kinds a finishing thread may claim as its next job, in its own transaction:
        the sync kinds of the ungated group and of each gate with a permit free (the
        finishing job's own permit counts as free). A permit of every other such gate is
        held for the moment of the claim (``chain.reserved``, given back by
        :meth:`finished`), so the loop cannot hand it out twice."""
        with self._lock:
            if self.stopping.is_set():
                return ()
            kinds: list[str] = []
            for group in self._groups:
                if group.limit is not None:
                    continue  # claimed through the fleet's limit, by the loop only
                sync = [kind for kind in group.kinds if kind not in self._async_kinds]
                if not sync:
                    continue
                gate = group.local_gate
                if gate is not None and gate is not run.gate:
                    if self._gate_busy[gate.name] >= gate.limit:
                        continue
                    self._gate_busy[gate.name] += 1
                    chain.reserved.append(gate)
                kinds.extend(sync)
        return tuple(kinds)

    def finished(self, run: Run, done: Finished | None, chain: Chain | None = None) -> None:
        """A run ended: ``done`` waits for the batched settle, otherwise the executor
        settled it. Frees its slot and gate permit and takes on the follower it claimed."""
        follower = chain.follower if chain is not None else None
        with self._lock:
            self._running.pop(run.job.id, None)
            permit_freed = False
            if run.gate is not None:
                self._gate_busy[run.gate.name] -= 1
                permit_freed = not run.gate.is_global
                if run.gate.is_global:
                    self._freed.add(run.job.kind)
                    index = self._groups.index(self._group_of[run.job.kind])
                    self._returned[index] += 1
                    if (
                        self._returned[index] >= self._batch_of[index]
                        or self._gate_busy[run.gate.name] == 0
                    ):
                        self._unblock(run.job.kind)
                        permit_freed = True
            for gate in chain.reserved if chain is not None else ():
                self._gate_busy[gate.name] -= 1
            if follower is not None:
                self._running[follower.job.id] = follower
                if follower.gate is not None:
                    self._gate_busy[follower.gate.name] += 1
            first = done is not None and self.completer.add(done)
            # Wake the loop only when it has something to do: a gate permit or the
            # claim threshold freed, the last job finished, the first completion to
            # settle (it arms the flush timer), or a run settled without claiming its
            # successor. Waking it for every job of a fast kind costs more than the jobs.
            wake = (
                (done is None and follower is None)
                or (permit_freed and (follower is None or follower.gate is not run.gate))
                or not self._running
                or first
                or self.concurrency - len(self._running) == self._claim_batch
            )
        if wake:
            self.wake.set()

    @property
    def running_jobs(self) -> list[Job]:
        with self._lock:
            return [run.job for run in self._running.values()]

    # -- the loop ----------------------------------------------------------------------

    def start(self, *, listen: bool) -> None:
        self.database_file_changed()  # records the file's identity the first time
        wakeup.subscribe(self.queue.engine, self.wake)
        if listen and self.queue.dialect.notifies and self.listener is None:
            self.listener = wakeup.Listener(self.queue.engine, self._on_notify)
            self.listener.start()

    def _on_notify(self, kind: str) -> None:
        if kind in self.worker.handlers:
            with self._lock:
                self._unblock(kind)
            self.wake.set()

    def _gate_batch(self, group: Group) -> int:
        gate = group.limit.gate if group.limit is not None else None
        if gate is None:
            return 1
        room = self.concurrency if gate.key else min(gate.limit, self.concurrency)
        return max(1, room // 4)

    def _unblock(self, kind: str) -> None:
        """A permit of ``kind``'s group may have freed: look at its limit again (under the
        lock)."""
        group = self._group_of.get(kind)
        if group is not None:
            index = self._groups.index(group)
            self._blocked.pop(index, None)
            self._unblocks[index] += 1

    def loop(self, *, until_idle: bool) -> None:
        while not self.stopping.is_set():
            self.wake.clear()
            if self.database_file_changed():
                return
            self.heartbeat()
            self._check_cancels()
            if not until_idle:
                self._maintain()
            if self._exchange():
                continue
            with self._lock:
                busy = bool(self._running) or bool(self.completer.pending)
            flush_in = self.completer.flush_in()
            timeout, due_now = self._idle_timeout(until_idle)
            if until_idle and not busy and not due_now:
                return
            if flush_in is not None:
                timeout = max(min(timeout or flush_in, flush_in), 0.001)
            self.wake.wait(self.worker.poll_interval_s if timeout is None else timeout)

    def _claim_plan(self) -> tuple[int, ClaimPlan]:
        """How many jobs to claim, and per claim group its gate, cap and kinds.

        While handlers run, the worker waits until a quarter of its slots are free, so a
        busy worker claims in batches instead of one job per statement; an idle one claims
        at once, however few slots it has. A full gate has no cap left: its kinds are not
        claimed, and nothing spins. A gate's cap is held (counted busy) until
        :meth:`_release_plan`, so a handler thread claiming its successor meanwhile cannot
        take the same permits.
        """
        with self._lock:
            running = len(self._running)
            free = self.concurrency - running
            if free <= 0 or self.stopping.is_set() or (running and free < self._claim_batch):
                return 0, []
            plan: ClaimPlan = []
            now = time.monotonic()
            for index, group in enumerate(self._groups):
                if self._blocked.get(index, 0.0) > now:
                    continue  # its limit is full: nothing to ask the database yet
                gate = group.local_gate
                cap = free if gate is None else gate.limit - self._gate_busy[gate.name]
                if cap > 0:
                    plan.append((group, cap))
                    self._returned[index] = 0
                    if gate is not None:
                        self._gate_busy[gate.name] += cap
        return free, plan

    def _release_plan(self, plan: ClaimPlan) -> None:
        """Give back the gate caps :meth:`_claim_plan` held (claimed jobs hold their own)."""
        with self._lock:
            for group, cap in plan:
                if group.local_gate is not None:
                    self._gate_busy[group.local_gate.name] -= cap

    def _exchange(self) -> int:
        """Settle finished jobs and claim new ones in one transaction; how many were claimed."""
        limit, plan = self._claim_plan()
        with self._lock:
            now = bool(plan) or not self._running or self.stopping.is_set()
        taken = self.completer.take(now=now, batch=self._claim_batch)
        try:
            return self._settle_and_claim(limit, plan, taken)
        finally:
            self._release_plan(plan)

    def _settle_and_claim(self, limit: int, plan: ClaimPlan, taken: list[Finished]) -> int:
        if not plan and not taken:
            return 0
        if self.database_file_changed():
            self.completer.put_back(taken)  # never settled: not into a changed file
            return 0
        queue = self.queue
        with self._lock:
            freed, self._freed = self._freed, set()
            unblocks = list(self._unblocks)
        result = self.guarded(
            lambda: queue.exchange(
                [(item.job, item.followups) for item in taken],
                [ClaimGroup(cap, group.kinds, group.limit) for group, cap in plan],
                limit,
                self.lock_duration_ms,
                notify=freed,
                claimant=self.worker.id,
            ),
            "claim",
        )
        if result is None:
            self.completer.put_back(taken)  # the transaction rolled back: next round
            with self._lock:
                self._freed |= freed
            return 0
        settled, batches = result.settled, result.claimed
        if result.blocked:
            now = time.monotonic()
            with self._lock:
                for index, until_ms in result.blocked.items():
                    group_index = self._groups.index(plan[index][0])
                    if self._unblocks[group_index] != unblocks[group_index]:
                        # A permit freed while the claim ran (a run of this worker ended,
                        # or another's was announced): its count is stale, look again.
                        continue
                    wait_s = min(
                        max(until_ms - result.now_ms, 1) / 1000, self.worker.poll_interval_s
                    )
                    self._blocked[group_index] = now + wait_s
        self.completer.record_batch(taken, settled)
        claimed = 0
        now_ms = queue.now_ms()
        traced = tracing.enabled()
        on_the_loop: list[Run] = []
        for jobs in batches:
            for job in jobs:
                self.claimed(job, now_ms)
                run = self.new_run(job, traced)
                if self._dispatch(run):
                    on_the_loop.append(run)
                claimed += 1
        if on_the_loop:
            assert self.aio is not None
            self.aio.submit(on_the_loop)
        return claimed

    def _claimable_kinds(self) -> tuple[str, ...]:
        with self._lock:
            now = time.monotonic()
            return tuple(
                kind
                for index, group in enumerate(self._groups)
                if self._blocked.get(index, 0.0) <= now
                and (
                    group.local_gate is None
                    or self._gate_busy[group.local_gate.name] < group.local_gate.limit
                )
                for kind in group.kinds
            )

    def _limited_kinds(self) -> tuple[str, ...]:
        """The kinds of groups whose fleet-wide limit is full for now."""
        with self._lock:
            now = time.monotonic()
            return tuple(
                kind
                for index, group in enumerate(self._groups)
                if self._blocked.get(index, 0.0) > now
                for kind in group.kinds
            )

    def _idle_timeout(self, until_idle: bool = False) -> tuple[float | None, bool]:
        """Seconds until something is due (a scheduled job, a heartbeat, maintenance), and
        whether a job this worker could claim is due already."""
        now = time.monotonic()
        deadlines = [self._next_heartbeat] if self.running_jobs else []
        upkeep_due = self.worker.upkeep_schedule.next_due()
        if upkeep_due is not None:
            deadlines.append(upkeep_due)
        with self._lock:
            deadlines.extend(t for t in self._blocked.values() if t > now)
        with self._lock:
            free = self.concurrency - len(self._running)
        if free > 0:
            kinds = self._claimable_kinds()
            due_ms = self.guarded(lambda: self.queue.next_due_ms(kinds), "poll") if kinds else None
            if due_ms is not None:
                wait = (due_ms - self.queue.now_ms()) / 1000
                if wait <= 0:
                    # Due but not claimed yet: a gate just freed, another worker holds the
                    # row for a moment, or the database is busy. Look again shortly.
                    return min(self.worker.poll_interval_s, 0.05), True
                deadlines.append(now + wait)
            waiting = self._limited_kinds() if until_idle else ()
            if waiting:
                # Behind a full fleet-wide limit: not idle while its jobs are due, but
                # asleep until a permit frees or the limit's own time comes (a worker that
                # runs until stopped needs no such answer: it waits for those anyway).
                due_ms = self.guarded(lambda: self.queue.next_due_ms(waiting), "poll")
                if due_ms is not None and due_ms <= self.queue.now_ms():
                    with self._lock:
                        until = min((t for t in self._blocked.values() if t > now), default=now)
                    return max(min(until - now, self.worker.poll_interval_s), 0.001), True
        if not deadlines:
            return None, False
        return max(min(min(deadlines) - now, self.worker.poll_interval_s), 0.001), False

    def _dispatch(self, run: Run) -> bool:
        """Count ``run`` as running and hand a sync one to its thread; True for an async
        one, which the caller hands to the loop with the rest of its batch."""
        with self._lock:
            self._running[run.job.id] = run
            if run.gate is not None:
                self._gate_busy[run.gate.name] += 1
            if len(self._running) == 1:
                self._next_heartbeat = time.monotonic() + self.worker.heartbeat_interval_ms / 1000
        if isinstance(run.context, AsyncJobContext):
            return True
        assert self.threads is not None
        self.threads.submit(run)
        return False

    # -- watching runs -----------------------------------------------------------------

    def _check_cancels(self) -> None:
        """Tell running handlers that were asked to stop (polled while jobs run)."""
        now = time.monotonic()
        if now < self._next_cancel_check:
            return
        self._next_cancel_check = now + min(self.worker.poll_interval_s, 1.0)
        with self._lock:
            running = {job_id: run.context for job_id, run in self._running.items()}
        if not running:
            return
        requested = self.guarded(lambda: self.queue.cancel_requested(list(running)), "cancel check")
        for job_id in requested or ():
            context = running[job_id]
            if context._signal("cancel"):
                context.log.info("job %s was asked to stop", job_id)

    def heartbeat(self) -> None:
        if time.monotonic() < self._next_heartbeat:
            return
        self._next_heartbeat = time.monotonic() + self.worker.heartbeat_interval_ms / 1000
        with self._lock:
            held = [run.job for run in self._running.values()]
        if not held:
            return
        kept = self.guarded(
            lambda: self.queue.extend_leases(held, self.lock_duration_ms), "heartbeat"
        )
        if kept is None:
            return
        for job in held:
            if job.id not in kept:
                with self._lock:
                    run = self._running.get(job.id)
                # A run committing its completion is fenced by that commit; its row may
                # read done here already.
                if run is not None and not run.settling and run.context._signal("lease_lost"):
                    log.warning(
                        "job %s lost its lease while running; this worker will not settle it",
                        job.id,
                        extra={"job_id": job.id, "kind": job.kind, "attempt": job.attempts},
                    )

    def database_file_changed(self) -> bool:
        """True once the SQLite file was deleted or replaced under this worker; the first
        to notice logs it and stops the worker (see :class:`DatabaseFile`)."""
        if self.database_lost is not None:
            return True
        if self._database_file is None:
            return False
        change = self._database_file.change()
        if change is None:
            return False
        error = DatabaseFileChangedError(self._database_file.path, change)
        with self._lock:
            first = self.database_lost is None
            if first:
                self.database_lost = error
        if first:
            log.error("%s", error)
            self.stopping.set()
            self.wake.set()
        return True

    # -- maintenance -------------------------------------------------------------------

    def _maintain(self) -> None:
        self.worker.upkeep_schedule.run_due(time.monotonic(), self.guarded)

    # -- errors ------------------------------------------------------------------------

    def guarded(self, operation: Callable[[], Any], what: str) -> Any:
        """Run a database operation of the loop; on failure, log, back off, return None."""
        try:
            return operation()
        except (MemtreeError, sa_exc.SQLAlchemyError) as exc:
            if isinstance(exc, MemtreeError) and not isinstance(exc, DatabaseError):
                raise
            label, backoff_s = classify_error(exc)
            log.warning(
                "memtree %s failed (%s); retrying in %.1fs: %s",
                what,
                label,
                backoff_s,
                scrub(str(exc)),
            )
            self.stopping.wait(backoff_s)
            return None

    # -- shutdown ----------------------------------------------------------------------

    def flush(self) -> None:
        """Settle every run waiting for a batch, in one transaction (retried a few times)."""
        taken = self.completer.take(now=True, batch=1)
        if not taken:
            return
        done = [(item.job, item.followups) for item in taken]
        result = retrying(lambda: self.queue.complete_and_claim(done, (), 0)[0])
        self.completer.record_batch(taken, result)

    def shutdown(self, grace_s: float) -> None:
        """Stop claiming, let running handlers finish within ``grace_s``, settle what they
        finished, and release the leases of those still running (only this worker's)."""
        self.stopping.set()
        deadline = time.monotonic() + grace_s
        # A worker whose file changed does not wait: nothing it runs can be settled now.
        while (
            (self.running_jobs or self.completer.pending)
            and time.monotonic() < deadline
            and not self.database_file_changed()
        ):
            self.flush()
            self.heartbeat()
            self.wake.wait(0.05)
            self.wake.clear()
        if not self.database_file_changed():
            self.flush()
            if self.completer.pending:
                log.error(
                    "shutdown grace over: %d finished jobs were not settled (another session "
                    "held their rows locked); they run again when their leases expire",
                    self.completer.pending,
                )
        if self.aio is not None and self.running_jobs:
            self.aio.cancel_running(5.0)  # their rollback frees SQLite's write lock
        unfinished = self.running_jobs
        if self.database_lost is not None:
            # Their leases are in a file that is gone or replaced: nothing to release.
            log.error(
                "stopped; %d running jobs were left unsettled in the changed file",
                len(unfinished),
            )
        elif unfinished:
            released = self.guarded(lambda: maintenance.release(self.queue, unfinished), "release")
            log.warning(
                "shutdown grace over: released %s of %d running jobs", released, len(unfinished)
            )
        self.close()

    def beat(self, queue: Queue) -> None:
        """The worker's row in ``mem_tree_workers``: written at the first beat, touched at
        every one after (an upkeep task)."""
        if self._started_ms is None:
            self._started_ms = queue.now_ms()
        queue.beat_worker(self.worker.registration(self._started_ms))
        self.registered = True

    def close(self) -> None:
        if self.registered:
            self.registered = False
            self.guarded(lambda: self.queue.forget_worker(self.worker.id), "unregister")
        wakeup.unsubscribe(self.queue.engine, self.wake)
        if self.listener is not None:
            self.listener.stop()
            self.listener = None
