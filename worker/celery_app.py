"""The worker's Celery app (``celery -A worker.celery_app``, or ``slidesynth worker``)."""
from __future__ import annotations

from core.queue import TASK_GENERATE, make_celery

app = make_celery()

__all__ = ["app", "TASK_GENERATE"]
