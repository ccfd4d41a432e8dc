"""The job store: coalescing by key, claiming by config, completion only by the current claim, recovery, and a
lock that a failed transaction never leaves held."""

import sqlite3
import threading

import pytest

from service.store import DONE, FAILED, QUEUED, RUNNING, SQLiteStore, job_key

CONFIG = {"iterations": 3, "seed": 0}
OTHER = {"iterations": 3, "seed": 1}
MAX = 1.5  # the feature's dataset max


def test_key_depends_on_identity_feature_config_and_dataset_max_only():
    assert job_key("a", "1/2", {"x": 1, "y": 2}, MAX) == job_key("a", "1/2", {"y": 2, "x": 1}, MAX)
    assert len({job_key("a", "1/2", CONFIG, MAX), job_key("b", "1/2", CONFIG, MAX), job_key("a", "1/3", CONFIG, MAX),
                job_key("a", "1/2", OTHER, MAX), job_key("a", "1/2", CONFIG, 2 * MAX),
                job_key("a", "1/2", CONFIG, None)}) == 6
    assert job_key("a", "1/2", CONFIG, None) == job_key("a", "1/2", CONFIG, 0.0)  # no yardstick either way


def test_a_new_dataset_max_makes_a_new_job_and_keeps_the_old_result(tmp_path):
    store = SQLiteStore(tmp_path / "jobs.sqlite")
    old = store.submit("id", "1/1", CONFIG, MAX)
    [claimed] = store.claim("id", 1)
    store.complete(claimed, {"dataset_max": MAX})
    new = store.submit("id", "1/1", CONFIG, 2 * MAX)  # the maxima were rebuilt: the same request is new work
    assert new.id != old.id and new.status == QUEUED and store.submit("id", "1/1", CONFIG, MAX).status == DONE
    assert store.results_for("id", "1/1") == [{"dataset_max": MAX}]
    batch = store.submit_batch("id", ["1/1", "1/2"], [CONFIG] * 2, [2 * MAX, MAX])
    assert batch.job_ids[0] == new.id


def test_identical_submissions_coalesce_even_from_many_threads(tmp_path):
    store = SQLiteStore(tmp_path / "jobs.sqlite")
    ids = []
    threads = [threading.Thread(target=lambda: ids.append(store.submit("id", "1/2", CONFIG, MAX).id))
               for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(ids)) == 1 and len(ids) == 20
    assert store.counts()[QUEUED] == 1


def test_claim_takes_one_config_oldest_first_and_skips_other_bundles(tmp_path):
    store = SQLiteStore(tmp_path / "jobs.sqlite")
    a = store.submit("id", "1/1", CONFIG, MAX)
    store.submit("id", "1/2", OTHER, MAX)
    c = store.submit("id", "1/3", CONFIG, MAX)
    store.submit("elsewhere", "1/4", CONFIG, MAX)
    claimed = store.claim("id", 16)
    assert [job.id for job in claimed] == [a.id, c.id]
    assert all(job.status == RUNNING and job.attempts == 1 for job in claimed)
    assert [job.feature for job in store.claim("id", 16)] == ["1/2"]
    assert store.claim("id", 16) == []


def test_a_batch_keys_each_job_by_its_own_config(tmp_path):
    store = SQLiteStore(tmp_path / "jobs.sqlite")
    batch = store.submit_batch("id", ["1/1", "1/2", "1/3"], [CONFIG, OTHER, CONFIG], [MAX] * 3)
    jobs = store.jobs(batch.job_ids)
    assert [job.config for job in jobs] == [CONFIG, OTHER, CONFIG]
    assert [job.key for job in jobs] == [job_key("id", f, c, MAX) for f, c in zip(["1/1", "1/2", "1/3"],
                                                                                  [CONFIG, OTHER, CONFIG])]
    assert [job.feature for job in store.claim("id", 16)] == ["1/1", "1/3"]  # one config per call
    assert store.submit("id", "1/2", OTHER, MAX).id == batch.job_ids[1]
    with pytest.raises(ValueError, match="2 features but 1 configs"):
        store.submit_batch("id", ["1/1", "1/2"], [CONFIG], [MAX] * 2)


def test_result_is_stored_once_and_returned_with_the_job(tmp_path):
    store = SQLiteStore(tmp_path / "jobs.sqlite")
    job = store.submit("id", "1/1", CONFIG, MAX)
    [claimed] = store.claim("id", 1)
    assert store.complete(claimed, {"feature": "1/1", "n": 1})
    assert not store.complete(claimed, {"feature": "1/1", "n": 2})  # a repeated completion changes nothing
    again = store.submit("id", "1/1", CONFIG, MAX)
    assert again.id == job.id and again.status == DONE and again.result == {"feature": "1/1", "n": 1}
    assert store.results_for("id", "1/1") == [{"feature": "1/1", "n": 1}]
    assert store.claim("id", 1) == []


