"""Job record → API representation (the data is built in :mod:`core.jobview`, shared with the worker's webhooks)."""
from __future__ import annotations

from core.jobs import JobRecord
from core.jobview import expires_at, job_view_data
from service.schemas import Job

__all__ = ["expires_at", "job_view"]


def job_view(job: JobRecord, retention_hours: float = 0.0) -> Job:
    return Job.model_validate(job_view_data(job, retention_hours))
