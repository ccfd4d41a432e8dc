"""The job store: jobs, batches and dream results, behind a small interface (`Store`) with a SQLite implementation.

A job is one dream: (bundle identity, feature, canonical config, the feature's dataset max). Its `key` is a hash
of those four, unique in the jobs table, so identical requests coalesce into one job by a database constraint, and a
result is stored once per key. The dataset max is in the key because it is the dream's yardstick (EPO's target is
divided by it): after the maxima are rebuilt the same request is a new job, and the old result is shown as stale;
a job also keeps its dataset max in a column of its own. One store serves several bundles: every listing, claim and
result lookup is of one bundle identity, and a batch (whose jobs share a bundle) keeps its bundle's identity.
Job states: queued -> running -> done | failed | cancelled (a client's DELETE; a queued job at once, a running one
when its worker stops, keeping its partial result); a running job goes back to queued when its worker dies (`requeue`)
or the service restarts (`recover`). A result and its job's "done" are written in one transaction, and only by the
claim that is current (a job's `attempts` counts claims), so a late or repeated completion never overwrites or
duplicates a result.

Another database (e.g. PostgreSQL with `SELECT ... FOR UPDATE SKIP LOCKED` in `claim`) can replace SQLite by
implementing `Store`.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from dreaming.dream_cache import canonical_json, dream_key

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
ENDED = (DONE, FAILED, CANCELLED)


def gave_up(max_attempts: int) -> str:
    return (f"given to a worker {max_attempts} times without finishing (a worker died, or the service stopped, "
            "each time): not tried again")


job_key = dream_key  # a job is keyed as the library caches a dream: one key (engine version included)


@dataclass
class Job:
    id: str
    key: str
    identity: str  # the bundle's (model and transcoder)
    feature: str
    config: dict
    dataset_max: float | None  # the yardstick the dream is scored against (None: a dead feature, or an old job)
    status: str
    attempts: int = 0  # how many times a worker was given this job
    progress: dict = field(default_factory=dict)
    error: str | None = None
    result: dict | None = None
    created: float = 0.0
    updated: float = 0.0


@dataclass
class Batch:
    id: str
    identity: str  # the bundle of its jobs
    job_ids: list[str]
    created: float


class Store(ABC):
    """What the service needs from a database. Every method is one atomic step."""

    @abstractmethod
    def submit(self, identity: str, feature: str, config: dict, dataset_max: float | None) -> Job:
        """The job for this dream (scored against `dataset_max`, the feature's dataset max now): the existing one
        (a failed one is queued again), else a new queued job."""

    @abstractmethod
    def submit_batch(self, identity: str, features: list[str], configs: list[dict],
                     dataset_maxes: list[float | None]) -> Batch:
        """One job per feature (coalescing as `submit`; `configs` and `dataset_maxes` in the order of `features`)
        and a batch that lists them, in one transaction."""

    @abstractmethod
    def job(self, job_id: str) -> Job | None: ...

    @abstractmethod
    def batch(self, batch_id: str) -> Batch | None: ...

    @abstractmethod
    def jobs(self, job_ids: list[str]) -> list[Job]:
        """The jobs in the order asked (unknown ids left out)."""

    @abstractmethod
    def claim(self, identity: str, limit: int, max_attempts: int | None = None, bulk_first: bool = False
              ) -> list[Job]:
        """Up to `limit` queued jobs of this bundle with one identical config, now running (attempts + 1): oldest
        first among the small requests (a job alone, or in a batch of at most `limit`), else among the bulk ones
        (in a larger batch); `bulk_first` turns the preference round, so that callers alternating it let neither
        starve. Queued jobs already given `max_attempts` times fail instead (with the reason)."""

    @abstractmethod
    def set_progress(self, job_ids: list[str], progress: dict) -> None: ...

    @abstractmethod
    def complete(self, job: Job, result: dict) -> bool:
        """Store the result and mark the job done, if this claim (job.attempts) is still the job's current one."""

    @abstractmethod
    def fail(self, job: Job, error: str) -> None: ...

    @abstractmethod
    def requeue(self, jobs: list[Job], penalty: bool = True) -> None:
        """Running jobs whose worker died go back to the queue (still this claim only); without `penalty` (their
        call was stopped for another job's sake) the attempt does not count."""

    @abstractmethod
    def cancel(self, job_ids: list[str]) -> list[Job]:
        """Queued jobs become cancelled at once; running ones are marked for their worker to stop (see
        `cancelling`); ended ones stay as they are. Returns the jobs as they are now."""

    @abstractmethod
    def cancelling(self, job_ids: list[str]) -> set[str]:
        """Those of these running jobs that a client cancelled."""

    @abstractmethod
    def finish_cancelled(self, job: Job, result: dict | None) -> None:
        """A cancelled running job ends: cancelled, with its partial result kept (its `stopped` says so) until the
        same request, submitted again, completes."""

    @abstractmethod
    def recover(self, max_attempts: int | None = None) -> int:
        """At start-up: every running job (its service stopped) goes back to the queue, but one already given
        `max_attempts` times, which fails; returns how many went back."""

    @abstractmethod
    def results_for(self, identity: str, feature: str) -> list[dict]:
        """Every stored dream result of one feature of one bundle, oldest first."""

    @abstractmethod
    def features_with_results(self, identity: str) -> set[str]:
        """The features of one bundle that have at least one stored dream result."""

    @abstractmethod
    def list_jobs(self, identity: str, status: str | None, offset: int, limit: int) -> tuple[int, list[Job]]:
        """(how many, a page of them newest first, without results) of this bundle's jobs, of one status or all."""

    @abstractmethod
    def list_batches(self, identity: str, offset: int, limit: int) -> tuple[int, list[Batch]]:
        """(how many, a page of them newest first) of this bundle's batches."""

    @abstractmethod
    def counts(self) -> dict[str, int]:
        """Number of jobs per status."""

    def close(self) -> None:
        pass


SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    identity TEXT NOT NULL,
    feature TEXT NOT NULL,
    config TEXT NOT NULL,
    dataset_max REAL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    progress TEXT NOT NULL DEFAULT '{}',
    error TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    cancel INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, identity, created);
