"""The API's request metrics and access log (core/metrics.py: how the processes' metrics are merged).

:class:`RequestObserver`, the outermost middleware, counts every HTTP request by method, route **template**
(``/jobs/{job_id}``, never the raw path: one series per route, not per job) and the status the client got — a
handler's unhandled error counts as the 500 the server error middleware answers, a body refused as too large as
413 — times it, writes one access line, and opens the log context (core/logs.py) that puts ``job_id`` and
``tenant`` on every line logged while the request is handled.
"""
from __future__ import annotations

import logging
import time

from prometheus_client import Counter, Histogram
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from core import logs

REQUESTS = Counter("slidesynth_http_requests_total", "HTTP requests by method, route template and the status "
                   "the client got", ["method", "route", "status"])
LATENCY = Histogram("slidesynth_http_request_duration_seconds", "Time from a request's arrival to the end of its "
                    "answer, by method and route template", ["method", "route"],
                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "<unmatched>"  # no route: one series for every unknown path
QUIET_ROUTES = frozenset({"/healthz", "/metrics"})  # probes and scrapes: their access lines at DEBUG when fine

access_log = logging.getLogger("slidesynth.access")


def route_template(scope: Scope) -> str:
    """The path template of the route that handled (or would handle) the request."""
    route = scope.get("route")  # set by the router on the way in
    path = getattr(route, "path", None)
    if not (isinstance(path, str) and path):  # refused before routing (413 by Content-Length): match it here
        path = _match(getattr(getattr(scope.get("app"), "router", None), "routes", []), scope)
    return path or UNMATCHED


def _match(routes, scope: Scope) -> str | None:
    """The template of the route in ``routes`` that takes ``scope`` (a full match before a partial one, which
    is a path whose method differs), descending into FastAPI's included routers."""
    partial = None
    for route in routes:
        try:
            match, _ = route.matches(scope)
        except Exception:  # a route kind that cannot judge a scope outside the router
            continue
        if match == Match.NONE:
            continue
        inner = getattr(route, "original_router", None)  # FastAPI wraps each include_router() in one
        path = _match(inner.routes, scope) if inner is not None else getattr(route, "path", None)
        if match == Match.FULL and path:
            return path
        partial = partial or path
    return partial


class RequestObserver:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status: dict[str, int] = {}

        async def recording_send(message):
            if message["type"] == "http.response.start":
                status["status"] = message["status"]
            await send(message)

        with logs.job_context(scope=scope):
            try:
                await self.app(scope, receive, recording_send)
            except BaseException:
                # an unhandled error: the server error middleware outside answers 500 (count what the client gets)
                status.setdefault("status", 500)
                raise
            finally:
                elapsed = time.perf_counter() - start
                method = scope.get("method", "")
                method = method if method in METHODS else "other"
                route = route_template(scope)
                code = status.get("status", 500)
                REQUESTS.labels(method, route, str(code)).inc()
                LATENCY.labels(method, route).observe(elapsed)
                level = (logging.WARNING if code >= 500 else logging.DEBUG if route in QUIET_ROUTES and code < 400
                         else logging.INFO)
                access_log.log(level, "%s %s %d", method,
                               scope.get("path", ""), code,
                               extra={"method": method, "route": route, "status": code,
                                      "duration_ms": round(elapsed * 1000, 1)})
