"""Settings a worker checks against the deployment before it starts, without torch: the queues it consumes and the
models folder. A worker whose settings contradict the deployment would otherwise start and sit idle (a queue no
API sends to) or fail every job (a default model that is not there); instead ``slidesynth worker`` exits with one
line naming the setting. The device settings are checked afterwards by :mod:`worker.device_check`.
"""
from __future__ import annotations

from typing import Any

from core import queue as service_queue_names
from core.queue import service_queues
from core.settings import Settings, comma_items


class StartCheckError(ValueError):
    """A setting that contradicts the deployment; the message starts with the variable (or option) and its
    value, as :class:`worker.device_check.DeviceCheckError`'s does."""

    def __init__(self, variable: str, value: Any, problem: str):
        super().__init__(variable, value, problem)  # all three in args: the error pickles across processes
        self.variable, self.value, self.problem = variable, value, problem

    def __str__(self) -> str:
        return f"{self.variable}={self.value}: {self.problem}"


def worker_queues(settings: Settings, option: str | None) -> list[str]:
    """The queues a worker consumes, in the order it polls them: ``--queues`` when given (each must be one the
    service sends to), else :func:`core.queue.worker_queues` (the embed queue, then high, normal, low jobs)."""
    known = service_queues(settings)
    if option is None:
        return service_queue_names.worker_queues(settings)
    queues = comma_items(option)
    if not queues:
        raise StartCheckError("--queues", repr(option), "names no queue")
    for queue in queues:
        if queue not in known:
            raise StartCheckError(
                "--queues", option, f"{queue!r} is not a queue this service sends to: the API sends to "
                f"{', '.join(known)} (SLIDESYNTH_QUEUE={settings.queue}, SLIDESYNTH_EMBED_QUEUE="
                f"{settings.embed_queue or '<queue>.embed'}); set those settings alike on the API and the workers")
    return queues


def check_models(settings: Settings) -> None:
    """The default models exist: a built-in untrained model needs no folder (the models folder may even be
    missing, as in development), any other needs its folder in the models folder."""
    from models.registry import ModelRegistry  # cards only: no network is built

    folder = settings.models_dir
    try:
        cards = ModelRegistry(folder).cards()
    except Exception as exc:  # a malformed card: name it rather than fail every job that reads the registry
        raise StartCheckError("SLIDESYNTH_MODELS_DIR", folder, f"holds a model card that does not load "
                              f"({exc.__class__.__name__}: {exc})") from None
    for variable, name in (("SLIDESYNTH_DEFAULT_MODEL", settings.default_model),
                           ("SLIDESYNTH_DEFAULT_EMBEDDING_MODEL", settings.default_embedding_model)):
        if name in cards:
            continue
        if not folder.is_dir():
            where = f"SLIDESYNTH_MODELS_DIR={folder} is not a folder (is the weights volume mounted?)"
        else:
            here = sorted(cards)
            where = (f"no folder {name}/ with a model_card.json of an installed engine in SLIDESYNTH_MODELS_DIR="
                     f"{folder} (models: {', '.join(here)})")
        raise StartCheckError(variable, name, f"no such model: {where}")


def check_deployment(settings: Settings, queues_option: str | None) -> list[str]:
    """Every torch-free start check; returns the queues to consume. Raises :class:`StartCheckError`."""
    queues = worker_queues(settings, queues_option)
    check_models(settings)
    return queues