def test_a_stale_claim_cannot_complete_after_requeue(tmp_path):
    store = SQLiteStore(tmp_path / "jobs.sqlite")
    store.submit("id", "1/1", CONFIG, MAX)
    [first] = store.claim("id", 1)
    store.requeue([first])
    [second] = store.claim("id", 1)
    assert second.attempts == 2
    assert not store.complete(first, {"late": True})
    assert store.complete(second, {"late": False})
    assert store.results_for("id", "1/1") == [{"late": False}]


def test_recover_requeues_running_jobs_and_keeps_done_ones(tmp_path):
    path = tmp_path / "jobs.sqlite"
    store = SQLiteStore(path)
    store.submit_batch("id", ["1/1", "1/2"], [CONFIG] * 2, [MAX] * 2)
    done, interrupted = store.claim("id", 2)
    store.complete(done, {"r": 1})
    store.set_progress([interrupted.id], {"done": 1, "total": 3})
    store.close()
    reopened = SQLiteStore(path)
    assert reopened.recover() == 1
    assert reopened.job(interrupted.id).status == QUEUED and reopened.job(interrupted.id).progress == {}
    assert reopened.job(done.id).result == {"r": 1}
    assert [job.id for job in reopened.claim("id", 2)] == [interrupted.id]


def test_failed_job_is_queued_again_on_resubmission(tmp_path):
    store = SQLiteStore(tmp_path / "jobs.sqlite")
    store.submit("id", "1/1", CONFIG, MAX)
    [job] = store.claim("id", 1)
    store.fail(job, "ValueError: boom")
    assert store.job(job.id).status == FAILED and store.job(job.id).error == "ValueError: boom"
    again = store.submit("id", "1/1", CONFIG, MAX)
    assert again.id == job.id and again.status == QUEUED and again.error is None


def test_batch_lists_its_jobs_in_order_and_shares_existing_ones(tmp_path):
    store = SQLiteStore(tmp_path / "jobs.sqlite")
    single = store.submit("id", "2/5", CONFIG, MAX)
    batch = store.submit_batch("id", ["1/1", "2/5", "0/3"], [CONFIG] * 3, [MAX] * 3)
    assert store.batch(batch.id).job_ids == batch.job_ids and batch.job_ids[1] == single.id
    assert [job.feature for job in store.jobs(batch.job_ids)] == ["1/1", "2/5", "0/3"]
    assert store.batch("nope") is None and store.job("nope") is None


def test_a_stored_result_of_an_earlier_engine_is_never_continued(tmp_path):
    """`more` continues the longest stored run of a config; a result in an older format is skipped, not fatal."""
    from dreaming.engine import DreamConfig
    from service.scheduler import Scheduler

    store = SQLiteStore(tmp_path / "jobs.sqlite")
    config = DreamConfig(iterations=3)
    store.submit("id", "1/1", config.model_dump(mode="json"), MAX)
    [claimed] = store.claim("id", 1)
    store.complete(claimed, {"feature": "1/1", "config": config.model_dump(mode="json"), "dataset_max": MAX,
                             "frontier": [{"prompt": "old", "activation": 1.0}]})  # no state, old fields
    scheduler = Scheduler(store, [], {"id": lambda feature: MAX}, features_per_call=1, max_attempts=3)
    assert scheduler.longest_stored_run("id", "1/1", config, MAX) is None


def test_a_new_engine_version_makes_a_new_key(monkeypatch):
    before = job_key("a", "1/2", CONFIG, MAX)
    monkeypatch.setattr("dreaming.dream_cache.ENGINE_VERSION", 10**6)
    assert job_key("a", "1/2", CONFIG, MAX) != before


class FailingBegin:
    """A connection whose next BEGIN fails, as a busy database does past its timeout."""

    def __init__(self, db):
        self.db, self.failures = db, 1

    def execute(self, sql, *args):
        if sql == "BEGIN IMMEDIATE" and self.failures:
            self.failures -= 1
            raise sqlite3.OperationalError("database is locked")
        return self.db.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self.db, name)


def test_the_store_survives_a_failed_transaction(tmp_path):
    store = SQLiteStore(tmp_path / "jobs.sqlite")
    job = store.submit("id", "1/1", CONFIG, MAX)
    store._db = FailingBegin(store._db)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        store.submit("id", "1/2", CONFIG, MAX)
    answered = []
    later = threading.Thread(target=lambda: answered.append(store.job(job.id)))  # would hang on a held lock
    later.start()
    later.join(10)
    assert answered and answered[0].id == job.id
    assert store.counts()[QUEUED] == 1  # the failed submission changed nothing
    with pytest.raises(ValueError):  # an error inside a transaction rolls it back and releases the lock too
        with store._transaction() as db:
            db.execute("UPDATE jobs SET status = 'x'")
            raise ValueError
    assert store.job(job.id).status == QUEUED


