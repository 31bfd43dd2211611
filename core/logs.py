"""Log lines of ``slidesynth serve`` and ``slidesynth worker``: text or JSON (``SLIDESYNTH_LOG_FORMAT``), the job
each line concerns, and no secret in any of them.

* :func:`configure` installs one handler on the root logger (stderr) with :class:`ContextFilter` and
  :class:`RedactFilter`; every library's records (uvicorn, Celery, kombu, warnings) go through it.
  :func:`uvicorn_log_config` is the same configuration as a ``logging.config.dictConfig`` dict, which uvicorn
  applies in each of its processes.
* ``json``: one object per line — ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``, ``pid``,
  ``job_id`` and ``tenant`` while a job is handled, the fields a caller passed with ``extra=``, ``exception``.
* The job context is a context variable holding a mutable :class:`LogContext`: the worker opens one per job
  (:func:`job_context`, in ``run_job``); the API opens one per request, reads the job id from the route's
  ``{job_id}`` (or ``POST /generate``'s new job) and the tenant from the API key. Threads started from a
  request (FastAPI's thread pool) copy the context variable, and so share the same object.
* Redaction: passwords in URLs (``scheme://user:password@host`` → ``scheme://user:***@host``), and the values of
  the secret settings (the API keys, any ``*secret*``/``*password*``/``*token*`` setting, URL passwords) wherever
  they appear in a message, its arguments, an exception's traceback or an ``extra`` field.
"""
from __future__ import annotations

import contextvars
import json
import logging
import logging.config
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterator

FORMATS = ("text", "json")
URL_CREDENTIALS = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^\s:/@]*):(?P<password>[^\s@/]+)@")
MIN_SECRET_LENGTH = 4  # shorter values are not searched for (they would shred every line); never use such keys
_SECRET_SETTING = re.compile(r"(^api_keys$|secret|password|token)")
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
_DROPPED_EXTRAS = frozenset({"color_message"})  # uvicorn's copy of the message with terminal colour codes
TASK_GENERATE = "slidesynth.generate"  # core.queue's name (not imported: logging needs no Celery)


# --- the job a line concerns -----------------------------------------------------------------------------------

@dataclass
class LogContext:
    """What lines logged in this context are about. ``scope``: the ASGI request scope, whose ``path_params``
    (filled by the router after the context was opened) name the job of ``/jobs/{job_id}…`` routes."""

    job_id: str | None = None
    tenant: str | None = None
    scope: dict | None = None

    def job(self) -> str | None:
        if self.job_id is not None:
            return self.job_id
        if self.scope is not None:
            value = (self.scope.get("path_params") or {}).get("job_id")
            return value if isinstance(value, str) else None
        return None


_context: contextvars.ContextVar[LogContext | None] = contextvars.ContextVar("slidesynth_log_context", default=None)


@contextmanager
def job_context(job_id: str | None = None, tenant: str | None = None, scope: dict | None = None
                ) -> Iterator[LogContext]:
    """Lines logged inside (this task or thread, and threads it starts with a copy of its context) carry
    ``job_id`` and ``tenant``."""
    ctx = LogContext(job_id, tenant, scope)
    token = _context.set(ctx)
    try:
        yield ctx
    finally:
        _context.reset(token)


def open_context(job_id: str | None = None, tenant: str | None = None) -> contextvars.Token:
    """:func:`job_context` in two halves, for hooks that open and close it apart (Celery's task_prerun and
    task_postrun signals): give the token back to :func:`close_context`."""
    return _context.set(LogContext(job_id, tenant))


def close_context(token: contextvars.Token) -> None:
    _context.reset(token)


def set_context(job_id: str | None = None, tenant: str | None = None) -> None:
    """Fill in the open context (no-op outside one): e.g. the tenant once the API key is checked."""
    ctx = _context.get()
    if ctx is None:
        return
    if job_id is not None:
        ctx.job_id = job_id
    if tenant is not None:
        ctx.tenant = tenant


def current_context() -> LogContext | None:
    return _context.get()


class ContextFilter(logging.Filter):
    """Adds ``job_id`` and ``tenant`` of the open :class:`LogContext` to each record (unless it has its own)."""

    def filter(self, record: logging.LogRecord) -> bool:
        data = getattr(record, "data", None)
        if isinstance(data, dict) and data.get("name") == TASK_GENERATE and getattr(record, "job_id", None) is None:
            record.job_id = data.get("id")  # Celery's lines about a job's task (received, …): task id = job id
        ctx = _context.get()
        if ctx is not None:
            job_id = ctx.job()
            if job_id is not None and getattr(record, "job_id", None) is None:
                record.job_id = job_id
            if ctx.tenant is not None and getattr(record, "tenant", None) is None:
                record.tenant = ctx.tenant
        return True


# --- redaction -------------------------------------------------------------------------------------------------

def url_password(url: str | None) -> str | None:
    if not url:
        return None
    match = URL_CREDENTIALS.search(url)
    return match.group("password") if match else None


def secrets_of(settings: Any) -> list[str]:
    """The secret values in the settings: API keys (the part after ``tenant:``), any setting named like a
    secret, password or token (each comma-separated item, and its part after a ``name:``), URL passwords."""
    from core.settings import comma_items

    found: set[str] = set()
    for name in type(settings).model_fields:
        value = getattr(settings, name, None)
        if not isinstance(value, str) or not value:
            continue
        password = url_password(value)
        if password:
            found.add(password)
        if _SECRET_SETTING.search(name):
            for item in comma_items(value):
                _, sep, secret = item.partition(":")
                found.add(secret if sep and name == "api_keys" else item)
                if sep and secret:
                    found.add(secret)
    return sorted((s for s in found if len(s) >= MIN_SECRET_LENGTH), key=len, reverse=True)