CREATE TABLE IF NOT EXISTS results (
    key TEXT PRIMARY KEY,
    identity TEXT NOT NULL,
    feature TEXT NOT NULL,
    job_id TEXT NOT NULL,
    result TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS results_feature ON results (identity, feature, created);
CREATE TABLE IF NOT EXISTS batches (id TEXT PRIMARY KEY, created REAL NOT NULL, identity TEXT);
CREATE TABLE IF NOT EXISTS batch_jobs (
    batch_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    job_id TEXT NOT NULL,
    PRIMARY KEY (batch_id, position)
);
"""

JOB_COLUMNS = ", ".join(f"jobs.{name}" for name in (
    "id", "key", "identity", "feature", "config", "dataset_max",
    "status", "attempts", "progress", "error", "created", "updated"))


class SQLiteStore(Store):
    """SQLite in WAL mode; one connection shared under a lock (the service is one process)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        """Add the columns a database made by an earlier version lacks."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        if "cancel" not in columns:  # made before cancellation
            self._db.execute("ALTER TABLE jobs ADD COLUMN cancel INTEGER NOT NULL DEFAULT 0")
        if "dataset_max" not in columns:  # made before jobs kept their yardstick (it is only in their key): NULL
            self._db.execute("ALTER TABLE jobs ADD COLUMN dataset_max REAL")
        if "identity" not in {row[1] for row in self._db.execute("PRAGMA table_info(batches)")}:  # one bundle
            self._db.execute("ALTER TABLE batches ADD COLUMN identity TEXT")
            self._db.execute("UPDATE batches SET identity = (SELECT jobs.identity FROM batch_jobs JOIN jobs ON "
                             "jobs.id = batch_jobs.job_id WHERE batch_jobs.batch_id = batches.id LIMIT 1)")

    def _transaction(self):
        return _Transaction(self._db, self._lock)

    def _row_to_job(self, row, result: str | None = None) -> Job:
        id_, key, identity, feature, config, dataset_max, status, attempts, progress, error, created, updated = row
        return Job(id=id_, key=key, identity=identity, feature=feature, config=json.loads(config),
                   dataset_max=dataset_max, status=status, attempts=attempts,
                   progress=json.loads(progress), error=error, result=json.loads(result) if result else None,
                   created=created, updated=updated)

    def _select_jobs(self, db, where: str, args=()) -> list[Job]:
        rows = db.execute(f"SELECT {JOB_COLUMNS}, results.result FROM jobs LEFT JOIN results "
                          f"ON results.key = jobs.key AND jobs.status IN ('{DONE}', '{CANCELLED}') WHERE {where}",
                          args).fetchall()
        return [self._row_to_job(row[:-1], row[-1]) for row in rows]

    def _submit(self, db, identity: str, feature: str, config: dict, dataset_max: float | None, now: float) -> str:
        key = job_key(identity, feature, config, dataset_max)
        db.execute("INSERT INTO jobs (id, key, identity, feature, config, dataset_max, status, created, updated) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO NOTHING",
                   (uuid.uuid4().hex, key, identity, feature, canonical_json(config), dataset_max, QUEUED, now, now))
        db.execute("UPDATE jobs SET status = ?, error = NULL, progress = '{}', cancel = 0, updated = ? "
                   "WHERE key = ? AND status IN (?, ?)", (QUEUED, now, key, FAILED, CANCELLED))
        return db.execute("SELECT id FROM jobs WHERE key = ?", (key,)).fetchone()[0]

    def submit(self, identity, feature, config, dataset_max):
        with self._transaction() as db:
            job_id = self._submit(db, identity, feature, config, dataset_max, time.time())
            return self._select_jobs(db, "jobs.id = ?", (job_id,))[0]

    def submit_batch(self, identity, features, configs, dataset_maxes):
        if not len(configs) == len(dataset_maxes) == len(features):
            raise ValueError(f"{len(features)} features but {len(configs)} configs and {len(dataset_maxes)} "
                             "dataset maxima")
        now = time.time()
        with self._transaction() as db:
            job_ids = [self._submit(db, identity, feature, config, dataset_max, now)
                       for feature, config, dataset_max in zip(features, configs, dataset_maxes)]
            batch_id = uuid.uuid4().hex
            db.execute("INSERT INTO batches (id, created, identity) VALUES (?, ?, ?)", (batch_id, now, identity))
            db.executemany("INSERT INTO batch_jobs (batch_id, position, job_id) VALUES (?, ?, ?)",
                           [(batch_id, position, job_id) for position, job_id in enumerate(job_ids)])
        return Batch(batch_id, identity, job_ids, now)

    def job(self, job_id):
        with self._transaction() as db:
            found = self._select_jobs(db, "jobs.id = ?", (job_id,))
        return found[0] if found else None

    def jobs(self, job_ids):
        with self._transaction() as db:
            found = {job.id: job for job in self._select_jobs(
                db, f"jobs.id IN ({','.join('?' * len(job_ids))})", job_ids)} if job_ids else {}
        return [found[job_id] for job_id in job_ids if job_id in found]

    def batch(self, batch_id):
        with self._transaction() as db:
            found = db.execute("SELECT created, identity FROM batches WHERE id = ?", (batch_id,)).fetchone()
            if found is None:
                return None
            rows = db.execute("SELECT job_id FROM batch_jobs WHERE batch_id = ? ORDER BY position", (batch_id,))
            return Batch(batch_id, found[1], [row[0] for row in rows], found[0])

    def claim(self, identity, limit, max_attempts=None, bulk_first=False):
        now = time.time()
        with self._transaction() as db:
            if max_attempts is not None:
                db.execute("UPDATE jobs SET status = ?, error = ?, updated = ? WHERE status = ? AND identity = ? "
                           "AND attempts >= ?", (FAILED, gave_up(max_attempts), now, QUEUED, identity, max_attempts))
            # bulk: the job is in a batch that one call cannot take whole; small requests and bulk take turns
            bulk = ("EXISTS (SELECT 1 FROM batch_jobs AS mine WHERE mine.job_id = jobs.id AND mine.batch_id IN "
                    "(SELECT batch_id FROM batch_jobs GROUP BY batch_id HAVING COUNT(*) > ?))")
            order = f"ORDER BY {bulk} {'DESC' if bulk_first else 'ASC'}, created, rowid"
            first = db.execute(f"SELECT config FROM jobs WHERE status = ? AND identity = ? {order} LIMIT 1",
                               (QUEUED, identity, limit)).fetchone()
            if first is None:
                return []
            ids = [row[0] for row in db.execute(
                f"SELECT id FROM jobs WHERE status = ? AND identity = ? AND config = ? {order} LIMIT ?",
                (QUEUED, identity, first[0], limit, limit))]
            marks = ",".join("?" * len(ids))
            db.execute(f"UPDATE jobs SET status = ?, attempts = attempts + 1, progress = '{{}}', cancel = 0, "
                       f"updated = ? WHERE id IN ({marks})", (RUNNING, now, *ids))
            return sorted(self._select_jobs(db, f"jobs.id IN ({marks})", ids), key=lambda job: ids.index(job.id))

    def set_progress(self, job_ids, progress):
        with self._transaction() as db:
            db.executemany("UPDATE jobs SET progress = ?, updated = ? WHERE id = ? AND status = ?",
                           [(canonical_json(progress), time.time(), job_id, RUNNING) for job_id in job_ids])

    def complete(self, job, result):
        now = time.time()
        with self._transaction() as db:
            current = db.execute("UPDATE jobs SET status = ?, updated = ? WHERE id = ? AND status = ? AND attempts = ?",
                                 (DONE, now, job.id, RUNNING, job.attempts)).rowcount
            if current:
                self._store_result(db, job, result, now)
        return bool(current)

    def _store_result(self, db, job: Job, result: dict, now: float) -> None:
        """The job's result under its key: a later one (the same request run to its end) replaces an earlier one
        (a cancelled run's partial result)."""
        db.execute("INSERT OR REPLACE INTO results (key, identity, feature, job_id, result, created) "
                   "VALUES (?, ?, ?, ?, ?, ?)", (job.key, job.identity, job.feature, job.id, json.dumps(result), now))

    def fail(self, job, error):
        with self._transaction() as db:
            db.execute("UPDATE jobs SET status = ?, error = ?, updated = ? WHERE id = ? AND status = ? AND attempts = ?",
                       (FAILED, error, time.time(), job.id, RUNNING, job.attempts))

    def requeue(self, jobs, penalty=True):
        with self._transaction() as db:
            db.executemany("UPDATE jobs SET status = ?, progress = '{}', attempts = attempts - ?, updated = ? "
                           "WHERE id = ? AND status = ? AND attempts = ?",
                           [(QUEUED, 0 if penalty else 1, time.time(), job.id, RUNNING, job.attempts)
                            for job in jobs])

    def cancel(self, job_ids):
        marks = ",".join("?" * len(job_ids))
        with self._transaction() as db:
            db.execute(f"UPDATE jobs SET status = ?, error = ?, updated = ? WHERE status = ? AND id IN ({marks})",
                       (CANCELLED, "cancelled before it started", time.time(), QUEUED, *job_ids))
            db.execute(f"UPDATE jobs SET cancel = 1 WHERE status = ? AND id IN ({marks})", (RUNNING, *job_ids))
            found = {job.id: job for job in self._select_jobs(db, f"jobs.id IN ({marks})", job_ids)}
        return [found[job_id] for job_id in job_ids if job_id in found]

    def cancelling(self, job_ids):
        marks = ",".join("?" * len(job_ids))
        with self._transaction() as db:
            rows = db.execute(f"SELECT id FROM jobs WHERE status = ? AND cancel = 1 AND id IN ({marks})",
                              (RUNNING, *job_ids)).fetchall()
        return {row[0] for row in rows}

    def finish_cancelled(self, job, result):
        now = time.time()
        with self._transaction() as db:
            current = db.execute("UPDATE jobs SET status = ?, error = ?, updated = ? WHERE id = ? AND status = ? "
                                 "AND attempts = ?", (CANCELLED, "cancelled while running: its result is the best "
                                                      "found until then", now, job.id, RUNNING, job.attempts)).rowcount
            if current and result is not None:
                self._store_result(db, job, result, now)

    def recover(self, max_attempts=None):
        with self._transaction() as db:
            if max_attempts is not None:
                db.execute("UPDATE jobs SET status = ?, error = ?, updated = ? WHERE status = ? AND attempts >= ?",
                           (FAILED, gave_up(max_attempts), time.time(), RUNNING, max_attempts))
            return db.execute("UPDATE jobs SET status = ?, progress = '{}', updated = ? WHERE status = ?",
                              (QUEUED, time.time(), RUNNING)).rowcount

    def results_for(self, identity, feature):
        with self._transaction() as db:
            rows = db.execute("SELECT result FROM results WHERE identity = ? AND feature = ? ORDER BY created",
                              (identity, feature)).fetchall()
        return [json.loads(row[0]) for row in rows]

    def features_with_results(self, identity):
        with self._transaction() as db:
            rows = db.execute("SELECT DISTINCT feature FROM results WHERE identity = ?", (identity,)).fetchall()
        return {row[0] for row in rows}

    def list_jobs(self, identity, status, offset, limit):
        where, args = "identity = ?" + (" AND status = ?" if status else ""), (identity, *([status] if status else []))
        with self._transaction() as db:
            total = db.execute(f"SELECT COUNT(*) FROM jobs WHERE {where}", args).fetchone()[0]
            rows = db.execute(f"SELECT {JOB_COLUMNS} FROM jobs WHERE {where} ORDER BY created DESC, rowid DESC "
                              "LIMIT ? OFFSET ?", (*args, limit, offset)).fetchall()
        return total, [self._row_to_job(row) for row in rows]

    def list_batches(self, identity, offset, limit):
        with self._transaction() as db:
            total = db.execute("SELECT COUNT(*) FROM batches WHERE identity = ?", (identity,)).fetchone()[0]
            ids = [row[0] for row in db.execute("SELECT id FROM batches WHERE identity = ? ORDER BY created DESC, "
                                                "rowid DESC LIMIT ? OFFSET ?", (identity, limit, offset))]
        return total, [self.batch(batch_id) for batch_id in ids]

    def counts(self):
        with self._transaction() as db:
            rows = db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        return {QUEUED: 0, RUNNING: 0, DONE: 0, FAILED: 0, CANCELLED: 0, **dict(rows)}

    def close(self):
        with self._lock:
            self._db.close()


class _Transaction:
    """`with`: hold the lock and run the block in one IMMEDIATE transaction (rolled back on error)."""

    def __init__(self, db: sqlite3.Connection, lock: threading.Lock):
        self.db, self.lock = db, lock

    def __enter__(self) -> sqlite3.Connection:
        self.lock.acquire()
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except BaseException:  # e.g. "database is locked" past the timeout: nothing began, so nothing is held
            self.lock.release()
            raise
        return self.db

    def __exit__(self, kind, error, traceback):
        try:
            self.db.execute("ROLLBACK" if kind else "COMMIT")
        finally:
            self.lock.release()