def test_attempts_are_checked_at_claim_and_at_recovery(tmp_path):
    store = SQLiteStore(tmp_path / "jobs.sqlite")
    job = store.submit("id", "1/1", CONFIG, MAX)
    for attempt in (1, 2):  # given twice; each time its worker died (requeued), or the service stopped (recover)
        [claimed] = store.claim("id", 1, max_attempts=3)
        assert claimed.attempts == attempt
        if attempt == 1:
            store.requeue([claimed])
        else:
            store.recover(max_attempts=3)
    [third] = store.claim("id", 1, max_attempts=3)
    assert third.attempts == 3
    assert store.recover(max_attempts=3) == 0  # the service stopped during its third attempt: it fails
    failed = store.job(job.id)
    assert failed.status == FAILED and "3 times" in failed.error
    other = store.submit("id", "1/2", CONFIG, MAX)
    for _ in range(2):
        [claimed] = store.claim("id", 1, max_attempts=2)
        store.requeue([claimed])
    assert store.claim("id", 1, max_attempts=2) == []  # queued again after its last attempt: fails at claim
    assert store.job(other.id).status == FAILED and "2 times" in store.job(other.id).error


def test_cancel_a_queued_job_at_once_and_a_running_one_through_its_worker(tmp_path):
    from service.store import CANCELLED

    store = SQLiteStore(tmp_path / "jobs.sqlite")
    queued = store.submit("id", "1/1", CONFIG, MAX)
    [cancelled] = store.cancel([queued.id])
    assert cancelled.status == CANCELLED and "before it started" in cancelled.error
    assert store.claim("id", 4) == []  # never given to a worker

    running, other = store.submit("id", "1/2", CONFIG, MAX), store.submit("id", "1/3", CONFIG, MAX)
    claimed = store.claim("id", 4)
    assert [job.id for job in claimed] == [running.id, other.id]
    store.cancel([running.id])
    assert store.cancelling([running.id, other.id]) == {running.id}
    store.finish_cancelled(claimed[0], {"stopped": "cancelled", "iterations": 1})
    store.requeue([claimed[1]], penalty=False)  # the call stopped for the cancelled job's sake
    ended = store.job(running.id)
    assert ended.status == CANCELLED and ended.result == {"stopped": "cancelled", "iterations": 1}
    assert store.job(other.id).status == QUEUED and store.job(other.id).attempts == 0

    again = store.submit("id", "1/2", CONFIG, MAX)  # asked for again: new work, the partial result kept meanwhile
    assert again.id == running.id and again.status == QUEUED
    [reclaimed] = [job for job in store.claim("id", 4) if job.id == running.id]
    assert store.cancelling([running.id]) == set()  # a fresh claim is not cancelled
    store.complete(reclaimed, {"stopped": "iterations", "iterations": 3})
    assert store.job(running.id).result == {"stopped": "iterations", "iterations": 3}  # the whole run replaces it
    assert store.results_for("id", "1/2") == [{"stopped": "iterations", "iterations": 3}]
    assert store.cancel([running.id])[0].status == DONE  # an ended job stays as it is


def test_jobs_and_batches_are_listed_newest_first_page_by_page(tmp_path):
    store = SQLiteStore(tmp_path / "jobs.sqlite")
    ids = [store.submit("id", f"1/{i}", CONFIG, MAX).id for i in range(5)]
    store.submit("elsewhere", "1/0", CONFIG, MAX)
    [claimed] = store.claim("id", 1)
    pages = [store.list_jobs("id", None, offset, 2) for offset in (0, 2, 4)]
    assert {total for total, _ in pages} == {5}
    assert [job.id for _, page in pages for job in page] == ids[::-1]
    assert store.list_jobs("id", RUNNING, 0, 10) == (1, [store.job(claimed.id)])
    batches = [store.submit_batch("id", ["2/1", "2/2"], [CONFIG] * 2, [MAX, MAX]).id for _ in range(3)]
    total, page = store.list_batches("id", 1, 5)
    assert total == 3 and [batch.id for batch in page] == batches[::-1][1:] and len(page[0].job_ids) == 2


def test_a_large_batch_and_single_requests_take_turns(tmp_path):
    store = SQLiteStore(tmp_path / "jobs.sqlite")
    batch = store.submit_batch("id", [f"1/{i}" for i in range(6)], [CONFIG] * 6, [MAX] * 6)  # more than one call takes
    single = store.submit("id", "2/1", OTHER, MAX)  # asked for after the batch
    assert [job.id for job in store.claim("id", 2)] == [single.id]  # small requests first
    assert [job.id for job in store.claim("id", 2, bulk_first=True)] == batch.job_ids[:2]
    again = store.submit("id", "2/2", CONFIG, MAX)  # the batch's config, alone: small, so it goes with the first
    assert [job.id for job in store.claim("id", 2)] == [again.id, batch.job_ids[2]]
    assert [job.id for job in store.claim("id", 2, bulk_first=True)] == batch.job_ids[3:5]
