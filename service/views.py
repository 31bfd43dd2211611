"""Job record → API representation (the data is built in :mod:`core.jobview`, shared with the worker's webhooks)."""
from __future__ import annotations

from core.jobs import JobRecord
from core.jobview import job_view_data
from service.schemas import Job


def job_view(job: JobRecord) -> Job:
    return Job.model_validate(job_view_data(job))
