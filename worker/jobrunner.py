"""Job bookkeeping around the pure pipeline: claim, progress, cancel, checkpoints, result, cleanup.

Called by the Celery task with a job id. Redelivered jobs (worker lost mid-run) resume from the last
sampler checkpoint; after ``max_attempts`` deliveries a job is failed rather than looped forever.

Every line logged while a job is handled carries its ``job_id`` and ``tenant`` (core/logs.py); a run that holds
the job feeds the worker's metrics (worker/metrics.py: queue wait, duration, steps, band throughput, output
bytes, GPU memory).
"""
from __future__ import annotations

import logging
import os
import shutil
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from core import logs
from core.contract import OUTPUT_FILES, overall_fraction
from core.jobs import JobRecord, JobStatus, JobStore, Stage, open_store
from core.settings import Settings, get_settings
from core.webhooks import WebhookDispatcher
from models.engine import Runtime, get_engine
from models.registry import ModelRegistry
from models.runtime import Canceled
from worker.device_check import resolve_device, worker_runtime
from worker.metrics import JobMeter
from worker.pipeline import generate_slide

log = logging.getLogger("slidesynth.worker")

STATE_FILE = "sampler_state.pt"


@dataclass
class WorkerContext:
    settings: Settings
    store: JobStore
    registry: ModelRegistry
    hostname: str = "worker"
    _device_runtime: tuple[Any, Runtime] | None = field(default=None, repr=False)
    _webhooks: WebhookDispatcher | None = field(default=None, repr=False)

    @classmethod
    def from_settings(cls, settings: Settings | None = None, hostname: str = "worker") -> "WorkerContext":
        settings = settings or get_settings()
        if settings.torch_threads:
            import torch

            torch.set_num_threads(settings.torch_threads)
        return cls(settings, open_store(settings), ModelRegistry(settings.models_dir), hostname)

    @property
    def webhooks(self) -> WebhookDispatcher:
        """This process's webhook sender (its threads start with the first event to send)."""
        if self._webhooks is None:
            self._webhooks = WebhookDispatcher(self.store, self.settings)
        return self._webhooks

    def device_runtime(self) -> tuple[Any, Runtime]:
        """This process's torch device and Runtime, taken on its first job: a pool process initialises CUDA
        itself, never the parent it is forked from."""
        if self._device_runtime is None:
            device = worker_device(self.settings.device)
            self._device_runtime = device, worker_runtime(self.settings, device, self.registry)
        return self._device_runtime


class ProgressRecorder:
    """Writes stage, progress fraction, step and ETA to the job store (every call: once per step), then calls
    ``on_progress`` (which must not block: the webhook sender only queues).

    A write the store cannot take (unreachable: a Redis restart) is skipped, not fatal: the next step writes again,
    and a run that stays silent past the lease is presumed lost and fenced off by its claim like any other."""

    def __init__(self, store: JobStore, job_id: str, stages: tuple[Stage, ...], total_steps: int,
                 meter: JobMeter | None = None, on_progress: Callable[[], None] | None = None):
        self.store, self.job_id, self.stages = store, job_id, stages
        self.total_steps = total_steps
        self.meter = meter
        self.on_progress = on_progress
        self.t0 = time.monotonic()
        self._last_eta: float | None = None
        self._store_down = False

    def __call__(self, stage: Stage, fraction: float, step: int | None) -> None:
        overall = overall_fraction(stage, fraction, self.stages)
        elapsed = time.monotonic() - self.t0
        eta = None
        if overall > 0.02 and elapsed > 0.5:
            raw = elapsed * (1 - overall) / overall
            # Exponential smoothing keeps the estimate from jumping between stages.
            eta = raw if self._last_eta is None else 0.7 * self._last_eta + 0.3 * raw
            self._last_eta = eta
        fields: dict[str, Any] = dict(stage=stage, progress=round(overall, 4), heartbeat_at=time.time(),
                                      eta_seconds=None if eta is None else round(eta, 1))
        if step is not None:
            fields["step"] = step
        try:
            self.store.update(self.job_id, **fields)
        except self.store.unavailable as exc:
            if not self._store_down:
                log.warning("job %s: the job store is unreachable (%s): progress goes unrecorded until it is back; "
                            "the run goes on", self.job_id, exc)
            self._store_down = True
        else:
            if self._store_down:
                log.info("job %s: the job store is back; progress recorded again", self.job_id)
            self._store_down = False
        if self.meter is not None:
            self.meter.step(step)
        if self.on_progress is not None:
            self.on_progress()


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def remove_partials(job_dir: Path) -> None:
    """Delete what an interrupted run left half-written (writers' temporaries, torn checkpoints)."""
    for pattern in (".*.partial-*", "*.part", "*.tmp"):
        for path in job_dir.glob(pattern):
            _remove(path)


