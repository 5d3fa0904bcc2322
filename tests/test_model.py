"""Model-checked semantics: a Hypothesis state machine drives a real :class:`memtree.Queue`
(the tree's, :func:`memtree.tree.queue`, whose claim order and retired kinds the model follows)
and a plain-Python model of ``docs/states.md`` side by side, and after every step the
database's rows must equal the model's, column by column.

The machine enqueues (one job, or many with repeated keys), claims (one, or a batch,
maybe of some kinds, with leases from negative to saturating), settles every way
(done with follow-ups, done in a batch, failed typed or untyped, deferred, cancelled,
heartbeats), with fresh claims and with stale or forged ``Job`` snapshots (which must
get ``False`` and change nothing), recovers, releases, requeues, cancels, prunes and
purges, lets another program write retired rows, and moves a fake clock forwards and
backwards. Hypothesis shrinks any divergence to its shortest sequence of steps.

At the default settings each database takes well under a minute; for a longer search::

    MEMTREE_MODEL_EXAMPLES=2000 MEMTREE_MODEL_STEPS=80 .venv/bin/pytest tests/test_model.py
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import Engine, text

import memtree
import memtree.tree
from memtree import CancelOutcome, InvalidJobError, Job, JobFailure, NewJob, Queue
from memtree.tree import CLAIM_ORDER, RETIRED_KINDS
from memtree.types import DEFAULT_SELF_HEAL_LIMIT
from tests.conftest import START_MS, FakeClock

MAX_MS = 2**63 - 1
MIN_MS = -(2**63)
LEASE_MS = 10_000
RETRY_BASE_MS = 1_000
RETRY_CAP_MS = 8_000
MAX_DEFER_AGE_MS = 100_000
MAX_ATTEMPTS = 3

KINDS = ["seal", "flush_stale", "append_buffer", "a", "b"]
KEYS = [None, "k1", "k2", "k3"]
READY, RUNNING, DONE, FAILED, CANCELLED = "ready", "running", "done", "failed", "cancelled"
ACTIVE = (READY, RUNNING)

COLUMNS = (
    "id",
    "kind",
    "payload_json",
    "dedupe_key",
    "status",
    "attempts",
    "max_attempts",
    "available_at_ms",
    "locked_until_ms",
    "last_error",
    "created_at_ms",
    "started_at_ms",
    "completed_at_ms",
    "failure_reason",
    "failure_class",
    "lease_token",
    "cancel_requested_at_ms",
    "heal_count",
)

EXAMPLES = int(os.environ.get("MEMTREE_MODEL_EXAMPLES", "150"))
STEPS = int(os.environ.get("MEMTREE_MODEL_STEPS", "50"))


def sat(value: int) -> int:
    return max(min(value, MAX_MS), MIN_MS)


def backoff(attempts: int) -> int:
    """The documented backoff: base, doubling per attempt after the first, capped."""
    return min(RETRY_BASE_MS * 2 ** min(max(attempts - 1, 0), 20), RETRY_CAP_MS)


def priority(kind: str) -> int:
    return CLAIM_ORDER.index(kind) if kind in CLAIM_ORDER else 3


@dataclass
class Row:
    id: str
    kind: str
    payload_json: str
    dedupe_key: str | None
    status: str
    attempts: int
    max_attempts: int
    available_at_ms: int
    locked_until_ms: int | None
    last_error: str | None
    created_at_ms: int
    started_at_ms: int | None
    completed_at_ms: int | None
    failure_reason: str | None
    failure_class: str | None
    lease_token: str | None
    cancel_requested_at_ms: int | None
    heal_count: int = 0

    def values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, column) for column in COLUMNS)


# -- errors given to mark_failed, and the text the model expects in last_error --------------


@dataclass(frozen=True)
class Failure:
    """One way to fail a job: what is passed to ``mark_failed`` and what the model expects."""

    shape: str  # "text", "error", "chained", "failure"
    message: str
    code: str = ""
    klass: str = ""  # "transient" / "unrecoverable" for a JobFailure anywhere
    via_argument: bool = False  # the JobFailure is passed as mark_failed's third argument

    def arguments(self) -> tuple[object, JobFailure | None]:
        typed = JobFailure(self.code, self.klass) if self.klass else None
        if self.shape == "text":
            return self.message, typed if self.via_argument else None
        if self.shape == "failure":
            assert typed is not None
            return typed, None
        error = RuntimeError(self.message)
        if self.shape == "chained" and typed is not None and not self.via_argument:
            error.__cause__ = typed
        return error, typed if self.via_argument else None

    def expected_text(self) -> str:
        if self.shape == "text":
            return self.message
        if self.shape == "failure":
            return f"JobFailure: {self.code} ({self.klass})"
        text_ = f"RuntimeError: {self.message}"
        if self.shape == "chained" and self.klass and not self.via_argument:
            text_ += f"; caused by JobFailure: {self.code} ({self.klass})"
        return text_

    @property
    def typed(self) -> bool:
        """Whether a JobFailure reaches mark_failed, as its error, its cause or its argument."""
        if not self.klass:
            return False
        return self.shape in ("chained", "failure") or self.via_argument

    @property
    def unrecoverable(self) -> bool:
        return self.typed and self.klass == "unrecoverable"


messages = st.sampled_from(["boom", "", "'; DROP TABLE mem_tree_jobs; --", "ünï 🧠", "x" * 300])
failures = st.one_of(
    st.builds(Failure, st.just("text"), messages),
    st.builds(Failure, st.just("error"), messages.filter(bool)),
    st.builds(
        Failure,
        st.sampled_from(["chained", "failure", "text"]),
        messages.filter(bool),
        st.sampled_from(["rate_limited", "auth_revoked"]),
        st.sampled_from(["transient", "unrecoverable"]),
        st.booleans(),
    ).filter(lambda f: not (f.shape == "failure" and f.via_argument)),
)

kinds = st.sampled_from(KINDS)
keys = st.sampled_from(KEYS)
leases = st.sampled_from([None, 1, 0, -5, LEASE_MS, 2**62])
deltas = st.one_of(
    st.sampled_from(
        [
            0,
            1,
            LEASE_MS - 1,
            LEASE_MS,
            LEASE_MS + 1,
            RETRY_CAP_MS,
            MAX_DEFER_AGE_MS + 1,
        ]
    ),
    st.integers(-2_000, 20_000),
)
# Mostly due now, so claims find work; sometimes later, far in the future or the past.
offsets = st.sampled_from([None, None, None, -1_000, 0, 1_000, LEASE_MS * 2, "max", "min"])


def claimed_kinds() -> st.SearchStrategy[tuple[str, ...] | None]:
    return st.one_of(
        st.none(),
        st.lists(st.sampled_from([*KINDS, *RETIRED_KINDS]), max_size=3).map(tuple),
    )


# -- the machine -----------------------------------------------------------------------------


class SerialIds:
    """Job ids in creation order (``job:000001``, ...) instead of random UUIDs, so a replayed
    example builds the same rows and Hypothesis can shrink it. Ids are opaque to memtree."""

    def __init__(self) -> None:
        self.count = 0

    def reset(self) -> None:
        self.count = 0

    def __call__(self) -> str:
        self.count += 1
        return f"job:{self.count:06d}"


def machine_for(
    queue: Queue, clock: FakeClock, ids: SerialIds, runs: dict[str, int]
) -> type[RuleBasedStateMachine]:
    engine: Engine = queue.engine

    class QueueModel(RuleBasedStateMachine):
        snapshots = Bundle("snapshots")

        def __init__(self) -> None:
            super().__init__()
            with engine.begin() as conn:
                conn.execute(text("DELETE FROM mem_tree_jobs"))
            clock.now_ms = START_MS
            ids.reset()
            runs["examples"] += 1
            self.rows: dict[str, Row] = {}
            self.tokens: set[str] = set()
            self.serial = 0

        # -- helpers ------------------------------------------------------------------------

        @property
        def now(self) -> int:
            return clock.now_ms

        def next_payload(self) -> dict[str, int]:
            self.serial += 1
            return {"n": self.serial}

        def new_job(
            self, kind: str, key: str | None, offset: object, attempts: int | None
        ) -> NewJob:
            clock.advance(1)  # rows rarely tie on their due time, so claims are predictable
            if offset is None:
                available = None
            elif offset == "max":
                available = MAX_MS
            elif offset == "min":
                available = MIN_MS
            else:
                assert isinstance(offset, int)
                available = self.now + offset
            return NewJob(kind, self.next_payload(), key, available, attempts)

        def key_active(self, key: str | None) -> bool:
            return key is not None and any(
                r.dedupe_key == key and r.status in ACTIVE for r in self.rows.values()
            )

        def insert(self, job_id: str, job: NewJob) -> None:
            self.rows[job_id] = Row(
                id=job_id,
                kind=job.kind,
                payload_json=job.payload_json,
                dedupe_key=job.dedupe_key,
                status=READY,
                attempts=0,
                max_attempts=job.max_attempts or MAX_ATTEMPTS,
                available_at_ms=self.now if job.available_at_ms is None else job.available_at_ms,
                locked_until_ms=None,
                last_error=None,
                created_at_ms=self.now,
                started_at_ms=None,
                completed_at_ms=None,
                failure_reason=None,
                failure_class=None,
                lease_token=None,
                cancel_requested_at_ms=None,
            )

        def expect_enqueue_many(self, jobs: Sequence[NewJob]) -> list[bool]:
            """Which positions insert: a key active, or repeated earlier in the batch, doesn't."""
            seen: set[str] = set()
            inserts = []
            for job in jobs:
                key = job.dedupe_key
                inserted = not (key is not None and (key in seen or self.key_active(key)))
                if key is not None:
                    seen.add(key)
                inserts.append(inserted)
            return inserts

        def adopt_new_rows(self, expected: Sequence[NewJob]) -> None:
            """Rows memtree inserted without telling their ids (follow-ups): match them to
            the jobs the model expects by their unique payloads."""
            with engine.connect() as conn:
                fresh = conn.execute(text("SELECT id, payload_json FROM mem_tree_jobs")).all()
            new = {payload: job_id for job_id, payload in fresh if job_id not in self.rows}
            assert sorted(new) == sorted(job.payload_json for job in expected), (
                "the follow-ups inserted are not the ones expected"
            )
            for job in expected:
                self.insert(new[job.payload_json], job)

        def fenced(self, job: Job, *, cancel: bool | None = False) -> Row | None:
            """The row a settle of ``job`` applies to, or None (the fence of states.md)."""
            row = self.rows.get(job.id)
            if row is None or row.status != RUNNING:
                return None
            if (row.lease_token, row.attempts, row.started_at_ms) != (
                job.lease_token,
                job.attempts,
                job.started_at_ms,
            ):
                return None
            if cancel is False and row.cancel_requested_at_ms is not None:
                return None
            if cancel is True and row.cancel_requested_at_ms is None:
                return None
            return row

        def finish_done(self, row: Row) -> None:
            row.status = DONE
            row.completed_at_ms = self.now
            row.locked_until_ms = None
            row.last_error = None

        def enqueue_expected(self, jobs: Sequence[NewJob]) -> list[NewJob]:
            return [job for job, ok in zip(jobs, self.expect_enqueue_many(jobs), strict=True) if ok]

        # -- enqueue ------------------------------------------------------------------------

        @rule(kind=kinds, key=keys, offset=offsets, attempts=st.sampled_from([None, 1, 2, 4]))
        def enqueue(self, kind: str, key: str | None, offset: object, attempts: int | None) -> None:
            job = self.new_job(kind, key, offset, attempts)
            expected = not self.key_active(key)
            job_id = queue.enqueue(job)
            assert (job_id is not None) == expected, f"enqueue of key {key!r}: {job_id}"
            if job_id is not None:
                assert job_id not in self.rows
                self.insert(job_id, job)

        @rule(
            batch=st.lists(st.tuples(kinds, keys, offsets, st.sampled_from([None, 2])), max_size=6)
        )
        def enqueue_many(self, batch: list[tuple[str, str | None, object, int | None]]) -> None:
            jobs = [self.new_job(*spec) for spec in batch]
            expected = self.expect_enqueue_many(jobs)
            ids = queue.enqueue_many(jobs)
            assert [i is not None for i in ids] == expected
            for job_id, job in zip(ids, jobs, strict=True):
                if job_id is not None:
                    self.insert(job_id, job)

        @rule(kind=st.sampled_from([*RETIRED_KINDS, "a"]), offset=st.sampled_from([-1, 0]))
        def another_program_inserts(self, kind: str, offset: int) -> None:
            """A row another program wrote: a retired kind memtree never claims, or a plain one."""
            self.serial += 1
            job_id = f"job:foreign-{self.serial}"
            payload = f'{{"foreign":{self.serial}}}'
            with engine.begin() as conn:
                conn.execute(
                    text(
                        "INSERT INTO mem_tree_jobs (id, kind, payload_json, status, attempts, "
                        "max_attempts, available_at_ms, created_at_ms) "
                        "VALUES (:id, :kind, :payload, 'ready', 0, 2, :at, :now)"
                    ),
                    {
                        "id": job_id,
                        "kind": kind,
                        "payload": payload,
                        "at": self.now + offset,
                        "now": self.now,
                    },
                )
            self.rows[job_id] = Row(
                job_id,
                kind,
                payload,
                None,
                READY,
                0,
                2,
                self.now + offset,
                None,
                None,
                self.now,
                None,
                None,
                None,
                None,
                None,
                None,
            )

        # -- claim --------------------------------------------------------------------------

        def claim(self, limit: int, lease: int | None, wanted: tuple[str, ...] | None) -> list[Job]:
            allowed = None if wanted is None else set(wanted) - set(RETIRED_KINDS)
            eligible = [
                r
                for r in self.rows.values()
                if r.status == READY
                and r.available_at_ms <= self.now
                and r.kind not in RETIRED_KINDS
                and (allowed is None or r.kind in allowed)
            ]
            if allowed is not None and not allowed:
                eligible = []
            order = {r.id: (priority(r.kind), r.available_at_ms) for r in eligible}
            # Which of several rows tied on (claim order, due time) a claim takes is up to the
            # database (PostgreSQL's heap order is not stable from run to run); the model
            # checks that any of them is fine, but a replayed example must build the same
            # rows, so a claim that would split a tie takes the whole tie.
            keys_in_order = sorted(order.values())
            while 0 < limit < len(keys_in_order) and (
                keys_in_order[limit - 1] == keys_in_order[limit]
            ):
                limit += 1
            if limit == 1:
                one = queue.claim_next(lease, wanted)
                claimed = [] if one is None else [one]
            else:
                claimed = queue.claim_batch(limit, lease, wanted)
            assert len(claimed) == min(limit, len(eligible)), "claimed too few or too many"
            ids = [job.id for job in claimed]
            assert len(set(ids)) == len(ids) and set(ids) <= set(order), "claimed the wrong rows"
            if claimed:
                worst = max(order[i] for i in ids)
                skipped = [i for i in order if order[i] < worst and i not in ids]
                assert not skipped, f"claimed past rows that come first: {skipped}"
            assert ids == [
                j.id
                for j in sorted(claimed, key=lambda j: (priority(j.kind), j.available_at_ms, j.id))
            ], "claims come back in claim order"
            for job in claimed:
                assert job.lease_token is not None and job.lease_token not in self.tokens
                row = self.rows[job.id]
                row.status = RUNNING
                row.attempts += 1
                row.started_at_ms = self.now
                row.locked_until_ms = sat(self.now + (LEASE_MS if lease is None else lease))
                row.last_error = None
                row.lease_token = job.lease_token
                assert job == Job(**{c: getattr(row, c) for c in COLUMNS}), "the claimed Job"
            self.tokens.update(job.lease_token or "" for job in claimed)
            return claimed

        @rule(target=snapshots, lease=leases, wanted=claimed_kinds())
        def claim_next(self, lease: int | None, wanted: tuple[str, ...] | None) -> Any:
            return multiple(*self.claim(1, lease, wanted))

        @rule(target=snapshots)
        def claim_next_of_any_kind(self) -> Any:
            """The worker's everyday claim (a rule of its own, so claims are frequent)."""
            return multiple(*self.claim(1, None, None))

        @rule(
            target=snapshots,
            limit=st.integers(0, 4),
            lease=leases,
            wanted=claimed_kinds(),
        )
        def claim_batch(self, limit: int, lease: int | None, wanted: tuple[str, ...] | None) -> Any:
            return multiple(*self.claim(limit, lease, wanted))

        @rule(
            target=snapshots, job=snapshots, how=st.sampled_from(["token", "attempts", "started"])
        )
        def forge(self, job: Job, how: str) -> Job:
            """A snapshot that never came from a claim: no token, or a claim's numbers off."""
            if how == "token":
                return dataclasses.replace(job, lease_token=None)
            if how == "attempts":
                return dataclasses.replace(job, attempts=job.attempts + 1)
            return dataclasses.replace(job, started_at_ms=(job.started_at_ms or 0) - 1)

        # -- settle -------------------------------------------------------------------------

        @rule(job=snapshots, count=st.integers(0, 2), key=keys)
        def mark_done(self, job: Job, count: int, key: str | None) -> None:
            followups = [NewJob("a", self.next_payload(), key) for _ in range(count)]
            row = self.fenced(job)
            assert queue.mark_done(job, followups) is (row is not None)
            if row is not None:
                self.finish_done(row)
                self.adopt_new_rows(self.enqueue_expected(followups))

        @rule(
            entries=st.lists(st.tuples(snapshots, st.integers(0, 1)), max_size=4),
            key=keys,
        )
        def mark_done_many(self, entries: list[tuple[Job, int]], key: str | None) -> None:
            # One entry per job: two claims of one job in a batch meet a known bug (see
            # test_mark_done_many_enqueues_only_the_followups_of_claims_it_settled).
            entries = list({job.id: (job, count) for job, count in entries}.values())
            done = [
                (job, [NewJob("b", self.next_payload(), key) for _ in range(count)])
                for job, count in entries
            ]
            matched = [(job, f) for job, f in done if self.fenced(job)]
            settled = queue.mark_done_many(done)
            assert settled == {job.id for job, _ in matched}
            for job, _ in matched:
                row = self.rows[job.id]
                if row.status == RUNNING:
                    self.finish_done(row)
            self.adopt_new_rows(self.enqueue_expected([f for _, fs in matched for f in fs]))

        @rule(job=snapshots, failure=failures)
        def mark_failed(self, job: Job, failure: Failure) -> None:
            error, typed = failure.arguments()
            row = self.fenced(job)
            assert queue.mark_failed(job, error, typed) is (row is not None)
            if row is None:
                return
            row.locked_until_ms = None
            row.last_error = failure.expected_text()
            if job.attempts >= job.max_attempts or failure.unrecoverable:
                row.status = FAILED
                row.completed_at_ms = self.now
                row.failure_reason = failure.code if failure.typed else None
                row.failure_class = failure.klass if failure.typed else None
            else:
                row.status = READY
                row.available_at_ms = sat(self.now + backoff(job.attempts))
                row.failure_reason = None
                row.failure_class = None
                row.lease_token = None

        @rule(
            job=snapshots,
            until=st.sampled_from([-1, 0, 1_000, "max", "min", "overflow"]),
            reason=messages,
        )
        def mark_deferred(self, job: Job, until: object, reason: str) -> None:
            if until == "overflow":
                with pytest.raises(InvalidJobError):
                    queue.mark_deferred(job, MAX_MS + 1, reason)
                return
            if until == "max":
                at = MAX_MS
            elif until == "min":
                at = MIN_MS
            else:
                assert isinstance(until, int)
                at = self.now + until
            row = self.fenced(job)
            assert queue.mark_deferred(job, at, reason) is (row is not None)
            if row is None:
                return
            aged = row.created_at_ms <= sat(self.now - MAX_DEFER_AGE_MS)
            row.status = FAILED if aged else READY
            row.attempts = max(job.attempts - 1, 0)
            row.available_at_ms = at
            row.locked_until_ms = None
            row.started_at_ms = None
            row.completed_at_ms = self.now if aged else None
            row.last_error = reason
            row.failure_reason = "defer_age_exceeded" if aged else None
            row.failure_class = "unrecoverable" if aged else None
            row.lease_token = None

        @rule(job=snapshots, lease=leases)
        def extend_lease(self, job: Job, lease: int | None) -> None:
            row = self.fenced(job, cancel=None)
            assert queue.extend_lease(job, lease) is (row is not None)
            if row is not None:
                row.locked_until_ms = sat(self.now + (LEASE_MS if lease is None else lease))

        @rule(held=st.lists(snapshots, max_size=4))
        def extend_leases(self, held: list[Job]) -> None:
            kept = {job.id for job in held if self.fenced(job, cancel=None)}
            assert queue.extend_leases(held) == kept
            for job_id in kept:
                self.rows[job_id].locked_until_ms = sat(self.now + LEASE_MS)

        @rule(job=snapshots)
        def mark_cancelled(self, job: Job) -> None:
            row = self.fenced(job, cancel=True)
            assert queue.mark_cancelled(job) is (row is not None)
            if row is not None:
                row.status = CANCELLED
                row.completed_at_ms = self.now
                row.locked_until_ms = None

        @rule(data=st.data())
        def cancel(self, data: st.DataObject) -> None:
            choices = [*self.rows, "job:unknown"]
            job_id = data.draw(st.sampled_from(choices))
            row = self.rows.get(job_id)
            outcome = queue.cancel(job_id)
            if row is None:
                assert outcome is None
            elif row.status == READY:
                assert outcome is CancelOutcome.CANCELLED
                row.status = CANCELLED
                row.completed_at_ms = self.now
                row.locked_until_ms = None
                row.lease_token = None
            elif row.status == RUNNING:
                assert outcome is CancelOutcome.REQUESTED
                if row.cancel_requested_at_ms is None:
                    row.cancel_requested_at_ms = self.now
            else:
                assert outcome is CancelOutcome.FINISHED

        # -- recovery, release, requeue -----------------------------------------------------

        @rule()
        def recover_stale_locks(self) -> None:
            stale = [
                r
                for r in self.rows.values()
                if r.status == RUNNING
                and r.locked_until_ms is not None
                and r.locked_until_ms < self.now
            ]
            assert queue.recover_stale_locks() == len(stale)
            for row in stale:
                cancelling = row.cancel_requested_at_ms is not None
                exhausted = row.attempts >= row.max_attempts
                if cancelling:
                    row.status, literal = CANCELLED, "cancelled"
                    row.failure_reason = row.failure_class = None
                elif exhausted:
                    row.status, literal = FAILED, "stale_lock_exhausted"
                    row.failure_reason, row.failure_class = "stale_lock_exhausted", "transient"
                else:
                    row.status, literal = READY, "recovered_from_stale_lock"
                    row.failure_reason = row.failure_class = None
                row.last_error = row.last_error if row.last_error is not None else literal
                row.completed_at_ms = self.now if cancelling or exhausted else None
                row.locked_until_ms = None
                row.lease_token = None

        def release(self, rows: Iterable[Row]) -> None:
            for row in rows:
                cancelling = row.cancel_requested_at_ms is not None
                row.status = CANCELLED if cancelling else READY
                row.attempts = max(row.attempts - 1, 0)
                row.locked_until_ms = None
                row.started_at_ms = None
                row.completed_at_ms = self.now if cancelling else None
                row.lease_token = None

        @rule()
        def release_every_running_lock(self) -> None:
            running = [r for r in self.rows.values() if r.status == RUNNING]
            assert queue.release_running_locks() == len(running)
            self.release(running)

        @rule(held=st.lists(snapshots, max_size=3))
        def release_held_locks(self, held: list[Job]) -> None:
            """Only those claims, each fenced like every settle (a claim without a token is
            not released)."""
            # Leave out a stale snapshot whose job's current claim shares its token with
            # another snapshot given: that meets a known bug (see
            # test_release_running_locks_releases_only_the_claims_it_is_given).
            tokens = {job.lease_token for job in held}
            held = [
                job
                for job in held
                if not (
                    job.id in self.rows
                    and self.rows[job.id].lease_token != job.lease_token
                    and self.rows[job.id].lease_token in tokens
                )
            ]
            fenced = (self.fenced(job, cancel=None) for job in held if job.lease_token)
            rows = list({row.id: row for row in fenced if row is not None}.values())
            assert queue.release_running_locks(held) == len(rows)
            self.release(rows)

        def requeue(self, transient_only: bool) -> None:
            """``transient_only`` is the worker's self-heal: bounded by the default limit."""

            def failed(row: Row) -> bool:
                return row.status == FAILED and not (
                    transient_only
                    and (
                        row.failure_class == "unrecoverable"
                        or row.heal_count >= DEFAULT_SELF_HEAL_LIMIT
                    )
                )

            chosen = []
            for row in self.rows.values():
                if not failed(row):
                    continue
                if row.dedupe_key is not None:
                    if self.key_active(row.dedupe_key):
                        continue
                    newer = [
                        r
                        for r in self.rows.values()
                        if r.dedupe_key == row.dedupe_key
                        and failed(r)
                        and (r.created_at_ms, r.id) > (row.created_at_ms, row.id)
                    ]
                    if newer:
                        continue
                chosen.append(row)
            count = queue.requeue_transient_failed() if transient_only else queue.requeue_failed()
            assert count == len(chosen)
            for row in chosen:
                self.reset(row, healed=transient_only)

        def reset(self, row: Row, *, healed: bool = False) -> None:
            row.status = READY
            row.attempts = 0
            row.available_at_ms = self.now
            row.locked_until_ms = row.started_at_ms = row.completed_at_ms = None
            row.last_error = row.failure_reason = row.failure_class = None
            row.lease_token = None
            row.cancel_requested_at_ms = None
            row.heal_count = row.heal_count + 1 if healed else 0

        @rule()
        def requeue_failed(self) -> None:
            self.requeue(transient_only=False)

        @rule()
        def requeue_transient_failed(self) -> None:
            self.requeue(transient_only=True)

        @rule(data=st.data())
        def requeue_job(self, data: st.DataObject) -> None:
            job_id = data.draw(st.sampled_from([*self.rows, "job:unknown"]))
            row = self.rows.get(job_id)
            expected = (
                row is not None
                and row.status in (FAILED, CANCELLED)
                and not self.key_active(row.dedupe_key)
            )
            assert queue.requeue_job(job_id) is expected
            if expected:
                assert row is not None
                self.reset(row)

        @rule()
        def purge_retired_jobs(self) -> None:
            retired = [i for i, r in self.rows.items() if r.kind in RETIRED_KINDS]
            assert queue.purge_retired_jobs() == len(retired)
            for job_id in retired:
                del self.rows[job_id]

        @rule(
            status=st.sampled_from([DONE, FAILED, CANCELLED]),
            age=st.sampled_from([0, 1, 5_000]),
            limit=st.integers(1, 3),
        )
        def prune(self, status: str, age: int, limit: int) -> None:
            cutoff = self.now - age
            eligible = {
                i
                for i, r in self.rows.items()
                if r.status == status
                and r.completed_at_ms is not None
                and r.completed_at_ms < cutoff
            }
            # Which rows a limited prune deletes is up to the database; to keep replays
            # identical, the limit only ever bites when it takes every eligible row anyway.
            limit = max(limit, len(eligible))
            assert queue.prune(status, cutoff, limit) == len(eligible)
            with engine.connect() as conn:
                left = {row[0] for row in conn.execute(text("SELECT id FROM mem_tree_jobs"))}
            gone = set(self.rows) - left
            assert gone == eligible, "pruned exactly the rows completed before the cutoff"
            for job_id in gone:
                del self.rows[job_id]

        # -- time ---------------------------------------------------------------------------

        @rule(delta=deltas)
        def clock_jumps(self, delta: int) -> None:
            clock.advance(delta)

        # -- the check ----------------------------------------------------------------------

        @invariant()
        def database_matches_the_model(self) -> None:
            runs["checks"] += 1
            with engine.connect() as conn:
                columns = ", ".join(COLUMNS)
                stored = {
                    row[0]: tuple(row)
                    for row in conn.execute(text(f"SELECT {columns} FROM mem_tree_jobs"))
                }
            assert set(stored) == set(self.rows), (
                f"rows differ: only in the database {set(stored) - set(self.rows)}, "
                f"only in the model {set(self.rows) - set(stored)}"
            )
            for job_id, row in self.rows.items():
                if stored[job_id] != row.values():
                    diff = {
                        column: (db, model)
                        for column, db, model in zip(
                            COLUMNS, stored[job_id], row.values(), strict=True
                        )
                        if db != model
                    }
                    raise AssertionError(f"{job_id} differs (database, model): {diff}")

        @invariant()
        def one_active_row_per_key(self) -> None:
            active = [
                r.dedupe_key for r in self.rows.values() if r.dedupe_key and r.status in ACTIVE
            ]
            assert len(active) == len(set(active))

    return QueueModel


