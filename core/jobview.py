"""A job record as clients see it: the JSON of ``GET /jobs/{id}``, of each server-sent event of
``GET /jobs/{id}/events`` and of each webhook payload (with its ``type``). The API validates it through its ``Job``
schema (``service/schemas.py``); the worker sends it in webhooks; both build it here, so they cannot differ."""
from __future__ import annotations

from typing import Any

from core.jobs import JobRecord, JobStatus, iso


def expires_at(job: JobRecord, retention_hours: float) -> float | None:
    """When the job's files are (or were) removed by the retention sweep; None while it is unfinished or when
    files are kept forever."""
    if job.status == JobStatus.expired:
        return job.expired_at
    if not job.status.terminal or not retention_hours:
        return None
    finished = job.finished_at if job.finished_at is not None else job.created_at
    return finished + retention_hours * 3600


def job_view_data(job: JobRecord, retention_hours: float = 0.0) -> dict[str, Any]:
    base = f"/jobs/{job.id}"
    links: dict[str, str | None] = dict(self=base, slide=None, deepzoom=None, thumbnail=None, zarr=None, mask=None)
    if job.status == JobStatus.succeeded:
        if "tiff" in job.outputs:
            links["slide"] = f"{base}/slide.tiff"
            links["deepzoom"] = f"{base}/slide.dzi"
        if "thumbnail" in job.outputs:
            links["thumbnail"] = f"{base}/thumbnail.png"
        if "zarr" in job.outputs:
            links["zarr"] = f"{base}/slide.zarr/"
        if "mask" in job.outputs:
            links["mask"] = f"{base}/mask.png"
    spec = job.spec
    webhook = None
    if spec.webhook:
        webhook = dict(url=spec.webhook, events=list(spec.webhook_events), deliveries=job.webhook_deliveries,
                       failures=job.webhook_failures, last_error=job.webhook_last_error)
    return dict(
        id=job.id, status=job.status.value, priority=job.priority.value, stage=job.stage.value if job.stage else None,
        progress=job.progress, eta_seconds=job.eta_seconds, created_at=iso(job.created_at),
        started_at=iso(job.started_at), finished_at=iso(job.finished_at),
        expires_at=iso(expires_at(job, retention_hours)), error=job.error, model=spec.model, untrained=job.untrained,
        cancel_requested=job.cancel_requested, width=spec.width, height=spec.height, mpp=spec.mpp, seed=spec.seed,
        steps=spec.steps, step=job.step, metrics=dict(job.metrics), links=links, webhook=webhook,
    )