def remove_outputs(job_dir: Path) -> None:
    """Delete everything a run produced (inputs stay)."""
    for name in list(OUTPUT_FILES.values()) + [STATE_FILE, "metadata.json"]:
        _remove(job_dir / name)
    remove_partials(job_dir)


def worker_device(setting: str):
    """The torch device of this worker process: with several GPUs and ``auto``, pool process N takes GPU N."""
    from billiard.process import current_process

    return resolve_device(setting, index=getattr(current_process(), "index", 0) or 0)


def run_job(job_id: str, ctx: WorkerContext) -> JobStatus | None:
    opened = logs.current_context()
    if opened is not None and opened.job_id == job_id:  # the task's (worker/tasks.py): it gets the tenant too
        return _run_job(job_id, ctx)
    with logs.job_context(job_id=job_id):  # every line logged while the job is handled names it
        return _run_job(job_id, ctx)


def _run_job(job_id: str, ctx: WorkerContext) -> JobStatus | None:
    store, settings = ctx.store, ctx.settings
    job = store.get(job_id)
    if job is None:
        log.error("job %s not found; dropping the message", job_id)
        return None
    logs.set_context(tenant=job.tenant)
    if job.status.terminal:
        # e.g. canceled while queued, or a duplicate delivery of a finished job; its completed webhook, unless the
        # process that ended it queued it already
        _completed(ctx, job)
        return job.status
    job_dir = store.job_dir(job_id)
    if store.cancel_requested(job_id):
        store.transition(job_id, {JobStatus.queued, JobStatus.running}, status=JobStatus.canceled,
                         finished_at=time.time())
        remove_outputs(job_dir)
        _completed(ctx, job)
        return JobStatus.canceled
    if job.status == JobStatus.running and run_alive(job, ctx):
        # A second delivery of a job whose run is alive (a re-queued message, a recovery that raced a redelivery):
        # dropped, and not an attempt. The live run holds its own message until it ends; if it dies, that message
        # is redelivered or the run's stale heartbeat gets the job re-queued (recover_orphans).
        log.warning("job %s is running in %s: this delivery is a duplicate and is dropped", job_id, job.worker)
        return JobStatus.running
    attempts = job.attempts + 1
    if attempts > settings.max_attempts:
        store.transition(job_id, {JobStatus.queued, JobStatus.running}, status=JobStatus.failed,
                         finished_at=time.time(), error=f"gave up after {job.attempts} attempts (worker lost)")
        remove_outputs(job_dir)
        _completed(ctx, job)
        return JobStatus.failed
    claim = uuid.uuid4().hex
    # expect the claim we read: of two deliveries racing for the job, one takes it
    if not store.transition(job_id, {JobStatus.queued, JobStatus.running}, expect={"claim": job.claim},
                            status=JobStatus.running,
                            started_at=job.started_at or time.time(), attempts=attempts, claim=claim,
                            heartbeat_at=time.time(), worker=f"{ctx.hostname}/{os.getpid()}",
                            total_steps=job.spec.steps):
        current = store.get(job_id)
        return current.status if current else None
    log.info("job %s started (attempt %d, model %s, %d×%d px, %d steps)", job_id, attempts, job.spec.model,
             job.spec.width, job.spec.height, job.spec.steps)
    meter = JobMeter(job)
    meter.started(first_run=job.started_at is None)
    status: JobStatus | None = None
    try:
        status = _run_claimed(job, ctx, claim, attempts, meter)
        return status
    finally:
        meter.finished(status)
        log.info("job %s run ended: %s", job_id, status.value if status is not None else "error")


