"""The Celery configuration and job sending, shared by the API (producer) and the worker.

Configured for hour-long GPU jobs:

* Redis broker when ``SLIDESYNTH_BROKER_URL`` is set; otherwise kombu's filesystem transport under the
  data dir, so the embedded mode needs no server.
* Late acks, prefetch 1, reject on worker loss, a visibility timeout above the hard time limit (set in
  every place kombu reads it), no result backend (job records live in the job store).
* One queue per job priority, named from ``SLIDESYNTH_QUEUE``: ``<queue>.high``, ``<queue>`` (normal: the name
  deployments had before priorities) and ``<queue>.low``. Redis lists have no priorities, but kombu's Redis
  transport with ``queue_order_strategy: "priority"`` polls a worker's queues in the order it was given them
  (one ``BRPOP`` over all of them, in that order, instead of rotating the last-used queue to the end): a
  worker given high, normal, low takes a low job only when the other two are empty. Kombu's filesystem
  transport (the embedded mode) has no such option: it takes from its queues in turn.

Importing this module creates nothing; :mod:`worker.celery_app` holds the worker's app instance.
"""
from __future__ import annotations

from celery import Celery

from core.jobs import Priority
from core.settings import Settings, get_settings

TASK_GENERATE = "slidesynth.generate"
TASK_EMBED = "slidesynth.embed"  # tiles → embeddings (core.embedding), on the embed queue
PRIORITY_ORDER = (Priority.high, Priority.normal, Priority.low)  # the order a worker consumes the job queues


def job_queue(settings: Settings, priority: Priority | str = Priority.normal) -> str:
    """The Celery queue of a job of this priority: ``<queue>.high``, ``<queue>`` or ``<queue>.low``."""
    priority = Priority(priority)
    return settings.queue if priority == Priority.normal else f"{settings.queue}.{priority.value}"


def worker_queues(settings: Settings) -> list[str]:
    """What ``slidesynth worker`` consumes by default, in the order it polls them: the embed queue (short
    requests a client waits for), then the job queues from high to low priority."""
    return [settings.embed_queue_name, *(job_queue(settings, p) for p in PRIORITY_ORDER)]


def service_queues(settings: Settings) -> list[str]:
    """Every queue the API sends to, job queue first: what a worker may consume (``slidesynth worker --queues``
    is checked against it) and what the deployment's autoscaler watches. A new queue (priorities, say) is added
    here."""
    return list(dict.fromkeys([*(job_queue(settings, p) for p in PRIORITY_ORDER), settings.embed_queue_name]))


def broker_options(settings: Settings) -> tuple[str, dict]:
    visibility = settings.task_time_limit + 1800
    if settings.broker_url:
        # "priority": poll a worker's queues in the order given (-Q), not round robin (only Redis reads it)
        return settings.broker_url, {"visibility_timeout": visibility, "queue_order_strategy": "priority"}
    folder = settings.data_dir / "broker"
    for sub in ("queue", "processed", "control"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    return "filesystem://", {
        "data_folder_in": str(folder / "queue"),
        "data_folder_out": str(folder / "queue"),
        "processed_folder": str(folder / "processed"),
        "control_folder": str(folder / "control"),  # kombu's default is ./control in the working directory
        "store_processed": False,
    }


def make_celery(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    url, transport_options = broker_options(settings)
    app = Celery("slidesynth", broker=url, include=["worker.tasks"])
    app.conf.update(
        broker_transport_options=transport_options,
        visibility_timeout=transport_options.get("visibility_timeout"),
        broker_connection_retry_on_startup=True,
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=settings.worker_concurrency,
        task_time_limit=settings.task_time_limit,
        task_soft_time_limit=max(30, settings.task_time_limit - 300),
        task_default_queue=settings.queue,
        task_routes={TASK_GENERATE: {"queue": settings.queue}, TASK_EMBED: {"queue": settings.embed_queue_name}},
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_soft_shutdown_timeout=60.0,
        worker_hijack_root_logger=False,
        task_serializer="json",
        accept_content=["json"],
    )
    return app


def enqueue(celery: Celery, job_id: str, queue: str) -> None:
    """Send a job by task name; task id = job id, so a re-queued job keeps its id."""
    celery.send_task(TASK_GENERATE, args=[job_id], task_id=job_id, queue=queue)


def enqueue_job(celery: Celery, settings: Settings, job_id: str, priority: Priority | str) -> None:
    """Send a job to its priority's queue (a new job, and a re-queued one: it goes back where it waited)."""
    enqueue(celery, job_id, job_queue(settings, priority))
