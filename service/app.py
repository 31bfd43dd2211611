"""The FastAPI application factory."""
from __future__ import annotations

import signal
import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from redis.exceptions import ConnectionError as RedisConnectionError, TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from models.registry import ModelRegistry
from service.deps import Services
from service.metrics import RequestObserver
from service.routes import embed, generate, jobs, system, web
from service.schemas import GenerateRequest, MultipartEmbed, MultipartGenerate
from service.views import job_view
from core import __version__
from core.embedding import open_reply_box
from core.events import RenderedEvents, open_event_feed, stop_streams
from core.idempotency import open_idempotency_keys
from core.jobs import open_store
from core.metrics import JobStoreCollector
from core.webhooks import WebhookDispatcher
from core.settings import Settings, get_settings
from core.queue import make_celery


class BodyLimit:
    """Refuse bodies over ``limit`` bytes (413) by Content-Length and by counting what arrives (the 413 is counted
    and logged by :class:`service.metrics.RequestObserver` outside)."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send)
        seen = 0

        async def counting_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return message

        started = {}

        async def recording_send(message):
            if message["type"] == "http.response.start":
                started["status"] = message["status"]
            await send(message)

        try:
            await self.app(scope, counting_receive, recording_send)
        except _TooLarge:
            if "status" not in started:
                await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        body = b'{"detail":"request body too large"}'
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


async def store_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """The job store (Redis) cannot be reached: 503 with Retry-After, as POST /generate answers, not a 500."""
    return JSONResponse({"detail": f"job store unavailable: {exc}"}, status_code=503, headers={"Retry-After": "30"})


def end_streams_on_stop_signals() -> None:
    """When the server is asked to stop (SIGTERM, SIGINT), end the open ``GET /jobs/{id}/events`` streams first, then
    do what the server does (uvicorn: a graceful shutdown, which waits for open responses: a stream would hold it
    until its job ends). Wraps the handlers the server installed, in its main thread, whatever runs it (``slidesynth
    serve`` with one or several processes, ``uvicorn --factory``); elsewhere (a test client's thread) nothing."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous = signal.getsignal(sig)
        if not callable(previous) or getattr(previous, "ends_streams", False):
            continue  # no handler to wrap (the default ends the process anyway), or wrapped already

        def handler(signum, frame, previous=previous):
            stop_streams()
            previous(signum, frame)

        handler.ends_streams = True
        signal.signal(sig, handler)


METHOD_ORDER = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


async def http_error(request: Request, exc: StarletteHTTPException):
    """FastAPI's answer to an HTTPException, with a 405's ``Allow`` listing every method of the path: Starlette
    lists only those of the first route whose path matched (``GET`` for ``/jobs/{id}``, which DELETE takes too),
    where RFC 9110 §15.5.6 asks for all the methods the resource supports."""
    if exc.status_code == 405:
        allowed = set()
        for route in request.app.state.method_routes:
            if route.matches(request.scope)[0] != Match.NONE:
                allowed |= route.methods
        if allowed:
            order = {m: i for i, m in enumerate(METHOD_ORDER)}
            exc.headers = {**(exc.headers or {}),
                           "Allow": ", ".join(sorted(allowed, key=lambda m: (order.get(m, len(order)), m)))}
    return await http_exception_handler(request, exc)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        end_streams_on_stop_signals()
        yield
        await app.state.services.events.aclose()  # the job-events listener and its connections

    app = FastAPI(
        title="slidesynth",
        version=__version__,
        description="Gigapixel whole-slide histopathology synthesis: submit conditioning, poll the job, "
        "download a pyramidal TIFF that opens in QuPath, OpenSlide-based tools and OpenSeadragon.",
        lifespan=lifespan,
    )
    store = open_store(settings)
    app.state.services = Services(settings=settings, store=store,
                                  registry=ModelRegistry(settings.models_dir), celery=make_celery(settings),
                                  replies=open_reply_box(settings), idempotency=open_idempotency_keys(settings),
                                  events=open_event_feed(store), webhooks=WebhookDispatcher(store, settings),
                                  event_data=RenderedEvents(lambda record: job_view(
                                      record, settings.retention_hours).model_dump_json()))
    routers = (generate.router, jobs.router, system.router, embed.router, web.router)  # web: the page at /
    for router in routers:
        app.include_router(router)
    # the routes of each path and method, for a 405's Allow (FastAPI nests included routers' routes)
    app.state.method_routes = [route for router in routers for route in router.routes
                               if getattr(route, "methods", None)]
    for path, assets, name in web.mounts():
        app.mount(path, assets, name=name)
    for exc_type in (RedisConnectionError, RedisTimeoutError):
        app.add_exception_handler(exc_type, store_unavailable)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_middleware(BodyLimit, limit=settings.max_upload_bytes)
    if settings.cors_origin_list:
        # browsers may send X-API-Key cross-origin (OpenSeadragon's ajaxHeaders); no cookies are used
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origin_list, allow_methods=["*"],
                           allow_headers=["X-API-Key", "Content-Type", "Range", "Idempotency-Key",
                                          "Last-Event-ID"],
                           expose_headers=["Location"], max_age=3600)
    app.add_middleware(RequestObserver)  # outermost of ours: counts, times and logs what the client gets
    # /metrics adds the job store's figures (jobs by status, queue lengths), read at scrape time
    app.state.store_metrics = JobStoreCollector(settings)

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (GenerateRequest, MultipartGenerate, MultipartEmbed):
                model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                for name, sub in model_schema.pop("$defs", {}).items():
                    components.setdefault(name, sub)
                components[model.__name__] = model_schema
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app