def _run_claimed(job: JobRecord, ctx: WorkerContext, claim: str, attempts: int, meter: JobMeter) -> JobStatus | None:
    """The run of a job this process has claimed: the pipeline, then the job's end recorded (if still its own)."""
    store, settings, job_id = ctx.store, ctx.settings, job.id
    job_dir = store.job_dir(job_id)
    if attempts > 1:
        remove_partials(job_dir)  # what the lost run left half-written; its checkpoint stays for the resume
    mine = {"claim": claim}  # fencing: a run that lost its claim (the job was re-queued) cannot finish it
    _notify(ctx, job, "start")

    spec = job.spec
    state_path = job_dir / STATE_FILE

    def checkpoint(state) -> None:
        every = settings.checkpoint_every
        if every and state.step % every == 0 and state.step > 0:
            state.save(state_path)  # atomic: temporary file, then rename

    claim_check: ClaimCheck | None = None
    try:
        engine = get_engine(spec.engine)  # UnknownEngine for a job of an engine this worker lacks: it fails
        resume = engine.load_state(state_path) if attempts > 1 else None
        # read now: the sampler advances the state it resumes from in place
        resumed_from = int(resume.step) if resume is not None else None
        if attempts > 1 and resume is None and state_path.exists():
            log.warning("ignoring unreadable sampler checkpoint %s", state_path)
        if resumed_from is not None:
            meter.resumed_at(resumed_from)  # the steps before it were counted by the run that did them
            log.info("job %s resumes from its checkpoint at step %d", job_id, resumed_from)
        report = ProgressRecorder(store, job_id, engine.stages(spec.conditioning), spec.steps, meter,
                                  on_progress=(lambda: _notify(ctx, job, "progress"))
                                  if "progress" in spec.webhook_events and spec.webhook else None)
        device, runtime = ctx.device_runtime()
        meter.device = device
        meter.reset_peak()
        models = ctx.registry.load(spec.model, device)
        store.update(job_id, untrained=not models.card.trained)
        claim_check = ClaimCheck(store, job_id, claim)
        result = generate_slide(spec, models, job_dir, engine=engine, device=device, report=report,
                                cancel=lambda: stop_requested(store, job_id, claim_check),
                                runtime=runtime, resume_state=resume, on_checkpoint=checkpoint, meter=meter)
    except Canceled:
        if claim_check is not None and claim_check.lost(force=True):
            # another run took the job (this one was presumed lost): stop, and leave its record alone
            log.warning("job %s: this run lost its claim and stops", job_id)
            current = store.get(job_id)
            return current.status if current else None
        return _finish_canceled(ctx, job, job_dir, mine)
    except Exception as exc:  # the job fails; the worker lives on
        log.error("job %s failed: %s\n%s", job_id, exc, traceback.format_exc())
        message = str(exc) or exc.__class__.__name__
        if store.transition(job_id, {JobStatus.running}, expect=mine, status=JobStatus.failed,
                            finished_at=time.time(), error=f"{exc.__class__.__name__}: {message}", eta_seconds=None):
            remove_outputs(job_dir)
            _completed(ctx, job)
        return JobStatus.failed
    if store.cancel_requested(job_id):  # a DELETE that came after the last cancel check still wins
        return _finish_canceled(ctx, job, job_dir, mine)
    state_path.unlink(missing_ok=True)
    if resumed_from is not None:
        result.metrics["resumed_from_step"] = float(resumed_from)
    if not store.transition(job_id, {JobStatus.running}, expect=mine, status=JobStatus.succeeded,
                            finished_at=time.time(), progress=1.0, eta_seconds=0.0, stage=Stage.writing,
                            outputs=result.outputs, metrics=result.metrics):
        log.warning("job %s: this run lost its claim; its result is not recorded", job_id)
        current = store.get(job_id)
        return current.status if current else None
    meter.outputs(result.outputs, job_dir)
    _completed(ctx, job)
    return JobStatus.succeeded


