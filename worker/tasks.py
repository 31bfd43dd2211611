"""Celery tasks: thin adapters from a job id to :func:`worker.jobrunner.run_job`."""
from __future__ import annotations

import socket

from worker.celery_app import TASK_GENERATE, app
from worker.jobrunner import WorkerContext, run_job

_context: WorkerContext | None = None


def context() -> WorkerContext:
    """Per-process context, created on the first task (never before fork: CUDA stays untouched)."""
    global _context
    if _context is None:
        _context = WorkerContext.from_settings(hostname=socket.gethostname())
    return _context


@app.task(name=TASK_GENERATE, acks_late=True, reject_on_worker_lost=True)
def generate(job_id: str) -> None:
    run_job(job_id, context())