def redact(text: str, secrets: list[str] | tuple[str, ...] = ()) -> str:
    """``text`` without URL passwords and without any of ``secrets``."""
    text = URL_CREDENTIALS.sub(lambda m: f"{m.group('scheme')}{m.group('user')}:***@", text)
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, "***")
    return text


class RedactFilter(logging.Filter):
    """Takes secrets out of every record that reaches the handler: the formatted message (arguments merged in),
    the traceback, the stack and string ``extra`` fields. ``secrets``: default, those of the settings."""

    def __init__(self, secrets: list[str] | None = None):
        super().__init__()
        if secrets is None:
            from core.settings import get_settings

            secrets = secrets_of(get_settings())
        self.secrets = list(secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a record whose arguments do not fit its format: keep the raw parts
            message = f"{record.msg} {record.args}"
        clean = redact(message, self.secrets)
        if clean != message or record.args:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, self.secrets)
        if record.stack_info:
            record.stack_info = redact(record.stack_info, self.secrets)
        for key, value in list(vars(record).items()):
            if key not in _STANDARD_ATTRS and isinstance(value, str):
                setattr(record, key, redact(value, self.secrets))
        return True


# --- formats ---------------------------------------------------------------------------------------------------

def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items()
            if k not in _STANDARD_ATTRS and k not in _DROPPED_EXTRAS and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """One JSON object per line (a multi-line message or traceback is escaped, never split)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        extras = _extras(record)
        for key in ("job_id", "tenant"):
            if extras.get(key) is not None:
                out[key] = extras.pop(key)
        for key, value in extras.items():
            out.setdefault(key, value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = record.stack_info
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``time LEVEL logger [process] message key=value…`` (job_id, tenant and ``extra`` fields at the end; not
    Celery's ``data``, which repeats its message)."""

    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(processName)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = _extras(record)
        tail = " ".join(f"{k}={extras[k]}" for k in ("job_id", "tenant") if extras.get(k) is not None)
        tail += "".join(f" {k}={v}" for k, v in extras.items() if k not in ("job_id", "tenant", "data"))
        if not tail.strip():
            return line
        head, sep, rest = line.partition("\n")  # after the message's first line, before a traceback
        return f"{head} {tail.strip()}{sep}{rest}"


# --- configuration ---------------------------------------------------------------------------------------------

def log_config(log_format: str = "text", level: str = "INFO", secrets: list[str] | None = None) -> dict:
    """A ``logging.config.dictConfig`` dict: the root logger's one handler on stderr; uvicorn's loggers
    propagate to it (uvicorn applies this dict in each of its processes: ``uvicorn.run(log_config=…)``)."""
    if log_format not in FORMATS:
        raise ValueError(f"log format {log_format!r}: one of {', '.join(FORMATS)}")
    level = str(level).upper()
    redact_filter: dict[str, Any] = {"()": "core.logs.RedactFilter"}
    if secrets is not None:
        redact_filter["secrets"] = list(secrets)
    formatter = "core.logs.JsonFormatter" if log_format == "json" else "core.logs.TextFormatter"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"context": {"()": "core.logs.ContextFilter"}, "redact": redact_filter},
        "formatters": {"main": {"()": formatter}},
        "handlers": {"main": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr", "formatter": "main",
                              "filters": ["context", "redact"]}},
        "root": {"level": level, "handlers": ["main"]},
        "loggers": {name: {"handlers": [], "propagate": True, "level": level}
                    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "celery", "kombu")},
    }


def configure(settings: Any, level: str = "INFO") -> None:
    """Log this process as the settings say (``SLIDESYNTH_LOG_FORMAT``), with the settings' secrets redacted."""
    logging.config.dictConfig(log_config(settings.log_format, level, secrets_of(settings)))
    logging.captureWarnings(True)  # warnings.warn goes through the handler (a JSON line, redacted)


def say(logger: logging.Logger, settings: Any, message: str, *, level: int = logging.INFO,
        stream=None) -> None:
    """A launcher's line: printed as before in text mode (redacted), logged as a JSON line in json mode."""
    if settings.log_format == "json":
        logger.log(level, message)
        return
    print(redact(message, secrets_of(settings)), file=stream or sys.stdout, flush=True)


def take_over_celery_logging(app, log_format: str = "text") -> None:
    """Keep Celery from configuring logging (it would install its own format on the root logger): the worker
    logs through :func:`configure`'s handler. Celery's stdout redirection (its default,
    ``worker_redirect_stdouts``), which it skips once logging is someone else's, is done here instead, so that
    prints in tasks become records too (a JSON line each). In json mode, the few lines Celery writes straight to
    the terminal from its signal handlers ("worker: Warm shutdown (MainProcess)", with ``os.write``, no logging)
    become JSON lines, written the same lock-free way."""
    from celery.signals import setup_logging

    if log_format == "json":
        import celery.apps.worker

        celery.apps.worker.safe_say = _json_say

    def _configured(loglevel=None, **_):
        if app.conf.worker_redirect_stdouts:
            app.log.redirect_stdouts_to_logger(logging.getLogger("celery.redirected"),
                                               loglevel=app.conf.worker_redirect_stdouts_level)
        return True

    setup_logging.connect(_configured, weak=False)


def _json_say(msg, f=None) -> None:
    """celery.apps.worker.safe_say as a JSON line on stderr: no logging locks (it runs in signal handlers)."""
    import os
    import time

    line = json.dumps({"time": datetime.fromtimestamp(time.time(), timezone.utc).isoformat(timespec="milliseconds"),
                       "level": "WARNING", "logger": "celery.apps.worker", "message": str(msg).strip(),
                       "pid": os.getpid()})
    try:
        os.write(2, (line + "\n").encode())
    except OSError:
        pass
