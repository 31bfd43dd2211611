"""Celery tasks: thin adapters from a job id to :func:`worker.jobrunner.run_job`, and from an embedding request
to :func:`worker.embedding.answer_embed_request`; and the worker's periodic threads (orphan recovery, the
retention sweep of :mod:`worker.retention`)."""
from __future__ import annotations

import logging
import socket

from celery import Task
from celery.signals import task_postrun, task_prerun, worker_process_shutdown, worker_ready

from worker.celery_app import TASK_GENERATE, app
from worker.embedding import answer_embed_request
from worker.jobrunner import WorkerContext, fail_job, recover_orphans, run_job
from worker.retention import prepare as prepare_retention, sweep
from core import logs
from core.metrics import mark_dead
from core.queue import TASK_EMBED, enqueue_job

log = logging.getLogger("slidesynth.worker")

_context: WorkerContext | None = None


def context() -> WorkerContext:
    """Per-process context, created on the first use (never touches CUDA: models load on the first job)."""
    global _context
    if _context is None:
        _context = WorkerContext.from_settings(hostname=socket.gethostname())
    return _context


class GenerateTask(Task):
    def on_failure(self, exc, task_id, args, kwargs, einfo):
        # Reached when the child was killed (hard time limit) or the task raised past run_job:
        # the job must not stay "running" forever.
        job_id = args[0] if args else task_id
        fail_job(job_id, context(), f"{exc.__class__.__name__}: {exc}")


@app.task(name=TASK_GENERATE, base=GenerateTask, acks_late=True, reject_on_worker_lost=True)
def generate(job_id: str) -> None:
    run_job(job_id, context())


# Acked on receipt and short: the API waits seconds for the answer, and a request it gave up on expires unrun.
@app.task(name=TASK_EMBED, acks_late=False, reject_on_worker_lost=False, ignore_result=True,
          soft_time_limit=600, time_limit=660)
def embed(request: dict) -> None:
    answer_embed_request(request, context().settings)


def recover_once(ctx: WorkerContext) -> list[str]:
    try:
        # back on the queue of the job's priority
        requeued = recover_orphans(ctx, lambda job: enqueue_job(app, ctx.settings, job.id, job.priority))
    except Exception:  # recovery must never stop a worker (e.g. the broker or the store is restarting)
        log.exception("recovering orphaned jobs failed")
        return []
    if requeued:
        log.warning("re-queued %d orphaned job(s): %s", len(requeued), ", ".join(requeued))
    return requeued


def sweep_once(ctx: WorkerContext) -> None:
    try:
        result = sweep(ctx.store, ctx.settings)
    except Exception:  # like recovery: a store that is restarting must not stop the worker
        log.exception("the retention sweep failed")
        return
    if result.expired or result.deleted:
        log.info("retention: %d job(s) expired, %d expired record(s) deleted", len(result.expired),
                 len(result.deleted))


@worker_ready.connect
def _recover(sender=None, **_):
    """A starting worker re-queues jobs left running by a process that is gone, and keeps doing so every
    ``SLIDESYNTH_RECOVERY_SECONDS``: a task ended by a broker restart leaves its job running with a dead process
    (its message waits in the broker's unacked set for the visibility timeout), and no worker restarts."""
    import threading

    ctx = context()
    recover_once(ctx)
    stop = threading.Event()

    def loop():
        while not stop.wait(ctx.settings.recovery_seconds):
            recover_once(ctx)

    threading.Thread(target=loop, name="slidesynth-recovery", daemon=True).start()

    def retention():
        """Expire finished jobs past ``SLIDESYNTH_RETENTION_HOURS`` every ``SLIDESYNTH_RETENTION_SWEEP_SECONDS``
        (every worker does; sweeps are idempotent and safe side by side)."""
        try:
            prepare_retention(ctx.store)
        except Exception:
            log.exception("indexing job records for retention and quotas failed")
        sweep_once(ctx)
        while not stop.wait(ctx.settings.retention_sweep_seconds):
            sweep_once(ctx)

    threading.Thread(target=retention, name="slidesynth-retention", daemon=True).start()


@worker_process_shutdown.connect
def _metrics_goodbye(pid=None, **_):
    """A pool process that ends (recycled, or the worker stopping) drops its live gauges (GPU memory, jobs
    running) from the metrics; one killed outright is pruned at the next scrape (core/metrics.py)."""
    mark_dead(pid)


_log_contexts: dict[str, object] = {}


@task_prerun.connect
def _open_log_context(task_id=None, task=None, args=None, **_):
    """Celery's own lines about a job's task (its outcome, its time) name the job and its tenant too: the log
    context opens before the task runs and closes after Celery has logged its end; run_job adds the tenant."""
    if task is not None and task.name == TASK_GENERATE and task_id:
        _log_contexts[task_id] = logs.open_context(job_id=args[0] if args else task_id)


@task_postrun.connect
def _close_log_context(task_id=None, **_):
    token = _log_contexts.pop(task_id, None)
    if token is not None:
        try:
            logs.close_context(token)
        except ValueError:  # opened in another context (not in a prefork pool process): leave it
            pass


WEBHOOK_DRAIN_SECONDS = 10.0


@worker_process_shutdown.connect
def _drain_webhooks(**_):
    """A pool process about to exit first lets its queued webhook events go out (a bounded wait)."""
    if _context is not None and _context._webhooks is not None:
        _context._webhooks.drain(WEBHOOK_DRAIN_SECONDS)