def _finish_canceled(ctx: WorkerContext, job: JobRecord, job_dir: Path, mine: dict) -> JobStatus:
    if ctx.store.transition(job.id, {JobStatus.running}, expect=mine, status=JobStatus.canceled,
                            finished_at=time.time(), eta_seconds=None):
        remove_outputs(job_dir)
        _completed(ctx, job)
    log.info("job %s canceled", job.id)
    return JobStatus.canceled


def _notify(ctx: WorkerContext, job: JobRecord, kind: str) -> None:
    """Queue a webhook event of the job (when it has a webhook that wants it); never raises, never blocks."""
    if job.spec.webhook:
        try:
            ctx.webhooks.notify(job, kind)
        except Exception:
            log.exception("job %s: queueing the %s webhook failed", job.id, kind)


def _completed(ctx: WorkerContext, job: JobRecord) -> None:
    """Queue the job's `completed` webhook once it has a terminal status (once per job: see WebhookDispatcher)."""
    if job.spec.webhook:
        ctx.webhooks.completed(job)


def fail_job(job_id: str, ctx: WorkerContext, error: str) -> None:
    """Record a failure the task itself could not (hard time limit: the process was killed)."""
    job = ctx.store.get(job_id)
    if job is not None and ctx.store.transition(job_id, {JobStatus.queued, JobStatus.running},
                                                status=JobStatus.failed, finished_at=time.time(), error=error):
        remove_outputs(ctx.store.job_dir(job_id))
        _completed(ctx, job)


def stop_requested(store: JobStore, job_id: str, claim_check: "ClaimCheck") -> bool:
    """The pipeline's check, every step and band: canceled, or taken over by another run. While the store cannot be
    reached, neither can be known (nor recorded: a DELETE cannot set the flag either): go on, ask again next time."""
    try:
        return store.cancel_requested(job_id) or claim_check.lost()
    except store.unavailable:
        return False


CLAIM_CHECK_SECONDS = 2.0


class ClaimCheck:
    """Whether a run still holds its job's claim, read from the store at most every ``every`` seconds (the sampler
    asks once per step): a run presumed lost whose job was re-queued and taken by another stops within seconds."""

    def __init__(self, store: JobStore, job_id: str, claim: str, every: float | None = None):
        self.store, self.job_id, self.claim = store, job_id, claim
        self.every = CLAIM_CHECK_SECONDS if every is None else every
        self._checked, self._lost = time.monotonic(), False

    def lost(self, force: bool = False) -> bool:
        if not self._lost and (force or time.monotonic() - self._checked >= self.every):
            self._checked = time.monotonic()
            job = self.store.get(self.job_id)
            self._lost = job is not None and job.claim != self.claim
        return self._lost


def run_alive(job, ctx: WorkerContext) -> bool:
    """Is the run recorded on a running job alive? Its heartbeat is within the lease and, on this host, its
    process exists and is not this one (a process runs one job at a time: a record naming it is a run it lost)."""
    if job.heartbeat_at is None or time.time() - job.heartbeat_at > ctx.settings.lease_seconds:
        return False
    host, _, pid = (job.worker or "").rpartition("/")
    if host == ctx.hostname and pid.isdigit():
        return int(pid) != os.getpid() and _alive(int(pid))
    return bool(job.worker)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_orphans(ctx: WorkerContext, enqueue: Callable[[JobRecord], None]) -> list[str]:
    """Re-queue running jobs whose process is gone: on this host, a dead pid; anywhere, a heartbeat older
    than the lease. Runs when a worker starts; the re-queued job resumes from its checkpoint. ``enqueue`` gets
    the job's record (its id and priority: it goes back on its priority's queue)."""
    requeued = []
    now = time.time()
    for job in ctx.store.running():
        host, _, pid = (job.worker or "").rpartition("/")
        dead_here = host == ctx.hostname and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid))
        stale = job.heartbeat_at is not None and now - job.heartbeat_at > ctx.settings.lease_seconds
        if not (dead_here or stale):
            continue
        if ctx.store.transition(job.id, {JobStatus.running}, expect={"claim": job.claim}, status=JobStatus.queued,
                                claim=None, worker=None):
            enqueue(job)
            requeued.append(job.id)
            log.warning("job %s was running in a lost process (%s): re-queued", job.id, job.worker,
                        extra={"job_id": job.id, "tenant": job.tenant})
    return requeued
