"""The retention sweep: a finished job's files go after ``SLIDESYNTH_RETENTION_HOURS`` and its record says
``expired``; with ``SLIDESYNTH_RECORD_RETENTION_HOURS`` the expired record goes too.

Every worker runs it periodically (:mod:`worker.tasks`); several at once are safe: a job expires by a status
compare-and-set (one sweeper wins), its files are removed after that (``rmtree`` tolerates a second remover),
and a job stays on the store's purge list until its files are gone, so a sweeper that dies between the two steps
leaves the removal to the next sweep. A download racing the sweep sees either the file (the open file stays
readable) or an expired job (410).
"""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field

from core.jobs import FINISHED, JobStatus, JobStore
from core.settings import Settings

log = logging.getLogger("slidesynth.worker")

BATCH = 1000  # jobs per store query


@dataclass
class SweepResult:
    expired: list[str] = field(default_factory=list)  # jobs this sweep expired
    purged: list[str] = field(default_factory=list)  # expired jobs whose files it removed
    deleted: list[str] = field(default_factory=list)  # expired records it deleted


def sweep(store: JobStore, settings: Settings, now: float | None = None) -> SweepResult:
    now = time.time() if now is None else now
    result = SweepResult()
    if settings.retention_hours > 0:
        cutoff = now - settings.retention_hours * 3600
        while True:  # an expired job leaves the finished index: the next batch holds the next ones
            batch = store.finished_before(cutoff, BATCH)
            done = [job_id for job_id in batch if expire(store, job_id, cutoff, now)]
            result.expired += done
            if len(batch) < BATCH or not done:
                break
    for job_id in store.purge_pending():
        store.purge(job_id)
        result.purged.append(job_id)
    if settings.retention_hours > 0 and settings.record_retention_hours > 0:
        cutoff = now - settings.record_retention_hours * 3600
        for job_id in store.expired_before(cutoff, BATCH):
            store.delete(job_id)
            shutil.rmtree(store.job_dir(job_id), ignore_errors=True)
            result.deleted.append(job_id)
    return result


def expire(store: JobStore, job_id: str, cutoff: float, now: float) -> bool:
    """Mark one finished job expired if it finished at or before ``cutoff``; True when this call did. The record
    keeps what ``GET /jobs/{id}`` shows; its outputs and conditioning vectors (an embedding grid can be megabytes)
    are dropped."""
    job = store.get(job_id)
    if job is None or job.status not in FINISHED:
        return False
    if (job.finished_at if job.finished_at is not None else job.created_at) > cutoff:
        return False
    spec = job.spec.model_copy(update={"embedding": None, "embedding_grid": None})
    return store.transition(job_id, set(FINISHED), status=JobStatus.expired, expired_at=now, outputs={},
                            spec=spec, eta_seconds=None)


def prepare(store: JobStore) -> None:
    """Once per worker start: index records written before the indexes existed (Redis; files need none)."""
    seen = store.reindex()
    if seen:
        log.info("retention and quota indexes checked for %d job records", seen)