def test_queue_semantics_match_the_model(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = SerialIds()
    monkeypatch.setattr(memtree.store, "new_job_id", ids)
    engine = memtree.create_engine(db_url)
    clock = FakeClock()
    queue = memtree.tree.queue(
        engine,
        clock=clock,
        lock_duration_ms=LEASE_MS,
        retry_base_ms=RETRY_BASE_MS,
        retry_cap_ms=RETRY_CAP_MS,
        max_defer_age_ms=MAX_DEFER_AGE_MS,
        max_attempts=MAX_ATTEMPTS,
    )
    queue.migrate()
    runs = {"examples": 0, "checks": 0}
    try:
        run_state_machine_as_test(
            machine_for(queue, clock, ids, runs),
            settings=settings(
                max_examples=EXAMPLES,
                stateful_step_count=STEPS,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            ),
        )
    finally:
        engine.dispose()
        print(
            f"\nmodel on {engine.dialect.name}: {runs['examples']} sequences, "
            f"{runs['checks']} states compared with the database column by column"
        )


def test_mark_done_many_enqueues_only_the_followups_of_claims_it_settled(queue: Queue) -> None:
    job_id = queue.enqueue(NewJob("a"))
    stale = queue.claim_next()
    assert stale is not None and queue.release_running_locks() == 1
    fresh = queue.claim_next()
    assert fresh is not None and fresh.lease_token != stale.lease_token
    settled = queue.mark_done_many([(fresh, []), (stale, [NewJob("from_the_stale_claim")])])
    assert settled == {job_id}
    assert queue.list_jobs(kind="from_the_stale_claim") == [], "the stale claim's follow-up"


def test_release_running_locks_releases_only_the_claims_it_is_given(queue: Queue) -> None:
    ids = queue.enqueue_many([NewJob("a"), NewJob("a")])
    stale = queue.claim_next()
    assert stale is not None and stale.id in ids  # due in the same ms: either (MySQL)
    first, second = stale.id, next(i for i in ids if i != stale.id)
    assert queue.release_running_locks() == 1
    batch = queue.claim_batch(2)
    assert {job.id for job in batch} == {first, second}
    current = {job.id: job for job in batch}
    assert current[first].lease_token == current[second].lease_token != stale.lease_token
    # Release the second job's claim, and a stale snapshot of the first job's old claim.
    assert queue.release_running_locks([current[second], stale]) == 1
    still = queue.get_job(first or "")
    assert still is not None and still.lease_token == current[first].lease_token, (
        "the first job's current claim was released through a stale snapshot"
    )
